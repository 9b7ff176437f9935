"""What the live calls of a run return (`nbutils.live.interactive`): small dataclasses with plain fields for
code, ``to_frame()`` where they are a table, and a ``_repr_html_`` that Jupyter shows (every token,
explanation and reply escaped: corpus text, typed text and LLM output are untrusted).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nbutils.core.results import ExplanationEntry
from nbutils.core.units import Key
from nbutils.score.contract import Scorer, UnitDetails, UnitScores, headline_of
from nbutils.view.render import fragment, scores_table_html, simulation_html
from nbutils.view.runview import finite, headline_value, main_score
from nbutils.view.tables import EXCERPTS_STYLE, heatmap_html, label, looks_svg, quoted_html, table_html, visible_token

LEFT = "text-align:left"  # JupyterLab's own table style right-aligns cells


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _unit_name(key: Key) -> str:
    layer, index, sign = key
    return f"layer {layer}, unit {index}" + (" (negative side)" if sign == "negative" else "")


def _notes_html(notes: list[tuple[str, str]]) -> str:
    items = "".join(f"<li>{_esc(who)}: {_esc(note)}</li>" for who, note in notes)
    return f"<ul class='nbx-warn'>{items}</ul>" if items else ""


@dataclass
class UnitActivations:
    """One unit side's value on each token of a text: ``values[i]`` on ``tokens[i]``. A negative side's
    values are the unit's values negated, as its excerpts are stored (so "fires" means a large value)."""

    key: Key
    tokens: list[str]
    token_ids: list[int]
    values: np.ndarray
    scale: float
    """The unit's largest absolute collected value: the heatmap's colour scale, shared with its excerpts."""
    looks: Any = None
    """For an attention head: where it looks from each token (`nbutils.core.records.Looks`); else None."""

    @property
    def max(self) -> float:
        return float(self.values.max())

    def to_frame(self):
        """A pandas DataFrame: ``position``, ``token``, ``token_id``, ``value``."""
        import pandas as pd

        columns = {"position": range(len(self.tokens)), "token": self.tokens, "token_id": self.token_ids,
                   "value": self.values}  # fmt: skip
        if self.looks is not None:  # a head: the source of each token, its weight and the pair's write
            columns |= {"source": self.looks.source, "source_token": [self.tokens[int(i)] for i in self.looks.source],
                        "source_weight": self.looks.weight, "source_write": self.looks.write}  # fmt: skip
        return pd.DataFrame(columns)

    def _repr_html_(self) -> str:
        head = (
            f"<p>{_unit_name(self.key)}: max {self.max:.4g} on this text; colours on the unit's collected scale "
            f"({self.scale:.4g}); hover a token for its value</p>"
        )
        arcs = looks_svg(self.tokens, self.looks, self.values) if self.looks is not None else ""
        heat = heatmap_html(self.tokens, self.values, self.scale, "live", looks=self.looks)
        return head + arcs + f'<div style="{EXCERPTS_STYLE}">{heat}</div>'


@dataclass
class TopUnits:
    """The collected units that fire most on a text, strongest first. Ranked by ``relative``: the unit's
    largest value on the text over its largest value in the whole collection (1.0: as strongly as anywhere in
    the corpus), so units of different scales compare; units that never fired in the collection are left out."""

    tokens: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    """The text's first positions left out of the ranking (`nbutils.live.interactive.Run.top_units`)."""

    def to_frame(self):
        """A pandas DataFrame with one row per unit: ``layer``, ``unit``, ``relative``, ``value``,
        ``collected_max``, ``position``, ``token``, ``explanation``."""
        import pandas as pd

        names = ["layer", "unit", "relative", "value", "collected_max", "position", "token", "explanation"]
        return pd.DataFrame(self.rows, columns=names)

    def _repr_html_(self) -> str:
        shown = [
            {**r, "token": visible_token(r["token"]), "explanation": r["explanation"] or "(not explained)"}
            for r in self.rows
        ]
        left_out = (
            f"<p class='nbx-muted'>Positions 0-{self.skipped - 1} ({html.escape(' '.join(visible_token(t) for t in self.tokens[: self.skipped]))}) "
            "are not ranked: a text's opening tokens take values far beyond anything collected mid-document "
            "(skip_first=0 ranks them).</p>"
            if self.skipped
            else ""
        )
        return left_out + (table_html(shown) if shown else "<p>No collected unit fires on this text.</p>")


@dataclass
class ExplanationScore:
    """An explanation of one unit side simulated and scored now, as stage 03 scores it: the same held-out
    excerpts, seed and scorers, beside the token-lookup baseline (``result`` has stage 03's layout)."""

    key: Key
    explanation: str
    result: UnitScores
    details: UnitDetails | None
    scorers: list[Scorer]
    scale: float
    notes: list[tuple[str, str]]
    """(which number, note) for every weak number of this result (`nbutils.score.flags`), and the
    explanation's own (a copy of the prompt's worked example)."""
    requests: int = 0
    """LLM requests this score sent (0 when every one was answered from the cache or the run's memory)."""
    stored: UnitScores | None = None
    """Stage 03's result for this side, if it was scored (its explanation is ``stored.explanation``)."""

    @property
    def correlation(self) -> float | None:
        """The pooled top-and-random correlation of the simulation (None: undefined, see ``result``)."""
        return main_score(self.result)

    @property
    def headline(self) -> float | None:
        """The headline number of the scorers it was scored with (`nbutils.view.runview.headline_value`: the
        correlation above where the simulation scorer ran)."""
        return headline_value(self.result, self.scorers)

    @property
    def interval(self) -> tuple[float, float] | None:
        """Its 95% bootstrap interval (resampling whole excerpts)."""
        sim = self.result.of("simulation")
        m = sim.top_and_random.correlation if sim is not None else None
        low, high = (finite(m.low), finite(m.high)) if m is not None else (None, None)
        return (low, high) if low is not None and high is not None else None

    @property
    def baseline_correlation(self) -> float | None:
        return main_score(self.result.baseline)

    @property
    def failure(self) -> str | None:
        return self.result.failure

    def numbers(self, baseline: bool = False) -> dict[str, float | None]:
        """Every scorer number of this explanation (or of the token-lookup baseline), by column label."""
        part = self.result.side(baseline)
        return {label(sc, c): finite(c.value(part.of(sc.name))) for sc in self.scorers for c in sc.columns}

    def to_frame(self):
        """A pandas DataFrame, one row per scorer number: ``number``, ``this explanation``, ``baseline`` and,
        where the side was scored by stage 03, ``stored explanation``."""
        import pandas as pd

        mine, base = self.numbers(), self.numbers(baseline=True)
        rows = [{"number": name, "this explanation": mine[name], "baseline": base[name]} for name in mine]
        if self.stored:
            stored = {label(sc, c): finite(c.value(self.stored.of(sc.name))) for sc in self.scorers for c in sc.columns}
            for row in rows:
                row["stored explanation"] = stored[row["number"]]
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        stored = ""
        if self.stored and self.stored.explanation:
            value, head = headline_value(self.stored, self.scorers), headline_of(self.scorers)
            shown = "undefined" if value is None else f"{value:.3f}"
            what = label(head, head.columns[head.headline]) if head is not None else "score"
            stored = (
                f"<p class='nbx-muted'>stage 03's explanation, {quoted_html(self.stored.explanation)}, scored "
                f"{shown} ({html.escape(what)}) on the same excerpts.</p>"
            )
        cost = f"{self.requests} LLM request{'s' if self.requests != 1 else ''}"
        body = (
            f"<h4>{_unit_name(self.key)}: {quoted_html(self.explanation)}</h4>"
            f"<p class='nbx-muted'>scored now ({cost}); 95% intervals in brackets</p>"
            + _notes_html([n for n in self.notes if n[0] == "explanation"])  # the numbers' notes: in the tables
            + scores_table_html(self.result, self.scorers)
            + stored
            + simulation_html(self.details.of("simulation") if self.details else None, self.scale)
        )
        return fragment(body)


@dataclass
class Comparison:
    """Several explanations of one unit side scored on the same excerpts, in the order given, with the
    token-lookup baseline once (it does not depend on the explanation)."""

    key: Key
    scores: list[ExplanationScore]

    @property
    def best(self) -> ExplanationScore | None:
        """The explanation with the highest defined top-and-random correlation."""
        defined = [s for s in self.scores if s.correlation is not None]
        return max(defined, key=lambda s: s.correlation) if defined else None

    def rows(self) -> list[dict[str, Any]]:
        out = [{"explanation": s.explanation, **s.numbers(), "notes": "; ".join(n for _, n in s.notes)}
               for s in self.scores]  # fmt: skip
        if self.scores:
            first = self.scores[0]
            baseline_text = first.result.baseline.explanation
            out.append({"explanation": f"(token-lookup baseline) {baseline_text}", **first.numbers(baseline=True),
                        "notes": ""})  # fmt: skip
        return out

    def to_frame(self):
        """A pandas DataFrame, one row per explanation (then the baseline), one column per scorer number."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def _repr_html_(self) -> str:
        return fragment(
            f"<h4>{_unit_name(self.key)}: {len(self.scores)} explanations on the same excerpts</h4>"
            + table_html(self.rows())
        )


@dataclass
class NewExplanation:
    """An explanation written now by the run's explainer: the exact chat it was sent, every raw reply, and
    the explanation kept (stage 02's entry layout in ``entry``)."""

    key: Key
    messages: list[dict[str, str]]
    """The chat as the explainer received it (system, worked examples, this unit's excerpts)."""
    entry: ExplanationEntry
    requests: int = 0

    @property
    def explanation(self) -> str | None:
        return self.entry.explanation

    @property
    def replies(self) -> list[str]:
        """The explainer's raw replies, one per candidate (the reply continues "the main thing ... find")."""
        return [c.reply or "" for c in self.entry.candidates]

    @property
    def failure(self) -> str | None:
        return self.entry.failure

    @property
    def prompt(self) -> str:
        """The chat as plain text, one block per message."""
        return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in self.messages)

    def _repr_html_(self) -> str:
        kept = self.explanation
        head = f"<h4>{_unit_name(self.key)}: " + (
            f"{quoted_html(kept)}</h4>" if kept else f"no explanation</h4><p>{_esc(self.failure)}</p>"
        )
        replies = "".join(f"<pre class='nbx-excerpt'>{_esc(r)}</pre>" for r in self.replies)
        return fragment(
            head
            + f"<p class='nbx-muted'>{self.requests} LLM request{'s' if self.requests != 1 else ''}</p>"
            + f"<h4>Raw repl{'ies' if len(self.replies) > 1 else 'y'}</h4>{replies}"
            + (
                f"<details><summary>The prompt ({len(self.messages)} messages)</summary>"
                f"<pre class='nbx-excerpt'>{_esc(self.prompt)}</pre></details>"
                if self.messages
                else "<p class='nbx-muted'>No prompt: no LLM was asked (a rule found by search on the subject "
                "model, or kept by triage).</p>"
            )
        )


@dataclass
class Steering:
    """Greedy continuations of a prompt with and without one unit shifted by ``shift`` at every position
    (prompt and continuation), through the code the intervention score uses."""

    key: Key
    prompt: str
    shift: float
    """What was added to the unit's value (in its own units; the negative side shifts it down)."""
    strength: float | None
    """``shift`` as a multiple of the unit's largest collected value, when given that way."""
    kl: float | None
    """The mean next-token KL (nats) the shift causes on the prompt, when the shift was found by target KL."""
    original: str
    steered: str

    @property
    def changed(self) -> bool:
        return self.original != self.steered

    def _repr_html_(self) -> str:
        how = f"strength {self.strength:g} x the unit's largest value" if self.strength is not None else ""
        how = how or f"the shift that moves the next-token distributions by KL {self.kl:.2f}"
        same = "" if self.changed else "<p class='nbx-warn'>The continuation did not change.</p>"
        return fragment(
            f"<h4>{_unit_name(self.key)} steered by {self.shift:+.4g} ({_esc(how)})</h4>"
            f"<table><tr><th>prompt</th><td class='nbx-excerpt' style='{LEFT}'>{_esc(self.prompt)}</td></tr>"
            f"<tr><th>as it is</th><td class='nbx-excerpt' style='{LEFT}'>{_esc(self.original)}</td></tr>"
            f"<tr><th>steered</th><td class='nbx-excerpt' style='{LEFT}'>{_esc(self.steered)}</td></tr></table>{same}"
        )


@dataclass
class SearchResults:
    """Unit sides whose explanation, candidates, rule or strongest tokens match a query, best match first:
    ``matched`` lists the words that matched, ``relevance`` is BM25's (higher is better), ``score`` the unit's
    headline score."""

    query: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_frame(self):
        """A pandas DataFrame: ``layer``, ``neuron``, ``sign``, ``matched``, ``relevance``, ``explanation``,
        ``score``."""
        import pandas as pd

        names = ["layer", "neuron", "sign", "matched", "relevance", "explanation", "score"]
        return pd.DataFrame(self.rows, columns=names)

    def _repr_html_(self) -> str:
        if not self.rows:
            return f'<p>No explanation matches "{_esc(self.query)}".</p>'
        n = len(self.rows)
        matched = f"{n} unit side{'s match' if n != 1 else ' matches'}"
        return f'<p>{matched} "{_esc(self.query)}".</p>' + table_html(self.rows)


__all__ = [
    "Comparison",
    "ExplanationScore",
    "NewExplanation",
    "SearchResults",
    "Steering",
    "TopUnits",
    "UnitActivations",
]
