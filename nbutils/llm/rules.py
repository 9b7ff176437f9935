"""The rules explainer: explain a unit with rules found in its excerpts by running the subject model, no LLM.

The method follows Neuron to Graph (Foote et al. 2023, arXiv:2305.19911): for each strong activation in a
unit's train excerpts, *prune* the text before it to the shortest context that still activates the unit
(the subject model run on shortened prefixes, batched), then find which tokens of that context *matter*
(each replaced by a neutral token in turn). Where N2G merges the results into a trie of exact token
patterns, this module turns each finding into a clause of a small rule language that also generalises
beyond the tokens seen:

- ``on "tok"``: the token itself fires (the token-lookup baseline's kind of clause);
- ``on the word "w"``: any token that reads w without its spaces and case (" In", "in", "IN");
- ``on a capitalised word`` (and ``a number``, ``punctuation``, ``a word``): a class of tokens;
- ``on any token right after "c"`` / ``on "tok" right after "c"`` / ``on a word right after a token ending
  in "c"``: the nearest earlier non-blank token is c (or ends with it);
- ``inside "(" ... ")"``: after an opener that is not yet closed, optionally more the deeper the nesting;
- ``on a token repeated from earlier in the text``: a non-blank token that occurred before in the excerpt.

Clauses are chosen greedily for the correlation they add on the train excerpts (a clause's value is the
mean activation of the tokens it matches there); a token's prediction is the largest value among the
clauses that match it. The rule *is* its explanation: `Rule.describe` writes it in plain words and
`parse_rule` reads those words back into the same rule, so the simulator (`RulesBackend`) applies exactly
what the text says, from the text alone, like any other simulator.

Cost per unit is bounded: at most ``max_peaks`` peaks, each probed with at most ``window`` pruned prefixes
and ``window - 1`` ablated ones, all in batches of ``batch_size`` (`RuleSearch.forward_passes`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from nbutils.core.records import Excerpt
from nbutils.llm.contract import (
    Backend,
    BackendSpec,
    ExplainRequest,
    Judgements,
    JudgeRequest,
    SimulationFailed,
    SimulationRequest,
    Usage,
)
from nbutils.llm.oracle import two_point_distribution

PAIRS = {"(": ")", "[": "]", "{": "}", '"': '"', "\u201c": "\u201d", "<": ">"}
"""Openers and their closers for ``inside`` clauses (a quote closes itself)."""


def _blank(token: str) -> bool:
    return not token.strip()


TOKEN_CLASSES = {
    "a word": lambda t: t.strip()[:1].isalpha(),
    "a capitalised word": lambda t: t.strip()[:1].isupper(),
    "a number": lambda t: any(c.isdigit() for c in t),
    "punctuation": lambda t: bool(t.strip()) and not any(c.isalnum() for c in t),
}
"""Classes of tokens a clause may name instead of one token (tested on the token's text)."""


def _word(token: str) -> str:
    return token.strip().lower()


def _is(token: str, cls: str | None) -> bool:
    return cls is None or TOKEN_CLASSES[cls](token)


def previous_token(tokens: Sequence[str], i: int) -> str | None:
    """The nearest non-blank token before position i (None at the start)."""
    j = i - 1
    while j >= 0 and _blank(tokens[j]):
        j -= 1
    return tokens[j] if j >= 0 else None


def nesting(tokens: Sequence[str], opener: str, closer: str) -> np.ndarray:
    """Per token, how many ``opener`` characters are open before it within the excerpt (never below 0); a
    self-closing opener (a quote) toggles between 0 and 1."""
    depth, out = 0, np.zeros(len(tokens))
    for i, tok in enumerate(tokens):
        out[i] = depth
        for ch in tok:
            if opener == closer and ch == opener:
                depth = 1 - depth
            elif ch == opener:
                depth += 1
            elif ch == closer:
                depth = max(0, depth - 1)
    return out


@dataclass(frozen=True)
class Clause:
    """One condition on a token and the value it predicts there.

    ``kind``: "token" (``token`` fires), "word" (a token that reads ``token`` stripped and lower-cased), "class" (a token of class ``token``, a key of `TOKEN_CLASSES`),
    "after" (``token``, or a token of class ``token_class`` or any token when both are None, right after
    ``context``, or after a token ending in it with ``ending``, or after any token of class
    ``context_class``), "inside" (after an unclosed ``context``
    opener, closed by ``closer``; ``graded``: value per level of nesting) or "repeat" (a non-blank token seen
    earlier in the excerpt)."""

    kind: str
    value: float
    token: str | None = None
    context: str | None = None
    closer: str | None = None
    graded: bool = False
    token_class: str | None = None
    ending: bool = False
    context_class: str | None = None

    def _after(self, tokens: Sequence[str], i: int) -> bool:
        if not (tokens[i] == self.token if self.token is not None else _is(tokens[i], self.token_class)):
            return False
        before = previous_token(tokens, i)
        if before is None:
            return False
        if self.context_class is not None:
            return _is(before, self.context_class)
        return before.strip().endswith(self.context.strip()) if self.ending else before == self.context

    def matches(self, tokens: Sequence[str]) -> np.ndarray:
        """Per token of an excerpt, the clause's prediction (0 where it does not match)."""
        n = len(tokens)
        if self.kind == "token":
            hit = np.array([t == self.token for t in tokens], dtype=float)
        elif self.kind == "word":
            hit = np.array([_word(t) == self.token for t in tokens], dtype=float)
        elif self.kind == "class":
            hit = np.array([_is(t, self.token) for t in tokens], dtype=float)
        elif self.kind == "after":
            hit = np.array([self._after(tokens, i) for i in range(n)], dtype=float)
        elif self.kind == "inside":
            depth = nesting(tokens, self.context or "", self.closer or "")
            hit = depth if self.graded else (depth > 0).astype(float)
        elif self.kind == "repeat":
            seen: set[str] = set()
            hit = np.zeros(n)
            for i, t in enumerate(tokens):
                key = t.strip().lower()
                hit[i] = float(bool(key) and key in seen)
                seen.add(key)
        else:
            raise ValueError(f"unknown clause kind {self.kind!r}")
        return hit * self.value

    def describe(self) -> str:
        v = _number(self.value)
        if self.kind == "token":
            return f"on {json.dumps(self.token)} ({v})"
        if self.kind == "word":
            return f"on the word {json.dumps(self.token)} ({v})"
        if self.kind == "class":
            return f"on {self.token} ({v})"
        if self.kind == "after":
            what = json.dumps(self.token) if self.token is not None else self.token_class or "any token"
            where = f"a token ending in {json.dumps(self.context)}" if self.ending else json.dumps(self.context)
            where = self.context_class or where
            return f"on {what} right after {where} ({v})"
        if self.kind == "inside":
            span = f"inside {json.dumps(self.context)} ... {json.dumps(self.closer)}"
            return f"{span}, more the deeper ({v} per level)" if self.graded else f"{span} ({v})"
        return f"on a token repeated from earlier in the text ({v})"


def _number(value: float) -> str:
    return f"{value:.3g}"


def _rounded(value: float) -> float:
    """A value as its description prints it, so a rule and its words are the same rule."""
    return float(_number(value))


@dataclass(frozen=True)
class Rule:
    """A unit's rule: its clauses; a token's predicted value is the largest among the clauses that match."""

    clauses: tuple[Clause, ...] = ()

    def apply(self, tokens: Sequence[str]) -> np.ndarray:
        """Predicted activation per token of an excerpt."""
        if not self.clauses or not len(tokens):
            return np.zeros(len(tokens))
        return np.max([c.matches(tokens) for c in self.clauses], axis=0).clip(min=0.0)

    @property
    def top(self) -> float:
        """The value the simulator maps to label 10: the largest clause value (three levels of a graded one)."""
        return max((c.value * (3 if c.graded else 1) for c in self.clauses), default=0.0)

    def describe(self) -> str:
        """The rule in plain words (and exactly: `parse_rule` reads it back)."""
        if not self.clauses:
            return "fires on nothing the rules explainer could find"
        return "fires " + "; ".join(c.describe() for c in self.clauses)

    def to_dict(self) -> dict[str, Any]:
        return {"clauses": [{k: v for k, v in c.__dict__.items() if v not in (None, False)} for c in self.clauses]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        return cls(tuple(Clause(**c) for c in data.get("clauses", ())))


_JSON = r'"(?:[^"\\]|\\.)*"'
_NUM = r"([-+0-9.e]+)"
_CLASSES = "|".join(TOKEN_CLASSES)
_PATTERNS = [
    ("token", re.compile(rf"on ({_JSON}) \({_NUM}\)$")),
    ("word", re.compile(rf"on the word ({_JSON}) \({_NUM}\)$")),
    ("class", re.compile(rf"on ({_CLASSES}) \({_NUM}\)$")),
    (
        "after",
        re.compile(
            rf"on (any token|{_CLASSES}|{_JSON}) right after (?:(a token ending in )?({_JSON})|({_CLASSES})) \({_NUM}\)$"
        ),
    ),
    ("inside", re.compile(rf"inside ({_JSON}) \.\.\. ({_JSON})(, more the deeper)? \({_NUM}( per level)?\)$")),
    ("repeat", re.compile(rf"on a token repeated from earlier in the text \({_NUM}\)$")),
]


def parse_rule(text: str) -> Rule | None:
    """The rule a `Rule.describe` text states, or None for text that is not one (an LLM's explanation)."""
    text = text.strip()
    if text == Rule().describe():
        return Rule()
    if not text.startswith("fires "):
        return None
    clauses = []
    for part in _split(text[len("fires ") :]):
        clause = _parse_clause(part)
        if clause is None:
            return None
        clauses.append(clause)
    return Rule(tuple(clauses))


def _split(text: str) -> list[str]:
    """Split on "; " outside JSON strings."""
    parts, start, i, quoted = [], 0, 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted:
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and text.startswith("; ", i):
            parts.append(text[start:i])
            start = i + 2
            i += 1
        i += 1
    return parts + [text[start:]]


def _parse_clause(part: str) -> Clause | None:
    for kind, pattern in _PATTERNS:
        m = pattern.match(part)
        if m is None:
            continue
        g = m.groups()
        try:
            if kind == "token":
                return Clause("token", float(g[1]), token=json.loads(g[0]))
            if kind == "word":
                return Clause("word", float(g[1]), token=json.loads(g[0]))
            if kind == "class":
                return Clause("class", float(g[1]), token=g[0])
            if kind == "after":
                token = json.loads(g[0]) if g[0].startswith('"') else None
                token_class = g[0] if g[0] in TOKEN_CLASSES else None
                context = json.loads(g[2]) if g[2] is not None else None
                return Clause("after", float(g[4]), token=token, context=context, token_class=token_class,
                              ending=g[1] is not None, context_class=g[3])  # fmt: skip
            if kind == "inside":
                graded = g[2] is not None
                if graded != (g[4] is not None):
                    return None
                return Clause("inside", float(g[3]), context=json.loads(g[0]), closer=json.loads(g[1]), graded=graded)
            return Clause("repeat", float(g[0]))
        except ValueError:
            return None
    return None


# ----------------------------------------------------------------------------------------------------------
# Finding a rule
# ----------------------------------------------------------------------------------------------------------


class UnitProbe:
    """One unit's value at the last token of token-id sequences, from the subject model (batched, right
    padded: a causal model's earlier positions never see the padding). Counts what it runs."""

    def __init__(
        self, model: Any, site: Any, units: Any, layer: int, index: int, negative: bool = False,
        batch_size: int = 64, neutral_id: int | None = None,
    ) -> None:  # fmt: skip
        self.model, self.site, self.units = model, site, units
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


def find_rule(
    train: Sequence[Excerpt], probe: UnitProbe | None, max_peaks: int = 12, window: int = 24, keep: float = 0.5,
    max_clauses: int = 12, min_gain: float = 0.005,
) -> RuleSearch:  # fmt: skip
    """A rule for one unit side from its train excerpts (activations as collected, the side's sign applied).

    ``probe`` runs the subject model for pruning; without one (or without token ids) only token clauses are
    considered. ``keep``: the fraction of a peak's activation a pruned context must keep."""
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
    candidates = _candidates(train, findings, top)
    rule, r = _select(train, candidates, max_clauses, min_gain)
    work = (probe.forward_passes - before[0], probe.sequences - before[1]) if probe is not None else (0, 0)
    return RuleSearch(rule, findings, work[0], work[1], r, note)


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
    out += [Clause("word", 0.0, token=_word(c.token)) for c in out if _word(c.token or "")]
    out += [Clause("class", 0.0, token=c) for c in TOKEN_CLASSES]
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
            for before in (c for c in TOKEN_CLASSES if _is(key, c)):  # after any token of the key's class
                out += [Clause("after", 0.0, token=token, context_class=before)]
                out += [Clause("after", 0.0, token_class=c, context_class=before) for c in (None, *TOKEN_CLASSES)]
        for ch in key.strip():
            if ch in PAIRS:
                out += [Clause("inside", 0.0, context=ch, closer=PAIRS[ch], graded=g) for g in (False, True)]
    return list(dict.fromkeys(out))


def _fitted(clause: Clause, train: Sequence[Excerpt]) -> tuple[Clause, np.ndarray] | None:
    """The clause with its value (mean activation where it matches; per level for a graded one) and its
    match pattern over the concatenated train tokens; None if it matches nothing."""
    unit = replace(clause, value=1.0)
    hit = np.concatenate([unit.matches(e.tokens) for e in train])
    acts = np.concatenate([np.asarray(e.activations, dtype=float) for e in train])
    on = hit > 0
    if not on.any():
        return None
    value = _rounded(float(np.sum(acts[on]) / np.sum(hit[on])))
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


# ----------------------------------------------------------------------------------------------------------
# The backend: explains from a unit's records, simulates and judges a rule's text exactly
# ----------------------------------------------------------------------------------------------------------


class RulesBackend(Backend):
    """``explainer_backend="rules"``: explains a unit by `find_rule` on the collection's subject model (bound
    by the stage with `bind_collection`, loaded on first use), and simulates and judges any explanation that
    is a rule's text (`parse_rule`) exactly; other text it refuses with `SimulationFailed`. It sends no LLM
    request, so its usage stays at zero; the subject-model work is in each entry's ``rule``."""

    name = "rules"
    context = 1 << 20

    def __init__(self, max_peaks: int = 12, window: int = 24, batch_size: int = 64) -> None:
        self.usage = Usage()
        self.model_name = "rules"
        self.max_peaks, self.window, self.batch_size = max_peaks, window, batch_size
        self._meta: Any = None
        self._loaded: tuple[Any, Any, Any] | None = None

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> RulesBackend:
        known = {"max_peaks", "window", "batch_size"}
        return cls(**{k: v for k, v in spec.options.items() if k in known})

    def bind_collection(self, meta: Any) -> None:
        """The collection whose subject model and unit type pruning runs (its ``collection.json``)."""
        if self._meta is not meta:
            self._meta, self._loaded = meta, None

    def probe(self, layer: int, index: int, negative: bool = False) -> UnitProbe | None:
        """A probe of one unit side on the bound collection's model (None when no collection is bound)."""
        if self._meta is None:
            return None
        if self._loaded is None:
            from nbutils.subject.loading import load_collected

            self._loaded = load_collected(self._meta.model, self._meta.unit, self._meta.site)
        subject, units, site = self._loaded
        tok = subject.tokenizer
        neutral = tok.eos_token_id if tok.eos_token_id is not None else (tok.pad_token_id or 0)
        return UnitProbe(subject.model, site, units, layer, index, negative, self.batch_size, neutral)

    def find(self, train: Sequence[Excerpt], layer: int, index: int, negative: bool = False) -> RuleSearch:
        """`find_rule` for one unit side of the bound collection."""
        return find_rule(train, self.probe(layer, index, negative), self.max_peaks, self.window)

    def explain(self, request: ExplainRequest) -> list[str]:
        """From shown excerpts alone (no token ids, no model): a rule of token and class clauses."""
        train = [Excerpt(list(e.tokens), np.asarray(e.values, dtype=float)) for e in request.excerpts]
        return [find_rule(train, None).rule.describe()]

    def _rule(self, explanation: str) -> Rule:
        rule = parse_rule(explanation)
        if rule is None:
            raise SimulationFailed(f"the rules simulator reads only a rule's text, not {explanation[:80]!r}")
        return rule

    def simulate(self, request: SimulationRequest) -> list[np.ndarray]:
        rule = self._rule(request.explanation)
        scale = 10.0 / rule.top if rule.top > 0 else 0.0
        return [two_point_distribution(np.clip(rule.apply(t) * scale, 0, 10)) for t in request.excerpts]

    def judge(self, request: JudgeRequest) -> Judgements:
        """P(yes): the largest predicted value of an item's tokens (detection) or the smallest of its marked
        ones (fuzzing), over the rule's largest clause value (a graded clause's first level already says yes)."""
        rule = self._rule(request.explanation)
        top = max((c.value for c in rule.clauses), default=0.0)
        out = []
        for item in request.items:
            pred = rule.apply(item.tokens) / top if top > 0 else np.zeros(len(item.tokens))
            if item.marked is not None:
                marked = [p for p, m in zip(pred, item.marked) if m]
                out.append(min(marked) if marked else 0.0)
            else:
                out.append(float(pred.max()) if len(pred) else 0.0)
        return Judgements(np.clip(np.asarray(out, dtype=float), 0, 1))


def rules_simulator(explanation: str | None) -> RulesBackend | None:
    """The exact simulator for an explanation that is a rule's text (None for any other text): stage 03 and
    ``Unit.score`` score a rule with it whatever the run's simulator is."""
    return RulesBackend() if explanation and parse_rule(explanation) is not None else None
