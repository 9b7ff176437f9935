"""The `nbutils run` chain: papermill execution of stage 01, manifests, parameter checks, failures."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbutils.pipeline import STAGES, parse_value
from nbutils.records import RecordStore

SMALL = [
    "n_excerpts=32",
    "layers=[0, 29]",
    "neurons=[0, 1, 2, 3]",
    "batch_size=16",
    "top_k=8",
    "n_random=6",
    "band_size=2",
    "explain_neurons=[[29, 0]]",
    "n_boot=100",
]


def nbutils_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbutils", "run", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def params(pairs: list[str]) -> list[str]:
    return [x for p in pairs for x in ("-p", p)]


@pytest.mark.slow
def test_stage01_runs_through_papermill_and_writes_a_manifest(tmp_path):
    res = nbutils_run(*params(SMALL), "--run-id", "small", "--output-root", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "small"
    executed = json.loads((run / "01_collect_activations.ipynb").read_text())
    assert not any(o.get("output_type") == "error" for c in executed["cells"] for o in c.get("outputs", []))
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "n_excerpts = 32" in "".join(injected[0]["source"])
    assert "collect:" in res.stderr  # progress reached the terminal

    manifest = json.loads((run / "01_collect" / "manifest.json").read_text())
    assert manifest["parameters"]["layers"] == [0, 29]
    assert manifest["parameters"]["output_dir"] == str(run / "01_collect")
    assert {"python", "torch", "transformers", "nbutils"} <= set(manifest["versions"])
    listed = {a["path"]: a for a in manifest["artifacts"]}
    assert "01_collect/collection.json" in listed and "01_collect/layer_029/top_acts.npy" in listed
    for rel, art in listed.items():
        data = (run / rel).read_bytes()
        assert art["bytes"] == len(data) and art["sha256"] == hashlib.sha256(data).hexdigest()

    store = RecordStore(run / "01_collect")
    assert store.meta.layers == [0, 29] and store.meta.n_excerpts == 32

    assert len(store.record(29, int(store.neurons(29)[0])).top) == 8
    for stage in ("02_explain", "03_score", "04_inspect", "05_report"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["parameters"]["collection_dir"] == str(run / "01_collect")
    page = (run / "04_inspect" / "run.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'data-layer="29" data-neuron="0"' in page
    assert {p.name for p in (run / "05_report" / "figures").iterdir()} == {
        "classification_scores.png",
        "score_distributions.png",
        "score_by_layer.png",
        "simulated_vs_true.png",
    }
    scores = [json.loads(line) for line in (run / "03_score" / "scores.jsonl").read_text().splitlines()]
    assert [(s["layer"], s["neuron"]) for s in scores] == [(29, 0)] and "top_and_random" in scores[0]["baseline"]

    again = nbutils_run(*params(SMALL), "--run-id", "small", "--output-root", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("already done") == len(STAGES)

    # an artifact altered after its stage finished is caught before it is reused, and named
    stats = run / "01_collect" / "layer_029" / "stats.npy"
    stats.write_bytes(stats.read_bytes()[:-8])
    broken = nbutils_run(*params(SMALL), "--run-id", "small", "--output-root", str(tmp_path), cwd=tmp_path)
    message = " ".join(broken.stderr.split())  # the command wraps its one paragraph
    assert broken.returncode == 2 and "layer_029/stats.npy was truncated or altered" in message
    assert "Traceback" not in broken.stderr


@pytest.mark.slow
def test_planted_neurons_flow_through_the_unchanged_pipeline(tmp_path):
    """model=planted: stage 01 hooks the synthetic layer like a real one; stages 02-03 explain and score it."""
    rules = tmp_path / "rules.py"
    rules.write_text(
        "from nbutils.planted import PlantedNeuron, per_token\n"
        "PLANTED = [PlantedNeuron('digits', 'digits', per_token(lambda t, i: any(c.isdigit() for c in t[i])))]\n"
    )
    small = [f"model=planted:{rules}", "layers=null", "n_excerpts=48", "top_k=8", "n_random=6", "band_size=2"]
    small += ["explain_neurons=all", "n_boot=50", "judge_per_class=3"]
    res = nbutils_run(
        *params(small), "--stages", "01,02,03", "--run-id", "p", "--output-root", str(tmp_path), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    store = RecordStore(tmp_path / "p" / "01_collect")
    assert store.meta.model == f"planted:{rules}" and store.layers == [0] and store.meta.neurons_per_layer == 1
    rec = store.record(0, 0)
    for e in rec.top + rec.random:
        assert e.activations.tolist() == [float(any(c.isdigit() for c in t)) for t in e.tokens]
    (score,) = [json.loads(line) for line in (tmp_path / "p" / "03_score" / "scores.jsonl").read_text().splitlines()]
    assert (score["layer"], score["neuron"]) == (0, 0) and score["baseline"]["top_and_random"]["correlation"][
        "value"
    ] > 0.5
    assert {"detection", "fuzzing", "stratified"} <= set(score["baseline"])
    assert {"detection", "fuzzing", "stratified"} <= set(score) or score["failure"]  # the LLM's scores, if it explained


@pytest.mark.slow
def test_yaml_config_and_default_run_id(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("\n".join(p.replace("=", ": ", 1) for p in SMALL) + "\nseed: 4\n")
    res = nbutils_run("--config", str(cfg), "-p", "n_excerpts=24", "--output-root", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "o").iterdir()
    assert run.name.startswith("run-")
    manifest = json.loads((run / "01_collect" / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 4 and manifest["parameters"]["n_excerpts"] == 24


def test_unknown_and_owned_parameters_are_refused(tmp_path):
    res = nbutils_run("-p", "n_exerpts=10", "--output-root", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert "Unknown parameter(s) ['n_exerpts']" in res.stderr and "n_excerpts" in res.stderr
    assert "Traceback" not in res.stderr and not any(tmp_path.iterdir())
    res = nbutils_run("-p", "output_dir=/tmp/x", "--output-root", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and "set by the pipeline" in res.stderr


@pytest.mark.slow
def test_failed_stage_exits_nonzero_and_names_the_executed_notebook(tmp_path):
    res = nbutils_run(
        *params(SMALL), "-p", "layers=[99]", "--run-id", "bad", "--output-root", str(tmp_path), cwd=tmp_path
    )
    assert res.returncode == 1
    assert "UserError" in res.stderr and "out of range" in res.stderr
    executed = tmp_path / "bad" / "01_collect_activations.ipynb"
    assert str(executed) in res.stderr and executed.is_file()
    assert not (tmp_path / "bad" / "01_collect" / "manifest.json").exists()


def test_list_params_and_value_parsing(tmp_path):
    res = nbutils_run("--list-params", cwd=tmp_path)
    assert res.returncode == 0 and "n_excerpts = 4000" in res.stdout and "layers" in res.stdout
    assert parse_value("[0, 5]") == [0, 5] and parse_value("null") is None and parse_value("12") == 12
    assert parse_value("embedded") == "embedded" and parse_value("0.5") == 0.5
