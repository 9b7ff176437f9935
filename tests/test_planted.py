"""Planted neurons: rules by hand, exact activations through the unchanged collector, user rules, the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.errors import UserError
from nbutils.core.io import read_jsonl
from nbutils.subject.loading import load_subject_model
from nbutils.subject.planted import BUILT_IN, PlantedNeuron, parenthesis_depth, per_token, planted_neurons

RULE_FILE = """
from nbutils.subject.planted import PlantedNeuron, per_token

PLANTED = [
    PlantedNeuron("commas", "commas", per_token(lambda t, i: t[i].strip() == ",")),
    PlantedNeuron("of", 'the word "of"', per_token(lambda t, i: t[i].strip() == "of")),
]
"""


def _rule(name: str):
    return next(n for n in BUILT_IN if n.name == name).activations


def test_built_in_rules_by_hand():
    toks = ["The", " cat", " (", "a", " (", "big", "))", " sat", ".", " Then", " ", "4", "2", " went", " the", " way"]
    assert _rule("digits")(toks).tolist() == [0] * 11 + [1, 1] + [0] * 3
    assert _rule("the")(toks).tolist() == [1] + [0] * 13 + [1, 0]
    assert _rule("sentence start")(toks).tolist() == [0] * 9 + [1] + [0] * 6
    # depth open before each token: "(" raises it for the tokens after, "))" closes two
    assert parenthesis_depth(toks) == [0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert parenthesis_depth([")", "a", "(", "b"]) == [0, 0, 0, 1]  # never below zero
    assert _rule("capitals")(toks).tolist() == [1] + [0] * 8 + [1] + [0] * 6


def test_a_rule_that_returns_the_wrong_length_is_refused():
    bad = PlantedNeuron("bad", "nothing", lambda tokens: [1.0])
    with pytest.raises(UserError, match="one finite number per token"):
        bad.activations(["a", "b"])


@pytest.fixture(scope="module")
def planted_collection(tmp_path_factory):
    subject = load_subject_model("planted")
    excerpts = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, 96, seed=2, corpus="embedded")
    cfg = CollectConfig(layers=None, top_k=8, n_random=8, band_size=2, quantile_warmup=32, batch_size=16)
    store = collect_activations(subject, excerpts, tmp_path_factory.mktemp("planted") / "01", cfg, progress=False)
    return store


def test_collected_activations_are_exactly_what_the_rules_say(planted_collection):
    store = planted_collection
    assert store.meta.model == "planted" and store.layers == [0]
    assert store.neurons(0).tolist() == list(range(len(BUILT_IN)))
    checked = 0
    for i, neuron in enumerate(BUILT_IN):
        rec = store.record(0, i)
        for e in rec.top + rec.random + [e for band in rec.bands for e in band]:
            # the rule applied to the stored tokens (decoded one by one, as the vocabulary holds them)
            np.testing.assert_array_equal(e.activations, neuron.activations(e.tokens))
            checked += 1
        assert rec.max == max(float(e.activations.max()) for e in rec.top)
    assert checked >= len(BUILT_IN) * 16  # 8 top and 8 random each, plus the filled band slots
    assert store.record(0, 0).top[0].max >= 1  # the corpus has digits


def test_user_rules_from_a_file(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(RULE_FILE)
    neurons = planted_neurons(f"planted:{path}")
    assert [n.name for n in neurons] == ["commas", "of"]
    subject = load_subject_model(f"planted:{path}")
    ids = subject.tokenizer("one, two of three", return_tensors="pt")["input_ids"]
    from nbutils.subject.sites import capture_neurons

    got = capture_neurons(subject.model, ids, [0])[0][0].numpy()
    toks = [subject.tokenizer.decode([i]) for i in ids[0].tolist()]
    assert got[:, 0].tolist() == [float(t.strip() == ",") for t in toks]
    assert got[:, 1].tolist() == [float(t.strip() == "of") for t in toks] and got[:, 1].sum() == 1
    # an edited rule file is a different model: its finished collection is refused, not silently reused
    excerpts = make_excerpts(subject.tokenizer, load_texts("embedded"), 16, 8, seed=0, corpus="embedded")
    cfg = CollectConfig(top_k=2, n_random=2, band_size=1, quantile_warmup=4, batch_size=4)
    collect_activations(subject, excerpts, tmp_path / "c", cfg, progress=False)
    path.write_text(RULE_FILE.replace('"of"', '"to"'))
    with pytest.raises(UserError, match="different settings"):
        collect_activations(load_subject_model(f"planted:{path}"), excerpts, tmp_path / "c", cfg, progress=False)
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(UserError, match="no list PLANTED"):
        planted_neurons(f"planted:{tmp_path / 'empty.py'}")
    with pytest.raises(UserError, match="does not exist"):
        planted_neurons("planted:/nowhere/rules.py")
    assert per_token(lambda t, i: i)(["a", "b", "c"]) == [0.0, 1.0, 2.0]


def test_the_oracle_scores_ground_truth_explanations_perfectly(planted_collection, tmp_path):
    from nbutils.core.config import RunConfig
    from nbutils.core.layout import explanations
    from nbutils.core.store import StoredSequence
    from nbutils.run.planted_bench import write_truth_explanations
    from nbutils.score.contract import UnitScores
    from nbutils.score.stage import run_score_stage

    write_truth_explanations(planted_collection.path, tmp_path / "02", "planted")
    oracle = RunConfig(simulator_backend="oracle", simulator_model="planted", n_boot=50, judge_per_class=4)
    results = run_score_stage(planted_collection.path, tmp_path / "02", tmp_path / "03", oracle, progress=False)
    assert len(results) == len(BUILT_IN) and list(StoredSequence.of(tmp_path / "03", UnitScores.from_dict)) == results
    for r in results:
        assert not r.failure, r.failure
        assert r.of("simulation").top_and_random.correlation.value == pytest.approx(1.0)
        for task in ("detection", "fuzzing"):
            assert r.of(task).balanced_accuracy.value == 1.0 and r.of(task).auroc.value == 1.0
            assert r.of(task).n_positive > 0 and r.of(task).n_negative > 0
        assert r.baseline.of("simulation") and r.baseline.of("detection")
    # an explanation the oracle does not know is a recorded failure, not a score
    entries = read_jsonl(explanations(tmp_path / "02").jsonl)
    entries[0]["explanation"] = "something else entirely"
    from nbutils.core.io import write_jsonl

    write_jsonl(explanations(tmp_path / "02b").jsonl, entries[:1])
    unknown = RunConfig(simulator_backend="oracle", n_boot=0)
    (failed,) = run_score_stage(planted_collection.path, tmp_path / "02b", tmp_path / "03b", unknown, progress=False)
    assert "knows no planted neuron" in failed.failure and not failed.retryable


ALWAYS_ON_FILE = """
from nbutils.subject.planted import PlantedNeuron, per_token

PLANTED = [
    # on everywhere, with a spike at each excerpt's first token: the largest max/std of the two
    PlantedNeuron("always", "every token", per_token(lambda t, i: 1.0 + 20.0 * (i == 0))),
    PlantedNeuron("digits", "digits", per_token(lambda t, i: any(c.isdigit() for c in t[i]))),
]
"""


def test_strongest_passes_over_a_unit_active_on_every_excerpt(tmp_path):
    """ "strongest:N" ranks by max over standard deviation; a unit active on every excerpt ranks high by it, but
    detection and fuzzing cannot judge an explanation of it (no silent excerpt): the next one is picked."""
    from nbutils.explain.selection import units_to_explain
    from nbutils.score.classification import has_silent_excerpts

    path = tmp_path / "rules.py"
    path.write_text(ALWAYS_ON_FILE)
    subject = load_subject_model(f"planted:{path}")
    excerpts = make_excerpts(subject.tokenizer, load_texts("embedded"), 32, 64, seed=0, corpus="embedded")
    cfg = CollectConfig(top_k=6, n_random=8, band_size=1, quantile_warmup=8, batch_size=16)
    store = collect_activations(subject, excerpts, tmp_path / "c", cfg, progress=False)
    assert store.strongest(0, 2) == [0, 1]  # by the ratio alone, the always-on unit comes first
    assert not has_silent_excerpts(store.record(0, 0)) and has_silent_excerpts(store.record(0, 1))
    assert [u.neuron for u in units_to_explain(store, "strongest:1")] == [1]
    assert [u.neuron for u in units_to_explain(store, "strongest:2")] == [1, 0]  # taken when nothing else is left
