"""A run's plan against the run: `nbutils plan` forecasts, then `nbutils run` with the same parameters does it.

    python bench/plan.py                       # the main job (embedded backend) and the stand-in API at 64 in flight
    python bench/plan.py --only stand-in --units 128 --latency 1

Each variant runs in fresh processes under a temporary output root: first ``nbutils plan`` (a sample of 8 unit
sides; stage 01 not yet run, so its batches are timed on a prefix and the sample is measured on the prefix's
collection), then ``nbutils run``. Rows: the forecast (with its interval) and what the run sent and took for LLM
requests (failed attempts included), prompt + completion tokens and wall time of stages 01-03 (the stages'
manifests' seconds: kernel start and model load included), with the ratio actual / forecast against the issue's
targets (requests within 10%, tokens within 15%, wall time within 30%). Writes bench/results/plan.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"requests": 0.10, "tokens": 0.15, "wall seconds": 0.30}


def _nbutils(args: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", "nbutils", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"nbutils {args[0]} exited with {done.returncode}; see {log}")
    return time.perf_counter() - start


def compare(name: str, params: list[str], root: Path) -> dict[str, Any]:
    """Plan, then run, one variant; the forecast beside what the run did."""
    from nbutils.core.budget import PLAN_FILE, spent

    args = [a for p in params for a in ("-p", p)] + ["--output-root", str(root), "--run-id", name]
    log = root / f"{name}.log"
    plan_seconds = _nbutils(["plan", *args], root, log)
    plan = json.loads((root / name / PLAN_FILE).read_text())
    run_seconds = _nbutils(["run", *args], root, log)
    run = root / name
    used = spent(run)
    stage_seconds = {d.name: json.loads((d / "manifest.json").read_text())["seconds"] for d in sorted(run.iterdir())
                     if (d / "manifest.json").is_file()}  # fmt: skip
    total = plan["total"]
    forecast_tokens = {k: total["prompt_tokens"][k] + total["completion_tokens"][k] for k in ("mean", "low", "high")}
    rows = []
    for what, forecast, actual in (
        ("requests", total["sent"], used.sent()),
        ("tokens", forecast_tokens, used.prompt_tokens + used.completion_tokens),
        (
            "wall seconds",
            total["wall_seconds"],
            sum(v for k, v in stage_seconds.items() if k[:2] in ("01", "02", "03")),
        ),
    ):
        ratio = actual / forecast["mean"] if forecast["mean"] else float("nan")
        rows.append({
            "variant": name, "what": what, "forecast": forecast["mean"], "low": forecast["low"],
            "high": forecast["high"], "actual": actual, "actual_over_forecast": ratio,
            "target": f"within {TARGETS[what]:.0%}", "met": abs(ratio - 1) <= TARGETS[what],
        })  # fmt: skip
    return {"rows": rows, "plan_seconds": plan_seconds, "run_seconds": run_seconds, "stage_seconds": stage_seconds,
            "bound_by": {s: v["wall_seconds"]["bound_by"] for s, v in plan["stages"].items()},
            "units": plan["units"], "sampled_from": plan["sampled"]["from"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("main", "stand-in"), action="append")
    p.add_argument("--units", type=int, default=128, help="stand-in: unit sides explained and scored")
    p.add_argument("--latency", type=float, default=1.0, help="stand-in: seconds the API takes per request")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nbutils-plan-bench-"))
    out: dict[str, Any] = {"benchmark": "plan", "root": str(root), "variants": {}}
    chosen = args.only or ["main", "stand-in"]
    if "main" in chosen:
        out["variants"]["main"] = compare("main", [], root)
    if "stand-in" in chosen:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from throughput import start_stand_in

        proc, url = start_stand_in(args.latency, root / "stand_in.log")
        try:
            params = [
                "layers=[0, 15]", f"neurons={args.units // 2}", "explain_neurons=all", "n_excerpts=512",
                "explainer_backend=openai", "explainer_model=stand-in", f"explainer_base_url={url}",
                "simulator_backend=openai", "simulator_model=stand-in", f"simulator_base_url={url}",
                "simulation_mode=chat", "max_in_flight=64", "prices={prompt: 0.15, completion: 0.6}",
            ]  # fmt: skip
            out["variants"]["stand-in"] = compare("stand-in", params, root)
            out["stand_in_latency_s"] = args.latency
        finally:
            proc.kill()
    rows = [r for v in out["variants"].values() for r in v["rows"]]
    print(f"{'variant':<10} {'what':<13} {'forecast [95%]':>32} {'actual':>12} {'actual/forecast':>16}  target")
    for r in rows:
        span = f"{r['forecast']:,.0f} [{r['low']:,.0f}, {r['high']:,.0f}]"
        met = "met" if r["met"] else "NOT met"
        print(f"{r['variant']:<10} {r['what']:<13} {span:>32} {r['actual']:>12,.0f} {r['actual_over_forecast']:>16.3f}  "
              f"{r['target']} ({met})")  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "plan.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
