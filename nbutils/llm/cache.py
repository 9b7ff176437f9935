"""A persistent on-disk cache of LLM requests, so a rerun or a resumed run repeats no completed call.

Entries live in one SQLite file (default ``$NBUTILS_CACHE/llm_requests.sqlite``), keyed by the SHA-256 of
the backend kind, the model and the full request. SQLite's locking lets several runs share one cache.
Only requests and responses are stored, never API keys (they are not part of any request object here).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from nbutils.core.errors import UserError
from nbutils.core.layout import cache_dir


class RequestCache:
    """Key-value store of JSON responses; counts hits and misses."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "llm_requests.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # no fsync per reply (WAL keeps the file whole if the process dies; a power cut may lose the last
            # replies, which a rerun fetches again): a run with many requests in flight puts one per request
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, value TEXT, created REAL)")
            self._db.execute("SELECT count(*) FROM requests").fetchone()
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"The LLM request cache {self.path} is damaged ({e}).",
                "Delete that file (only cached LLM replies are lost; they are fetched again), or point "
                "NBUTILS_CACHE elsewhere.",
            ) from None

    @staticmethod
    def key(backend: str, model: str, request: dict[str, Any]) -> str:
        blob = json.dumps({"backend": backend, "model": model, "request": request}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM requests WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO requests (key, value, created) VALUES (?, ?, ?)",
                (key, json.dumps(value), time.time()),
            )
            self._db.commit()

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0}
