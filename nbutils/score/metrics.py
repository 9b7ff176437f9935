"""Scoring a simulation against the true activations (Bills et al. 2023, as summarised in DESIGN.md).

- The main score is the Pearson correlation between true activations and simulated expected values,
  pooled over every token of every scored excerpt (not averaged per excerpt).
- Two secondary scores use the mean square / mean absolute true value as denominator, so they only mean
  something once the simulator's 0..10 scale is mapped to real units: `calibrate` fits a line on a separate
  calibration split, and `score` applies it before computing
  ``1 - mean((t - p)^2) / mean(t^2)`` and ``1 - mean(|t - p|) / mean(|t|)``.
- A 95% interval comes from resampling whole excerpts with replacement.
- A correlation does not exist when either side is constant; such a score is *undefined* and carries the
  reason, never a silent 0 or NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nbutils.core.results import omitted_when


@dataclass
class Metric:
    """One number with its status: ``value`` is None exactly when the metric is undefined, and ``reason`` says why."""

    value: float | None
    reason: str | None = None
    low: float | None = None
    high: float | None = None

    @property
    def defined(self) -> bool:
        return self.value is not None

    def __str__(self) -> str:
        if self.value is None:
            return f"undefined ({self.reason})"
        ci = f" [{self.low:.3f}, {self.high:.3f}]" if self.low is not None and self.high is not None else ""
        return f"{self.value:.3f}{ci}"


@dataclass
class Calibration:
    """A line mapping simulated values to activation units: ``true ~ slope * simulated + intercept``."""

    slope: float
    intercept: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(x, dtype=np.float64) + self.intercept


@dataclass
class ScoreSet:
    """All scores of one simulation over one set of excerpts."""

    correlation: Metric
    rsquared: Metric
    absolute_dev_explained: Metric
    n_excerpts: int
    n_tokens: int
    calibration: Calibration | None = omitted_when(None)
    """The line the secondary scores were computed with (stored once per simulation, not per set)."""


def _flat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts]) if parts else np.zeros(0)


def _non_finite(t: np.ndarray, p: np.ndarray) -> str | None:
    """Why a score cannot be computed from these values (NaN or infinity on either side), or None."""
    sides = [name for name, x in (("true activations", t), ("simulated activations", p)) if not np.isfinite(x).all()]
    return f"non-finite values (NaN or infinity) among the {' and the '.join(sides)}" if sides else None


def correlation(true: np.ndarray, pred: np.ndarray) -> Metric:
    """Pearson correlation of two flat vectors, undefined (with the reason) where it does not exist."""
    t, p = np.asarray(true, dtype=np.float64).ravel(), np.asarray(pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and simulated activations differ in length ({t.size} vs {p.size})")
    if t.size < 2:
        return Metric(None, "fewer than two tokens to correlate")
    bad = _non_finite(t, p)
    if bad:
        return Metric(None, bad)
    tc, pc = t - t.mean(), p - p.mean()
    st, sp = math.sqrt(float(tc @ tc)), math.sqrt(float(pc @ pc))
    if st <= 1e-12 * max(1.0, float(np.abs(t).max())):
        return Metric(None, "the true activations are constant on these excerpts (the unit does not vary)")
    if not p.any():
        return Metric(None, "the simulation is 0 on every token (the explanation matches nothing in these excerpts)")
    if sp <= 1e-12 * max(1.0, float(np.abs(p).max())):
        return Metric(None, "the simulated activations are constant (the simulator predicts no variation)")
    return Metric(float(np.clip((tc @ pc) / (st * sp), -1.0, 1.0)))


def calibrate(true: list[np.ndarray], pred: list[np.ndarray]) -> Calibration:
    """Least-squares line from simulated to true activations, fitted on a calibration split."""
    t, p = _flat(true), _flat(pred)
    if t.size == 0:
        return Calibration(1.0, 0.0)
    var = float(np.var(p))
    if var <= 1e-12:
        return Calibration(0.0, float(t.mean()))
    slope = float(np.mean((p - p.mean()) * (t - t.mean())) / var)
    return Calibration(slope, float(t.mean() - slope * p.mean()))


def _ratio_score(num: float, den: float, what: str) -> Metric:
    if den <= 1e-12:
        return Metric(None, f"the mean {what} true activation is zero")
    return Metric(1.0 - num / den)


def bootstrap_interval(
    true: list[np.ndarray], pred: list[np.ndarray], n_boot: int = 1000, seed: int = 0
) -> tuple[float | None, float | None]:
    """2.5th and 97.5th percentiles of the pooled correlation over excerpts resampled with replacement.

    Each resample's correlation is computed from per-excerpt sums (token count, sums of values, squares and
    products, after centring on the pooled means), so ``n_boot`` resamples cost one matrix product rather
    than ``n_boot`` concatenations; a resample is undefined by the same rules as `correlation`."""
    n = len(true)
    if n < 2 or n_boot <= 0:
        return None, None
    t = [np.asarray(x, dtype=np.float64).ravel() for x in true]
    p = [np.asarray(x, dtype=np.float64).ravel() for x in pred]
    if _non_finite(_flat(t), _flat(p)):
        return None, None
    picks = np.random.default_rng(seed).integers(0, n, (n_boot, n))  # the same draws as n_boot calls of size n
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1.0)
    mt, mp = _flat(t).mean(), _flat(p).mean()
    sums = np.array(
        [[x.size, (x - mt).sum(), (y - mp).sum(), ((x - mt) ** 2).sum(), ((y - mp) ** 2).sum(), ((x - mt) * (y - mp)).sum()]
         for x, y in zip(t, p)]
    )  # fmt: skip
    size, st, sp, stt, spp, stp = (counts @ sums).T
    var_t, var_p = np.maximum(stt - st**2 / size, 0.0), np.maximum(spp - sp**2 / size, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (stp - st * sp / size) / np.sqrt(var_t * var_p)
    picked = counts > 0
    ok = size >= 2
    for var, xs in ((var_t, t), (var_p, p)):  # constant in a resample (or nearly): undefined, as in `correlation`
        high = np.max(np.where(picked, [x.max(initial=-np.inf) for x in xs], -np.inf), axis=1)
        low = np.min(np.where(picked, [x.min(initial=np.inf) for x in xs], np.inf), axis=1)
        largest = np.maximum(np.abs(high), np.abs(low))
        ok &= (high > low) & (np.sqrt(var) > 1e-12 * np.maximum(1.0, largest))
    values = np.clip(r[ok], -1.0, 1.0)
    if len(values) < n_boot // 2:  # most resamples were degenerate: no honest interval
        return None, None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def score(
    true: list[np.ndarray],
    pred: list[np.ndarray],
    calibration: Calibration | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> ScoreSet:
    """Score simulated against true activations, excerpt by excerpt (lists of equal-length arrays)."""
    if len(true) != len(pred):
        raise ValueError(f"{len(true)} true excerpts but {len(pred)} simulated ones")
    t, p = _flat(true), _flat(pred)
    bad = _non_finite(t, p)
    if bad:  # a NaN would make the ratio scores NaN without a reason: every metric is undefined instead
        return ScoreSet(Metric(None, bad), Metric(None, bad), Metric(None, bad), len(true), int(t.size), calibration)
    corr = correlation(t, p)
    if corr.value is not None:
        corr.low, corr.high = bootstrap_interval(true, pred, n_boot, seed)
    if calibration is None:
        why = "no calibration split was given (the secondary scores need the simulation in activation units)"
        rsq = Metric(None, why)
        absdev = Metric(None, why)
    else:
        pc = calibration.apply(p)
        rsq = _ratio_score(float(np.mean((t - pc) ** 2)), float(np.mean(t**2)) if t.size else 0.0, "squared")
        absdev = _ratio_score(float(np.mean(np.abs(t - pc))), float(np.mean(np.abs(t))) if t.size else 0.0, "absolute")
    return ScoreSet(
        correlation=corr,
        rsquared=rsq,
        absolute_dev_explained=absdev,
        n_excerpts=len(true),
        n_tokens=int(t.size),
        calibration=calibration,
    )


# ----------------------------------------------------------------------------------------------------------
# Classification scores (detection and fuzzing; the metrics EleutherAI's delphi reports)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClassificationScores:
    """How well yes/no judgements separate positive from negative items.

    ``probabilities`` are P(yes) per item (NaN where the judge gave no answer; those items are counted in
    ``n_unanswered`` and left out). Hard answers are ``P >= threshold``.
    """

    balanced_accuracy: Metric
    f1: Metric
    auroc: Metric
    accuracy: Metric
    precision: Metric
    recall: Metric
    n_positive: int
    n_negative: int
    n_unanswered: int
    n_yes: int = 0
    """Answered items judged yes (``P >= threshold``); equal to the answered count or 0 for a degenerate judge."""
    f1_chance: Metric | None = None
    """The F1 of a judge that answers yes to everything at this class balance, ``2P / (2P + N)``: the level
    an F1 must beat to mean anything (an always-yes judge reaches it with balanced accuracy 0.5)."""


def auroc(labels: np.ndarray, scores: np.ndarray) -> Metric:
    """Area under the ROC curve: the chance that a random positive outranks a random negative (ties count 1/2)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return Metric(None, "needs both positive and negative items")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return Metric(float((greater + 0.5 * ties) / (len(pos) * len(neg))))


def auroc_interval(area: Metric, n_positive: int, n_negative: int) -> Metric:
    """An AUROC with its 95% interval from Hanley and McNeil's (1982) standard error, clipped to [0, 1]."""
    a = area.value
    if a is None or n_positive < 1 or n_negative < 1:
        return area
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_positive - 1) * (q1 - a * a) + (n_negative - 1) * (q2 - a * a)) / (n_positive * n_negative)
    half = 1.96 * float(np.sqrt(max(var, 0.0)))
    return Metric(a, area.reason, max(0.0, a - half), min(1.0, a + half))


def classification_scores(
    labels: np.ndarray, probabilities: np.ndarray, has_probabilities: bool = True, threshold: float = 0.5
) -> ClassificationScores:
    """Balanced accuracy, F1, AUROC (only when the judge gave probabilities), accuracy, precision and recall."""
    y_all = np.asarray(labels, dtype=bool)
    p_all = np.asarray(probabilities, dtype=np.float64)
    if y_all.shape != p_all.shape:
        raise ValueError(f"{y_all.size} labels but {p_all.size} probabilities")
    answered = np.isfinite(p_all)
    y, p = y_all[answered], p_all[answered]
    yes = p >= threshold
    tp, fp = int((yes & y).sum()), int((yes & ~y).sum())
    fn, tn = int((~yes & y).sum()), int((~yes & ~y).sum())
    n_pos, n_neg = tp + fn, fp + tn

    def ratio(num: int, den: int, why: str) -> Metric:
        return Metric(num / den) if den else Metric(None, why)

    recall = ratio(tp, n_pos, "no positive items")
    specificity = ratio(tn, n_neg, "no negative items")
    if recall.value is None or specificity.value is None:
        balanced = Metric(None, f"needs both positive and negative items ({n_pos} positive, {n_neg} negative)")
    else:
        balanced = Metric((recall.value + specificity.value) / 2)
    if has_probabilities:
        area = auroc(y, p)
    else:
        area = Metric(None, "the judge gave answers without probabilities")
    return ClassificationScores(
        balanced_accuracy=balanced,
        f1=ratio(2 * tp, 2 * tp + fp + fn, "no positive items and no positive answers"),
        auroc=area,
        accuracy=ratio(tp + tn, len(y), "no answered items"),
        precision=ratio(tp, tp + fp, "the judge never answered yes"),
        recall=recall,
        n_positive=int(y_all.sum()),
        n_negative=int((~y_all).sum()),
        n_unanswered=int((~answered).sum()),
        n_yes=tp + fp,
        f1_chance=ratio(2 * n_pos, 2 * n_pos + n_neg, "no answered items"),
    )
