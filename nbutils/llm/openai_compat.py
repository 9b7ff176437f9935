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
- How requests travel (the cap on requests in flight, rate limits, retries, the request cache, TLS, the
  API key from the environment) is `nbutils.llm.transport.HTTPTransport`'s; reading replies (label
  distributions, value lines, P(yes)) is `nbutils.llm.replies`'. This module says what each task asks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
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
from nbutils.llm.replies import label_distribution, parse_value_lines, yes_probability
from nbutils.llm.traffic import Traffic
from nbutils.llm.transport import HTTPTransport

LOGPROBS = 20


class OpenAIBackend(HTTPTransport, Backend):
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
        """``simulation``: "auto", "echo" or "chat" (see the module docstring); the rest: `HTTPTransport`."""
        HTTPTransport.__init__(self, model, base_url, api_key_env, timeout, max_retries, cache, backoff, traffic)
        if simulation not in ("auto", "echo", "chat"):
            raise UserError(f"simulation={simulation!r} is not auto, echo or chat.", "Use one of those three.")
        self.mode = simulation
        self._mode_lock = threading.Lock()
        self.context = context
        self.chat_logprobs = True  # ask for top_logprobs in chat simulation until the server refuses them

    @property
    def parallel_units(self) -> int:
        """Units a stage should have in progress at once: enough that the cap on requests can be filled."""
        return self.traffic.max_in_flight

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
                return yes_probability({k: math.exp(v) for k, v in top.items()}), True
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
                p = yes_probability(alts)
                if not math.isnan(p):
                    return p, True
                written = ((choice.get("message") or {}).get("content") or "").strip()[:1]
                return yes_probability({written: 1.0}), False  # no log-probabilities: the written digit

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
