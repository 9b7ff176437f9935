"""Server faults, injected by a proxy in front of the real llama.cpp server: retries within limits, failures
recorded per neuron with their reason, the other neurons carried on, and a rerun that retries only the
failed ones."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from servers import FaultProxy

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.failures import StageHadFailures, check_failures
from nbutils.core.records import RecordStore, split_excerpts
from nbutils.core.store import StoredSequence
from nbutils.explain.stage import run_explain_stage
from nbutils.llm.cache import RequestCache
from nbutils.llm.contract import LLMFailed, SimulationRequest
from nbutils.llm.openai_compat import OpenAIBackend
from nbutils.llm.prompts import ShownExcerpt, WorkedExample, simulation_lines
from nbutils.score.stage import run_score_stage

EXCERPT = ["The", " river", " ran", " dry", "."]
# short (llama.cpp's prompt log-probabilities are slow): one worked line, so values follow each tab
WORKED = (WorkedExample("rivers", (ShownExcerpt(("The", " river"), (0, 9)), ShownExcerpt((" flows", " on"), (3, 0)))),)
# (two-token excerpts show every value: the first third of a worked excerpt reads "unknown")
REQUEST = SimulationRequest("rivers", (tuple(EXCERPT),), examples=WORKED)


# one echo request takes ~7 s on this project's 2 cores and can take 3x that on a loaded CI machine: the client
# waits long enough for a real reply, and the "hang" fault outlasts its wait
TIMEOUT_S, HANG_S = 45.0, 50.0


@pytest.fixture
def proxy(llama_server):
    p = FaultProxy(llama_server, hang_s=HANG_S, refuse_s=1.5).start()
    yield p
    p.stop()


# llama-cpp-python's server answers one request at a time, and an echo request's log-probabilities take it
# 7-20 s (a Python sort of the vocabulary per prompt token); requests queued behind others time out on a slow
# machine and are still computed after, so these tests keep one in flight (concurrency is tests/test_traffic.py's)
IN_FLIGHT = 1


def _explainer(proxy: FaultProxy) -> dict[str, Any]:
    return {
        "explainer_backend": "openai", "explainer_model": "smollm2", "explainer_base_url": proxy.url,
        "max_in_flight": IN_FLIGHT,
    }  # fmt: skip


def _backend(proxy: FaultProxy, tmp_path, **kw) -> OpenAIBackend:
    kw = {"timeout": TIMEOUT_S, "max_retries": 6, "backoff": 0.1, "simulation": "echo", **kw}
    return OpenAIBackend("smollm2", base_url=proxy.url, cache=RequestCache(tmp_path / "cache.sqlite"), **kw)


@pytest.fixture(scope="module")
def clean(llama_server, tmp_path_factory) -> np.ndarray:
    """The request's answer with no fault (asked once: llama.cpp answers it the same every time)."""
    proxy = FaultProxy(llama_server).start()
    try:
        return _backend(proxy, tmp_path_factory.mktemp("clean")).simulate(REQUEST)[0]
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "faults",
    [["429"], ["500", "503"], ["hang"], ["refuse"], ["truncate"], ["malformed"], ["no_logprobs"], ["short_logprobs"]],
)
def test_each_fault_is_retried_and_the_result_is_exact(proxy, clean, tmp_path, faults):
    proxy.queue = list(faults)
    be = _backend(proxy, tmp_path / "faulty")
    start = time.monotonic()
    got = be.simulate(REQUEST)[0]
    elapsed = time.monotonic() - start
    np.testing.assert_allclose(got, clean, atol=1e-9)  # the retry got the real answer
    sent = [e["fault"] for e in proxy.sent()]
    assert sent == faults + [None]  # each fault hit one request; the retry after it went through
    if faults == ["429"]:
        assert elapsed >= 1.0  # Retry-After: 1 was honoured (the backoff alone is 0.1 s)
    if faults == ["refuse"]:
        assert elapsed >= 1.0  # connections were refused until the proxy listened again
    # the bad reply was not cached: a fresh backend on the same cache sends nothing and gets the good one
    again = _backend(proxy, tmp_path / "faulty")
    proxy.log.clear()
    np.testing.assert_allclose(again.simulate(REQUEST)[0], clean, atol=1e-9)
    assert proxy.sent() == [] and again.usage.cache_hits == 1


def test_retries_are_bounded_and_the_failure_names_the_reason(proxy, tmp_path):
    proxy.rules = [(lambda r: True, "503")]
    be = _backend(proxy, tmp_path, max_retries=2)
    with pytest.raises(LLMFailed, match=r"after 3 tries: InternalServerError.*503|after 3 tries: .*503"):
        be.simulate(REQUEST)
    assert len(proxy.sent()) == 3


def _unique_excerpt_text(store: RecordStore, target: tuple[int, int], others: list[tuple[int, int]]) -> str:
    """Prompt text of a scored excerpt of ``target`` that no other neuron scores (to aim a fault at it)."""

    def scored(nid):
        sp = split_excerpts(store.record(*nid))
        return [e for k in ("valid_top", "valid_random", "calibration_top", "calibration_random") for e in sp[k]]

    taken = {e.index for o in others for e in scored(o)}
    for e in scored(target):
        if e.index not in taken:
            return "".join(b + a for b, a in simulation_lines(e.tokens))
    raise AssertionError("no excerpt unique to the target neuron")


@pytest.fixture(scope="module")
def collection(embedded, tmp_path_factory):
    ex = make_excerpts(embedded.tokenizer, load_texts("embedded"), 8, 96, seed=2, corpus="embedded")
    cfg = CollectConfig(layers=[3, 9], neurons=[1, 2], top_k=4, n_random=3, band_size=2, quantile_warmup=16)
    return collect_activations(embedded, ex, tmp_path_factory.mktemp("c") / "01", cfg, progress=False)


def test_garbage_explanation_is_a_recorded_failure(proxy, collection, tmp_path):
    proxy.rules = [(lambda r: "messages" in r, "garbage")]
    config = RunConfig(explain_neurons=[[3, 1]], **_explainer(proxy))
    (entry,) = run_explain_stage(collection.path, tmp_path / "02", config, progress=False, cache_path="none")
    assert entry.explanation is None and entry.failure == "no usable explanation among 1 replies"
    assert entry.candidates[0].reply == "!!! ??? ..." and entry.baseline.explanation


def test_stage_records_failures_carries_on_and_a_rerun_retries_only_them(proxy, collection, tmp_path):
    store = collection
    (tmp_path / "01").symlink_to(store.path)
    neurons = [[3, 1], [3, 2], [9, 1]]
    cache = str(tmp_path / "cache.sqlite")
    # stage 02 through the proxy: one explanation request gets a 500 once (retried), the rest pass
    proxy.queue = ["500"]
    config = RunConfig(explain_neurons=neurons, **_explainer(proxy))
    entries = run_explain_stage(tmp_path / "01", tmp_path / "02", config, progress=False, cache_path=cache)
    assert all(e.explanation for e in entries) and proxy.sent("500")

    def score():  # stage 03 through the proxy, with short prompts
        run = tmp_path / "01", tmp_path / "02", tmp_path / "03"
        config = RunConfig(
            simulator_backend="openai", simulator_model="smollm2", simulator_base_url=proxy.url,
            simulation_mode="echo", n_boot=20, max_prompt_tokens=320, judge_per_class=1, per_band=0,
            max_in_flight=IN_FLIGHT,
            scorers=["simulation"],  # failures and retries are the stage's, whichever scorer's requests fail
        )  # fmt: skip
        return run_score_stage(*run, config, progress=False, cache_path=cache)

    # stage 03: every simulation request of one neuron fails for good; the others are scored
    target = (9, 1)
    needle = _unique_excerpt_text(store, target, [(3, 1), (3, 2)])
    proxy.rules = [(lambda r: needle in (r.get("prompt") or ""), "503")]
    results = score()
    for _ in range(2):  # on a loaded machine an echo request may time out (60 s): a rerun retries it, as a user's
        if not any(r.retryable for r in results if (r.layer, r.neuron) != target):
            break
        results = score()
    by = {(r.layer, r.neuron): r for r in results}
    assert "503" in by[target].failure and by[target].retryable
    others = [by[k] for k in [(3, 1), (3, 2)]]
    # the others were simulated and scored; a weak model may still fail one (its own doing: not retried)
    assert all(r.baseline.of("simulation") and not r.retryable for r in others)
    assert any(r.of("simulation") for r in others)
    summary = json.loads((tmp_path / "03" / "summary.json").read_text())
    failed = 1 + sum(bool(r.failure) for r in others)
    assert (summary["succeeded"], summary["failed"], summary["retryable"]) == (3 - failed, failed, 1)
    assert proxy.url in by[target].failure  # the server the requests went to is named
    assert f"{3 - failed} succeeded, {failed} failed" in check_failures(tmp_path / "03")
    assert "First failures: " in check_failures(tmp_path / "03") and "503" in check_failures(tmp_path / "03")
    with pytest.raises(StageHadFailures, match="L9 N1"):
        check_failures(tmp_path / "03", fail_on_errors=True)
    # the server recovers; the rerun sends requests for the failed neuron only
    proxy.rules, proxy.log = [], []
    again = score()
    explained = list(StoredSequence.of(tmp_path / "02", dict))
    target_expl = next(e for e in explained if (e["layer"], e["neuron"]) == target)
    prompts = [e["request"].get("prompt") or "" for e in proxy.sent()]
    assert prompts and all(target_expl["explanation"] in p for p in prompts)
    assert len(again) == 3 and [r for r in again if r.retryable] == []
    assert "503" not in (next(r for r in again if (r.layer, r.neuron) == target).failure or "")
    again_by = {(r.layer, r.neuron): r for r in again}
    assert [again_by[k] for k in [(3, 1), (3, 2)]] == others  # finished neurons were left alone
    assert json.loads((tmp_path / "03" / "summary.json").read_text())["retryable"] == 0


def test_explainer_and_simulator_on_two_servers_in_one_run(proxy, llama_server, tmp_path):
    """`nbutils run` with the explainer behind one server (the proxy) and the simulator behind another."""
    import os
    import subprocess
    import sys

    from nbutils.core.layout import cache_dir

    cache = tmp_path / "cache"  # a private request cache, so every request is really sent
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models")
    params = [
        "model=planted", "layers=null", "n_excerpts=32", "excerpt_len=8", "top_k=4", "n_random=3", "band_size=1",
        "explain_neurons=[[0, 0]]", "explainer_backend=openai", "explainer_model=smollm2",
        f"explainer_base_url={proxy.url}", "simulator_backend=openai", "simulator_model=smollm2",
        f"simulator_base_url={llama_server}", "simulation_mode=echo", "max_prompt_tokens=320", "per_band=0",
        "scorers=[detection]", "n_boot=20", f"max_in_flight={IN_FLIGHT}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "nbutils", "run", *[x for p in params for x in ("-p", p)], "--stages", "01,02,03"]
    cmd += ["--run-id", "two", "--output-root", str(tmp_path)]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "NBUTILS_CACHE": str(cache)}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sent = proxy.sent()
    assert sent and all(e["path"].endswith("/chat/completions") for e in sent)  # only the explainer came this way
    usage = json.loads((tmp_path / "two" / "03_score" / "usage.json").read_text())
    assert usage["requests"] > 0 and usage["cache_misses"] == usage["requests"]  # the simulator's went elsewhere
    explain = json.loads((tmp_path / "two" / "02_explain" / "manifest.json").read_text())["parameters"]
    score = json.loads((tmp_path / "two" / "03_score" / "manifest.json").read_text())["parameters"]
    assert explain["explainer_base_url"] == proxy.url and score["simulator_base_url"] == llama_server
