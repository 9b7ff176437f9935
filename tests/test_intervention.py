"""The intervention score: its pair accuracy by hand, steering to a target KL, continuations against
transformers' own greedy generation, and the stage end to end (seeded: two runs agree) on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.core.store import ResultStore
from nbutils.core.units import NEURON
from nbutils.explain.stage import run_explain_stage
from nbutils.score.contract import UnitDetails
from nbutils.score.intervention import N_PROMPTS, TARGET_KL, InterventionResult, intervention_notes, pair_accuracy
from nbutils.score.stage import run_score_stage
from nbutils.subject.intervene import UnitIntervention, intervention_for
from nbutils.subject.units import MLPNeurons

LAYER = 3


@pytest.fixture(scope="module")
def collection(embedded, tmp_path_factory):
    excerpts = make_excerpts(embedded.tokenizer, load_texts("embedded"), 32, 96, seed=5, corpus="embedded")
    cfg = CollectConfig(layers=[LAYER], neurons=[7, 40], top_k=12, n_random=24, band_size=2, quantile_warmup=16)
    return collect_activations(embedded, excerpts, tmp_path_factory.mktemp("intervention") / "01", cfg, progress=False)


def test_pair_accuracy_by_hand():
    perfect = pair_accuracy(np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2]), n_boot=100)
    assert perfect.balanced_accuracy.value == 1.0 and perfect.auroc.value == 1.0
    always_yes = pair_accuracy(np.full(6, 0.9), n_boot=100)  # position bias alone: exactly chance
    assert always_yes.balanced_accuracy.value == 0.5 and always_yes.n_yes == 6
    steered = InterventionResult(**vars(always_yes), control=None, shift=1.0, kl=TARGET_KL, control_unit=0,
                                 control_shift=1.0, control_kl=TARGET_KL, n_unchanged=0)  # fmt: skip
    assert any("degenerate judge" in n for n in intervention_notes(steered))
    half = pair_accuracy(np.array([0.9, 0.1, 0.9, 0.9, np.nan, 0.2]), n_boot=100)
    assert half.balanced_accuracy.value == pytest.approx(0.75)  # (1 + 0.5) / 2; the third pair is unanswered
    assert half.n_unanswered == 1 and half.n_prompts == 3


def test_steering_reaches_its_target_and_continuations_match_greedy_generation(embedded, collection):
    iv = UnitIntervention(embedded.model, MLPNeurons(), embedded.tokenizer)
    prompts = [e.token_ids[:16] for e in collection.record(LAYER, 7).random[:4]]
    shift, kl = iv.steering_for(LAYER, 7, prompts, 0.5, scale=1.0)
    assert shift > 0 and kl == pytest.approx(0.5, rel=0.2)
    plain = iv.continue_text(LAYER, 7, prompts, 8)
    with torch.no_grad():  # transformers' own greedy decoding, no hook
        want = embedded.model.generate(torch.tensor(prompts), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert plain == want[:, 16:].tolist()
    steered = iv.continue_text(LAYER, 7, prompts, 8, shift)
    assert steered != plain
    # the key/value cache path against recomputing the whole prefix with the neuron shifted at every step
    ids = torch.tensor(prompts)
    module = embedded.model.model.layers[LAYER].mlp.down_proj
    hook = module.register_forward_pre_hook(lambda m, a: (a[0] + shift * (torch.arange(a[0].shape[-1]) == 7),))
    try:
        with torch.no_grad():
            for _ in range(8):
                ids = torch.cat([ids, embedded.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    finally:
        hook.remove()
    assert steered == ids[:, 16:].tolist()


def test_the_stage_scores_intervention_with_a_control_and_is_seeded(embedded, collection, tmp_path):
    config = RunConfig(explain_neurons=[[LAYER, 7]], n_boot=50, intervention=True, scorers=["simulation"])
    run_explain_stage(collection.path, tmp_path / "02", config, progress=False)
    (result,) = run_score_stage(collection.path, tmp_path / "02", tmp_path / "03", config, progress=False)
    mine = result.of("intervention")
    assert mine.n_prompts == N_PROMPTS and mine.control_unit != 7 and mine.kl > 0
    assert mine.balanced_accuracy.value is not None and mine.control.n_prompts == N_PROMPTS
    assert result.baseline.of("intervention").kl == mine.kl  # the same pairs, judged by token lookup
    stored = UnitDetails.from_dict(ResultStore(tmp_path / "03").details((LAYER, 7, "positive")))
    details = stored.of("intervention")
    assert len(details) == 4 * N_PROMPTS and {d.source for d in details} == {"unit", "control"}
    assert all("[A]" in d.tokens[0] and "[B]" in d.tokens[0] for d in details)
    (again,) = run_score_stage(collection.path, tmp_path / "02", tmp_path / "03b", config, progress=False)
    assert again.of("intervention") == mine  # seeded: a fresh run gives the same result
    assert ResultStore(tmp_path / "03").selection() == [(LAYER, 7, "positive")]  # what stage 03 was asked for


def test_planted_neurons_have_no_output_to_intervene_on():
    with pytest.raises(UserError, match="predicts no next token"):
        intervention_for("planted", {"kind": NEURON}, None)
