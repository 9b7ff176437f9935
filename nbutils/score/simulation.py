"""The simulation scorer (Bills et al. 2023): simulate an explanation on held-out excerpts and correlate.

The simulator predicts the unit's 0..10 value at every token of the ``calibration`` and ``valid`` excerpts
(and the ``stratified`` ones) from the explanation alone; the expected value under its label distribution
is the prediction. Scores, under ``"simulation"``: pooled correlation on ``top_and_random``, ``random_only``,
``top_only`` and ``stratified`` excerpts with a bootstrap 95% interval, and the two secondary scores after a
linear calibration fitted on the calibration excerpts. The token-lookup baseline is scored the same way.
Details saved: per excerpt its split, tokens, true activations, expected values and label distributions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from nbutils.core.records import Excerpt
from nbutils.core.results import JsonRecord, omitted_when
from nbutils.llm.contract import Backend, SimulationRequest
from nbutils.llm.prompts import LABELS
from nbutils.score.baseline import token_lookup_simulate
from nbutils.score.contract import Column, Scorer, UnitContext
from nbutils.score.flags import calibration_notes, score_set_notes
from nbutils.score.metrics import Calibration, Metric, ScoreSet, calibrate, score

SCORED_SETS = {
    "top_and_random": ("valid_top", "valid_random"),
    "random_only": ("valid_random",),
    "top_only": ("valid_top",),
    "stratified": ("stratified",),
}
NO_STRATIFIED = (
    "no quantile-band excerpts to score (bands are sampled for the positive side only, and per_band=0 "
    "turns the stratified score off)"
)


def expected_values(distributions: list[np.ndarray]) -> list[np.ndarray]:
    """Expected label (0..10) per token from [tokens, 11] probability arrays."""
    labels = np.arange(len(LABELS), dtype=np.float64)
    return [d @ labels for d in distributions]


def true_activations(excerpts: Sequence[Excerpt]) -> list[np.ndarray]:
    """The excerpts' activations as float64 arrays (the truth a simulation is scored against)."""
    return [np.asarray(e.activations, dtype=np.float64) for e in excerpts]


def simulate(
    llm: Backend, explanation: str, excerpts: Sequence[Excerpt], max_prompt_tokens: int | None = None,
    noun: str = "neuron",
):  # fmt: skip
    """Label distributions [tokens, 11] per excerpt for an explanation (raises LLMFailed); ``noun``: what the
    prompt calls the unit."""
    tokens = tuple(tuple(e.tokens) for e in excerpts)
    request = SimulationRequest(explanation, tokens, max_prompt_tokens, noun=noun)
    return llm.simulate(request)


@dataclass
class SimulationResult(JsonRecord):
    """The simulation scorer's result: the calibration line (fitted on the calibration excerpts) and a
    `ScoreSet` per scored set of excerpts (`SCORED_SETS`)."""

    calibration: Calibration
    top_and_random: ScoreSet
    random_only: ScoreSet
    top_only: ScoreSet
    stratified: ScoreSet

    @property
    def sets(self) -> dict[str, ScoreSet]:
        """Every scored set by name."""
        return {name: getattr(self, name) for name in SCORED_SETS}

    def set(self, name: str) -> ScoreSet:
        """One scored set by name (``"top_and_random"`` ...)."""
        if name not in SCORED_SETS:
            raise KeyError(f"no scored set {name!r}; the sets are {', '.join(SCORED_SETS)}")
        return getattr(self, name)


@dataclass
class SimulatedExcerpt(JsonRecord):
    """One scored excerpt of a simulation: its split, tokens, true activations and the simulator's expected
    values (0..10); ``distribution`` (per token, the probability of each label) only with
    ``keep_distributions``."""

    split: str
    index: int
    tokens: list[str]
    true: list[float]
    expected: list[float]
    distribution: list[list[float]] | None = omitted_when(None)
    distribution_values: list[list[float]] | None = omitted_when(None)
    """The values each token's ``distribution`` is over, where they are not the labels 0..10 (records imported
    from neuron-explainer keep the values its simulator saw per token)."""


@dataclass
class Simulation(JsonRecord):
    """The simulation scorer's details: the labels it used, its calibration line and every scored excerpt."""

    labels: list[int] = field(default_factory=lambda: [int(x) for x in LABELS])
    calibration: Calibration | None = None
    excerpts: list[SimulatedExcerpt] = field(default_factory=list)

    def valid(self) -> list[SimulatedExcerpt]:
        """The held-out excerpts (``valid_top``, ``valid_random``): what the headline score is computed on."""
        return [x for x in self.excerpts if x.split.startswith("valid")]


def _undefined_set(reason: str) -> ScoreSet:
    return ScoreSet(Metric(None, reason), Metric(None, reason), Metric(None, reason), 0, 0)


def score_predictions(
    splits: dict[str, list[Excerpt]], predicted: dict[str, list[np.ndarray]], n_boot: int, seed: int
) -> SimulationResult:
    """Every score of one simulator's predictions (keyed like the splits)."""
    cal_names = ("calibration_top", "calibration_random")
    cal = calibrate(
        [t for n in cal_names for t in true_activations(splits[n])], [p for n in cal_names for p in predicted[n]]
    )
    sets: dict[str, ScoreSet] = {}
    for label, names in SCORED_SETS.items():
        t = [x for n in names for x in true_activations(splits[n])]
        p = [x for n in names for x in predicted[n]]
        if label == "stratified" and not t:
            sets[label] = _undefined_set(NO_STRATIFIED)
            continue
        sets[label] = replace(score(t, p, calibration=cal, n_boot=n_boot, seed=seed), calibration=None)
    return SimulationResult(cal, **sets)


def _set_column(label: str, name: str, metric: str = "correlation") -> Column:
    if metric == "correlation":
        return Column(label, (name, metric), notes=lambda r: score_set_notes(r.set(name)))
    return Column(
        label, (name, metric), notes=lambda r: score_set_notes(r.set(name)) + calibration_notes(r, name, metric)
    )


class SimulationScorer(Scorer):
    """Correlation of simulated and true activations (see the module docstring)."""

    name = "simulation"
    title = "correlation of simulated and true activations (95% interval)"
    detail = "simulation"
    compact = (0, 1, 3)
    series = (0, 1, 3)  # top+random, random only, stratified
    measure = "pooled correlation"
    value_range = (-1.0, 1.0)
    result_type = SimulationResult
    details_type = Simulation
    columns = (
        _set_column("top+random", "top_and_random"),
        _set_column("random only", "random_only"),
        _set_column("top only", "top_only"),
        _set_column("stratified", "stratified"),
        _set_column("R\u00b2 (calibrated)", "top_and_random", "rsquared"),
        _set_column("abs. dev. explained", "top_and_random", "absolute_dev_explained"),
    )

    def _scored(self, ctx: UnitContext) -> list[str]:
        return [n for n in ctx.splits if n != "train"]

    def baseline(self, ctx: UnitContext) -> SimulationResult:
        predicted = {n: token_lookup_simulate(ctx.table, ctx.splits[n]) for n in self._scored(ctx)}
        return score_predictions(ctx.splits, predicted, ctx.settings.n_boot, ctx.settings.seed)

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[SimulationResult, Simulation]:
        names = self._scored(ctx)
        scored = [(n, e) for n in names for e in ctx.splits[n]]
        dists = simulate(
            llm, ctx.entry.explanation, [e for _, e in scored], ctx.settings.max_prompt_tokens, ctx.record.noun
        )
        evs = expected_values(dists)
        predicted = {n: [ev for (m, _), ev in zip(scored, evs) if m == n] for n in names}
        result = score_predictions(ctx.splits, predicted, ctx.settings.n_boot, ctx.settings.seed)
        keep = ctx.settings.keep_distributions  # off: 11 probabilities per token are most of a unit's bytes
        excerpts = [
            SimulatedExcerpt(
                n,
                e.index,
                list(e.tokens),
                [float(a) for a in e.activations],
                [float(x) for x in ev],
                np.round(d, 6).tolist() if keep else None,
            )  # fmt: skip
            for (n, e), ev, d in zip(scored, evs, dists)
        ]
        return result, Simulation([int(x) for x in LABELS], result.calibration, excerpts)
