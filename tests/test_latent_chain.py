"""The whole chain on SAE latents: `nbutils train-sae` writes an SAE of the embedded model in SAELens's format,
and `nbutils run -p units=<it>` collects, explains, scores, shows and reports its features; both exports
(neuron-explainer JSON and Neuronpedia's format) read the run."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from test_latents import _parity_python
from test_pipeline import nbutils_run, params

from nbutils.collect.sae_training import SAETraining, TopKSAE, read_activations
from nbutils.core.records import RecordStore
from nbutils.core.store import StoredSequence
from nbutils.subject.latents import read_sae_folder

pytestmark = pytest.mark.slow  # trains an SAE and runs the chain on the embedded model through `nbutils`

SCHEMA = json.loads((Path(__file__).parent / "data" / "neuronpedia_export.schema.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small TopK SAE on layer 3's residual stream, trained through the command line."""
    root = tmp_path_factory.mktemp("sae")
    args = ["--layer", "3", "--expansion", "2", "--k", "8", "--n-excerpts", "96", "--epochs", "2"]
    res = nbutils_run(str(root / "sae"), *args, cwd=root, command="train-sae")
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "sae", res


@pytest.fixture(scope="module")
def latent_run(trained):
    folder, _ = trained
    work = folder.parent
    small = ["n_excerpts=48", "top_k=8", "n_random=8", "band_size=2", "explain_neurons=strongest:1",
             "min_active=3", "n_boot=50", "judge_per_class=3", f"units={folder}"]  # fmt: skip
    res = nbutils_run(*params(small), "--run-id", "lat", "--output-root", "out", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    return work / "out" / "lat", res


def test_train_sae_writes_an_saelens_folder_and_reports_its_fit(trained):
    folder, res = trained
    report = json.loads((folder / "training.json").read_text())
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["d_sae"] == 2 * cfg["d_in"] == 1152
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["apply_b_dec_to_input"]
    assert 0.0 < report["fraction_variance_explained"] < 1.0 and 0.0 <= report["dead_fraction"] <= 1.0
    assert f"fraction of variance explained {report['fraction_variance_explained']:.3f}" in res.stdout
    # the saved SAE encodes as the trained module did, through nbutils's reader
    [(coder, info)] = read_sae_folder(folder)
    assert info["hook"] == "blocks.3.hook_resid_post"
    x, _, d = read_activations(SAETraining(layer=3, n_excerpts=4), progress=False)
    from safetensors.torch import load_file

    w = load_file(str(folder / "sae_weights.safetensors"))
    sae = TopKSAE(d, 2 * d, 8, torch.zeros(d), torch.Generator())
    sae.load_state_dict(w)
    torch.testing.assert_close(coder.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    assert ((coder.encode(x) > 0).sum(-1) <= 8).all()


@pytest.mark.skipif(_parity_python() is None, reason="no Python with sae-lens (NBUTILS_PARITY_PYTHON)")
def test_saelens_loads_the_trained_sae_and_encodes_the_same(trained, tmp_path):
    folder, _ = trained
    script = Path(__file__).parent / "parity" / "make_saes.py"
    subprocess.run([_parity_python(), str(script), str(tmp_path), str(folder)], check=True, capture_output=True)
    [(coder, _)] = read_sae_folder(folder)
    x = torch.from_numpy(np.load(tmp_path / "loaded.x.npy"))
    np.testing.assert_allclose(coder.encode(x).numpy(), np.load(tmp_path / "loaded.z.npy"), atol=1e-5)


@pytest.mark.slow
def test_the_five_stages_run_on_latents(latent_run, trained):
    run, res = latent_run
    store = RecordStore(run / "01_collect")
    assert store.meta.kind == "sae_latent" and store.meta.noun == "feature" and store.layers == [3]
    assert store.meta.neurons_per_layer == 1152 and not store.meta.signed
    explained = list(StoredSequence.of(run / "02_explain", dict))
    assert len(explained) == 1 and all(e["layer"] == 3 for e in explained)
    rare = json.loads((run / "02_explain" / "summary.json").read_text())["rare"]
    counts = store.active(3)
    assert rare["count"] == int((counts < 3).sum()) and rare["noun"] == "feature"
    assert all(counts[u[1]] == u[2] < 3 for u in rare["units"])
    assert not {e["neuron"] for e in explained} & {u[1] for u in rare["units"]}
    scored = list(StoredSequence.of(run / "03_score", dict))
    assert len(scored) == 1 and all("simulation" in s or s.get("failure") for s in scored)
    page = (run / "04_inspect" / "run.html").read_text()
    assert "<h2>Feature explanations</h2>" in page and "Layer 3, feature" in page
    assert ("dead or rare" in page) == bool(rare["count"])
    report = json.loads((run / "05_report.ipynb").read_text())
    pngs = sum("image/png" in o.get("data", {}) for c in report["cells"] for o in c.get("outputs", []))
    assert pngs == 4  # the output-side figure is said, not drawn: this run has no ablation or intervention scores
    html = "".join(
        "".join(o.get("data", {}).get("text/html", "")) for c in report["cells"] for o in c.get("outputs", [])
    )
    assert "features collected" in html and "active tokens" in html and "No figure: no ablation" in html
    assert "features are dead or rare" in res.stdout or not rare["count"]


def test_exports_read_a_latent_run(latent_run, tmp_path):
    run, _ = latent_run
    res = nbutils_run(str(run / "01_collect"), str(tmp_path / "oa"), "--layer", "3", cwd=tmp_path,
                      command="export-openai")  # fmt: skip
    assert res.returncode == 0 and "wrote 1152 NeuronRecord files" in res.stdout
    record = json.loads((tmp_path / "oa" / "3" / "0.json").read_text())
    assert record["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 3, "neuron_index": 0}
    res = nbutils_run(str(run), str(tmp_path / "np"), cwd=tmp_path, command="export-neuronpedia")
    assert res.returncode == 0, res.stderr[-2000:]
    source = tmp_path / "np" / "smollm2-135m-instruct" / "3-res-nbutils-1152"
    check_neuronpedia_export(tmp_path / "np", source, n_explained=1)


def check_neuronpedia_export(root: Path, source: Path, n_explained: int) -> None:
    """Every row of an export is valid against the schema (tests/data/neuronpedia_export.schema.json), ids
    join up, and each unit's activations are its collected excerpts."""

    def rows(path: Path) -> list[dict]:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return [json.loads(line) for line in data.decode().splitlines()]

    def valid(kind: str, items: list[dict]) -> None:
        validator = jsonschema.Draft202012Validator({**SCHEMA, "$ref": f"#/$defs/{kind}"})
        for item in items:
            validator.validate(item)

    for name, kind in (("explanation_type", "ExplanationType"), ("explanation_model_type", "ExplanationModelType"),
                       ("explanation_score_type", "ExplanationScoreType"),
                       ("explanation_score_model", "ExplanationScoreModel")):  # fmt: skip
        valid(kind, rows(root / "config" / f"{name}.jsonl"))
    for name, kind in (
        ("model", "Model"),
        ("release", "SourceRelease"),
        ("sourceset", "SourceSet"),
        ("source", "Source"),
    ):
        (row,) = rows(source / f"{name}.jsonl")
        valid(kind, [row])
    features = rows(source / "features" / "batch-0.jsonl.gz")
    activations = rows(source / "activations" / "batch-0.jsonl.gz")
    explanations = rows(source / "explanations" / "batch-0.jsonl.gz")
    scores = rows(source / "explanation_scores" / "batch-0.jsonl.gz")
    valid("Neuron", features)
    valid("Activation", activations)
    valid("Explanation", explanations)
    valid("ExplanationScore", scores)
    assert len(explanations) == n_explained and len(features) == len({e["index"] for e in explanations})
    assert {s["explanationId"] for s in scores} <= {e["id"] for e in explanations}
    assert {a["index"] for a in activations} == {f["index"] for f in features}
    score_types = {r["name"] for r in rows(root / "config" / "explanation_score_type.jsonl")}
    assert {s["explanationScoreTypeName"] for s in scores} <= score_types
    for a in activations:
        assert a["maxValue"] == max(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
        assert len(a["tokens"]) == len(a["values"])


def test_latents_live_equal_their_records_and_stored_scores(latent_run):
    """`nbutils.open_run` on a latent run: a latent's live values on its stored excerpts equal the collected
    ones (the SAE encodes the hooked residual), and its stage-02 explanation scored live equals stage 03's."""
    import nbutils

    path, _ = latent_run
    run = nbutils.open_run(path, scorers=["simulation"])
    key = sorted(run.scores)[0]
    u = run.unit(*key)
    scale = max(abs(u.record.max), abs(u.record.min), 1e-6)
    for e in u.record.top[:3]:
        np.testing.assert_allclose(u.activations(e.token_ids).values, e.activations, atol=2e-4 * scale, rtol=1e-3)
    assert u.score(u.explanation).result.of("simulation") == run.scores[key].of("simulation")
