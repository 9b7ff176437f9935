"""SAE and transcoder latents as units: values equal an independent computation from the weights for every
architecture and hook, parity with SAELens's and sparsify's own encoders, dead and rare latents, and the
folder checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCHS, tiny_model
from safetensors.torch import save_file

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import ExcerptSet
from nbutils.collect.stage import collect_activations
from nbutils.core.errors import UserError
from nbutils.core.failures import rare_listing
from nbutils.explain.selection import units_to_explain
from nbutils.subject.latents import SAELatents, read_sae_folder
from nbutils.subject.models import SubjectModel

HOOKS = ["hook_resid_pre", "hook_resid_post", "hook_resid_mid", "ln2.hook_normalized", "hook_mlp_out", "hook_attn_out"]


def save_saelens(folder: Path, hook: str, d_in: int, d_sae: int, arch: str = "standard", seed: int = 0, **cfg) -> dict:
    """A random SAE in SAELens's layout (cfg.json + sae_weights.safetensors); returns its weights (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.3,
        "W_dec": torch.randn(d_sae, cfg.pop("d_out", d_in), generator=g),
        "b_dec": torch.randn(d_in, generator=g) * 0.3,
    }
    if arch.startswith("jumprelu"):
        w["threshold"] = torch.rand(d_sae, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    config = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "normalize_activations": "none",
              "metadata": {"hook_name": hook}, **cfg}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(config))
    return {k: v.double().numpy() for k, v in w.items()}


def by_hand(w: dict, x: np.ndarray, arch: str, k: int = 0, apply_b_dec: bool = True) -> np.ndarray:
    """SAELens's encoding written out in float64 numpy."""
    pre = (x - (w["b_dec"] if apply_b_dec else 0)) @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.where(pre > w["threshold"], np.maximum(pre, 0), 0)
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[..., :k]
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    return out


def hooked(model, arch: str, hook: str, layer: int, ids: torch.Tensor) -> np.ndarray:
    """The activation a TransformerLens hook names, read without nbutils: hidden states for the residual
    stream, and a forward hook on the module named here by hand for the others."""
    with torch.no_grad():
        if hook in ("hook_resid_pre", "hook_resid_post"):
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            return states[layer + (hook == "hook_resid_post")].double().numpy()
        blocks = {"gpt2": lambda: model.transformer.h, "gpt_neox": lambda: model.gpt_neox.layers}
        block = blocks.get(arch, lambda: model.model.layers)()[layer]
        gemma23 = arch in ("gemma2", "gemma3_text")
        names = {
            "hook_resid_mid": ("ln_2" if arch == "gpt2" else "pre_feedforward_layernorm" if gemma23
                               else "post_attention_layernorm", "input"),
            "ln2.hook_normalized": ("ln_2" if arch == "gpt2" else "pre_feedforward_layernorm" if gemma23
                                    else "post_attention_layernorm", "output"),
            "hook_mlp_out": ("post_feedforward_layernorm" if gemma23 else "mlp", "output"),
            "hook_attn_out": ("attn" if arch == "gpt2" else "attention" if arch == "gpt_neox"
                              else "post_attention_layernorm" if gemma23 else "self_attn", "output"),
        }  # fmt: skip
        name, side = names[hook]
        seen = {}

        def keep(module, args, output=None):
            value = args[0] if side == "input" else output
            seen["x"] = (value[0] if isinstance(value, tuple) else value).detach()

        module = getattr(block, name)
        h = module.register_forward_pre_hook(keep) if side == "input" else module.register_forward_hook(keep)
        try:
            model(input_ids=ids)
        finally:
            h.remove()
        return seen["x"].double().numpy()


def _collect(model, folder: Path, tmp: Path, n: int = 24, length: int = 12, **cfg):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (n, length), generator=g).numpy().astype(np.int32)
    excerpts = ExcerptSet(tokens, np.zeros((n, 2), dtype=np.int64), "random", 0, n)

    class Tok:  # token texts for vocab.json
        def decode(self, ids):
            return f"t{ids[0]}"

    subject = SubjectModel(model, Tok(), "tiny")
    unit = SAELatents(folder)
    layers = unit.own_layers(model)
    config = CollectConfig(layers=layers, top_k=4, n_random=n, band_size=2, batch_size=8, **cfg)
    return collect_activations(subject, excerpts, tmp, config, progress=False, unit=unit), tokens, layers


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_values_equal_the_encoder_by_hand_at_every_hook(arch, tmp_path):
    """Every collected value (on the random sample, which here is every excerpt) equals SAELens's encoding
    computed by hand from the weights, on the activation the hook names read independently, for each
    architecture, each TransformerLens hook, and the three SAE architectures in turn."""
    model = tiny_model(arch)
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    for i, hook in enumerate(HOOKS):
        sae_arch = ("standard", "jumprelu", "topk")[i % 3]
        extra = {"k": 5} if sae_arch == "topk" else {}
        folder = tmp_path / f"sae-{i}"
        w = save_saelens(folder, f"blocks.1.{hook}", d, 40, sae_arch, seed=i, **extra)
        store, tokens, layers = _collect(model, folder, tmp_path / f"col-{i}")
        assert layers == [1] and store.meta.noun == "feature" and store.meta.unit["hooks"] == [f"blocks.1.{hook}"]
        x = hooked(model, arch, hook, 1, torch.from_numpy(tokens.astype(np.int64)))
        want = by_hand(w, x, sae_arch, k=5)  # [n, T, latents]
        got = np.stack([np.stack([e.activations for e in store.record(1, j).random]) for j in range(40)], -1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{arch} {hook} {sae_arch}")
        assert (store.active(1) == (want > 0).sum((0, 1))).all()


def test_neuron_site_sae_and_sparsify_folders_read_the_right_activations(tmp_path):
    """An SAE on the MLP neurons (mlp.hook_post), a sparsify SAE on a layer's output and a sparsify transcoder
    on the MLP (reading its input), against the activations read by hand."""
    model = tiny_model("llama")
    layer = model.model.layers[1]
    ids = torch.randint(0, 512, (24, 12), generator=torch.Generator().manual_seed(1))
    seen = {}
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("neurons", a[0])),
        layer.register_forward_hook(lambda m, a, o: seen.__setitem__("resid", o[0] if isinstance(o, tuple) else o)),
        layer.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0])),
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    w = save_saelens(tmp_path / "neurons", "blocks.1.mlp.hook_post", 48, 30)
    store, _, _ = _collect(model, tmp_path / "neurons", tmp_path / "c1")
    got = np.stack([np.stack([e.activations for e in store.record(1, j).random]) for j in range(30)], -1)
    np.testing.assert_allclose(got, by_hand(w, seen["neurons"].double().numpy(), "standard"), rtol=1e-4, atol=1e-4)
    assert not store.meta.signed  # latents are never negative, even on a gated MLP's neurons

    for name, hookpoint, transcode, x in (("sae", "layers.1", False, seen["resid"]),
                                          ("tc", "layers.1.mlp", True, seen["mlp_in"])):  # fmt: skip
        g = torch.Generator().manual_seed(3)
        weights = {"encoder.weight": torch.randn(36, 32, generator=g), "encoder.bias": torch.randn(36, generator=g),
                   "W_dec": torch.randn(36, 32, generator=g), "b_dec": torch.randn(32, generator=g)}  # fmt: skip
        folder = tmp_path / name / hookpoint
        folder.mkdir(parents=True)
        save_file(weights, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"d_in": 32, "num_latents": 36, "k": 4, "transcode": transcode}))
        store, _, layers = _collect(model, tmp_path / name, tmp_path / f"c-{name}")
        w64 = {k: v.double().numpy() for k, v in weights.items()}
        xx = x.double().numpy() - (0 if transcode else w64["b_dec"])
        pre = np.maximum(xx @ w64["encoder.weight"].T + w64["encoder.bias"], 0)
        want = np.zeros_like(pre)
        idx = np.argsort(-pre, -1)[..., :4]
        np.put_along_axis(want, idx, np.take_along_axis(pre, idx, -1), -1)
        got = np.stack([np.stack([e.activations for e in store.record(1, j).random]) for j in range(36)], -1)
        assert layers == [1]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def _parity_python() -> str | None:
    """A Python with sae-lens and eai-sparsify (they pin other transformers/numpy versions than nbutils, so
    they live in their own environment: NBUTILS_PARITY_PYTHON, or .ci/run's .venv-parity)."""
    for candidate in (
        os.environ.get("NBUTILS_PARITY_PYTHON"),
        str(Path(__file__).parent.parent / ".venv-parity/bin/python"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.skipif(_parity_python() is None, reason="no Python with sae-lens and eai-sparsify (NBUTILS_PARITY_PYTHON)")
def test_encoding_matches_saelens_and_sparsify_on_folders_they_saved(tmp_path):
    """SAELens (standard, JumpReLU, TopK with and without decoder-norm rescaling, b_dec not applied, two
    transcoders) and sparsify (TopK, groupmax, transcoder) save SAEs with their own code and encode fixed
    inputs; nbutils reads the same folders and encodes the same inputs to within 1e-5."""
    script = Path(__file__).parent / "parity" / "make_saes.py"
    subprocess.run([_parity_python(), str(script), str(tmp_path)], check=True, capture_output=True)
    cases = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(cases) == 10
    worst = {}
    for folder in cases:
        [(coder, info)] = read_sae_folder(folder)
        x = torch.from_numpy(np.load(tmp_path / f"{folder.name}.x.npy"))
        want = np.load(tmp_path / f"{folder.name}.z.npy")
        worst[folder.name] = float(np.abs(coder.encode(x).numpy() - want).max())
        assert (want > 0).any(), folder.name
    print("parity (max abs difference):", worst, json.loads((tmp_path / "versions.json").read_text()))
    assert max(worst.values()) < 1e-5, worst


def test_dead_and_rare_latents_are_counted_listed_and_passed_over(tmp_path):
    model = tiny_model("llama")
    w = save_saelens(tmp_path / "sae", "blocks.1.hook_resid_post", 32, 20)
    b_enc = torch.from_numpy(w["b_enc"]).float()
    b_enc[:4] = -1e4  # latents 0-3 never fire
    tensors = {k: torch.from_numpy(v).float() for k, v in w.items()}
    tensors["b_enc"] = b_enc
    save_file(tensors, str(tmp_path / "sae" / "sae_weights.safetensors"))
    store, _, _ = _collect(model, tmp_path / "sae", tmp_path / "col")
    active = store.active(1)
    assert (active[:4] == 0).all() and (active[4:] >= 0).all()
    rare = store.rare_units(min_active=10)
    assert {(1, i) for i in range(4)} <= set(rare) and all(n < 10 for n in rare.values())
    assert all(rare[(1, i)] == int(active[i]) for i in range(20) if (1, i) in rare)
    listing = rare_listing(rare, 10, skipped=1, noun="feature")
    assert listing["dead"] == int((active == 0).sum()) >= 4 and listing["count"] == len(rare)
    assert listing["units"][0] == [1, 0, 0] and "min_active=10" in listing["reason"]
    picked = {u.index for u in units_to_explain(store, "strongest:3", skip=set(rare))}
    assert len(picked) == min(3, 20 - len(rare)) and not picked & {i for _, i in rare}
    sample = {u.index for u in units_to_explain(store, 5, seed=2, skip=set(rare))}
    assert len(sample) == min(5, 20 - len(rare)) and not sample & {i for _, i in rare}
    # no rare unit: the seeded sample is the one drawn before dead units were passed over
    assert units_to_explain(store, 5, seed=2, skip=set()) == units_to_explain(store, 5, seed=2)


def test_bad_sae_folders_are_refused_with_the_fix(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(UserError, match="neither an SAELens SAE"):
        SAELatents(tmp_path)
    save_saelens(tmp_path / "gated", "blocks.1.hook_resid_post", 32, 8, arch="gated")
    with pytest.raises(UserError, match="architecture 'gated', which nbutils cannot encode"):
        SAELatents(tmp_path / "gated")
    save_saelens(tmp_path / "wide", "blocks.1.hook_resid_post", 40, 8)  # the model's residual stream has 32
    with pytest.raises(UserError, match="reads 40 numbers per token, but its hook point"):
        _collect(model, tmp_path / "wide", tmp_path / "c1")
    save_saelens(tmp_path / "hook", "blocks.1.hook_q", 32, 8)
    with pytest.raises(UserError, match="does not map 'hook_q'"):
        SAELatents(tmp_path / "hook").own_layers(model)
    save_saelens(tmp_path / "norm", "blocks.1.hook_resid_post", 32, 8, normalize_activations="layer_norm")
    with pytest.raises(UserError, match="normalises activations"):
        SAELatents(tmp_path / "norm")


def test_output_directions_are_decoder_rows_where_the_decoder_writes_the_residual_stream(tmp_path):
    model = tiny_model("llama")
    w = save_saelens(tmp_path / "res", "blocks.1.hook_resid_post", 32, 8)
    got = SAELatents(tmp_path / "res").output_directions(model, 1, [2, 5])
    np.testing.assert_allclose(got.numpy(), w["W_dec"][[2, 5]], rtol=1e-6)
    save_saelens(tmp_path / "ln", "blocks.1.ln2.hook_normalized", 32, 8)
    assert SAELatents(tmp_path / "ln").output_directions(model, 1, [0]) is None  # not the residual stream


def test_a_pickled_unit_type_reloads_its_weights(tmp_path):
    """Ray ships the unit type to workers: it travels without its tensors and reads them again."""
    import pickle

    model = tiny_model("llama")
    save_saelens(tmp_path / "sae", "blocks.0.hook_resid_post", 32, 8)
    unit = SAELatents(tmp_path / "sae")
    unit.own_layers(model)
    copy = pickle.loads(pickle.dumps(unit))
    assert copy._coders is None and copy.own_layers(model) == [0] and copy.as_dict() == unit.as_dict()
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(copy.transform(x, 0), unit.transform(x, 0))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


def test_setting_a_latent_moves_the_activation_along_its_decoder_row_and_keeps_the_error(tmp_path):
    """Interventions on a latent (ablation and intervention scores): its own values change nothing; zeroing it
    gives the KL of a forward hook, written here, that subtracts value x decoder row from the block's output;
    a shift adds shift x decoder row. The SAE's reconstruction error stays in the activation throughout."""
    from nbutils.subject.intervene import UnitIntervention, intervention_for

    model = tiny_model("llama")
    w = save_saelens(tmp_path / "sae", "blocks.1.hook_resid_post", 32, 12)
    unit = SAELatents(tmp_path / "sae")
    unit.own_layers(model)
    ids = torch.randint(0, 512, (4, 10), generator=torch.Generator().manual_seed(2))
    seen = {}
    block = model.model.layers[1]
    h = block.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    h.remove()
    z = torch.from_numpy(by_hand(w, seen["x"].double().numpy(), "standard"))
    latent = int(torch.argmax((z > 0).sum((0, 1))))  # the latent active most often
    iv = UnitIntervention(model, unit)
    own = iv.kl_from_original(1, latent, ids.tolist(), {"own": z[..., latent].numpy(), "zero": np.zeros((4, 10))})
    assert np.abs(own["own"]).max() < 1e-9

    def by_hand_hook(m, a, o):
        out = o[0] if isinstance(o, tuple) else o
        changed = out - z[..., latent].unsqueeze(-1).to(out.dtype) * torch.from_numpy(w["W_dec"][latent]).to(out.dtype)
        return (changed, *o[1:]) if isinstance(o, tuple) else changed

    h = block.register_forward_hook(by_hand_hook)
    with torch.no_grad():
        zeroed = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    h.remove()
    want = (base.exp() * (base - zeroed)).sum(-1).clamp_min(0).mean(-1).numpy()
    np.testing.assert_allclose(own["zero"], want, rtol=1e-4, atol=1e-7)
    assert want.max() > 1e-6  # the zeroing did change the output
    x = torch.randn(2, 3, 32)
    shifted = unit.edit(x, 1, latent, 2.5, add=True)
    torch.testing.assert_close(shifted - x, 2.5 * torch.from_numpy(w["W_dec"][latent]).float().expand(2, 3, 32))
    # a changed SAE folder is refused when the collection's unit type is made again; a transcoder is refused
    made = SAELatents.from_dict(unit.as_dict())
    assert made.as_dict() == unit.as_dict()
    save_saelens(tmp_path / "sae", "blocks.1.hook_resid_post", 32, 12, seed=9)
    with pytest.raises(UserError, match="is not the one this collection read"):
        SAELatents.from_dict(unit.as_dict())
    with pytest.raises(UserError, match="transcoder's latent"):
        intervention_for("embedded", {"kind": "sae_latent", "path": str(tmp_path), "transcoder": True}, None)
