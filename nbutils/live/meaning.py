"""Search by meaning: explanations embedded by an OpenAI-compatible ``/embeddings`` server, and the nearest ones
to a query.

Each explanation is embedded once per text (a changed explanation is embedded again), through the request
cache like every other request, and kept beside the stage-02 store as unit-length float16 (``02_explain/embeddings/
<model>.npy`` with ``<model>.json`` naming each row's unit side and text digest): a derived file, rebuilt
when the server's vectors change size, never part of the stage's checksummed artifacts. A query is embedded
the same way and compared by cosine with every stored vector: exact, in chunks, read memory-mapped (307,200
vectors of 576 numbers: 354 MB on disk, about 1 s).
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.io import atomic_save_npy, atomic_write_json
from nbutils.core.units import Key
from nbutils.llm.cache import RequestCache
from nbutils.llm.transport import HTTPTransport, embed


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def server_model(base_url: str) -> str:
    """The model a server lists first at ``/models`` (what a single-model server such as llama.cpp's serves)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=10) as r:
            listed = json.loads(r.read()).get("data") or []
    except (OSError, ValueError) as e:
        raise UserError(
            f"The embeddings server at {base_url} did not answer /models ({e}).",
            "Start it (llama.cpp's server with embeddings on, vLLM, ...) or fix embedding_base_url; or name "
            "its model with embedding_model.",
        ) from None
    if not listed:
        raise UserError(f"The embeddings server at {base_url} lists no model.", "Name one with embedding_model.")
    return str(listed[0]["id"])


class MeaningIndex:
    """The embeddings of one run's explanations by one model of one server (module docstring)."""

    def __init__(self, folder: str | Path, base_url: str, model: str | None, api_key_env: str = "OPENAI_API_KEY"):
        self.model = model or server_model(base_url)
        self.transport = HTTPTransport(self.model, base_url, api_key_env, cache=RequestCache())
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model)[:60]
        where = hashlib.sha256(f"{base_url}|{self.model}".encode()).hexdigest()[:8]
        self.vectors_path = Path(folder) / "embeddings" / f"{slug}-{where}.npy"
        self.rows_path = self.vectors_path.with_suffix(".json")

    def _load(self) -> tuple[list[list], np.ndarray]:
        if not (self.vectors_path.is_file() and self.rows_path.is_file()):
            return [], np.zeros((0, 0), np.float16)
        rows = json.loads(self.rows_path.read_text())["rows"]
        vectors = np.load(self.vectors_path, mmap_mode="r")  # read as the search goes through it
        return (rows, vectors) if len(rows) == len(vectors) else ([], np.zeros((0, 0), np.float16))

    def update(self, texts: Sequence[tuple[Key, str | None]]) -> tuple[list[Key], np.ndarray]:
        """Every explained side's vector (float16, ``[sides, dim]``), embedding only texts not embedded yet;
        returns the keys and vectors in the order of ``texts``."""
        rows, vectors = self._load()
        known = {(tuple(r[0]), r[1]): i for i, r in enumerate(rows)}
        wanted = [(tuple(k), t) for k, t in texts if t]
        missing = [(k, t) for k, t in wanted if (k, _digest(t)) not in known]
        if missing:
            fresh = _unit(embed(self.transport, [t for _, t in missing]))
            if len(vectors) and fresh.shape[1] != vectors.shape[1]:
                print(f"the embeddings in {self.vectors_path} have {vectors.shape[1]} numbers, the server's now "
                      f"{fresh.shape[1]}: embedding every explanation again", file=sys.stderr)  # fmt: skip
                rows, vectors, known = [], np.zeros((0, fresh.shape[1]), np.float16), {}
                fresh = _unit(embed(self.transport, [t for _, t in wanted]))
                missing = wanted
            start = len(rows)
            rows = rows + [[list(k), _digest(t)] for k, t in missing]
            vectors = np.concatenate([vectors.reshape(-1, fresh.shape[1]), fresh]) if len(vectors) else fresh
            known |= {(k, _digest(t)): start + i for i, (k, t) in enumerate(missing)}
            self.vectors_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(self.vectors_path, vectors)
            atomic_write_json(self.rows_path, {"model": self.model, "rows": rows})
        order = [known[(k, _digest(t))] for k, t in wanted]
        if order == list(range(len(vectors))):  # every stored row, in order: no copy
            return [k for k, _ in wanted], vectors
        return [k for k, _ in wanted], vectors[order] if order else np.zeros((0, 0), np.float16)

    def nearest(
        self, query: str, texts: Sequence[tuple[Key, str | None]], k: int | None = 50
    ) -> list[tuple[Key, float]]:
        """The explained sides nearest in meaning to ``query`` (cosine of the embeddings), nearest first."""
        keys, vectors = self.update(texts)
        if not keys:
            return []
        q = embed(self.transport, [query])[0]
        if len(q) != vectors.shape[1]:
            raise UserError(
                f"The embeddings server at {self.transport.base_url} returned a query vector of {len(q)} numbers, "
                f"but the stored explanations have {vectors.shape[1]}.",
                f"Delete {self.vectors_path.parent} to embed them again with this server, or use the server "
                "they were made with.",
            )
        return [(keys[i], s) for i, s in rank_by_cosine(vectors, q, k)]


def rank_by_cosine(vectors: np.ndarray, query: np.ndarray, k: int | None = 50) -> list[tuple[int, float]]:
    """(row, cosine) of the ``k`` unit-length ``vectors`` (float16, possibly memory-mapped) nearest to
    ``query``, nearest first (on a tie, the earlier row): exact, `CHUNK` rows at a time."""
    q = (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)
    sims = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), CHUNK):  # stored vectors are unit length: a dot product is the cosine
        sims[start : start + CHUNK] = np.asarray(vectors[start : start + CHUNK], dtype=np.float32) @ q
    n = len(vectors) if k is None else min(k, len(vectors))
    best = np.argpartition(-sims, n - 1)[:n] if n < len(vectors) else np.arange(len(vectors))
    best = best[np.lexsort((best, -sims[best]))]
    return [(int(i), float(sims[i])) for i in best]


CHUNK = 32768
"""Stored vectors compared with a query at once (float32 working memory: CHUNK x dim x 4 bytes)."""


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Vectors scaled to unit length, as float16 (how they are stored)."""
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return (vectors / norms).astype(np.float16)
