"""llama-cpp-python's OpenAI-compatible server with its top-k log-probabilities ranked by numpy.

Why this exists: for each token of a request with ``logprobs`` (and, with ``echo``, for every *prompt*
token, which the simulator's echo mode reads), llama-cpp-python 0.3.x ranks the whole vocabulary as Python
``(log-probability, token id)`` tuples with ``sorted(zip(row, range(len(row))), reverse=True)`` and keeps
the first ``logprobs``. For SmolLM2's 49,152-entry vocabulary that is 60-90 ms per token on the 2-core
machines here, so a 600-token simulation prompt spent ~50 s ranking and ~7 s in the model, close enough
to the backend's 60 s timeout that a slower machine timed out, retried, and queued abandoned work.

``python -m nbutils.llm.llamacpp_server <llama_cpp.server arguments>`` runs the same server with only
that ranking replaced: `numpy_top_logprobs` gives the module ``llama_cpp.llama`` its own ``zip`` and
``sorted``, which recognise exactly that call (a row zipped with ``range`` of its own length, sorted in
reverse with no key) and answer it with one stable ``numpy.argsort``. The order is the same as Python's
(log-probability descending, ties by token id descending) and the values are the row's own, so the JSON the
server sends is unchanged (`tests/test_llamacpp.py` compares both on the embedded model). Every other
``zip`` and ``sorted`` call in that module goes to the built-ins.

Measured in process on the embedded model (601-token simulation prefix, ``echo``, ``logprobs=20``, 2 threads,
3 December 2026): 52-59 s with llama-cpp-python's ranking, 21-23 s with this one (of which ~8 s is the model's
forward pass; the ranking itself went from ~85 ms to ~17 ms per token, most of that now building the
50,000 (value, id) pairs the caller receives).
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

MIN_RANKED = 256  # shorter rows go to the built-ins (their sort is cheap; a vocabulary is far longer)


class _VocabularyRow:
    """``zip(row, range(len(row)))``, kept as the row so that `_sorted` can rank it with numpy."""

    __slots__ = ("row",)

    def __init__(self, row: Any) -> None:
        self.row = row

    def __iter__(self) -> Iterator[tuple[Any, int]]:  # anything else that iterates it gets the plain pairs
        return builtins.zip(self.row, range(len(self.row)))


def _zip(*iterables: Any, **kwargs: Any) -> Any:
    if (
        not kwargs
        and len(iterables) == 2
        and isinstance(iterables[1], range)
        and isinstance(iterables[0], (np.ndarray, list))
        and len(iterables[0]) >= MIN_RANKED
        and iterables[1] == range(len(iterables[0]))
    ):
        return _VocabularyRow(iterables[0])
    return builtins.zip(*iterables, **kwargs)


def _sorted(iterable: Any, /, *, key: Any = None, reverse: bool = False) -> list[Any]:
    if isinstance(iterable, _VocabularyRow) and key is None and reverse:
        row = np.asarray(iterable.row)
        if row.ndim == 1 and row.dtype.kind == "f" and not np.isnan(row).any():
            # ascending and stable (ties by id ascending), reversed: descending, ties by id descending,
            # which is what Python's reverse sort of (value, id) tuples gives
            order = np.argsort(row, kind="stable")[::-1]
            paused = gc.isenabled()
            gc.disable()  # 50,000 new tuples would otherwise start several collections each time
            try:
                return list(builtins.zip(row[order].tolist(), order.tolist()))
            finally:
                if paused:
                    gc.enable()
    return builtins.sorted(iterable, key=key, reverse=reverse)


@contextlib.contextmanager
def numpy_top_logprobs() -> Iterator[None]:
    """While active, ``llama_cpp.llama`` ranks vocabulary rows with numpy (see the module docstring)."""
    import llama_cpp.llama as module

    saved = {name: module.__dict__[name] for name in ("zip", "sorted") if name in module.__dict__}
    module.zip, module.sorted = _zip, _sorted  # module globals shadow the built-ins for that module only
    try:
        yield
    finally:
        for name in ("zip", "sorted"):
            module.__dict__.pop(name, None)
        module.__dict__.update(saved)


def main() -> None:
    """Run ``llama_cpp.server`` with `numpy_top_logprobs`; every argument is the server's own."""
    from llama_cpp.server.__main__ import main as serve

    sys.argv[0] = "python -m nbutils.llm.llamacpp_server"
    with numpy_top_logprobs():
        serve()


if __name__ == "__main__":
    main()
