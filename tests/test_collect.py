"""The collector against an independent computation over every excerpt, plus resume and memory checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_hooks import expected_neurons

from nbutils.collect.collector import CollectConfig, Collector, sorted_lists
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.errors import UserError
from nbutils.subject.models import SubjectModel

LAYERS = [0, 2]
CFG = dict(layers=LAYERS, top_k=4, n_random=5, band_size=3, quantile_warmup=24, batch_size=8, seed=3)


@pytest.fixture(scope="module")
def setup(embedded_tokenizer):
    """A tiny random Llama that reads real tokens of the embedded corpus through the real tokenizer."""
    model = tiny_model("llama", vocab_size=len(embedded_tokenizer))
    subject = SubjectModel(model, embedded_tokenizer, "tiny-llama")
    excerpts = make_excerpts(embedded_tokenizer, load_texts("embedded")[:200], 16, 80, seed=5, corpus="embedded")
    full = {}
    ids = torch.from_numpy(excerpts.tokens.astype(np.int64))
    for layer in LAYERS:
        full[layer] = expected_neurons(model, "llama", layer, ids).detach().numpy()  # [n, T, N] by hand
    return subject, excerpts, full


def test_records_match_independent_computation(setup, tmp_path):
    subject, excerpts, full = setup
    cfg = CollectConfig(**CFG)
    store = collect_activations(subject, excerpts, tmp_path / "c", cfg, progress=False)
    n = len(excerpts)
    assert store.meta.tokens_seen == n * 16 and store.meta.signed and store.meta.bottom_k == 4
    warm = 24
    for layer in LAYERS:
        acts = full[layer]
        flat = acts.reshape(-1, acts.shape[-1]).astype(np.float64)
        stats = store.stats(layer)
        np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats["variance"], flat.var(0), rtol=1e-4)
        z = (flat - flat.mean(0)) / flat.std(0)
        np.testing.assert_allclose(stats["skewness"], (z**3).mean(0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(stats["kurtosis"], (z**4).mean(0) - 3, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(stats["max"], flat.max(0), rtol=1e-6)
        np.testing.assert_allclose(stats["min"], flat.min(0), rtol=1e-6)
        maxes, mins = acts.max(1), acts.min(1)  # [n, N]
        edges_q = np.quantile(maxes[:warm], [0, 0.5, 0.9, 0.99, 0.999], axis=0)  # [5, N]
        for neuron in (0, 7, 31, 47):
            rec = store.record(layer, neuron)
            want_top = np.argsort(-maxes[:, neuron], kind="stable")[:4]
            assert [e.index for e in rec.top] == want_top.tolist()
            want_bottom = np.argsort(mins[:, neuron], kind="stable")[:4]
            assert [e.index for e in rec.bottom] == want_bottom.tolist()
            for e in rec.top + rec.bottom + rec.random + [e for b in rec.bands for e in b]:
                np.testing.assert_allclose(e.activations, acts[e.index, :, neuron], rtol=1e-5, atol=1e-6)
                assert e.token_ids == excerpts.tokens[e.index].tolist()
                assert (e.doc, e.offset) == tuple(excerpts.places[e.index])
            assert [e.index for e in rec.random] == store.random_index.tolist()
            np.testing.assert_allclose(rec.band_edges, edges_q[:, neuron], rtol=1e-5)
            after = maxes[warm:, neuron]
            for b, band in enumerate(rec.bands):
                lo, hi = edges_q[b, neuron], edges_q[b + 1, neuron]
                eligible = ((after < hi) & ((after >= lo) | (b == 0))).sum()
                assert len(band) == min(3, eligible)
                for e in band:
                    assert e.index >= warm and (b == 0 or e.max >= lo - 1e-6) and e.max < hi + 1e-6
            assert sum(len(b) for b in rec.bands) > 0


def test_interrupted_collection_resumes_to_identical_records(setup, tmp_path):
    subject, excerpts, _ = setup
    cfg = CollectConfig(**{**CFG, "checkpoint_every_s": 0.0})
    collect_activations(subject, excerpts, tmp_path / "whole", cfg, progress=False)

    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt

    handle = subject.model.model.layers[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        collect_activations(subject, excerpts, tmp_path / "cut", cfg, progress=False)
    handle.remove()
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    assert not (tmp_path / "cut" / "collection.json").exists()

    handle = subject.model.model.layers[0].register_forward_pre_hook(interrupt)
    calls["n"] = 0
    collect_activations(subject, excerpts, tmp_path / "cut", cfg, progress=False)
    handle.remove()
    assert calls["n"] == 10 - 5  # 80 excerpts / 8 per batch, 5 batches were already done
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    whole = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.npy"))
    assert whole == sorted(p.relative_to(tmp_path / "cut") for p in (tmp_path / "cut").rglob("*.npy"))
    for rel in whole:
        assert np.array_equal(np.load(tmp_path / "whole" / rel), np.load(tmp_path / "cut" / rel), equal_nan=True), rel


def test_ctrl_c_finishes_the_batch_in_progress_checkpoints_it_and_the_rerun_says_it_resumed(setup, tmp_path, capsys):
    import os
    import signal

    subject, excerpts, _ = setup
    cfg = CollectConfig(**{**CFG, "checkpoint_every_s": 1e9})  # no periodic checkpoint: only the interrupt's
    collect_activations(subject, excerpts, tmp_path / "whole", cfg, progress=False)
    calls = {"n": 0}

    def ctrl_c(module, args):  # a real SIGINT to this process, in the middle of batch 6's forward pass
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    handle = subject.model.model.layers[0].register_forward_pre_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect_activations(subject, excerpts, tmp_path / "cut", cfg, progress=False)
        assert "interrupted: checkpoint at 48 of 80 excerpts" in capsys.readouterr().err  # batch 6 kept
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
        calls["n"] = -100
        collect_activations(subject, excerpts, tmp_path / "cut", cfg, progress=False)
    finally:
        handle.remove()
    assert calls["n"] == -100 + 4  # 10 batches, 6 done before the interrupt: none redone
    assert "resumed the collection from its checkpoint" in capsys.readouterr().out
    for rel in sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.npy")):
        assert np.array_equal(np.load(tmp_path / "whole" / rel), np.load(tmp_path / "cut" / rel), equal_nan=True), rel


def test_state_size_does_not_grow_with_corpus():
    neurons = {0: np.arange(64), 5: np.arange(64)}
    cfg = CollectConfig(top_k=10, n_random=10, band_size=4, quantile_warmup=256, batch_size=32)

    def size(n_excerpts):
        col = Collector(n_excerpts, 64, neurons, cfg, signed=True)
        return sum(t.nbytes for s in col.layers.values() for t in s.t.values())

    assert size(10_000) == size(40_000) == size(1_000_000)


def test_neuron_subset_and_rerun(setup, tmp_path):
    subject, excerpts, full = setup
    cfg = CollectConfig(**{**CFG, "neurons": 5})
    store = collect_activations(subject, excerpts, tmp_path / "s", cfg, progress=False)
    for layer in LAYERS:
        picked = store.neurons(layer)
        assert len(picked) == 5 and np.all(np.diff(picked) > 0)
        np.testing.assert_allclose(store.stats(layer)["max"], full[layer].max((0, 1))[picked], rtol=1e-6)
    again = collect_activations(subject, excerpts, tmp_path / "s", cfg, progress=False)  # finished: just loads
    assert again.meta == store.meta
    with pytest.raises(UserError, match="different settings"):
        collect_activations(subject, excerpts, tmp_path / "s", CollectConfig(**{**CFG, "top_k": 2}), progress=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layers": [7]}, "out of range"),
        ({"neurons": [0, 48]}, "out of range"),
        ({"bands": [[0, 0.5], [0.6, 0.9]]}, "contiguous"),
    ],
)
def test_bad_collection_settings(setup, tmp_path, change, message):
    subject, excerpts, _ = setup
    with pytest.raises(UserError, match=message):
        collect_activations(subject, excerpts, tmp_path / "x", CollectConfig(**{**CFG, **change}), progress=False)


def _collect_lists(values, neurons, cfg, signed, **paths):
    """Feed ``values`` ({layer: [n, T, N]}) in batches; each layer's ordered lists, random sample and stats."""
    n, T = next(iter(values.values())).shape[:2]
    col = Collector(n, T, neurons, cfg, signed, **paths)
    for start in range(0, n, cfg.batch_size):
        col.update(start, {layer: v[start : start + cfg.batch_size] for layer, v in values.items()})
    out = {}
    for layer, state in col.layers.items():
        t = state.t
        lists = [
            sorted_lists(t[f"{name}_key"], t[f"{name}_index"], t[f"{name}_acts"], largest=name != "band")
            for name in ("top", "bottom", "band")
        ]
        out[layer] = {
            "lists": [x.numpy().copy() for pair in lists for x in pair],
            "random": t["random_acts"].numpy().copy(),
            "active": t["active"].numpy().copy(),
            "stats": state.stats(),
        }
    return out


@pytest.mark.parametrize("signed, subset, batch", [(True, None, 8), (False, 7, 16), (True, [3, 5, 30], 32)])
def test_collector_paths_keep_the_same_lists_and_float64_exact_statistics(signed, subset, batch):
    """The CPU kernel, the GPU path (dense merges, no nonzero) and the torch CPU path keep the same lists, bit for
    bit, including exact ties between excerpts and a short last batch; the statistics equal a float64
    computation over every token to 1e-12 of the unit's scale."""
    from nbutils.collect import cpu_kernel
    from nbutils.collect.stage import choose_neurons

    assert cpu_kernel.load() is not None, "the CPU kernel should build on a machine with g++ (.ci/run installs it)"
    g = torch.Generator().manual_seed(batch)
    values = {layer: torch.randn(130, 12, 40, generator=g) * (layer + 1) + 0.3 for layer in (0, 3, 5)}
    for v in values.values():
        v[5:9] = v[0:4].clone()  # equal maxima: the earlier excerpt wins in every path
        if not signed:
            v.clamp_(min=0)
    neurons = choose_neurons(40, [0, 3, 5], subset, 1)
    cfg = CollectConfig(layers=[0, 3, 5], top_k=6, n_random=7, band_size=3, quantile_warmup=40, batch_size=batch)
    paths = {
        "torch CPU": _collect_lists(values, neurons, cfg, signed, dense=False, fused=False, kernel=False),
        "GPU": _collect_lists(values, neurons, cfg, signed, dense=True, fused=False),
        "kernel": _collect_lists(values, neurons, cfg, signed, kernel=True),
    }
    cpu = paths["torch CPU"]
    for name, other in paths.items():
        for layer, got in other.items():
            for a, b in zip(got["lists"], cpu[layer]["lists"]):
                assert np.array_equal(a, b), name
            assert np.array_equal(got["random"], cpu[layer]["random"]), name
            assert np.array_equal(got["active"], cpu[layer]["active"]), name
    for layer, got in [(layer, p[layer]) for p in (cpu, paths["kernel"]) for layer in p]:
        x = values[layer][..., torch.from_numpy(neurons[layer])].reshape(-1, len(neurons[layer])).double().numpy()
        z = (x - x.mean(0)) / x.std(0)
        exact = np.stack([x.mean(0), x.var(0), (z**3).mean(0), (z**4).mean(0) - 3, x.max(0), x.min(0)], axis=1)
        scale = np.maximum(np.abs(exact), np.stack([x.std(0), x.var(0)] + [np.ones(len(z[0]))] * 2 + [x.std(0)] * 2, 1))
        assert np.abs(got["stats"] - exact).max(initial=0) <= 1e-12 * scale.max()
        assert (np.abs(got["stats"] - exact) <= 1e-12 * scale).all()
        top_index = got["lists"][0]
        maxes = values[layer][..., torch.from_numpy(neurons[layer])].amax(1).numpy()  # [n, N]
        for j in range(len(neurons[layer])):
            assert top_index[j].tolist() == np.argsort(-maxes[:, j], kind="stable")[:6].tolist()
        band_index = got["lists"][4]  # [N, bands, m]: every sampled excerpt lies in its band, after the warm-up
        assert (band_index[band_index >= 0] >= 40).all() and (band_index >= 0).any()


def test_a_nan_activation_is_kept_alike_by_the_kernel_and_the_torch_path():
    """A NaN value (a broken model's) gives the same lists, maxima and minima on every path: NaN wins a max, as
    in torch.amax, and its order key ranks it first (a kept NaN never blocks the rest of its list)."""
    g = torch.Generator().manual_seed(7)
    values = {0: torch.randn(64, 6, 20, generator=g)}
    values[0][50, 3, 2] = math.nan
    neurons = {0: np.arange(20)}
    cfg = CollectConfig(layers=[0], top_k=4, n_random=3, band_size=2, quantile_warmup=16, batch_size=8)
    kernel = _collect_lists(values, neurons, cfg, True, kernel=True)[0]
    torch_path = _collect_lists(values, neurons, cfg, True, kernel=False, fused=False)[0]
    dense = _collect_lists(values, neurons, cfg, True, dense=True, fused=False)[0]
    assert kernel["lists"][0][2, 0] == 50  # the NaN excerpt heads its unit's top list
    for a, b, c in zip(kernel["lists"], torch_path["lists"], dense["lists"]):
        assert np.array_equal(a, b, equal_nan=True) and np.array_equal(a, c, equal_nan=True)
    assert np.isnan(kernel["stats"][2, 4]) and np.array_equal(
        kernel["stats"][:, 4:], torch_path["stats"][:, 4:], equal_nan=True
    )


def _lowbias32(h: int) -> int:
    """An independent reference of the band keys' hash, in Python integers (lowbias32, hash-prospector)."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_band_keys_are_one_hash_on_every_path_and_look_uniform():
    """torch's `band_keys` (every device) and the CPU kernel's draw the same key for (seed, layer, unit, excerpt),
    equal to a Python reference, whatever the batch or the unit subset; keys look uniform and independent."""
    from nbutils.collect import cpu_kernel
    from nbutils.collect.collector import band_keys

    lib = cpu_kernel.load()
    seeds, layer_id = [0, 3, 2**40 + 7], torch.tensor([0, 5, 47])
    unit_id = torch.tensor([[0, 1, 2**20 + 3], [7, 8, 9], [6399, 0, 2**31 - 1]])
    for seed in seeds:
        keys = band_keys(seed, layer_id, unit_id, 2**31 - 5, 8)  # [L, N, B], excerpts past 2**31 included
        for li, layer in enumerate(layer_id.tolist()):
            for ni, unit in enumerate(unit_id[li].tolist()):
                for b in range(8):
                    h = _lowbias32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
                    for part in (layer, unit, (2**31 - 5 + b) & 0xFFFFFFFF):
                        h = _lowbias32(h ^ part)
                    expected = (h >> 8) / 2**24
                    assert keys[li, ni, b].item() == expected
                    assert lib.nbutils_band_key(seed & 0xFFFFFFFF, layer, unit, 2**31 - 5 + b) == expected
    one = band_keys(1, torch.tensor([2]), torch.arange(200)[None], 0, 64)
    split = torch.cat([band_keys(1, torch.tensor([2]), torch.arange(200)[None], s, 16) for s in range(0, 64, 16)], -1)
    assert torch.equal(one, split)  # batch boundaries do not matter
    assert torch.equal(band_keys(1, torch.tensor([2]), torch.tensor([[5, 150]]), 0, 64)[0], one[0, [5, 150]])
    many = band_keys(9, torch.arange(4), torch.arange(500).repeat(4, 1), 0, 1000).double()  # 2M keys
    counts = torch.histc(many, bins=20, min=0, max=1)
    chi2 = (((counts - many.numel() / 20) ** 2) / (many.numel() / 20)).sum().item()
    assert chi2 < 43.8  # 19 degrees of freedom, p = 0.001
    flat = many.reshape(-1, 1000)
    corr = torch.corrcoef(flat[:200])  # neighbouring units over the same excerpts
    assert corr.fill_diagonal_(0).abs().max() < 0.16  # |r| of independent keys over 1000 excerpts: about 0.03


def test_band_samples_do_not_depend_on_the_batch_size():
    """With hashed keys, batches of 8 or 24 keep the same band samples (as the same top/bottom/random lists)."""
    g = torch.Generator().manual_seed(4)
    values = {0: torch.randn(120, 6, 16, generator=g)}
    neurons = {0: np.arange(16)}
    got = [
        _collect_lists(
            values, neurons, CollectConfig(layers=[0], top_k=3, band_size=4, quantile_warmup=48, batch_size=batch), True
        )[0]  # fmt: skip
        for batch in (8, 24)
    ]
    for a, b in zip(got[0]["lists"], got[1]["lists"]):
        assert np.array_equal(a, b)
    np.testing.assert_allclose(got[0]["stats"], got[1]["stats"], rtol=1e-12, atol=1e-12)


def test_a_checkpoint_of_the_older_band_keys_is_refused_with_the_fix():
    cfg = CollectConfig(layers=[0], top_k=2, n_random=2, band_size=2, quantile_warmup=4, batch_size=4)
    col = Collector(16, 4, {0: np.arange(3)}, cfg, False)
    col.update(0, {0: torch.rand(4, 4, 3)})
    state = col.state_dict()
    Collector(16, 4, {0: np.arange(3)}, cfg, False).load_state_dict(state)  # this version's own: accepted
    del state["band_keys"]
    with pytest.raises(UserError, match="older nbutils that drew band samples differently.*Delete the checkpoint"):
        Collector(16, 4, {0: np.arange(3)}, cfg, False).load_state_dict(state)


def test_without_a_compiler_the_collector_says_so_and_keeps_its_torch_path(monkeypatch, tmp_path, capsys):
    from nbutils.collect import cpu_kernel

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NBUTILS_KERNEL_DIR", str(tmp_path / "kernels"))
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None
        assert "did not build" in capsys.readouterr().out
        values = {0: torch.rand(24, 4, 5)}
        cfg = CollectConfig(layers=[0], top_k=2, n_random=2, band_size=2, quantile_warmup=8, batch_size=8)
        fallback = _collect_lists(values, {0: np.arange(5)}, cfg, False)[0]
    finally:
        monkeypatch.undo()
        cpu_kernel.load.cache_clear()
    kernel = _collect_lists(values, {0: np.arange(5)}, cfg, False, kernel=True)[0]
    for a, b in zip(fallback["lists"], kernel["lists"]):
        assert np.array_equal(a, b)


def test_compiled_statistics_equal_the_eager_ones():
    """``fused`` (torch.compile of `batch_stats`) changes only the order of float64 additions."""
    from nbutils.collect.collector import batch_stats

    g = torch.Generator().manual_seed(0)
    x, shift = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 16, generator=g)
    for signed in (True, False):
        eager = batch_stats(x, shift, signed)
        fused = torch.compile(batch_stats, dynamic=False)(x, shift, signed)
        torch.testing.assert_close(fused[0], eager[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(fused[1:], eager[1:]):
            assert torch.equal(a, b)


def test_stacked_capture_equals_the_model_values(setup):
    """``NeuronCapture(stacked=True)`` rows hold what the plain capture returns, in layer order."""
    from nbutils.subject.sites import NeuronCapture, resolve_site

    subject, excerpts, full = setup
    ids = torch.from_numpy(excerpts.tokens[:8].astype(np.int64))
    site = resolve_site(subject.model)
    with NeuronCapture(subject.model, site, LAYERS, stacked=True) as cap:
        got = cap.run(ids)
        assert cap.buffer.shape[0] == len(LAYERS)
        for row, layer in enumerate(LAYERS):
            assert got[layer].data_ptr() == cap.buffer[row].data_ptr()
            np.testing.assert_allclose(cap.buffer[row].numpy(), full[layer][:8], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "devices, executor, message",
    [
        ("all", "local", "no GPU is visible"),  # this machine has none (the GPU machine: every GPU, below)
        (["cuda:7"], "local", "not visible here"),
        (["gpu0"], "local", "'gpu0' is not a device"),
        ("cpu", "local", "not a list of devices"),
        (["cpu", "cpu"], "ray", "is for the local executor"),
    ],
)
def test_devices_that_are_not_here_are_refused_before_anything_loads(devices, executor, message):
    from nbutils.collect.stage import resolve_devices

    if torch.cuda.device_count() > 0 and devices == "all":
        assert resolve_devices("all") == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return
    if torch.cuda.device_count() > 7:
        pytest.skip("a machine with 8 GPUs has cuda:7")
    with pytest.raises(UserError, match=message):
        resolve_devices(devices, executor)
    assert resolve_devices(None) == [] and resolve_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
