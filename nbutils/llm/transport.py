"""The HTTP side of the OpenAI-compatible backend (`nbutils.llm.openai_compat`): how requests travel, not what
they ask.

Requests run on one shared event loop (`nbutils.llm.traffic.Traffic`): at most ``max_in_flight`` at once
across every unit a stage has in progress, within ``requests_per_minute`` / ``tokens_per_minute``, as plain
POSTs of the OpenAI client spread over one HTTP client per `CONNECTIONS_PER_CLIENT` connections (what the
client's CPU allows at hundreds of requests a second: `bench/throughput.py`). They retry with exponential
backoff on 429, 5xx, timeouts and refused connections; a 429's ``Retry-After`` pauses all of them. Each has
a timeout and goes through the persistent request cache (hits and misses are counted in ``usage``). TLS
verification uses the system's certificate store as well as certifi's. Some servers (``transformers
serve``) answer with an event stream even when asked not to stream; such replies are reassembled into one
completion. The API key is read from the environment variable named by ``api_key_env``, never stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.llm.cache import RequestCache
from nbutils.llm.contract import LLMFailed, SimulationFailed, Usage
from nbutils.llm.traffic import Traffic

CONNECTIONS_PER_CLIENT = 16
"""Connections per HTTP client; a backend with a larger ``max_in_flight`` spreads its requests over several."""


class HTTPTransport:
    """Requests to one OpenAI-compatible server, through the cache, within the traffic's cap and limits, with
    retries (see the module docstring). A backend speaks through it (`nbutils.llm.openai_compat.OpenAIBackend`)."""

    name = "openai"
    """Part of every request's cache key."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 5,
        cache: RequestCache | None = None,
        backoff: float = 1.0,
        traffic: Traffic | None = None,
    ) -> None:
        """``backoff``: seconds before the first retry, doubling after each (Retry-After wins when longer);
        ``traffic``: the cap on requests in flight and the rate limits (default: 64 in flight, no limits)."""
        import openai

        if not os.environ.get(api_key_env) and base_url is None:
            raise UserError(
                f"The OpenAI API needs a key, and the environment variable {api_key_env} is not set.",
                f"export {api_key_env}=... before starting (keys are read from the environment only), or set "
                "base_url to a local server that needs no key.",
            )
        self.model_name = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self._errors = openai
        self.traffic = traffic or Traffic()
        self._async_clients: list[Any] = []
        self._turn = 0
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.cache = cache
        self.usage = Usage()

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
        started = time.perf_counter()
        try:
            response = await self._send(client, endpoint, request, check)
        except LLMFailed:  # the last attempt, given up: sent too
            self.usage.add(Usage(failed_attempts=1))
            raise
        usage = response.get("usage") or {}
        self.usage.add(
            Usage(1, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0,
                  request_seconds=time.perf_counter() - started)
        )  # fmt: skip
        if self.cache is not None:
            self.cache.put(key, response)
        return response

    async def _send(
        self, client, endpoint: str, request: dict[str, Any], check: Callable[[dict[str, Any]], None] | None
    ) -> dict[str, Any]:
        """Send one request within the traffic's cap and limits, retrying server faults."""
        import httpx

        path = {"chat": "/chat/completions", "embeddings": "/embeddings"}.get(endpoint, "/completions")
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
                wanted = "data" if endpoint == "embeddings" else "choices"
                if not isinstance(response.get(wanted), list) or not response[wanted]:
                    raise SimulationFailed(f"the reply has no {wanted}")
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
            self.usage.add(Usage(failed_attempts=1))  # sent and failed, sent again: a budget counts it
            await asyncio.sleep(wait)
            delay *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")


def embed(transport: HTTPTransport, texts: Sequence[str], batch: int = 32) -> np.ndarray:
    """Each text's embedding from the server's ``/embeddings`` endpoint (OpenAI's format), ``[texts, dim]``
    float32, through the transport's cache, cap and retries (`embeddings_of` reads each reply). A server that
    answers with one vector per token (llama-cpp-python without pooling) gets one text per request: for a
    batch of several it returned wrong vectors after the first (0.3.x: cosine near 0 with the same text sent
    alone)."""

    async def one(client: Any, chunk: list[str]) -> list[np.ndarray]:
        reply = await transport._request(client, "embeddings", {"input": chunk}, lambda r: embeddings_of(r, len(chunk)))
        if len(chunk) > 1 and per_token(reply):
            return [v for text in chunk for v in await one(client, [text])]
        return embeddings_of(reply, len(chunk))

    chunks = [list(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    vectors = [v for part in transport._gather(one, chunks) for v in part]
    dims = {len(v) for v in vectors}
    if len(dims) > 1:
        raise LLMFailed(f"the embeddings server at {transport.base_url} returned vectors of sizes {sorted(dims)}")
    return np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)


def per_token(reply: dict[str, Any]) -> bool:
    """Whether an ``/embeddings`` reply holds one vector per token instead of one per text."""
    first = (reply.get("data") or [{}])[0].get("embedding")
    return isinstance(first, list) and bool(first) and isinstance(first[0], list)


def embeddings_of(reply: dict[str, Any], n: int) -> list[np.ndarray]:
    """The vectors of an ``/embeddings`` reply, in input order (its ``index``). One vector per token (a server
    without pooling) is mean-pooled here; a reply with a vector missing or empty raises `SimulationFailed`
    (the server's fault: retried, never cached)."""
    data = sorted(reply.get("data") or [], key=lambda d: d.get("index", 0))
    if len(data) != n:
        raise SimulationFailed(f"the reply has {len(data)} embeddings for {n} texts")
    out = []
    for d in data:
        v = np.asarray(d.get("embedding"), dtype=np.float64)
        if v.ndim == 2 and len(v):
            v = v.mean(axis=0)
        if v.ndim != 1 or not len(v) or not np.isfinite(v).all():
            raise SimulationFailed("an embedding in the reply is empty or not a vector of numbers")
        out.append(v)
    return out


def _total_tokens(response: dict[str, Any]) -> int:
    """Tokens a reply says it used (0 where the server does not say)."""
    usage = response.get("usage") or {}
    return (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)


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
