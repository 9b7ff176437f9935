"""An LLM behind an OpenAI-compatible HTTP API (OpenAI, vLLM, llama.cpp's server, ...), via the ``openai`` package.

- Explanations: chat completions, one request per sample (many servers ignore ``n``), seeds ``seed + i``.
- Simulation, ``echo`` mode: the legacy completions endpoint with ``echo: true`` and ``logprobs: K`` returns
  the log-probabilities of the prompt's own tokens, so one request per excerpt gives, at each value slot,
  the top-K next-token log-probabilities; the labels 0..10 among them are renormalised. A label that the
  server's tokenizer splits into two tokens (SmolLM2 writes "10" as "1", "0") cannot be completed from
  one position; its probability stays with its first token (the local backend computes it exactly).
- Simulation, ``chat`` mode, for servers without prompt log-probabilities: the model rewrites the excerpt
  with a number per token; replies are parsed tolerantly and aligned to the tokens, and a reply that cannot
  be aligned is a failure with its reason, never a row of zeros.
- Requests run concurrently (bounded), retry with exponential backoff on 429, 5xx, timeouts and refused
  connections (honouring ``Retry-After``), and go through the persistent request cache.

The API key is read from the environment variable named by ``api_key_env`` and is never stored.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from nbutils.backends import Usage
from nbutils.cache import RequestCache
from nbutils.errors import UserError
from nbutils.prompts import LABELS, SIMULATE_HEADER, UNKNOWN, show_token, simulation_lines

LOGPROBS = 20


class SimulationFailed(Exception):
    """A simulation that produced no usable numbers; the message says why."""


class OpenAIBackend:
    """A model behind an OpenAI-compatible server."""

    kind = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        simulation: str = "auto",
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        context: int = 8192,
        cache: RequestCache | None = None,
    ) -> None:
        import openai

        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise UserError(
                    f"The OpenAI API needs a key, and the environment variable {api_key_env} is not set.",
                    f"export {api_key_env}=... before starting (keys are read from the environment only), or set "
                    "base_url to a local server that needs no key.",
                )
            key = "no-key-needed"  # local servers accept any key
        if simulation not in ("auto", "echo", "chat"):
            raise UserError(f"simulation={simulation!r} is not auto, echo or chat.", "Use one of those three.")
        self.model_name = model
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self._errors = openai
        self.mode = simulation
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.context = context
        self.cache = cache
        self.usage = Usage()

    def count_tokens(self, text: str) -> int:
        return len(text) // 3 + 1  # a conservative estimate; servers do not expose their tokenizer

    # -- requests with retries and the cache ------------------------------------------------------------

    def _request(self, endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
        key = RequestCache.key(f"{self.kind}:{endpoint}:{self.base_url or 'api.openai.com'}", self.model_name, request)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        api = self.client.chat.completions if endpoint == "chat" else self.client.completions
        delay = 1.0
        for attempt in range(self.max_retries + 1):
            try:
                response = api.create(model=self.model_name, **request).model_dump()
                break
            except (self._errors.APITimeoutError, self._errors.APIConnectionError, self._errors.APIStatusError) as e:
                status = getattr(e, "status_code", None)
                retryable = status is None or status == 429 or status >= 500
                if not retryable or attempt == self.max_retries:
                    raise
                wait = delay * (1 + random.random() * 0.25)
                retry_after = getattr(getattr(e, "response", None), "headers", {}).get("retry-after")
                if retry_after:
                    try:
                        wait = max(wait, float(retry_after))
                    except ValueError:
                        pass
                time.sleep(min(wait, 60.0))
                delay *= 2
        usage = response.get("usage") or {}
        self.usage.add(Usage(1, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0))
        if self.cache is not None:
            self.cache.put(key, response)
        return response

    def _parallel(self, fn, items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(items)))) as pool:
            return list(pool.map(fn, items))

    # -- explanations -------------------------------------------------------------------------------------

    def chat(
        self, messages: list[dict[str, str]], n: int = 1, temperature: float = 1.0, max_tokens: int = 60, seed: int = 0
    ) -> list[str]:
        def one(i: int) -> str:
            req = {"messages": messages, "temperature": temperature, "max_tokens": max_tokens, "seed": seed + i}
            choice = self._request("chat", req)["choices"][0]
            return (choice.get("message") or {}).get("content") or ""

        return self._parallel(one, list(range(n)))

    # -- simulation -----------------------------------------------------------------------------------

    def detect_mode(self) -> str:
        """``echo`` if the server returns prompt log-probabilities, else ``chat``."""
        if self.mode == "auto":
            try:
                r = self._request(
                    "completions", {"prompt": "a\tb", "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
                )
                lp = (r["choices"][0].get("logprobs") or {}).get("top_logprobs") or []
                self.mode = "echo" if len(lp) >= 2 and any(lp[1:]) else "chat"
            except (self._errors.APIStatusError, self._errors.APIConnectionError, KeyError, IndexError):
                self.mode = "chat"
        return self.mode

    def simulate(self, prefix: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per excerpt, a [tokens, 11] array of label probabilities; raises SimulationFailed with the reason."""
        if self.detect_mode() == "echo":
            return self._parallel(lambda toks: self._simulate_echo(prefix, toks), list(excerpts))
        return self._parallel(lambda toks: self._simulate_chat(prefix, toks), list(excerpts))

    def _simulate_echo(self, prefix: str, tokens: Sequence[str]) -> np.ndarray:
        text, slots = prefix, []
        for before, after in simulation_lines(tokens):
            text += before
            slots.append(len(text))
            text += after
        text += "<end>\n"
        r = self._request(
            "completions", {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": LOGPROBS, "temperature": 0}
        )
        lp = r["choices"][0].get("logprobs") or {}
        offsets, tops = lp.get("text_offset") or [], lp.get("top_logprobs") or []
        if not offsets or len(tops) != len(offsets):
            raise SimulationFailed("the server returned no prompt log-probabilities (is echo with logprobs supported?)")
        where = {off: i for i, off in enumerate(offsets)}
        rows = []
        for j, slot in enumerate(slots):
            i = where.get(slot)
            if i is None or not tops[i]:
                raise SimulationFailed(
                    f"no log-probabilities at the value slot of token {j} (the server merged it with a neighbour)"
                )
            probs = np.array([math.exp(tops[i][label]) if label in tops[i] else 0.0 for label in LABELS])
            if probs.sum() <= 0:
                raise SimulationFailed(
                    f"none of the labels 0..10 is among the top {LOGPROBS} log-probabilities at token {j}"
                )
            rows.append(probs / probs.sum())
        return np.stack(rows)

    def _simulate_chat(self, prefix: str, tokens: Sequence[str]) -> np.ndarray:
        lines = "".join(f"{show_token(t)}\t{UNKNOWN}\n" for t in tokens)
        messages = [
            {"role": "system", "content": SIMULATE_HEADER.strip()},
            {
                "role": "user",
                "content": prefix[len(SIMULATE_HEADER) :]
                + lines
                + "<end>\n\nRewrite the last excerpt with a number from 0 to 10 in place of every "
                + f"{UNKNOWN}, one line per token, nothing else.",
            },
        ]
        reply = self._request("chat", {"messages": messages, "temperature": 0, "max_tokens": 8 * len(tokens) + 16})
        content = (reply["choices"][0].get("message") or {}).get("content") or ""
        values = parse_value_lines(content, [show_token(t) for t in tokens])
        dist = np.zeros((len(tokens), len(LABELS)))
        dist[np.arange(len(tokens)), values] = 1.0
        return dist


_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*$")


def parse_value_lines(reply: str, tokens: Sequence[str]) -> np.ndarray:
    """Integer values 0..10 per token from a reply of ``token<TAB>value`` lines, aligned to the tokens.

    Tolerates code fences, ``<start>``/``<end>`` markers, blank lines and spaces instead of tabs; values are
    rounded and clipped to 0..10. Raises SimulationFailed when the lines cannot be matched to the tokens.
    """
    rows = []
    for line in reply.replace("\r", "").split("\n"):
        if not line.strip() or line.strip() in ("<start>", "<end>") or line.strip().startswith("```"):
            continue
        m = _NUMBER.search(line)
        if m is None:
            continue
        rows.append((line[: m.start()].rstrip("\t "), float(m.group(1))))
    if len(rows) != len(tokens):
        # try to align by token text: keep the rows whose text matches the next expected token
        aligned, k = [], 0
        for text, value in rows:
            if k < len(tokens) and text.strip() == tokens[k].strip():
                aligned.append(value)
                k += 1
        if k != len(tokens):
            raise SimulationFailed(
                f"the reply has {len(rows)} value lines for {len(tokens)} tokens and could not be aligned"
            )
        values = aligned
    else:
        values = [v for _, v in rows]
    return np.clip(np.rint(values), 0, len(LABELS) - 1).astype(np.int64)
