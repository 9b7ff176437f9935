"""Shards of a stage's work, run by an executor: here in this process, or as tasks on a Ray cluster.

A stage cuts its work into shards (excerpt ranges for stage 01, groups of units for stages 02 and 03) whose
results land on disk in the run folder, so a rerun skips the shards that finished. `run_shards` runs the
calls ``fn(**kwargs)`` of the unfinished ones:

- ``executor="local"``: in this process, one after another (or ``threads`` at once);
- ``executor="ray"``: one Ray task each (``pip install "nbutils[ray]"``), on the cluster at ``ray_address``
  (None: a Ray instance started on this machine). A task gets a GPU where the cluster has GPUs, else one CPU
  (its torch threads are set to its CPUs). A task whose worker dies is run again (``max_retries``); an
  exception raised by the stage's own code is not retried but raised here.

On a cluster every node must see the run folder at the same path (a shared filesystem) and have nbutils
installed, as the driver does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from nbutils.core.errors import UserError

EXECUTORS = ("local", "ray")
RAY_RETRIES = 3
_STARTED: list[bool] = []  # whether this process connected to Ray itself (then `release_ray` disconnects)


def run_shards(
    fn: Callable[..., Any],
    calls: list[dict[str, Any]],
    executor: str = "local",
    ray_address: str | None = None,
    threads: int = 1,
) -> list[Any]:
    """``[fn(**kw) for kw in calls]``, run by ``executor`` (see the module docstring), in the order given."""
    if executor not in EXECUTORS:
        raise UserError(f"executor={executor!r} is not one of {EXECUTORS}.", "Use executor=local or executor=ray.")
    if not calls:
        return []
    if executor == "local":
        if threads <= 1:
            return [fn(**kw) for kw in calls]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="nbutils-shard") as pool:
            return list(pool.map(lambda kw: fn(**kw), calls))
    ray = start_ray(ray_address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus, max_retries=RAY_RETRIES)(_in_worker)
    try:
        return ray.get([task.remote(fn, kw) for kw in calls])
    except ray.exceptions.RayTaskError as e:  # the stage's own error (a UserError, say) as if raised here
        if isinstance(getattr(e, "cause", None), Exception):
            raise e.cause from None
        raise


def _in_worker(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """A shard in a Ray worker: torch uses the CPUs Ray gave the task (no more, so tasks side by side do not
    fight over cores); the progress bars are plain text."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    torch.set_num_threads(max(1, int(cpus)))
    os.environ["NBUTILS_PLAIN_PROGRESS"] = "1"
    return fn(**kwargs)


def start_ray(address: str | None) -> Any:
    """The Ray module, connected to ``address`` (None: a Ray instance started here) once per process."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "executor=ray needs Ray, which is not installed.", 'pip install "nbutils[ray]" (or pip install ray).'
        ) from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=True)
            _STARTED.append(True)
        except ConnectionError as e:
            raise UserError(
                f"No Ray cluster answers at ray_address={address!r} ({e}).",
                "Start one (ray start --head on the head node) and give its address, or ray_address=None for a "
                "Ray instance on this machine.",
            ) from None
    return ray


def release_ray() -> None:
    """Disconnect from Ray if `start_ray` connected (a stage's end): otherwise Ray's signal handler prints a
    stack report when the kernel is stopped. A connection the user made is left alone."""
    if _STARTED:
        import ray

        ray.shutdown()
        _STARTED.clear()


def default_shards(executor: str, ray_address: str | None) -> int:
    """Twice the cluster's GPUs (or its CPUs where it has none) for Ray, so a slow shard does not hold up the
    end; 1 in this process."""
    if executor != "ray":
        return 1
    resources = start_ray(ray_address).cluster_resources()
    return 2 * max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 1)))


def deal(items: list[Any], shards: int, servers: str | list[str] | None) -> list[tuple[list[Any], str | None]]:
    """``items`` dealt round-robin into at most ``shards`` groups (at least one per server), each with the
    server (base URL) it talks to: servers are dealt round-robin over the groups."""
    urls = servers if isinstance(servers, list) and servers else [servers]  # type: ignore[list-item]
    n = max(1, min(max(shards, len(urls)), len(items)))
    return [(items[i::n], urls[i % len(urls)]) for i in range(n)]


def run_unit_shards(fn: Callable[..., Any], keys: list[Any], config: Any, url_field: str, **common: Any) -> None:
    """Stages 02 and 03: deal the units ``keys`` into shards (`deal`, over the servers ``config.<url_field>``
    lists) and run ``fn(**common, config=<with that shard's server>, keys=..., shard=..., progress=...)`` for
    each with ``config.executor``; ``shard`` is None when there is one (it then writes ``usage.json`` itself)."""
    c = config
    groups = deal(keys, c.shards or default_shards(c.executor, c.ray_address), getattr(c, url_field))
    progress = common.pop("progress", True) and len(groups) == 1
    calls = [
        {**common, "config": replace(c, **{url_field: url}), "keys": part, "progress": progress,
         "shard": i if len(groups) > 1 else None}
        for i, (part, url) in enumerate(groups)
    ]  # fmt: skip
    try:
        run_shards(fn, calls, c.executor, c.ray_address, threads=len(calls))
    finally:
        release_ray()
