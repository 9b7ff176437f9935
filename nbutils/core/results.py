"""Typed results: the JSON codec every stored result goes through, and stage 02's explanation entry.

Stages 02 and 03 keep their results as JSON (in the results store, `nbutils.core.store`, and the jsonl
exports); in memory they are dataclasses. `to_json` writes a dataclass as the JSON structure its fields
describe and `from_json` reads it back, driven by the fields' type hints (``float | None``,
``list[Candidate]``, nested dataclasses), compiled once per type. The JSON written is the format stages wrote
before results were typed, so older runs read back unchanged:

- a field made with `omitted_when` is left out of the JSON while it holds that value (keys older runs did
  not always write, e.g. ``retryable``);
- a field named ``extra`` (a dict) holds the keys a record does not know (written by a newer version, or by a
  researcher's own tool) and writes them back, so reading and rewriting a result loses nothing.

Records with their own shape (a unit's scores, keyed by scorer name) subclass `JsonRecord` and override
``from_dict`` / ``to_dict``; every other record gets both from its fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
_PLAIN = (str, int, float, bool, type(None))
_PLAIN_SET = frozenset(_PLAIN)


def omitted_when(default: Any) -> Any:
    """A dataclass field with this default, left out of the JSON while it holds it."""
    return field(default=default, metadata={"omitted_when": default})


def extra_keys() -> Any:
    """The ``extra`` field: keys a record does not know, kept and written back."""
    return field(default_factory=dict, metadata={"extra": True})


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def to_json(obj: Any) -> Any:
    """``obj`` as plain JSON data (dicts, lists, numbers, strings, None)."""
    t = type(obj)
    if t in _PLAIN_SET:
        return obj
    if t is list or t is tuple:
        return list(obj) if _PLAIN_SET.issuperset(map(type, obj)) else [to_json(x) for x in obj]
    if t is dict:
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, JsonRecord):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return _encoder(t)(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    raise TypeError(f"cannot write {t.__name__} as JSON")


@cache
def _encoder(cls: type) -> Callable[[Any], dict[str, Any]]:
    plan = []
    extra = None
    for f in dataclasses.fields(cls):
        if f.metadata.get("extra"):
            extra = f.name
        else:
            plan.append((f.name, "omitted_when" in f.metadata, f.metadata.get("omitted_when")))

    def encode(obj: Any) -> dict[str, Any]:
        out = {}
        for name, omittable, default in plan:
            value = getattr(obj, name)
            if omittable and value == default:
                continue
            out[name] = to_json(value)
        if extra is not None:
            out.update(getattr(obj, extra))
        return out

    return encode


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def from_json(tp: type[T] | Any, data: Any) -> T:
    """JSON data read as type ``tp`` (a dataclass, ``list[X]``, ``X | None``, ...): what `to_json` wrote."""
    return _decoder(tp)(data)


def _identity(x: Any) -> Any:
    return x


def _to_float(x: Any) -> Any:
    return float(x) if type(x) is int else x


@cache
def _decoder(tp: Any) -> Callable[[Any], Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp in (str, int, bool, type(None), object):
        return _identity
    if tp is float:
        return _to_float
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _decoder(rest[0]) if len(rest) == 1 else _identity
        if inner is _identity:
            return _identity
        return lambda x: None if x is None else inner(x)
    if origin in (list, tuple) or tp in (list, tuple):
        item = args[0] if args else Any
        inner = _decoder(item)
        make = tuple if (origin or tp) is tuple else list
        if inner is _identity:
            return make
        return lambda xs: make(inner(x) for x in xs)
    if origin is dict or tp is dict:
        inner = _decoder(args[1]) if len(args) == 2 else _identity
        if inner is _identity:
            return dict
        return lambda d: {k: inner(v) for k, v in d.items()}
    if isinstance(tp, type) and issubclass(tp, JsonRecord) and "from_dict" in _own_methods(tp):
        return tp.from_dict
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    raise TypeError(f"no JSON decoder for {tp!r}")


def _own_methods(cls: type) -> set[str]:
    """Methods a JsonRecord subclass defines itself (a custom ``from_dict`` replaces the generic one)."""
    return {name for klass in cls.__mro__ if klass not in (JsonRecord, object) for name in vars(klass)}


@cache
def _dataclass_decoder(cls: type) -> Callable[[dict[str, Any]], Any]:
    """The generic reader of a dataclass: each field by its type hint, unknown keys into ``extra``."""
    hints = typing.get_type_hints(cls)
    plan, extra = [], None
    for f in dataclasses.fields(cls):
        if f.metadata.get("extra"):
            extra = f.name
        else:
            plan.append((f.name, _decoder(hints[f.name])))
    known = {name for name, _ in plan}

    def decode(d: dict[str, Any]) -> Any:
        if not isinstance(d, dict):
            raise ValueError(f"a {cls.__name__} is a JSON object, not {type(d).__name__}: {str(d)[:80]}")
        kwargs = {name: dec(d[name]) for name, dec in plan if name in d}
        if extra is not None:
            kwargs[extra] = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"a stored {cls.__name__} lacks a field ({e}): {str(d)[:120]}") from None

    return decode


class JsonRecord:
    """A dataclass stored as JSON: ``from_dict`` reads what ``to_dict`` writes (see the module docstring)."""

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        return _dataclass_decoder(cls)(d)

    def to_dict(self) -> dict[str, Any]:
        return _encoder(type(self))(self)


# ----------------------------------------------------------------------------------------------------------
# Stage 02's entry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Candidate(JsonRecord):
    """One explainer reply: the explanation parsed from it, and (best-of-n) its correlation on the calibration
    excerpts, or why it has none."""

    explanation: str | None
    reply: str
    calibration_score: float | None = None
    reason: str | None = None
    extra: dict[str, Any] = extra_keys()


@dataclass
class BaselineExplanation(JsonRecord):
    """The token-lookup baseline's explanation of a unit side's train excerpts."""

    explanation: str
    method: str = "token lookup"
    extra: dict[str, Any] = extra_keys()


@dataclass
class OutputsShown(JsonRecord):
    """The next tokens a unit side raises and lowers, as the output-aware explainer was shown them."""

    raises: list[str]
    lowers: list[str]


@dataclass
class Triage(JsonRecord):
    """How ``llm_when="rule_below:X"`` chose a unit side's explainer: the rule's correlation on the side's
    calibration excerpts against the threshold (None: undefined, e.g. a rule that predicts a constant)."""

    threshold: float
    rule_calibration: float | None
    sent_to_llm: bool
    extra: dict[str, Any] = extra_keys()


@dataclass
class ExplanationEntry(JsonRecord):
    """A unit side's stage-02 result: its explanation (None with a ``failure``), every candidate reply, the
    excerpt split it was explained from and the token-lookup baseline's explanation."""

    layer: int
    neuron: int
    sign: str
    explanation: str | None = None
    failure: str | None = None
    candidates: list[Candidate] = field(default_factory=list)
    split: str = "nbutils"
    baseline: BaselineExplanation | None = None
    outputs_shown: OutputsShown | None = omitted_when(None)
    retryable: bool | None = omitted_when(None)
    """Whether a rerun could fix the failure (a server's fault); absent where nothing failed that way."""
    rule: dict[str, Any] | None = omitted_when(None)
    """The rules explainer's rule (`nbutils.llm.rule_language.Rule.to_dict`) and what finding it took: the explanation
    itself (``explainer_backend="rules"``, or a unit ``llm_when`` kept on its rule) or what the LLM was shown
    (``explain_with_rules``) or chosen over."""
    triage: Triage | None = omitted_when(None)
    """With ``llm_when="rule_below:X"``: why this side's explanation is the rule's or the LLM's."""
    explainer: str | None = omitted_when(None)
    """The explainer that wrote it (`nbutils.explain.contract.EXPLAINERS`; absent in entries from before)."""
    simulator: str | None = omitted_when(None)
    """The backend that simulates this explanation exactly, whatever the run's simulator is (the rules
    explainer's ``rules``: `nbutils.llm.rule_language.RulesSimulator.for_entry`); None: the run's simulator."""
    extra: dict[str, Any] = extra_keys()

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.layer, self.neuron, self.sign)

    @property
    def negative(self) -> bool:
        return self.sign == "negative"

    @property
    def kept(self) -> Candidate | None:
        """The candidate whose explanation was kept (None without an explanation)."""
        return next((c for c in self.candidates if self.explanation and c.explanation == self.explanation), None)
