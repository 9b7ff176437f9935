"""What a stage's LLM requests cost: token counts per backend, saved into the stage's ``usage.json`` as units
finish (so a resumed run keeps counting), one file per shard while shards run at once."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nbutils.core.errors import UserError
from nbutils.core.io import atomic_write_json


@dataclass
class Usage:
    """Token counts, for cost estimates and for comparing against the floor."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    failed_attempts: int = 0
    """Requests sent that failed (a server fault, a timeout, a 429), whether sent again or given up: a budget
    counts them."""
    request_seconds: float = 0.0
    """Seconds answered requests were in flight, summed (a plan's latency per request)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Requests are counted on the HTTP loop's thread while a stage saves the counts from its own."""
    _saved_at: float = field(default=-math.inf, repr=False, compare=False)

    def add(self, other: Usage) -> None:
        with self._lock:
            for name in USAGE_FIELDS:
                setattr(self, name, getattr(self, name) + getattr(other, name))

    def sent(self) -> int:
        """Requests sent to a server, every failed attempt included (what ``max_requests`` counts)."""
        return self.requests + self.failed_attempts

    def minus(self, earlier: Usage) -> Usage:
        """What was counted since ``earlier`` (a `copy` of these counts)."""
        return Usage(**{k: getattr(self, k) - getattr(earlier, k) for k in USAGE_FIELDS})

    def copy(self) -> Usage:
        with self._lock:
            return Usage(**{k: getattr(self, k) for k in USAGE_FIELDS})

    def cost(self, prices: dict[str, float]) -> float:
        """Estimated cost from a price table in currency units per million tokens: {"prompt": .., "completion": ..}."""
        unknown = set(prices) - {"prompt", "completion"}
        if unknown:
            raise UserError(
                f"Price table keys {sorted(unknown)} are not 'prompt' or 'completion'.", "Use those two keys."
            )
        return (
            self.prompt_tokens * prices.get("prompt", 0.0) + self.completion_tokens * prices.get("completion", 0.0)
        ) / 1e6

    def save(
        self, path: str | Path, prices: dict[str, float] | None = None, at_most_every: float = 0.0
    ) -> dict[str, object] | None:
        """Move these counts into the totals of a usage.json file (so resumed runs keep counting); returns them.

        The counts here are reset, so a run that calls this as units finish loses at most the counts since the
        last save if it is killed. ``at_most_every``: seconds; a call sooner than that after the last save
        does nothing and returns None (a stage finishing hundreds of units a second saves once a second).
        """
        now = time.monotonic()
        if at_most_every > 0 and now - self._saved_at < at_most_every:
            return None
        self._saved_at = now
        path = Path(path)
        old = json.loads(path.read_text()) if path.is_file() else {}
        total = Usage(**{k: old.get(k, 0) for k in USAGE_FIELDS})
        with self._lock:
            total.add(self)
            for name in USAGE_FIELDS:
                setattr(self, name, 0)
        out: dict[str, object] = {name: getattr(total, name) for name in USAGE_FIELDS}
        looked_up = total.cache_hits + total.cache_misses
        out["cache_hit_rate"] = total.cache_hits / looked_up if looked_up else None
        if prices:
            out["prices_per_million_tokens"] = prices
            out["estimated_cost"] = total.cost(prices)
        atomic_write_json(path, out)
        return out


USAGE_FIELDS = (
    "requests", "prompt_tokens", "completion_tokens", "cache_hits", "cache_misses", "failed_attempts",
    "request_seconds",
)  # fmt: skip


def shard_usage(path: Path, shard: int | None) -> Path:
    """Where a shard of a stage counts its usage: its own file beside ``usage.json`` (shards running at once
    would race on one file); `merge_shard_usage` adds them into ``usage.json``."""
    return path if shard is None else path.with_name(f"usage.shard-{shard:03d}.json")


def merge_shard_usage(path: Path, prices: dict[str, float] | None) -> None:
    """Add the shards' usage files into ``path`` and remove them."""
    for part in sorted(path.parent.glob("usage.shard-*.json")):
        counts = json.loads(part.read_text())
        Usage(**{k: counts.get(k, 0) for k in USAGE_FIELDS}).save(path, prices)
        part.unlink()
