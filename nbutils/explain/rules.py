"""The rules explainer: explain a unit with rules found in its excerpts by running the subject model, no LLM.

The method follows Neuron to Graph (Foote et al. 2023, arXiv:2305.19911): for each strong activation in a
unit's train excerpts, *prune* the text before it to the shortest context that still activates the unit
(the subject model run on shortened prefixes, batched), then find which tokens of that context *matter*
(each replaced by a neutral token in turn). Where N2G merges the results into a trie of exact token
patterns, this module turns each finding into a clause of a small rule language that also generalises
beyond the tokens seen (`nbutils.llm.rule_language`).

Clauses are chosen greedily for the correlation they add on the train excerpts (a clause's value is the
mean activation of the tokens it matches there). The rule *is* its explanation: its text is the rule in
plain words, the entry records the rule itself, and stage 03 simulates it exactly
(`nbutils.llm.rule_language.RulesSimulator`).

Cost per unit is bounded: at most ``max_peaks`` peaks, each probed with at most ``window`` pruned prefixes
and ``window - 1`` ablated ones, all in batches of ``batch_size`` (`RuleSearch.forward_passes`); these are
the explainer's own settings (`RulesSettings`: ``-p explainer.rules.max_peaks=6``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from nbutils.core.records import Excerpt
from nbutils.core.results import Candidate, ExplanationEntry
from nbutils.explain.contract import ExplainContext, Explainer
from nbutils.llm.look_rules import LookRule, best_look
from nbutils.llm.rule_language import PAIRS, Clause, Rule, previous_token, rounded
from nbutils.llm.token_classes import CLASSES, REPEATED, TOKEN_CLASSES, in_class, word_of

# ----------------------------------------------------------------------------------------------------------
# Finding a rule
# ----------------------------------------------------------------------------------------------------------


GROUP_SIZE = 16
"""Tokens at most in a group of tokens the model embeds alike (`UnitProbe.neighbours`)."""
GROUP_COSINE = 0.6
"""How alike: the cosine of the input embeddings with the token the group is named by."""


class UnitProbe:
    """One unit's value at the last token of token-id sequences, from the subject model (batched, right
    padded: a causal model's earlier positions never see the padding). Counts what it runs."""

    def __init__(
        self, model: Any, site: Any, units: Any, layer: int, index: int, negative: bool = False,
        batch_size: int = 64, neutral_id: int | None = None, tokenizer: Any = None,
    ) -> None:  # fmt: skip
        """``tokenizer``: decodes the token ids of groups of tokens the model embeds alike (`neighbours`);
        without one no group clause is proposed."""
        self.model, self.site, self.units, self.tokenizer = model, site, units, tokenizer
        self._unit_embeddings: Any = None
        self.layer, self.index, self.sign = layer, index, -1.0 if negative else 1.0
        self.batch_size = batch_size
        tok = getattr(model, "tokenizer", None)
        fallback = getattr(tok, "eos_token_id", None) if tok is not None else None
        self.neutral_id = neutral_id if neutral_id is not None else (fallback if fallback is not None else 0)
        self.forward_passes = 0
        self.sequences = 0

    def last_values(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """The unit's value at each sequence's last token."""
        import torch

        from nbutils.subject.sites import NeuronCapture

        device = next(iter(self.model.parameters()), torch.zeros(0)).device
        out = np.zeros(len(sequences))
        with NeuronCapture(self.model, self.site, [self.layer]) as capture:
            for start in range(0, len(sequences), self.batch_size):
                chunk = sequences[start : start + self.batch_size]
                width = max(len(s) for s in chunk)
                batch = torch.full((len(chunk), width), self.neutral_id, dtype=torch.long)
                for r, s in enumerate(chunk):
                    batch[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
                values = self.units.transform(capture.run(batch.to(device))[self.layer], self.layer)
                last = torch.tensor([len(s) - 1 for s in chunk], device=values.device)
                picked = values[torch.arange(len(chunk), device=values.device), last, self.index]
                out[start : start + len(chunk)] = picked.float().cpu().numpy()
                self.forward_passes += 1
                self.sequences += len(chunk)
        return out * self.sign

    def neighbours(self, token_id: int, k: int = GROUP_SIZE, min_cosine: float = GROUP_COSINE) -> list[str]:
        """The token itself and up to ``k - 1`` tokens whose input embeddings are nearest to it (cosine at least
        ``min_cosine``), decoded, nearest first; [] without a tokenizer or input embeddings."""
        get = getattr(self.model, "get_input_embeddings", None)
        if self.tokenizer is None or get is None or get() is None:
            return []
        import torch

        if self._unit_embeddings is None:
            e = get().weight.detach().float()
            self._unit_embeddings = e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)
        e = self._unit_embeddings
        if not 0 <= token_id < len(e):
            return []
        sims = e @ e[token_id]
        values, ids = torch.topk(sims, min(k, len(e)))
        near = [int(i) for v, i in zip(values.tolist(), ids.tolist()) if v >= min_cosine or int(i) == token_id]
        return list(dict.fromkeys(self.tokenizer.decode([i]) for i in [token_id, *near]))


@dataclass
class Finding:
    """What pruning and ablation found at one peak: the shortest context that keeps the activation (in tokens,
    None if even ``window`` tokens do not), and the context token that matters most with its distance."""

    excerpt: int
    position: int
    value: float
    context_length: int | None
    key_token: str | None = None
    key_distance: int = 0
    importance: float = 0.0


@dataclass
class RuleSearch:
    """The result of `find_rule`: the rule, the peaks' findings, and the subject-model work it took."""

    rule: Rule
    findings: list[Finding] = field(default_factory=list)
    forward_passes: int = 0
    sequences: int = 0
    train_correlation: float | None = None
    note: str | None = None
    held_out_correlation: float | None = None
    """The rule's correlation on the held-out excerpts it was generalised on (None without them)."""


def find_rule(
    train: Sequence[Excerpt], probe: UnitProbe | None, max_peaks: int = 12, window: int = 24, keep: float = 0.5,
    max_clauses: int = 12, min_gain: float = 0.005, held_out: Sequence[Excerpt] = (),
) -> RuleSearch:  # fmt: skip
    """A rule for one unit side from its train excerpts (activations as collected, the side's sign applied).

    ``probe`` runs the subject model for pruning; without one (or without token ids) only token clauses are
    considered. ``keep``: the fraction of a peak's activation a pruned context must keep. ``held_out``:
    excerpts the rule is generalised on (`_generalise`; stage 02 passes the calibration excerpts), never the
    ones stage 03 scores on."""
    train = [e for e in train if len(e.tokens)]
    top = max((float(np.max(e.activations)) for e in train), default=0.0)
    if not train or top <= 0:
        return RuleSearch(Rule(), note="the unit never activates on its train excerpts: no rule to find")
    before = (probe.forward_passes, probe.sequences) if probe is not None else (0, 0)
    findings = []
    note = None
    if probe is None or any(not e.token_ids for e in train):
        note = "no subject model or token ids: token clauses only (no pruning)"
    else:
        findings = _probe_peaks(train, probe, top, max_peaks, window, keep)
    candidates = _candidates(train, findings, top) + _groups(train, findings, probe)
    rule, r = _select(train, candidates, max_clauses, min_gain)
    rule, held = _generalise(rule, train, held_out, candidates, max_clauses)
    work = (probe.forward_passes - before[0], probe.sequences - before[1]) if probe is not None else (0, 0)
    if held is not None:
        r = _pearson(np.concatenate([np.asarray(e.activations, dtype=float) for e in train]),
                     np.concatenate([rule.apply(e.tokens) for e in train])) if rule.clauses else None  # fmt: skip
    return RuleSearch(rule, findings, work[0], work[1], r, note, held)


def _peaks(train: Sequence[Excerpt], top: float, max_peaks: int) -> list[tuple[int, int, float]]:
    """(excerpt, position, value) of the strongest activations at least half the top one, strongest first,
    at most two per excerpt before any excerpt gets a third (so one excerpt does not take every peak)."""
    per: list[list[tuple[float, int, int]]] = []
    for k, e in enumerate(train):
        acts = np.asarray(e.activations, dtype=float)
        order = np.argsort(-acts, kind="stable")
        per.append([(float(acts[p]), k, int(p)) for p in order if acts[p] >= 0.5 * top])
    ranked = sorted(((rank, -v, k, p) for peaks in per for rank, (v, k, p) in enumerate(peaks)))
    return [(k, p, -nv) for _, nv, k, p in ranked[:max_peaks]]


def _probe_peaks(
    train: Sequence[Excerpt], probe: UnitProbe, top: float, max_peaks: int, window: int, keep: float
) -> list[Finding]:
    peaks = _peaks(train, top, max_peaks)
    # pruning: every peak's prefixes of 1..window tokens ending at the peak, one batched call
    prefixes, owner = [], []
    for n, (k, p, _) in enumerate(peaks):
        ids = train[k].token_ids
        for length in range(1, min(window, p + 1) + 1):
            prefixes.append(ids[p - length + 1 : p + 1])
            owner.append((n, length))
    values = probe.last_values(prefixes) if prefixes else np.zeros(0)
    shortest: dict[int, int] = {}
    for (n, length), v in zip(owner, values):
        if n not in shortest and v >= keep * peaks[n][2]:
            shortest[n] = length
    findings = [Finding(k, p, v, shortest.get(n)) for n, (k, p, v) in enumerate(peaks)]
    # importance: within each pruned context longer than the token, each earlier token replaced in turn
    ablated, which = [], []
    for n, f in enumerate(findings):
        length = f.context_length
        if length is None or length == 1:
            continue
        ids = list(train[f.excerpt].token_ids[f.position - length + 1 : f.position + 1])
        for j in range(length - 1):
            ablated.append(ids[:j] + [probe.neutral_id] + ids[j + 1 :])
            which.append((n, length - 1 - j))
    drops = probe.last_values(ablated) if ablated else np.zeros(0)
    base = _pruned_values(findings, owner, values)
    for (n, distance), v in zip(which, drops):
        f = findings[n]
        importance = 1.0 - v / base[n] if base[n] > 0 else 0.0
        if importance > f.importance:
            f.importance, f.key_distance = importance, distance
            f.key_token = train[f.excerpt].tokens[f.position - distance]
    return findings


def _pruned_values(findings: list[Finding], owner: list[tuple[int, int]], values: np.ndarray) -> dict[int, float]:
    """Each peak's value with its pruned context (the baseline its ablations are measured against)."""
    wanted = {n: f.context_length for n, f in enumerate(findings) if f.context_length}
    return {n: float(v) for (n, length), v in zip(owner, values) if wanted.get(n) == length}


def _candidates(train: Sequence[Excerpt], findings: list[Finding], top: float) -> list[Clause]:
    """Clauses worth trying: every token whose mean train activation is at least a tenth of the top one, and
    what each peak's key context token suggests."""
    sums: dict[str, list[float]] = {}
    for e in train:
        for t, a in zip(e.tokens, e.activations):
            sums.setdefault(t, []).append(float(a))
    out: list[Clause] = [Clause("token", 0.0, token=t) for t, a in sums.items() if np.mean(a) >= 0.1 * top]
    out += [Clause("word", 0.0, token=word_of(c.token)) for c in out if word_of(c.token or "")]
    out += [Clause("class", 0.0, token=c) for c in CLASSES if c != REPEATED] + [Clause("repeat", 0.0)]
    out += [Clause("after", 0.0, context_class=c) for c in CLASSES]  # any token right after one of a class
    for f in findings:
        if f.key_token is None or f.importance < 0.3:
            continue
        token, key = train[f.excerpt].tokens[f.position], f.key_token
        if key.strip().lower() == token.strip().lower() and key.strip():
            out.append(Clause("repeat", 0.0))
        if previous_token(train[f.excerpt].tokens, f.position) == key:
            out += [Clause("after", 0.0, token=token, context=key)]
            ends = {key, key.strip()[-1:]} - {""}  # the token, and its last character (".", "," of ").", "*,")
            for end, ending in [(e, True) for e in sorted(ends)] + [(key, False)]:  # on a tie, the general
                out += [Clause("after", 0.0, context=end, token_class=c, ending=ending) for c in (None, *TOKEN_CLASSES)]
            for before in (c for c in TOKEN_CLASSES if in_class(key, c)):  # after any token of the key's class
                out += [Clause("after", 0.0, token=token, context_class=before)]
                out += [Clause("after", 0.0, token_class=c, context_class=before) for c in (None, *TOKEN_CLASSES)]
        for ch in key.strip():
            if ch in PAIRS:
                out += [Clause("inside", 0.0, context=ch, closer=PAIRS[ch], graded=g) for g in (False, True)]
    return list(dict.fromkeys(out))


def _groups(train: Sequence[Excerpt], findings: list[Finding], probe: UnitProbe | None, seeds: int = 8) -> list[Clause]:
    """Group clauses: for the tokens at the strongest peaks (up to ``seeds`` distinct ones), the tokens the
    subject model embeds alike (`UnitProbe.neighbours`), as one clause named by the peak's token."""
    if probe is None:
        return []
    ids: dict[int, str] = {}
    for f in findings:
        e = train[f.excerpt]
        if e.token_ids and len(ids) < seeds:
            ids.setdefault(int(e.token_ids[f.position]), e.tokens[f.position])
    out = []
    for token_id, token in ids.items():
        members = probe.neighbours(token_id)
        if len(members) > 1:
            out.append(Clause("group", 0.0, token=token, members=tuple(members)))
    return out


def _fitted(clause: Clause, train: Sequence[Excerpt]) -> tuple[Clause, np.ndarray] | None:
    """The clause with its value (mean activation where it matches; per level for a graded one) and its
    match pattern over the concatenated train tokens; None if it matches nothing."""
    unit = replace(clause, value=1.0)
    hit = np.concatenate([unit.matches(e.tokens) for e in train])
    acts = np.concatenate([np.asarray(e.activations, dtype=float) for e in train])
    on = hit > 0
    if not on.any():
        return None
    value = rounded(float(np.sum(acts[on]) / np.sum(hit[on])))
    if value <= 0:
        return None
    return replace(clause, value=value), hit * value


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return -1.0
    return float(np.corrcoef(a, b)[0, 1])


def _select(
    train: Sequence[Excerpt], candidates: list[Clause], max_clauses: int, min_gain: float
) -> tuple[Rule, float | None]:
    """Greedy forward selection of clauses by the train correlation they add (prediction: the max)."""
    acts = np.concatenate([np.asarray(e.activations, dtype=float) for e in train])
    fitted = [f for f in (_fitted(c, train) for c in candidates) if f is not None]
    chosen: list[Clause] = []
    pred, best = np.zeros_like(acts), -1.0
    while len(chosen) < max_clauses and fitted:
        scored = [(_pearson(acts, np.maximum(pred, p)), -n) for n, (_, p) in enumerate(fitted)]
        r, n = max(scored)  # on a tie the earlier candidate: the simpler one (ungraded, the token's own)
        n = -n
        if r < best + min_gain:
            break
        clause, p = fitted.pop(n)
        chosen.append(clause)
        pred, best = np.maximum(pred, p), r
    order = sorted(chosen, key=lambda c: (c.kind != "token", -c.value))  # token clauses first, strongest first
    return Rule(tuple(order)), (best if chosen else None)


DESCRIPTION_COST = 0.005
"""What one more clause must be worth in held-out correlation (`_generalise`'s description-length term)."""


def _general(clause: Clause) -> bool:
    """A clause that names a class of tokens or contexts rather than given tokens."""
    return clause.kind in ("class", "repeat", "group") or (
        clause.kind == "after" and clause.token is None and clause.context is None and clause.context_class is not None
    )


def _generalise(
    rule: Rule, train: Sequence[Excerpt], held_out: Sequence[Excerpt], candidates: list[Clause], max_clauses: int
) -> tuple[Rule, float | None]:
    """The rule that explains the train and held-out excerpts together best for its length: local search from
    the greedy rule (found on train alone) over removing a clause, swapping one for a class clause, replacing
    every clause a class covers (on those tokens) by that class, and adding a class clause, each move kept
    while it raises the correlation on train and held-out minus `DESCRIPTION_COST` per clause (a
    description-length criterion). The train excerpts are the unit's strongest, where a list of the members
    seen fits as well as their class; the held-out ones (calibration: strong and random excerpts) show where
    the list falls short and where the class over-reaches. So one class clause replaces a list of its members
    when it predicts the activations as well, and a list stays where no class does. (The held-out excerpts
    alone, about 11 here, proved too few: on the main job the rules then lost 0.01 on average.) Class clauses
    take the values fitted on train. Returns the rule and its correlation on the held-out excerpts alone
    (None without them)."""
    held_out = [e for e in held_out if len(e.tokens)]
    if not held_out or not rule.clauses:
        return rule, None
    both = [*train, *held_out]  # the criterion's excerpts: train, which favours lists, and held-out, which does not
    acts = np.concatenate([np.asarray(e.activations, dtype=float) for e in both])
    general = [c for c in (_fitted(c, train) for c in candidates if _general(c)) if c is not None]
    pool = list(dict.fromkeys([*rule.clauses, *(c for c, _ in general)]))
    pred = {c: np.concatenate([c.matches(e.tokens) for e in both]) for c in pool}
    mask = {c: np.concatenate([replace(c, value=1.0).matches(e.tokens) for e in both]) > 0 for c in pool}

    def objective(clauses: tuple[Clause, ...]) -> float:
        p = np.max([pred[c] for c in clauses], axis=0) if clauses else np.zeros_like(acts)
        return _pearson(acts, p) - DESCRIPTION_COST * len(clauses)

    current = tuple(rule.clauses)
    best = objective(current)
    while True:
        moves: list[tuple[Clause, ...]] = [tuple(x for x in current if x is not c) for c in current]
        for g, _ in general:
            if g in current:
                continue
            covered = [c for c in current if not (mask[c] & ~mask[g]).any()]
            if covered:
                moves.append(tuple(x for x in current if x not in covered) + (g,))
            moves += [tuple(x for x in current if x is not c) + (g,) for c in current]
            if len(current) < max_clauses:
                moves.append(current + (g,))
        scored = [(objective(m), -len(m), k) for k, m in enumerate(moves) if m]
        if not scored:
            break
        value, _, k = max(scored)
        if value <= best + 1e-9:
            break
        current, best = moves[k], value
    order = sorted(current, key=lambda c: (c.kind != "token", -c.value))
    chosen = Rule(tuple(order))
    only = np.concatenate([np.asarray(e.activations, dtype=float) for e in held_out])
    simulated = np.concatenate([chosen.apply(e.tokens) for e in held_out])
    return chosen, (_pearson(only, simulated) if only.std() > 0 and simulated.std() > 0 else None)


# ----------------------------------------------------------------------------------------------------------
# The explainer
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RulesSettings:
    """The rules explainer's bounds on its work per unit (see the module docstring)."""

    max_peaks: int = 12
    window: int = 24
    batch_size: int = 64

    def __post_init__(self) -> None:
        if min(self.max_peaks, self.window, self.batch_size) < 1:
            raise ValueError("max_peaks, window and batch_size must each be at least 1")


class RulesExplainer(Explainer):
    """``explainer="rules"`` (or ``explainer_backend="rules"``): a rule found by `find_rule` on the collection's
    subject model (loaded on first use), recorded on the entry and simulated exactly in stage 03. It sends no
    LLM request; the subject-model work is in each entry's ``rule``."""

    name = "rules"
    title = "rules found by running the subject model (no LLM)"
    settings_type = RulesSettings
    uses_llm = False

    def __init__(self, settings: RulesSettings | None = None) -> None:
        super().__init__(settings)
        self._loaded: tuple[Any, Any, Any] | None = None

    def bind(self, config: Any, llm: Any, meta: Any) -> None:
        if meta is not self.meta:
            self._loaded = None
        super().bind(config, llm, meta)

    def probe(self, layer: int, index: int, negative: bool = False) -> UnitProbe | None:
        """A probe of one unit side on the bound collection's model (None when no collection is bound)."""
        if self.meta is None:
            return None
        if self._loaded is None:
            from nbutils.subject.loading import load_collected

            self._loaded = load_collected(self.meta.model, self.meta.unit, self.meta.site)
        subject, units, site = self._loaded
        tok = subject.tokenizer
        neutral = tok.eos_token_id if tok.eos_token_id is not None else (tok.pad_token_id or 0)
        return UnitProbe(subject.model, site, units, layer, index, negative, self.settings.batch_size, neutral, tok)

    def find(
        self, train: Sequence[Excerpt], layer: int, index: int, negative: bool = False,
        held_out: Sequence[Excerpt] = (),
    ) -> RuleSearch:  # fmt: skip
        """`find_rule` for one unit side of the bound collection (generalised on ``held_out``)."""
        s = self.settings
        return find_rule(train, self.probe(layer, index, negative), s.max_peaks, s.window, held_out=held_out)

    def find_for(self, ctx: ExplainContext) -> RuleSearch:
        """`find` for the unit side of an explainer's context, generalised on its calibration excerpts."""
        return self.find(ctx.train, ctx.record.id.layer, ctx.record.id.index, ctx.negative, ctx.calibration)

    def explain(self, ctx: ExplainContext) -> None:
        rules_entry(ctx.entry, self.find_for(ctx), look=best_look(ctx.train + ctx.calibration))


def rule_record(found: RuleSearch) -> dict[str, Any]:
    """What an entry keeps of a rule search: the rule and what finding it took."""
    return {
        **found.rule.to_dict(), "forward_passes": found.forward_passes, "sequences": found.sequences,
        "train_correlation": found.train_correlation, "note": found.note,
        "held_out_correlation": found.held_out_correlation,
    }  # fmt: skip


def rules_entry(
    entry: ExplanationEntry, found: RuleSearch, calibration: float | None = None,
    look: tuple[LookRule, float] | None = None,
) -> ExplanationEntry:  # fmt: skip
    """A unit side's entry from the rules explainer: the rule's text as its explanation, the rule and its cost
    stored with it, and the rules simulator named as the one that simulates it exactly. ``calibration``: the
    rule's correlation on the calibration excerpts, where triage measured it (the rule's fit on its own train
    excerpts, in-sample, is kept in entry.rule, not shown as one). ``look``: for an attention head, where it
    looks (`nbutils.llm.look_rules.best_look`), written as the rule's last clause and kept with its agreement
    on the excerpts it was chosen on."""
    text = found.rule.describe() + (f"; {look[0].describe()}" if look else "")
    entry.explanation = text
    entry.candidates.append(Candidate(text, text, calibration, found.note))
    entry.rule = rule_record(found)
    if look:
        entry.rule["looks"] = {**look[0].to_dict(), "agreement": look[1]}
    entry.simulator = "rules"
    return entry
