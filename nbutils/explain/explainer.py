"""The LLM explainers: the paper's (``llm``: best-of-n) and triage (``triage``: the rules explainer first).

The LLM explainer sees a unit's ``train`` excerpts (`nbutils.core.records.split_excerpts`) as 0..10 values and
completes "the main thing this neuron does is find ...". With ``n_samples > 1`` every candidate is simulated
on the calibration excerpts by the same backend, and the one with the highest correlation is kept; all
candidates are recorded with their scores. With ``explain_with_rules`` its prompt also lists the rule the
rules explainer found (recorded on the entry). Triage (``llm_when="rule_below:X"``) keeps a unit's rule as
its explanation where the rule's calibration correlation reaches X and asks the LLM for the rest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from nbutils.core.config import RunConfig, rule_threshold
from nbutils.core.records import Excerpt, UnitRecord
from nbutils.core.results import Candidate, ExplanationEntry, Triage
from nbutils.explain.contract import ExplainContext, Explainer, explain_side
from nbutils.explain.rules import RulesExplainer, rule_record, rules_entry
from nbutils.llm.contract import Backend, LLMFailed
from nbutils.llm.look_rules import best_look
from nbutils.llm.prompts import parse_explanation
from nbutils.llm.rule_language import RulesSimulator
from nbutils.score.metrics import Metric, correlation
from nbutils.score.simulation import expected_values, simulate, true_activations


def calibration_correlation(explanation: str, llm: Backend, calibration: list[Excerpt], noun: str) -> Metric:
    """An explanation's correlation on calibration excerpts, simulated by ``llm`` (best-of-n's choice and
    triage's; raises `LLMFailed` when the simulation fails)."""
    ev = expected_values(simulate(llm, explanation, calibration, noun=noun))
    return correlation(np.concatenate(true_activations(calibration)), np.concatenate(ev))


def _candidate(
    reply: str, llm: Backend, calibration: list[Excerpt], best_of_n: bool, noun: str = "neuron"
) -> tuple[Candidate, bool | None]:
    """One reply as a candidate (with its calibration score for best-of-n); if its simulation failed, whether
    a retry could help (else None)."""
    text = parse_explanation(reply)
    cand = Candidate(text, reply)
    if not text:
        cand.reason = "empty or unusable explainer reply"
    elif best_of_n and calibration:
        try:
            m = calibration_correlation(text, llm, calibration, noun)
        except LLMFailed as e:
            cand.reason = f"simulation failed: {e}"
            return cand, e.retryable
        cand.calibration_score, cand.reason = m.value, m.reason
    return cand, None


class LLMExplainer(Explainer):
    """``explainer="llm"`` (the default): the run's ``explainer_backend`` writes ``n_samples`` candidates; the
    best on the calibration excerpts is kept (see the module docstring)."""

    name = "llm"
    title = "an LLM writes the explanation from the unit's top and random excerpts (best-of-n)"

    def bind(self, config: RunConfig, llm: Backend | None, meta: Any) -> None:
        super().bind(config, llm, meta)
        self.rules: RulesExplainer | None = None
        if config.explain_with_rules:  # the rule found first is listed in the prompt
            self.rules = self._bound_rules()

    def _bound_rules(self) -> RulesExplainer:
        rules = RulesExplainer()
        rules.bind(self.config, None, self.meta)
        return rules

    def explain(self, ctx: ExplainContext) -> None:
        request = ctx.request
        if self.config.explain_with_rules:  # the rule goes on the entry, and into the prompt where it has clauses
            found = self.rules.find_for(ctx)
            ctx.entry.rule = rule_record(found)
            if found.rule.clauses:
                request = replace(request, rule=found.rule.describe())
        self.ask(ctx, request)

    def ask(self, ctx: ExplainContext, request: Any) -> None:
        """Send the request, keep the best usable candidate (or record why there is none)."""
        entry, n = ctx.entry, self.config.n_samples
        ctx.sent = request
        try:
            replies = self.llm.explain(request)
        except LLMFailed as e:
            entry.failure, entry.retryable = f"explainer request failed: {e}", e.retryable
            return
        failed = []
        for reply in replies:
            cand, retryable = _candidate(reply, self.llm, ctx.calibration, n > 1, ctx.record.noun)
            entry.candidates.append(cand)
            failed += [] if retryable is None else [retryable]
        if failed:  # a candidate's simulation failed: retry the unit if a server fault was the cause
            entry.retryable = any(failed)
        usable = [c for c in entry.candidates if c.explanation]
        if not usable:
            entry.failure = f"no usable explanation among {len(replies)} replies"
            return
        best = max(usable, key=lambda c: -np.inf if c.calibration_score is None else c.calibration_score)
        entry.explanation = best.explanation


class TriageExplainer(LLMExplainer):
    """``llm_when="rule_below:X"``: the rules explainer first; a unit side whose rule's correlation on its
    calibration excerpts reaches X keeps the rule (no LLM request), the rest go to the LLM (with the rule
    listed in the prompt where ``explain_with_rules``). Each entry records why (`Triage`)."""

    name = "triage"
    title = "the rules explainer first, the LLM where the rule's calibration correlation is below a threshold"

    def bind(self, config: RunConfig, llm: Backend | None, meta: Any) -> None:
        super().bind(config, llm, meta)
        self.rules = self.rules or self._bound_rules()  # triage always finds the rule first

    def explain(self, ctx: ExplainContext) -> None:
        threshold = rule_threshold(self.config.llm_when)
        found = self.rules.find_for(ctx)
        # a rule's own text always parses; an empty rule predicts a constant: undefined, so to the LLM
        r = calibration_correlation(
            found.rule.describe(), RulesSimulator(found.rule), ctx.calibration, ctx.record.noun
        ).value
        keep = r is not None and threshold is not None and r >= threshold
        ctx.entry.triage = Triage(threshold, r, sent_to_llm=not keep)
        if keep:
            rules_entry(ctx.entry, found, r, look=best_look(ctx.train + ctx.calibration))
            return
        ctx.entry.rule = rule_record(found)
        hint = self.config.explain_with_rules and found.rule.clauses
        self.ask(ctx, replace(ctx.request, rule=found.rule.describe()) if hint else ctx.request)


def explain_unit(
    record: UnitRecord, llm: Backend | None, n_samples: int = 1, temperature: float = 1.0, negative: bool = False,
    seed: int = 0, split: str = "nbutils", with_outputs: bool = False,
) -> ExplanationEntry:  # fmt: skip
    """Explain one unit side with the LLM explainer and these settings (a shortcut for scripts and tests;
    stage 02 makes its explainer from the run's parameters: `nbutils.explain.contract.make_explainer`)."""
    config = RunConfig(
        n_samples=n_samples, temperature=temperature, seed=seed, split=split, explain_with_outputs=with_outputs
    )
    explainer = LLMExplainer()
    explainer.bind(config, llm, None)
    return explain_side(record, explainer, negative).entry
