"""Know what a run will cost before it spends: ``nbutils plan`` (same parameters as ``nbutils run``).

The plan measures a sample of the run's own units (``sample``, default 8, drawn with the run's seed from the unit
sides stage 02 would explain) one at a time through the run's real explainer, simulator and scorers, so each
unit's requests, tokens, wall time and client CPU are its own (the request cache counts: what it serves is free
for the run too). From the per-unit means it forecasts the whole run: requests (failed attempts included),
tokens, cost with ``prices``, wall time at the run's ``max_in_flight``, units in progress, shards and rate
limits, and disk per stage, each with a 95% interval of the mean from the sample's spread (Student's t). Stage
01 is forecast from batches timed on a prefix of the run's excerpts (or read off a finished stage 01).

Where the run's stage 01 has finished, the sample is measured on its records and written into the run's stage
02 and 03 stores, so the run does not pay for it twice, and its requests are in the run's accounts
(``usage.json``), which a budget counts; otherwise on a collection of the excerpt prefix (in ``plan/``, with
its own accounts: its excerpts differ from the full run's, so those results are not reused). ``plan.json``
says what the plan itself sent (``spent_by_plan``). It prints a table and writes
``plan.json`` in the run folder, which ``max_cost`` / ``max_requests`` read (`nbutils.core.budget`).
A server that cannot be reached is named with the fix; the collection is still forecast and the plan says
what it could not measure.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.budget import PLAN_FILE
from nbutils.core.config import COLLECT, EXPLAIN, SCORE, RunConfig
from nbutils.core.errors import UserError
from nbutils.core.io import atomic_write_json, read_json
from nbutils.core.layout import STAGES, RunLayout, explanations, scores
from nbutils.core.records import RecordStore
from nbutils.core.usage import Usage

SAMPLE = 8

_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
"""Student's t, 97.5% quantile, for 1..15 degrees of freedom (1.96 beyond)."""

MEASURED = ("requests", "sent", "prompt_tokens", "completion_tokens", "seconds", "cpu_seconds", "request_seconds")


def interval(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and the 95% interval of the mean (Student's t) of a sample."""
    mean = statistics.fmean(values) if values else 0.0
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    t = _T975[len(values) - 2] if 2 <= len(values) <= len(_T975) + 1 else 1.96
    half = t * sd / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "low": max(0.0, mean - half), "high": mean + half}


class Meter:
    """Per unit side and per part (the explainer, each scorer): what the backend counted, wall seconds and the
    process's CPU seconds, while the sample runs one unit at a time."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def part(self, key: Any, part: str, usage: Usage) -> Iterator[None]:
        before, wall, cpu = usage.copy(), time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            used = usage.copy().minus(before)
            self.rows.append({
                "key": list(key), "part": part, "requests": used.requests, "sent": used.sent(),
                "prompt_tokens": used.prompt_tokens, "completion_tokens": used.completion_tokens,
                "request_seconds": used.request_seconds, "seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu,
            })  # fmt: skip


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _sample(sides: list[tuple[int, int, str]], n: int, seed: int) -> list[tuple[int, int, str]]:
    """``n`` unit sides drawn with the run's seed, in the run's order."""
    if len(sides) <= n:
        return list(sides)
    picked = np.random.default_rng(seed).choice(len(sides), n, replace=False)
    return [sides[i] for i in sorted(picked)]


def measure_explain(
    collection: Path, out: Path, config: RunConfig, keys: list[Any], meter: Meter, cache_path: str | None = None
) -> tuple[list[Any], int]:
    """Stage 02 on ``keys``, one at a time, each stored as the stage stores it; returns the entries and the
    units the stage keeps in progress at once with this backend."""
    from nbutils.core.unit_stage import UnitStage
    from nbutils.explain.contract import explain_side, make_explainer
    from nbutils.explain.stage import explainer_spec
    from nbutils.llm.contract import make_backend

    stage = UnitStage(EXPLAIN, collection, explanations(out), config).open()
    explainer = make_explainer(config, lambda: make_backend(explainer_spec(config, cache_path)), stage.store.meta)
    entries = []
    try:
        for key in keys:
            before = _folder_bytes(out)
            with meter.part(key, "explain", explainer.usage):
                entry = explain_side(stage.store.record(key[0], key[1]), explainer, key[2] == "negative").entry
                stage.saved.put(entry.to_dict())
            meter.rows[-1]["bytes"] = _folder_bytes(out) - before
            entries.append(entry)
    finally:
        explainer.usage.save(stage.out.usage, config.prices)  # the run's accounts: a budget counts the plan
        stage.saved.close()
    return entries, explainer.parallel_units


def measure_score(
    collection: Path, out: Path, config: RunConfig, entries: list[Any], meter: Meter, cache_path: str | None = None
) -> int:
    """Stage 03 on stage 02's sample ``entries``, one at a time, each scorer metered, each result stored;
    returns the units the stage keeps in progress at once with this backend."""
    from nbutils.core.unit_stage import UnitStage
    from nbutils.llm.contract import make_backend
    from nbutils.score.stage import (
        chosen_scorers,
        score_entry,
        settings,
        simulator_spec,
        store_scores,
        stored_numbers,
    )  # fmt: skip
    from nbutils.subject.intervene import intervention_for

    stage = UnitStage(SCORE, collection, scores(out), config).open(numbers_of=stored_numbers)
    store = stage.store
    chosen, s = chosen_scorers(config, store.meta.kind), settings(config)
    llm = make_backend(simulator_spec(config, cache_path))
    subject = None
    if any(sc.needs_subject for sc in chosen):
        subject = intervention_for(store.meta.model, store.meta.unit, store.meta.site)
    try:
        for entry in entries:
            key = (entry.layer, entry.neuron, entry.sign)
            before = _folder_bytes(out)
            with meter.part(key, "score", llm.usage):
                done = score_entry(
                    entry,
                    store,
                    llm,
                    chosen,
                    s,
                    subject,
                    lambda name, b, key=key: meter.part(key, f"score:{name}", b.usage),
                )
                store_scores(stage.saved, done)
            meter.rows[-1]["bytes"] = _folder_bytes(out) - before
    finally:
        llm.usage.save(stage.out.usage, config.prices)
        stage.saved.close()
    return llm.parallel_units


def _rate(per_unit: dict[str, dict[str, float]], config: RunConfig, workers: int, shards: int) -> dict[str, Any]:
    """Unit sides per second a stage reaches, and what bounds it (`forecast_stage`'s wall-time model): units in
    progress over a unit's latency, the requests in flight over a unit's requests times a request's latency,
    the client's CPU, and the rate limits; times the shards (each with its own backend and cap)."""
    latency, sent = per_unit["seconds"]["mean"], per_unit["sent"]["mean"]
    bounds = {f"{workers} units in progress": workers / latency if latency > 0 else math.inf}
    if sent > 0 and per_unit["request_seconds"]["mean"] > 0:
        request_latency = per_unit["request_seconds"]["mean"] / max(per_unit["requests"]["mean"], 1e-9)
        bounds[f"max_in_flight={config.max_in_flight}"] = config.max_in_flight / (sent * request_latency)
    if workers > 1 and per_unit["cpu_seconds"]["mean"] > 0:  # one unit at a time: its latency holds its CPU
        bounds["client CPU"] = 1.0 / per_unit["cpu_seconds"]["mean"]
    if config.requests_per_minute and sent > 0:
        bounds["requests_per_minute"] = config.requests_per_minute / 60 / sent
    tokens = per_unit["prompt_tokens"]["mean"] + per_unit["completion_tokens"]["mean"]
    if config.tokens_per_minute and tokens > 0:
        bounds["tokens_per_minute"] = config.tokens_per_minute / 60 / tokens
    name = min(bounds, key=bounds.get)
    return {"units_per_second": shards * bounds[name], "bound_by": name, "shards": shards}


def forecast_stage(rows: list[dict[str, Any]], n: int, config: RunConfig, workers: int, shards: int) -> dict[str, Any]:
    """A stage's forecast for ``n`` unit sides from its sample ``rows`` (one per unit side)."""
    per_unit = {m: interval([float(r[m]) for r in rows]) for m in MEASURED}
    per_unit["bytes"] = interval([float(r.get("bytes", 0)) for r in rows])
    out: dict[str, Any] = {"units": n, "per_unit": {"units": len(rows), **per_unit}}
    if config.prices:
        costs = [Usage(prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"]).cost(config.prices)
                 for r in rows]  # fmt: skip
        out["per_unit"]["cost"] = interval(costs)
    out["total"] = {m: {k: n * v for k, v in per_unit[m].items() if k != "sd"} for m in (
        "sent", "prompt_tokens", "completion_tokens", "bytes")}  # fmt: skip
    if config.prices:
        out["total"]["cost"] = {k: n * v for k, v in out["per_unit"]["cost"].items() if k != "sd"}
    rate = _rate(per_unit, config, workers, shards)
    slow = _rate({m: {"mean": v["high"]} for m, v in per_unit.items()}, config, workers, shards)
    fast = _rate({m: {"mean": max(v["low"], 1e-9)} for m, v in per_unit.items()}, config, workers, shards)
    out["wall_seconds"] = {"mean": n / rate["units_per_second"], "low": n / fast["units_per_second"],
                           "high": n / slow["units_per_second"], "bound_by": rate["bound_by"], "shards": shards}  # fmt: skip
    return out


def _shards(config: RunConfig, url_field: str) -> int:
    urls = getattr(config, url_field)
    return max(config.shards or 1, len(urls) if isinstance(urls, list) else 1)


def measure_sample(
    collection: Path, work: Path, config: RunConfig, sample: int = SAMPLE, llm: bool = True,
    cache_path: str | None = None, earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Draw ``sample`` of the unit sides stage 02 would explain from ``collection`` and, with ``llm``, run
    stages 02 and 03 on them one at a time into ``work``'s stage folders (a run folder: kept for the run),
    metered, through the request cache at ``cache_path`` (the stages' default: the run's cache); returns the plan's ``units``, ``keys``, ``rows`` (one per unit side and part), ``stages`` (each
    stage's forecast for all its unit sides) and ``scorers`` (each scorer's cost per unit). ``earlier``: the plan.json of an earlier plan of the same run, whose rows
    of an earlier plan of the same run; where they cover the sample, nothing is sent again (the sample's results
    are already stored, and measuring them again through the request cache would count them as free)."""
    from nbutils.explain.stage import chosen_sides

    store = RecordStore(collection)
    _, sides = chosen_sides(store, config, store.rare_units(config.min_active) or {})
    picked = _sample(sides, sample, config.seed)
    out: dict[str, Any] = {"units": {EXPLAIN: len(sides), SCORE: len(sides)}, "keys": [list(k) for k in picked],
                           "stages": {}}  # fmt: skip
    if not llm or not picked:
        return out
    meter = Meter()
    measured = (earlier or {}).get("rows") or []
    covered = {(tuple(r["key"]), r["part"]) for r in measured}
    if measured and all((tuple(k), "explain") in covered for k in out["keys"]):
        meter.rows = [r for r in measured if r["key"] in out["keys"]]
        workers = earlier["workers"]
    else:
        entries, explaining = measure_explain(collection, work / STAGES[1].folder, config, picked, meter, cache_path)
        explained = [e for e in entries if e.explanation]
        scoring = measure_score(collection, work / STAGES[2].folder, config, explained, meter, cache_path)
        workers = {EXPLAIN: explaining, SCORE: scoring}
    out["rows"], out["workers"] = meter.rows, workers
    for stage, part, url in ((EXPLAIN, "explain", "explainer_base_url"), (SCORE, "score", "simulator_base_url")):
        rows = [r for r in meter.rows if r["part"] == part]
        if rows:
            out["stages"][stage] = forecast_stage(rows, len(sides), config, workers[stage], _shards(config, url))
    by_scorer = sorted({r["part"] for r in meter.rows if r["part"].startswith("score:")})
    out["scorers"] = {
        p.split(":", 1)[1]: forecast_stage([r for r in meter.rows if r["part"] == p], len(sides), config, 1, 1)[
            "per_unit"
        ]
        for p in by_scorer
    }
    return out


def _collection(run: RunLayout, config: RunConfig, done: bool, batches: int) -> tuple[Path, Path, bool, dict[str, Any]]:
    """Where the sample's records come from, where its stages write, whether that is the run's own (kept), and
    stage 01's forecast: read off a finished stage 01, else timed on a prefix collection in ``plan/``."""
    from nbutils.collect.stage import sample_collection

    collect = STAGES[0]
    if done:
        manifest = read_json(run.manifest(collect))
        forecast = {"finished": True, "seconds": manifest["seconds"],
                    "bytes": sum(a["bytes"] for a in manifest["artifacts"])}  # fmt: skip
        return run.stage_dir(collect.folder), run.root, True, forecast
    work = run.root / "plan"
    shutil.rmtree(work, ignore_errors=True)
    collection = work / collect.folder
    measured = sample_collection(config, collection, batches)
    per_excerpt = sum(p.stat().st_size for p in collection.glob("*.npy") if p.name in ("tokens.npy", "places.npy"))
    scale = measured["excerpts"] / measured["sample_excerpts"]
    seconds = measured["load_seconds"] + measured["batches"] * measured["seconds_per_batch"] + measured["write_seconds"]
    size = _folder_bytes(collection) + per_excerpt * (scale - 1)  # the excerpts' tokens grow with the run
    return collection, work, False, {"finished": False, **measured, "seconds": seconds, "bytes": size}


def plan_run(
    params: dict[str, Any] | None = None, run_id: str | None = None, output_root: str | Path = "outputs",
    preset: str | None = None, cwd: str | Path | None = None, sample: int = SAMPLE, batches: int = 4,
) -> dict[str, Any]:  # fmt: skip
    """Measure a sample of a run and forecast the whole of it (see the module docstring); writes and returns
    ``plan.json``'s content. The same parameters as `nbutils.run.pipeline.run_pipeline`."""
    import os

    from nbutils.run.pipeline import default_run_id, effective_parameters, stage_finished
    from nbutils.run.preflight import preflight

    cwd = Path(cwd or os.getcwd()).resolve()
    effective = effective_parameters(params, preset, cwd)
    run = RunLayout((cwd / Path(output_root) / (run_id or default_run_id(effective))).resolve())
    config = RunConfig.pick(effective)
    if sample < 2:
        raise UserError(f"sample={sample} is too few to give an interval.", "Measure at least 2 units (default 8).")
    preflight(effective, [COLLECT], probe_servers=True)
    not_measured: list[str] = []
    server_error = None
    try:
        preflight(effective, [EXPLAIN, SCORE], probe_servers=True)
    except UserError as e:  # a server that does not answer: the collection is still forecast
        server_error = e
        not_measured.append(f"stages 02-03: {e}")
    run.root.mkdir(parents=True, exist_ok=True)
    done = stage_finished(STAGES[0], effective, run)
    plan: dict[str, Any] = {"run": str(run.root), "sample": sample, "made": time.strftime("%Y-%m-%dT%H:%M:%S")}
    collection, work, kept, plan["collection"] = _collection(run, config, done, batches)
    plan["sampled"] = {"kept_for_the_run": kept,
                       "from": "the run's collection" if kept else
                       f"a collection of the first {plan['collection'].get('sample_excerpts')} excerpts (plan/): "
                       "its excerpts are not the run's, so its results are not reused"}  # fmt: skip
    earlier = read_json(run.root / PLAN_FILE) or {}
    reusable = kept and (earlier.get("sampled") or {}).get("kept_for_the_run") and "workers" in earlier
    measured = measure_sample(collection, work, config, sample, llm=server_error is None,
                              earlier=earlier if reusable else None)  # fmt: skip
    reuse = earlier.get("rows") if reusable else None
    plan["spent_by_plan"] = {m: sum(r[m] for r in measured.get("rows", []) if r["part"] in ("explain", "score"))
                             for m in ("sent", "prompt_tokens", "completion_tokens")}  # fmt: skip
    if reuse is not None and measured.get("rows") and all(r in reuse for r in measured["rows"]):
        plan["spent_by_plan"]["note"] = "measured by an earlier plan of this run (its results are stored)"
    plan["sampled"]["keys"] = measured.pop("keys")
    plan.update(measured)
    if server_error is None and not plan["sampled"]["keys"]:
        not_measured.append("stages 02-03: the collection has no unit side to explain")
    if not config.prices:
        not_measured.append('cost: no prices given (-p "prices={prompt: ..., completion: ...}" per million tokens)')
    if config.executor == "ray" and not config.shards:
        not_measured.append(
            "wall time on Ray: shards default to twice the cluster's CPUs; give -p shards=N to count them"
        )
    plan["not_measured"] = not_measured
    plan["total"] = _totals(plan)
    atomic_write_json(run.root / PLAN_FILE, plan)
    if server_error is not None:
        plan["error"] = server_error
    return plan


def _totals(plan: dict[str, Any]) -> dict[str, Any]:
    """Stages 01-03 added up (intervals added end to end: a bound, not a joint interval)."""
    stages = plan["stages"].values()
    out: dict[str, Any] = {}
    for m in ("sent", "prompt_tokens", "completion_tokens", "cost"):
        parts = [s["total"][m] for s in stages if m in s["total"]]
        if parts:
            out[m] = {k: sum(p[k] for p in parts) for k in ("mean", "low", "high")}
    c = plan["collection"]["seconds"]
    out["wall_seconds"] = {k: c * (0 if plan["collection"]["finished"] else 1) + sum(s["wall_seconds"][k] for s in stages)
                           for k in ("mean", "low", "high")}  # fmt: skip
    out["bytes"] = plan["collection"]["bytes"] + sum(s["total"]["bytes"]["mean"] for s in stages)
    return out


def plan_table(plan: dict[str, Any]) -> str:
    """The plan as the text table ``nbutils plan`` prints."""

    def span(d: dict[str, float], fmt: str = "{:,.0f}") -> str:
        return f"{fmt.format(d['mean'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"

    c = plan["collection"]
    lines = [f"plan for {plan['run']} (95% intervals of the mean from {len(plan['sampled']['keys'])} sampled unit sides; "
             f"sample {plan['sampled']['from']})"]  # fmt: skip
    if c["finished"]:
        lines.append(f"01 collect   finished: {c['seconds']:.0f} s, {c['bytes'] / 1e6:,.1f} MB")
    else:
        lines.append(
            f"01 collect   {c['batches']} batches x {c['seconds_per_batch']:.3f} s (timed on {c['timed_batches']}) "
            f"+ {c['load_seconds']:.0f} s to load = {_hms(c['seconds'])}; {c['units']:,} units; disk "
            f"{c['bytes'] / 1e6:,.1f} MB"
        )
    header = f"{'stage':<12} {'units':>8} {'requests':>26} {'prompt tokens':>30} {'completion tokens':>28}"
    header += f" {'cost':>24}" if any("cost" in s["total"] for s in plan["stages"].values()) else ""
    lines += [header + "   wall time (bound by)"]
    for name, s in plan["stages"].items():
        t = s["total"]
        row = f"{name:<12} {s['units']:>8,} {span(t['sent']):>26} {span(t['prompt_tokens']):>30} "
        row += f"{span(t['completion_tokens']):>28}"
        row += f" {span(t['cost'], '{:,.4g}'):>24}" if "cost" in t else ""
        w = s["wall_seconds"]
        row += f"   {_hms(w['mean'])} [{_hms(w['low'])}, {_hms(w['high'])}] ({w['bound_by']}); disk {t['bytes']['mean'] / 1e6:,.1f} MB"
        lines.append(row)
    for name, per in (plan.get("scorers") or {}).items():
        cost = f", cost {per['cost']['mean']:.4g}" if "cost" in per else ""
        lines.append(f"  per unit, scorer {name}: {per['sent']['mean']:.1f} requests, "
                     f"{per['prompt_tokens']['mean']:,.0f} + {per['completion_tokens']['mean']:,.0f} tokens, "
                     f"{per['seconds']['mean']:.2f} s{cost}")  # fmt: skip
    t = plan["total"]
    if "sent" in t:
        cost = f", cost {span(t['cost'], '{:,.4g}')}" if "cost" in t else ""
        lines.append(f"whole run: {span(t['sent'])} requests{cost}, wall {_hms(t['wall_seconds']['mean'])}, "
                     f"disk {t['bytes'] / 1e6:,.1f} MB")  # fmt: skip
    lines += [f"not measured: {why}" for why in plan["not_measured"]]
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "inf"
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def plan_summary(stage_dir: str | Path) -> str:
    """What the run's plan forecast (its table), for the run whose stage folder is ``stage_dir``; or how to
    make one. Stage 01's notebook shows it under the collection it forecast."""
    path = Path(stage_dir).resolve().parent / PLAN_FILE
    if not path.is_file():
        return (f"no plan for this run ({path} is missing): `nbutils plan` with the run's parameters forecasts its "
                "requests, tokens, cost, wall time and disk from a sample of its units before it spends")  # fmt: skip
    return plan_table(read_json(path))
