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
from dataclasses import asdict
from typing import Any

import numpy as np

from nbutils.core.records import Excerpt
from nbutils.llm.contract import Backend, SimulationRequest
from nbutils.llm.prompts import LABELS
from nbutils.score.baseline import token_lookup_simulate
from nbutils.score.contract import Column, Scorer, UnitContext
from nbutils.score.flags import calibration_notes, score_set_notes
from nbutils.score.metrics import ScoreSet, calibrate, score

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


def _score_dict(s: ScoreSet) -> dict[str, Any]:
    return {
        "correlation": asdict(s.correlation),
        "rsquared": asdict(s.rsquared),
        "absolute_dev_explained": asdict(s.absolute_dev_explained),
        "n_excerpts": s.n_excerpts,
        "n_tokens": s.n_tokens,
    }


def score_predictions(
    splits: dict[str, list[Excerpt]], predicted: dict[str, list[np.ndarray]], n_boot: int, seed: int
) -> dict[str, Any]:
    """Every score of one simulator's predictions (keyed like the splits)."""
    cal_names = ("calibration_top", "calibration_random")
    cal = calibrate(
        [t for n in cal_names for t in true_activations(splits[n])], [p for n in cal_names for p in predicted[n]]
    )
    out: dict[str, Any] = {"calibration": asdict(cal)}
    for label, names in SCORED_SETS.items():
        t = [x for n in names for x in true_activations(splits[n])]
        p = [x for n in names for x in predicted[n]]
        if label == "stratified" and not t:
            none = {"value": None, "reason": NO_STRATIFIED, "low": None, "high": None}
            out[label] = {m: none for m in ("correlation", "rsquared", "absolute_dev_explained")}
            out[label] |= {"n_excerpts": 0, "n_tokens": 0}
            continue
        out[label] = _score_dict(score(t, p, calibration=cal, n_boot=n_boot, seed=seed))
    return out


def _set_column(label: str, name: str, metric: str = "correlation") -> Column:
    if metric == "correlation":
        return Column(label, (name, metric), notes=lambda r: score_set_notes((r or {}).get(name)))
    return Column(
        label, (name, metric), notes=lambda r: score_set_notes((r or {}).get(name)) + calibration_notes(r, name, metric)
    )


class SimulationScorer(Scorer):
    """Correlation of simulated and true activations (see the module docstring)."""

    name = "simulation"
    title = "correlation of simulated and true activations (95% interval)"
    detail = "simulation"
    compact = (0, 1, 3)
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

    def baseline(self, ctx: UnitContext) -> dict[str, Any]:
        predicted = {n: token_lookup_simulate(ctx.table, ctx.splits[n]) for n in self._scored(ctx)}
        return score_predictions(ctx.splits, predicted, ctx.settings.n_boot, ctx.settings.seed)

    def explanation(self, ctx: UnitContext, llm: Backend) -> tuple[dict[str, Any], dict[str, Any]]:
        names = self._scored(ctx)
        scored = [(n, e) for n in names for e in ctx.splits[n]]
        dists = simulate(
            llm, ctx.entry["explanation"], [e for _, e in scored], ctx.settings.max_prompt_tokens, ctx.record.noun
        )
        evs = expected_values(dists)
        predicted = {n: [ev for (m, _), ev in zip(scored, evs) if m == n] for n in names}
        result = score_predictions(ctx.splits, predicted, ctx.settings.n_boot, ctx.settings.seed)
        keep = ctx.settings.keep_distributions  # off: 11 probabilities per token are most of a unit's bytes
        return result, {
            "labels": [int(x) for x in LABELS],
            "calibration": result["calibration"],
            "excerpts": [
                {
                    "split": n,
                    "index": e.index,
                    "tokens": e.tokens,
                    "true": [float(a) for a in e.activations],
                    "expected": [float(x) for x in ev],
                    **({"distribution": np.round(d, 6).tolist()} if keep else {}),
                }
                for (n, e), ev, d in zip(scored, evs, dists)
            ],
        }
