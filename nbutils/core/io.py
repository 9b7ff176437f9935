"""Files that are never seen half-written: atomic writes of bytes, JSON, arrays and (streamed) JSON lines."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextmanager
def _replacing(path: str | os.PathLike, mode: str, durable: bool = True) -> Iterator[IO[Any]]:
    """A temporary file in ``path``'s folder, renamed over ``path`` when the block ends without an error (and
    removed when it fails), so readers never see half of the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write a file through a temporary file in the same folder and a rename, so readers never see half of it.

    ``durable=False`` skips the fsync (a few ms a file): for files that can be written again from what is
    kept (exports), where hundreds of thousands of them would otherwise wait on the disk one by one."""
    with _replacing(path, "wb", durable) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, compact: bool = False, durable: bool = True) -> None:
    """JSON, indented for reading; ``compact``: on one line, through json's C encoder (several times faster
    on large files). ``durable``: as for `atomic_write_bytes`."""
    if compact:
        text = json.dumps(obj, separators=(",", ":"), default=json_default)
    else:
        text = json.dumps(obj, indent=1, default=json_default)
    atomic_write_bytes(path, text.encode(), durable=durable)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    atomic_write_bytes(path, buf.getvalue())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries of a JSON-lines artifact (empty if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: str | os.PathLike, entries: Iterable[dict[str, Any]]) -> None:
    """All entries as JSON lines, written atomically and streamed."""
    write_lines(path, (json.dumps(e, default=json_default) for e in entries))


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> int:
    """Lines of text streamed to ``path`` atomically (as `atomic_write_bytes`), in bounded memory for any
    number of lines. Returns how many were written."""
    count = 0
    with _replacing(path, "w") as f:
        for line in lines:
            f.write(line + "\n")
            count += 1
    return count


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content, or None if there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def json_default(o: Any) -> Any:
    """What JSON writers here turn numpy values and paths into."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")
