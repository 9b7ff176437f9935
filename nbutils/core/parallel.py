"""Units in progress at once: a stage's per-unit work on threads, results handed back as each unit finishes.

Per-unit work in stages 02 and 03 mostly waits for an LLM server; with several units in progress their
requests overlap (the backend's own cap bounds what is really sent, `nbutils.llm.traffic`). Results come
back on the calling thread, so the stage writes each unit's files there, one at a time, as today.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def as_finished(
    work: Callable[[T], R], items: Sequence[T], workers: int, may_start: Callable[[int], bool] | None = None
) -> Iterator[tuple[T, R]]:
    """``(item, work(item))`` for every item, in the order they finish, with up to ``workers`` in progress.

    ``may_start(in_flight)``: asked before each item starts (a budget, `nbutils.core.budget`); once it says no,
    no more start, those in progress finish and are returned, and the iteration ends with items left.

    With ``workers <= 1`` the items run in order on this thread. An exception from ``work`` stops the rest
    (units not started are dropped, those in progress finish but are not returned) and is raised here; so
    is an interrupt (Ctrl-C), without waiting for the units in progress."""
    allowed = may_start or (lambda in_flight: True)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            if not allowed(0):
                return
            yield item, work(item)
        return
    pool = ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="nbutils-unit")
    queue = iter(items)
    pending: dict[Future[R], T] = {}

    def submit_next() -> None:
        if not allowed(len(pending)):
            return
        for item in queue:
            pending[pool.submit(work, item)] = item
            return

    try:
        for _ in range(workers):  # only `workers` submitted at a time, so a stop leaves little half done
            submit_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                yield item, future.result()
                submit_next()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
