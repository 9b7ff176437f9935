"""Notes that travel with a number, so a weak or degenerate result says so wherever it is shown.

Every view (stage tables, the viewer, the static page, the report) prints these next to the numbers they
qualify. They are computed from what stages 02 and 03 store, so runs written before them get them too.

- A *degenerate judge* gives the same answer to every item: its balanced accuracy is 0.5 by construction and
  its F1 equals that of answering yes to everything (the *chance* F1, ``2P / (2P + N)``), however high that is.
- A score over *too few items* (fewer than `MIN_CLASS_ITEMS` positives or negatives, fewer than
  `MIN_SCORED_EXCERPTS` excerpts) is noted with its counts: its interval is wide and one item moves it a lot.
- An explanation that *copies a worked example* of the prompt, or is the *same as other neurons'*
  explanations, describes the prompt rather than the neuron. A copy: the explanation starts with the first
  three words of a worked example's explanation, or shares four consecutive words with it (after lower-casing
  and dropping punctuation). The same: the first five words (the whole text if shorter) are equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from nbutils.core.units import unit_name
from nbutils.llm.prompts import WORKED_EXAMPLES

MIN_CLASS_ITEMS = 5
"""Detection/fuzzing scores with fewer positive or negative items than this are noted."""
MIN_SCORED_EXCERPTS = 4
"""Correlation scores over fewer excerpts than this are noted."""
WARN = "\u26a0"


def words(text: str | None) -> list[str]:
    """Lower-case words of a text, punctuation dropped (what copy and duplicate checks compare)."""
    return re.findall(r"[a-z0-9]+", (text or "").lower())


def _ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def copied_example(explanation: str | None, examples: Iterable[str] | None = None) -> int | None:
    """The (0-based) worked example an explanation copies, or None (see the module docstring)."""
    mine = words(explanation)
    for i, example in enumerate(examples if examples is not None else [e.explanation for e in WORKED_EXAMPLES]):
        theirs = words(example)
        if (len(mine) >= 3 and mine[:3] == theirs[:3]) or _ngrams(mine, 4) & _ngrams(theirs, 4):
            return i
    return None


def explanation_notes(explanations: Mapping[Any, str | None]) -> dict[Any, list[str]]:
    """Per key, notes on its explanation: copies a worked example, or is the same as other keys' ones.

    ``explanations`` maps any key (e.g. ``(layer, neuron, sign)``) to an explanation (None: not explained)."""
    examples = [e.explanation for e in WORKED_EXAMPLES]
    heads: dict[tuple[str, ...], list[Any]] = {}
    for key, text in explanations.items():
        if words(text):
            heads.setdefault(tuple(words(text)[:5]), []).append(key)
    notes: dict[Any, list[str]] = {}
    for key, text in explanations.items():
        mine = []
        copied = copied_example(text, examples)
        if copied is not None:
            mine.append(f'copies worked example {copied + 1} of the prompt ("{examples[copied]}")')
        group = heads.get(tuple(words(text)[:5]), []) if words(text) else []
        n_others = len(group) - 1 if group else 0  # the key itself is in its group
        if n_others > 0:
            named = [k for k in group[:4] if k != key][:3]  # a few, not a scan of the group (it can be huge)
            mine.append(
                f"same as the explanation of {n_others} other neuron{'s' if n_others > 1 else ''}"
                f" ({', '.join(unit_name(k) for k in named)}{', ...' if n_others > 3 else ''})"
            )
        if mine:
            notes[key] = mine
    return notes


def judge_notes(task: Any | None) -> list[str]:
    """Notes on a judging scorer's result (detection, fuzzing, intervention: anything with ``n_positive``,
    ``n_negative``, ``n_unanswered`` and ``n_yes``): a degenerate judge, too few items of a class."""
    if task is None:
        return []
    notes = []
    answered = task.n_positive + task.n_negative - task.n_unanswered
    n_yes = task.n_yes
    if answered and n_yes is not None and n_yes in (0, answered):
        notes.append(
            f"degenerate judge: answered {'yes' if n_yes else 'no'} to all {answered} items "
            "(balanced accuracy 0.5 by construction)"
        )
    for cls, n in (("positive", task.n_positive), ("negative", task.n_negative)):
        if n < MIN_CLASS_ITEMS:
            notes.append(f"only {n} {cls} item{'' if n == 1 else 's'}")
    return notes


def score_set_notes(scores: Any | None) -> list[str]:
    """Notes on a correlation score set (a `nbutils.score.metrics.ScoreSet`): too few excerpts."""
    n = None if scores is None else scores.n_excerpts
    if n is not None and 0 < n < MIN_SCORED_EXCERPTS:
        return [f"only {n} excerpt{'' if n == 1 else 's'}"]
    return []


def calibration_notes(result: Any | None, scored_set: str, metric: str) -> list[str]:
    """A note on a calibrated score (R², absolute deviation explained) of a simulation
    (`nbutils.score.simulation.SimulationResult`) whose calibration line has a negative slope (the fit turns
    a simulation that runs opposite to the activations around, so these scores can be positive beside a
    negative correlation) or is flat (a constant simulation: the score is that of predicting a constant)."""
    if result is None or result.calibration is None:
        return []
    slope = result.calibration.slope
    value = getattr(result.set(scored_set), metric).value
    if slope == 0 and value is not None:  # `calibrate` of a constant simulation: the line is its mean, flat
        return [
            "the simulation is constant on the calibration excerpts, so the calibrated prediction is one number "
            "(their mean activation) at every token: this measures that constant, not the explanation"
        ]
    if slope is None or slope >= 0 or value is None:
        return []
    return [
        f"calibrated with a negative slope ({slope:.3g}): the simulation runs opposite to the activations and "
        "the fit flips it, so this can be positive while the correlation is negative"
    ]


class Noted(str):
    """A number's text with its notes appended (what `with_notes` returns). It is a plain ``str`` for printing
    and DataFrames; tables read ``text`` and ``notes`` to show a marker and one legend instead of the notes
    in every cell (`nbutils.view.tables.Legend`)."""

    text: str
    notes: tuple[str, ...]

    def __new__(cls, text: str, notes: Iterable[str]) -> Noted:
        notes = tuple(notes)
        self = super().__new__(cls, f"{text} {WARN} {'; '.join(notes)}" if notes else text)
        self.text, self.notes = text, notes
        return self


def with_notes(text: str, notes: Iterable[str]) -> str:
    """A number's text followed by its notes: ``0.500 ⚠ degenerate judge: ...`` (a `Noted`)."""
    return Noted(text, notes)


def f1_text(task: Any | None) -> str:
    """F1 with its chance level, e.g. ``0.741 (always-yes 0.667)``; "-" when there is none."""
    m = None if task is None else task.f1
    if m is None or m.value is None:
        return f"undefined: {m.reason}" if m is not None and m.reason else "-"
    chance = task.f1_chance.value if task.f1_chance is not None else None
    return f"{m.value:.3f}" + (f" (always-yes {chance:.3f})" if chance is not None else "")
