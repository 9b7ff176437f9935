"""Neuron sites: the captured values equal the MLP hidden units recomputed by hand from the layer's weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, tiny_model

from nbutils.core.errors import UserError
from nbutils.subject.sites import NeuronCapture, NeuronSite, capture_neurons, neurons_per_layer, resolve_site


def _gelu_erf(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def _gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def _silu(h):
    return h / (1 + torch.exp(-h))


ACT = {"gelu": _gelu_erf, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "silu": _silu, "relu": torch.relu}


def _mlp_input(model, mlp_path: str, input_ids):
    """The MLP's input (after the pre-MLP norm), caught with a plain pre-hook on the MLP module."""
    seen = {}
    handle = model.get_submodule(mlp_path).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    return seen["x"]


def expected_neurons(model, arch: str, layer: int, input_ids):
    """Recompute the MLP hidden units of one layer from its weights, independently of nbutils."""
    cfg = model.config
    if arch == "gpt2":
        x = _mlp_input(model, f"transformer.h.{layer}.mlp", input_ids)
        fc = model.transformer.h[layer].mlp.c_fc
        return ACT[cfg.activation_function](x @ fc.weight + fc.bias)  # Conv1D weight is [in, out]
    if arch == "gpt_neox":
        x = _mlp_input(model, f"gpt_neox.layers.{layer}.mlp", input_ids)
        fc = model.gpt_neox.layers[layer].mlp.dense_h_to_4h
        return ACT[cfg.hidden_act](x @ fc.weight.T + fc.bias)
    x = _mlp_input(model, f"model.layers.{layer}.mlp", input_ids)
    mlp = model.model.layers[layer].mlp
    act_name = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    return ACT[act_name](x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)


@pytest.mark.parametrize("arch", ARCHS)
def test_site_matches_hand_computation(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    got = capture_neurons(model, ids, layers=[0, 2])
    width = neurons_per_layer(model, resolve_site(model))
    for layer in (0, 2):
        want = expected_neurons(model, arch, layer, ids)
        assert got[layer].shape == (2, 12, width)
        assert want.abs().max() > 1e-3  # the check is not vacuous
        torch.testing.assert_close(got[layer], want, rtol=1e-5, atol=1e-5)
    assert resolve_site(model).signed == (arch not in ("gpt2", "gpt_neox"))


def test_embedded_model_site_matches_hand_computation(embedded):
    model, tok = embedded.model, embedded.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. Then it sleeps.")["input_ids"]])
    got = capture_neurons(model, ids, layers=[0, 14, 29])
    for layer in (0, 14, 29):
        want = expected_neurons(model, "llama", layer, ids)
        assert got[layer].shape[-1] == 1536
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-4)
    assert (got[29] < 0).any() and (got[29] > 0).any()  # gated neurons are signed


def test_forward_stops_after_last_requested_layer():
    model = tiny_model("llama")
    calls = []
    hooks = [model.model.layers[2].register_forward_pre_hook(lambda m, a: calls.append("layer2"))]
    hooks.append(model.lm_head.register_forward_pre_hook(lambda m, a: calls.append("head")))
    hooks.append(model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append("down1")))
    capture_neurons(model, torch.zeros(1, 4, dtype=torch.long), layers=[0, 1])
    assert calls == []  # not even layer 1's output projection ran
    for h in hooks:
        h.remove()
    with NeuronCapture(model, resolve_site(model), [0], stop_early=False) as cap:
        cap.run(torch.zeros(1, 4, dtype=torch.long))


def test_unsupported_architecture_error_and_hand_named_site():
    model = tiny_model("opt")
    with pytest.raises(UserError) as err:
        resolve_site(model)
    msg = str(err.value)
    assert "opt" in msg and "gpt2" in msg and "llama" in msg and "site=" in msg
    site = NeuronSite("model.decoder.layers.{layer}.fc2", "input")
    ids = torch.randint(0, 512, (1, 9))
    got = capture_neurons(model, ids, layers=[1], site=site)[1]
    fc1 = model.model.decoder.layers[1].fc1
    x = _mlp_input(model, "model.decoder.layers.1.fc1", ids)
    torch.testing.assert_close(got, torch.relu(x @ fc1.weight.T + fc1.bias).reshape(got.shape))
    # the output side of the activation module names the same values
    out_site = NeuronSite("model.decoder.layers.{layer}.activation_fn", "output")
    torch.testing.assert_close(capture_neurons(model, ids, layers=[1], site=out_site)[1], got)


def test_bad_sites_and_layers_are_user_errors():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="placeholder"):
        NeuronSite("model.layers.0.mlp.down_proj")
    with pytest.raises(UserError, match="does not exist"):
        capture_neurons(model, torch.zeros(1, 2, dtype=torch.long), [0], NeuronSite("model.nope.{layer}"))
    with pytest.raises(UserError, match="out of range"):
        capture_neurons(model, torch.zeros(1, 2, dtype=torch.long), [3])
