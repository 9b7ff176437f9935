"""Records on disk: exact recomputation of stored excerpts, memory-mapped loading, OpenAI JSON round trip."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.errors import UserError
from nbutils.core.records import RecordStore
from nbutils.core.units import UnitId
from nbutils.interop.neuron_explainer import (
    export_openai,
    from_openai_json,
    import_openai,
    openai_record_path,
    to_openai_json,
)
from nbutils.subject.sites import capture_neurons


@pytest.fixture(scope="module")
def collection(embedded, tmp_path_factory):
    texts = load_texts("embedded")
    excerpts = make_excerpts(embedded.tokenizer, texts, 64, 48, seed=2, corpus="embedded")
    cfg = CollectConfig(layers=[1, 5], neurons=12, top_k=5, n_random=6, band_size=2, quantile_warmup=16, batch_size=8)
    out = tmp_path_factory.mktemp("records") / "c"
    return collect_activations(embedded, excerpts, out, cfg, progress=False), texts


def test_stored_excerpts_recompute_exactly(embedded, collection):
    store, texts = collection
    nid = next(iter(store.all_ids()))
    rec = store.record(nid.layer, nid.neuron)
    for e in rec.top[:2] + rec.bottom[:1] + rec.random[:1]:
        assert all(isinstance(t, str) for t in e.tokens) and len(e.tokens) == 64
        # the place in the corpus gives back the same token ids ...
        doc_ids = embedded.tokenizer(texts[e.doc], add_special_tokens=False)["input_ids"]
        assert doc_ids[e.offset : e.offset + 64] == e.token_ids
        # ... and the token ids give back the same activations
        again = capture_neurons(embedded.model, torch.tensor([e.token_ids]), [nid.layer])[nid.layer]
        np.testing.assert_allclose(e.activations, again[0, :, nid.neuron].numpy(), rtol=1e-4, atol=1e-5)
    assert rec.top[0].max == pytest.approx(rec.max)
    assert rec.bottom[0].activations.min() == pytest.approx(rec.min)


def test_loading_one_neuron_reads_memory_mapped_rows(collection):
    store, _ = collection
    store.record(1, int(store.neurons(1)[0]))
    arrays = store._layer(1)
    acts = [a for name, a in arrays.items() if name.endswith("_acts")]
    # plain views of the files' memory maps, read-only: nothing was read into memory
    assert acts and all(isinstance(a.base, np.memmap) and not a.flags.writeable for a in acts)
    assert isinstance(store.tokens.base, np.memmap)
    with pytest.raises(UserError, match="was not collected"):
        store.record(1, int(np.setdiff1d(np.arange(1536), store.neurons(1))[0]))
    with pytest.raises(UserError, match="not in the collection"):
        store.record(2, 0)


def test_records_read_from_many_threads_load_each_layer_once(collection, monkeypatch):
    """Stages 02/03 read units from many threads at once. Each layer's files are opened once, and every
    thread gets the same records as a sequential read (CPython 3.11's parser is not safe for np.load headers
    read on two threads at once; CI saw it fail)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    import nbutils.core.records as records

    store, _ = collection
    ids = list(store.all_ids())  # before the patch: the fixture's store loads its layers here
    fresh = RecordStore(store.path)
    opened: list[str] = []
    real = records._load_npy

    def slow_load(path):
        opened.append(str(path))
        time.sleep(0.01)  # widens the window in which an unguarded second thread would load the layer again
        return real(path)

    monkeypatch.setattr(records, "_load_npy", slow_load)
    start = Barrier(8)

    def read(u):
        start.wait() if ids.index(u) < 8 else None
        return fresh.record(u.layer, u.neuron)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, ids))
    assert (
        len(opened)
        == len(set(opened))
        == sum(len(list(store.layout.layer_dir(layer).glob("*.npy"))) for layer in store.layers)
    )
    for u, rec in zip(ids, got):
        want = store.record(u.layer, u.neuron)
        assert [e.index for e in rec.top] == [e.index for e in want.top]
        np.testing.assert_array_equal(rec.top[0].activations, want.top[0].activations)


def test_missing_collection_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="stage 01"):
        RecordStore(tmp_path)


def test_openai_round_trip(collection, tmp_path):
    store, _ = collection
    ids = list(store.all_ids())
    assert export_openai(store, tmp_path, ids) == len(ids)
    for nid in ids[:6]:
        path = openai_record_path(tmp_path, nid)
        raw = json.loads(path.read_text())
        assert raw["dataclass_name"] == "NeuronRecord"
        assert raw["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": nid.layer, "neuron_index": nid.neuron}
        assert {r["dataclass_name"] for r in raw["most_positive_activation_records"]} == {"ActivationRecord"}
        original, back = store.record(nid.layer, nid.neuron), import_openai(path)
        assert back.id == original.id == UnitId(nid.layer, nid.neuron)
        for mine, theirs in [(original.top, back.top), (original.random, back.random)] + list(
            zip(original.bands, back.bands)
        ):
            assert [e.tokens for e in mine] == [e.tokens for e in theirs]
            for a, b in zip(mine, theirs):
                np.testing.assert_array_equal(a.activations, b.activations)
        for name in ("mean", "variance", "skewness", "kurtosis"):
            assert getattr(back, name) == pytest.approx(getattr(original, name), nan_ok=True)
        assert back.band_edges == pytest.approx(original.band_edges)
        assert back.band_quantiles == original.band_quantiles
        assert to_openai_json(back) == raw  # a second trip changes nothing


def test_openai_import_rejects_other_json(tmp_path):
    with pytest.raises(UserError, match="dataclass_name='NeuronRecord'"):
        from_openai_json({"dataclass_name": "Something"})
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        import_openai(bad)


def test_records_hold_what_each_unit_writes(embedded, collection):
    from nbutils.subject.outputs import logit_effects
    from nbutils.subject.units import MLPNeurons

    store, _ = collection
    nid = next(iter(store.all_ids()))
    rec = store.record(nid.layer, nid.neuron)
    assert len(rec.writes["promotes"]) == len(rec.writes["suppresses"]) == 10
    with torch.no_grad():
        effects = logit_effects(
            embedded.model, MLPNeurons().output_directions(embedded.model, nid.layer, [nid.neuron])
        )[0]
    top = effects.topk(10)
    assert [t for t, _ in rec.writes["promotes"]] == [embedded.tokenizer.decode([int(i)]) for i in top.indices]
    np.testing.assert_allclose([v for _, v in rec.writes["promotes"]], top.values.numpy(), rtol=1e-5)
    assert rec.writes["suppresses"][0][1] == pytest.approx(float(effects.min()), rel=1e-5)
