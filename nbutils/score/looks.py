"""The ``looks`` scorer: does the explanation say where an attention head looks?

For attention heads the collection keeps, per token of the kept excerpts, the position the head attends to
most (`nbutils.core.records.Looks`). An explanation that states a look rule (``attends to the previous token``,
`nbutils.llm.look_rules`) is simulated exactly on the held-out excerpts (``valid_top`` and ``valid_random``)
and scored by its agreement: the share of the head's write (each token counted by the head's value there)
whose most-attended position the rule names, with a bootstrap interval over excerpts, and the same share
counting every token alike. No LLM is asked. An explanation without a look rule, and a unit that is not a
head, get an undefined score that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nbutils.llm.contract import Backend
from nbutils.llm.look_rules import agreement, parse_look
from nbutils.score.contract import Column, Scorer, UnitContext
from nbutils.score.metrics import Metric


@dataclass
class LooksResult:
    agreement: Metric
    """Share of the head's write on held-out excerpts whose source the rule names (bootstrap 95% interval)."""
    tokens: Metric
    """Share of held-out tokens (from each excerpt's second) whose source the rule names."""
    rule: str | None = None
    """The look rule read from the explanation."""


def _undefined(reason: str) -> LooksResult:
    return LooksResult(Metric(None, reason), Metric(None, reason))


class LooksScorer(Scorer):
    """Agreement of the explanation's look rule with where the head looks (module docstring)."""

    name = "looks"
    title = "where the head looks: share of its write whose source the explanation names"
    label_prefix = "looks"
    measure = "look agreement"
    result_type = LooksResult
    columns = (Column("agreement", ("agreement",)), Column("tokens", ("tokens",)))

    def _score(self, ctx: UnitContext, explanation: str) -> LooksResult:
        held_out = [e for e in ctx.splits.get("valid_top", []) + ctx.splits.get("valid_random", [])]
        held_out = [e for e in held_out if e.looks is not None]
        if not held_out:
            return _undefined("no held-out excerpt records where the unit looks (not an attention head)")
        rule = parse_look(explanation)
        if rule is None:
            return _undefined("the explanation states no look rule (attends to ...)")
        value = agreement(rule, held_out)
        if value is None:
            return _undefined("the head writes nothing on the held-out excerpts")
        rng = np.random.default_rng(ctx.settings.seed)
        draws = [
            agreement(rule, [held_out[i] for i in rng.integers(0, len(held_out), len(held_out))])
            for _ in range(min(ctx.settings.n_boot, 200))
        ]
        draws = [d for d in draws if d is not None]
        low, high = (float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))) if draws else (None, None)
        return LooksResult(Metric(value, low=low, high=high), Metric(agreement(rule, held_out, weighted=False)),
                           rule.describe())  # fmt: skip

    def baseline(self, ctx: UnitContext) -> LooksResult | None:
        return None  # the token-lookup baseline states no look rule

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[LooksResult, None]:
        return self._score(ctx, ctx.entry.explanation or ""), None
