"""Classes of tokens that rules name instead of single tokens (`nbutils.llm.rule_language`: what a unit fires
on; `nbutils.llm.look_rules`: where an attention head looks), each tested on the token's text."""

from __future__ import annotations


def is_blank(token: str) -> bool:
    return not token.strip()


TOKEN_CLASSES = {
    "a word": lambda t: t.strip()[:1].isalpha(),
    "a capitalised word": lambda t: t.strip()[:1].isupper(),
    "a number": lambda t: any(c.isdigit() for c in t),
    "punctuation": lambda t: bool(t.strip()) and not any(c.isalnum() for c in t),
}
"""Classes of tokens a clause may name instead of one token (tested on the token's text)."""


def word_of(token: str) -> str:
    return token.strip().lower()


def in_class(token: str, cls: str | None) -> bool:
    return cls is None or TOKEN_CLASSES[cls](token)
