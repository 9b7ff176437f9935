"""Benchmarks, each a ratio against a baseline measured in the same process on the same inputs.

    python bench/run.py                       # every benchmark at the default size
    python bench/run.py --only collect --excerpts 256 --repeats 5

Prints a table and writes JSON to bench/results/<benchmark>.json. Timings are medians over repeats, with
the min-max spread; the baseline and the measured variant alternate within each repeat so machine noise
hits both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _median_spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_collect(excerpts: int, repeats: int, model: str = "embedded") -> dict[str, Any]:
    """Collector tokens/s (all layers hooked; and layers 0..L/2) over bare full-forward tokens/s."""
    from nbutils.collect import CollectConfig, Collector, choose_neurons
    from nbutils.corpus import load_texts, make_excerpts
    from nbutils.hooks import NeuronCapture, neurons_per_layer, num_layers, resolve_site
    from nbutils.models import load_subject_model

    subject = load_subject_model(model)
    ex = make_excerpts(subject.tokenizer, load_texts("embedded"), 64, excerpts, seed=0)
    batches = [torch.from_numpy(ex.tokens[s : s + 32].astype(np.int64)) for s in range(0, len(ex), 32)]
    tokens = int(ex.tokens.size)
    site = resolve_site(subject.model)
    width, n_layers = neurons_per_layer(subject.model, site), num_layers(subject.model)

    def bare() -> None:
        with torch.inference_mode():
            for ids in batches:
                subject.model(input_ids=ids, use_cache=False)

    def collect(layers: list[int]) -> Callable[[], None]:
        def run() -> None:
            cfg = CollectConfig(layers=layers, quantile_warmup=min(1024, len(ex) // 2))
            col = Collector(len(ex), 64, choose_neurons(width, layers, None, 0), cfg, site.signed)
            with NeuronCapture(subject.model, site, layers) as cap:
                for i, ids in enumerate(batches):
                    col.update(i * 32, cap.run(ids))

        return run

    variants = {"bare forward": bare, "collect all layers": collect(list(range(n_layers)))}
    variants[f"collect layers 0..{n_layers // 2 - 1}"] = collect(list(range(n_layers // 2)))
    bare()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_time(fn))
    rows = []
    base = statistics.median(times["bare forward"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                "tokens_per_s": tokens / med,
                "speed_vs_bare": base / med,
                "seconds": _median_spread(ts),
            }
        )
    return {"benchmark": "collect", "model": model, "tokens": tokens, "batch": "32 x 64", "rows": rows}


def bench_simulate(excerpts: int, repeats: int, model: str = "embedded") -> dict[str, Any]:
    """Local all-at-once simulation of one explanation over 10 excerpts: prefix reuse + batching vs plain."""
    from nbutils.backends import LocalBackend
    from nbutils.corpus import load_texts, make_excerpts
    from nbutils.prompts import simulation_prefix

    be = LocalBackend(model, batch_size=5)
    ex = make_excerpts(be.tokenizer, load_texts("embedded"), 64, 10, seed=1)
    tokens = [[be.tokenizer.decode([int(t)]) for t in row] for row in ex.tokens]
    prefix = simulation_prefix("words about numbers and arithmetic")
    p_len = be.count_tokens(prefix)
    e_len = sum(len(be._excerpt_ids(t)[0]) + len(t) * len(be.labels.branch_tokens) for t in tokens)
    ideal = (len(tokens) * p_len + e_len) / (p_len + e_len)
    reused = be.simulate(prefix, tokens, reuse_prefix=True)  # warm-up
    plain = be.simulate(prefix, tokens, reuse_prefix=False)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(reused, plain))
    times: dict[str, list[float]] = {"plain per-excerpt prompt": [], "prefix reuse + batching": []}
    for _ in range(repeats):
        times["plain per-excerpt prompt"].append(_time(lambda: be.simulate(prefix, tokens, reuse_prefix=False)))
        times["prefix reuse + batching"].append(_time(lambda: be.simulate(prefix, tokens, reuse_prefix=True)))
    base = statistics.median(times["plain per-excerpt prompt"])
    rows = [
        {"variant": k, "tokens_per_s": 0.0, "speed_vs_bare": base / statistics.median(v), "seconds": _median_spread(v)}
        for k, v in times.items()
    ]
    return {
        "benchmark": "simulate",
        "model": model,
        "tokens": p_len + e_len,
        "prefix_tokens": p_len,
        "ideal_speedup": ideal,
        "max_abs_difference": diff,
        "rows": rows,
    }


BENCHMARKS = {"collect": bench_collect, "simulate": bench_simulate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    p.add_argument("--excerpts", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__}
    for name in args.only or sorted(BENCHMARKS):
        result = BENCHMARKS[name](args.excerpts, args.repeats)
        result["machine"] = machine
        print(f"\n{name}: {result['tokens']} tokens, {args.repeats} repeats, median (min-max)")
        print(f"{'variant':28s} {'tokens/s':>10s} {'speed-up':>8s}  seconds")
        for r in result["rows"]:
            s = r["seconds"]
            print(
                f"{r['variant']:28s} {r['tokens_per_s']:10.0f} {r['speed_vs_bare']:8.2f}  "
                f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
            )
        if "ideal_speedup" in result:
            print(
                f"ideal speed-up from token counts: {result['ideal_speedup']:.2f}; max |difference|: {result['max_abs_difference']:.2e}"
            )
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
