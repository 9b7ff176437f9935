"""The intervention score (after Paulo et al. 2024, "Automatically interpreting millions of features in large
language models", intervention scoring): does the explanation say what the unit does when it is turned up?

For each of `N_PROMPTS` prompts (the first `PROMPT_TOKENS` tokens of the unit's held-out random excerpts),
the subject model continues the text greedily for `CONTINUATION_TOKENS` tokens twice: as it is, and with
the unit *steered*, a constant added to its value at every position. The constant is set per unit by
bisection so that the next-token distributions on the prompts move by `TARGET_KL` nats on average, so every
unit is turned up by the same amount of effect, whatever its scale (`nbutils.subject.intervene`). A unit's
positive side is steered up, a negative side down.

The judge (the simulator model, as for detection and fuzzing) sees the explanation, a prompt and both
continuations as [A] and [B], and answers whether the unit was turned up in [A]. Each prompt is asked both
ways round (steered as A, then as B), so a judge that always answers the same scores exactly 0.5. Scores:
balanced accuracy with a 95% interval (prompts resampled), AUROC, and a *control*: the same judge and
explanation on the continuations of another unit of the layer, chosen at random (seeded) and steered to the
same KL, which an explanation of this unit should not predict (about 0.5). The token-lookup baseline
"judges" without an LLM: it picks the continuation whose tokens have the higher mean activation in its table.

Prompts where steering left the greedy continuation unchanged cannot be told apart; they are counted in
``n_unchanged`` and stay in (they pull the score toward 0.5). The judged pairs are saved as the scorer's details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nbutils.core.results import JsonRecord
from nbutils.llm.contract import Backend, JudgeRequest
from nbutils.llm.prompts import steering_pair
from nbutils.score.classification import JudgedItem
from nbutils.score.contract import Column, Scorer, UnitContext
from nbutils.score.flags import judge_notes
from nbutils.score.metrics import Metric, auroc

if TYPE_CHECKING:  # only named in annotations: the scorer's module loads without torch
    from nbutils.subject.intervene import UnitIntervention

N_PROMPTS = 8
PROMPT_TOKENS = 16
CONTINUATION_TOKENS = 12
TARGET_KL = 0.5
"""Mean KL (nats per position) between the steered and the original next-token distributions on the prompts."""


@dataclass
class PairAccuracy(JsonRecord):
    """How often the judge picked the steered continuation of a pair, asked both ways round: balanced accuracy
    over prompts (a 95% bootstrap interval) and AUROC, with the item counts the judge notes read."""

    n_prompts: int
    n_positive: int
    n_negative: int
    n_unanswered: int
    n_yes: int
    balanced_accuracy: Metric
    auroc: Metric


@dataclass
class InterventionResult(PairAccuracy):
    """The intervention scorer's result: the unit's `PairAccuracy`, a random control unit's (None for the
    baseline, which has no judge), and the steering: shift, KL reached, the control unit and its steering,
    and how many continuations steering left unchanged."""

    control: PairAccuracy | None
    shift: float
    kl: float
    control_unit: int
    control_shift: float
    control_kl: float
    n_unchanged: int


def pair_accuracy(p_yes: np.ndarray, n_boot: int = 1000, seed: int = 0) -> PairAccuracy:
    """Balanced accuracy, with a bootstrap interval over prompts, of P("turned up in A") answers to pairs
    asked both ways: ``p_yes[2i]`` with the steered text as A (truth 1), ``p_yes[2i + 1]`` as B (truth 0)."""
    p = np.asarray(p_yes, dtype=np.float64).reshape(-1, 2)
    correct = np.stack([p[:, 0] >= 0.5, p[:, 1] < 0.5], axis=1).astype(np.float64)
    correct[~np.isfinite(p)] = np.nan
    answered = np.isfinite(p).all(axis=1)
    labels = np.tile([True, False], len(p))
    finite = p[np.isfinite(p)]
    counts = (len(p), len(p), len(p), int((~np.isfinite(p)).sum()), int((finite >= 0.5).sum()))
    if not answered.any():
        none = "the judge answered no pair both ways"
        return PairAccuracy(*counts, Metric(None, none), Metric(None, none))
    per_prompt = correct[answered].mean(axis=1)  # each prompt: one positive and one negative item
    value = float(per_prompt.mean())
    low = high = None
    if len(per_prompt) >= 2 and n_boot > 0:
        picks = np.random.default_rng(seed).integers(0, len(per_prompt), (n_boot, len(per_prompt)))
        low, high = (float(x) for x in np.percentile(per_prompt[picks].mean(axis=1), [2.5, 97.5]))
    keep = np.repeat(answered, 2)
    return PairAccuracy(*counts, Metric(value, None, low, high), auroc(labels[keep], p.ravel()[keep]))


def intervention_notes(result: InterventionResult | None) -> list[str]:
    """A degenerate judge or too few prompts (`judge_notes`), and steering that changed nothing or fell short
    of its target effect."""
    if not result:
        return []
    notes = judge_notes(result)
    n, unchanged = result.n_prompts, result.n_unchanged
    if n and unchanged == n:
        notes.append(f"steering changed none of the {n} continuations (the score can only be chance)")
    if result.kl is not None and result.kl < TARGET_KL / 2:
        notes.append(f"steering reached KL {result.kl:.2g} of the {TARGET_KL} targeted")
    return notes


class InterventionScorer(Scorer):
    """Steer the unit, continue the text with and without, ask which one the explanation predicts."""

    name = "intervention"
    title = "intervention: which continuation had the unit turned up, going by the explanation?"
    needs_subject = True
    detail = "judged items"
    result_type = InterventionResult
    details_type = list[JudgedItem]
    columns = (
        Column("intervention balanced accuracy", ("balanced_accuracy",), notes=intervention_notes, chance=0.5),
        Column("control (random unit)", ("control", "balanced_accuracy"), chance=0.5),
        Column("intervention AUROC", ("auroc",), notes=intervention_notes, chance=0.5),
    )

    def caption(self, result: InterventionResult) -> str:
        return (
            f"{result.n_prompts} prompts asked both ways, {result.n_unchanged} with an unchanged "
            f"continuation; steered by {result.shift:+.3g} (KL {result.kl:.2f}); control unit {result.control_unit}"
        )

    def _pairs(self, ctx: UnitContext) -> dict[str, Any]:
        """Prompts and continuations of the unit and of its control unit, once per unit side."""
        if "intervention:pairs" in ctx.done:
            return ctx.done["intervention:pairs"][1]
        subject: UnitIntervention = ctx.subject
        layer, index = ctx.record.id.layer, ctx.record.id.neuron
        pool = ctx.splits["valid_random"] + ctx.splits["calibration_random"]
        prompts = [e.token_ids[:PROMPT_TOKENS] for e in pool[:N_PROMPTS]]
        width = subject.unit.width(subject.model)
        rng = np.random.default_rng([ctx.settings.seed, layer, index, 17])
        control = int((index + 1 + rng.integers(0, width - 1)) % width)
        scale = ctx.record.min if ctx.negative else ctx.record.max
        sign = -1.0 if ctx.negative else 1.0
        shift, kl = subject.steering_for(layer, index, prompts, TARGET_KL, scale, sign)
        c_shift, c_kl = subject.steering_for(layer, control, prompts, TARGET_KL, scale, 1.0)
        decode = subject.tokenizer.decode
        original = subject.continue_text(layer, index, prompts, CONTINUATION_TOKENS)
        steered = subject.continue_text(layer, index, prompts, CONTINUATION_TOKENS, shift)
        c_steered = subject.continue_text(layer, control, prompts, CONTINUATION_TOKENS, c_shift)
        pairs = {
            "prompts": [decode(p) for p in prompts],
            "original": [decode(t) for t in original],
            "steered": [decode(t) for t in steered],
            "control_steered": [decode(t) for t in c_steered],
            "original_tokens": [[decode([t]) for t in ts] for ts in original],
            "steered_tokens": [[decode([t]) for t in ts] for ts in steered],
            "shift": shift, "kl": kl, "control_unit": control, "control_shift": c_shift, "control_kl": c_kl,
            "n_unchanged": sum(a == b for a, b in zip(original, steered)),
        }  # fmt: skip
        ctx.done["intervention:pairs"] = ({}, pairs)
        return pairs

    @staticmethod
    def _items(pairs: dict[str, Any], steered_key: str) -> list[Any]:
        """Each prompt twice: steered as [A] (truth 1), then as [B] (truth 0)."""
        items = []
        for prompt, orig, steer in zip(pairs["prompts"], pairs["original"], pairs[steered_key]):
            items += [steering_pair(prompt, steer, orig), steering_pair(prompt, orig, steer)]
        return items

    def _result(
        self, pairs: dict[str, Any], p_yes: np.ndarray, control: np.ndarray | None, ctx: UnitContext
    ) -> InterventionResult:
        s = ctx.settings
        own = pair_accuracy(p_yes, s.n_boot, s.seed)
        ctrl = pair_accuracy(control, s.n_boot, s.seed) if control is not None else None
        keep = ("shift", "kl", "control_unit", "control_shift", "control_kl", "n_unchanged")
        return InterventionResult(**vars(own), control=ctrl, **{k: pairs[k] for k in keep})

    def baseline(self, ctx: UnitContext) -> InterventionResult:
        pairs = self._pairs(ctx)

        def lookup(tokens: list[str]) -> float:
            return float(np.mean([ctx.table.get(t, 0.0) for t in tokens])) if tokens else 0.0

        p = []
        for orig, steer in zip(pairs["original_tokens"], pairs["steered_tokens"]):
            a, b = lookup(steer), lookup(orig)
            first = 0.5 if a == b else float(a > b)  # steered shown as A
            p += [first, 1.0 - first if a != b else 0.5]  # the same pair the other way round
        return self._result(pairs, np.array(p), None, ctx)

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[InterventionResult, list[JudgedItem]]:
        pairs = self._pairs(ctx)
        explanation, limit = ctx.entry.explanation, ctx.settings.max_prompt_tokens
        asked = self._items(pairs, "steered")
        noun = ctx.record.noun
        p_yes = llm.judge(JudgeRequest("intervention", explanation, tuple(asked), limit, examples=(), noun=noun)).p_yes
        control = self._items(pairs, "control_steered")
        p_control = llm.judge(
            JudgeRequest("intervention", explanation, tuple(control), limit, examples=(), noun=noun)
        ).p_yes
        details = [
            JudgedItem("control" if j >= len(asked) else "unit", (j % len(asked)) // 2,
                       "steered as [A]" if j % 2 == 0 else "steered as [B]", j % 2 == 0,
                       None if not np.isfinite(p) else round(float(p), 6), list(item.tokens))
            for j, (item, p) in enumerate(zip(asked + control, np.concatenate([p_yes, p_control])))
        ]  # fmt: skip
        return self._result(pairs, p_yes, p_control, ctx), details
