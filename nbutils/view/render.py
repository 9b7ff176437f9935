"""HTML for one neuron and for a whole run: pure functions of a ``RunView``, shared by the widget and the export.

Every token, explanation and reason is escaped (corpus text and LLM output are untrusted), so a corpus token
``<script>`` shows literally. Colours use one fixed scale per neuron, the largest absolute activation it
reached, so excerpts of one neuron compare at a glance: orange for positive values, blue for negative ones.
Each token's value is in its tooltip. Simulated values (0..10) are shown in green on their own 0..10 scale.
The output needs no kernel, no script and no network, so a page can be saved and shared as it is.
"""

from __future__ import annotations

import html
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from nbutils.core.failures import rare_units_text
from nbutils.core.records import Excerpt
from nbutils.core.results import ExplanationEntry
from nbutils.core.units import Key
from nbutils.score.classification import JudgedItem
from nbutils.score.contract import Scorer, UnitScores
from nbutils.score.flags import WARN, with_notes
from nbutils.score.simulation import Simulation
from nbutils.view.runview import RunView
from nbutils.view.tables import Legend, column_text, heatmap_html, label, neuron_scale, scorers_of

STYLE = """
.nbx { font-family: system-ui, sans-serif; font-size: 13px; color: #222; }
.nbx h3 { margin: 6px 0; } .nbx h4 { margin: 10px 0 4px; }
.nbx table { border-collapse: collapse; margin: 4px 0; }
.nbx td, .nbx th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
.nbx .nbx-excerpt { font-family: monospace; line-height: 1.7; margin: 2px 0; white-space: pre-wrap; }
.nbx .nbx-row-label { display: inline-block; width: 6em; color: #777; font-family: sans-serif; }
.nbx .nbx-muted { color: #777; }
.nbx .nbx-warn { color: #a15c00; }
.nbx .nbx-legend span { padding: 0 6px; margin-right: 4px; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _token_text(token: str) -> str:
    return _esc(token).replace("\n", "\u21b5").replace("\t", "\u21e5")


def _excerpts_html(title: str, excerpts: Sequence[Excerpt], scale: float, kind: str) -> str:
    if not excerpts:
        return ""
    rows = "".join(heatmap_html(e.tokens, e.activations, scale, kind, looks=e.looks) for e in excerpts)
    return f"<h4>{_esc(title)} <span class='nbx-muted'>({len(excerpts)})</span></h4>{rows}"


def writes_html(writes: dict[str, list[tuple[str, float]]] | None, sign: str = "positive", n: int = 10) -> str:
    """What a unit writes (`nbutils.subject.outputs`): the tokens whose logits its output direction raises and
    lowers most, with the change per unit of its value. Empty when the collection has none."""
    if not writes:
        return ""
    rows = []
    for name in ("promotes", "suppresses"):
        cells = " ".join(
            f"<span title='{v:+.3g}'>{_token_text(t)}<span class='nbx-muted'> {v:+.2f}</span></span>"
            for t, v in writes[name][:n]
        )
        rows.append(f"<tr><th>{name}</th><td class='nbx-excerpt'>{cells}</td></tr>")
    flip = (
        " Its negative side writes the reverse: it lowers the first row and raises the second."
        if sign == "negative"
        else ""
    )
    return (
        "<h4>What it writes <span class='nbx-muted'>(output direction through the final norm and unembedding; "
        f"logit change per unit of its value){_esc(flip)}</span></h4><table>{''.join(rows)}</table>"
    )


def scorer_table_html(result: UnitScores, sc: Scorer) -> str:
    """One scorer's numbers for the explanation and the token-lookup baseline, each with its notes."""
    head = "".join(f"<th>{_esc(label(sc, c))}</th>" for c in sc.columns)
    rows, legend = [], Legend(kind=str)  # a note shared by several numbers is written once, under the table
    for name, part in (("explanation", result), ("token-lookup baseline", result.baseline)):
        cells = "".join(f"<td>{legend.cell(column_text(part, sc, c))}</td>" for c in sc.columns)
        rows.append(f"<tr><th>{name}</th>{cells}</tr>")
    own = result.of(sc.name) or result.baseline.of(sc.name)
    caption = sc.caption(own) if own is not None else None
    note = f"<p class='nbx-muted'>{_esc(caption)}</p>" if caption else ""
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>{legend.html()}{note}"


def scores_table_html(result: UnitScores | None, scorers: Sequence[Scorer] | None = None) -> str:
    """Every scorer's numbers for the explanation beside the token-lookup baseline's (95% intervals in
    brackets, notes beside weak numbers), one table per scorer, then any failure."""
    if not result:
        return "<p class='nbx-muted'>Not scored yet (stage 03).</p>"
    present = [sc for sc in (scorers if scorers is not None else scorers_of([result]))]
    tables = "".join(
        scorer_table_html(result, sc) for sc in present if result.of(sc.name) or result.baseline.of(sc.name)
    )
    failure = f"<p>Failure: {_esc(result.failure)}</p>" if result.failure else ""
    return tables + failure


def explanation_html(entry: ExplanationEntry | None, notes: Sequence[str] = ()) -> str:
    """The kept explanation (with notes: a copy of the prompt's worked example, the same as other neurons'),
    every candidate with its calibration score, and the baseline explanation."""
    if not entry:
        return "<p class='nbx-muted'>Not explained yet (stage 02).</p>"
    kept = entry.explanation
    warn = "".join(f"<br><span class='nbx-warn'>{WARN} {_esc(n)}</span>" for n in notes)
    head = (
        f"<p><b>Explanation:</b> {_esc(kept)}{warn}</p>"
        if kept
        else f"<p><b>No explanation:</b> {_esc(entry.failure)}</p>"
    )
    rows = []
    for c in entry.candidates:
        score = c.calibration_score
        shown = f"{score:.3f}" if isinstance(score, float) else _esc(c.reason or "-")
        mark = " \u2713" if c.explanation == kept and kept else ""
        rows.append(f"<tr><td>{_esc(c.explanation)}{mark}</td><td>{shown}</td></tr>")
    table = f"<table><tr><th>candidate</th><th>calibration score</th></tr>{''.join(rows)}</table>" if rows else ""
    base = entry.baseline.explanation if entry.baseline else None
    return head + table + (f"<p><b>Token-lookup baseline:</b> {_esc(base)}</p>" if base else "")


def _sparkline(true: Sequence[float], simulated: Sequence[float], scale: float) -> str:
    """True (orange) and simulated (green) values overlaid, each on its own scale, as a small inline SVG."""
    n, w, h = len(true), 4, 36
    if n < 2:
        return ""

    def points(values: Sequence[float], top: float) -> str:
        top = top if top > 0 else 1.0
        return " ".join(f"{i * w},{h - 2 - (h - 4) * min(max(v / top, 0.0), 1.0):.1f}" for i, v in enumerate(values))

    return (
        f'<svg width="{(n - 1) * w}" height="{h}" style="display:block">'
        f'<polyline fill="none" stroke="rgb(255,140,0)" stroke-width="1.5" points="{points(true, scale)}"/>'
        f'<polyline fill="none" stroke="rgb(40,170,80)" stroke-width="1.5" points="{points(simulated, 10.0)}"/>'
        "</svg>"
    )


def simulation_html(detail: Simulation | None, scale: float) -> str:
    """True versus simulated activations for each scored (validation) excerpt: two aligned rows and an overlay
    (the details a scorer of the "simulation" kind saves)."""
    if not detail:
        return ""
    parts = [
        "<h4>True versus simulated (scored excerpts)</h4>",
        "<p class='nbx-legend'><span style='background:rgba(255,140,0,0.6)'>true activation</span>"
        "<span style='background:rgba(40,170,80,0.6)'>simulated, 0..10</span></p>",
    ]
    for x in detail.valid():
        parts.append(
            f"<div data-split='{_esc(x.split)}' style='margin:6px 0'>"
            f"<span class='nbx-row-label'>true</span>{heatmap_html(x.tokens, x.true, scale, 'true')}"
            f"<span class='nbx-row-label'>simulated</span>"
            f"{heatmap_html(x.tokens, x.expected, 10.0, 'simulated', hue='green')}"
            f"{_sparkline(x.true, x.expected, scale)}</div>"
        )
    return "".join(parts)


def judged_html(task: str, items: list[JudgedItem], limit: int = 20) -> str:
    """A judging scorer's items for one unit: truth, the judge's P(yes), and the text (marked tokens
    underlined), so a researcher can see where the judge went wrong."""
    if not items:
        return ""
    rows = []
    for it in items[:limit]:
        marked = set(it.marked or [])
        text = "".join(
            f"<u style='background:#ffe9a8'>{_token_text(t)}</u>" if i in marked else _token_text(t)
            for i, t in enumerate(it.tokens)
        )
        p = "-" if it.p_yes is None else f"{it.p_yes:.2f}"
        rows.append(
            f"<tr><td>{_esc(it.kind)}</td><td>{_esc(it.source)}</td><td>{'yes' if it.label else 'no'}</td>"
            f"<td{' style=color:#c00' if it.wrong else ''}>{p}</td><td class='nbx-excerpt'>{text}</td></tr>"
        )
    more = f" <span class='nbx-muted'>(first {limit} of {len(items)})</span>" if len(items) > limit else ""
    return (
        f"<details><summary>{_esc(task)} items{more}</summary><table><tr><th>kind</th><th>source</th>"
        f"<th>truth</th><th>P(yes)</th><th>text</th></tr>{''.join(rows)}</table></details>"
    )


def details_html(view: RunView, key: Key, scale: float) -> str:
    """Every scorer's saved details that views know how to draw (simulations, judged items)."""
    details = view.simulation(key)
    parts = []
    for sc in view.scorers if details is not None else []:
        if sc.detail == "simulation":
            parts.append(simulation_html(details.of(sc.name), scale))
        elif sc.detail == "judged items":
            parts.append(judged_html(sc.name, details.of(sc.name) or []))
    return "".join(parts)


def neuron_html(view: RunView, layer: int, neuron: int, sign: str = "positive", n_excerpts: int = 10) -> str:
    """The full view of one neuron: statistics, explanation and scores, heatmaps, true versus simulated."""
    rec = view.record(layer, neuron)
    key: Key = (layer, neuron, sign)
    scale = neuron_scale(rec)
    stats = (
        f"max {rec.max:.4g} \u00b7 min {rec.min:.4g} \u00b7 mean {rec.mean:.4g} \u00b7 "
        f"sd {math.sqrt(max(rec.variance, 0.0)):.4g} \u00b7 colour scale \u00b1{scale:.4g}"
    )
    parts = [
        f'<section class="nbx-neuron" id="L{layer}-N{neuron}-{_esc(sign)}" data-layer="{layer}" '
        f'data-neuron="{neuron}" data-sign="{_esc(sign)}">',
        f"<h3>Layer {layer}, {rec.noun} {neuron}" + (" (negative side)" if sign == "negative" else "") + "</h3>",
        f"<p class='nbx-muted'>{stats}</p>",
    ]
    if scale == 0.0:
        parts.append(f"<p>This {rec.noun} never varied on the corpus (all activations equal): nothing to explain.</p>")
    parts.append(explanation_html(view.explanations.get(key), view.explanation_notes.get(key, [])))
    parts.append(scores_table_html(view.scores.get(key), view.scorers))
    parts.append(writes_html(rec.writes, sign))
    parts.append(_excerpts_html("Top-activating excerpts", rec.top[:n_excerpts], scale, "top"))
    parts.append(details_html(view, key, scale))
    parts.append(_excerpts_html("Most negative excerpts", rec.bottom[:n_excerpts], scale, "bottom"))
    for (lo, hi), band in zip(rec.band_quantiles, rec.bands):
        parts.append(_excerpts_html(f"Quantile band {lo:g}-{hi:g} of excerpt maxima", band[:n_excerpts], scale, "band"))
    parts.append(_excerpts_html("Random excerpts", rec.random[:n_excerpts], scale, "random"))
    parts.append("</section>")
    return "".join(parts)


def fragment(body: str) -> str:
    """A renderable fragment for a notebook output or widget: the body wrapped with its stylesheet."""
    return f"<div class='nbx'><style>{STYLE}</style>{body}</div>"


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document (inline CSS, no scripts, no external resources)."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{STYLE} body {{ margin: 16px; }}</style></head>"
        f"<body class='nbx'>{body}</body></html>"
    )


PAGE_UNITS = 200
"""How many unit sides the static page of a run shows in full by default (every one is in its table)."""


FULL_TABLE_MAX = 2000
"""Above this many unit sides the page's index is `compact_index_html` (a number per cell, read from the
store's index), not `run_index_html`'s cells with their notes spelled out (which parse every result)."""


def _index_columns(view: RunView) -> list[tuple[Scorer, int, bool]]:
    """The index's scorer columns: (scorer, column index, baseline?): the compact ones, then the baselines'."""
    return [(sc, i, False) for sc in view.scorers for i in sc.compact] + [(sc, 0, True) for sc in view.scorers]


def _index_name(key: Key, linked: set[Key] | None) -> str:
    name = f"L{key[0]} N{key[1]}"
    return f"<a href='#L{key[0]}-N{key[1]}-{_esc(key[2])}'>{name}</a>" if linked is None or key in linked else name


def run_index_html(view: RunView, keys: Sequence[Key], linked: set[Key] | None = None) -> str:
    """A table of the given units with explanation and every scorer's compact columns (and the baseline's
    headline); the rows of ``linked`` units (default: all) link to their sections. Above `FULL_TABLE_MAX`
    units it is `compact_index_html`."""
    if len(keys) > FULL_TABLE_MAX:
        return compact_index_html(view, keys, linked)
    columns = [(sc, sc.columns[i], base) for sc, i, base in _index_columns(view)]
    rows, legend = [], Legend()  # a note shows as a numbered marker; the legend below says each kind once
    notes = view.explanation_notes
    for k in keys:
        e, r = view.explanations.get(k), view.scores.get(k)
        text = with_notes((e.explanation or e.failure or "") if e else "", notes.get(k, []))
        cells = [column_text(r.side(base) if r else None, sc, c) for sc, c, base in columns]
        rows.append(
            f"<tr><td>{_index_name(k, linked)} {_esc(k[2])}</td>"
            f"<td>{legend.cell(text)}</td>" + "".join(f"<td>{legend.cell(c)}</td>" for c in cells) + "</tr>"
        )
    head = "".join(f"<th>{'baseline ' if base else ''}{_esc(label(sc, c))}</th>" for sc, c, base in columns)
    table = f"<table><tr><th>{view.store.meta.noun}</th><th>explanation</th>{head}</tr>{''.join(rows)}</table>"
    return table + legend.html()


def compact_index_html(view: RunView, keys: Sequence[Key], linked: set[Key] | None = None) -> str:
    """The index table of a large run: every unit side's explanation (from the store's column) and numbers
    (`RunView.score_table`, 3 significant digits), a marker on each cell that carries a note; what the note
    says is in the unit's section and the report's table of notes. No result is parsed."""
    table, texts, notes = view.score_table, dict(view.explanation_texts()), view.explanation_notes
    row_of = {k: i for i, k in enumerate(table.keys)}
    columns = [(("baseline" if base else "explanation"), sc.name, i) for sc, i, base in _index_columns(view)]
    marked = 0

    def cell(column: tuple[str, str, int], i: int | None) -> str:
        nonlocal marked
        v = np.nan if i is None else table.values[column][i]
        text = "-" if np.isnan(v) else f"{v:.3g}"
        if i is not None and table.noted[column][i]:
            marked += 1
            text += f" {WARN}"
        return f"<td>{text}</td>"

    rows = []
    for k in keys:
        i = row_of.get(k)
        text = _esc(texts.get(k) or "-")
        if k in notes:
            marked += 1
            text += f" {WARN}"
        cells = "".join(cell(c, i) for c in columns)
        rows.append(
            f"<tr><td>{_index_name(k, linked)} {'+' if k[2] == 'positive' else '-'}</td><td>{text}</td>{cells}</tr>"
        )
    head = "".join(
        f"<th>{'baseline ' if base else ''}{_esc(label(sc, sc.columns[i]))}</th>"
        for sc, i, base in _index_columns(view)
    )
    legend = (
        f"<p class='nbx-muted'>{len(keys):,} unit sides (+ positive, - negative). {WARN} marks {marked:,} cells whose "
        "explanation or number carries a note (a copied or repeated explanation, a degenerate judge, too few "
        "items): the unit's section below, where it has one, and the report's table of notes say which.</p>"
    )
    return f"<table><tr><th>{view.store.meta.noun}</th><th>explanation</th>{head}</tr>{''.join(rows)}</table>{legend}"


def page_choice(view: RunView, keys: Sequence[Key], page_units: int, seed: int = 0) -> tuple[list[Key], str]:
    """The unit sides a page shows in full (at most ``page_units`` of ``keys``) and a sentence saying which:
    all of them when they fit; else the best and the worst by the top+random correlation, a third each, and an
    even random sample (seeded) of the rest, or the first ones in index order when none is scored."""
    keys, wanted = list(keys), set(keys)
    ranked = [k for _, k in view.ranked() if k in wanted]
    if len(keys) <= page_units:  # all of them, best first
        placed = set(ranked)
        return ranked + [k for k in keys if k not in placed], ""
    n = len(keys)
    if not ranked:
        return keys[:page_units], f"Full detail below for the first {page_units} of these {n:,} (none is scored yet)."
    third = min(page_units // 3, len(ranked) // 2)
    best, worst = ranked[:third], ranked[len(ranked) - third :][::-1]
    taken = set(best) | set(worst)
    rest = [k for k in keys if k not in taken]
    sample = sorted(random.Random(seed).sample(rest, min(page_units - len(taken), len(rest))))
    return best + worst + sample, (
        f"Full detail below for {len(best) + len(worst) + len(sample)} of these {n:,}: the {len(best)} best and the "
        f"{len(worst)} worst by top+random correlation, then {len(sample)} chosen at random (seed {seed}) from the "
        "rest. The table lists every one; the names with a link have a section."
    )


def run_html(view: RunView, keys: Sequence[Key] | None = None, page_units: int = PAGE_UNITS) -> str:
    """A shareable page for a run: summary, a table of every chosen unit side, and the full view of at most
    ``page_units`` of them (`page_choice`), which the page states.

    By default the unit sides are the explained ones (all collected units if none is explained yet); the
    detailed ones come best score first.
    """
    if keys is None:
        keys = view.keys() or [n.key() for n in view.store.all_ids()]
    shown, choice = page_choice(view, keys, page_units)
    meta = view.store.meta
    summary = (
        f"<p>Model <b>{_esc(meta.model)}</b>, corpus <b>{_esc(meta.corpus)}</b>, layers {_esc(meta.layers)}, "
        f"{meta.n_excerpts:,} excerpts of {meta.excerpt_len} tokens. {len(view.explanations):,} explained, "
        f"{len(view.scores):,} scored.</p>"  # no time of writing: the same run gives the same page, byte for byte
    )
    cut = f"<p class='nbx-muted'>{_esc(choice)}</p>" if choice else ""
    title = f"{meta.noun.capitalize()} explanations"
    body = f"<h2>{title}</h2>" + summary + rare_html(view) + cut + run_index_html(view, list(keys), set(shown))
    body += "".join("<hr>" + neuron_html(view, *k) for k in shown)
    return page(title, body)


def rare_html(view: RunView, shown: int = 30) -> str:
    """A line on the run's dead and rare units (from stage 02's summary), or "" when there are none."""
    rare = view.rare
    if not rare or not rare["count"]:
        return ""
    return (
        f"<p class='nbx-muted'>{rare['count']} {view.store.meta.noun}s are dead or rare ({rare['dead']} never "
        f"active; fewer than {rare['min_active']} active tokens), not explained or scored. With their active-token "
        f"counts: {_esc(rare_units_text(rare, shown))}.</p>"
    )
