"""The results store's encodings (`nbutils.core.store`): an entry as JSON text, and scorer details as a
compact binary body whose per-token value lists are arrays (float32 where every value survives the round
trip exactly, float64 otherwise), so what is read back equals what was written."""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np

from nbutils.core.io import json_default

MIN_ARRAY = 8  # a list of at least this many floats is stored as an array
_ARRAY = "\x00array"  # the placeholder key of a packed array in a details body
_MAGIC = b"NBD1"


def pack(obj: Any) -> bytes:
    """Scorer details as bytes: the JSON structure with every list of `MIN_ARRAY` or more floats replaced by
    a binary array (float32 when exact, else float64), all zlib-compressed. `unpack` returns an equal object."""
    arrays: list[np.ndarray] = []

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            if len(o) >= MIN_ARRAY and all(type(x) is float for x in o):
                a = np.asarray(o, dtype=np.float64)
                narrow = a.astype(np.float32)
                exact = np.array_equal(narrow.astype(np.float64), a, equal_nan=True)
                arrays.append(narrow if exact else a)
                return {_ARRAY: len(arrays) - 1}
            return [walk(x) for x in o]
        return o

    head = json.dumps(walk(obj), default=json_default).encode()
    parts = [_MAGIC, struct.pack("<I", len(head)), head]
    for a in arrays:
        parts += [
            b"f" if a.dtype == np.float32 else b"d",
            struct.pack("<I", a.size),
            a.astype("<" + a.dtype.str[1:]).tobytes(),
        ]
    return zlib.compress(b"".join(parts), 6)


def unpack(data: bytes) -> Any:
    """What `pack` packed."""
    raw = zlib.decompress(data)
    if raw[:4] != _MAGIC:
        raise ValueError("not a packed details body")
    (n,) = struct.unpack_from("<I", raw, 4)
    head, at, arrays = json.loads(raw[8 : 8 + n]), 8 + n, []
    while at < len(raw):
        dtype = "<f4" if raw[at : at + 1] == b"f" else "<f8"
        (size,) = struct.unpack_from("<I", raw, at + 1)
        nbytes = size * np.dtype(dtype).itemsize
        arrays.append(np.frombuffer(raw, dtype, size, at + 5))
        at += 5 + nbytes

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            if len(o) == 1 and _ARRAY in o:
                return [float(x) for x in arrays[o[_ARRAY]]]
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(x) for x in o]
        return o

    return walk(head)


def entry_body(entry: dict[str, Any]) -> str:
    """An entry (a stage's result for one unit side) as the JSON text the store keeps."""
    return json.dumps(entry, default=json_default)


def entry_from(body: str) -> dict[str, Any]:
    """What `entry_body` wrote."""
    return json.loads(body)
