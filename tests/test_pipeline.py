"""The `nbutils run` chain as a user meets it: papermill execution of the five stages, manifests, parameter
checks before anything loads, visible failures, quiet logs, where to look at the end, a non-editable install."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import nbformat
import pytest
from servers import free_port

from nbutils.collect.corpus import load_texts
from nbutils.core.errors import UserError
from nbutils.core.layout import STAGES
from nbutils.core.records import RecordStore
from nbutils.core.store import ResultStore, StoredSequence

ROOT = Path(__file__).resolve().parent.parent
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
    "ablation=true",
]
NOISE = ("Kernel is running over TCP", "KeyboardInterrupt", "legacy behaviour", "Traceback")


USER_ENV = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # warnings shown, as a user sees


def nbutils_run(*args: str, cwd: Path, command: str = "run") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbutils", command, *args],
        cwd=cwd, capture_output=True, text=True, timeout=900, env=USER_ENV,
    )  # fmt: skip


def params(pairs: list[str]) -> list[str]:
    return [x for p in pairs for x in ("-p", p)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The five stages on a small job, run from a subfolder with a corpus path relative to it."""
    root = tmp_path_factory.mktemp("chain")
    (root / "texts").mkdir()
    (root / "texts" / "corpus.txt").write_text("\n\n".join(load_texts("embedded")[:60]))
    work = root / "work"
    work.mkdir()
    args = [*params(SMALL + ["corpus=../texts/corpus.txt"]), "--run-id", "small", "--output-root", "out"]
    res = nbutils_run(*args, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    return work / "out" / "small", res, args


@pytest.mark.slow
def test_five_stages_run_through_papermill_with_manifests(small_run):
    run, res, _ = small_run
    executed = json.loads((run / "01_collect_activations.ipynb").read_text())
    assert not any(o.get("output_type") == "error" for c in executed["cells"] for o in c.get("outputs", []))
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "n_excerpts = 32" in "".join(injected[0]["source"])

    manifest = json.loads((run / "01_collect" / "manifest.json").read_text())
    assert manifest["parameters"]["layers"] == [0, 29]
    assert manifest["parameters"]["output_dir"] == str(run / "01_collect")
    assert manifest["parameters"]["corpus"] == str(run.parent.parent.parent / "texts" / "corpus.txt")  # resolved
    assert {"python", "torch", "transformers", "nbutils"} <= set(manifest["versions"])
    listed = {a["path"]: a for a in manifest["artifacts"]}
    assert "01_collect/collection.json" in listed and "01_collect/layer_029/top_acts.npy" in listed
    for rel, art in listed.items():
        data = (run / rel).read_bytes()
        assert art["bytes"] == len(data) and art["sha256"] == hashlib.sha256(data).hexdigest()

    store = RecordStore(run / "01_collect")
    assert store.meta.layers == [0, 29] and store.meta.n_excerpts == 32
    assert store.meta.corpus.endswith("texts/corpus.txt")
    assert len(store.record(29, int(store.neurons(29)[0])).top) == 8
    for stage in ("02_explain", "03_score"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["parameters"]["collection_dir"] == str(run / "01_collect")
    for stage in ("04_inspect", "05_report"):  # the viewer and the report take the run folder
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["parameters"]["run_dir"] == str(run) and "collection_dir" not in m["parameters"]
    page = (run / "04_inspect" / "run.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'data-layer="29" data-neuron="0"' in page
    assert {p.name for p in (run / "05_report" / "figures").iterdir()} == {
        "classification_scores.png",
        "output_side_scores.png",
        "score_distributions.png",
        "score_by_layer.png",
        "simulated_vs_true.png",
    }
    exported = nbutils_run(
        str(run), cwd=run, command="export-jsonl"
    )  # the JSON-lines files other tools read, on request
    assert exported.returncode == 0 and "1 entries to" in exported.stdout, exported.stderr[-2000:]
    scores = [json.loads(line) for line in (run / "exports" / "scores.jsonl").read_text().splitlines()]
    assert len((run / "exports" / "explanations.jsonl").read_text().splitlines()) == 1
    assert [(s["layer"], s["neuron"]) for s in scores] == [(29, 0)] and "top_and_random" in scores[0]["baseline"][
        "simulation"
    ]


@pytest.mark.slow
def test_the_report_notebook_holds_its_figures_as_images(small_run):
    run, _, _ = small_run
    report = nbformat.read(run / "05_report.ipynb", 4)
    outputs = [o for c in report.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # distributions, by layer, detection/fuzzing, simulated vs true, output side
    assert all(o["data"]["image/png"][:8] == "iVBORw0K" for o in images)  # base64 of a PNG header
    figures = [o for o in outputs if re.search(r"<\w*Figure size", str(o.get("data", {}).get("text/plain", "")))]
    assert len(figures) == 5 and all("image/png" in o["data"] for o in figures)  # never the text alone


@pytest.mark.slow
def test_console_is_quiet_and_ends_saying_where_to_look(small_run):
    run, res, _ = small_run
    for noise in NOISE:
        assert noise not in res.stderr, noise
    assert res.stderr.count("collect:   0%") == 1  # each progress line once, not twice
    assert "nbutils: converting" not in res.stderr  # the model was converted already (by the test session)
    lines = dict(line.split(":", 1) for line in res.stdout.splitlines() if line.startswith(("neuron page", "report")))
    page, report = (Path(lines[k].split()[0]) for k in ("neuron page", "report"))
    assert page == run / "04_inspect" / "run.html" and page.is_file()
    assert report == run / "05_report.ipynb" and report.is_file()
    assert f"figures:      {run / '05_report' / 'figures'}/" in res.stdout
    # the ways in name this run (not the package's notebook, which opens the newest run under its own outputs/)
    assert f"viewer:       open {run / '04_inspect_neurons.ipynb'} in JupyterLab" in res.stdout
    assert f"nbutils.open_run({str(run)!r})" in res.stdout
    nb = nbformat.read(run / "04_inspect_neurons.ipynb", 4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert f"run_dir = {str(run)!r}" in injected.source.replace('"', "'")


@pytest.mark.slow
def test_rerun_skips_every_stage_and_an_altered_artifact_is_named(small_run, tmp_path):
    run, _, args = small_run
    # the viewer and the report opened again, as a researcher opens them later (their notebooks' calls): what
    # they rewrite in the run comes out byte for byte the same, so the rerun finds every stage intact
    from nbutils.live.widget import write_page
    from nbutils.view import plots
    from nbutils.view.runview import RunView

    view = RunView.open(run)
    write_page(view, run / "04_inspect")
    plots.write_report(view, run / "05_report")
    again = nbutils_run(*args, cwd=run.parent.parent)
    assert again.returncode == 0 and again.stdout.count("already done") == len(STAGES), again.stderr[-2000:]
    stats = run / "01_collect" / "layer_029" / "stats.npy"
    intact = stats.read_bytes()
    try:
        stats.write_bytes(intact[:-8])
        broken = nbutils_run(*args, cwd=run.parent.parent)
    finally:
        stats.write_bytes(intact)  # the other tests share this run
    message = " ".join(broken.stderr.split())  # the command wraps its one paragraph
    assert broken.returncode == 2 and "layer_029/stats.npy was truncated or altered" in message
    assert "Traceback" not in broken.stderr


@pytest.mark.slow
def test_a_stage_where_every_neuron_failed_exits_nonzero_with_the_reason(small_run, tmp_path):
    run, _, _ = small_run
    shutil.copytree(run / "01_collect", tmp_path / "failing" / "01_collect")
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: refused before any stage runs
    args = ["explain_neurons=[[29, 0]]", "explainer_backend=openai", "explainer_model=x", f"explainer_base_url={dead}"]
    stage02 = ["--stages", "02", "--run-id", "failing", "--output-root", str(tmp_path)]
    res = nbutils_run(*params(args), *stage02, cwd=tmp_path)
    message = " ".join(res.stderr.split())
    assert res.returncode == 2 and f"Nothing answers at {dead} (explainer_base_url)" in message, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not (tmp_path / "failing" / "02_explain").exists()
    # a server that answers GET /models but no completion (Python's file server): every neuron fails in stage 02
    port = free_port()
    files = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wrong = f"http://127.0.0.1:{port}/v1"
        _wait_for(wrong)
        res = nbutils_run(*params([*args[:3], f"explainer_base_url={wrong}"]), *stage02, cwd=tmp_path)
    finally:
        files.terminate()
    assert res.returncode == 1, res.stderr[-2000:]
    message = " ".join(res.stderr.split())
    assert "every neuron failed" in message and "L29 N0" in message and wrong in message
    assert "501" in message and "executed notebook with the error" in message


def _wait_for(url: str) -> None:
    import time
    import urllib.error
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/models", timeout=1)
        except urllib.error.HTTPError:
            return  # it answers (404: a file server has no /models)
        except OSError:
            time.sleep(0.1)


@pytest.mark.slow
def test_export_openai_shows_progress_for_one_layer_or_neuron(small_run, tmp_path):
    run, _, _ = small_run
    res = nbutils_run(
        str(run / "01_collect"), str(tmp_path / "x"), "--layer", "29", cwd=tmp_path, command="export-openai"
    )
    assert res.returncode == 0 and "export:" in res.stderr and "wrote 4 NeuronRecord files" in res.stdout
    res = nbutils_run(
        str(run / "01_collect"),
        str(tmp_path / "y"),
        "--layer",
        "0",
        "--neuron",
        "2",
        cwd=tmp_path,
        command="export-openai",
    )
    assert res.returncode == 0 and [p.name for p in (tmp_path / "y" / "0").iterdir()] == ["2.json"]
    bad = nbutils_run(
        str(run / "01_collect"), str(tmp_path / "z"), "--neuron", "2", cwd=tmp_path, command="export-openai"
    )
    assert bad.returncode == 2 and "--neuron was given without --layer" in bad.stderr


def test_export_neuronpedia_writes_a_neuron_run_in_its_format(small_run, tmp_path):
    from test_latent_chain import check_neuronpedia_export

    run, _, _ = small_run
    res = nbutils_run(str(run), str(tmp_path / "np"), cwd=tmp_path, command="export-neuronpedia")
    assert res.returncode == 0, res.stderr[-2000:]
    check_neuronpedia_export(tmp_path / "np", tmp_path / "np" / "smollm2-135m-instruct" / "29-mlp-neurons", 1)
    (feature,) = [json.loads(x) for x in gzip.decompress(
        (tmp_path / "np" / "smollm2-135m-instruct" / "29-mlp-neurons" / "features" / "batch-0.jsonl.gz").read_bytes()
    ).decode().splitlines()]  # fmt: skip
    rec = RecordStore(run / "01_collect").record(29, 0)
    assert feature["index"] == "0" and feature["pos_str"] == [t for t, _ in rec.writes["promotes"]]
    assert feature["hookName"] == "blocks.29.mlp.hook_post"


@pytest.mark.slow
def test_planted_neurons_flow_through_the_unchanged_pipeline(tmp_path):
    """model=planted: stage 01 hooks the synthetic layer like a real one; stages 02-03 explain and score it."""
    rules = tmp_path / "rules.py"
    rules.write_text(
        "from nbutils.subject.planted import PlantedNeuron, per_token\n"
        "PLANTED = [PlantedNeuron('digits', 'digits', per_token(lambda t, i: any(c.isdigit() for c in t[i])))]\n"
    )
    small = ["model=planted:rules.py", "layers=null", "n_excerpts=48", "top_k=8", "n_random=6", "band_size=2"]
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
    (score,) = StoredSequence.of(tmp_path / "p" / "03_score", dict)
    baseline = score["baseline"]
    assert (score["layer"], score["neuron"]) == (0, 0) and baseline["simulation"]["top_and_random"]["correlation"][
        "value"
    ] > 0.5
    assert {"detection", "fuzzing", "simulation"} <= set(baseline) and "stratified" in baseline["simulation"]
    assert {"detection", "fuzzing", "simulation"} <= set(score) or score["failure"]  # the LLM's, if it explained


@pytest.mark.slow
def test_yaml_config_and_a_run_id_that_hashes_the_effective_parameters(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("\n".join(p.replace("=", ": ", 1) for p in SMALL) + "\nseed: 4\n")
    res = nbutils_run("--config", str(cfg), "-p", "n_excerpts=24", "--stages", "01", "--output-root", "o", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "o").iterdir()
    assert run.name.startswith("run-")
    manifest = json.loads((run / "01_collect" / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 4 and manifest["parameters"]["n_excerpts"] == 24
    # stating a default (excerpt_len is 64) continues the same run instead of collecting again
    same = nbutils_run("--config", str(cfg), "-p", "n_excerpts=24", "-p", "excerpt_len=64", "--stages", "01",
                       "--output-root", "o", cwd=tmp_path)  # fmt: skip
    assert same.returncode == 0 and "already done" in same.stdout and len(list((tmp_path / "o").iterdir())) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "n_exerpts=10"], "Unknown parameter 'n_exerpts': no stage takes it. Did you mean 'n_excerpts'?"),
        (["-p", "output_dir=/tmp/x"], "set by the pipeline"),
        (["-p", "n_excerpts=abc"], "Parameter n_excerpts='abc': expected an integer or null (None)"),
        (["-p", "corpus=../no-such.txt"], "The corpus '../no-such.txt' does not exist"),
        (["-p", "model=./no-such-model"], "The model path './no-such-model' does not exist"),
        (["--config", "bad.yaml"], "(while parsing a flow sequence that starts at line 2)"),
        (["--preset", "quik"], "Unknown preset 'quik'. Did you mean 'quick'?"),
    ],
)
def test_parameters_are_checked_before_anything_loads(tmp_path, args, message):
    (tmp_path / "bad.yaml").write_text("n_excerpts: 10\nlayers: [0, 1\n")
    res = nbutils_run(*args, "--output-root", "out", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in " ".join(res.stderr.split()) and "Fix:" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.slow
def test_failed_stage_exits_nonzero_and_names_the_executed_notebook(tmp_path):
    # preflight reads only the corpus's first record; its third is broken, and stage 01 finds that
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "The cat sat on the mat."}\n{"text": "A dog ran."}\n{"text": "cut off\n')
    res = nbutils_run(
        *params(SMALL), "-p", f"corpus={corpus}", "--run-id", "bad", "--output-root", str(tmp_path), cwd=tmp_path
    )
    assert res.returncode == 1
    assert "UserError" in res.stderr and f"{corpus}:3 is not valid JSON" in res.stderr
    executed = tmp_path / "bad" / "01_collect_activations.ipynb"
    assert str(executed) in res.stderr and executed.is_file()
    assert not (tmp_path / "bad" / "01_collect" / "manifest.json").exists()


def test_list_params_shows_the_main_job_and_presets(tmp_path):
    res = nbutils_run("--list-params", cwd=tmp_path)
    assert res.returncode == 0 and "n_excerpts = 4000" in res.stdout and "layers" in res.stdout
    assert "--preset quick:" in res.stdout and "corpus_text_field = 'text'" in res.stdout


@pytest.mark.slow
def test_a_non_editable_install_finds_its_notebooks(tmp_path):
    """`pip install .` (a wheel, not an editable install) ships the stage notebooks inside the package, and its
    `nbutils` command runs."""
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheel_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)  # dependencies from this environment
    python = str(env_dir / "bin" / "python")
    (wheel,) = wheel_dir.glob("nbutils-*.whl")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run([python, "-c", "import nbutils.live.interactive, nbutils.run.pipeline as p; "
                                          "print(p.__file__); print(p.notebooks_dir())"],
                           cwd=tmp_path, capture_output=True, text=True, env=env)  # fmt: skip
    module, notebooks = where.stdout.split()
    assert module.startswith(site) and notebooks == str(Path(site) / "nbutils" / "notebooks"), where.stderr
    small = ["model=planted", "layers=null", "n_excerpts=16", "top_k=4", "n_random=4", "band_size=1"]
    script = str(env_dir / "bin" / "nbutils")  # the installed command, as README uses it
    res = subprocess.run(
        [script, "run", *params(small), "--stages", "01", "--run-id", "w", "--output-root", "o"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert RecordStore(tmp_path / "o" / "w" / "01_collect").meta.n_excerpts == 16


def _store_rows(stage: Path) -> dict:
    """Everything a results store holds that views read: entries, details and the numbers table, raw."""
    import sqlite3

    with ResultStore(stage) as store:
        held = {str(k): (store.get(k), store.details(k)) for k in store.keys()}
    with sqlite3.connect(stage / "results.sqlite") as db:
        held["numbers"] = sorted(db.execute("SELECT layer, neuron, side, name, value FROM numbers").fetchall())
    return held


@pytest.mark.slow
def test_an_altered_store_is_noticed_everywhere_and_the_printed_repair_gives_the_same_results(small_run):
    """Runs last in this module (it rewrites the shared run and leaves it complete). One score changed in
    stage 03's store (8 bytes): the viewer, the report and `nbutils run` refuse it with one fix, `nbutils check
    RUN --repair`; following it, then the same command, gives back exactly the results the stage wrote."""
    import sqlite3

    from nbutils.view.runview import RunView

    run, _, args = small_run
    before = _store_rows(run / "03_score")
    db = sqlite3.connect(run / "03_score" / "results.sqlite")
    (name,) = db.execute("SELECT name FROM numbers WHERE value IS NOT NULL LIMIT 1").fetchone()
    with db:
        db.execute("UPDATE numbers SET value = value + 0.5 WHERE name = ?", (name,))
    fix = f"nbutils check {run} --repair"
    with pytest.raises(UserError, match="results.sqlite was changed after its stage wrote it .*write-ahead log"):
        RunView.open(run)  # still open: the change is in SQLite's log beside the file
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # folded into the file, as when the tool that changed it exits
    db.close()
    with pytest.raises(UserError, match="results.sqlite was truncated or altered") as err:
        RunView.open(run)
    assert fix in err.value.fix
    refused = nbutils_run(*args, cwd=run.parent.parent)
    assert refused.returncode == 2 and fix in " ".join(refused.stderr.split()), refused.stderr[-2000:]
    checked = nbutils_run(str(run), cwd=run.parent.parent, command="check")
    assert checked.returncode == 1 and "03_score: DAMAGED" in checked.stdout and "01_collect: ok" in checked.stdout
    repaired = nbutils_run(str(run), "--repair", cwd=run.parent.parent, command="check")
    assert repaired.returncode == 0 and "results store rebuilt with the 1 of 1 unit sides" in repaired.stdout
    again = nbutils_run(*args, cwd=run.parent.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _store_rows(run / "03_score") == before  # the altered number restored from its entry; nothing lost
    assert nbutils_run(str(run), cwd=run.parent.parent, command="check").returncode == 0
    RunView.open(run)  # opens again
