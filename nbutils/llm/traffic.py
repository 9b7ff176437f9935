"""Request traffic of an HTTP backend: one event loop for all the units a stage has in progress, a cap on
requests in flight, rate limits, and a shared pause when the server says to slow down.

Stages run many units at once on threads (`nbutils.core.parallel`); each unit's requests are coroutines on
the one loop that `Traffic` keeps on a helper thread, so explanations, simulations and judgements of
different units overlap, and one cap (``max_in_flight``), one pair of rate limits (requests and tokens per
minute, as hosted APIs state them) and one pause (a 429's ``Retry-After``) hold for all of them.

The limits are token buckets refilled continuously at ``limit / 60`` per second that hold at most one
second's worth (so a run never bursts a minute's quota at once and trips a server's shorter windows); a
request larger than a bucket still goes when the bucket is full. Tokens are estimated before a request
(prompt characters / 3 + the reply's ``max_tokens``) and corrected by the ``usage`` the server reports.
Backends given the same `Traffic` share its cap and limits (one API key used for two roles, say).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from nbutils.core.errors import UserError


@dataclass
class Bucket:
    """A token bucket: ``per_minute`` units refilled continuously, at most one second's worth held."""

    per_minute: float
    level: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def capacity(self) -> float:
        return max(1.0, self.per_minute / 60.0)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (capped at the capacity) is available; 0 if it is now."""
        need = min(amount, self.capacity) - self.level
        return max(0.0, need * 60.0 / self.per_minute)


@dataclass
class TrafficStats:
    """Requests sent, the most in flight at once, the time-weighted mean in flight since the first request,
    and the Retry-After pauses taken (seconds). With ``record``, ``timeline`` keeps (seconds since the first
    request, in flight after the change) at every change, for benchmarks."""

    sent: int = 0
    max_in_flight: int = 0
    pauses: list[float] = field(default_factory=list)
    record: bool = False
    timeline: list[tuple[float, int]] = field(default_factory=list)
    _area: float = 0.0
    _last: float = 0.0

    def change(self, t: float, in_flight_before: int, in_flight_after: int) -> None:
        self._area += in_flight_before * (t - self._last)
        self._last = t
        if in_flight_after > in_flight_before:
            self.sent += 1
            self.max_in_flight = max(self.max_in_flight, in_flight_after)
        if self.record:
            self.timeline.append((t, in_flight_after))

    @property
    def mean_in_flight(self) -> float:
        """Mean requests in flight from the first request to the last change."""
        return self._area / self._last if self._last > 0 else 0.0

    def mean_between(self, start: float, end: float) -> float:
        """Mean in flight between two times of the recorded ``timeline`` (seconds since the first request)."""
        area, prev_t, prev_n = 0.0, start, 0
        for t, n in self.timeline:
            if t > start:
                area += prev_n * (min(t, end) - prev_t)
                prev_t = min(t, end)
            if t >= end:
                break
            prev_n = n
        area += prev_n * max(0.0, end - prev_t)
        return area / (end - start) if end > start else 0.0


class Traffic:
    """The loop, cap, limits and pause shared by all requests of one backend (see the module docstring)."""

    def __init__(
        self,
        max_in_flight: int = 64,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        record: bool = False,
    ) -> None:
        """``record``: keep every change of the in-flight count in ``stats.timeline`` (benchmarks)."""
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and value <= 0:
                raise UserError(f"{name}={value} must be positive.", f"Give a positive number, or {name}=None.")
        if max_in_flight < 1:
            raise UserError(f"max_in_flight={max_in_flight} must be at least 1.", "Give e.g. max_in_flight=64.")
        self.max_in_flight = max_in_flight
        self.requests = Bucket(requests_per_minute) if requests_per_minute else None
        self.tokens = Bucket(tokens_per_minute) if tokens_per_minute else None
        self.stats = TrafficStats(record=record)
        self.in_flight = 0
        self._paused_until = 0.0
        self._t0: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock = threading.Lock()
        self._gate: asyncio.Lock | None = None
        self._cap: asyncio.Semaphore | None = None

    # -- the loop -----------------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="nbutils-http", daemon=True).start()
                self._loop = loop
        return self._loop

    def run(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Run a coroutine on the shared loop and wait for its result (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(self._wrap(make), self._ensure_loop()).result()

    async def _wrap(self, make: Callable[[], Awaitable[Any]]) -> Any:
        if self._cap is None:  # made on the loop, so they belong to it
            self._cap, self._gate = asyncio.Semaphore(self.max_in_flight), asyncio.Lock()
        return await make()

    # -- one request --------------------------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, tokens: int = 0) -> AsyncIterator[Callable[[int], None]]:
        """Hold one of the ``max_in_flight`` places, once the limits and any pause allow. Yields a function
        to report the tokens the request really used (corrects the token bucket)."""
        assert self._cap is not None and self._gate is not None
        async with self._cap:
            async with self._gate:  # one request at a time takes from the buckets: first come, first served
                await self._admit(tokens)
            self._change(+1)
            try:
                yield lambda used: self._correct(tokens, used)
            finally:
                self._change(-1)

    async def _admit(self, tokens: int) -> None:
        while True:
            now = time.monotonic()
            wait = self._paused_until - now
            for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
                if bucket is not None:
                    bucket.refill(now)
                    wait = max(wait, bucket.wait_for(amount))
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        if self.requests is not None:
            self.requests.level -= 1
        if self.tokens is not None:
            self.tokens.level -= min(tokens, self.tokens.capacity)

    def _correct(self, estimated: int, used: int) -> None:
        if self.tokens is not None and used:
            self.tokens.level -= used - min(estimated, self.tokens.capacity)

    def pause(self, seconds: float) -> None:
        """Send nothing more for ``seconds`` (a 429's Retry-After): every unit's requests wait, not only the
        one that was refused."""
        until = time.monotonic() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self.stats.pauses.append(seconds)

    def _change(self, delta: int) -> None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        self.in_flight += delta
        self.stats.change(now - self._t0, self.in_flight - delta, self.in_flight)
