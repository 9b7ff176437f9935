"""A run worked with live (`nbutils.open_run`): a unit's values on any text equal what stage 01 collected for
the same tokens, the units that fire on a text are ranked as documented, and bad input is named with the fix."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

import nbutils
from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.errors import UserError

LAYERS = [3, 17]


@pytest.fixture(scope="module")
def run(embedded, tmp_path_factory):
    texts = load_texts("embedded")[:200]
    excerpts = make_excerpts(embedded.tokenizer, texts, 32, 96, seed=2, corpus="embedded")
    root = tmp_path_factory.mktemp("live")
    cfg = CollectConfig(layers=LAYERS, neurons=list(range(0, 1536, 97)), top_k=4, n_random=2, band_size=1,
                        quantile_warmup=16, batch_size=16)  # fmt: skip
    collect_activations(embedded, excerpts, root / "01_collect", cfg, progress=False)
    return nbutils.open_run(root)


def test_live_values_on_a_stored_excerpt_equal_the_collected_ones(run):
    checked = 0
    for layer in LAYERS:
        for index in run.store.neurons(layer)[:6]:
            index = int(index)
            u = run.unit(layer, index)
            scale = max(abs(u.record.max), abs(u.record.min), 1e-6)
            for e in u.record.top[:2]:
                live = u.activations(e.token_ids)  # the collector ran these ids in batches of 16
                assert live.tokens == e.tokens
                np.testing.assert_allclose(live.values, e.activations, atol=2e-4 * scale, rtol=1e-3)
                checked += 1
            for e in u.record.bottom[:1]:  # a gated model's neurons are signed: the negative side is negated
                low = run.unit(layer, index, "negative").activations(e.token_ids)
                np.testing.assert_allclose(low.values, -np.asarray(e.activations), atol=2e-4 * scale, rtol=1e-3)
    assert checked >= 20


def test_the_units_that_fire_on_a_text_are_ranked_by_their_collected_maximum(run):
    text = "The meeting moved to March, and then to April."
    top = run.top_units(text, k=8)
    assert 1 <= len(top.rows) <= 8 and top.tokens == run.unit(LAYERS[0], 0).activations(text).tokens
    relative = [r["relative"] for r in top.rows]
    assert relative == sorted(relative, reverse=True)
    for r in top.rows:
        live = run.unit(r["layer"], r["unit"]).activations(text)  # the same numbers as the unit's own call
        assert r["value"] == pytest.approx(live.max, rel=1e-5, abs=1e-6)
        assert r["position"] == int(np.argmax(live.values)) and r["token"] == live.tokens[r["position"]]
        peak = run.store.stats(r["layer"])["max"][list(run.store.neurons(r["layer"])).index(r["unit"])]
        assert r["collected_max"] == pytest.approx(peak) and r["relative"] == pytest.approx(r["value"] / peak)
    frame = top.to_frame()
    assert list(frame.columns[:3]) == ["layer", "unit", "relative"] and len(frame) == len(top.rows)
    only = run.top_units(text, k=3, layers=[LAYERS[1]])
    assert {r["layer"] for r in only.rows} == {LAYERS[1]} and len(only.rows) <= 3


def test_typed_text_is_escaped_and_bad_input_is_named(run):
    u = run.unit(LAYERS[0], 0)
    shown = u.activations("<script>alert(1)</script> & more")._repr_html_()
    assert "<script" not in shown and "&lt;" in shown  # each token escaped ...
    assert "<script>alert(1)</script> & more" in html.unescape(re.sub(r"<[^>]+>", "", shown))  # ... and shown as typed
    assert "<script>" not in run.top_units("<script>x</script>", k=3)._repr_html_()
    assert 'data-layer="3" data-neuron="0"' in u._repr_html_() and u.key == (3, 0, "positive")
    frame = u.activations("The cat sat.").to_frame()
    assert list(frame.columns) == ["position", "token", "token_id", "value"]
    cases = [
        (lambda: u.activations("   "), "The text is empty"),
        (lambda: u.activations("word " * 9000), "more than the model's context"),
        (lambda: run.unit(5, 0), "Layer 5 was not collected"),
        (lambda: run.unit(LAYERS[0], 1), "was not collected"),  # neurons 0, 97, 194, ... were
        (lambda: run.unit(LAYERS[0], 0, "up"), "Unknown sign"),
        (lambda: run.top_units("a text", layers=[5]), "Layer 5 was not collected"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as err:
            call()
        assert words in str(err.value) and err.value.fix
