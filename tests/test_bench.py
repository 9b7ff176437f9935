"""Smoke test: every benchmark starts and writes its JSON (sizes far too small for meaningful timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test starts a benchmark script (minutes)

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(*args: str, cwd: Path) -> str:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


# every CPU benchmark but `ray`: its Ray start-up and per-task model loads take ~5 min on 2 cores, and the sharded
# Ray collection it times is checked equal to the single process by tests/test_ray.py
SMOKED = ["collect", "e2e", "heads", "interactive", "memory", "scale", "simulate", "throughput"]
ROWS = [
    "collect",
    "heads",
    "memory",
]  # the collector's benchmarks: 8 excerpts (one batch of 8 x 64) exercise every path


def test_every_cpu_benchmark_starts(tmp_path):
    out = _run(
        str(BENCH / "run.py"),
        *[x for name in ROWS for x in ("--only", name)],
        *("--excerpts", "8", "--repeats", "1", "--results", str(tmp_path)),
        cwd=tmp_path,
    )
    out += _run(
        str(BENCH / "run.py"),
        *[x for name in SMOKED if name not in ROWS for x in ("--only", name)],
        "--excerpts",
        "32",
        "--repeats",
        "1",
        "--neurons",
        "1",  # e2e: one unit of one layer (its LLM calls are the smoke's largest cost)
        "--latency",
        "0.05",
        "--limits",
        "4",
        "--units",
        "600",
        "--stage-units",
        "20",
        "--rules-units",
        "4",
        "--results",
        str(tmp_path),
        cwd=tmp_path,
    )
    results = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(results) == SMOKED
    assert "| variant |" in out
    assert results["simulate"]["max_abs_difference"] < 1e-4  # prefix reuse changes no probability
    assert results["collect"]["rows"][-1]["ideal"] > 1.5
    ops = {r["variant"]: r for r in results["collect"]["profiler"]}
    assert all(r["host_waits_per_batch"] == 0 for name, r in ops.items() if name.startswith("GPU path"))
    mem = results["memory"]["rows"]
    assert [r["tokens"] for r in mem] == [0, 8 * 64, 4 * 8 * 64] and mem[1]["collector_state_mb"] > 0
    assert results["collect"]["batch"] == "8 x 64" and results["collect"]["tokens"] == 8 * 64
    e2e = results["e2e"]
    assert e2e["neurons"] == 1 and e2e["simulate_tokens_per_neuron"] >= e2e["simulate_floor_per_neuron"] > 0
    today, capped, batched = results["throughput"]["rows"]
    assert today["in_flight_max"] <= 8 and capped["in_flight_max"] == 4  # the cap reached, never passed
    assert today["failed"] == capped["failed"] == batched["failed"] == 0 and capped["units"] == 3 * 4
    assert capped["units_02"] == 12 * 4 and batched["judge_items_per_request"] == 5
    assert capped["client_cpu_ms_per_request"] > 0
    assert batched["requests_per_unit"] < capped["requests_per_unit"]  # several judging items per request
    scale = {r["what"]: r for r in results["scale"]["rows"]}
    assert scale["open + first unit"]["shown"] and scale["sort by a score"]["units"] == 600
    assert (
        scale["stage 03 score, 20 units"]["bytes_per_unit"] > 0 and scale["export-openai (one layer)"]["files"] == 300
    )
    assert scale["export-jsonl"]["lines"] == 2 * 600  # both stages' filled stores, every unit side
    rules = scale["stage 02 explain, rules explainer, 4 units"]  # bounded: 12 peaks x (24 + 23) sequences
    assert 0 < rules["forward_passes_per_unit"] and rules["sequences_per_unit"] <= 12 * (24 + 23)
    live = results["interactive"]
    assert [r["ratio"] > 0 for r in live["rows"]] == [True] * 4 and live["score_requests"] >= 1


def test_gpu_benchmark_starts_in_smoke_mode(tmp_path):
    out = _run(
        str(BENCH / "gpu.py"), "--smoke", "--batches", "2", "--repeats", "1", "--results", str(tmp_path), cwd=tmp_path
    )
    rows = json.loads((tmp_path / "gpu_smoke.json").read_text())["rows"]
    # per model: bare, body, collect all, collect all on the torch path (a CPU run's baseline for the kernel),
    # the first half of the layers, simulation
    assert len(rows) == 12 and all(r["tokens_per_s"] > 0 for r in rows) and "tokens_per_s" in out
    assert sum("torch path" in r["variant"] for r in rows) == 2
    body = [r for r in rows if r["variant"].startswith("bare body forward")]
    assert len(body) == 2 and all(r["speed_vs_body"] == 1 for r in body)  # both models' body-forward baseline
    assert all(r["max_abs_difference"] < 1e-4 for r in rows if "max_abs_difference" in r)


def test_planted_benchmark_reports_truth_generated_baseline_and_a_perfect_oracle(tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text(
        "from nbutils.subject.planted import PlantedNeuron, per_token\n"
        "PLANTED = [\n"
        "    PlantedNeuron('digits', 'digits', per_token(lambda t, i: any(c.isdigit() for c in t[i]))),\n"
        "    PlantedNeuron('of', 'the word \"of\"', per_token(lambda t, i: t[i].strip() == 'of')),\n"
        "]\n"
    )
    out = _run(
        str(BENCH / "planted.py"), "--planted", f"planted:{rules}", "--excerpts", "64", "--judge-per-class", "3",
        "--out", str(tmp_path / "run"), "--results", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    result = json.loads((tmp_path / "planted.json").read_text())
    rows = {r["neuron"]: r for r in result["rows"]}
    assert list(rows) == ["digits", "of", "mean"] and "| neuron | truth r |" in out
    for name in ("digits", "of", "mean"):
        assert rows[name]["oracle r"] == pytest.approx(1.0, abs=1e-12)  # the oracle knows the rule (float rounding)
        assert rows[name]["oracle detection"] == 1.0 and rows[name]["oracle fuzzing"] == 1.0
        assert rows[name]["baseline r"] is not None and "truth r" in rows[name] and "generated r" in rows[name]
    assert rows["of"]["baseline r"] > 0.9  # one token type: the lookup table is the rule
    assert rows["mean"]["baseline r"] == (rows["digits"]["baseline r"] + rows["of"]["baseline r"]) / 2


def test_llama_cpp_benchmark_measures_the_installed_build(tmp_path):
    pytest.importorskip("llama_cpp")
    out = _run(
        str(BENCH / "llama_cpp_builds.py"), "--tokens", "48", "--repeats", "1", "--results", str(tmp_path), cwd=tmp_path
    )
    (row,) = json.loads((tmp_path / "llama_cpp_builds.json").read_text())["rows"]
    assert row["build"] == "installed" and row["prompt_tokens"] > 0 and row["forward_vs_first"] == 1
    assert row["forward_tokens_per_s"]["median"] > row["echo_logprob_tokens_per_s"]["median"] > 0
    assert "AVX2 = 1" in row["cpu_features"] and "AVX512" not in row["cpu_features"]  # the portable build
    assert "| build |" in out
