"""The rule language of the rules explainer (`nbutils.explain.rules`): clauses on tokens and their context,
written in plain words and read back exactly, and the backend that simulates and judges a rule exactly.

A rule is a list of clauses, each a condition on a token and the value it predicts there:

- ``on "tok"``: the token itself fires (the token-lookup baseline's kind of clause);
- ``on the word "w"``: any token that reads w without its spaces and case (" In", "in", "IN");
- ``on a capitalised word`` (``a word in all capitals``, ``a lower-case word``, ``a number``, ``a closing
  bracket``, ``sentence-ending punctuation``, ``a line break``, ...; ``a token at the start of a line``, ``one
  of the first 4 tokens``): a class of tokens, by its text or its place (`nbutils.llm.token_classes`);
- ``on any token right after "c"`` / ``on "tok" right after "c"`` / ``on a word right after a token ending
  in "c"`` / ``on any token right after a word in all capitals``: the nearest earlier non-blank token is c
  (or ends with it, or is of that class);
- ``on a token the model embeds like " Monday": one of [" Monday", " Tuesday", ...]``: a set of tokens the
  subject model treats alike (its input embeddings' nearest neighbours of a token the unit fires on), named by
  that token, its members listed so that the clause simulates without the model;
- ``inside "(" ... ")"``: after an opener that is not yet closed, optionally more the deeper the nesting;
- ``on a token repeated from earlier in the text``: a non-blank token that occurred before in the excerpt.

An attention head's rule may end with where the head looks (``attends to the previous token``,
`nbutils.llm.look_rules`); that clause predicts no value and is read by the ``looks`` scorer.

A token's prediction is the largest value among the clauses that match it. `Rule.describe` writes a rule in
plain words and `parse_rule` reads those words back into the same rule. `RulesSimulator` simulates and judges
a rule exactly: stage 03 uses it for every explanation a rules explainer wrote (the entry records its rule
and names this simulator: `nbutils.core.results.ExplanationEntry.simulator`), and ``simulator_backend="rules"``
uses it for any explanation written in the rule language.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
from nbutils.llm.look_rules import parse_look
from nbutils.llm.oracle import two_point_distribution
from nbutils.llm.token_classes import CLASSES, is_blank, member, word_of

PAIRS = {"(": ")", "[": "]", "{": "}", '"': '"', "\u201c": "\u201d", "<": ">"}
"""Openers and their closers for ``inside`` clauses (a quote closes itself)."""


def previous_index(tokens: Sequence[str], i: int) -> int | None:
    """The position of the nearest non-blank token before position i (None at the start)."""
    j = i - 1
    while j >= 0 and is_blank(tokens[j]):
        j -= 1
    return j if j >= 0 else None


def previous_token(tokens: Sequence[str], i: int) -> str | None:
    """The nearest non-blank token before position i (None at the start)."""
    j = previous_index(tokens, i)
    return tokens[j] if j is not None else None


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

    ``kind``: "token" (``token`` fires), "word" (a token that reads ``token`` stripped and lower-cased),
    "class" (a token of class ``token``, one of `nbutils.llm.token_classes.CLASSES`: its text's class or its
    place in the excerpt), "after" (``token``, or a token of class ``token_class`` or any token when both are
    None, right after ``context``, or after a token ending in it with ``ending``, or after any token of class
    ``context_class``), "inside" (after an unclosed ``context`` opener, closed by ``closer``; ``graded``: value
    per level of nesting), "repeat" (a non-blank token seen earlier in the excerpt) or "group" (one of
    ``members``, tokens the subject model embeds like ``token``)."""

    kind: str
    value: float
    token: str | None = None
    context: str | None = None
    closer: str | None = None
    graded: bool = False
    token_class: str | None = None
    ending: bool = False
    context_class: str | None = None
    members: tuple[str, ...] | None = None
    """For "group": the tokens of the group (exact simulation needs no model)."""

    def _after(self, tokens: Sequence[str], i: int) -> bool:
        if not (tokens[i] == self.token if self.token is not None else member(tokens, i, self.token_class)):
            return False
        j = previous_index(tokens, i)
        if j is None:
            return False
        if self.context_class is not None:
            return member(tokens, j, self.context_class)
        before = tokens[j]
        return before.strip().endswith(self.context.strip()) if self.ending else before == self.context

    def matches(self, tokens: Sequence[str]) -> np.ndarray:
        """Per token of an excerpt, the clause's prediction (0 where it does not match)."""
        n = len(tokens)
        if self.kind == "token":
            hit = np.array([t == self.token for t in tokens], dtype=float)
        elif self.kind == "word":
            hit = np.array([word_of(t) == self.token for t in tokens], dtype=float)
        elif self.kind == "class":
            hit = np.array([member(tokens, i, self.token) for i in range(n)], dtype=float)
        elif self.kind == "after":
            hit = np.array([self._after(tokens, i) for i in range(n)], dtype=float)
        elif self.kind == "inside":
            depth = nesting(tokens, self.context or "", self.closer or "")
            hit = depth if self.graded else (depth > 0).astype(float)
        elif self.kind == "group":
            members = set(self.members or ())
            hit = np.array([t in members for t in tokens], dtype=float)
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
        if self.kind == "group":
            listed = json.dumps(list(self.members or ()), ensure_ascii=False)
            return f"on a token the model embeds like {json.dumps(self.token)}: one of {listed} ({v})"
        if self.kind == "inside":
            span = f"inside {json.dumps(self.context)} ... {json.dumps(self.closer)}"
            return f"{span}, more the deeper ({v} per level)" if self.graded else f"{span} ({v})"
        return f"on a token repeated from earlier in the text ({v})"


def _number(value: float) -> str:
    return f"{value:.3g}"


def rounded(value: float) -> float:
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
        made = [{**c, **({"members": tuple(c["members"])} if "members" in c else {})} for c in data.get("clauses", ())]
        return cls(tuple(Clause(**c) for c in made))


_JSON = r'"(?:[^"\\]|\\.)*"'
_NUM = r"([-+0-9.e]+)"
_CLASSES = "|".join(re.escape(c) for c in sorted(CLASSES, key=len, reverse=True))
_PATTERNS = [
    ("token", re.compile(rf"on ({_JSON}) \({_NUM}\)$")),
    ("word", re.compile(rf"on the word ({_JSON}) \({_NUM}\)$")),
    ("repeat", re.compile(rf"on a token repeated from earlier in the text \({_NUM}\)$")),
    ("group", re.compile(rf"on a token the model embeds like ({_JSON}): one of (\[.*\]) \({_NUM}\)$")),
    ("class", re.compile(rf"on ({_CLASSES}) \({_NUM}\)$")),
    (
        "after",
        re.compile(
            rf"on (any token|{_CLASSES}|{_JSON}) right after (?:(a token ending in )?({_JSON})|({_CLASSES})) \({_NUM}\)$"
        ),
    ),
    ("inside", re.compile(rf"inside ({_JSON}) \.\.\. ({_JSON})(, more the deeper)? \({_NUM}( per level)?\)$")),
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
        if part.startswith("attends to "):  # where a head looks (nbutils.llm.look_rules): not an activation
            continue
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
            if kind == "group":
                members = json.loads(g[1])
                if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                    return None
                return Clause("group", float(g[2]), token=json.loads(g[0]), members=tuple(members))
            if kind == "after":
                token = json.loads(g[0]) if g[0].startswith('"') else None
                token_class = g[0] if g[0] in CLASSES else None
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
# The exact simulator
# ----------------------------------------------------------------------------------------------------------


class RulesSimulator(Backend):
    """Simulates and judges a rule exactly: the rule it was made with (`for_entry`: the one a rules
    explainer recorded), or else the rule an explanation's text states (`parse_rule`; other text is refused
    with `SimulationFailed`). It sends no LLM request, so its usage stays at zero. It writes no explanations:
    the rules explainer (``explainer="rules"``) finds them."""

    name = "rules"
    context = 1 << 20

    def __init__(self, rule: Rule | None = None) -> None:
        self.usage = Usage()
        self.model_name = "rules"
        self.rule = rule

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> RulesSimulator:
        return cls()

    @classmethod
    def for_entry(cls, entry: Any) -> RulesSimulator:
        """The simulator of a stage-02 entry's recorded rule (`nbutils.core.results.ExplanationEntry.rule`)."""
        return cls(Rule.from_dict(entry.rule))

    def explain(self, request: ExplainRequest) -> list[str]:
        raise SimulationFailed(
            "the rules simulator writes no explanations; the rules explainer does (explainer=rules, or "
            "explainer_backend=rules)"
        )

    def _rule(self, explanation: str) -> Rule:
        rule = self.rule if self.rule is not None else parse_rule(explanation)
        if rule is None:
            raise SimulationFailed(f"the rules simulator reads only a rule's text, not {explanation[:80]!r}")
        return rule

    def simulate(self, request: SimulationRequest) -> list[np.ndarray]:
        rule = self._rule(request.explanation)
        scale = 10.0 / rule.top if rule.top > 0 else 0.0
        return [two_point_distribution(np.clip(rule.apply(t) * scale, 0, 10)) for t in request.excerpts]

    def judge(self, request: JudgeRequest) -> Judgements:
        """P(yes): the largest predicted value of an item's tokens (detection) or the smallest of its marked
        ones (fuzzing), over the rule's largest clause value (a graded clause's first level already says yes);
        for a head's pair (its source and token marked), the token's predicted value where the rule's look
        clause names that source, else 0."""
        rule = self._rule(request.explanation)
        top = max((c.value for c in rule.clauses), default=0.0)
        look = parse_look(request.explanation) if request.task == "pairs" else None
        out = []
        for item in request.items:
            pred = rule.apply(item.tokens) / top if top > 0 else np.zeros(len(item.tokens))
            if request.task == "pairs" and item.marked is not None:  # (source, token): the token's value, where
                marks = [i for i, m in enumerate(item.marked) if m]  # the look rule names that source
                src, token = marks[0], marks[-1]
                fits = look is None or int(look.sources(item.tokens)[token]) == src
                out.append(float(pred[token]) if fits else 0.0)
            elif item.marked is not None:
                marked = [p for p, m in zip(pred, item.marked) if m]
                out.append(min(marked) if marked else 0.0)
            else:
                out.append(float(pred.max()) if len(pred) else 0.0)
        return Judgements(np.clip(np.asarray(out, dtype=float), 0, 1))
