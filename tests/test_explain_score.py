"""Stages 02 and 03 on the embedded model: best-of-n, baselines, held-out scoring, resume, OpenAI results JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.io import read_jsonl
from nbutils.core.layout import explanations, scores
from nbutils.core.records import Excerpt, UnitRecord, split_excerpts
from nbutils.core.results import OutputsShown
from nbutils.core.store import ResultStore, StoredSequence
from nbutils.core.units import UnitId
from nbutils.explain.explainer import explain_unit
from nbutils.explain.stage import run_explain_stage
from nbutils.interop.neuron_explainer import from_openai_results, to_openai_results
from nbutils.score.baseline import token_lookup_explanation, token_lookup_simulate, token_table
from nbutils.score.contract import ScoreSettings, UnitDetails, UnitScores, registered
from nbutils.score.metrics import Metric
from nbutils.score.stage import run_score_stage, score_entry


@pytest.fixture(scope="module")
def collection(embedded, tmp_path_factory):
    excerpts = make_excerpts(embedded.tokenizer, load_texts("embedded"), 64, 64, seed=4, corpus="embedded")
    cfg = CollectConfig(
        layers=[2, 20], neurons=[5, 77], top_k=8, n_random=6, band_size=2, quantile_warmup=16, batch_size=16
    )
    out = tmp_path_factory.mktemp("stage") / "01_collect"
    return collect_activations(embedded, excerpts, out, cfg, progress=False)


def test_token_lookup_baseline_by_hand():
    ex = [
        Excerpt(["a", "b", "a"], np.array([1.0, 0.0, 3.0])),
        Excerpt(["b", "c"], np.array([2.0, 5.0])),
    ]
    table = token_table(ex)
    assert table == {"a": 2.0, "b": 1.0, "c": 5.0}
    assert token_lookup_explanation(table, 2) == 'the tokens "c", "a"'
    sim = token_lookup_simulate(table, [Excerpt(["c", "z", "a"], np.zeros(3))])
    assert sim[0].tolist() == [5.0, 0.0, 2.0]


def test_explain_and_score_stages(collection, tmp_path):
    config = RunConfig(explain_neurons=[[2, 5], [20, 77]], n_samples=2, seed=3, n_boot=50, keep_distributions=True)
    entries = run_explain_stage(collection.path, tmp_path / "02", config, progress=False)
    assert [e.key for e in entries] == [(2, 5, "positive"), (20, 77, "positive")]
    assert not explanations(tmp_path / "02").jsonl.exists()  # no file rewritten whole at the stage's end
    with ResultStore(tmp_path / "02") as stored:  # the export on request streams the chosen entries
        assert stored.export_jsonl(tmp_path / "x" / "explanations.jsonl") == 2
    assert read_jsonl(tmp_path / "x" / "explanations.jsonl") == [e.to_dict() for e in entries]
    for e in entries:
        assert len(e.candidates) == 2 and e.baseline.explanation.startswith("the tokens ")
        usable = [c for c in e.candidates if c.explanation]
        if usable and e.explanation:
            scored = [c for c in usable if c.calibration_score is not None]
            if scored:  # best-of-n keeps the candidate with the best calibration score
                assert e.explanation == max(scored, key=lambda c: c.calibration_score).explanation
                assert e.kept.explanation == e.explanation
    usage = json.loads((tmp_path / "02" / "usage.json").read_text())
    assert usage["prompt_tokens"] > 1000 and usage["completion_tokens"] > 0
    again = run_explain_stage(collection.path, tmp_path / "02", config)
    assert again == entries and list(again) == list(entries)  # nothing redone

    results = run_score_stage(collection.path, tmp_path / "02", tmp_path / "03", config, progress=False)
    assert len(results) == 2 and not scores(tmp_path / "03").jsonl.exists()
    assert list(StoredSequence.of(tmp_path / "03", dict)) == [r.to_dict() for r in results]
    assert [UnitScores.from_dict(r.to_dict()) for r in results] == results  # written and read back as written
    for r in results:
        assert r.to_dict()["format"] == 2 and {"simulation", "detection", "fuzzing"} <= set(r.baseline.results)
        for key in ("top_and_random", "random_only", "top_only"):
            assert isinstance(r.baseline.of("simulation").set(key).rsquared, Metric)
            if r.explanation and r.of("simulation") is not None:
                m = r.of("simulation").set(key).correlation
                assert (m.value is None) == (m.reason is not None)
        if not r.explanation or r.of("simulation") is None:
            continue
        sim = UnitDetails.from_dict(ResultStore(tmp_path / "03").details(r.key))
        record = collection.record(r.layer, r.neuron)
        train = {e.index for e in split_excerpts(record)["train"]}
        scored = sim.of("simulation").excerpts
        assert train and not train & {x.index for x in scored}  # the explainer's excerpts are never scored
        for x in scored:
            assert len(x.tokens) == len(x.true) == len(x.expected) == len(x.distribution) == 64
            np.testing.assert_allclose(np.array(x.distribution) @ np.arange(11), x.expected, atol=1e-3)
        # OpenAI neuron-explainer results JSON round trip
        exported = to_openai_results(sim)
        assert exported["dataclass_name"] == "NeuronSimulationResults"
        seqs = exported["scored_explanations"][0]["scored_simulation"]["scored_sequence_simulations"]
        assert {s["dataclass_name"] for s in seqs} == {"ScoredSequenceSimulation"}
        assert seqs[0]["simulation"]["dataclass_name"] == "SequenceSimulation"
        back = from_openai_results(json.loads(json.dumps(exported)))[0]
        valid = sim.of("simulation").valid()
        assert [x.tokens for x in back.of("simulation").excerpts] == [x.tokens for x in valid]
        assert [x.expected for x in back.of("simulation").excerpts] == [x.expected for x in valid]
        back.of("simulation").calibration = sim.of("simulation").calibration
        assert to_openai_results(back) == exported
        back.of("simulation").calibration = None
        pooled = exported["scored_explanations"][0]["scored_simulation"]
        mine = r.of("simulation").top_and_random
        assert pooled["ev_correlation_score"] == pytest.approx(mine.correlation.value)
        for name in ("rsquared", "absolute_dev_explained"):  # written when a calibration exists, as stage 03 scores
            assert pooled[f"{name}_score"] == pytest.approx(getattr(mine, name).value)
        uncalibrated = to_openai_results(back)["scored_explanations"][0]["scored_simulation"]
        assert uncalibrated["rsquared_score"] is None and uncalibrated["absolute_dev_explained_score"] is None
    assert run_score_stage(collection.path, tmp_path / "02", tmp_path / "03", config) == results  # resumed


def test_openai_results_keep_per_token_distribution_values():
    """neuron-explainer stores, per token, the values its simulator saw; they differ from token to token."""
    values = [[0.0, 1.0, 2.5], [0.0, 10.0], [3.0, 4.0, 5.0, 6.0]]
    probs = [[0.5, 0.25, 0.25], [0.9, 0.1], [0.25, 0.25, 0.25, 0.25]]
    seq = {
        "dataclass_name": "SequenceSimulation",
        "tokens": ["a", "b", "c"],
        "expected_activations": [float(np.dot(v, p)) for v, p in zip(values, probs)],
        "activation_scale": "simulated_normalized_activations",
        "distribution_values": values,
        "distribution_probabilities": probs,
        "uncalibrated_simulation": None,
    }
    obj = {
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 3, "neuron_index": 7},
        "scored_explanations": [
            {
                "dataclass_name": "ScoredExplanation",
                "explanation": "letters",
                "scored_simulation": {
                    "dataclass_name": "ScoredSimulation",
                    "scored_sequence_simulations": [
                        {"dataclass_name": "ScoredSequenceSimulation", "simulation": seq, "true_activations": [0, 1, 2]}
                    ],
                },
            }
        ],
    }
    (rec,) = from_openai_results(obj)
    assert rec.of("simulation").excerpts[0].distribution_values == values  # every token's own values, as floats
    back = to_openai_results(rec)["scored_explanations"][0]["scored_simulation"]["scored_sequence_simulations"][0]
    assert (
        back["simulation"]["distribution_values"] == values
        and back["simulation"]["distribution_probabilities"] == probs
    )


def test_a_neuron_that_never_activates(collection):
    flat = [Excerpt(["x"] * 4, np.zeros(4), index=i) for i in range(8)]
    record = UnitRecord(UnitId(2, 5), flat, flat[:6], [], [], [], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    entry = explain_unit(record, llm=None)
    assert entry.explanation is None and "never activates" in entry.failure

    class Store:  # the scorer reads the record through the same interface as RecordStore
        def record(self, layer, neuron):
            return record

    scorers = [s for s in registered() if not s.needs_subject]  # no subject model here
    result, sim = score_entry(entry, Store(), None, scorers, ScoreSettings())
    assert sim is None and "never activates" in result.failure
    corr = result.baseline.of("simulation").top_and_random.correlation
    assert corr.value is None and "constant" in corr.reason


def test_the_output_aware_explainer_sees_what_the_neuron_writes(collection, embedded):
    from nbutils.explain.contract import outputs_shown
    from nbutils.llm.local import LocalBackend
    from nbutils.llm.prompts import EXPLAIN_OUTPUTS_NOTE, explanation_messages, show_token

    record = collection.record(20, 77)
    raised, lowered = outputs_shown(record)
    assert raised == tuple(t for t, _ in record.writes["promotes"][:8])
    assert outputs_shown(record, negative=True) == (lowered, raised)  # a negative side writes the reverse
    llm = LocalBackend(embedded)
    entry = explain_unit(record, llm, seed=1, with_outputs=True)
    assert entry.outputs_shown == OutputsShown(list(raised), list(lowered)) and entry.explanation
    assert "outputs_shown" not in explain_unit(record, llm, seed=1).to_dict()
    shown = explanation_messages((), writes=(raised, lowered))
    assert shown[0]["content"].endswith(EXPLAIN_OUTPUTS_NOTE)
    assert f"Makes more likely as the next token: {json.dumps(show_token(raised[0]))}" in shown[-1]["content"]
    assert "Makes more likely" not in explanation_messages(())[-1]["content"]
