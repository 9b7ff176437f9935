"""Results that flag their own weaknesses: degenerate judges, F1 beside its chance level, copied or repeated
explanations, scores over too few items."""

from __future__ import annotations

import numpy as np
import pytest

from nbutils.llm.prompts import WORKED_EXAMPLES
from nbutils.score.contract import ScoredSide, UnitScores, scorer
from nbutils.score.flags import copied_example, explanation_notes, f1_text, judge_notes, score_set_notes, with_notes
from nbutils.score.metrics import Metric, ScoreSet, classification_scores
from nbutils.subject.planted import BUILT_IN
from nbutils.view.tables import column_text, score_rows


def _task(labels, probs, has_probabilities=True):
    return classification_scores(np.array(labels, bool), np.array(probs, float), has_probabilities)


def test_an_always_yes_judge_is_degenerate_and_its_f1_is_chance():
    labels = [1] * 10 + [0] * 6
    task = _task(labels, np.linspace(0.6, 0.9, 16))  # every P(yes) above 0.5: yes to all 16 items
    assert task.balanced_accuracy.value == 0.5
    # an always-yes judge: precision 10/16, recall 1, so F1 = 2 * 10 / (2 * 10 + 6)
    assert task.f1.value == pytest.approx(20 / 26) and task.f1_chance.value == pytest.approx(20 / 26)
    notes = judge_notes(task)
    assert notes == ["degenerate judge: answered yes to all 16 items (balanced accuracy 0.5 by construction)"]
    detection = scorer("detection")
    assert column_text(ScoredSide(None, {"detection": task}), detection, detection.columns[0]).endswith(
        "\u26a0 " + notes[0]
    )
    assert f1_text(task) == "0.769 (always-yes 0.769)"
    assert column_text(ScoredSide(None, {"detection": task}), detection, detection.columns[1]).startswith(
        "0.769 (always-yes 0.769) \u26a0"
    )
    assert task.auroc.value is not None  # P(yes) still ranks the items: AUROC is not degenerate

    always_no = _task([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [0.1] * 10)
    assert judge_notes(always_no)[0].startswith("degenerate judge: answered no to all 10")
    fine = _task([1] * 5 + [0] * 5, [0.9] * 4 + [0.2] + [0.1] * 5)
    fuzzing = scorer("fuzzing")
    side = ScoredSide(None, {"fuzzing": fine})
    assert judge_notes(fine) == [] and "\u26a0" not in column_text(side, fuzzing, fuzzing.columns[0])


def test_too_few_items_are_noted():
    few = _task([1, 1, 1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.2, 0.9, 0.6, 0.1, 0.7])
    assert judge_notes(few) == ["only 2 negative items"]

    def scores(n):
        return ScoreSet(Metric(0.4), Metric(None, "-"), Metric(None, "-"), n, 16 * n)

    assert score_set_notes(scores(2)) == ["only 2 excerpts"]
    assert score_set_notes(scores(12)) == [] and score_set_notes(None) == []
    assert with_notes("0.400", ["only 2 excerpts"]) == "0.400 \u26a0 only 2 excerpts"


def test_copies_of_worked_examples_and_repeats_are_flagged():
    first = WORKED_EXAMPLES[0].explanation  # "names of months, most of all when a date follows"
    assert copied_example("names of months, most of them are never reached unless by a specific date") == 0
    assert copied_example("Names of months and take them as an input") == 0  # case and punctuation ignored
    assert copied_example("tokens in brackets, more strongly when deeply nested inside code") == 1  # 4 words shared
    assert copied_example("the word 'the' at the start of a sentence") is None
    for planted in BUILT_IN:  # hand-written ground truths are not copies
        assert copied_example(planted.explanation) is None, planted.explanation
    notes = explanation_notes(
        {
            (0, 1, "positive"): first,
            (7, 2, "positive"): "words about cooking and recipes",
            (7, 3, "positive"): "words about cooking and recipes, mostly verbs",
            (9, 9, "positive"): None,
        }
    )
    assert set(notes) == {(0, 1, "positive"), (7, 2, "positive"), (7, 3, "positive")}
    assert notes[(0, 1, "positive")][0].startswith("copies worked example 1 of the prompt")
    assert notes[(7, 2, "positive")] == ["same as the explanation of 1 other neuron (L7 N3)"]


def _simulated(value, n_excerpts, low=None, high=None):
    """A simulation scorer's result with one top+random correlation (the other sets undefined)."""
    from nbutils.score.metrics import Calibration
    from nbutils.score.simulation import SimulationResult

    undefined = ScoreSet(Metric(None, "not scored"), Metric(None, "-"), Metric(None, "-"), 0, 0)
    top = ScoreSet(Metric(value, None, low, high), Metric(None, "-"), Metric(None, "-"), n_excerpts, 64)
    return SimulationResult(Calibration(1.0, 0.0), top, undefined, undefined, undefined)


def test_stage_tables_carry_the_notes():
    judged = _task([1] * 3 + [0] * 3, [0.9] * 6)
    base = ScoredSide("the tokens", {"simulation": _simulated(0.5, 2)})
    results = [
        UnitScores(layer=0, neuron=n, sign="positive", explanation=WORKED_EXAMPLES[0].explanation,
                   results={"simulation": _simulated(0.1, 10, 0.0, 0.2), "detection": judged}, baseline=base)
        for n in (1, 2)
    ]  # fmt: skip
    row = score_rows(results)[0]
    assert (
        "copies worked example 1" in row["explanation"] and "same as the explanation of 1 other" in row["explanation"]
    )
    detection = row["detection balanced accuracy"]
    assert "degenerate judge" in detection and "only 3 negative items" in detection
    assert row["baseline top+random"] == "0.500 \u26a0 only 2 excerpts" and "\u26a0" not in row["top+random"]


def test_a_calibrated_r_squared_beside_a_negative_correlation_says_why():
    from nbutils.core.records import Excerpt
    from nbutils.score.simulation import score_predictions

    rng = np.random.default_rng(0)
    names = ("calibration_top", "calibration_random", "valid_top", "valid_random", "stratified")
    splits = {n: [] if n == "stratified" else [Excerpt(["t"] * 16, rng.gamma(1.0, 1.0, 16)) for _ in range(6)]
              for n in names}  # fmt: skip
    # a simulation that runs opposite to the activations, everywhere (plus a little noise)
    predicted = {n: [10 - 3 * e.activations + rng.normal(0, 0.1, 16) for e in splits[n]] for n in names}
    result = ScoredSide(None, {"simulation": score_predictions(splits, predicted, n_boot=0, seed=0)})
    sim = scorer("simulation")
    corr, rsq = (next(c for c in sim.columns if c.label == lab) for lab in ("top+random", "R\u00b2 (calibrated)"))
    assert corr.value(result.of("simulation")) < -0.9 and rsq.value(result.of("simulation")) > 0.8
    text = column_text(result, sim, rsq)
    assert "negative slope" in text and "correlation is negative" in text
    assert "\u26a0" not in column_text(result, sim, corr)  # the correlation itself needs no note
    # the same simulation, the right way round: no note on its R²
    right = {n: [3 * e.activations + rng.normal(0, 0.1, 16) for e in splits[n]] for n in names}
    result = ScoredSide(None, {"simulation": score_predictions(splits, right, n_boot=0, seed=0)})
    assert "\u26a0" not in column_text(result, sim, rsq)
    # a constant simulation (a rule that matches nothing): the calibrated R² is that of predicting one number,
    # positive for activations >= 0, and says so; the correlation is undefined and says why
    flat = {n: [np.zeros(16) for _ in splits[n]] for n in names}
    result = ScoredSide(None, {"simulation": score_predictions(splits, flat, n_boot=0, seed=0)})
    assert rsq.value(result.of("simulation")) > 0 and "simulation is constant" in column_text(result, sim, rsq)
    assert "the simulation is 0 on every token (the explanation matches nothing" in column_text(result, sim, corr)


def test_a_table_marks_each_note_and_explains_each_kind_once():
    import re

    from nbutils.view.tables import table_html

    rows = [
        {"unit": "L0 N1", "f1": with_notes("0.500", ["degenerate judge: answered yes to all 8 items (by construction)"])},
        {"unit": "L0 N2", "f1": with_notes("0.610", ["only 2 positive items"])},
        {"unit": "L0 N3", "f1": with_notes("0.700", ["only 3 positive items", "degenerate judge: answered no to all 9 items (by construction)"])},
        {"unit": "L0 <b>4</b>", "f1": with_notes("0.800", [])},
        {"unit": "L0 N5", "f1": None},
        {"unit": "L0 N6", "f1": float("nan")},
    ]  # fmt: skip
    page = table_html(rows)
    table, legend = page.split("</table>")
    shown = re.sub(r"<[^>]+>", " ", table)  # the table's visible text (tooltips are attributes, not text)
    assert "degenerate judge" not in shown and "positive items" not in shown  # markers, not sentences
    assert shown.count("\u26a0") == 3 and "\u26a02,3" in shown.replace(" ", "")  # N3 carries two kinds
    assert 'title="only 2 positive items"' in table  # each cell's own notes in its tooltip
    assert "&lt;b&gt;4&lt;/b&gt;" in table and ">-<" in table.replace(" ", "")  # escaped; None and NaN as "-"
    items = re.findall(r"<li>(.*?)</li>", legend)
    assert items == [
        "\u26a01 degenerate judge: answered yes to all N items (by construction) (1 cell)",
        "\u26a02 only N positive items (2 cells)",
        "\u26a03 degenerate judge: answered no to all N items (by construction) (1 cell)",
    ]
    assert with_notes("0.800", ["only 2 excerpts"]).notes == ("only 2 excerpts",)  # a Noted is still a str
    assert table_html([{"a": 1.23456}]).endswith("</table>")  # no notes: no legend


def test_a_legend_line_generalises_counts_not_values():
    from nbutils.view.tables import note_kind

    note = "degenerate judge: answered yes to all 10 items (balanced accuracy 0.5 by construction)"
    assert note_kind(note) == "degenerate judge: answered yes to all N items (balanced accuracy 0.5 by construction)"
    assert note_kind("same as the explanation of 2 other neurons (L1 N0, L4 N2)") == (
        "same as the explanation of N other neurons"
    )
