"""Scores against hand-computed values and the edge cases where a correlation does not exist."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nbutils.score.metrics import Calibration, bootstrap_interval, calibrate, correlation, score


def test_correlation_matches_hand_computation():
    # means 0.75 and 1.25; sum of cross products 3.25; sums of squares 2.75 and 4.75
    got = correlation(np.array([0, 0, 1, 2]), np.array([1, 0, 1, 3]))
    assert got.value == pytest.approx(3.25 / math.sqrt(2.75 * 4.75))
    assert correlation(np.array([1, 2, 3]), np.array([3, 2, 1])).value == pytest.approx(-1.0)


def test_correlation_is_pooled_over_tokens_not_averaged_over_excerpts():
    true = [np.array([0.0, 1.0]), np.array([10.0, 11.0])]
    pred = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    # each excerpt alone correlates perfectly; pooled: cross products sum to 1, squares to 101 and 1
    s = score(true, pred, n_boot=0)
    assert s.correlation.value == pytest.approx(1 / math.sqrt(101))
    assert s.n_tokens == 4 and s.n_excerpts == 2


@pytest.mark.parametrize(
    "true, pred, reason",
    [
        ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0], "true activations are constant"),
        ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], "simulated activations are constant"),
        ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], "the simulation is 0 on every token (the explanation matches nothing"),
        ([1.0], [1.0], "fewer than two tokens"),
        ([1.0, np.nan], [1.0, 2.0], "non-finite"),
    ],
)
def test_undefined_correlation_says_why(true, pred, reason):
    m = correlation(np.array(true), np.array(pred))
    assert m.value is None and not m.defined and reason in m.reason
    assert "undefined" in str(m)


@pytest.mark.parametrize("side", ["true", "simulated"])
def test_a_nan_makes_every_score_undefined_with_the_reason(side):
    good, bad = np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0])
    true, pred = (bad, good) if side == "true" else (good, bad)
    s = score([true], [pred], calibration=Calibration(1.0, 0.0), n_boot=10)
    for m in (s.correlation, s.rsquared, s.absolute_dev_explained):
        assert m.value is None and f"among the {side} activations" in m.reason


def test_calibration_and_secondary_scores():
    p = np.array([0.0, 1.0, 2.0, 5.0])
    cal = calibrate([p[:2], p[2:]], [p[:2] * 0.5 - 1, p[2:] * 0.5 - 1])  # true = 2 * sim + 2
    assert (cal.slope, cal.intercept) == pytest.approx((2.0, 2.0))
    assert calibrate([np.ones(3)], [np.zeros(3)]) == Calibration(0.0, 1.0)  # constant simulation: mean only
    # true [1, 2, 3] vs simulated [1, 2, 4] in activation units: mse 1/3, mean square 14/3; mae 1/3, mean |t| 2
    s = score([np.array([1.0, 2.0, 3.0])], [np.array([1.0, 2.0, 4.0])], calibration=Calibration(1.0, 0.0), n_boot=0)
    assert s.rsquared.value == pytest.approx(1 - 1 / 14)
    assert s.absolute_dev_explained.value == pytest.approx(1 - 1 / 6)
    exact = score([np.array([1.0, 3.0, 5.0])], [np.array([0.0, 1.0, 2.0])], calibration=Calibration(2.0, 1.0))
    assert exact.rsquared.value == pytest.approx(1.0) and exact.absolute_dev_explained.value == pytest.approx(1.0)
    none = score([np.array([1.0, 2.0])], [np.array([1.0, 3.0])], n_boot=0)
    assert none.rsquared.value is None and "calibration" in none.rsquared.reason
    zero = score([np.zeros(3)], [np.array([1.0, 2.0, 3.0])], calibration=Calibration(1.0, 0.0), n_boot=0)
    assert zero.rsquared.value is None and zero.correlation.value is None


def _bootstrap_by_concatenation(true, pred, n_boot, seed=0):
    """The interval computed the direct way: concatenate each resample's excerpts and correlate them."""
    rng, values = np.random.default_rng(seed), []
    for _ in range(n_boot):
        pick = rng.integers(0, len(true), len(true))
        m = correlation(np.concatenate([true[i] for i in pick]), np.concatenate([pred[i] for i in pick]))
        if m.value is not None:
            values.append(m.value)
    if len(values) < n_boot // 2:
        return None, None
    return tuple(float(x) for x in np.percentile(values, [2.5, 97.5]))


def test_bootstrap_interval_equals_the_direct_computation_including_degenerate_resamples():
    rng = np.random.default_rng(1)
    undefined = 0
    for _ in range(60):
        n = int(rng.integers(2, 10))
        # some excerpts silent (all zero) and some predictions constant: resamples of only those are undefined
        true = [np.maximum(rng.normal(size=int(rng.integers(1, 12))), 0) * (rng.random() < 0.5) for _ in range(n)]
        pred = [t * 0.5 + rng.normal(size=t.size) * 0.3 * (rng.random() < 0.7) for t in true]
        direct, fast = _bootstrap_by_concatenation(true, pred, 200), bootstrap_interval(true, pred, 200)
        assert (direct[0] is None) == (fast[0] is None)
        undefined += direct[0] is None
        if direct[0] is not None:
            assert np.allclose(direct, fast, atol=1e-12, rtol=0)
    assert 0 < undefined < 60  # both kinds of case were met


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    true = [rng.normal(size=16) for _ in range(30)]
    pred = [t + rng.normal(scale=1.0, size=16) for t in true]
    s = score(true, pred, n_boot=300, seed=1)
    assert s.correlation.low < s.correlation.value < s.correlation.high
    assert 0.5 < s.correlation.value < 0.9 and s.correlation.high - s.correlation.low < 0.3
    assert bootstrap_interval(true[:1], pred[:1]) == (None, None)
    again = score(true, pred, n_boot=300, seed=1)
    assert (again.correlation.low, again.correlation.high) == (s.correlation.low, s.correlation.high)


def test_usage_totals_and_cost_estimate(tmp_path):
    from nbutils.core.errors import UserError
    from nbutils.llm.contract import Usage

    path = tmp_path / "usage.json"
    Usage(2, 1_000_000, 10_000).save(path)
    Usage(1, 500_000, 0).save(path, prices={"prompt": 0.2, "completion": 1.0})  # a resumed run adds to the totals
    import json

    saved = json.loads(path.read_text())
    assert (saved["requests"], saved["prompt_tokens"], saved["completion_tokens"]) == (3, 1_500_000, 10_000)
    assert saved["estimated_cost"] == pytest.approx(1.5 * 0.2 + 0.01 * 1.0)
    with pytest.raises(UserError, match="not 'prompt' or 'completion'"):
        Usage(1, 1, 1).cost({"input": 1.0})


def test_usage_saved_at_most_once_a_second_keeps_every_count(tmp_path):
    """A stage saves usage as units finish, but at most once a second; the counts held back are not lost:
    the next save (the stage's last, also when interrupted) moves them into the file."""
    import json

    from nbutils.llm.contract import Usage

    path, usage = tmp_path / "usage.json", Usage()
    usage.add(Usage(requests=1, prompt_tokens=10))
    assert usage.save(path, at_most_every=60.0)["requests"] == 1  # the first save always writes
    usage.add(Usage(requests=2, prompt_tokens=20))
    assert usage.save(path, at_most_every=60.0) is None  # too soon: nothing written, nothing reset
    assert json.loads(path.read_text())["requests"] == 1
    assert (usage.requests, usage.prompt_tokens) == (2, 20)
    usage.save(path)
    saved = json.loads(path.read_text())
    assert (saved["requests"], saved["prompt_tokens"], usage.requests) == (3, 30, 0)
