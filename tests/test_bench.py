"""Smoke test: every benchmark starts and writes its JSON (sizes far too small for meaningful timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(*args: str, cwd: Path) -> str:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_every_cpu_benchmark_starts(tmp_path):
    out = _run(
        str(BENCH / "run.py"),
        "--excerpts",
        "32",
        "--repeats",
        "1",
        "--neurons",
        "2",
        "--results",
        str(tmp_path),
        cwd=tmp_path,
    )
    results = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(results) == ["collect", "e2e", "memory", "simulate"]
    assert "| variant |" in out
    assert results["simulate"]["max_abs_difference"] < 1e-4  # prefix reuse changes no probability
    assert results["collect"]["rows"][-1]["ideal"] > 1.5
    mem = results["memory"]["rows"]
    assert [r["tokens"] for r in mem] == [0, 32 * 64, 4 * 32 * 64] and mem[1]["collector_state_mb"] > 0
    e2e = results["e2e"]
    assert e2e["neurons"] == 2 and e2e["simulate_tokens_per_neuron"] >= e2e["simulate_floor_per_neuron"] > 0


def test_gpu_benchmark_starts_in_smoke_mode(tmp_path):
    out = _run(
        str(BENCH / "gpu.py"), "--smoke", "--batches", "2", "--repeats", "1", "--results", str(tmp_path), cwd=tmp_path
    )
    rows = json.loads((tmp_path / "gpu_smoke.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["tokens_per_s"] > 0 for r in rows) and "tokens_per_s" in out
    assert all(r["max_abs_difference"] < 1e-4 for r in rows if "max_abs_difference" in r)
