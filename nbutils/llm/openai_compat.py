"""An LLM behind an OpenAI-compatible HTTP API (OpenAI, vLLM, llama.cpp's server, ``transformers serve``, ...).

- Explanations: chat completions, one request per sample (many servers ignore ``n``), seeds ``seed + i``.
- Simulation, ``echo`` mode: the legacy completions endpoint with ``echo: true`` and ``logprobs: K`` returns
  the log-probabilities of the prompt's own tokens, so one request per excerpt gives, at each value slot,
  the top-K next-token log-probabilities; the labels 0..10 among them are renormalised. A label that the
  server's tokenizer splits into two tokens (SmolLM2 writes "10" as "1", "0") cannot be completed from
  one position; its probability stays with its first token (the local backend computes it exactly).
- Simulation, ``chat`` mode, for servers without prompt log-probabilities: the model rewrites the excerpt
  with a number per token; replies are parsed tolerantly and aligned to the tokens, and a reply that cannot
  be aligned is a failure with its reason, never a row of zeros. Where the server returns ``top_logprobs``
  for the reply, each value's distribution comes from them (expected values); otherwise it is one-hot.
- Detection and fuzzing (``judge``): one request per item; echo mode reads P("1") against P("0") at the
  answer slot, chat mode the first reply token's ``top_logprobs`` (or the written digit, without AUROC).
  In chat mode ``per_request`` > 1 shows that many numbered items in one request (mixed in a fixed order)
  and reads each answer line's digit the same way: fewer requests per unit, answers no longer independent.
- Requests run on one shared event loop (`nbutils.llm.traffic.Traffic`): at most ``max_in_flight`` at once
  across every unit the stage has in progress, within ``requests_per_minute`` / ``tokens_per_minute``, as
  plain POSTs of the OpenAI client spread over one HTTP client per 16 connections (what the client's CPU
  allows at hundreds of requests a second: `bench/throughput.py`). They
  retry with exponential backoff on 429, 5xx, timeouts and refused connections; a 429's ``Retry-After``
  pauses all of them. Each has a timeout and goes through the persistent request cache (hits and misses are
  counted in ``usage``).
- Some servers (``transformers serve``) answer chat requests with an event stream even when asked not to
  stream; such replies are reassembled into one completion.

The API key is read from the environment variable named by ``api_key_env`` and is never stored on disk.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.llm.cache import RequestCache
from nbutils.llm.contract import (
    Backend,
    BackendSpec,
    ExplainRequest,
    Judgements,
    JudgeRequest,
    LLMFailed,
    SimulationFailed,
    SimulationRequest,
    Usage,
)
from nbutils.llm.prompts import (
    JUDGE_HEADERS,
    LABELS,
    SIMULATE_HEADER,
    UNKNOWN,
    JudgeItem,
    judge_batch_answers,
    judge_batch_message,
    judge_body,
    judge_piece,
    show_token,
    simulation_body,
    simulation_lines,
    speak_of,
)
from nbutils.llm.traffic import Traffic

LOGPROBS = 20
CONNECTIONS_PER_CLIENT = 16
"""Connections per HTTP client; a backend with a larger ``max_in_flight`` spreads its requests over several."""


class OpenAIBackend(Backend):
    """A model behind an OpenAI-compatible server."""

    name = "openai"

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> OpenAIBackend:
        """The persistent request cache is used unless ``spec.cache_path`` is ``"none"``."""
        cache = None if spec.cache_path == "none" else RequestCache(spec.cache_path)
        traffic = Traffic(spec.max_in_flight, spec.requests_per_minute, spec.tokens_per_minute)
        return cls(
            spec.model, spec.base_url, spec.api_key_env, spec.simulation_mode, cache=cache, traffic=traffic,
            **spec.options,
        )  # fmt: skip

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        simulation: str = "auto",
        timeout: float = 60.0,
        max_retries: int = 5,
        context: int = 8192,
        cache: RequestCache | None = None,
        backoff: float = 1.0,
        traffic: Traffic | None = None,
    ) -> None:
        """``backoff``: seconds before the first retry, doubling after each (Retry-After wins when longer);
        ``traffic``: the cap on requests in flight and the rate limits (default: 64 in flight, no limits)."""
        import openai

        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise UserError(
                    f"The OpenAI API needs a key, and the environment variable {api_key_env} is not set.",
                    f"export {api_key_env}=... before starting (keys are read from the environment only), or set "
                    "base_url to a local server that needs no key.",
                )
        if simulation not in ("auto", "echo", "chat"):
            raise UserError(f"simulation={simulation!r} is not auto, echo or chat.", "Use one of those three.")
        self.model_name = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self._errors = openai
        self.mode = simulation
        self.traffic = traffic or Traffic()
        self._mode_lock = threading.Lock()
        self._async_clients: list[Any] = []
        self._turn = 0
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.context = context
        self.cache = cache
        self.usage = Usage()
        self.chat_logprobs = True  # ask for top_logprobs in chat simulation until the server refuses them

    # -- requests: concurrency, retries and the cache -----------------------------------------------------

    @property
    def parallel_units(self) -> int:
        """Units a stage should have in progress at once: enough that the cap on requests can be filled."""
        return self.traffic.max_in_flight

    def _client(self):
        """An HTTP client, made on the traffic's loop (connections are reused there). Several, each with a
        share of the connections, taken in turn: the connection pool's work per request grows with the
        connections it holds (it polls each idle one), which at 256 in flight took a third of the client's CPU."""
        if not self._async_clients:
            import httpx

            key = os.environ.get(self.api_key_env) or "no-key-needed"  # local servers accept any key
            n, tls = self.traffic.max_in_flight, _tls_context()
            for _ in range(-(-n // CONNECTIONS_PER_CLIENT)):
                # each may open up to n: a share busier than the rest waits for no connection
                http = self._errors.DefaultAsyncHttpxClient(
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=CONNECTIONS_PER_CLIENT),
                    verify=tls,
                )
                self._async_clients.append(
                    self._errors.AsyncOpenAI(
                        base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=0, http_client=http
                    )
                )
        self._turn = (self._turn + 1) % len(self._async_clients)
        return self._async_clients[self._turn]

    def _gather(self, fn: Callable[[Any, Any], Awaitable[Any]], items: Sequence[Any]) -> list[Any]:
        """``fn(client, item)`` for every item, on the shared loop within its cap and limits; every request is
        allowed to finish (and be cached) before an error, if any, is raised: a retryable one (a server
        fault) if there is one, else the first."""

        async def main() -> list[Any]:
            client = self._client()
            return await asyncio.gather(*(fn(client, x) for x in items), return_exceptions=True)

        results = self.traffic.run(main)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:  # a server fault first: the neuron is then retried on rerun, where the rest may succeed
            raise next((e for e in errors if getattr(e, "retryable", False)), errors[0])
        return results

    async def _request(
        self, client, endpoint: str, request: dict[str, Any], check: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """One request through the cache, with retries. ``check`` raises SimulationFailed for a reply that is
        malformed by the server's fault (retried, never cached)."""
        key = RequestCache.key(f"{self.name}:{endpoint}:{self.base_url or 'api.openai.com'}", self.model_name, request)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.add(Usage(cache_hits=1))
                return hit
            self.usage.add(Usage(cache_misses=1))
        response = await self._send(client, endpoint, request, check)
        usage = response.get("usage") or {}
        self.usage.add(Usage(1, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0))
        if self.cache is not None:
            self.cache.put(key, response)
        return response

    async def _send(
        self, client, endpoint: str, request: dict[str, Any], check: Callable[[dict[str, Any]], None] | None
    ) -> dict[str, Any]:
        """Send one request within the traffic's cap and limits, retrying server faults."""
        import httpx

        path = "/chat/completions" if endpoint == "chat" else "/completions"
        body = {"model": self.model_name, **request}
        delay = self.backoff
        estimate = _prompt_chars(request) // 3 + request.get("max_tokens", 0)
        dropped = False  # a connection closed mid-request: the server stopped responding, it may have crashed
        for attempt in range(self.max_retries + 1):
            try:
                async with self.traffic.slot(estimate) as used:
                    # the client's plain POST: the same auth, errors and timeouts as `create`, without its
                    # per-request walk over the parameters' types and its reply model (a third of the client's
                    # CPU per request, which limits how many units a second a stage can start)
                    raw = await client.post(path, cast_to=httpx.Response, body=body)
                    response = _reply_json(raw)
                    used(_total_tokens(response))
                if not isinstance(response.get("choices"), list) or not response["choices"]:
                    raise SimulationFailed("the reply has no choices")
                if check is not None:
                    check(response)
                return response
            except self._errors.APIStatusError as e:
                status = e.status_code
                if status in (401, 403):
                    raise UserError(
                        f"The server at {self.base_url or 'api.openai.com'} refused the key ({status}).",
                        f"Check the key in the environment variable {self.api_key_env}.",
                    ) from None
                if (status != 429 and status < 500) or attempt == self.max_retries:
                    raise LLMFailed(_describe(e, endpoint, attempt, self.base_url), status) from None
                wait = _retry_wait(e, delay)
                if status == 429:  # the server is over its limit for everyone: every request waits
                    self.traffic.pause(wait)
            except (self._errors.APITimeoutError, self._errors.APIConnectionError) as e:
                dropped = dropped or _connection_fault(e) == "dropped"
                if attempt == self.max_retries:
                    raise LLMFailed(_describe(e, endpoint, attempt, self.base_url, dropped)) from None
                wait = _retry_wait(e, delay)
            except (
                SimulationFailed,
                self._errors.APIResponseValidationError,
                ValueError,
                LookupError,
                TypeError,
                AttributeError,
            ) as e:
                # truncated or malformed JSON, or a reply missing what was asked for: the server's fault; retry
                if attempt == self.max_retries:
                    raise LLMFailed(_describe(e, endpoint, attempt, self.base_url)) from None
                wait = delay
            await asyncio.sleep(wait)
            delay *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- explanations -------------------------------------------------------------------------------------

    def explain(self, request: ExplainRequest) -> list[str]:
        return self.chat(self.explanation_messages(request), request.n, request.temperature, seed=request.seed)

    def chat(
        self, messages: list[dict[str, str]], n: int = 1, temperature: float = 1.0, max_tokens: int = 60, seed: int = 0
    ) -> list[str]:
        async def one(client, i: int) -> str:
            req = {"messages": messages, "temperature": temperature, "max_tokens": max_tokens, "seed": seed + i}
            choice = (await self._request(client, "chat", req))["choices"][0]
            return (choice.get("message") or {}).get("content") or ""

        return self._gather(one, list(range(n)))

    # -- simulation -----------------------------------------------------------------------------------

    def detect_mode(self) -> str:
        """``echo`` if the server returns prompt log-probabilities, else ``chat``."""
        with self._mode_lock:  # units on several threads ask at once: probe once
            if self.mode == "auto":
                self.mode = self._probe_mode()
        return self.mode

    def _probe_mode(self) -> str:
        async def probe(client, _: Any) -> str:
            req = {"prompt": "a\tb", "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
            try:
                r = await self._request(client, "completions", req)
                lp = (r["choices"][0].get("logprobs") or {}).get("top_logprobs") or []
                return "echo" if len(lp) >= 2 and any(lp[1:]) else "chat"
            except (LLMFailed, KeyError, IndexError, AttributeError):
                return "chat"

        return self._gather(probe, [None])[0]

    def simulate(self, request: SimulationRequest) -> list[np.ndarray]:
        """Per excerpt, a [tokens, 11] array of label probabilities; raises SimulationFailed with the reason."""
        header = speak_of(SIMULATE_HEADER, request.noun)
        body = simulation_body(request.explanation, self.simulation_examples(request), request.noun)
        one = self._simulate_echo if self.detect_mode() == "echo" else self._simulate_chat
        return self._gather(lambda client, toks: one(client, header, body, toks), list(request.excerpts))

    async def _echo_slots(self, client, text: str, slots: list[int]) -> list[dict[str, float]]:
        """The top next-token log-probabilities at character offsets ``slots`` of ``text`` (one echo request)."""
        req = {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": LOGPROBS, "temperature": 0}

        def check(reply: dict[str, Any]) -> None:
            lp = reply["choices"][0].get("logprobs") or {}
            offsets, tops = lp.get("text_offset") or [], lp.get("top_logprobs") or []
            if not offsets or len(tops) != len(offsets) or offsets[-1] < slots[-1]:
                raise SimulationFailed(
                    "the server returned missing or short prompt log-probabilities (is echo with logprobs supported?)"
                )

        lp = (await self._request(client, "completions", req, check))["choices"][0]["logprobs"]
        where = {off: i for i, off in enumerate(lp["text_offset"])}
        out = []
        for j, slot in enumerate(slots):
            i = where.get(slot)
            if i is None or not lp["top_logprobs"][i]:
                raise SimulationFailed(
                    f"no log-probabilities at slot {j} of the prompt (the server merged it with a neighbouring token)"
                )
            out.append(lp["top_logprobs"][i])
        return out

    async def _simulate_echo(self, client, header: str, body: str, tokens: Sequence[str]) -> np.ndarray:
        text, slots = header + body, []
        for before, after in simulation_lines(tokens):
            text += before
            slots.append(len(text))
            text += after
        rows = []
        for j, top in enumerate(await self._echo_slots(client, text + "<end>\n", slots)):
            probs = np.array([math.exp(top[label]) if label in top else 0.0 for label in LABELS])
            if probs.sum() <= 0:
                raise SimulationFailed(
                    f"none of the labels 0..10 is among the top {LOGPROBS} log-probabilities at token {j}"
                )
            rows.append(probs / probs.sum())
        return np.stack(rows)

    async def _simulate_chat(self, client, header: str, body: str, tokens: Sequence[str]) -> np.ndarray:
        lines = "".join(f"{show_token(t)}\t{UNKNOWN}\n" for t in tokens)
        messages = [
            {"role": "system", "content": header.strip()},
            {
                "role": "user",
                "content": body
                + lines
                + "<end>\n\nRewrite the last excerpt with a number from 0 to 10 in place of every "
                + f"{UNKNOWN}, one line per token, nothing else.",
            },
        ]
        req: dict[str, Any] = {"messages": messages, "temperature": 0, "max_tokens": 8 * len(tokens) + 16}
        choice = (await self._chat(client, req))["choices"][0]
        content = (choice.get("message") or {}).get("content") or ""
        values, starts = parse_value_lines(content, [show_token(t) for t in tokens], with_offsets=True)
        dist = np.zeros((len(tokens), len(LABELS)))
        dist[np.arange(len(tokens)), values] = 1.0
        reply_tokens = ((choice.get("logprobs") or {}).get("content")) or []
        for j, start in enumerate(starts):
            row = label_distribution(reply_tokens, content, start)
            if row is not None:
                dist[j] = row
        return dist

    async def _chat(self, client, req: dict[str, Any]) -> dict[str, Any]:
        """A chat request asking for ``top_logprobs`` too, until the server refuses them (400)."""
        if self.chat_logprobs:
            try:
                return await self._request(client, "chat", {**req, "logprobs": True, "top_logprobs": LOGPROBS})
            except LLMFailed as e:
                if e.status != 400:
                    raise
                self.chat_logprobs = False  # the server does not take log-prob options: ask without
        return await self._request(client, "chat", req)

    # -- detection and fuzzing ----------------------------------------------------------------------------

    def judge(self, request: JudgeRequest) -> Judgements:
        """P(answer "1") per item, NaN where the reply held no answer. Echo mode reads the answer slot's
        log-probabilities; chat mode reads the reply's first token (its ``top_logprobs`` when given, else
        the written digit, and then the answers are not probabilities)."""
        if not request.items:
            return Judgements(np.zeros(0))
        header = speak_of(JUDGE_HEADERS[request.task], request.noun)
        body = judge_body(request.task, request.explanation, self.judge_examples(request), request.noun)
        if self.detect_mode() == "echo":

            async def one(client, item: JudgeItem) -> tuple[float, bool]:
                text = header + body + judge_piece(item)
                top = (await self._echo_slots(client, text + "0\n", [len(text)]))[0]
                return _yes_probability({k: math.exp(v) for k, v in top.items()}), True
        else:

            async def one(client, item: JudgeItem) -> tuple[float, bool]:
                messages = [
                    {"role": "system", "content": header.strip()},
                    {"role": "user", "content": body + judge_piece(item) + "\n\nReply with the digit only."},
                ]
                reply = await self._chat(client, {"messages": messages, "temperature": 0, "max_tokens": 3})
                choice = reply["choices"][0]
                first = (((choice.get("logprobs") or {}).get("content")) or [{}])[0]
                alts = {
                    a.get("token", ""): math.exp(a.get("logprob", -math.inf)) for a in first.get("top_logprobs") or []
                }
                p = _yes_probability(alts)
                if not math.isnan(p):
                    return p, True
                written = ((choice.get("message") or {}).get("content") or "").strip()[:1]
                return _yes_probability({written: 1.0}), False  # no log-probabilities: the written digit

            if request.per_request > 1:
                return self._judge_in_batches(header, body, request)
        answers = self._gather(one, list(request.items))
        probabilities = all(from_logprobs for _, from_logprobs in answers)
        return Judgements(np.array([p for p, _ in answers], dtype=np.float64), probabilities)

    def _judge_in_batches(self, header: str, body: str, request: JudgeRequest) -> Judgements:
        """Chat-mode judging with ``request.per_request`` numbered items per request. Items are shown in a fixed
        shuffled order, so positives and negatives share requests; an item the reply skips stays NaN."""
        items = list(request.items)
        order = np.random.default_rng(len(items)).permutation(len(items))
        chunks = [order[i : i + request.per_request] for i in range(0, len(items), request.per_request)]

        async def one(client, chunk: np.ndarray) -> list[tuple[float, bool]]:
            shown = [items[j] for j in chunk]
            messages = [
                {"role": "system", "content": header.strip()},
                {"role": "user", "content": judge_batch_message(body, shown)},
            ]
            reply = await self._chat(client, {"messages": messages, "temperature": 0, "max_tokens": 6 * len(shown) + 8})
            choice = reply["choices"][0]
            content = (choice.get("message") or {}).get("content") or ""
            reply_tokens = (choice.get("logprobs") or {}).get("content") or []
            places = judge_batch_answers(content, len(shown))
            out = []
            for i in range(len(shown)):
                if i not in places:
                    out.append((math.nan, True))
                    continue
                dist = label_distribution(reply_tokens, content, places[i])
                if dist is not None and dist[0] + dist[1] > 0:
                    out.append((float(dist[1] / (dist[0] + dist[1])), True))
                else:  # no log-probabilities: the written digit
                    out.append((float(content[places[i]]), False))
            return out

        p_yes, probabilities = np.full(len(items), np.nan), True
        for chunk, answers in zip(chunks, self._gather(one, chunks)):
            for j, (p, from_logprobs) in zip(chunk, answers):
                p_yes[j] = p
                probabilities &= from_logprobs
        return Judgements(p_yes, probabilities)


def _total_tokens(response: dict[str, Any]) -> int:
    """Tokens a reply says it used (0 where the server does not say)."""
    usage = response.get("usage") or {}
    return (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)


def _yes_probability(probs: dict[str, float]) -> float:
    """P("1") / (P("1") + P("0")) from token probabilities (tokens compared without spaces); NaN if neither."""
    yes = sum(p for tok, p in probs.items() if tok.strip() == "1")
    no = sum(p for tok, p in probs.items() if tok.strip() == "0")
    return yes / (yes + no) if yes + no > 0 else math.nan


def _describe(error: Exception, endpoint: str, attempt: int, base_url: str | None, dropped: bool = False) -> str:
    tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
    where = base_url or "https://api.openai.com/v1"
    fault = _connection_fault(error)
    if dropped:  # seen on any try: later tries of a crashed server are refused, which would hide the crash
        return (
            f"the server at {where} stopped responding (it may have crashed; see its log): it closed the connection "
            f"during a {endpoint} request; {tries}, the last: {_cause_text(error)}"
        )
    if fault == "refused":
        return (
            f"nothing answers at {where} (the server is not running, or it crashed; see its log): {endpoint} request "
            f"refused on {tries}: {_cause_text(error)}"
        )
    return f"{endpoint} request to {where} failed after {tries}: {type(error).__name__}: {str(error)[:200]}"


_DROPPED = {"RemoteProtocolError", "ReadError", "WriteError", "ConnectionResetError", "BrokenPipeError"}
_REFUSED = {"ConnectError", "ConnectionRefusedError"}


def _connection_fault(error: BaseException) -> str | None:
    """``"dropped"`` when the server closed or reset the connection before its reply was complete (it stopped
    responding, e.g. crashed mid-request), ``"refused"`` when no server accepted the connection, else None.
    Matched by class name along the cause chain: the OpenAI client's transport is httpx or httpx2 by version."""
    seen: BaseException | None = error
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if names & _DROPPED:
            return "dropped"
        if names & _REFUSED:
            return "refused"
        seen = seen.__cause__ or seen.__context__
    return None


def _cause_text(error: BaseException) -> str:
    """The innermost cause's type and message (the OpenAI client's own text is only "Connection error.")."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error)[:160] or 'no message'}"


def _retry_wait(error: Exception, delay: float) -> float:
    """Seconds to wait before the next try: exponential backoff with jitter, or longer if Retry-After says so."""
    wait = delay * (1 + random.random() * 0.25)
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    try:
        wait = max(wait, float(headers.get("retry-after", 0)))
    except ValueError:
        pass
    return min(wait, 60.0)


def _tls_context() -> ssl.SSLContext:
    """The certificates HTTPX trusts by default (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` if set, else certifi's),
    loaded once for all of a backend's clients instead of once each (20 ms apiece)."""
    import certifi

    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return ssl.create_default_context(cafile=certifi.where())


def _prompt_chars(request: dict[str, Any]) -> int:
    """Characters of a request's prompt or chat messages (for the token estimate of the rate limiter)."""
    if "messages" in request:
        return sum(len(m.get("content") or "") for m in request["messages"])
    return len(request.get("prompt") or "")


def _reply_json(raw: Any) -> dict[str, Any]:
    """The reply of a POST as a dict: its JSON, or one completion rebuilt from an event stream."""
    if raw.headers.get("content-type", "").startswith("text/event-stream") or raw.text.lstrip().startswith("data:"):
        return _event_stream_to_completion(raw.text)
    reply = raw.json()
    if not isinstance(reply, dict):
        raise SimulationFailed(f"the reply is not a JSON object: {raw.text[:80]!r}")
    return reply


def _event_stream_to_completion(text: str) -> dict[str, Any]:
    """One chat completion from a server-sent event stream of chunks (servers that stream regardless)."""
    content, logprobs, usage, finish = [], [], None, None
    for line in text.splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        try:
            chunk = json.loads(line[5:])
        except json.JSONDecodeError:
            raise SimulationFailed(f"unreadable event from the server: {line[:80]!r}") from None
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            content.append((choice.get("delta") or {}).get("content") or "")
            logprobs += (choice.get("logprobs") or {}).get("content") or []
            finish = choice.get("finish_reason") or finish
    message = {"role": "assistant", "content": "".join(content)}
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": {"content": logprobs}}
    return {"choices": [choice], "usage": usage}


def label_distribution(reply_tokens: list[dict[str, Any]], content: str, start: int) -> np.ndarray | None:
    """Probabilities of the labels 0..10 for the value written at character ``start`` of a chat reply.

    Reads the ``top_logprobs`` of the reply token that holds that character: each alternative that matches
    the chosen token up to ``start`` and then spells a label counts for that label. "10" written as "1", "0"
    is split exactly with the next token's log-probabilities: P(10) = P("1") P("0" | "1").
    Returns None where the reply has no usable log-probabilities (the caller keeps the one-hot value).
    """
    if not reply_tokens or "".join(t.get("token", "") for t in reply_tokens) != content:
        return None
    ends = np.cumsum([len(t.get("token", "")) for t in reply_tokens])
    i = int(np.searchsorted(ends, start, side="right"))  # the token whose span holds character `start`
    if i >= len(reply_tokens):
        return None
    tok, text = reply_tokens[i], reply_tokens[i].get("token", "")
    pos = int(ends[i]) - len(text)
    lead = text[: start - pos]  # e.g. the tab before the number, when the token holds both
    probs = np.zeros(len(LABELS))
    for alt in tok.get("top_logprobs") or []:
        alt_text = alt.get("token", "")
        rest = alt_text[len(lead) :].strip() if alt_text.startswith(lead) else None
        if rest in LABELS:
            probs[LABELS.index(rest)] += math.exp(alt.get("logprob", -math.inf))
    chosen = text[len(lead) :].strip()
    if chosen == "1" and i + 1 < len(reply_tokens) and probs[1] > 0:
        nxt = {a.get("token", ""): a.get("logprob", -math.inf) for a in reply_tokens[i + 1].get("top_logprobs") or []}
        p_zero = math.exp(nxt["0"]) if "0" in nxt else 0.0
        probs[10] += probs[1] * p_zero
        probs[1] *= 1 - p_zero
    if probs.sum() <= 0:
        return None
    return probs / probs.sum()


_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*$")


def parse_value_lines(reply: str, tokens: Sequence[str], with_offsets: bool = False) -> Any:
    """Integer values 0..10 per token from a reply of ``token<TAB>value`` lines, aligned to the tokens.

    Tolerates code fences, ``<start>``/``<end>`` markers, blank lines and spaces instead of tabs; values are
    rounded and clipped to 0..10. Raises SimulationFailed when the lines cannot be matched to the tokens.
    With ``with_offsets``, also returns where in the reply each value starts (to find its log-probabilities).
    """
    rows, pos = [], 0
    for line in reply.split("\n"):
        begin, pos = pos, pos + len(line) + 1
        line = line.rstrip("\r")
        if not line.strip() or line.strip() in ("<start>", "<end>") or line.strip().startswith("```"):
            continue
        m = _NUMBER.search(line)
        if m is None:
            continue
        rows.append((line[: m.start()].rstrip("\t "), float(m.group(1)), begin + m.start(1)))
    if len(rows) != len(tokens):
        # try to align by token text: keep the rows whose text matches the next expected token
        aligned, k = [], 0
        for row in rows:
            if k < len(tokens) and row[0].strip() == tokens[k].strip():
                aligned.append(row)
                k += 1
        if k != len(tokens):
            raise SimulationFailed(
                f"the reply has {len(rows)} value lines for {len(tokens)} tokens and could not be aligned"
            )
        rows = aligned
    values = np.clip(np.rint([v for _, v, _ in rows]), 0, len(LABELS) - 1).astype(np.int64)
    return (values, [start for _, _, start in rows]) if with_offsets else values
