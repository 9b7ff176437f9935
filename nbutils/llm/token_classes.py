"""Classes of tokens that rules name instead of listing tokens (`nbutils.llm.rule_language`: what a unit fires
on; `nbutils.llm.look_rules`: where an attention head looks), each named in the words a rule is written in.

Two kinds:

- `TOKEN_CLASSES`, tested on the token's text alone: words, capitalisation (capitalised, all capitals, lower
  case), numbers, punctuation and its kinds (brackets, quote marks, commas, sentence ends), line breaks and
  white space;
- `POSITION_CLASSES`, tested on the token in its excerpt: the start of a line, a token repeated from earlier
  in the excerpt, and the first tokens of the excerpt.

`member` tests either kind; `CLASSES` lists every name, the simpler (text) classes first, which is the order
a search prefers on a tie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def is_blank(token: str) -> bool:
    return not token.strip()


def _all_capitals(t: str) -> bool:
    s = t.strip()
    return len(s) >= 2 and s.isalpha() and s.isupper()


def _lower_case(t: str) -> bool:
    s = t.strip()
    return s.isalpha() and s.islower()


TOKEN_CLASSES: dict[str, Callable[[str], bool]] = {
    "a word": lambda t: t.strip()[:1].isalpha(),
    "a capitalised word": lambda t: t.strip()[:1].isupper(),
    "a number": lambda t: any(c.isdigit() for c in t),
    "punctuation": lambda t: bool(t.strip()) and not any(c.isalnum() for c in t),
    "a word in all capitals": _all_capitals,
    "a lower-case word": _lower_case,
    "an opening bracket": lambda t: any(c in "([{" for c in t),
    "a closing bracket": lambda t: any(c in ")]}" for c in t),
    "a quote mark": lambda t: any(c in "\"'`\u201c\u201d\u2018\u2019" for c in t),
    "a comma": lambda t: t.strip() == ",",
    "sentence-ending punctuation": lambda t: t.strip() in (".", "!", "?", "...", "?!", "!?"),
    "a line break": lambda t: "\n" in t,
    "white space": lambda t: t != "" and not t.strip(),
}
"""Classes tested on a token's text."""


def word_of(token: str) -> str:
    return token.strip().lower()


def repeated(tokens: Sequence[str], i: int) -> bool:
    """Whether token ``i`` is non-blank and occurred earlier in the excerpt (case and spaces ignored)."""
    key = word_of(tokens[i])
    return bool(key) and any(word_of(t) == key for t in tokens[:i])


REPEATED = "a token repeated from earlier in the text"
LINE_START = "a token at the start of a line"
FIRST_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _first(n: int) -> Callable[[Sequence[str], int], bool]:
    return lambda tokens, i: i < n


def line_start(tokens: Sequence[str], i: int) -> bool:
    """Whether token ``i`` is the first non-blank token of a line: a line break lies between it and the
    nearest earlier non-blank token (in blank tokens between them, or at the end of that token)."""
    if is_blank(tokens[i]):
        return False
    j = i - 1
    while j >= 0 and is_blank(tokens[j]):
        if "\n" in tokens[j]:
            return True
        j -= 1
    return j >= 0 and tokens[j].rstrip(" \t").endswith("\n")


POSITION_CLASSES: dict[str, Callable[[Sequence[str], int], bool]] = {
    LINE_START: line_start,
    REPEATED: repeated,
    **{("the first token" if n == 1 else f"one of the first {n} tokens"): _first(n) for n in FIRST_TOKENS},
}
"""Classes tested on a token in its excerpt (``REPEATED`` is also the ``repeat`` clause of the rule language)."""

CLASSES = (*TOKEN_CLASSES, *POSITION_CLASSES)


def member(tokens: Sequence[str], i: int, cls: str | None) -> bool:
    """Whether token ``i`` of an excerpt is of class ``cls`` (any class: `TOKEN_CLASSES`, `POSITION_CLASSES`;
    None: every token)."""
    if cls is None:
        return True
    test = TOKEN_CLASSES.get(cls)
    return test(tokens[i]) if test is not None else POSITION_CLASSES[cls](tokens, i)


def in_class(token: str, cls: str | None) -> bool:
    """Whether a token's text is of a text class (`TOKEN_CLASSES`; None: every token)."""
    return cls is None or TOKEN_CLASSES[cls](token)
