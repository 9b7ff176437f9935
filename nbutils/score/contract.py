"""The contract every scorer keeps, the registry of scorers, and the typed results of stage 03.

A scorer judges one unit side's explanation, and the token-lookup baseline's, on excerpts the explainer
never saw (`UnitContext`). It declares what it returns: ``result_type`` (a dataclass with its `Metric`s,
e.g. `nbutils.score.simulation.SimulationResult`) and ``details_type`` (what it saves to audit a score, e.g.
the simulated values per token). A unit side's scores are a `UnitScores`, its details a `UnitDetails`, both
written and read back through the typed JSON codec (`nbutils.core.results`) in this shape (format 2):

    a result:      {"layer", "neuron", "sign", "explanation", "format": 2,
                    "baseline": {"explanation": ..., <scorer name>: {...}, ...},
                    <scorer name>: {...its result...}, ..., "failure"?, "retryable"?}
    its details:   {"layer", "neuron", "sign", "explanation", <scorer name>: <its details>, ...}

both kept in the stage's results store (`nbutils.core.store`; before it, ``neurons/`` and ``simulations/``
files), with every `Column`'s number indexed (`result_numbers`).

A scorer also declares the numbers views show (`Column`: which attributes lead to the `Metric`, a label,
notes on weak values), so the viewer, the static page and the report show any registered scorer without being
edited. Adding a scorer is one module with a `Scorer` subclass, its result type, and one line in `SCORERS`
(or a call to `register_scorer`). Results and simulation files of format 1 (written before scorers had names)
are upgraded as they are read (`upgrade_result`, `upgrade_simulation`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nbutils.core.records import Excerpt, UnitRecord
from nbutils.core.registry import Registry, settings_or_defaults
from nbutils.core.results import ExplanationEntry, JsonRecord, from_json, to_json
from nbutils.llm.contract import Backend
from nbutils.score.metrics import Metric

RESULTS_FORMAT = 2


@dataclass(frozen=True)
class ScoreSettings:
    """Stage 03's settings that scorers read."""

    n_boot: int = 1000
    seed: int = 0
    max_prompt_tokens: int | None = None
    per_band: int = 2
    judge_per_class: int = 10
    split: str = "nbutils"
    judge_items_per_request: int = 1
    keep_distributions: bool = False
    """Store each token's label distribution beside its expected value (the simulation scorer's details)."""


@dataclass
class UnitContext:
    """What a scorer gets for one unit side: its record, its stage-02 entry, its excerpt sets
    (`nbutils.core.records.split_excerpts`), the token-lookup table of its train excerpts, and the settings."""

    record: UnitRecord
    entry: ExplanationEntry
    splits: dict[str, list[Excerpt]]
    table: dict[str, float]
    settings: ScoreSettings
    subject: Any = None
    """The subject model run with a unit's values set (`nbutils.subject.intervene.UnitIntervention`), for
    scorers with ``needs_subject``; None otherwise."""
    done: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """What the scorers that ran before on this unit side returned, by name: (result, details); a scorer
    may also keep its own work for the unit there under ``"<its name>:<what>"`` (shared by its baseline and
    explanation calls, e.g. the intervention scorer's continuations)."""

    @property
    def negative(self) -> bool:
        return self.entry.negative


@dataclass(frozen=True)
class Column:
    """One number a scorer shows: its label, the attributes that lead from the scorer's result to its `Metric`,
    and how it is told.

    ``notes(result)`` lists warnings to print beside it (`nbutils.score.flags`); ``text(result)``, when given,
    replaces the plain value with its own text (F1 beside its chance level)."""

    label: str
    path: tuple[str, ...]
    notes: Callable[[Any], list[str]] | None = None
    text: Callable[[Any], str] | None = None
    chance: float | None = None

    def metric(self, result: Any) -> Metric | None:
        """The `Metric` this column shows in a scorer's result (None where the result has none)."""
        node: Any = result
        for part in self.path:
            node = getattr(node, part, None)
        return node if isinstance(node, Metric) else None

    def value(self, result: Any) -> float | None:
        """Its value as a number (None when missing or undefined)."""
        m = self.metric(result)
        return None if m is None else m.value

    def notes_of(self, result: Any) -> list[str]:
        """Its notes on a scorer's result (none where the result is missing or the column has no notes)."""
        return self.notes(result) if result is not None and self.notes else []


class Scorer(ABC):
    """Scores explanations one way (see the module docstring)."""

    name: ClassVar[str]
    title: ClassVar[str]
    """A short heading for views, e.g. "correlation of simulated and true activations"."""
    columns: ClassVar[tuple[Column, ...]]
    """What views show."""
    headline: ClassVar[int] = 0
    """Which column is its headline number. A run's headline is that of its first scorer (registry order:
    simulation where it ran): what views sort by and the report's figures and summary lead with."""
    series: ClassVar[tuple[int, ...] | None] = None
    """The columns the report's score figures draw for the explanation (None: the headline alone)."""
    measure: ClassVar[str | None] = None
    """What its headline measures, in a few words for axes ("pooled correlation"); None: its name."""
    value_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    """Where its headline number lies (the report's histogram bins): a correlation's (-1, 1), a rate's (0, 1)."""
    detail: ClassVar[str | None] = None
    """What its saved details are, for views that draw them: "simulation", "judged items" or None."""
    needs_subject: ClassVar[bool] = False
    """Whether it runs the subject model (stage 03 then loads it once and passes it as `UnitContext.subject`)."""
    label_prefix: ClassVar[str] = ""
    """Put before its columns' labels in tables that show several scorers (e.g. "detection")."""
    compact: ClassVar[tuple[int, ...]] = (0,)
    """The columns shown in compact tables (stage 03's, the static page's index)."""
    result_type: ClassVar[type]
    """What `baseline` and `explanation` return: a dataclass (`nbutils.core.results` writes and reads it)."""
    details_type: ClassVar[Any] = None
    """What `explanation` saves beside its result (a dataclass, ``list[...]``), or None when it saves nothing."""
    settings_type: ClassVar[type | None] = None
    """Its own settings: a dataclass whose every field has a default (``-p scorer.<name>.<setting>=...``,
    checked before any stage runs, part of the run id), or None. The instance is ``self.settings``."""

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings_or_defaults(type(self), settings)

    def caption(self, result: Any) -> str | None:
        """A line under its table in the viewer (e.g. how many items were judged); None for none."""
        return None

    @abstractmethod
    def baseline(self, ctx: UnitContext) -> Any | None:
        """The token-lookup baseline's result (a ``result_type``; None where the scorer has none)."""

    @abstractmethod
    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[Any, Any]:
        """The explanation's result (a ``result_type``) and the details to save (a ``details_type``); raises
        `nbutils.llm.contract.LLMFailed`."""


SCORERS = Registry(
    "scorer",
    {
        "simulation": "nbutils.score.simulation:SimulationScorer",
        "detection": "nbutils.score.classification:DetectionScorer",
        "fuzzing": "nbutils.score.classification:FuzzingScorer",
        "ablation": "nbutils.score.ablation:AblationScorer",
        "intervention": "nbutils.score.intervention:InterventionScorer",
        "looks": "nbutils.score.looks:LooksScorer",
        "pairs": "nbutils.score.classification:PairScorer",
    },
    role="scorer",
)
"""Scorers by name, in the order they run and are shown: a class, or ``"module:Class"`` imported when needed."""


def register_scorer(scorer: type[Scorer]) -> type[Scorer]:
    """Make a scorer available by its name (to stage 03's ``scorers`` and to every view); usable as a decorator."""
    SCORERS[scorer.name] = scorer
    return scorer


def scorer(name: str, settings: Any = None) -> Scorer:
    """A registered scorer by name, with its settings (its ``settings_type``'s defaults when None)."""
    return SCORERS.resolve(name)(settings)


def registered() -> list[Scorer]:
    """Every registered scorer, in order."""
    return [scorer(name) for name in SCORERS]


def headline_of(scorers: list[Scorer]) -> Scorer | None:
    """The scorer whose headline is a run's headline: the first of the run's scorers (None for none)."""
    return scorers[0] if scorers else None


def label(sc: Scorer, column: Column) -> str:
    """A column's label in tables that show several scorers: "top+random", "detection balanced accuracy"."""
    return f"{sc.label_prefix} {column.label}".strip()


def column_notes(sc: Scorer, column: Column, side: ScoredSide | None) -> list[str]:
    """The notes on one scorer number of a unit side's scores (or its baseline's): `Column.notes`, if any."""
    return [] if side is None else column.notes_of(side.of(sc.name))


def scorer_notes(sc: Scorer, part: ScoredSide) -> list[tuple[str, str]]:
    """(which number, note) for one scorer's result: a note every column shares is named by the scorer."""
    per_column = [(column, column_notes(sc, column, part)) for column in sc.columns]
    out: dict[tuple[str, str], None] = {}
    for column, notes in per_column:
        for n in notes:
            shared = all(n in other for _, other in per_column)
            out[(sc.name if shared else label(sc, column), n)] = None
    return list(out)


def number_notes(result: UnitScores, scorers: list[Scorer]) -> list[tuple[str, str]]:
    """(which result, note) on a stage-03 result's numbers: each scorer's, the explanation's then the
    baseline's (what stage 03 stores beside the numbers, so tables read them without decoding results)."""
    return [
        (f"{who} {what}", n)
        for who, part in (("explanation", result), ("baseline", result.baseline))
        for sc in scorers
        for what, n in scorer_notes(sc, part)
    ]


def number_name(sc: Scorer, column: Column, baseline: bool = False) -> str:
    """The name a scorer number is stored under in the results store's ``numbers`` table:
    ``<scorer>/<path>``, e.g. ``simulation/top_and_random/correlation`` (``baseline:`` before it for the
    token-lookup baseline's)."""
    return ("baseline:" if baseline else "") + "/".join((sc.name, *column.path))


NOTED, DEGENERATE, F1_CHANCE = "#noted", "#degenerate", "#f1_chance"
"""Suffixes of the flags stored beside the numbers (`result_numbers`): ``<number>#noted`` (1 where the number
carries a note), ``<number>#degenerate`` (1 where a note says the judge was degenerate) and
``<scorer>#f1_chance`` (the F1 of answering yes to every item); a flag is stored only where it is set."""


def scorer_of(name: str) -> str:
    """The scorer a stored number or flag belongs to: ``baseline:detection/f1#noted`` -> ``detection``."""
    return name.removeprefix("baseline:").split("/")[0].split("#")[0]


def result_numbers(result: UnitScores, scorers: list[Scorer]) -> dict[str, float | None]:
    """Every number ``scorers`` declare in a unit side's scores, the explanation's and the baseline's, by
    `number_name` (None where missing or undefined), with the flags the report counts (`NOTED`, `DEGENERATE`,
    `F1_CHANCE`): what the store indexes so views sort and aggregate without parsing a result."""
    out: dict[str, float | None] = {}
    for baseline, part in ((False, result), (True, result.baseline)):
        for sc in scorers:
            res = part.of(sc.name)
            if res is None:
                continue
            for column in sc.columns:
                name = number_name(sc, column, baseline)
                out[name] = finite(column.value(res))
                notes = column.notes_of(res)
                if notes:
                    out[name + NOTED] = 1.0
                if any(n.startswith("degenerate") for n in notes):
                    out[name + DEGENERATE] = 1.0
            chance = getattr(res, "f1_chance", None)
            if isinstance(chance, Metric) and finite(chance.value) is not None:
                out[("baseline:" if baseline else "") + sc.name + F1_CHANCE] = float(chance.value)
    return out


def finite(value: Any) -> float | None:
    """A number that can be averaged (None for missing, undefined or not finite values)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------------
# A unit side's scores and details, typed
# ----------------------------------------------------------------------------------------------------------


def _decode_by_scorer(name: str, value: Any, details: bool = False) -> Any:
    """A registered scorer's stored result (or details) read as its declared type; None where ``name`` is no
    registered scorer (the caller keeps the raw JSON)."""
    if name not in SCORERS:
        return None
    cls = SCORERS.resolve(name)
    tp = cls.details_type if details else cls.result_type
    return value if tp is None or value is None else from_json(tp, value)


@dataclass
class ScoredSide:
    """One explanation's scores: the explanation and each scorer's result (its ``result_type``) by name."""

    explanation: str | None = None
    results: dict[str, Any] = field(default_factory=dict)

    def of(self, name: str) -> Any | None:
        """The result of scorer ``name`` (None where it did not score this side)."""
        return self.results.get(name)

    def _read(self, d: dict[str, Any], known: set[str], extra: dict[str, Any]) -> None:
        for name, value in d.items():
            if name in known:
                continue
            typed = _decode_by_scorer(name, value)
            if typed is None and value is not None:
                extra[name] = value
            else:
                self.results[name] = typed


@dataclass(kw_only=True)
class UnitScores(ScoredSide, JsonRecord):
    """Stage 03's result for one unit side: its explanation's scores (`ScoredSide`), the token-lookup
    baseline's beside them, and why scoring stopped if it did (``failure``; ``retryable`` when a rerun
    could fix it). Keys no registered scorer owns are kept in ``extra`` and written back."""

    layer: int
    neuron: int
    sign: str
    baseline: ScoredSide = field(default_factory=ScoredSide)
    failure: str | None = None
    retryable: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    baseline_extra: dict[str, Any] = field(default_factory=dict)

    _HEAD = frozenset({"layer", "neuron", "sign", "explanation", "format", "baseline", "failure", "retryable"})

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.layer, self.neuron, self.sign)

    def side(self, baseline: bool = False) -> ScoredSide:
        """The explanation's scores, or the baseline's."""
        return self.baseline if baseline else self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitScores:
        d = upgrade_result(d)
        out = cls(layer=int(d["layer"]), neuron=int(d["neuron"]), sign=str(d["sign"]), explanation=d.get("explanation"),
                  failure=d.get("failure"), retryable=d.get("retryable"))  # fmt: skip
        out._read(d, cls._HEAD, out.extra)
        base = d.get("baseline") or {}
        out.baseline = ScoredSide(base.get("explanation"))
        out.baseline._read(base, {"explanation"}, out.baseline_extra)
        return out

    def to_dict(self) -> dict[str, Any]:
        base = {"explanation": self.baseline.explanation, **to_json(self.baseline.results), **self.baseline_extra}
        out = {"layer": self.layer, "neuron": self.neuron, "sign": self.sign, "explanation": self.explanation,
               "format": RESULTS_FORMAT, "baseline": base, **to_json(self.results), **self.extra}  # fmt: skip
        if self.failure is not None:
            out["failure"] = self.failure
        if self.retryable is not None:
            out["retryable"] = self.retryable
        return out


@dataclass
class UnitDetails(JsonRecord):
    """What stage 03's scorers saved for one unit side to audit its scores, by scorer name (each its
    ``details_type``: the simulation scorer's `nbutils.score.simulation.Simulation`, the judges' items)."""

    layer: int
    neuron: int
    sign: str
    explanation: str | None = None
    by_scorer: dict[str, Any] = field(default_factory=dict)

    _HEAD = ("layer", "neuron", "sign", "explanation")

    def of(self, name: str) -> Any | None:
        """The details scorer ``name`` saved (None where it saved none)."""
        return self.by_scorer.get(name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitDetails:
        d = upgrade_simulation(d)
        out = cls(int(d["layer"]), int(d["neuron"]), str(d["sign"]), d.get("explanation"))
        for name, value in d.items():
            if name not in cls._HEAD:
                typed = _decode_by_scorer(name, value, details=True)
                out.by_scorer[name] = value if typed is None else typed
        return out

    def to_dict(self) -> dict[str, Any]:
        head = {"layer": self.layer, "neuron": self.neuron, "sign": self.sign, "explanation": self.explanation}
        return {**head, **to_json(self.by_scorer)}


# ----------------------------------------------------------------------------------------------------------
# Format 1 (before scorers had names)
# ----------------------------------------------------------------------------------------------------------

_SIMULATION_KEYS = ("calibration", "top_and_random", "random_only", "top_only", "stratified")


def _nest_simulation(scores: dict[str, Any]) -> dict[str, Any]:
    moved = {k: scores.pop(k) for k in _SIMULATION_KEYS if k in scores}
    return {**scores, "simulation": moved} if moved else scores


def upgrade_result(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stage-03 result in format 2: format 1 kept the simulation scorer's sets at the top level."""
    if result is None or result.get("format") == RESULTS_FORMAT:
        return result
    out = _nest_simulation(dict(result))
    if isinstance(out.get("baseline"), dict):
        out["baseline"] = _nest_simulation(dict(out["baseline"]))
    return {**out, "format": RESULTS_FORMAT}


def upgrade_simulation(sim: dict[str, Any] | None) -> dict[str, Any] | None:
    """A simulation file in format 2: format 1 kept the simulation's excerpts at the top level and the
    judged items under ``judged``."""
    if sim is None or "excerpts" not in sim:
        return sim
    out = {k: v for k, v in sim.items() if k not in ("labels", "calibration", "excerpts", "judged")}
    out["simulation"] = {k: sim[k] for k in ("labels", "calibration", "excerpts") if k in sim}
    return {**out, **(sim.get("judged") or {})}
