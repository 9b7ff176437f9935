"""The contract every scorer keeps, the registry of scorers, and the format of stage 03's results.

A scorer judges one unit side's explanation, and the token-lookup baseline's, on excerpts the explainer
never saw (`UnitContext`). It writes everything under its own name:

    a result (format 2):   {"layer", "neuron", "sign", "explanation", "format": 2,
                            <scorer name>: {...its result...}, ...,
                            "baseline": {"explanation": ..., <scorer name>: {...}, ...},
                            "failure"?, "retryable"?}
    its details:           {"layer", "neuron", "sign", "explanation", <scorer name>: <its details>, ...}

both kept in the stage's results store (`nbutils.core.store`; before it, ``neurons/`` and ``simulations/``
files), with every `Column`'s number indexed (`result_numbers`),

and declares the numbers views show (`Column`: where in its result, a label, notes on weak values), so the
viewer, the static page and the report show any registered scorer without being edited. Adding a scorer is
one module with a `Scorer` subclass and one line in `SCORERS` (or a call to `register_scorer`). Results and
simulation files of format 1 (written before scorers had names) are read through `upgrade_result` and
`upgrade_simulation`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nbutils.core.records import Excerpt, UnitRecord
from nbutils.core.registry import Registry
from nbutils.llm.contract import Backend

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
    entry: dict[str, Any]
    splits: dict[str, list[Excerpt]]
    table: dict[str, float]
    settings: ScoreSettings
    subject: Any = None
    """The subject model run with a unit's values set (`nbutils.subject.intervene.UnitIntervention`), for
    scorers with ``needs_subject``; None otherwise."""
    done: dict[str, tuple[dict[str, Any], Any]] = field(default_factory=dict)
    """What the scorers that ran before on this unit side returned, by name: (result, details); a scorer
    may also keep its own work for the unit there under ``"<its name>:<what>"`` (shared by its baseline and
    explanation calls, e.g. the intervention scorer's continuations)."""

    @property
    def negative(self) -> bool:
        return self.entry["sign"] == "negative"


@dataclass(frozen=True)
class Column:
    """One number a scorer shows: its label, where it is in the scorer's result, and how it is told.

    ``notes(result)`` lists warnings to print beside it (`nbutils.score.flags`); ``text(result)``, when given,
    replaces the plain value with its own text (F1 beside its chance level)."""

    label: str
    path: tuple[str, ...]
    notes: Callable[[dict[str, Any]], list[str]] | None = None
    text: Callable[[dict[str, Any]], str] | None = None
    chance: float | None = None

    def metric(self, result: dict[str, Any] | None) -> dict[str, Any] | None:
        """The stored metric (``{"value", "reason", "low", "high"}``) this column shows, if any."""
        node: Any = result
        for part in self.path:
            node = (node or {}).get(part) if isinstance(node, dict) else None
        return node

    def value(self, result: dict[str, Any] | None) -> float | None:
        """Its value as a number (None when missing or undefined)."""
        m = self.metric(result)
        return m.get("value") if isinstance(m, dict) else None


class Scorer(ABC):
    """Scores explanations one way (see the module docstring)."""

    name: ClassVar[str]
    title: ClassVar[str]
    """A short heading for views, e.g. "correlation of simulated and true activations"."""
    columns: ClassVar[tuple[Column, ...]]
    """What views show; the first is the headline (the static page's index, the report's summary)."""
    detail: ClassVar[str | None] = None
    """What its saved details are, for views that draw them: "simulation", "judged items" or None."""
    needs_subject: ClassVar[bool] = False
    """Whether it runs the subject model (stage 03 then loads it once and passes it as `UnitContext.subject`)."""
    label_prefix: ClassVar[str] = ""
    """Put before its columns' labels in tables that show several scorers (e.g. "detection")."""
    compact: ClassVar[tuple[int, ...]] = (0,)
    """The columns shown in compact tables (stage 03's, the static page's index)."""

    def caption(self, result: dict[str, Any]) -> str | None:
        """A line under its table in the viewer (e.g. how many items were judged); None for none."""
        return None

    @abstractmethod
    def baseline(self, ctx: UnitContext) -> dict[str, Any] | None:
        """The token-lookup baseline's result (None where the scorer has none)."""

    @abstractmethod
    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[dict[str, Any], Any]:
        """The explanation's result and the details to save; raises `nbutils.llm.contract.LLMFailed`."""


SCORERS = Registry(
    "scorer",
    {
        "simulation": "nbutils.score.simulation:SimulationScorer",
        "detection": "nbutils.score.classification:DetectionScorer",
        "fuzzing": "nbutils.score.classification:FuzzingScorer",
        "ablation": "nbutils.score.ablation:AblationScorer",
        "intervention": "nbutils.score.intervention:InterventionScorer",
    },
)
"""Scorers by name, in the order they run and are shown: a class, or ``"module:Class"`` imported when needed."""


def register_scorer(scorer: type[Scorer]) -> type[Scorer]:
    """Make a scorer available by its name (to stage 03's ``scorers`` and to every view); usable as a decorator."""
    SCORERS[scorer.name] = scorer
    return scorer


def scorer(name: str) -> Scorer:
    """A registered scorer by name."""
    return SCORERS.resolve(name)()


def registered() -> list[Scorer]:
    """Every registered scorer, in order."""
    return [scorer(name) for name in SCORERS]


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


def result_numbers(result: dict[str, Any], scorers: list[Scorer]) -> dict[str, float | None]:
    """Every number ``scorers`` declare in a stage-03 result, the explanation's and the baseline's, by
    `number_name` (None where missing or undefined), with the flags the report counts (`NOTED`, `DEGENERATE`,
    `F1_CHANCE`): what the store indexes so views sort and aggregate without parsing a result."""
    out: dict[str, float | None] = {}
    for baseline, part in ((False, result), (True, result.get("baseline") or {})):
        for sc in scorers:
            res = part.get(sc.name)
            if res is None:
                continue
            for column in sc.columns:
                name = number_name(sc, column, baseline)
                out[name] = finite(column.value(res))
                notes = column.notes(res) if column.notes else []
                if notes:
                    out[name + NOTED] = 1.0
                if any(n.startswith("degenerate") for n in notes):
                    out[name + DEGENERATE] = 1.0
            chance = finite(((res if isinstance(res, dict) else {}).get("f1_chance") or {}).get("value"))
            if chance is not None:
                out[("baseline:" if baseline else "") + sc.name + F1_CHANCE] = chance
    return out


def finite(value: Any) -> float | None:
    """A number that can be averaged (None for missing, undefined or not finite values)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


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
