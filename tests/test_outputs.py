"""What a unit writes: the vocabulary projection of each neuron's output direction, against a matrix product
written out by hand for each architecture (its output projection, final norm and unembedding by name)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ARCHS, tiny_model

from nbutils.subject.outputs import written_tokens
from nbutils.subject.units import MLPNeurons


def _by_hand(model, arch: str, layer: int, neuron: int) -> torch.Tensor:
    """Logit change per token of one neuron, from the weights named per architecture."""
    if arch == "gpt2":
        d = model.transformer.h[layer].mlp.c_proj.weight[neuron, :]  # Conv1D: [in, out]
        ln = model.transformer.ln_f
        v = (d - d.mean()) * ln.weight
    elif arch == "gpt_neox":
        d = model.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight[:, neuron]
        ln = model.gpt_neox.final_layer_norm
        v = (d - d.mean()) * ln.weight
    else:
        d = model.model.layers[layer].mlp.down_proj.weight[:, neuron]
        gain = model.model.norm.weight
        v = d * (1 + gain if arch.startswith("gemma") else gain)
    return model.get_output_embeddings().weight @ v


@pytest.mark.parametrize("arch", ARCHS)
def test_written_tokens_equal_an_independent_matrix_product(arch):
    model = tiny_model(arch)
    with torch.no_grad():  # random final-norm gains, so that a wrong gain (or Gemma's 1 + gain) shows
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_f" in name):
                p.copy_(torch.randn_like(p))
    neurons = [0, 5, 7]
    got = written_tokens(model, MLPNeurons().output_directions(model, 1, neurons), k=6)
    with torch.no_grad():
        for row, n in enumerate(neurons):
            want = _by_hand(model, arch, 1, n)
            top, bottom = want.topk(6), (-want).topk(6)
            np.testing.assert_array_equal(got["promote_ids"][row], top.indices.numpy())
            np.testing.assert_allclose(got["promote_logits"][row], top.values.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got["suppress_ids"][row], bottom.indices.numpy())
            np.testing.assert_allclose(got["suppress_logits"][row], -bottom.values.numpy(), rtol=1e-5, atol=1e-5)


def test_a_unit_without_an_unembedding_writes_nothing():
    from nbutils.subject.planted import load_planted

    planted = load_planted()
    assert written_tokens(planted.model, MLPNeurons().output_directions(planted.model, 0, [0, 1])) is None
