"""Figures and tables for the run report (stage 05), from a ``RunView``; each figure is also saved as PNG.

Every registered scorer with results appears in the tables (`scorer_rows`, `run_summary`, `note_rows`): its
columns' means over units for the explanations and the token-lookup baseline, with bootstrap 95% intervals
of the mean, chance levels and notes. The figures draw the built-in scorers: the simulation scorer's pooled
correlations (distributions, by layer, simulated against true) and the judging scorers' balanced accuracy
and AUROC.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.layout import figures_dir
from nbutils.score.contract import Column
from nbutils.score.flags import copied_example
from nbutils.view.runview import RunView


def series(view: RunView) -> list[tuple[str, str, str, int]]:
    """The score series of the report's figures, from the run's headline scorer (`RunView.headline`): (name,
    whose, scorer, column) for each column it declares for the explanation (`Scorer.series`: the simulation
    scorer's top+random, random only and stratified correlations) and its headline for the token-lookup
    baseline; none before stage 03."""
    sc = view.headline
    if sc is None:
        return []
    cols = sc.series or (sc.headline,)
    out = [(f"explanation, {sc.columns[i].label}", "explanation", sc.name, i) for i in cols]
    return out + [(f"baseline, {sc.columns[sc.headline].label}", "baseline", sc.name, sc.headline)]


def headline_label(view: RunView) -> str:
    """The headline number in words, for axes: "pooled correlation, top+random", "keyword: recall" ..."""
    sc = view.headline
    if sc is None:
        return "score"
    label = sc.columns[sc.headline].label
    return f"{sc.measure}, {label}" if sc.measure else f"{sc.label_prefix or sc.name}: {label}"


DPI = 110
BOOTSTRAP_MAX = 2000  # `mean_interval` bootstraps up to this many values (2 M resampled indices, 16 MB)


def _figure(width: float = 7.0, height: float = 3.6, ncols: int = 1):
    """A figure outside pyplot's global state that notebooks display as a PNG (see `ReportFigure`)."""
    fig = _figure_class()(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _figure_class():
    """`matplotlib.figure.Figure` with ``_repr_png_``: IPython's ``display(fig)`` then embeds an ``image/png``
    output in the notebook (a plain Figure made without pyplot has no display formatter and shows only its
    text, ``<Figure size ...>``), in papermill runs and in JupyterLab alike."""
    from matplotlib.figure import Figure

    class ReportFigure(Figure):
        empty_notes: list[str]
        """Why each of its axes has nothing to draw (`_empty`); every axes: the figure is not shown or saved."""

        @property
        def is_empty(self) -> bool:
            return len(getattr(self, "empty_notes", [])) >= len(self.axes)

        def _repr_png_(self) -> bytes | None:
            if self.is_empty:
                return None
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=DPI)
            return buf.getvalue()

        def _repr_html_(self) -> str | None:  # an empty figure is said in words, not drawn
            return f"<p><em>No figure: {html.escape('; '.join(self.empty_notes))}.</em></p>" if self.is_empty else None

    return ReportFigure


def _empty(ax, text: str) -> None:
    """An axes with nothing to draw, saying why (a figure whose every axes is empty is neither shown nor saved)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    fig = ax.figure
    fig.empty_notes = [*getattr(fig, "empty_notes", []), text]


def score_values(view: RunView) -> dict[str, np.ndarray]:
    """Each series' defined scores over all scored neurons."""
    table = view.score_table
    out = {}
    for name, who, scorer_name, i in series(view):
        v = table.column(who, scorer_name, i)
        out[name] = v[np.isfinite(v)]
    return out


def score_distributions(view: RunView):
    """Histograms of the scores: explanation (top+random, random only) and the token-lookup baseline."""
    fig, ax = _figure()
    values = score_values(view)
    if not any(len(v) for v in values.values()):
        _empty(ax, "no scores yet (stage 03)")
        return fig
    bins = np.linspace(*view.headline.value_range, 41)
    for name, v in values.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (n={len(v)}, mean {v.mean():.3f})" if len(v) else name)
    ax.set_xlabel(headline_label(view))
    ax.set_ylabel(f"{view.store.meta.noun}s")
    ax.set_title("Score distributions")
    ax.legend(fontsize=8)
    return fig


def mean_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean with a 95% interval over the values: a percentile bootstrap up to `BOOTSTRAP_MAX` values, the
    normal interval (mean +- 1.96 standard errors) above, where the bootstrap's interval of a mean has
    converged to it and 1,000 resamples of 300,000 values would take seconds per number. A single value has
    no interval (NaN bounds, shown as "-" in tables and as a hollow marker without bars in figures)."""
    n = len(values)
    if n < 2:
        return (float(values.mean()) if n else float("nan")), float("nan"), float("nan")
    mean = float(values.mean())
    if n > BOOTSTRAP_MAX:
        half = 1.959964 * float(values.std(ddof=1)) / np.sqrt(n)
        return mean, mean - half, mean + half
    means = values[np.random.default_rng(seed).integers(0, n, (n_boot, n))].mean(1)
    return mean, float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def layer_rows(view: RunView) -> list[dict[str, Any]]:
    """Per layer and series: neurons scored and the mean score with its 95% interval."""
    rows = []
    table = view.score_table
    layers = table.layers
    for layer in sorted(set(layers.tolist())):
        for name, who, scorer_name, i in series(view):
            v = table.column(who, scorer_name, i)[layers == layer]
            v = v[np.isfinite(v)]
            if len(v):  # a series with no value in this layer has no row
                mean, low, high = mean_interval(v)
                rows.append({"layer": layer, "series": name, "n": len(v), "mean": mean, "low": low, "high": high})
    return rows


def _errors(rows: list[dict[str, Any]]) -> np.ndarray:
    """Error-bar lengths [2, n] below and above each row's mean (0 where it has no interval: one unit)."""
    err = np.array([[r["mean"] - r["low"] for r in rows], [r["high"] - r["mean"] for r in rows]], dtype=float)
    return np.nan_to_num(err.reshape(2, len(rows)), nan=0.0)


def score_by_layer(view: RunView):
    """Mean score per layer with bootstrap 95% intervals, for the explanation and the baseline."""
    fig, ax = _figure()
    rows = layer_rows(view)
    if not rows:
        _empty(ax, "no scores yet (stage 03)")
        return fig
    single = False
    names = [name for name, *_ in series(view)]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["series"] == name]
        x = np.array([r["layer"] for r in mine], dtype=float) + (i - (len(names) - 1) / 2) * 0.2
        y = np.array([r["mean"] for r in mine])
        line = ax.errorbar(x, y, yerr=_errors(mine), fmt="o-", capsize=3, label=name)
        one = np.array([r["n"] == 1 for r in mine], dtype=bool)
        if one.any():  # a single unit's score is not a mean with an interval: hollow, no bars
            single = True
            ax.plot(x[one], y[one], "o", mfc="white", mec=line.lines[0].get_color(), ms=7, zorder=3)
    if single:
        ax.plot([], [], "o", mfc="white", mec="0.3", label="hollow: one unit (no interval)")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean {headline_label(view)}")
    ax.set_title(f"Score by layer (95% interval over {view.store.meta.noun}s)")
    ax.legend(fontsize=8)
    return fig


def simulated_vs_true(view: RunView, n: int = 2):
    """Scatter of simulated expected value against true activation (scored excerpts) for the ``n`` best and
    ``n`` worst neurons."""
    simulating = [sc for sc in view.scorers if sc.detail == "simulation"]  # the scorers that save simulations
    order = view.ranked(scorer=simulating[0]) if simulating else []
    picks = order[:n] + [p for p in order[-n:] if p not in order[:n]]
    if not picks:
        fig, ax = _figure()
        _empty(ax, "no scored simulations (stage 03, with the simulation scorer)")
        return fig
    fig, axes = _figure(3.2 * len(picks), 3.2, ncols=len(picks))
    for ax, (score, key) in zip(np.atleast_1d(axes), picks):
        details = view.simulation(key)
        sim = details.of(simulating[0].name) if details is not None else None
        valid = sim.valid() if sim is not None else []
        true = np.concatenate([x.true for x in valid]) if valid else np.zeros(0)
        pred = np.concatenate([x.expected for x in valid]) if valid else np.zeros(0)
        ax.scatter(true, pred, s=4, alpha=0.4)
        ax.set_title(f"L{key[0]} N{key[1]} {key[2][:3]}: r={score:.2f}", fontsize=9)
        ax.set_xlabel("true activation")
        ax.set_ylabel("simulated (0..10)")
    return fig


OUTPUT_SIDE = (
    ("ablation", ("score",), "ablation score (0: mean ablation, 1: truth)", 0.0),
    ("intervention", ("balanced_accuracy",), "intervention balanced accuracy", 0.5),
)
"""The output-side scores set against the correlation: scorer, path to its metric, axis label, chance level."""


def _column_of(view: RunView, scorer_name: str, path: tuple[str, ...]) -> int | None:
    """The index of a scorer's column with this path, if the scorer has results in the run."""
    for sc in view.scorers:
        if sc.name == scorer_name:
            return next((i for i, c in enumerate(sc.columns) if c.path == path), None)
    return None


def output_side_scores(view: RunView):
    """Each unit's correlation score (top+random) against its ablation and intervention scores, for the
    explanation and the baseline: whether explaining when a unit fires also explains what it does."""
    table = view.score_table
    present = []
    for name, path, axis, chance in OUTPUT_SIDE:
        i = _column_of(view, name, path)
        if i is not None and np.isfinite(table.column("explanation", name, i)).any():
            present.append((name, i, axis, chance))
    if not present:
        fig, ax = _figure()
        _empty(ax, "no ablation or intervention scores (stage 03 with ablation=True or intervention=True)")
        return fig
    head = view.headline
    fig, axes = _figure(max(5.4, 3.8 * len(present)), 3.6, ncols=len(present))
    for ax, (name, i, axis, chance) in zip(np.atleast_1d(axes), present):
        for who, colour in (("explanation", "C0"), ("baseline", "C1")):
            xs, ys = table.column(who, head.name, head.headline), table.column(who, name, i)
            both = np.isfinite(xs) & np.isfinite(ys)
            if both.any():
                ax.scatter(xs[both], ys[both], s=14, color=colour, alpha=0.7, label=f"{who} ({int(both.sum())})")
        ax.axhline(chance, color="0.7", lw=0.8)
        ax.set_xlabel(headline_label(view))
        ax.set_ylabel(axis)
        ax.legend(fontsize=8)
    fig.suptitle("Does predicting when a unit fires predict what it does?", fontsize=9)
    return fig


def _chance(column: Column, f1_chance: np.ndarray) -> float | None:
    """A column's chance level: its own, or for F1 the mean F1 of answering yes to every item (of the units
    given); None for a number that has none (a correlation: 0 is no relation, not a chance level)."""
    if column.chance is not None:
        return column.chance
    if column.path == ("f1",):
        levels = f1_chance[np.isfinite(f1_chance)]
        return float(levels.mean()) if len(levels) else None
    return None


def scorer_rows(view: RunView) -> list[dict[str, Any]]:
    """Per scorer, column and who (explanation or baseline): units with a value, the mean with its 95%
    interval, chance, and how many units' numbers carry a note (a degenerate judge, too few items)."""
    rows = []
    table = view.score_table
    for sc in view.scorers:
        for i, column in enumerate(sc.columns):
            for who in ("explanation", "baseline"):
                values = table.column(who, sc.name, i)
                defined = np.isfinite(values)
                if not defined.any():
                    continue
                v = values[defined]
                mean, low, high = mean_interval(v)
                noted = int(table.noted[(who, sc.name, i)][defined].sum())
                degenerate = int(table.degenerate[(who, sc.name, i)][defined].sum())
                chance = _chance(column, table.f1_chance[(who, sc.name)][defined])
                rows.append(
                    {"scorer": sc.name, "metric": column.label, "of": who, "n": len(v), "mean": mean, "low": low,
                     "high": high, "chance": chance, "noted": noted, "degenerate judges": degenerate}
                )  # fmt: skip
    return rows


def classification_rows(view: RunView) -> list[dict[str, Any]]:
    """`scorer_rows` of the judging scorers (detection, fuzzing), keyed by ``task``."""
    judging = {sc.name for sc in view.scorers if sc.detail == "judged items"}
    return [{"task": r["scorer"], **r} for r in scorer_rows(view) if r["scorer"] in judging]


def classification_scores(view: RunView):
    """Mean balanced accuracy and AUROC of each judging scorer (detection, fuzzing) for the explanations
    beside the baseline's, with 95% intervals over units; 0.5 (dashed) is chance for both. Bars whose units
    all had a degenerate judge (one answer for every item) are hatched and labelled: their 0.5 is by
    construction. F1 is left to the table, where it stands beside its always-yes level."""
    from matplotlib.patches import Patch

    rows = [r for r in classification_rows(view) if r["chance"] == 0.5]
    tasks = [sc.name for sc in view.scorers if sc.detail == "judged items"] or ["detection", "fuzzing"]
    fig, axes = _figure(8.0, 3.4, ncols=len(tasks))
    for ax, task in zip(np.atleast_1d(axes), tasks):
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            _empty(ax, f"no {task} scores yet (stage 03)")
            continue
        metrics = list(dict.fromkeys(r["metric"] for r in mine))
        for j, who in enumerate(("explanation", "baseline")):
            part = [r for r in mine if r["of"] == who]
            x = np.array([metrics.index(r["metric"]) for r in part]) + (j - 0.5) * 0.35
            y = np.array([r["mean"] for r in part])
            bars = ax.bar(x, y, width=0.35, yerr=_errors(part), capsize=3, color=f"C{j}")
            for bar, r in zip(bars, part):
                if r["n"] == 1:  # one unit's number, not a mean with an interval
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, "1 unit,\nno interval",
                            ha="center", fontsize=7)  # fmt: skip
                if r["metric"] == "balanced accuracy" and r["degenerate judges"] == r["n"]:
                    bar.set_hatch("//")
                    ax.text(bar.get_x() + bar.get_width() / 2, 0.03, "degenerate\njudges", ha="center", fontsize=7,
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip
        ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylim(0, 1)
        ax.set_title(task)
        ax.legend(
            handles=[Patch(color=f"C{j}", label=w) for j, w in enumerate(("explanation", "baseline"))], fontsize=8
        )
    return fig


def usage_rows(view: RunView) -> list[dict[str, Any]]:
    """Tokens, requests, cache hits and estimated cost per LLM stage."""
    rows = []
    for stage, u in view.usage().items():
        hits, looked_up = u.get("cache_hits", 0), u.get("cache_hits", 0) + u.get("cache_misses", 0)
        rows.append(
            {
                "stage": stage,
                "requests sent": u.get("requests", 0),
                "prompt tokens": u.get("prompt_tokens", 0),
                "completion tokens": u.get("completion_tokens", 0),
                # a backend without a request cache (the local one) looks nothing up: not "0 of 0 hits"
                "request cache": f"{hits} of {looked_up} answered from it" if looked_up else "not used by this backend",
                "estimated cost": u.get("estimated_cost", "-"),
            }
        )
    return rows


def run_summary(view: RunView) -> list[dict[str, Any]]:
    """What was run and how it went, as (item, value) rows."""
    meta = view.store.meta
    failed = int(view.score_table.failed.sum())
    values = score_values(view)
    noun = meta.noun
    items = {
        "model": meta.model,
        "corpus": meta.corpus,
        "layers collected": ", ".join(map(str, meta.layers)),
        f"{noun}s collected": sum(len(view.store.neurons(layer)) for layer in meta.layers),
        "tokens seen": f"{meta.tokens_seen:,}" if meta.tokens_seen else "-",
        f"explanations ({noun} sides)": len(view.explanations),
        "scored": len(view.scores) - failed,
        "failed (explanation or scoring)": failed,
    }
    for name, v in values.items():
        items[f"mean score, {name}"] = f"{v.mean():.3f}" if len(v) else "-"
    head = view.headline  # its numbers are the "mean score" rows above
    headlines = {(sc.name, sc.columns[sc.headline].label) for sc in view.scorers if sc is not head}
    for r in scorer_rows(view):
        if (r["scorer"], r["metric"]) in headlines:
            degenerate = f" ({r['degenerate judges']} of {r['n']} degenerate judges)" if r["degenerate judges"] else ""
            items[f"mean {r['scorer']} {r['metric']}, {r['of']}"] = f"{r['mean']:.3f}{degenerate}"
    explained = [t for _, t in view.explanation_texts() if t]
    if explained:
        copies = sum(copied_example(e) is not None for e in explained)
        repeated = sum(any(n.startswith("same as") for n in notes) for notes in view.explanation_notes.values())
        items["explanations copying a worked example of the prompt"] = f"{copies} of {len(explained)}"
        items[f"explanations the same as another {noun}'s"] = f"{repeated} of {len(explained)}"
    if view.rare and view.rare["count"]:
        items[f"dead or rare {noun}s (fewer than {view.rare['min_active']} active tokens; not explained)"] = (
            f"{view.rare['count']} ({view.rare['dead']} never active)"
        )
    return [{"item": k, "value": v} for k, v in items.items()]


def writes_rows(view: RunView, n: int = 6, units: int = 50) -> list[dict[str, Any]]:
    """For the first ``units`` explained unit sides (a last row says how many more): the explanation beside the
    tokens the unit writes most (raises and lowers; swapped for a negative side), so an explanation of its
    inputs can be read against its effect on the output."""
    rows: list[dict[str, Any]] = []
    texts = [(k, t) for k, t in sorted(view.explanation_texts()) if t]
    for key, text in texts[:units]:
        writes = view.record(key[0], key[1]).writes
        if not writes:
            continue
        up, down = ("promotes", "suppresses") if key[2] != "negative" else ("suppresses", "promotes")
        rows.append({
            "layer": key[0], "neuron": key[1], "sign": key[2], "explanation": text,
            "raises": " ".join(repr(t) for t, _ in writes[up][:n]),
            "lowers": " ".join(repr(t) for t, _ in writes[down][:n]),
        })  # fmt: skip
    if rows and len(texts) > units:
        rows.append({"layer": "...", "neuron": "...", "sign": "", "explanation": f"{len(texts) - units:,} more",
                     "raises": "", "lowers": ""})  # fmt: skip
    return rows


def rare_rows(view: RunView, n: int = 50) -> list[dict[str, Any]]:
    """The dead and rare units stage 02 left out, with their active-token counts (the first ``n``; a last row
    says how many more), or one row saying there were none."""
    rare = view.rare
    noun = view.store.meta.noun
    if not rare or not rare["count"]:
        rule = f" (min_active={rare['min_active']})" if rare else ""
        return [{"layer": "-", noun: "-", "active tokens": f"no dead or rare {noun}s{rule}"}]
    rows: list[dict[str, Any]] = [{"layer": u[0], noun: u[1], "active tokens": u[2]} for u in rare["units"][:n]]
    if rare["count"] > n:
        rows.append(
            {"layer": "...", noun: "...", "active tokens": f"{rare['count'] - n} more in 02_explain/summary.json"}
        )
    return rows


def note_rows(view: RunView, units: int = 200) -> list[dict[str, Any]]:
    """The notes on the run's results (`nbutils.score.flags`), one row per unit side and note, for the first
    ``units`` sides with notes (a last row says how many more): copied or repeated explanations, degenerate
    judges, scores over too few items (the explanation's and the baseline's)."""
    rows, noun = [], view.store.meta.noun  # the unit column is headed "neuron" or "feature"
    flagged = view.noted_keys()  # from the flags: only those results are read
    for key in sorted(flagged)[:units]:
        rows += [{"layer": key[0], noun: key[1], "sign": key[2], "result": w, "note": n} for w, n in view.notes(key)]
    if len(flagged) > units:
        rows.append({"layer": "...", noun: "...", "sign": "", "result": "",
                     "note": f"{len(flagged) - units:,} more unit sides with notes (RunView.notes, scores_frame)"})  # fmt: skip
    return rows


def write_report(view: RunView, out_dir: str | Path) -> dict[str, Path]:
    """Save every report figure that has something to show as PNG under ``out_dir/figures``; return their
    paths by name (a figure with nothing to draw, e.g. output-side scores in a run without them, is left out)."""
    folder = figures_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, make in (
        ("score_distributions", score_distributions),
        ("score_by_layer", score_by_layer),
        ("simulated_vs_true", simulated_vs_true),
        ("classification_scores", classification_scores),
        ("output_side_scores", output_side_scores),
    ):
        fig = make(view)
        if fig.is_empty:
            (folder / f"{name}.png").unlink(missing_ok=True)  # a figure an earlier report drew, now stale
            continue
        tmp = folder / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=DPI)
        tmp.replace(folder / f"{name}.png")
        paths[name] = folder / f"{name}.png"
    return paths
