"""The ablation score (Bills et al. 2023): does the explanation account for what the unit does to the output?

On the scored excerpts (``valid_top`` and ``valid_random``), the unit's value at every position is replaced
by the *calibrated* simulation of its explanation (the simulation scorer's expected values through its linear
calibration, so in activation units), the subject model runs on, and its next-token distributions are
compared with the unmodified model's:

    score = 1 - mean KL(original || simulated) / mean KL(original || mean-ablated)

where mean-ablated sets the unit to its mean over the corpus at every position. 1: replacing the unit by its
simulation leaves the output as the true values do; 0: no better than a constant; below 0: worse than one.
By construction the true activations score 1 and the unit's mean scores 0. The 95% interval resamples
excerpts (the ratio of the two sums per resample). The token-lookup baseline's predictions, calibrated the
same way, are scored the same way. The score is undefined when mean ablation does not change the output
(a unit the output ignores, or one that never varies).

Costs five forward passes of the full subject model over the scored excerpts per unit side (original and
simulated for the explanation and for the baseline, mean-ablated once). MLP neurons only
(`nbutils.subject.intervene`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nbutils.core.records import Excerpt
from nbutils.core.results import JsonRecord
from nbutils.llm.contract import Backend
from nbutils.score.baseline import token_lookup_simulate
from nbutils.score.contract import Column, Scorer, UnitContext
from nbutils.score.metrics import Calibration, Metric, calibrate
from nbutils.score.simulation import SimulationScorer, true_activations

if TYPE_CHECKING:  # only named in annotations: the scorer's module loads without torch
    from nbutils.subject.intervene import UnitIntervention

SETS = ("valid_top", "valid_random")
CALIBRATION_SETS = ("calibration_top", "calibration_random")
MIN_KL = 1e-9
"""Mean-ablation KL (nats) below which the output does not depend on the unit and the score is undefined."""


def ablation_metric(kl_simulated: np.ndarray, kl_mean: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Metric:
    """1 - sum KL(simulated) / sum KL(mean-ablated) over excerpts, with a bootstrap 95% interval."""
    if len(kl_mean) == 0:
        return Metric(None, "no excerpts to score")
    if kl_mean.sum() / len(kl_mean) < MIN_KL:
        return Metric(None, "mean ablation does not change the model's output (the output ignores this unit)")
    value = 1.0 - float(kl_simulated.sum() / kl_mean.sum())
    low = high = None
    if len(kl_mean) >= 2 and n_boot > 0:
        picks = np.random.default_rng(seed).integers(0, len(kl_mean), (n_boot, len(kl_mean)))
        den = kl_mean[picks].sum(1)
        ok = den / len(kl_mean) >= MIN_KL
        boots = 1.0 - kl_simulated[picks].sum(1)[ok] / den[ok]
        if len(boots):
            low, high = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
    return Metric(value, None, low, high)


@dataclass
class AblationResult(JsonRecord):
    """The ablation scorer's result: the score, and the mean KL per token (nats) of the output with the unit
    replaced by its simulation and by its mean, over ``n_excerpts`` excerpts."""

    score: Metric
    kl_simulated: float | None
    kl_mean_ablated: float | None
    n_excerpts: int


def _scored(ctx: UnitContext) -> list[Excerpt]:
    return [e for name in SETS for e in ctx.splits[name]]


class AblationScorer(Scorer):
    """Replace the unit by its calibrated simulation and compare next-token distributions (module docstring)."""

    name = "ablation"
    title = "ablation: the output with the unit replaced by its simulation, against mean ablation (KL)"
    needs_subject = True
    columns = (Column("ablation score", ("score",), chance=0.0),)
    result_type = AblationResult

    def caption(self, result: AblationResult) -> str:
        return (
            f"{result.n_excerpts} excerpts; mean KL per token: simulated {result.kl_simulated or 0.0:.3g}, "
            f"mean-ablated {result.kl_mean_ablated or 0.0:.3g} nats"
        )

    def score_values(self, ctx: UnitContext, values: list[np.ndarray]) -> AblationResult:
        """The ablation score of replacement ``values`` (activation units, one array per scored excerpt). The
        mean ablation's KL is computed once per unit side and kept in ``ctx.done``."""
        subject: UnitIntervention = ctx.subject
        excerpts = _scored(ctx)
        ids = [e.token_ids for e in excerpts]
        replace = {"simulated": np.stack(values) if ids else np.zeros((0, 0))}
        if "ablation:mean" not in ctx.done:
            replace["mean"] = np.full(replace["simulated"].shape, ctx.record.mean)
        kls = subject.kl_from_original(ctx.record.id.layer, ctx.record.id.neuron, ids, replace)
        if "mean" in kls:
            ctx.done["ablation:mean"] = ({}, kls["mean"])
        kl_sim, kl_mean = kls["simulated"], ctx.done["ablation:mean"][1]
        metric = ablation_metric(kl_sim, kl_mean, ctx.settings.n_boot, ctx.settings.seed)
        return AblationResult(
            metric,
            float(kl_sim.mean()) if len(kl_sim) else None,
            float(kl_mean.mean()) if len(kl_mean) else None,
            len(excerpts),
        )

    def _replacement(self, ctx: UnitContext, cal: Calibration, predicted: list[np.ndarray]) -> list[np.ndarray]:
        """Calibrated predictions in the unit's own sign (a negative side's excerpts are negated)."""
        sign = -1.0 if ctx.negative else 1.0
        return [sign * cal.apply(p) for p in predicted]

    def baseline(self, ctx: UnitContext) -> AblationResult:
        cal = calibrate(
            [t for n in CALIBRATION_SETS for t in true_activations(ctx.splits[n])],
            [p for n in CALIBRATION_SETS for p in token_lookup_simulate(ctx.table, ctx.splits[n])],
        )
        return self.score_values(ctx, self._replacement(ctx, cal, token_lookup_simulate(ctx.table, _scored(ctx))))

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[AblationResult, None]:
        if "simulation" not in ctx.done:  # the simulation scorer did not run on this unit: simulate here
            ctx.done["simulation"] = SimulationScorer().explanation(ctx, llm)
        result, details = ctx.done["simulation"]
        expected = {(x.split, x.index): np.asarray(x.expected) for x in details.excerpts}
        predicted = [expected[(name, e.index)] for name in SETS for e in ctx.splits[name]]
        cal = result.calibration
        return self.score_values(ctx, self._replacement(ctx, cal, predicted)), None
