"""Throughput of stages 02 and 03 against an HTTP API that answers after a fixed latency, as hosted APIs do.

For each cap on requests in flight (``max_in_flight``) the same kind of units are explained and scored
through the OpenAI-compatible backend against `bench/stand_in_api.py` (a separate process), beside today's
path before this change: one unit at a time with at most 8 of its requests in flight. Each variant gets
its own fresh request cache, so every request goes to the server. Stage 02 (one request per unit) explains
more units than stage 03 scores, so that it lasts several rounds of requests, not only its ramp-up; the
neurons per hour add up both stages' seconds per unit. The largest caps are run again with several
detection/fuzzing items per chat request (``judge_items_per_request``). Rows: requests in flight (mean
while units remain to be started, and max), requests per unit, neurons per hour, speed-up over the
baseline, and the projected wall time for the 307,200 neurons of GPT-2 XL.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GPT2_XL_NEURONS = 307_200


def start_stand_in(latency: float, log: Path) -> tuple[subprocess.Popen, str]:
    """The stand-in API in its own process (so its threads do not compete with the client for the GIL)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parent / "stand_in_api.py"
    cmd = [sys.executable, str(script), "--port", str(port), "--latency", str(latency)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/models", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the stand-in API did not start; see {log}")


class Recorder:
    """Catches the backend a stage makes (to read its traffic) and when each unit's work began (the stages'
    shared loop, `nbutils.core.unit_stage`, hands units to `as_finished`)."""

    def __init__(self, module: Any) -> None:
        import nbutils.core.unit_stage as unit_stage

        self.module, self.loop, self.backend, self.starts = module, unit_stage, None, []
        self._make, self._finished = module.make_backend, unit_stage.as_finished

    def __enter__(self) -> Recorder:
        def make(spec: Any) -> Any:
            self.backend = self._make(spec)
            self.backend.traffic.stats.record = True
            return self.backend

        def finished(work: Callable[[Any], Any], items: Sequence[Any], workers: int, may_start: Any = None) -> Any:
            def timed(item: Any) -> Any:
                self.starts.append(time.monotonic())
                return work(item)

            return self._finished(timed, items, workers, may_start)

        self.module.make_backend, self.loop.as_finished = make, finished
        return self

    def __exit__(self, *exc: Any) -> None:
        self.module.make_backend, self.loop.as_finished = self._make, self._finished

    def in_flight(self) -> dict[str, float]:
        """Mean requests in flight from the first request until the last unit started, and the max."""
        traffic = self.backend.traffic
        end = max(self.starts) - traffic._t0 if traffic._t0 is not None else 0.0
        stats = traffic.stats
        mean = stats.mean_between(0.0, end) if end > 0.5 else stats.mean_in_flight  # a single wave: all of it
        return {"mean": mean, "max": stats.max_in_flight, "requests": stats.sent}


def run_variant(
    collection: Path, units: list[list[int]], n_scored: int, url: str, limit: int, workers: int | None, per_request: int
) -> dict[str, Any]:
    """Stage 02 on ``units`` and stage 03 on the first ``n_scored`` of them, with ``max_in_flight=limit`` (and
    ``workers`` units at once if given) and ``per_request`` judging items per request."""
    import nbutils.explain.stage as explain_stage
    import nbutils.score.stage as score_stage
    from nbutils.core.config import RunConfig
    from nbutils.core.store import ResultStore, StoredSequence

    tmp = Path(tempfile.mkdtemp(prefix="nbutils-throughput-"))
    config = RunConfig(
        explain_neurons=units, explainer_backend="openai", explainer_model="stand-in", explainer_base_url=url,
        simulator_backend="openai", simulator_model="stand-in", simulator_base_url=url, simulation_mode="chat",
        max_in_flight=limit, judge_items_per_request=per_request,
    )  # fmt: skip
    cache = str(tmp / "cache.sqlite")
    scored: list[Any] = []  # the stage-02 keys of the first n_scored units, once stage 02 has run

    def score() -> None:
        first = {tuple(u) for u in units[:n_scored]}
        scored.extend(k for k in StoredSequence.of(tmp / "02", dict).keys if k[:2] in first)
        score_stage.score_units(str(collection), str(tmp / "02"), str(tmp / "03"), config, scored, cache, workers,
                                False, None)  # fmt: skip

    seconds, flights, cpus = {}, {}, {}
    for name, module, run in (
        ("02", explain_stage, lambda: explain_stage.run_explain_stage(collection, tmp / "02", config, False, cache, workers)),
        ("03", score_stage, score),
    ):  # fmt: skip
        with Recorder(module) as rec:
            start, cpu = time.perf_counter(), time.process_time()
            run()
            seconds[name] = time.perf_counter() - start
            cpus[name] = time.process_time() - cpu
        flights[name] = rec.in_flight()
    counts = {"02": len(units), "03": len(scored)}
    failed = len(StoredSequence.of(tmp / "02", dict).failed())
    saved = ResultStore(tmp / "03")
    failed += sum(1 for k in scored if (saved.get(k) or {"failure": "missing"}).get("failure"))
    per_unit = seconds["02"] / counts["02"] + seconds["03"] / counts["03"]
    return {
        "units": len(scored),
        "units_02": len(units),
        "failed": failed,
        "seconds_02": seconds["02"],
        "seconds_03": seconds["03"],
        "in_flight_mean_02": flights["02"]["mean"],
        "in_flight_mean_03": flights["03"]["mean"],
        "in_flight_max": max(f["max"] for f in flights.values()),
        "requests_per_unit": sum(flights[s]["requests"] / counts[s] for s in counts),
        # the client's own CPU (this process, every thread) per request: what caps units started per second
        "client_cpu_ms_per_request": 1000 * sum(cpus.values()) / max(1, sum(f["requests"] for f in flights.values())),
        "neurons_per_hour": 3600 / per_unit,
    }


def bench_throughput(
    excerpts: int, repeats: int, latency: float = 1.0, limits: Sequence[int] = (1, 8, 64, 256), per_slot: float = 3.0,
    per_slot_02: float = 12.0, judge_batch: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Rows for today's path and each cap in ``limits``, and the caps of 64 and more (else the largest) with
    ``judge_batch`` items per judging request; stage 03 scores ``per_slot`` units per place in flight (at
    least 2), stage 02 explains ``per_slot_02``."""
    from nbutils.collect.collector import CollectConfig
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.collect.stage import collect_activations
    from nbutils.core.records import RecordStore
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.sites import num_layers

    tmp = Path(tempfile.mkdtemp(prefix="nbutils-throughput-"))
    need = max(4, int(per_slot_02 * max(limits)))
    subject = load_subject_model("embedded")
    layers = list(range(num_layers(subject.model)))
    ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0)
    per_layer = -(-need // len(layers))
    cfg = CollectConfig(
        layers=layers, neurons=per_layer, top_k=10, n_random=10, band_size=3, quantile_warmup=excerpts // 2
    )
    collect_activations(subject, ex, tmp / "01", cfg, progress=False)
    all_units = [[u.layer, u.index] for u in RecordStore(tmp / "01").all_ids()]
    proc, url = start_stand_in(latency, tmp / "stand_in.log")
    rows = []
    try:
        variants = [("today: one unit at a time, 8 in flight", 8, 1, 4, 1)]
        variants += [(f"max_in_flight={n}", n, None, max(2, int(per_slot * n)), 1) for n in limits]
        variants += [
            (
                f"max_in_flight={n}, {judge_batch} judging items per request",
                n,
                None,
                max(2, int(per_slot * n)),
                judge_batch,
            )
            for n in ([n for n in limits if n >= 64] or [max(limits)])
        ]
        for label, limit, workers, n_units, per_request in variants:
            n_02 = n_units if workers == 1 else max(n_units, int(per_slot_02 * limit))
            row = run_variant(tmp / "01", all_units[:n_02], n_units, url, limit, workers, per_request)
            row = {"variant": label, "judge_items_per_request": per_request, **row}
            row["in_flight_vs_limit"] = min(row["in_flight_mean_02"], row["in_flight_mean_03"]) / limit
            rows.append(row)
            print(f"  {label}: {row['neurons_per_hour']:,.0f} neurons/hour", flush=True)
    finally:
        proc.kill()
    base = rows[0]["neurons_per_hour"]
    for row in rows:
        row["speedup"] = row["neurons_per_hour"] / base
        row["projected_hours_307200"] = GPT2_XL_NEURONS / row["neurons_per_hour"]
    return {
        "benchmark": "throughput",
        "model": f"stand-in API, {latency:g} s per request",
        "latency_s": latency,
        "rows": rows,
    }
