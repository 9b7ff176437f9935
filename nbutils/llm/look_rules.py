"""Rules of where an attention head looks, in plain words and read back exactly.

A look rule names, for every token of an excerpt, the position a head attends to most: the token itself or an
earlier one (what the collection keeps per token, `nbutils.core.records.Looks`). The kinds are the ones found
in real models (Olsson et al. 2022, "In-context learning and induction heads"; Xiao et al. 2024 on attention
sinks): the previous token, the first token, the token itself, an earlier copy of the current token, the token
right after such a copy (induction), and the nearest earlier token of a class (punctuation, a number, ...).
Where the target does not exist (no earlier copy; no earlier token of the class) the rule says where the head
looks instead (``else the first token``), since such heads park their attention there.

Written as a clause of a rule (``attends to the previous token``), after the clauses that predict the head's
value (`nbutils.llm.rule_language`); `LookRule.describe` and `parse_look` are exact inverses, and
`LookRule.sources` simulates a rule exactly. `agreement` is what the ``looks`` scorer reports.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nbutils.llm.token_classes import TOKEN_CLASSES, is_blank

TARGETS = {
    "previous": "the previous token",
    "first": "the first token",
    "self": "the current token itself",
    "copy": "an earlier copy of the current token",
    "induction": "the token after an earlier copy of the current token",
    "class": "the nearest earlier {cls}",
}
"""Where a head may look, and how each is written (``class`` with one of `TOKEN_CLASSES`)."""
CONDITIONAL = ("copy", "induction", "class")
"""Targets that may not exist for a token; the rule's ``otherwise`` says where the head looks then."""
FALLBACKS = ("first", "self", "previous")


@dataclass(frozen=True)
class LookRule:
    """Where a head looks from each token: ``target`` (a key of `TARGETS`), its token class where the target is
    ``class``, and ``otherwise`` (a key of `FALLBACKS`) where a conditional target does not exist."""

    target: str
    cls: str | None = None
    otherwise: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS or (self.target == "class") != (self.cls in TOKEN_CLASSES):
            raise ValueError(f"not a look rule: {self}")
        if (self.otherwise is not None) != (self.target in CONDITIONAL) or self.otherwise not in (None, *FALLBACKS):
            raise ValueError(f"a look rule's fallback must be one of {FALLBACKS}, for a conditional target only")

    def describe(self) -> str:
        text = "attends to " + TARGETS[self.target].format(cls=self.cls)
        return text + (f", else {TARGETS[self.otherwise]}" if self.otherwise else "")

    def sources(self, tokens: Sequence[str], ids: Sequence[int] | None = None) -> np.ndarray:
        """The position the rule says each token attends to (exact; token ids decide copies where given)."""
        keys = list(ids) if ids is not None and len(ids) == len(tokens) else list(tokens)
        n = len(tokens)
        out = np.zeros(n, dtype=np.int64)
        last_seen: dict[object, int] = {}
        last_in_class = -1
        for i in range(n):
            fixed = {"previous": max(i - 1, 0), "first": 0, "self": i}
            if self.target in fixed:
                out[i] = fixed[self.target]
            else:
                earlier = last_seen.get(keys[i], -1)
                found = {"copy": earlier, "induction": earlier + 1 if earlier >= 0 else -1, "class": last_in_class}
                at = found[self.target]
                out[i] = at if at >= 0 else {"previous": max(i - 1, 0), "first": 0, "self": i}[self.otherwise]
            last_seen[keys[i]] = i
            if self.cls is not None and not is_blank(tokens[i]) and TOKEN_CLASSES[self.cls](tokens[i]):
                last_in_class = i
        return out

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def candidates() -> list[LookRule]:
    """Every look rule, simplest first (unconditional targets, then each conditional one with each fallback)."""
    rules = [LookRule(t) for t in ("previous", "first", "self")]
    for target in ("copy", "induction"):
        rules += [LookRule(target, otherwise=f) for f in FALLBACKS]
    rules += [LookRule("class", cls, f) for cls in TOKEN_CLASSES for f in FALLBACKS]
    return rules


_PATTERN = re.compile(
    r"attends to (?P<target>.+?)(?:, else (?P<otherwise>the first token|the current token itself|the previous token))?$"
)


def parse_look(text: str) -> LookRule | None:
    """The look rule an ``attends to ...`` clause states (anywhere among a rule's "; "-separated clauses), or
    None where the text states none."""
    for part in text.split("; "):
        m = _PATTERN.fullmatch(part.strip().rstrip("."))
        if m is None:
            continue
        named = {v: k for k, v in TARGETS.items() if k != "class"}
        otherwise = {TARGETS[k]: k for k in FALLBACKS}.get(m["otherwise"] or "")
        target = m["target"]
        try:
            if target in named:
                return LookRule(named[target], otherwise=otherwise)
            if target.startswith("the nearest earlier "):
                return LookRule("class", target[len("the nearest earlier ") :], otherwise)
        except ValueError:
            return None
    return None


def agreement(rule: LookRule, excerpts: Sequence[object], weighted: bool = True) -> float | None:
    """The share of tokens (from the second on: the first can only attend to itself) whose most-attended
    position the rule names; ``weighted``: each token counted by the head's value there (the share of what the
    head writes whose source the rule names). Excerpts without `Looks` are skipped; None when none has any."""
    hit = total = 0.0
    for e in excerpts:
        looks = getattr(e, "looks", None)
        if looks is None or len(e.tokens) < 2:
            continue
        predicted = rule.sources(e.tokens, e.token_ids or None)[1:]
        actual = np.asarray(looks.source)[1:]
        w = np.clip(np.asarray(e.activations, dtype=np.float64)[1:], 0, None) if weighted else np.ones(len(actual))
        hit += float(w[predicted == actual].sum())
        total += float(w.sum())
    return hit / total if total > 0 else None


def best_look(excerpts: Sequence[object], margin: float = 0.02) -> tuple[LookRule, float] | None:
    """The look rule with the largest weighted `agreement` on ``excerpts``; a later (more conditional) candidate
    replaces an earlier one only when it agrees by more than ``margin`` (None without looks)."""
    best: tuple[LookRule, float] | None = None
    for rule in candidates():
        score = agreement(rule, excerpts)
        if score is None:
            return None
        if best is None or score > best[1] + margin:
            best = (rule, score)
    return best
