"""Explaining one unit: an LLM explanation (best-of-n) and the token-lookup baseline's.

The explainer sees the unit's ``train`` excerpts (`nbutils.core.records.split_excerpts`) as 0..10 values and
completes "the main thing this neuron does is find ...". With ``n_samples > 1`` every candidate is simulated
on the calibration excerpts by the same backend, and the one with the highest correlation is kept; all
candidates are recorded with their scores. Every unit also gets the token-lookup baseline's explanation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from nbutils.core.config import RunConfig, rule_threshold
from nbutils.core.errors import UserError
from nbutils.core.records import Excerpt, RecordStore, UnitRecord, split_excerpts
from nbutils.core.results import BaselineExplanation, Candidate, ExplanationEntry, OutputsShown, Triage
from nbutils.core.units import UnitId
from nbutils.llm.contract import Backend, ExplainRequest, LLMFailed
from nbutils.llm.prompts import WRITES_SHOWN, ShownExcerpt, normalise, parse_explanation
from nbutils.llm.rules import RulesBackend, RuleSearch
from nbutils.score.baseline import token_lookup_explanation, token_table
from nbutils.score.classification import has_silent_excerpts
from nbutils.score.metrics import Metric, correlation
from nbutils.score.simulation import expected_values, simulate, true_activations


def shown_excerpts(excerpts: Sequence[Excerpt], max_activation: float) -> list[ShownExcerpt]:
    """Excerpts as the explainer sees them: tokens and their 0..10 values."""
    return [
        ShownExcerpt(tuple(e.tokens), tuple(int(v) for v in normalise(e.activations, max_activation))) for e in excerpts
    ]


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


def calibration_correlation(explanation: str, llm: Backend, calibration: list[Excerpt], noun: str) -> Metric:
    """An explanation's correlation on calibration excerpts, simulated by ``llm`` (best-of-n's choice and
    ``llm_when``'s triage; raises `LLMFailed` when the simulation fails)."""
    ev = expected_values(simulate(llm, explanation, calibration, noun=noun))
    return correlation(np.concatenate(true_activations(calibration)), np.concatenate(ev))


def outputs_shown(record: UnitRecord, negative: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The tokens a unit side raises and lowers as the next token (a negative side lowers what the unit's
    direction promotes), for the output-aware explainer; None where the collection has none."""
    if not record.writes:
        return None
    up, down = (tuple(t for t, _ in record.writes[k][:WRITES_SHOWN]) for k in ("promotes", "suppresses"))
    return (down, up) if negative else (up, down)


def base_entry(
    record: UnitRecord, negative: bool = False, split: str = "nbutils", train: list[Excerpt] | None = None
) -> ExplanationEntry:
    """A unit side's stage-02 entry before its explanation: which side, which split, and the token-lookup
    baseline's explanation of its train excerpts (what stage 03 scores beside any explanation). ``train``:
    those excerpts when the caller has split them already."""
    train = split_excerpts(record, negative, split=split)["train"] if train is None else train
    baseline = BaselineExplanation(token_lookup_explanation(token_table(train)))
    sign = "negative" if negative else "positive"
    return ExplanationEntry(record.id.layer, record.id.index, sign, split=split, baseline=baseline)


def explainer_request(
    record: UnitRecord, n_samples: int = 1, temperature: float = 1.0, negative: bool = False, seed: int = 0,
    split: str = "nbutils", with_outputs: bool = False, train: list[Excerpt] | None = None, rule: str | None = None,
) -> ExplainRequest | None:  # fmt: skip
    """What the explainer is asked for one unit side: its train excerpts as 0..10 values (and, ``with_outputs``,
    the tokens it raises and lowers; ``rule``, the rule the rules explainer found); None when the side never
    activates on them (nothing to explain)."""
    train = split_excerpts(record, negative, split=split)["train"] if train is None else train
    max_act = max((float(np.max(e.activations)) for e in train), default=0.0)
    if not train or max_act <= 0:
        return None
    writes = outputs_shown(record, negative) if with_outputs else None
    shown = tuple(shown_excerpts(train, max_act))
    return ExplainRequest(shown, n_samples, temperature, seed, writes=writes, noun=record.noun, rule=rule)


@dataclass(frozen=True)
class RuleUse:
    """How an LLM explainer uses the rules explainer (`RunConfig.llm_when`, `RunConfig.explain_with_rules`):
    ``rules`` finds each unit's rule; a rule whose calibration correlation reaches ``keep_above`` is kept as
    the explanation (no LLM request); ``hint`` lists the rule in the LLM's prompt."""

    rules: RulesBackend
    keep_above: float | None = None
    hint: bool = False


def rule_use(config: RunConfig, llm: Backend | None, meta: Any) -> RuleUse | None:
    """The `RuleUse` a run's config asks of an LLM explainer, bound to the collection ``meta`` describes (None
    when it asks none, or when the explainer is the rules backend itself)."""
    keep_above = rule_threshold(config.llm_when)
    if isinstance(llm, RulesBackend) or (keep_above is None and not config.explain_with_rules):
        return None
    rules = RulesBackend()
    rules.bind_collection(meta)
    return RuleUse(rules, keep_above, config.explain_with_rules)


def explain_unit(
    record: UnitRecord, llm: Backend | None, n_samples: int = 1, temperature: float = 1.0, negative: bool = False,
    seed: int = 0, split: str = "nbutils", with_outputs: bool = False, rules: RuleUse | None = None,
) -> ExplanationEntry:  # fmt: skip
    """Explain one unit (one sign of it); returns its stage-02 entry. ``with_outputs``:
    the explainer also sees the tokens the unit raises and lowers as the next token (`outputs_shown`);
    ``rules``: the rules explainer goes first (`RuleUse`)."""
    sp = split_excerpts(record, negative, split=split)  # once: the entry, the request and the calibration
    entry = base_entry(record, negative, split, sp["train"])
    request = explainer_request(record, n_samples, temperature, negative, seed, split, with_outputs, sp["train"])
    if request is None:
        entry.failure = f"the {record.noun} never activates on its training excerpts, so there is nothing to explain"
        return entry
    if request.writes is not None:
        entry.outputs_shown = OutputsShown(list(request.writes[0]), list(request.writes[1]))
    calibration = sp["calibration_top"] + sp["calibration_random"]
    if isinstance(llm, RulesBackend):
        return rules_entry(entry, llm.find(sp["train"], record.id.layer, record.id.index, negative))
    if rules is not None:
        found = rules.rules.find(sp["train"], record.id.layer, record.id.index, negative)
        if rules.keep_above is not None:
            # a rule's own text always parses; an empty rule predicts a constant: undefined, so to the LLM
            r = calibration_correlation(found.rule.describe(), rules.rules, calibration, record.noun).value
            keep = r is not None and r >= rules.keep_above
            entry.triage = Triage(rules.keep_above, r, sent_to_llm=not keep)
            if keep:
                return rules_entry(entry, found, r)
        entry.rule = rule_record(found)
        if rules.hint and found.rule.clauses:
            request = replace(request, rule=found.rule.describe())
    try:
        replies = llm.explain(request)
    except LLMFailed as e:
        entry.failure, entry.retryable = f"explainer request failed: {e}", e.retryable
        return entry
    failed = []
    for reply in replies:
        cand, retryable = _candidate(reply, llm, calibration, n_samples > 1, record.noun)
        entry.candidates.append(cand)
        failed += [] if retryable is None else [retryable]
    if failed:  # a candidate's simulation failed: retry the unit if a server fault was the cause
        entry.retryable = any(failed)
    usable = [c for c in entry.candidates if c.explanation]
    if not usable:
        entry.failure = f"no usable explanation among {len(replies)} replies"
        return entry
    best = max(usable, key=lambda c: -np.inf if c.calibration_score is None else c.calibration_score)
    entry.explanation = best.explanation
    return entry


def rule_record(found: RuleSearch) -> dict[str, Any]:
    """What an entry keeps of a rule search: the rule and what finding it took."""
    return {
        **found.rule.to_dict(), "forward_passes": found.forward_passes, "sequences": found.sequences,
        "train_correlation": found.train_correlation, "note": found.note,
    }  # fmt: skip


def rules_entry(entry: ExplanationEntry, found: RuleSearch, calibration: float | None = None) -> ExplanationEntry:
    """A unit side's entry from the rules explainer: the rule's text as its explanation, the rule and its cost
    stored with it. ``calibration``: the rule's correlation on the calibration excerpts, where triage
    measured it (the rule's fit on its own train excerpts, in-sample, is kept in entry.rule, not shown as one)."""
    text = found.rule.describe()
    entry.explanation = text
    entry.candidates.append(Candidate(text, text, calibration, found.note))
    entry.rule = rule_record(found)
    return entry


def explain_with(
    record: UnitRecord, llm: Backend | None, config: RunConfig, negative: bool = False, rules: RuleUse | None = None
) -> ExplanationEntry:
    """`explain_unit` with a run's explainer parameters (what stage 02 and the interactive ``explain`` call);
    ``rules``: `rule_use` of the same config."""
    c = config
    return explain_unit(
        record, llm, c.n_samples, c.temperature, negative, c.seed, c.split, c.explain_with_outputs, rules
    )


def units_to_explain(
    store: RecordStore, spec: Any, seed: int = 0, skip: set[tuple[int, int]] | None = None
) -> list[UnitId]:
    """Which units to explain: "all"; an int (that many per collected layer, a seeded sample);
    "strongest:N" (per layer, the N with the largest max activation over standard deviation, the most
    selective ones, strongest first, passing over units active on every excerpt they kept: an always-on
    unit with a few spikes ranks high by that ratio, yet no explanation of it can be judged by detection or
    fuzzing, which need silent excerpts); or [[layer, index], ...]. ``skip``: (layer, index) of dead and rare
    units, which a sample or "strongest:N" passes over (a rare unit is often the "strongest"); "all" and a
    list still name them, and the stage lists them as skipped."""
    skip = skip or set()
    if spec == "all" or spec is None:
        return list(store.all_ids())
    if isinstance(spec, str) and spec.startswith("strongest:") and spec[len("strongest:") :].isdigit():
        n = int(spec[len("strongest:") :])
        ids = []
        for layer in store.layers:
            kept, always_on = [], []
            for x in store.strongest(layer, 10 * n + len(skip) + 16):  # a bounded look: records are read
                if len(kept) == n:
                    break
                if (layer, x) not in skip:
                    (kept if has_silent_excerpts(store.record(layer, x)) else always_on).append(x)
            kept += always_on[: n - len(kept)]  # only where too few others were found
            ids += [store.unit(layer, x) for x in kept]
        return ids
    if isinstance(spec, int):
        ids = []
        for layer in store.layers:
            neurons = store.neurons(layer)
            rng = np.random.default_rng([seed, layer])
            pick = set(rng.choice(len(neurons), min(spec, len(neurons)), replace=False).tolist())
            pick = {i for i in pick if (layer, int(neurons[i])) not in skip}
            # rare units drawn are replaced by a further draw from the rest (no rare unit: the same sample)
            rest = [i for i in range(len(neurons)) if i not in pick and (layer, int(neurons[i])) not in skip]
            more = min(spec - len(pick), len(rest))
            pick |= {rest[i] for i in rng.choice(len(rest), more, replace=False)} if more > 0 else set()
            ids += [store.unit(layer, int(neurons[i])) for i in sorted(pick)]
        return ids
    try:
        ids = [store.unit(int(layer), int(neuron)) for layer, neuron in spec]
    except (TypeError, ValueError):
        raise UserError(
            f"explain_neurons={spec!r} is not 'all', 'strongest:N', a number per layer, or a list of [layer, neuron] "
            "pairs.",
            "Write e.g. explain_neurons=4, explain_neurons=strongest:5 or explain_neurons=[[0, 12], [29, 700]].",
        ) from None
    for nid in ids:
        store.require(nid.layer, nid.index)
    return ids
