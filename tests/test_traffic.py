"""Many units in flight against a real HTTP server: the cap on requests in flight holds across units, results
do not depend on it, rate limits hold, and a 429's Retry-After pauses every request.

The server is `bench/stand_in_api.py` (an OpenAI-compatible server that answers after a fixed latency with
replies made from the request, the same reply for the same request), in its own process; the 429 goes
through the fault-injecting proxy of `tests/servers.py` in front of it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.explain.stage import run_explain_stage
from nbutils.llm.openai_compat import OpenAIBackend
from nbutils.llm.traffic import Traffic, TrafficStats
from nbutils.score.stage import run_score_stage

LATENCY = 0.25  # the stand-in's seconds per request (conftest.py's `stand_in`)
MESSAGES = [{"role": "user", "content": "Name the token. " + "word " * 100}]


def _server(url: str, what: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/" + what, timeout=5).read())


@pytest.fixture(scope="module")
def collection(embedded, tmp_path_factory):
    ex = make_excerpts(embedded.tokenizer, load_texts("embedded"), 8, 96, seed=2, corpus="embedded")
    cfg = CollectConfig(layers=[3, 9], neurons=[1, 2], top_k=4, n_random=3, band_size=2, quantile_warmup=16)
    return collect_activations(embedded, ex, tmp_path_factory.mktemp("c") / "01", cfg, progress=False).path


def test_units_overlap_within_the_cap_and_results_do_not_depend_on_it(stand_in, collection, tmp_path):
    def run(limit: int, workers: int | None, folder: Path) -> tuple[list, list, int, int]:
        config = RunConfig(
            explain_neurons="all", explainer_backend="openai", explainer_model="stand-in", explainer_base_url=stand_in,
            simulator_backend="openai", simulator_model="stand-in", simulator_base_url=stand_in,
            simulation_mode="chat", max_in_flight=limit, n_boot=50, judge_per_class=2,
        )  # fmt: skip
        _server(stand_in, "reset")
        explained = run_explain_stage(collection, folder / "02", config, False, "none", workers)
        most_02 = _server(stand_in, "stats")["max_in_flight"]
        _server(stand_in, "reset")
        scored = run_score_stage(collection, folder / "02", folder / "03", config, False, "none", workers)
        return explained, scored, most_02, _server(stand_in, "stats")["max_in_flight"]

    one = run(1, 1, tmp_path / "one")  # today's order: one unit, one request at a time
    many = run(6, None, tmp_path / "many")
    assert one[2:] == (1, 1)
    # stage 02 sends one request per unit: 4 at once means 4 units were in progress together
    assert many[2] == 4
    assert many[3] == 6  # the cap was reached and never passed
    assert all(e.explanation for e in many[0]) and not any(r.failure for r in many[1])
    assert many[0] == one[0] and many[1] == one[1]  # same explanations, same scores, same order
    # over 16 in flight the backend spreads its requests over several HTTP clients (16 connections each)
    wide = run(40, None, tmp_path / "wide")
    assert 16 < wide[3] <= 40
    assert wide[0] == one[0] and wide[1] == one[1]


def test_requests_per_minute_holds(stand_in):
    fast = OpenAIBackend("stand-in", base_url=stand_in, cache=None, traffic=Traffic(64))
    traffic = Traffic(64, requests_per_minute=1200, record=True)
    limited = OpenAIBackend("stand-in", base_url=stand_in, cache=None, traffic=traffic)
    start = time.monotonic()
    fast.chat(MESSAGES, n=60)
    free = time.monotonic() - start
    start = time.monotonic()
    assert len(limited.chat(MESSAGES, n=60)) == 60
    held = time.monotonic() - start
    # 20 a second with a bucket of 20: the last 40 requests need at least 2 s
    assert held >= 2.0 - 0.05 and free < held, (free, held)
    assert traffic.stats.sent == 60
    # never more sent by time t than the bucket (20) plus 20 a second since the first request
    starts, before = [], 0
    for t, n in traffic.stats.timeline:
        starts += [t] if n > before else []
        before = n
    assert all(i + 1 <= 20 + 20 * t + 1e-6 for i, t in enumerate(starts)), starts


def test_tokens_per_minute_holds(stand_in):
    per_minute = 30_000.0  # 500 tokens a second, at most 500 held
    be = OpenAIBackend("stand-in", base_url=stand_in, cache=None, traffic=Traffic(64, tokens_per_minute=per_minute))
    start = time.monotonic()
    be.chat(MESSAGES, n=30)
    held = time.monotonic() - start
    used = be.usage.prompt_tokens + be.usage.completion_tokens  # what the server says the requests cost
    assert used > 2 * be.traffic.tokens.capacity
    assert held >= (used - be.traffic.tokens.capacity) / (per_minute / 60) - 0.05, (used, held)


def test_a_429_with_retry_after_pauses_every_request(stand_in):
    from servers import FaultProxy

    proxy = FaultProxy(stand_in).start()
    try:
        proxy.queue = ["429"]  # Retry-After: 1
        be = OpenAIBackend("stand-in", base_url=proxy.url, cache=None, backoff=0.01, traffic=Traffic(2))
        assert len(be.chat(MESSAGES, n=6)) == 6
    finally:
        proxy.stop()
    sent = sorted(proxy.sent(), key=lambda e: e["time"])
    refused = next(e["time"] for e in sent if e["fault"] == "429")
    # the request in flight beside the refused one was sent with it; nothing else may go for the next second
    # (without the shared pause the second place would send a request every 0.1 s)
    during = [e["time"] - refused for e in sent if 0.05 < e["time"] - refused < 0.95]
    assert during == [], during
    assert len(sent) == 7 and be.traffic.stats.pauses and be.traffic.stats.pauses[0] >= 1.0


def test_mean_in_flight_is_time_weighted():
    stats = TrafficStats(record=True)
    for t, before, after in [(0.0, 0, 2), (1.0, 2, 4), (3.0, 4, 0)]:  # 2 for 1 s, then 4 for 2 s
        stats.change(t, before, after)
    assert stats.mean_in_flight == pytest.approx((2 * 1 + 4 * 2) / 3)
    assert stats.mean_between(0.5, 2.0) == pytest.approx((2 * 0.5 + 4 * 1.0) / 1.5)
    assert (stats.sent, stats.max_in_flight) == (2, 4)
    assert np.isclose(stats.mean_between(3.0, 4.0), 0.0)
