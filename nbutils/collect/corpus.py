"""Text for the subject model to read, cut into fixed-length token excerpts.

Sources (`load_texts`):
- ``"embedded"``: real English prose that ships with Python itself and needs no download: the help topics of
  ``pydoc_data.topics`` and the longer docstrings of the standard library's own source files (read with
  ``ast``, nothing imported). About 1.5 M characters.
- a local ``.txt`` file (one document), a ``.jsonl`` file (one document per line: a string, or an object
  whose ``text`` field holds it), or a folder of such files (sorted by name).
- any other string is taken as a Hugging Face dataset name, optionally ``name:config``; this needs the
  ``datasets`` package and a network connection.

`make_excerpts` tokenises each document and cuts it into non-overlapping windows of ``excerpt_len`` tokens
(a document's last, shorter window is dropped, so an excerpt never spans two documents), then picks
``n_excerpts`` windows in an order fixed by ``seed``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.io import atomic_write_json
from nbutils.core.layout import cache_dir

EMBEDDED = "embedded"
_MIN_DOCSTRING_CHARS = 300
_EMBEDDED_FORMAT = 1
"""Bumped when what the embedded corpus extracts changes, so cached copies of the old one are not read."""
_SKIP_STDLIB_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "__pycache__",
    "turtledemo",
}


@dataclass
class ExcerptSet:
    """Token ids of fixed-length excerpts and where each came from."""

    tokens: np.ndarray
    """int32 [n_excerpts, excerpt_len]"""
    places: np.ndarray
    """int64 [n_excerpts, 2]: (document index, token offset within the document)"""
    corpus: str
    seed: int
    windows_available: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def excerpt_len(self) -> int:
        return int(self.tokens.shape[1])


def _stdlib_sources() -> list[Path]:
    """The standard library's own .py files the embedded corpus reads, in a fixed order."""
    stdlib, found = Path(sysconfig.get_paths()["stdlib"]), []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_STDLIB_DIRS)
        found += [Path(root, name) for name in sorted(files) if name.endswith(".py")]
    return found


def _parse_embedded_texts(sources: list[Path]) -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for path in sources:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                    yield doc


@functools.cache
def _embedded_texts() -> tuple[str, ...]:
    """The embedded corpus. Parsing the standard library takes seconds, so the documents are kept once per
    process and on disk under the cache folder, keyed by the Python build and every source file's size and
    modification time (a changed or added file makes a new key)."""
    import pydoc_data.topics

    sources = _stdlib_sources()
    stats = [(str(p), st.st_size, st.st_mtime_ns) for p in [Path(pydoc_data.topics.__file__), *sources]
             for st in [p.stat()]]  # fmt: skip
    key = hashlib.sha256(repr((_EMBEDDED_FORMAT, sys.version, stats)).encode()).hexdigest()[:16]
    cached = cache_dir() / "corpus" / f"embedded-{key}.json"
    try:
        return tuple(json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    texts = tuple(_parse_embedded_texts(sources))
    try:
        atomic_write_json(cached, list(texts), compact=True, durable=False)
    except OSError:  # a read-only cache folder: the corpus is parsed again next time
        pass
    return texts


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}).",
            "Convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`.",
        ) from None


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}).", "Fix or remove that line.") from None
            if isinstance(obj, dict):
                if text_field not in obj:
                    raise UserError(
                        f"{path}:{lineno} has no {text_field!r} field (fields: {sorted(obj)[:8]}).",
                        f"Name the field that holds the text: -p corpus_text_field=<field> (one of {sorted(obj)[:8]}).",
                    )
                obj = obj[text_field]
            if not isinstance(obj, str):
                raise UserError(f"{path}:{lineno} holds no text string.", "Each line must be a string or an object.")
            yield obj
    else:
        yield _read_utf8(path)


def _hf_texts(name: str, text_field: str, max_documents: int) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{name!r} is not a local file or folder, so it was taken as a Hugging Face dataset name, but the "
            "'datasets' package is not installed.",
            "Use corpus='embedded' or a local .txt/.jsonl path, or `pip install datasets` (needs a network).",
        ) from None
    dataset, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, config or None, split="train", streaming=True)
        for i, row in enumerate(ds):
            if i >= max_documents:
                break
            yield row[text_field]
    except Exception as e:  # noqa: BLE001 - datasets raises many types when offline
        raise UserError(
            f"Could not load Hugging Face dataset {name!r} ({type(e).__name__}: {str(e)[:200]}); is the machine "
            "offline, or the name misspelled?",
            "Use corpus='embedded' (no download needed) or a local .txt/.jsonl file.",
        ) from None


def load_texts(source: str = EMBEDDED, text_field: str = "text", max_documents: int = 100_000) -> list[str]:
    """The documents of a corpus source (see the module docstring for the accepted sources)."""
    if source == EMBEDDED:
        texts = list(_embedded_texts())  # a new list: callers may change theirs
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
            if not files:
                raise UserError(f"Folder {path} holds no .txt or .jsonl files.", "Put text files in it.")
            texts = [t for f in files for t in _file_texts(f, text_field)]
        elif path.is_file():
            texts = list(_file_texts(path, text_field))
        elif path.suffix in (".txt", ".jsonl") or source.startswith((".", "/", "~")):
            raise UserError(f"Corpus file {path} does not exist.", "Check the path, or use corpus='embedded'.")
        else:
            texts = list(_hf_texts(source, text_field, max_documents))
    texts = [t for t in texts[:max_documents] if t.strip()]
    if not texts:
        raise UserError(f"Corpus {source!r} holds no text.", "Point corpus at files or a dataset with text in them.")
    return texts


def make_excerpts(
    tokenizer: Any,
    texts: list[str],
    excerpt_len: int = 64,
    n_excerpts: int | None = None,
    seed: int = 0,
    corpus: str = "",
    max_context: int | None = None,
) -> ExcerptSet:
    """Cut documents into ``excerpt_len``-token windows and choose ``n_excerpts`` of them (None = all)."""
    if excerpt_len < 1:
        raise UserError(f"excerpt_len={excerpt_len} is not positive.", "Use a positive excerpt length, e.g. 64.")
    if max_context is not None and excerpt_len > max_context:
        raise UserError(
            f"excerpt_len={excerpt_len} is longer than the model's context of {max_context} tokens.",
            f"Use excerpt_len <= {max_context}.",
        )
    rows: list[np.ndarray] = []
    places: list[tuple[int, int]] = []
    for doc, text in enumerate(texts):
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        for offset in range(0, len(ids) - excerpt_len + 1, excerpt_len):
            rows.append(ids[offset : offset + excerpt_len])
            places.append((doc, offset))
    if not rows:
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts[:1000])
        raise UserError(
            f"Corpus {corpus or '(given texts)'} has no document of at least {excerpt_len} tokens "
            f"(the longest has {longest}).",
            "Use more text, or a shorter excerpt_len.",
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    if n_excerpts is not None:
        if n_excerpts < 1:
            raise UserError(f"n_excerpts={n_excerpts} is not positive.", "Ask for at least one excerpt.")
        order = order[:n_excerpts]
    return ExcerptSet(
        tokens=np.stack([rows[i] for i in order]),
        places=np.asarray([places[i] for i in order], dtype=np.int64).reshape(-1, 2),
        corpus=corpus,
        seed=seed,
        windows_available=len(rows),
    )
