"""Detection and fuzzing: metrics against hand-computed cases, item construction, the baseline judge."""

from __future__ import annotations

import numpy as np
import pytest

from nbutils.core.errors import UserError
from nbutils.core.records import Excerpt, UnitRecord, split_excerpts
from nbutils.core.units import UnitId
from nbutils.llm.prompts import JudgeItem, judge_piece, judge_prefix, marked_text
from nbutils.score.baseline import token_lookup_judge
from nbutils.score.classification import active_threshold, judge_items, task_result
from nbutils.score.metrics import auroc, classification_scores


def test_classification_metrics_by_hand():
    labels = np.array([1, 1, 1, 0, 0], dtype=bool)
    probs = np.array([0.9, 0.6, 0.2, 0.4, 0.7])
    s = classification_scores(labels, probs)
    # answers yes, yes, no | no, yes: TP 2, FN 1, TN 1, FP 1
    assert s.recall.value == pytest.approx(2 / 3) and s.precision.value == pytest.approx(2 / 3)
    assert s.balanced_accuracy.value == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s.f1.value == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert s.accuracy.value == pytest.approx(3 / 5)
    # pairs positive > negative: 0.9 beats both, 0.6 beats 0.4 only, 0.2 beats none: 3 of 6
    assert s.auroc.value == pytest.approx(0.5)
    assert (s.n_positive, s.n_negative, s.n_unanswered) == (3, 2, 0)


def test_auroc_counts_ties_as_half_and_matches_an_roc_curve():
    assert auroc(np.array([1, 0], bool), np.array([0.5, 0.5])).value == 0.5
    assert auroc(np.array([1, 1, 0], bool), np.array([0.8, 0.5, 0.5])).value == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounded: many ties
    # independent: trapezoid area under the ROC curve swept over every distinct threshold
    cuts = np.r_[np.inf, np.unique(s)[::-1]]
    tpr = [(s[y] >= c).mean() for c in cuts]
    fpr = [(s[~y] >= c).mean() for c in cuts]
    area = float(np.sum(np.diff(fpr) * (np.array(tpr[1:]) + np.array(tpr[:-1])) / 2))
    assert auroc(y, s).value == pytest.approx(area)


def test_undefined_classification_metrics_say_why():
    only_pos = classification_scores(np.array([1, 1], bool), np.array([0.9, 0.1]))
    assert only_pos.balanced_accuracy.value is None and "negative" in only_pos.balanced_accuracy.reason
    assert only_pos.auroc.value is None and only_pos.recall.value == 0.5
    hard = classification_scores(np.array([1, 0], bool), np.array([1.0, 0.0]), has_probabilities=False)
    assert hard.balanced_accuracy.value == 1.0 and hard.auroc.value is None and "probabilities" in hard.auroc.reason
    nothing = classification_scores(np.array([0, 0], bool), np.array([0.1, 0.2]))
    assert nothing.f1.value is None and nothing.precision.value is None and nothing.accuracy.value == 1.0
    unanswered = classification_scores(np.array([1, 0, 1], bool), np.array([0.9, np.nan, 0.8]))
    assert unanswered.n_unanswered == 1 and unanswered.balanced_accuracy.value is None  # the only negative is gone
    with pytest.raises(ValueError):
        classification_scores(np.array([1, 0], bool), np.array([0.5]))


def _excerpt(index: int, acts: list[float]) -> Excerpt:
    return Excerpt([f" t{index}_{i}" for i in range(len(acts))], np.array(acts, dtype=np.float32), index=index)


def _record() -> UnitRecord:
    top = [_excerpt(i, [0, 10 - i, 0, 1, 0, 0]) for i in range(12)]  # max 10 in the first (a train excerpt)
    rand = [_excerpt(100 + i, [0, 0.4 * (i % 4), 0, 0, 0, 0]) for i in range(15)]  # max 0 .. 1.2
    bands = [[_excerpt(200 + 3 * b + j, [0, 0, 2.0 * b, 0, 0, 0]) for j in range(3)] for b in range(4)]
    return UnitRecord(
        UnitId(3, 7), top, rand, bands, [(0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 0.999)], [0, 1, 2, 3, 4],
        0.1, 1.0, 0.0, 0.0, 10.0, 0.0,
    )  # fmt: skip


def test_items_split_activating_from_silent_at_a_tenth_of_the_shown_maximum():
    rec = _record()
    assert active_threshold(rec) == pytest.approx(1.0)  # train excerpts are top[0::4]; the largest max is 10
    shown = {e.index for e in split_excerpts(rec)["train"]}
    acts = {e.index: e.activations for e in rec.top + rec.random + [e for b in rec.bands for e in b]}
    items, threshold = judge_items(rec, "detection", per_class=50)
    assert threshold == pytest.approx(1.0)
    assert not {j.index for j in items} & shown  # nothing the explainer saw
    for j in items:
        assert j.label == (acts[j.index].max() >= 1.0) and j.item.marked is None
    assert {j.source for j in items if j.label} >= {"top", "random", "band 0.5-0.9"}
    assert sum(j.label for j in items) > 0 and sum(not j.label for j in items) > 0
    small, _ = judge_items(rec, "detection", per_class=3)
    assert sum(j.label for j in small) == 3 and sum(not j.label for j in small) == 3


def test_fuzzing_marks_the_active_tokens_or_only_silent_ones():
    rec = _record()
    acts = {e.index: e.activations for e in rec.top + rec.random + [e for b in rec.bands for e in b]}
    items, threshold = judge_items(rec, "fuzzing", per_class=6, seed=1)
    positives = [j for j in items if j.label]
    negatives = [j for j in items if not j.label]
    assert len(positives) == 6 and len(negatives) == 6
    for j in positives:
        assert j.kind == "correct marks"
        assert j.item.marked == tuple(bool(a >= threshold) for a in acts[j.index])
    kinds = {j.kind for j in negatives}
    assert kinds == {"wrong marks", "random marks"}
    for j in negatives:
        marked = [i for i, m in enumerate(j.item.marked) if m]
        assert marked and all(acts[j.index][i] < threshold for i in marked)  # never an active token
    again, _ = judge_items(rec, "fuzzing", per_class=6, seed=1)
    assert [j.item for j in again] == [j.item for j in items]  # seeded


def test_token_lookup_baseline_judge_by_hand():
    table = {" a": 2.0, " b": 0.5}
    from nbutils.score.classification import Judged

    items = [
        Judged(JudgeItem((" a", " c")), True, "top", 1, "activating"),
        Judged(JudgeItem((" b", " c")), False, "random", 2, "silent"),
        Judged(JudgeItem((" a", " b"), (True, True)), True, "top", 1, "correct marks"),
        Judged(JudgeItem((" a", " c"), (False, True)), False, "top", 1, "wrong marks"),
    ]
    got = token_lookup_judge(table, [j.item for j in items])
    assert got.tolist() == [2.0, 0.5, 0.5, 0.0]  # max over tokens; min over marked tokens
    result = task_result(items[:2], got[:2], True, threshold=1.0)
    assert result.balanced_accuracy.value == 1.0 and result.auroc.value == 1.0


def test_judge_prompt_pieces():
    assert marked_text([" The", " big", " cat", "\n", "sat"], [False, True, True, False, False]) == (
        " The <<big cat>>\u21b5sat"
    )
    assert marked_text(["a", "b"], [False, True]) == "a<<b>>"
    piece = judge_piece(JudgeItem(("x", "<y>"), (False, True)))
    assert piece == "Text: x<<<y>>>\nMatch:\t"
    prefix = judge_prefix("detection", "digits")
    assert prefix.endswith("Explanation: the main thing this neuron does is find digits.\n")
    assert prefix.count("Match:\t1\n") >= 3 and prefix.count("Match:\t0\n") >= 2  # worked answers of both kinds
    assert "<<" in judge_prefix("fuzzing", "digits") and "<<" not in prefix


def test_stratified_split_takes_the_same_number_from_every_band():
    rec = _record()
    rec.bands[1] = rec.bands[1][:1]  # one band has a single excerpt: every band gives one
    strat = split_excerpts(rec, per_band=2)["stratified"]
    assert [e.index for e in strat] == [200, 203, 206, 209]
    assert len(split_excerpts(rec, per_band=0)["stratified"]) == 0
    assert split_excerpts(rec, negative=True, per_band=2)["stratified"] == []  # bands are positive-side samples


def test_stratified_excerpts_are_never_train_or_calibration_excerpts():
    rec = _record()
    sp = split_excerpts(rec)
    used = [sp["train"][0], sp["calibration_top"][0], sp["calibration_random"][1]]
    rec.bands[2] = used + rec.bands[2]  # a band sample may hold any excerpt whose max fell in the band
    strat = split_excerpts(rec, per_band=3)["stratified"]
    assert len(strat) == 4 * 3 and not {e.index for e in strat} & {e.index for e in used}


def test_paper_split_is_neuron_explainers_equal_interleaved_split():
    rec = _record()  # 12 top, 15 random excerpts
    ours = split_excerpts(rec)
    assert [len(ours[k]) for k in ("train", "valid_top", "valid_random")] == [3, 3, 5]
    paper = split_excerpts(rec, split="paper")
    n = min(12 // 4, 15 // 3)  # ActivationRecordSliceParams(n_examples_per_split=None): equal splits
    assert [e.index for e in paper["valid_top"]] == [e.index for e in rec.top[2 : 4 * n : 4]]
    assert [e.index for e in paper["valid_random"]] == [e.index for e in rec.random[1 : 3 * n : 3]]
    assert len(paper["valid_top"]) == len(paper["valid_random"]) == n  # 1:1
    assert [e.index for e in paper["train"]] == [e.index for e in rec.top[0 : 4 * n : 4]]
    with pytest.raises(UserError, match="split='papers'"):
        split_excerpts(rec, split="papers")
