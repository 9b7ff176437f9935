"""Tables and small displays for the stage notebooks and the views: strong units, excerpts coloured by
activation, explanation and score tables with their notes, metric text.

Every HTML function escapes every token and label (corpus text is untrusted input), so the output can be
tested without a kernel and shown with ``IPython.display.HTML``. Score tables show every registered scorer
that has results (`nbutils.score.contract`), each number with its notes (`nbutils.score.flags`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.io import read_json
from nbutils.core.layout import usage_path
from nbutils.core.records import RecordStore, UnitRecord
from nbutils.core.results import ExplanationEntry
from nbutils.score.contract import Column, ScoredSide, Scorer, UnitScores, label, registered
from nbutils.score.flags import WARN, explanation_notes, with_notes
from nbutils.score.metrics import Metric


def strongest_neurons(store: RecordStore, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` neurons with the largest max activation relative to their standard deviation, all layers."""
    rows = []
    for layer in store.layers:
        s = store.stats(layer)
        ratio = store.strength(layer)
        for i in np.argsort(-ratio)[:n]:
            rows.append(
                {
                    "layer": layer,
                    "neuron": int(s["neuron"][i]),
                    "max": float(s["max"][i]),
                    "min": float(s["min"][i]),
                    "mean": float(s["mean"][i]),
                    "std": float(np.sqrt(s["variance"][i])),
                    "max/std": float(ratio[i]),
                }
            )
    rows.sort(key=lambda r: -r["max/std"])
    return rows[:n]


def note_kind(note: str) -> str:
    """What a note says without its particulars (counts become N, lists of units and quotes are dropped),
    so ``only 2 positive items`` and ``only 3 positive items`` share one legend line."""
    return re.sub(r"(?<![\d.])\d+(?![\d.])", "N", re.sub(r" \((L\d|\").*\)$", "", note))  # counts, not 0.5


class Legend:
    """The notes of one table (`nbutils.score.flags`), each kind numbered once: a cell shows its number and a
    marker whose tooltip holds the cell's own notes, and `html` lists each kind once below the table."""

    def __init__(self, kind: Callable[[str], str] = note_kind) -> None:
        """``kind`` groups notes into legend lines: `note_kind` for tables of many units; ``str`` (each note
        its own line) for one unit's table."""
        self.kind = kind
        self.kinds: dict[str, list[int]] = {}  # kind -> [number, cells carrying it]

    def cell(self, value: Any) -> str:
        """A cell's escaped text: a `Noted` value as its text and a marker; floats to 3 significant digits;
        None and NaN as "-"."""
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "-"
        if isinstance(value, float):
            return html.escape(f"{value:.3g}")
        notes = getattr(value, "notes", ())
        if not notes:
            return html.escape(str(value))
        numbers = []
        for kind in dict.fromkeys(self.kind(n) for n in notes):
            entry = self.kinds.setdefault(kind, [len(self.kinds) + 1, 0])
            entry[1] += 1
            numbers.append(entry[0])
        tip = html.escape("; ".join(notes), quote=True)
        mark = f"{WARN}{','.join(map(str, numbers))}"
        return f"{html.escape(value.text)} <span class='nbx-note' style='color:#b35900;cursor:help' title=\"{tip}\">{mark}</span>"

    def html(self) -> str:
        """The legend: one line per kind of note, with how many cells carry it (empty when none does)."""
        if not self.kinds:
            return ""
        items = "".join(
            f"<li>{WARN}{number} {html.escape(kind)} ({count} cell{'' if count == 1 else 's'})</li>"
            for kind, (number, count) in self.kinds.items()
        )
        hint = "" if self.kind is str else f"<p class='nbx-muted'>Hover a {WARN} for the cell's own notes.</p>"
        return f"<ul class='nbx-legend'>{items}</ul>{hint}"


def table_html(rows: list[dict[str, Any]]) -> str:
    """A plain HTML table of dict rows (floats to 3 significant digits, None and NaN as "-"); numbers with
    notes show a marker, and the notes' legend follows the table."""
    if not rows:
        return "<p><em>no rows</em></p>"
    cols = list(rows[0])
    legend = Legend()
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{legend.cell(r[c])}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{legend.html()}"


SHOWN = 50
"""Rows a stage notebook's table shows (the viewer, the page and `nbutils.open_run` have every unit)."""


def head_table_html(
    rows_of: Callable[[Sequence[Any]], list[dict[str, Any]]], items: Sequence[Any], limit: int = SHOWN
) -> str:
    """The table of the first ``limit`` items (``rows_of``: `explanation_rows` or `score_rows`), and, where
    there are more, a line saying how many were left out and where to see them: a notebook of a run of any
    size stays small, and only the rows shown are read (from a `nbutils.core.store.StoredSequence`)."""
    shown = list(items[:limit])
    table = table_html(rows_of(shown))
    if len(items) <= limit:
        return table
    return table + (
        f"<p><em>The first {limit:,} of {len(items):,} unit sides (notes on repeated explanations compare these "
        "rows only). Every unit: the viewer (notebook 04), or <code>nbutils.open_run(run_dir).scores_frame()"
        "</code> and <code>.explanations_frame()</code>.</em></p>"
    )


QUOTES = "\"'\u201c\u201d\u2018\u2019"


def quoted_html(text: str) -> str:
    """``text`` escaped for HTML between curly quotes, or as it is when it already begins and ends with a quote
    mark: an explanation such as '"the" after a number' never shows doubled quotes."""
    text = str(text).strip()
    inner = html.escape(text, quote=True)
    return inner if len(text) > 1 and text[0] in QUOTES and text[-1] in QUOTES else f"\u201c{inner}\u201d"


def visible_token(token: str) -> str:
    """A token with its white space made visible (a space as \u2423, a newline as \u21b5, a tab as \u21e5), for a
    table cell where a space token would show as an empty cell."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def colour(value: float, scale: float) -> str:
    """Orange for positive, blue for negative values, alpha by magnitude relative to ``scale``."""
    if not np.isfinite(value) or scale <= 0:
        return "transparent"
    a = min(abs(value) / scale, 1.0)
    return f"rgba(255,140,0,{a:.2f})" if value >= 0 else f"rgba(30,110,255,{a:.2f})"


EXCERPTS_STYLE = "font-family:monospace;line-height:1.7;white-space:pre-wrap"
"""Inline layout for heatmaps shown without a stylesheet (inherited by the excerpt rows)."""


def neuron_scale(record: UnitRecord) -> float:
    """A neuron's fixed colour scale: its largest absolute activation (0 for a neuron that never varies)."""
    values = [abs(v) for v in (record.max, record.min) if np.isfinite(v)]
    return max(values, default=0.0)


def heatmap_html(
    tokens: Sequence[str], values: Sequence[float], scale: float, kind: str = "", hue: str = "", looks: Any = None
) -> str:
    """One excerpt as tokens shaded by value on a fixed ``scale``, with each value in the token's tooltip.

    ``hue="green"`` shades simulated values instead of the orange/blue activation colours. ``looks``: an
    attention head's `nbutils.core.records.Looks` for the excerpt: each tooltip also names the token the head
    attends to most from there, and the strongest (token <- source) pairs are listed under it. Lay it out
    inside ``EXCERPTS_STYLE`` (monospace, wrapping) or a stylesheet rule for ``.nbx-excerpt``.
    """
    spans = []
    for i, (tok, value) in enumerate(zip(tokens, values)):
        v = float(value)
        tip = f"{v:.4g}"
        if looks is not None:
            src = int(looks.source[i])
            tip += f" \u2190 {tokens[src]!r} (position {src}, weight {float(looks.weight[i]):.2f})"
        bg = colour(v, scale)
        if hue == "green" and bg != "transparent":
            bg = f"rgba(40,170,80,{min(abs(v) / scale, 1.0):.2f})"
        style = "" if bg == "transparent" else f' style="background:{bg}"'
        text = html.escape(tok).replace("\n", "\u21b5").replace("\t", "\u21e5")
        spans.append(f'<span title="{html.escape(tip, quote=True)}"{style}>{text}</span>')
    pairs = ""
    if looks is not None:
        shown = ", ".join(
            f"{_shown(tokens[i])} \u2190 {_shown(tokens[src])} ({w:.2f})" for i, src, w in looks.pairs(list(tokens), 3)
        )
        pairs = f'<div class="nbx-looks" style="color:#777;font-size:90%">looks: {shown}</div>' if shown else ""
    return f'<div class="nbx-excerpt" data-kind="{html.escape(kind)}">{"".join(spans)}</div>{pairs}'


def looks_svg(tokens: Sequence[str], looks: Any, values: Sequence[float], min_fraction: float = 0.2) -> str:
    """An attention head's (token <- source) pairs drawn as arcs over a text: one arc from the source to each
    token where the head's value is at least ``min_fraction`` of its largest on the text (and the source is
    another token), thicker and darker the larger the value. Token texts are escaped; each arc's tooltip
    gives the pair, its attention weight and the value."""
    char, height = 7.4, 22
    starts, x = [], 4.0
    for t in tokens:
        starts.append(x)
        x += max(len(visible_token(t)), 1) * char + 4
    centre = [sx + (max(len(visible_token(t)), 1) * char) / 2 for sx, t in zip(starts, tokens)]
    v = np.asarray(values, dtype=np.float64)
    top = float(v.max()) if len(v) and v.max() > 0 else 0.0
    drawn = []
    for i, src in enumerate(int(s) for s in looks.source):
        if top > 0 and src != i and v[i] >= min_fraction * top:
            drawn.append((i, src, min(12 + 6 * (i - src), 90), v[i] / top))
    base = max((rise for *_, rise, _ in drawn), default=0) * 0.75 + 6
    arcs = []
    for i, src, rise, strength in drawn:
        tip = html.escape(f"{tokens[i]!r} <- {tokens[src]!r}: weight {float(looks.weight[i]):.2f}, value {v[i]:.4g}")
        a, b, up = centre[src], centre[i], base - rise
        arcs.append(
            f'<path d="M{a:.1f},{base:.1f} C{a:.1f},{up:.1f} {b:.1f},{up:.1f} {b:.1f},{base:.1f}" fill="none" '
            f'stroke="rgba(200,90,0,{0.25 + 0.75 * strength:.2f})" stroke-width="{1 + 2.5 * strength:.1f}">'
            f"<title>{tip}</title></path>"
        )
    words = "".join(
        f'<text x="{sx:.1f}" y="{base + 16:.1f}">{html.escape(visible_token(t))}</text>'
        for sx, t in zip(starts, tokens)
    )
    none = f"(no token reaches {min_fraction:.0%} of the largest value with another source)"
    note = "" if arcs else f'<text x="4" y="{base:.1f}" fill="#777">{none}</text>'
    return (
        f'<div style="overflow-x:auto"><svg xmlns="http://www.w3.org/2000/svg" width="{x + 4:.0f}" '
        f'height="{base + height:.0f}" style="font-family:monospace;font-size:12px">'
        f"{''.join(arcs)}{note}{words}</svg></div>"
    )


def _shown(token: str) -> str:
    return html.escape(repr(token)).replace("\\n", "\u21b5")


def neuron_excerpts_html(store: RecordStore, layer: int, neuron: int, n: int = 3) -> str:
    """A neuron's strongest excerpts (and most negative ones for signed sites), on one colour scale."""
    rec = store.record(layer, neuron)
    scale = neuron_scale(rec)
    parts = [f"<h4>layer {layer}, neuron {neuron}: max {rec.max:.3g}, min {rec.min:.3g}, mean {rec.mean:.3g}</h4>"]
    parts += [heatmap_html(e.tokens, e.activations, scale, "top") for e in rec.top[:n]]
    if rec.bottom:
        parts.append("<p>most negative:</p>")
        parts += [heatmap_html(e.tokens, e.activations, scale, "bottom") for e in rec.bottom[:n]]
    return f'<div style="{EXCERPTS_STYLE}">' + "\n".join(parts) + "</div>"


def fmt_metric(m: Metric | None, notes: Sequence[str] = ()) -> str:
    """A stored metric as text: value with its 95% interval, or "undefined: reason"; then any notes on it
    (`nbutils.score.flags`: a degenerate judge, too few items)."""
    if m is None:
        return "-"
    if m.value is None:
        return f"undefined: {m.reason}"
    if m.low is not None and m.high is not None:
        return with_notes(f"{m.value:.3f} [{m.low:.2f}, {m.high:.2f}]", notes)
    return with_notes(f"{m.value:.3f}", notes)


def column_text(part: ScoredSide | None, sc: Scorer, column: Column) -> str:
    """One scorer's number in a unit side's scores (or its baseline's) as text, with its notes."""
    res = None if part is None else part.of(sc.name)
    if res is None:
        return "-"
    if column.text is not None:
        return column.text(res)
    return fmt_metric(column.metric(res), column.notes_of(res))


def scorers_of(results: list[UnitScores]) -> list[Scorer]:
    """The registered scorers that have results among these, in registry order."""
    present = {name for r in results if r is not None for name in [*r.results, *r.baseline.results]}
    return [sc for sc in registered() if sc.name in present]


def explanation_rows(entries: Sequence[ExplanationEntry]) -> list[dict[str, Any]]:
    """Table rows of stage-02 entries, with notes on copied or repeated explanations."""
    notes = explanation_notes({e.key: e.explanation for e in entries})
    return [
        {
            "layer": e.layer,
            "neuron": e.neuron,
            "sign": e.sign,
            "explanation": with_notes(e.explanation or f"(failed: {e.failure})", notes.get(e.key, [])),
            "baseline": e.baseline.explanation if e.baseline else None,
        }
        for e in entries
    ]


def score_rows(results: Sequence[UnitScores]) -> list[dict[str, Any]]:
    """Table rows of stage-03 results: each scorer's compact columns for the explanation, then its headline
    for the token-lookup baseline, each number with its notes."""
    notes = explanation_notes({r.key: r.explanation for r in results})
    present = scorers_of(results)
    rows = []
    for r in results:
        row: dict[str, Any] = {"layer": r.layer, "neuron": r.neuron, "sign": r.sign}
        row["explanation"] = with_notes(r.explanation or f"(none: {r.failure})", notes.get(r.key, []))
        for sc in present:
            row |= {label(sc, sc.columns[i]): column_text(r, sc, sc.columns[i]) for i in sc.compact}
        for sc in present:
            row[f"baseline {label(sc, sc.columns[0])}"] = column_text(r.baseline, sc, sc.columns[0])
        rows.append(row)
    return rows


def usage_line(stage_dir: str | Path) -> str:
    """One line on a stage's LLM use from its usage.json: requests, tokens, cache hits and an estimated cost."""
    u = read_json(usage_path(stage_dir))
    if u is None:
        return "LLM usage: nothing was sent (no usage.json yet)"
    parts = [
        f"LLM requests sent {u['requests']}",
        f"prompt tokens {u['prompt_tokens']:,}",
        f"completion tokens {u['completion_tokens']:,}",
    ]
    looked_up = u.get("cache_hits", 0) + u.get("cache_misses", 0)
    if looked_up:
        parts.append(f"cache hits {u['cache_hits']}/{looked_up} ({u['cache_hits'] / looked_up:.0%})")
    if "estimated_cost" in u:
        parts.append(f"estimated cost {u['estimated_cost']:.4f}")
    return " | ".join(parts)
