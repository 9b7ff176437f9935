"""The OpenAI-compatible backend against a real llama.cpp server on localhost, serving the embedded GGUF."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from nbutils.cache import RequestCache
from nbutils.errors import UserError
from nbutils.models import embedded_gguf_path
from nbutils.openai_backend import LOGPROBS, OpenAIBackend, SimulationFailed, parse_value_lines
from nbutils.prompts import (
    LABELS,
    WORKED_EXAMPLES,
    ShownExcerpt,
    explanation_messages,
    simulation_lines,
    simulation_prefix,
)

EXCERPTS = [["The", " river", " ran", " dry", "."], ["Tax", " forms", " are", " due", "."]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "llama.log", "w")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--model_alias", "smollm2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("llama.cpp server exited; see its log") from None
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _raw_completion(url: str, prompt: str) -> dict:
    body = json.dumps(
        {"model": "smollm2", "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": LOGPROBS, "temperature": 0}
    )
    req = urllib.request.Request(url + "/completions", body.encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def test_echo_simulation_reads_prompt_logprobs_and_uses_the_cache(server, tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    be = OpenAIBackend("smollm2", base_url=server, cache=cache)
    assert be.detect_mode() == "echo"
    prefix = simulation_prefix("words about water")
    dists = be.simulate(prefix, EXCERPTS)
    for d, toks in zip(dists, EXCERPTS):
        assert d.shape == (len(toks), len(LABELS))
        np.testing.assert_allclose(d.sum(1), 1.0, atol=1e-9)
    # independent check of one slot: the labels' top log-probabilities from a raw HTTP request, renormalised
    text = prefix + "".join(b + a for b, a in simulation_lines(EXCERPTS[0])) + "<end>\n"
    raw = _raw_completion(server, text)["choices"][0]["logprobs"]
    slot = len(prefix) + len(simulation_lines(EXCERPTS[0])[0][0])  # just after the first "token<TAB>"
    i = raw["text_offset"].index(slot)
    want = np.array([math.exp(raw["top_logprobs"][i].get(label, -math.inf)) for label in LABELS])
    np.testing.assert_allclose(dists[0][0], want / want.sum(), atol=1e-6)

    requests = be.usage.requests
    assert cache.stats()["misses"] >= 3 and cache.stats()["hits"] == 0
    again = OpenAIBackend("smollm2", base_url=server, cache=RequestCache(tmp_path / "cache.sqlite"))
    again.mode = "echo"
    assert all(np.array_equal(a, b) for a, b in zip(again.simulate(prefix, EXCERPTS), dists))
    assert again.usage.requests == 0 and again.cache.stats()["hits"] == 2  # nothing sent the second time
    assert be.usage.requests == requests and be.usage.prompt_tokens > 0


def test_chat_explanations_and_chat_mode_simulation(server):
    be = OpenAIBackend("smollm2", base_url=server, simulation="chat")
    msgs = explanation_messages([ShownExcerpt(("The", " river", " ran"), (0, 9, 1))], WORKED_EXAMPLES[:1])
    replies = be.chat(msgs, n=2, temperature=0.7, max_tokens=24, seed=5)
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    assert be.usage.completion_tokens > 0
    try:
        dists = be.simulate(simulation_prefix("rivers"), EXCERPTS[:1])
    except SimulationFailed as e:  # a weak model may not follow the format: then it is a failure with a reason
        assert "value lines" in str(e) or "aligned" in str(e)
    else:
        assert dists[0].shape == (5, 11) and set(np.unique(dists[0])) <= {0.0, 1.0}


def test_value_line_parsing_is_tolerant_and_refuses_to_guess():
    tokens = ["The", " river", "\u21b5"]
    assert parse_value_lines("```\n<start>\nThe\t0\n river\t9\n\u21b5\t2.6\n<end>\n```", tokens).tolist() == [0, 9, 3]
    assert parse_value_lines("The 0\n river 12\n\u21b5 -1", tokens).tolist() == [0, 10, 0]
    extra = "Here you go:\nThe\t1\nnoise\t5\n river\t4\n\u21b5\t0"
    assert parse_value_lines(extra, tokens).tolist() == [1, 4, 0]  # aligned by token text
    with pytest.raises(SimulationFailed, match="could not be aligned"):
        parse_value_lines("The\t1\n", tokens)
    with pytest.raises(SimulationFailed):
        parse_value_lines("I cannot do that.", tokens)


def test_missing_api_key_for_the_openai_api(monkeypatch):
    monkeypatch.delenv("NBUTILS_TEST_MISSING_KEY", raising=False)
    with pytest.raises(UserError, match="NBUTILS_TEST_MISSING_KEY is not set"):
        OpenAIBackend("gpt-4o-mini", api_key_env="NBUTILS_TEST_MISSING_KEY")
