"""The ablation score on the embedded model: exact by construction (true activations score 1, the mean
scores 0), the intervention against the same change made in the weights, and the stage end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.records import split_excerpts
from nbutils.core.results import BaselineExplanation, ExplanationEntry
from nbutils.explain.stage import run_explain_stage
from nbutils.score.ablation import SETS, AblationScorer, ablation_metric
from nbutils.score.contract import ScoreSettings
from nbutils.score.stage import run_score_stage, unit_context
from nbutils.subject.intervene import UnitIntervention
from nbutils.subject.units import MLPNeurons

LAYER = 3


@pytest.fixture(scope="module")
def collection(embedded, tmp_path_factory):
    texts = load_texts("embedded")
    excerpts = make_excerpts(embedded.tokenizer, texts, 32, 96, seed=3, corpus="embedded")
    cfg = CollectConfig(layers=[LAYER], neurons=[7, 40], top_k=12, n_random=12, band_size=2, quantile_warmup=16)
    return collect_activations(embedded, excerpts, tmp_path_factory.mktemp("ablation") / "01", cfg, progress=False)


def _context(embedded, store, neuron: int):
    entry = ExplanationEntry(LAYER, neuron, "positive", "x", baseline=BaselineExplanation("y"))
    return unit_context(entry, store, ScoreSettings(n_boot=100), UnitIntervention(embedded.model, MLPNeurons()))


def test_true_activations_score_one_and_the_mean_scores_zero(embedded, collection):
    ctx = _context(embedded, collection, 7)
    scorer = AblationScorer()
    scored = [e for name in SETS for e in ctx.splits[name]]
    truth = scorer.score_values(ctx, [np.asarray(e.activations, dtype=np.float64) for e in scored])
    mean = scorer.score_values(ctx, [np.full(len(e.tokens), ctx.record.mean) for e in scored])
    assert truth.kl_mean_ablated > 1e-6  # the output does depend on this neuron
    assert truth.score.value == pytest.approx(1.0, abs=1e-6)
    assert mean.score.value == pytest.approx(0.0, abs=1e-6)
    assert truth.n_excerpts == len(scored) >= 6
    lo, hi = mean.score.low, mean.score.high
    assert lo == pytest.approx(0.0, abs=1e-6) and hi == pytest.approx(0.0, abs=1e-6)


def test_zeroing_the_neuron_equals_zeroing_its_output_weights(embedded, collection):
    """Independent of the hook: the neuron set to 0 is the model with its column of down_proj set to 0."""
    rec = collection.record(LAYER, 40)
    ids = [e.token_ids for e in rec.top[:3]]
    got = UnitIntervention(embedded.model, MLPNeurons()).kl_from_original(LAYER, 40, ids, {"zero": np.zeros((3, 32))})
    edited = copy.deepcopy(embedded.model)
    with torch.no_grad():
        edited.model.layers[LAYER].mlp.down_proj.weight[:, 40] = 0.0
        x = torch.tensor(ids)
        p = torch.log_softmax(embedded.model(input_ids=x).logits.double(), -1)
        q = torch.log_softmax(edited(input_ids=x).logits.double(), -1)
    want = (p.exp() * (p - q)).sum(-1).mean(-1).numpy()
    np.testing.assert_allclose(got["zero"], want, rtol=1e-4, atol=1e-10)
    assert want.min() > 0


def test_ablation_metric_undefined_and_interval():
    none = ablation_metric(np.zeros(4), np.zeros(4))
    assert none.value is None and "does not change" in none.reason
    m = ablation_metric(np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0]), n_boot=200)
    assert m.value == pytest.approx(0.8) and m.low <= m.value <= m.high


def test_the_stage_scores_ablation_beside_the_baseline(embedded, collection, tmp_path):
    config = RunConfig(explain_neurons=[[LAYER, 7]], n_boot=50, ablation=True, scorers=["simulation"])
    run_explain_stage(collection.path, tmp_path / "02", config, progress=False)
    (result,) = run_score_stage(collection.path, tmp_path / "02", tmp_path / "03", config, progress=False)
    for part in (result, result.baseline):
        ablation = part.of("ablation")
        assert ablation.n_excerpts == sum(
            len(v) for k, v in split_excerpts(collection.record(LAYER, 7)).items() if k in SETS
        )
        assert ablation.kl_mean_ablated > 0 and ablation.score.value is not None
        assert ablation.score.value <= 1.0
    # the baseline's mean-ablation KL is the explanation's: computed once per unit side
    assert result.of("ablation").kl_mean_ablated == result.baseline.of("ablation").kl_mean_ablated
