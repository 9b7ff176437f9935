"""A run worked with live (`nbutils.open_run`): a unit's values on any text equal what stage 01 collected for
the same tokens, the units that fire on a text are ranked as documented, and bad input is named with the fix."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from conftest import tiny_model

import nbutils
from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.explain.stage import run_explain_stage
from nbutils.score.stage import run_score_stage
from nbutils.subject.models import SubjectModel
from nbutils.subject.sites import site_module

LAYERS = [3, 17]


# stages 02-03 of the scored run, called directly: they record these in their parameters.json for live calls
STAGE_PARAMS = {"explain_neurons": "strongest:1", "scorers": ["simulation", "detection"], "judge_per_class": 2,
                "n_boot": 50, "per_band": 1}  # fmt: skip


@pytest.fixture(scope="module")
def root(embedded, tmp_path_factory):
    texts = load_texts("embedded")[:200]
    excerpts = make_excerpts(embedded.tokenizer, texts, 32, 96, seed=2, corpus="embedded")
    root = tmp_path_factory.mktemp("live")
    cfg = CollectConfig(layers=LAYERS, neurons=list(range(0, 1536, 97)), top_k=6, n_random=6, band_size=1,
                        quantile_warmup=16, batch_size=16)  # fmt: skip
    collect_activations(embedded, excerpts, root / "01_collect", cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def run(root):
    return nbutils.open_run(root)


@pytest.fixture(scope="module")
def scored(root):
    """The run explained and scored by stages 02-03 (two units: the strongest of each layer)."""
    config = RunConfig(**STAGE_PARAMS)
    run_explain_stage(root / "01_collect", root / "02_explain", config, progress=False)
    run_score_stage(root / "01_collect", root / "02_explain", root / "03_score", config, progress=False)
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


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_live_values_equal_the_collected_ones_on_other_architectures(arch, embedded_tokenizer, tmp_path):
    """A random-initialised model of another architecture, saved as a folder the run names: the live path
    loads it from the collection's own record and reads the same neurons (non-gated GELU, gated GELU)."""
    model = tiny_model(arch, vocab_size=len(embedded_tokenizer), seed=3)
    folder = tmp_path / f"tiny-{arch}"
    model.save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    subject = SubjectModel(model, embedded_tokenizer, str(folder))
    excerpts = make_excerpts(embedded_tokenizer, load_texts("embedded")[:60], 16, 24, seed=4, corpus="embedded")
    cfg = CollectConfig(layers=[1], neurons=[0, 5, 9], top_k=3, n_random=2, band_size=1, quantile_warmup=8,
                        batch_size=8)  # fmt: skip
    collect_activations(subject, excerpts, tmp_path / "run" / "01_collect", cfg, progress=False)
    run = nbutils.open_run(tmp_path / "run")
    for index in (0, 5, 9):
        u = run.unit(1, index)
        scale = max(abs(u.record.max), abs(u.record.min), 1e-6)
        for e in u.record.top:
            np.testing.assert_allclose(u.activations(e.token_ids).values, e.activations, atol=2e-4 * scale, rtol=1e-3)


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


def test_the_first_positions_do_not_crowd_out_the_text_and_every_token_shows(run):
    """A typed text's opening tokens (never at the start of a collected excerpt, which are cut mid-document)
    are left out of the ranking by default; ranked in, they are compared like any other position."""
    text = "On Tuesday 14 March\nthe  committee met."
    top, every = run.top_units(text, k=40), run.top_units(text, k=40, skip_first=0)
    assert top.skipped == 2 and every.skipped == 0
    assert top.rows and all(r["position"] >= 2 for r in top.rows)
    for found, start in ((top, 2), (every, 0)):  # against each unit's own values, by hand: its best position
        for r in found.rows[:6]:
            values = run.unit(r["layer"], r["unit"]).activations(text).values[start:]
            assert r["position"] == start + int(np.argmax(values)) and r["value"] == pytest.approx(values.max())
    shown = top._repr_html_()
    assert "Positions 0-1" in shown and "skip_first=0" in shown
    cells = re.findall(r"<td>(.*?)</td>", shown)
    assert "" not in cells  # no blank cell: spaces and newlines are marked, an unexplained unit says so
    assert "(not explained)" in shown
    short = run.top_units("March", k=3)  # no longer than skip_first: ranked whole
    assert short.skipped == 0 and short.rows
    with pytest.raises(UserError, match="skip_first=-1"):
        run.top_units(text, skip_first=-1)


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


def _numbers(result, scorers):
    return {(sc.name, c.label, part): c.value(result.side(part == "baseline").of(sc.name))
            for sc in scorers for c in sc.columns for part in ("explanation", "baseline")}  # fmt: skip


def test_the_stage_02_explanation_scored_live_equals_what_stage_03_stored(scored):
    assert scored.config_from == "02_explain/parameters.json and 03_score/parameters.json"
    assert scored.config.scorers == STAGE_PARAMS["scorers"] and scored.config.n_boot == STAGE_PARAMS["n_boot"]
    checked = 0
    for key, stored in sorted(scored.scores.items()):
        u = scored.unit(*key)
        live = u.score(u.explanation)
        assert type(live.result) is type(stored) and live.explanation == stored.explanation
        numbers = _numbers(live.result, live.scorers)
        assert numbers == _numbers(stored, live.scorers)  # every number and baseline number, exactly
        assert live.result.of("simulation") == stored.of("simulation")  # intervals and counts too
        sim = scored.simulation(key).of("simulation")
        assert [x.expected for x in live.details.of("simulation").excerpts] == [x.expected for x in sim.excerpts]
        assert live.correlation == stored.of("simulation").top_and_random.correlation.value
        low, high = live.interval
        assert low <= live.correlation <= high and live.requests >= 1
        again = u.score(" " + u.explanation + " ")  # the same question: from memory, no request
        assert again is live
        frame = live.to_frame()
        assert list(frame.columns) == ["number", "this explanation", "baseline", "stored explanation"]
        assert (frame["this explanation"].fillna(-9) == frame["stored explanation"].fillna(-9)).all()
        checked += 1
    assert checked == 2


def test_the_simulation_score_alone_first_then_every_scorer_on_request(scored):
    u = scored.unit(*sorted(scored.scores)[0])
    first = u.score("words about numbers", scorers=["simulation"])
    assert [sc.name for sc in first.scorers] == ["simulation"] and first.result.of("detection") is None
    full = u.score("words about numbers")  # every scorer of stage 03: the simulation part is the same
    assert [sc.name for sc in full.scorers] == STAGE_PARAMS["scorers"] and full.result.of("detection") is not None
    assert full.result.of("simulation") == first.result.of("simulation") and first.requests < full.requests
    assert "detection" not in first._repr_html_() and "detection" in full._repr_html_()
    with pytest.raises(UserError, match=r"\['fuzzing'\] not among the run's scorers \['simulation', 'detection'\]"):
        u.score("words about numbers", scorers=["fuzzing"])


def test_your_explanations_compared_on_the_same_excerpts(scored):
    key = sorted(scored.scores)[0]
    u = scored.unit(*key)
    mine = "<script>alert(1)</script> numbers"
    both = u.compare([u.explanation, mine])
    assert [s.explanation for s in both.scores] == [u.explanation, mine]
    assert both.scores[0] is u.score(u.explanation)
    rows = both.to_frame()
    assert len(rows) == 3 and rows["explanation"].iloc[2].startswith("(token-lookup baseline)")
    assert rows["top+random"].iloc[0] == pytest.approx(u.score(u.explanation).correlation)
    shown = both._repr_html_() + both.scores[1]._repr_html_()
    assert "<script>" not in shown and "&lt;script&gt;" in shown
    assert both.best is not None and both.best.correlation == max(
        s.correlation for s in both.scores if s.correlation is not None
    )


def test_a_new_explanation_shows_its_exact_prompt_and_reply_and_repeats_stage_02(scored):
    for key, stored in sorted(scored.explanations.items()):
        new = scored.unit(*key).explain()
        assert new.explanation == stored.explanation  # the same excerpts, parameters and seed
        assert new.replies == [c.reply for c in stored.candidates] and new.requests >= 1
        assert new.messages[0]["role"] == "system" and new.messages[-1]["role"] == "user"
        record = scored.store.record(key[0], key[1])
        assert record.top[0].tokens[0].strip() in new.messages[-1]["content"]  # its own excerpts were shown
        assert "[system]" in new.prompt and html.escape(new.replies[0]) in new._repr_html_()


def test_steering_equals_a_hand_hooked_greedy_generation(run):
    import torch

    u = run.unit(LAYERS[0], 97)
    prompt, n = "I went to the market and bought", 6
    steered = u.steer(prompt, strength=8.0, tokens=n)
    assert steered.shift == pytest.approx(8.0 * abs(u.record.max))
    model, tok = run.live.subject.model, run.live.tokenizer
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    module = site_module(model, run.live.site, LAYERS[0])  # the MLP's down projection, whose input is the neuron

    def shifted(_m, args):
        x = args[0].clone()
        x[..., 97] += steered.shift
        return (x, *args[1:])

    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        handle = module.register_forward_pre_hook(shifted)
        try:
            hooked = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        finally:
            handle.remove()
    assert steered.original == tok.decode(plain[0, ids.shape[1] :])
    assert steered.steered == tok.decode(hooked[0, ids.shape[1] :])
    same = u.steer(prompt, strength=0.0, tokens=n)
    assert same.steered == same.original == steered.original and not same.changed
    found = u.steer(prompt, tokens=n)  # strength=None: the intervention score's target KL
    assert found.kl == pytest.approx(0.5, rel=0.5) and found.strength is None


def test_search_finds_explanations_and_tokens(scored):
    key, entry = sorted(scored.explanations.items())[0]
    word = max(entry.explanation.split(), key=len)
    hits = scored.search(word.upper())
    assert any((r["layer"], r["neuron"], r["sign"]) == key and r["matched"] for r in hits.rows)
    assert [r["relevance"] for r in hits.rows] == sorted((r["relevance"] for r in hits.rows), reverse=True)
    assert list(hits.to_frame().columns) == ["layer", "neuron", "sign", "matched", "relevance", "explanation", "score"]
    assert scored.search("zzqxv qqwxz").rows == []  # any word may match: none of these does
    assert "No explanation matches" in scored.search("<b>zzqxv</b>")._repr_html_()


def test_bad_live_input_is_named_with_the_fix(scored, root):
    u = scored.unit(*sorted(scored.scores)[0])
    cases = [
        (lambda: u.score("  "), "The explanation is empty"),
        (lambda: u.compare("one explanation"), "compare takes a list"),
        (lambda: u.steer("", strength=1.0), "The text is empty"),
        (lambda: scored.search(" "), "The search text is empty"),
        (lambda: scored.search("month", by="sound"), "is not a way to search"),
        (lambda: scored.search("month", by="meaning"), "embedding_base_url is not set"),
        (lambda: nbutils.open_run(root, simulator_bakend="openai"), "did you mean simulator_backend"),
        (lambda: nbutils.open_run(root / "02_explain"), "No finished activation collection"),  # no 01_collect
        (lambda: scored.unit(LAYERS[0], 5), "was not collected"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as err:
            call()
        assert words in str(err.value) and err.value.fix
    away = nbutils.open_run(root, simulator_backend="openai", simulator_base_url="http://127.0.0.1:9/v1",
                            llm_options={"max_retries": 1, "backoff": 0.1})  # fmt: skip
    with pytest.raises(UserError) as err:  # nothing listens: the probe names it before any request
        away.unit(*u.key).score("a new explanation")
    assert "Nothing answers at http://127.0.0.1:9/v1" in str(err.value) and "simulator_base_url" in err.value.fix
    failing, server = _server_that_lists_models_but_fails_requests()  # it answers the probe, fails every request
    try:
        away = nbutils.open_run(root, simulator_backend="openai", simulator_base_url=failing,
                                llm_options={"max_retries": 1, "backoff": 0.1})  # fmt: skip
        with pytest.raises(UserError) as err:
            away.unit(*u.key).score("a new explanation")
        assert "did not answer" in str(err.value) and "simulator_base_url" in err.value.fix
    finally:
        server.shutdown()


def _server_that_lists_models_but_fails_requests():  # noqa: ANN202 - (its URL, the server)
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = b'{"object": "list", "data": []}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/v1", server
