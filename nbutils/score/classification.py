"""Detection and fuzzing: scoring an explanation by yes/no judgements instead of simulated activations.

Correlation scoring needs a simulator with log-probabilities and reads a value at every token. Later work
(EleutherAI's delphi; Paulo et al. 2024, "Automatically interpreting millions of features in large language
models") judges explanations by classification, which any chat model can do:

- **Detection**: the judge sees an excerpt without marks and says whether the neuron, going by the
  explanation, responds somewhere in it. Positives are activating excerpts (held-out top excerpts and the
  quantile-band samples), negatives are excerpts where it stays silent.
- **Pairs** (attention heads): the judge sees an excerpt with a token and the earlier token the head attends
  to most marked, and says whether that pair is what the explanation describes (the Transformer Debugger's
  attention-head scoring): top pairs against low ones, scored by AUROC with its interval.
- **Fuzzing**: the judge sees an excerpt with some tokens marked ``<<like this>>`` and says whether the marks
  sit on what the explanation describes. Positives are activating excerpts with their activating tokens
  marked; negatives are silent excerpts with as many tokens marked at random, and activating excerpts with
  the marks moved onto silent tokens (delphi's "fuzzed" examples).

An excerpt is *activating* when some token reaches 1 on the explainer's 0..10 scale, i.e. at least a tenth
of the largest activation among the excerpts the explainer saw, and *silent* otherwise; the same threshold
marks the activating tokens. Excerpts the explainer saw are never judged. Each item is its own question
(after a shared prefix), so answers do not depend on the order of items, and the judge's P("1") against
P("0") gives AUROC as well as balanced accuracy and F1 (see `nbutils.score.metrics.classification_scores`).

The token-lookup baseline judges the same items: an excerpt is activating if some token's mean training
activation reaches the threshold, and marks fit if every marked token's does. Results are stored under the
scorer's name (``"detection"``, ``"fuzzing"``); the judged items are saved under the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from nbutils.core.records import Excerpt, UnitRecord, split_excerpts
from nbutils.core.results import JsonRecord
from nbutils.llm.contract import Backend, JudgeRequest
from nbutils.llm.prompts import MAX_LABEL, TASKS, JudgeItem
from nbutils.score.baseline import token_lookup_judge
from nbutils.score.contract import Column, Scorer, UnitContext
from nbutils.score.flags import f1_text, judge_notes, with_notes
from nbutils.score.metrics import ClassificationScores, Metric, auroc_interval, classification_scores

ACTIVE_FRACTION = 1 / MAX_LABEL
"""An excerpt or token is active at or above this fraction of the explainer's largest shown activation."""


@dataclass
class Judged:
    """One item to judge with the truth about it."""

    item: JudgeItem
    label: bool
    source: str
    """Where the excerpt came from: "top", "random" or "band <lo>-<hi>"."""
    index: int
    kind: str
    """"activating", "silent"; for fuzzing "correct marks", "random marks" or "wrong marks"."""


def active_threshold(record: UnitRecord, negative: bool = False, split: str = "nbutils") -> float:
    """The activation at which an excerpt or token counts as active (0 when the neuron never activates)."""
    train = split_excerpts(record, negative, split=split)["train"]
    top = max((float(np.max(e.activations)) for e in train if len(e.activations)), default=0.0)
    return ACTIVE_FRACTION * top if top > 0 else 0.0


def candidate_excerpts(record: UnitRecord, negative: bool = False, split: str = "nbutils") -> list[tuple[str, Excerpt]]:
    """Every excerpt the explainer did not see, once each, with its source (bands only for the positive side)."""
    sp = split_excerpts(record, negative, split=split)
    seen = {e.index for e in sp["train"]}
    pool = [("top", e) for e in sp["calibration_top"] + sp["valid_top"]]
    if not negative:
        pool += [
            (f"band {lo:g}-{hi:g}", e) for (lo, hi), band in zip(record.band_quantiles, record.bands) for e in band
        ]
    pool += [("random", e) for e in sp["calibration_random"] + sp["valid_random"]]
    out, taken = [], set(seen)
    for source, e in pool:
        if e.index >= 0 and e.index in taken:
            continue
        taken.add(e.index)
        out.append((source, e))
    return out


def has_silent_excerpts(record: UnitRecord, negative: bool = False, split: str = "nbutils") -> bool:
    """Whether some excerpt the explainer did not see stays below the unit's active threshold: detection and
    fuzzing judge an explanation against such silent excerpts, and are undefined for a unit without any (one
    active on every excerpt, e.g. always on with occasional spikes)."""
    threshold = active_threshold(record, negative, split)
    return threshold > 0 and any(
        np.max(e.activations) < threshold for _, e in candidate_excerpts(record, negative, split)
    )


def judge_items(
    record: UnitRecord, task: str, negative: bool = False, per_class: int = 10, seed: int = 0, split: str = "nbutils"
) -> tuple[list[Judged], float]:
    """The items of one task for one neuron (at most ``per_class`` positives and as many negatives), and the
    activation threshold used."""
    threshold = active_threshold(record, negative, split)
    rng = np.random.default_rng([seed, record.id.layer, record.id.neuron, TASKS.index(task)])
    pool = candidate_excerpts(record, negative, split)
    if threshold <= 0:
        return [], threshold
    active = [(s, e) for s, e in pool if np.max(e.activations) >= threshold]
    silent = [(s, e) for s, e in pool if np.max(e.activations) < threshold]
    active = [active[i] for i in sorted(rng.permutation(len(active))[:per_class])]
    silent = [silent[i] for i in sorted(rng.permutation(len(silent))[:per_class])]
    if task == "detection":
        return [Judged(JudgeItem(tuple(e.tokens)), True, s, e.index, "activating") for s, e in active] + [
            Judged(JudgeItem(tuple(e.tokens)), False, s, e.index, "silent") for s, e in silent
        ], threshold
    items, counts = [], []
    for s, e in active:
        marks = tuple(bool(a >= threshold) for a in e.activations)
        counts.append(sum(marks))
        items.append(Judged(JudgeItem(tuple(e.tokens), marks), True, s, e.index, "correct marks"))
    negatives = []
    for j, (s, e) in enumerate(active[::2]):  # half the negatives: the same excerpts, marks on silent tokens
        quiet = np.flatnonzero(np.asarray(e.activations) < threshold)
        if len(quiet):
            pick = set(rng.choice(quiet, min(counts[2 * j], len(quiet)), replace=False).tolist())
            marks = tuple(i in pick for i in range(len(e.tokens)))
            negatives.append(Judged(JudgeItem(tuple(e.tokens), marks), False, s, e.index, "wrong marks"))
    for j, (s, e) in enumerate(silent[: len(active) - len(negatives)]):  # the rest: silent excerpts
        k = counts[j % len(counts)] if counts else 1
        pick = set(rng.choice(len(e.tokens), min(k, len(e.tokens)), replace=False).tolist())
        marks = tuple(i in pick for i in range(len(e.tokens)))
        negatives.append(Judged(JudgeItem(tuple(e.tokens), marks), False, s, e.index, "random marks"))
    return items + negatives, threshold


@dataclass
class JudgedItem(JsonRecord):
    """One judged item as saved (for the viewer and for auditing a score): where its excerpt came from, what
    kind of item it is, the truth, the judge's P(yes) (None: unanswered), its tokens and the marked ones."""

    source: str
    index: int
    kind: str
    label: bool
    p_yes: float | None
    tokens: list[str]
    marked: list[int] | None = None

    @property
    def wrong(self) -> bool:
        """Answered on the wrong side of 0.5."""
        return self.p_yes is not None and (self.p_yes >= 0.5) != self.label


def task_result(
    items: Sequence[Judged], answers: np.ndarray, has_probabilities: bool, threshold: float = 0.5
) -> ClassificationScores:
    """The scores of one task: every metric (`nbutils.score.metrics.ClassificationScores`) and the counts."""
    labels = np.array([j.label for j in items], dtype=bool)
    return classification_scores(labels, answers, has_probabilities, threshold)


def item_records(items: Sequence[Judged], answers: np.ndarray) -> list[JudgedItem]:
    """What to save about each judged item."""
    return [
        JudgedItem(
            j.source,
            j.index,
            j.kind,
            j.label,
            None if not np.isfinite(a) else round(float(a), 6),
            list(j.item.tokens),
            None if j.item.marked is None else [i for i, m in enumerate(j.item.marked) if m],
        )  # fmt: skip
        for j, a in zip(items, answers)
    ]


def _column(label: str, metric: str) -> Column:
    if metric == "f1":  # never without its chance level
        return Column(label, (metric,), notes=judge_notes, text=lambda r: with_notes(f1_text(r), judge_notes(r)))
    return Column(label, (metric,), notes=judge_notes, chance=0.5)


class _JudgeScorer(Scorer):
    """Detection or fuzzing (its task is its name): items from the record, yes/no answers, metrics."""

    task: ClassVar[str]
    detail = "judged items"
    columns = (_column("balanced accuracy", "balanced_accuracy"), _column("F1", "f1"), _column("AUROC", "auroc"))
    result_type = ClassificationScores
    details_type = list[JudgedItem]

    def caption(self, result: ClassificationScores) -> str:
        unanswered = f", {result.n_unanswered} unanswered" if result.n_unanswered else ""
        return f"{result.n_positive} positive, {result.n_negative} negative items{unanswered}"

    def items(self, ctx: UnitContext) -> tuple[list[Judged], float]:
        s = ctx.settings
        return judge_items(ctx.record, self.name, ctx.negative, s.judge_per_class, s.seed, s.split)

    def baseline(self, ctx: UnitContext) -> ClassificationScores:
        items, threshold = self.items(ctx)
        return task_result(items, token_lookup_judge(ctx.table, [j.item for j in items]), True, threshold)

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[ClassificationScores, list[JudgedItem]]:
        items, _ = self.items(ctx)
        s = ctx.settings
        request = JudgeRequest(self.name, ctx.entry.explanation, tuple(j.item for j in items),
                               s.max_prompt_tokens, per_request=s.judge_items_per_request,
                               noun=ctx.record.noun)  # fmt: skip
        answers = llm.judge(request)
        return task_result(items, answers.p_yes, answers.probabilities), item_records(items, answers.p_yes)


class DetectionScorer(_JudgeScorer):
    """Would the unit fire somewhere in this excerpt, going by the explanation?"""

    name = "detection"
    title = "detection: does the unit fire somewhere in the excerpt?"
    label_prefix = "detection"


class FuzzingScorer(_JudgeScorer):
    """Are the tokens marked in this excerpt the ones the explanation describes?"""

    name = "fuzzing"
    title = "fuzzing: are the marked tokens the ones the explanation describes?"
    label_prefix = "fuzzing"


# ----------------------------------------------------------------------------------------------------------
# Attention heads: (token <- attended token) pairs
# ----------------------------------------------------------------------------------------------------------


def pair_items(record: UnitRecord, per_class: int = 5, split: str = "nbutils") -> list[Judged]:
    """The pair task's items for an attention head (none for other units): the Transformer Debugger's top pairs
    (the largest pair write, `nbutils.core.records.Looks.write`, of each held-out top excerpt) and low pairs
    (the smallest of a held-out random excerpt), ``per_class`` of each, from each excerpt's second token (the
    first can only attend to itself); each item marks the token and the earlier token it attends to most."""
    sp = split_excerpts(record, split=split)
    top = [e for e in sp["calibration_top"] + sp["valid_top"] if e.looks is not None and len(e.tokens) > 1]
    low = [e for e in sp["calibration_random"] + sp["valid_random"] if e.looks is not None and len(e.tokens) > 1]

    def marked(e: Excerpt, i: int) -> JudgeItem:
        src = int(e.looks.source[i])
        return JudgeItem(tuple(e.tokens), tuple(j in (i, src) for j in range(len(e.tokens))))

    items = []
    for e in top[:per_class]:
        i = 1 + int(np.argmax(np.asarray(e.looks.write)[1:]))
        items.append(Judged(marked(e, i), True, "top", e.index, "top pair"))
    for e in low[:per_class]:
        i = 1 + int(np.argmin(np.asarray(e.looks.write)[1:]))
        items.append(Judged(marked(e, i), False, "random", e.index, "low pair"))
    return items


def _no_pairs() -> ClassificationScores:
    out = task_result([], np.zeros(0), True)
    for name in ("balanced_accuracy", "f1", "auroc", "accuracy", "precision", "recall"):
        setattr(out, name, Metric(None, "no (token <- attended token) pairs: not an attention head"))
    return out


class PairScorer(_JudgeScorer):
    """Is this (token <- attended token) pair what the explanation describes? For attention heads: ROC AUC over
    top and low pairs judged one at a time (the Transformer Debugger's scoring), with its 95% interval."""

    name = "pairs"
    task = "pairs"
    title = "pairs: is the marked (token <- attended token) pair what the explanation describes? (heads)"
    label_prefix = "pairs"
    measure = "pair AUROC"
    headline = 2

    def items(self, ctx: UnitContext) -> tuple[list[Judged], float]:
        return pair_items(ctx.record, ctx.settings.judge_per_class, ctx.settings.split), 0.5

    def _result(self, items: list[Judged], answers: np.ndarray, probabilities: bool) -> ClassificationScores:
        result = task_result(items, answers, probabilities)
        result.auroc = auroc_interval(result.auroc, result.n_positive, result.n_negative)
        return result

    def baseline(self, ctx: UnitContext) -> ClassificationScores | None:
        items, _ = self.items(ctx)
        if not items:
            return _no_pairs()
        return self._result(items, token_lookup_judge(ctx.table, [j.item for j in items]), True)

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[ClassificationScores, list[JudgedItem]]:
        items, _ = self.items(ctx)
        if not items:
            return _no_pairs(), []
        s = ctx.settings
        request = JudgeRequest(self.task, ctx.entry.explanation, tuple(j.item for j in items), s.max_prompt_tokens,
                               per_request=s.judge_items_per_request, noun=ctx.record.noun)  # fmt: skip
        answers = llm.judge(request)
        return self._result(items, answers.p_yes, answers.probabilities), item_records(items, answers.p_yes)
