"""Values checked against declared types, in words a user reads: what `nbutils.run.params` checks command-line
and YAML parameters with, and what an extension's own settings (`nbutils.core.registry`) are checked with."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null (None)"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans", type(None): "nulls"}


def describe(tp: Any, plural: bool = False) -> str:
    """A type in words: ``list[int] | None`` -> "a list of integers or null (None)"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "values" if plural else "any value"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a, plural) for a in args)
    if origin is list:
        return ("lists of " if plural else "a list of ") + describe(args[0], plural=True)
    if origin is dict:
        return ("mappings" if plural else "a mapping") + f" of {describe(args[0], True)} to {describe(args[1], True)}"
    if plural:
        return _PLURALS.get(tp, getattr(tp, "__name__", str(tp)) + "s")
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def conforms(value: Any, tp: Any) -> bool:
    """Whether a parsed value has a type (bool is not an int; an int is a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def shown(value: Any) -> str:
    """A value as an error message names it: ``the string 'abc'``, ``3 (int)``."""
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``options`` ("" when none is close)."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
