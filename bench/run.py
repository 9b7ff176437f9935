"""Benchmarks, each a ratio against a baseline measured in the same process on the same inputs.

    python bench/run.py                       # every benchmark at the default size
    python bench/run.py --only collect --excerpts 256 --repeats 5
    python bench/run.py --only heads --excerpts 192 --repeats 3  # every attention head added to every neuron
    python bench/run.py --only memory --excerpts 128   # peak memory over N and 4N excerpts
    python bench/run.py --only e2e --neurons 6         # neurons per hour through explain + simulate + score
    python bench/run.py --only throughput --latency 1  # LLM stages against an API taking 1 s per request
    python bench/run.py --only ray --excerpts 512      # stage 01 on 1 and 2 local Ray workers
    python bench/run.py --only interactive             # the live calls of a run (nbutils.open_run)
    python bench/run.py --only scale --units 307200    # a run of GPT-2 XL's size: stage costs, views, exports

Prints a table and writes JSON to bench/results/<benchmark>.json. Timings are medians over repeats, with
the min-max spread; the baseline and the measured variant alternate within each repeat so machine noise
hits both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _median_spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _time(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure_collection(
    model: torch.nn.Module, batches: list[torch.Tensor], repeats: int, sync: Callable[[], None] = lambda: None
) -> list[dict[str, Any]]:
    """Bare full forward, bare body forward (the model without its LM head: the collector's fair floor, since
    it stops before the head), the collector with every layer hooked, and the collector for layers 0..L/2-1
    only, on the same batches of [32, 64] token ids (fewer rows in a smoke run); rows with tokens/s and the speed
    against both forwards.
    The collector runs as stage 01 runs it at scale: the capture's stacked buffer, statistics compiled."""
    from nbutils.subject.sites import neurons_per_layer, num_layers, resolve_site

    site = resolve_site(model)
    width, n_layers = neurons_per_layer(model, site), num_layers(model)
    body = model.get_submodule(model.base_model_prefix)

    def bare(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for ids in batches:
                    module(input_ids=ids, use_cache=False)

        return run

    half = n_layers // 2
    cpu = batches[0].device.type == "cpu"
    layers = list(range(n_layers))
    variants = {
        "bare forward": bare(model),
        "bare body forward (no LM head)": bare(body),
        "collect all layers": lambda: _collect(model, site, width, layers, batches),
    }
    if cpu:  # the CPU kernel's baseline in the same run: the torch path it replaced
        variants["collect all layers, torch path (no CPU kernel)"] = lambda: _collect(
            model, site, width, layers, batches, kernel=False
        )
    variants[f"collect layers 0..{half - 1}"] = lambda: _collect(model, site, width, list(range(half)), batches)
    bare(model)()  # warm-up; the collector's compiled statistics are compiled here, outside the timings
    _collect(model, site, width, layers, batches[:1])
    if cpu:
        _collect(model, site, width, layers, batches[:1], kernel=False)
    _collect(model, site, width, list(range(half)), batches[:1])
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):  # variants alternate within a repeat, so machine noise hits all alike
        for name, fn in variants.items():
            times[name].append(_time(fn, sync))
    tokens = sum(len(b) for b in batches) * 64
    base = statistics.median(times["bare forward"])
    base_body = statistics.median(times["bare body forward (no LM head)"])
    rows = [
        {
            "variant": name,
            "tokens_per_s": tokens / statistics.median(ts),
            "speed_vs_bare": base / statistics.median(ts),
            "speed_vs_body": base_body / statistics.median(ts),
            "seconds": _median_spread(ts),
        }
        for name, ts in times.items()
    ]
    rows[-1]["ideal"] = early_exit_ideal(model, half)
    return rows


def _collect(
    model: torch.nn.Module, site: Any, width: int, layers: list[int], batches: list[torch.Tensor], **kw: Any
) -> Any:
    """One collection of ``batches`` as stage 01 feeds it (the capture's stacked buffer); the collector."""
    from nbutils.subject.sites import NeuronCapture

    col = _collector(layers, width, sum(len(b) for b in batches), site.signed, batches[0].device, **kw)
    with NeuronCapture(model, site, layers, stacked=True) as cap:
        for i, ids in enumerate(batches):
            cap.run(ids)
            col.update(i * len(batches[0]), cap.buffer)
    return col


SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::masked_select")
"""Operators after which the host waits for the device: their result's size or value is read on the host."""


def count_collector_ops(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Operator calls and host-device synchronisations per batch of the collector's update (torch.profiler
    on the CPU), for the GPU path (``dense``, compiled statistics), the CPU's torch path and the CPU kernel
    (whose one call into C++ counts as one operator), every layer and half of them: a small constant per batch
    is the target, not a number per layer."""
    from torch.profiler import ProfilerActivity, profile

    from nbutils.subject.sites import NeuronCapture, neurons_per_layer, num_layers, resolve_site

    site = resolve_site(model)
    width, n_layers = neurons_per_layer(model, site), num_layers(model)
    rows = []
    for layers in (list(range(n_layers)), list(range(n_layers // 2))):
        captured = []
        with NeuronCapture(model, site, layers, stacked=True) as cap:
            for ids in batches:
                cap.run(ids)
                captured.append(cap.buffer.clone())
        paths = {"GPU path (dense merges)": {"dense": True}, "CPU torch path": {"dense": False, "kernel": False},
                 "CPU kernel (one call, counted once)": {"dense": False, "kernel": True}}  # fmt: skip
        for path, kw in paths.items():
            _collect(model, site, width, layers, batches[:1], **kw)  # compiles outside the count
            rows_per_batch = len(batches[0])
            col = _collector(layers, width, len(batches) * rows_per_batch, site.signed, batches[0].device, **kw)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i, x in enumerate(captured):
                    col.update(i * rows_per_batch, x)
            top = [e for e in prof.events() if e.cpu_parent is None]
            waits = [e for e in prof.events() if e.name in SYNC_OPS]
            rows.append({
                "variant": f"{path}, {len(layers)} layers",
                "operator_calls_per_batch": len(top) / len(batches),
                "host_waits_per_batch": len(waits) / len(batches),
                "waiting_operators": ", ".join(sorted({e.name for e in waits})) or "none",
            })  # fmt: skip
    return rows


def _collector(layers: list[int], width: int, n_excerpts: int, signed: bool, device: Any, **kw: Any) -> Any:
    """A collector of every unit of ``layers`` for ``n_excerpts``; statistics compiled for batches of real size
    (as a long collection gets them by default), while tiny smoke models keep the collector's own choice."""
    from nbutils.collect.collector import CollectConfig, Collector

    cfg = CollectConfig(layers=layers, quantile_warmup=max(1, min(1024, n_excerpts // 2)))
    kw = {"fused": True if len(layers) * width * 32 * 64 >= 2**24 else None, **kw}
    return Collector(n_excerpts, 64, {layer: np.arange(width) for layer in layers}, cfg, signed, device, **kw)


def bench_collect(excerpts: int, repeats: int, model: str = "embedded") -> dict[str, Any]:
    """Collector tokens/s (all layers hooked; and layers 0..L/2) over bare full- and body-forward tokens/s, then
    the collector's operator calls and host waits per batch."""
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.subject.loading import load_subject_model

    subject = load_subject_model(model)
    ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0)
    rows = min(32, excerpts)  # 32 but in a smoke run of fewer excerpts
    batches = [torch.from_numpy(ex.tokens[s : s + rows].astype(np.int64)) for s in range(0, len(ex), rows)]
    found = measure_collection(subject.model, batches, repeats)
    ops = count_collector_ops(subject.model, batches[:4])
    return {"benchmark": "collect", "model": model, "tokens": int(ex.tokens.size), "batch": f"{rows} x 64",
            "rows": found, "profiler": ops, "state_bytes_per_unit": state_bytes_per_unit(),
            "state_bytes_per_unit_note": "signed units (bottom list), defaults, excerpts of 64, 1,024 warm-up"}  # fmt: skip


def state_bytes_per_unit(signed: bool = True) -> int:
    """The collector's fixed-size state per unit with the run's defaults (top 20, bottom 20 for signed units,
    random 20, 4 bands x 5, excerpts of 64 tokens, a warm-up of 1,024 excerpts): what bounds how many units one
    device's memory holds (a GPT-2-XL collection: 307,200 units)."""
    from nbutils.collect.collector import CollectConfig, Collector

    col = Collector(4096, 64, {0: np.arange(16)}, CollectConfig(layers=[0]), signed, "cpu", kernel=False)
    return sum(v.nbytes for v in col.stack.values()) // 16


def bench_heads(excerpts: int, repeats: int, model: str = "embedded") -> dict[str, Any]:
    """What every attention head of every layer adds to collecting every MLP neuron when both are collected in
    the same forward pass (issue 47's cost target: at most 10% more), as a ratio in one process on the same
    batches: the neuron capture and collector stage 01 uses, plus a capture of each layer's attention output
    projection input (`nbutils.subject.heads.AttentionHeads`: the per-head write norms) and a second collector.
    Stage 01 itself collects one unit type per run; this times the mechanism a combined collection would use."""
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.subject.heads import AttentionHeads
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.sites import NeuronCapture, neurons_per_layer, num_layers, resolve_site

    subject = load_subject_model(model)
    m = subject.model
    ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0)
    rows = min(32, excerpts)
    batches = [torch.from_numpy(ex.tokens[s : s + rows].astype(np.int64)) for s in range(0, len(ex), rows)]
    site, heads = resolve_site(m), AttentionHeads()
    width, head_site, n_heads, layers = (
        neurons_per_layer(m, site),
        heads.site(m),
        heads.width(m),
        list(range(num_layers(m))),
    )
    n = sum(len(b) for b in batches)

    def both() -> None:
        neuron_col = _collector(layers, width, n, site.signed, batches[0].device)
        head_col = _collector(layers, n_heads, n, False, batches[0].device)
        with (
            NeuronCapture(m, site, layers, stacked=True) as cap,
            NeuronCapture(m, head_site, layers, stop_early=False) as hcap,
        ):
            for i, ids in enumerate(batches):
                cap.run(ids)  # one forward: both captures' hooks fire
                written = torch.stack([heads.transform(hcap.values[layer], layer) for layer in layers])
                hcap.values = {}
                neuron_col.update(i * rows, cap.buffer)
                head_col.update(i * rows, written)  # every layer's heads as one tensor, as the neurons

    variants = {"every MLP neuron, every layer": lambda: _collect(m, site, width, layers, batches),
                "every MLP neuron and every attention head, one pass": both}  # fmt: skip
    for fn in variants.values():  # warm-up: compiled statistics compile here
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_time(fn))
    base = statistics.median(times["every MLP neuron, every layer"])
    out = [{"variant": name, "tokens_per_s": n * 64 / statistics.median(ts),
            "cost_vs_neurons": statistics.median(ts) / base - 1, "seconds": _median_spread(ts)}
           for name, ts in times.items()]  # fmt: skip
    return {"benchmark": "heads", "model": model, "tokens": n * 64, "units": {"neurons": width * len(layers),
            "heads": n_heads * len(layers)}, "rows": out, "target": "heads add at most 10%"}  # fmt: skip


def early_exit_ideal(model: torch.nn.Module, layers_run: int) -> float:
    """Ideal speed-up of stopping after ``layers_run`` layers, from the matmul parameters a token passes
    through: every layer plus the LM head for a full forward (the embedding lookup is free), against the
    first ``layers_run`` layers. Attention over 64 tokens adds little and is left out."""
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    per_layer = [sum(p.numel() for p in b.parameters() if p.dim() == 2) for b in blocks]
    head = model.get_output_embeddings().weight.numel()
    return (sum(per_layer) + head) / sum(per_layer[:layers_run])


def measure_simulation(
    be: Any, tokens: list[list[str]], repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """One explanation's all-at-once simulation of ``tokens`` excerpts: plain per-excerpt prompts against
    prefix reuse + batching, with the ideal speed-up from token counts and the largest probability difference."""
    from nbutils.llm.prompts import simulation_prefix

    prefix = simulation_prefix("words about numbers and arithmetic")
    p_len = be.count_tokens(prefix)
    e_len = sum(len(be._excerpt_ids(t)[0]) + len(t) * len(be.labels.branch_tokens) for t in tokens)
    ideal = (len(tokens) * p_len + e_len) / (p_len + e_len)
    reused = be.simulate_prompt(prefix, tokens, reuse_prefix=True)  # also the warm-up
    plain = be.simulate_prompt(prefix, tokens, reuse_prefix=False)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(reused, plain))
    times: dict[str, list[float]] = {"plain per-excerpt prompt": [], "prefix reuse + batching": []}
    for _ in range(repeats):
        for name, reuse in (("plain per-excerpt prompt", False), ("prefix reuse + batching", True)):
            times[name].append(_time(lambda r=reuse: be.simulate_prompt(prefix, tokens, reuse_prefix=r), sync))
    base = statistics.median(times["plain per-excerpt prompt"])
    rows = [
        {
            "variant": k,
            "tokens_per_s": (p_len + e_len) / statistics.median(v),
            "speed_vs_plain": base / statistics.median(v),
            "seconds": _median_spread(v),
        }
        for k, v in times.items()
    ]
    rows[-1]["ideal"] = ideal
    rows[-1]["share_of_ideal"] = rows[-1]["speed_vs_plain"] / ideal
    return {"tokens": p_len + e_len, "prefix_tokens": p_len, "ideal_speedup": ideal, "max_abs_difference": diff,
            "rows": rows}  # fmt: skip


def bench_simulate(excerpts: int, repeats: int, model: str = "embedded") -> dict[str, Any]:
    """Local all-at-once simulation of one explanation over 10 excerpts: prefix reuse + batching vs plain. (The
    test's smoke run, under 64 excerpts, simulates 2: the same paths, a fifth of the forward passes.)"""
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.llm.local import LocalBackend

    be = LocalBackend(model, batch_size=5)
    ex = make_excerpts(be.tokenizer, load_texts("embedded"), 64, 10 if excerpts >= 64 else 2, seed=1)
    tokens = [[be.tokenizer.decode([int(t)]) for t in row] for row in ex.tokens]
    return {"benchmark": "simulate", "model": model, **measure_simulation(be, tokens, repeats)}


MAIN_LAYERS = [0, 7, 15, 22, 29]


def _collect_peak_memory(excerpts: int, model: str) -> dict[str, Any]:
    """In a child process: load the model, collect ``excerpts`` excerpts (0: load only), report peak RSS."""
    import resource
    import tempfile

    from nbutils.collect.collector import CollectConfig, Collector
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.collect.stage import choose_neurons, collect_activations
    from nbutils.subject.loading import load_subject_model
    from nbutils.subject.sites import neurons_per_layer, resolve_site

    subject = load_subject_model(model)
    out: dict[str, Any] = {"excerpts": excerpts}
    if excerpts:
        ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0)
        cfg = CollectConfig(layers=MAIN_LAYERS, quantile_warmup=min(1024, excerpts // 2))
        with tempfile.TemporaryDirectory() as tmp:
            collect_activations(subject, ex, Path(tmp) / "c", cfg, progress=False)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the sizing below
        site = resolve_site(subject.model)
        width = neurons_per_layer(subject.model, site)
        col = Collector(excerpts, 64, choose_neurons(width, MAIN_LAYERS, None, 0), cfg, site.signed)
        out["collector_state_bytes"] = sum(v.nbytes for st in col.layers.values() for v in st.t.values())
        out["tokens"] = int(ex.tokens.size)
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def bench_memory(excerpts: int, repeats: int, model: str = "embedded") -> dict[str, Any]:
    """Peak memory (RSS) of a whole collection (5 layers, every neuron) over N and over 4N excerpts, each in a
    fresh process, beside a process that only loads the model."""
    import subprocess
    import sys

    def child(n: int) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--child-memory", str(n)]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    runs: dict[str, list[dict[str, Any]]] = {"model loaded, no collection": [], "N": [], "4N": []}
    for _ in range(repeats):
        runs["model loaded, no collection"].append(child(0))
        runs["N"].append(child(excerpts))
        runs["4N"].append(child(4 * excerpts))
    base = statistics.median(r["peak_rss_mb"] for r in runs["N"])
    rows = []
    for name, rs in runs.items():
        peaks = [r["peak_rss_mb"] for r in rs]
        rows.append(
            {
                "variant": name if name.startswith("model") else f"collect {name} = {rs[0]['excerpts']} excerpts",
                "tokens": rs[0].get("tokens", 0),
                "peak_rss_mb": _median_spread(peaks),
                "vs_N": statistics.median(peaks) / base,
                "collector_state_mb": rs[0].get("collector_state_bytes", 0) / 2**20,
            }
        )
    growth = rows[2]["peak_rss_mb"]["median"] / rows[1]["peak_rss_mb"]["median"] - 1
    return {"benchmark": "memory", "model": model, "layers": MAIN_LAYERS, "growth_4N_over_N": growth, "rows": rows}


def bench_e2e(excerpts: int, repeats: int, model: str = "embedded", neurons: int = 6) -> dict[str, Any]:
    """Neurons per hour through explain + simulate + score (stages 02 and 03 with detection and fuzzing, local
    embedded model), where the time goes, and the LLM tokens processed per neuron against the floor."""
    import tempfile

    from nbutils.collect.collector import CollectConfig
    from nbutils.collect.corpus import load_texts, make_excerpts
    from nbutils.collect.stage import collect_activations
    from nbutils.core.config import RunConfig
    from nbutils.core.store import ResultStore
    from nbutils.explain.stage import run_explain_stage
    from nbutils.llm.contract import SimulationRequest
    from nbutils.llm.local import LocalBackend
    from nbutils.llm.prompts import simulation_prefix
    from nbutils.score.contract import UnitDetails
    from nbutils.score.stage import run_score_stage
    from nbutils.subject.loading import load_subject_model

    subject = load_subject_model(model)
    ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0)
    tmp = Path(tempfile.mkdtemp())
    layers = [7, 22] if neurons > 1 else [7]  # the test's smoke (--neurons 1): one unit of one layer
    cfg = CollectConfig(layers=layers, quantile_warmup=min(1024, excerpts // 2))
    t0 = time.perf_counter()
    collect_activations(subject, ex, tmp / "01", cfg, progress=False)
    t_collect = time.perf_counter() - t0

    spent = {"simulate": 0.0, "judge": 0.0}
    judge_tokens = [0]
    originals = {part: getattr(LocalBackend, part) for part in spent}

    def timed(part: str) -> Callable[..., Any]:
        def run(backend: Any, *args: Any, **kwargs: Any) -> Any:
            start, tokens = time.perf_counter(), backend.usage.prompt_tokens
            try:
                return originals[part](backend, *args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start
                if part == "judge":
                    judge_tokens[0] += backend.usage.prompt_tokens - tokens

        return run

    for part in spent:  # time the contract's calls of the local backend the stages make
        setattr(LocalBackend, part, timed(part))
    try:
        t0 = time.perf_counter()
        run_explain_stage(tmp / "01", tmp / "02", RunConfig(explain_neurons=neurons // len(layers)), progress=False)
        t_explain = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = run_score_stage(tmp / "01", tmp / "02", tmp / "03", progress=False)
        t_score = time.perf_counter() - t0
    finally:
        for part, method in originals.items():
            setattr(LocalBackend, part, method)
    n = len(results)
    usage = {s: json.loads((tmp / s / "usage.json").read_text()) for s in ("02", "03")}
    # the floor: each explanation's prompt prefix once, plus each simulated excerpt's own tokens
    be, floor = LocalBackend(model), 0
    stored = ResultStore(tmp / "03")
    for found in map(stored.details, stored.keys()):
        details = UnitDetails.from_dict(found)
        excerpts_of = [tuple(x.tokens) for x in details.of("simulation").excerpts]
        request = SimulationRequest(details.explanation, tuple(excerpts_of))
        floor += be.count_tokens(simulation_prefix(details.explanation, be.simulation_examples(request)))
        floor += sum(len(t) for t in excerpts_of)
    stages = {
        "02 explain (generation)": t_explain,
        "03 simulation (LLM forward passes)": spent["simulate"],
        "03 detection + fuzzing (LLM forward passes)": spent["judge"],
        "03 scoring, baseline, I/O": t_score - spent["simulate"] - spent["judge"],
    }
    rows = [{"variant": k, "seconds": v, "share": v / (t_explain + t_score)} for k, v in stages.items()]
    return {
        "benchmark": "e2e",
        "model": model,
        "neurons": n,
        "collection_seconds": t_collect,
        "collection_tokens": int(ex.tokens.size),
        "neurons_per_hour": 3600 * n / (t_explain + t_score),
        "explain_tokens_per_neuron": usage["02"]["prompt_tokens"] / n + usage["02"]["completion_tokens"] / n,
        "simulate_tokens_per_neuron": (usage["03"]["prompt_tokens"] - judge_tokens[0]) / n,
        "judge_tokens_per_neuron": judge_tokens[0] / n,
        "simulate_floor_per_neuron": floor / n,
        "rows": rows,
    }


def bench_throughput(excerpts: int, repeats: int, latency: float = 1.0, limits: str = "1,8,64,256") -> dict[str, Any]:
    """Stages 02 and 03 against an HTTP API with a fixed latency, at each cap on requests in flight
    (`bench/throughput.py`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import bench_throughput as run

    return run(excerpts, repeats, latency, [int(x) for x in limits.split(",")])


def bench_ray(excerpts: int, repeats: int, shards: int = 4) -> dict[str, Any]:
    """Stage 01 with 1 and 2 local Ray workers beside the single process (`bench/ray_scaling.py`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ray_scaling import bench_ray as run

    return run(excerpts, repeats, shards)


def bench_interactive(excerpts: int, repeats: int) -> dict[str, Any]:
    """The live calls of a run against their targets and stage 03's time per unit (`bench/interactive.py`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from interactive import bench_interactive as run

    return run(excerpts, repeats)


def bench_scale(
    excerpts: int, repeats: int, units: int = 307_200, stage_units: int = 6400, rules_units: int = 64
) -> dict[str, Any]:
    """Stages 02-03 per unit, the rules explainer's forward passes, and every view of a run of ``units`` unit
    sides (`bench/scale.py`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import bench_scale as run

    return run(units, stage_units, rules_units=rules_units)


BENCHMARKS = {
    "collect": bench_collect,
    "heads": bench_heads,
    "simulate": bench_simulate,
    "memory": bench_memory,
    "e2e": bench_e2e,
    "throughput": bench_throughput,
    "ray": bench_ray,
    "interactive": bench_interactive,
    "scale": bench_scale,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    p.add_argument("--excerpts", type=int, default=256, help="excerpts of 64 tokens (memory: N)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--neurons", type=int, default=6, help="e2e: neurons explained and scored")
    p.add_argument("--latency", type=float, default=1.0, help="throughput: seconds the API takes per request")
    p.add_argument("--limits", default="1,8,64,256", help="throughput: caps on requests in flight to compare")
    p.add_argument("--units", type=int, default=307_200, help="scale: unit sides in the run's stores")
    p.add_argument("--stage-units", type=int, default=6400, help="scale: units stages 02-03 run for real")
    p.add_argument("--rules-units", type=int, default=64, help="scale: units the rules explainer explains")
    p.add_argument("--ray-shards", type=int, default=4, help="ray: excerpt shards (each Ray task loads the model)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results")
    p.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory is not None:  # a fresh process measuring one collection's peak memory
        print(json.dumps(_collect_peak_memory(args.child_memory, "embedded")))
        return
    args.results.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__}
    for name in args.only or sorted(BENCHMARKS):
        kwargs: dict[str, Any] = {"neurons": args.neurons} if name == "e2e" else {}
        if name == "throughput":
            kwargs = {"latency": args.latency, "limits": args.limits}
        if name == "scale":
            kwargs = {"units": args.units, "stage_units": args.stage_units, "rules_units": args.rules_units}
        if name == "ray":
            kwargs = {"shards": args.ray_shards}
        result = BENCHMARKS[name](args.excerpts, args.repeats, **kwargs)
        result["machine"] = machine
        print_table(result)
        (args.results / f"{name}.json").write_text(json.dumps(result, indent=1))


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def print_table(result: dict[str, Any]) -> None:
    """The result's rows as a Markdown table (medians with min-max), then its other numbers."""
    print(f"\n## {result['benchmark']} ({result['model']}; {result['machine']['platform']})\n")
    _table(result["rows"])
    for k, v in result.items():
        if k != "rows" and isinstance(v, list) and v and isinstance(v[0], dict):  # a second table (profile)
            print(f"\n{k}:\n")
            _table(v)
        elif k not in ("rows", "machine", "benchmark", "model"):
            print(f"- {k}: {_fmt(v)}")


def _table(rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
