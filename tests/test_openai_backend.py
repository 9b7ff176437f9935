"""The OpenAI-compatible backend against a real llama.cpp server on localhost, serving the embedded GGUF."""

from __future__ import annotations

import json
import math
import re
import sys
import urllib.request

import numpy as np
import pytest
from servers import free_port, start_server

from nbutils.core.errors import UserError
from nbutils.llm.cache import RequestCache
from nbutils.llm.contract import JudgeRequest, SimulationFailed, SimulationRequest
from nbutils.llm.openai_compat import LOGPROBS, OpenAIBackend
from nbutils.llm.prompts import (
    LABELS,
    WORKED_EXAMPLES,
    ShownExcerpt,
    explanation_messages,
    simulation_lines,
    simulation_prefix,
)
from nbutils.llm.replies import label_distribution, parse_value_lines
from nbutils.subject.models import convert_gguf, embedded_gguf_path

EXCERPTS = [["The", " river", " ran", " dry", "."], ["Tax", " forms", " are", " due", "."]]


def request(explanation: str, excerpts: list[list[str]]) -> SimulationRequest:
    return SimulationRequest(explanation, tuple(tuple(t) for t in excerpts))


@pytest.fixture(scope="module")
def chat_only_server(tmp_path_factory):
    """``transformers serve``: chat completions only (no /v1/completions), no log-probabilities, always streams."""
    port, folder = free_port(), str(convert_gguf(embedded_gguf_path()))
    cli = "import sys; from transformers.commands.transformers_cli import main; sys.argv[0] = 'transformers'; main()"
    cmd = [sys.executable, "-c", cli, "serve", "--host", "127.0.0.1", "--port", str(port), "--force_model", folder]
    cmd += ["--device", "cpu", "--dtype", "float32"]
    proc, url = start_server(cmd, port, tmp_path_factory.mktemp("tserve") / "serve.log")
    yield url, folder
    proc.terminate()
    proc.wait(timeout=30)


def _raw_completion(url: str, prompt: str) -> dict:
    body = json.dumps(
        {"model": "smollm2", "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": LOGPROBS, "temperature": 0}
    )
    req = urllib.request.Request(url + "/completions", body.encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def test_echo_simulation_reads_prompt_logprobs_and_uses_the_cache(llama_server, tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    be = OpenAIBackend("smollm2", base_url=llama_server, cache=cache)
    assert be.detect_mode() == "echo"
    prefix = simulation_prefix("words about water")
    dists = be.simulate(request("words about water", EXCERPTS))  # all worked examples fit: the same prefix
    for d, toks in zip(dists, EXCERPTS):
        assert d.shape == (len(toks), len(LABELS))
        np.testing.assert_allclose(d.sum(1), 1.0, atol=1e-9)
    # independent check of one slot: the labels' top log-probabilities from a raw HTTP request, renormalised
    text = prefix + "".join(b + a for b, a in simulation_lines(EXCERPTS[0])) + "<end>\n"
    raw = _raw_completion(llama_server, text)["choices"][0]["logprobs"]
    slot = len(prefix) + len(simulation_lines(EXCERPTS[0])[0][0])  # just after the first "token<TAB>"
    i = raw["text_offset"].index(slot)
    want = np.array([math.exp(raw["top_logprobs"][i].get(label, -math.inf)) for label in LABELS])
    np.testing.assert_allclose(dists[0][0], want / want.sum(), atol=1e-6)

    requests = be.usage.requests
    assert cache.stats()["misses"] >= 3 and cache.stats()["hits"] == 0
    again = OpenAIBackend("smollm2", base_url=llama_server, cache=RequestCache(tmp_path / "cache.sqlite"))
    again.mode = "echo"
    assert all(np.array_equal(a, b) for a, b in zip(again.simulate(request("words about water", EXCERPTS)), dists))
    assert again.usage.requests == 0 and again.cache.stats()["hits"] == 2  # nothing sent the second time
    assert (again.usage.cache_hits, again.usage.cache_misses) == (2, 0)
    assert be.usage.requests == requests and be.usage.prompt_tokens > 0 and be.usage.cache_misses == requests


def test_judging_over_http_echo_and_chat_with_the_cache(llama_server, tmp_path):
    from nbutils.llm.prompts import JudgeItem, judge_piece, judge_prefix

    prefix = judge_prefix("detection", "words about water", examples=())  # short prompts: echo is slow here
    items = [JudgeItem(tuple(t)) for t in EXCERPTS]
    asked = JudgeRequest("detection", "words about water", tuple(items), examples=())
    cache = RequestCache(tmp_path / "cache.sqlite")
    be = OpenAIBackend("smollm2", base_url=llama_server, cache=cache, simulation="echo")
    judged = be.judge(asked)
    p = judged.p_yes
    assert p.shape == (2,) and ((0 < p) & (p < 1)).all() and judged.probabilities
    # independent: the answer slot's top log-probabilities from a raw request, "1" against "0"
    text = prefix + judge_piece(items[0])
    top = _raw_completion(llama_server, text + "0\n")["choices"][0]["logprobs"]
    i = top["text_offset"].index(len(text))
    yes, no = (math.exp(top["top_logprobs"][i][d]) for d in ("1", "0"))
    assert p[0] == pytest.approx(yes / (yes + no), abs=1e-6)
    again = OpenAIBackend("smollm2", base_url=llama_server, cache=RequestCache(tmp_path / "cache.sqlite"))
    again.mode = "echo"
    assert np.array_equal(again.judge(asked).p_yes, p) and again.usage.requests == 0  # all from the cache

    chat = OpenAIBackend("smollm2", base_url=llama_server, simulation="chat")
    marked = (JudgeItem(("a", " river"), (False, True)),)
    answer = chat.judge(JudgeRequest("fuzzing", "words about water", marked, examples=()))
    q = answer.p_yes
    assert q.shape == (1,) and chat.chat_logprobs
    if answer.probabilities:  # read from the reply's top_logprobs (llama.cpp sends them)
        assert 0 <= q[0] <= 1
    else:  # the first reply token was no digit and had none among its alternatives: the written answer
        assert np.isnan(q[0]) or q[0] in (0.0, 1.0)


def test_chat_explanations_and_chat_mode_simulation(llama_server):
    be = OpenAIBackend("smollm2", base_url=llama_server, simulation="chat")
    msgs = explanation_messages([ShownExcerpt(("The", " river", " ran"), (0, 9, 1))], WORKED_EXAMPLES[:1])
    replies = be.chat(msgs, n=2, temperature=0.7, max_tokens=24, seed=5)
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    assert be.usage.completion_tokens > 0
    try:
        dists = be.simulate(request("rivers", EXCERPTS[:1]))
    except SimulationFailed as e:  # a weak model may not follow the format: then it is a failure with a reason
        assert "value lines" in str(e) or "aligned" in str(e)
    else:  # llama.cpp returns top_logprobs for chat replies: rows are distributions, not one-hot
        assert dists[0].shape == (5, 11)
        np.testing.assert_allclose(dists[0].sum(1), 1.0, atol=1e-9)
        assert be.chat_logprobs


def test_chat_only_server_without_logprobs(chat_only_server, tmp_path):
    url, folder = chat_only_server
    cache = RequestCache(tmp_path / "cache.sqlite")
    be = OpenAIBackend(folder, base_url=url, cache=cache)
    assert be.detect_mode() == "chat"  # /v1/completions is missing: detected, not configured
    msgs = explanation_messages([ShownExcerpt(("The", " river", " ran"), (0, 9, 1))], WORKED_EXAMPLES[:1])
    (reply,) = be.chat(msgs, n=1, temperature=0.0, max_tokens=16)
    assert isinstance(reply, str) and reply.strip()  # the event stream was reassembled into text
    try:
        dists = be.simulate(request("rivers", EXCERPTS[:1]))
    except SimulationFailed as e:  # recorded with its reason, never turned into zeros
        assert "value lines" in str(e) or "aligned" in str(e)
    else:  # no log-probabilities: each value is one-hot
        assert dists[0].shape == (5, 11) and set(np.unique(dists[0])) <= {0.0, 1.0}
        assert (dists[0].sum(1) == 1).all()
    sent = be.usage.requests
    assert sent >= 2
    again = OpenAIBackend(folder, base_url=url, cache=cache, simulation="chat")
    again.chat(msgs, n=1, temperature=0.0, max_tokens=16)
    assert again.usage.requests == 0 and again.usage.cache_hits == 1


def test_chat_value_distribution_from_top_logprobs():
    """Hand-built reply log-probabilities: the value's distribution and the exact split of "10" as "1", "0"."""
    content = "The\t1\nriver\t7\n"

    def tok(text, alts):
        return {
            "token": text,
            "logprob": alts.get(text, -1.0),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alts.items()],
        }

    reply = [
        tok("The", {"The": 1.0}),
        tok("\t", {"\t": 1.0}),
        tok("1", {"1": 0.5, "3": 0.3, "x": 0.2}),
        tok("\n", {"\n": 0.6, "0": 0.4}),  # P("0" | "1") = 0.4
        tok("river", {"river": 1.0}),
        tok("\t7", {"\t7": 0.7, "\t8": 0.2, "\tseven": 0.1}),  # tab and digit in one token
        tok("\n", {"\n": 1.0}),
    ]
    values, starts = parse_value_lines(content, ["The", "river"], with_offsets=True)
    assert values.tolist() == [1, 7] and [content[s] for s in starts] == ["1", "7"]
    first = label_distribution(reply, content, starts[0])
    want = np.zeros(11)
    want[1], want[10], want[3] = 0.5 * 0.6, 0.5 * 0.4, 0.3
    np.testing.assert_allclose(first, want / want.sum())
    second = label_distribution(reply, content, starts[1])
    want = np.zeros(11)
    want[7], want[8] = 0.7, 0.2
    np.testing.assert_allclose(second, want / want.sum())
    assert label_distribution(reply[:-1], content, starts[1]) is None  # tokens do not spell the reply
    assert label_distribution([], content, starts[0]) is None


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


class _ScriptedJudge:
    """An HTTP chat server whose answers to numbered judging items are known: item texts holding "river" get
    P("1") = 0.9, others 0.25; items holding "skip" get no line; lines come back in reverse order."""

    def __init__(self) -> None:
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer, self.requests = self, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(request)
                texts = re.findall(r"^Text (\d+): (.*)$", request["messages"][-1]["content"], re.MULTILINE)
                tokens = []
                for k, text in reversed(texts):
                    if "skip" in text:
                        continue
                    p = 0.9 if "river" in text else 0.25
                    alts = [{"token": "1", "logprob": math.log(p)}, {"token": "0", "logprob": math.log(1 - p)}]
                    digit = "1" if p > 0.5 else "0"
                    tokens += [{"token": f"{k}: ", "logprob": 0.0, "top_logprobs": []}]
                    tokens += [{"token": digit, "logprob": 0.0, "top_logprobs": alts}]
                    tokens += [{"token": "\n", "logprob": 0.0, "top_logprobs": []}]
                content = "".join(t["token"] for t in tokens)
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": {"content": tokens}}
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                   "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_several_judging_items_per_chat_request_map_back_to_their_items():
    from nbutils.llm.prompts import JudgeItem

    server = _ScriptedJudge()
    words = [" river", " tax", " river", " form", " skip", " river", " day"]
    items = tuple(JudgeItem(("The", w, " ran")) for w in words)
    be = OpenAIBackend("m", base_url=server.url, simulation="chat")
    judged = be.judge(JudgeRequest("detection", "rivers", items, examples=(), per_request=3))
    assert len(server.requests) == 3 == be.usage.requests  # 7 items, 3 per request
    assert sorted(len(r["messages"][-1]["content"].split("\nText ")) - 1 for r in server.requests) == [1, 3, 3]
    want = [0.9 if "river" in w else math.nan if "skip" in w else 0.25 for w in words]
    np.testing.assert_allclose(judged.p_yes, want, atol=1e-12)
    assert judged.probabilities
    # positives and negatives share requests: the items are mixed, not sent in their given order
    shown = [re.findall(r"^Text \d+: The (\w+)", r["messages"][-1]["content"], re.M) for r in server.requests]
    assert any(len(set(s)) > 1 for s in shown)
    server.server.shutdown()


def test_several_judging_items_per_request_against_llama_cpp(llama_server):
    """The embedded 135M model may not write every answer line; those it writes are read from its log-probs."""
    from nbutils.llm.prompts import JudgeItem

    items = tuple(JudgeItem(tuple(t)) for t in EXCERPTS * 2)
    be = OpenAIBackend("smollm2", base_url=llama_server, simulation="chat")
    judged = be.judge(JudgeRequest("detection", "words about water", items, examples=(), per_request=4))
    assert be.usage.requests == 1 and judged.p_yes.shape == (4,)
    answered = judged.p_yes[np.isfinite(judged.p_yes)]
    assert ((answered >= 0) & (answered <= 1)).all()
