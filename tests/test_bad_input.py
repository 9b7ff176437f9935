"""Bad input gets one paragraph naming the problem and the fix (cases not covered next to their modules)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_model

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.errors import UserError
from nbutils.core.records import Excerpt, RecordStore, UnitRecord
from nbutils.core.units import UnitId
from nbutils.explain.explainer import explain_unit
from nbutils.llm.cache import RequestCache
from nbutils.run.manifests import artifact_list, verify_artifacts
from nbutils.score.metrics import score
from nbutils.subject.models import SubjectModel


def test_corrupted_llm_cache(tmp_path):
    bad = tmp_path / "llm_requests.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="damaged") as err:
        RequestCache(bad)
    assert "Delete that file" in err.value.fix


def test_missing_upstream_artifacts_one_paragraph(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "nbutils", "run", "--stages", "03", "--run-id", "x", "--output-root", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    assert "needs the output of an earlier stage" in res.stderr and "Traceback" not in res.stderr


def test_truncated_or_altered_artifacts_are_detected(embedded_tokenizer, tmp_path):
    subject = SubjectModel(tiny_model("llama", vocab_size=len(embedded_tokenizer)), embedded_tokenizer, "tiny-llama")
    ex = make_excerpts(embedded_tokenizer, load_texts("embedded"), 16, 16, seed=0)
    store = collect_activations(
        subject, ex, tmp_path / "01_collect", CollectConfig(layers=[1], neurons=[0, 1]), progress=False
    )
    manifest = tmp_path / "01_collect" / "manifest.json"
    manifest.write_text(json.dumps({"artifacts": artifact_list(tmp_path / "01_collect", tmp_path)}))
    verify_artifacts(manifest, tmp_path)  # intact
    top = tmp_path / "01_collect" / "layer_001" / "top_acts.npy"
    data = top.read_bytes()
    top.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, same size
    with pytest.raises(UserError, match="top_acts.npy was truncated or altered") as err:
        verify_artifacts(manifest, tmp_path)
    assert f"nbutils check {tmp_path} --repair" in err.value.fix and "same `nbutils run` command" in err.value.fix
    top.write_bytes(data[: len(data) // 2])  # truncated: loading it names the file too
    with pytest.raises(UserError, match="top_acts.npy is truncated or damaged"):
        RecordStore(store.path).record(1, 0)


def test_neuron_that_never_activates():
    zeros = [Excerpt(["a", "b"], np.zeros(2), index=i) for i in range(8)]
    rec = UnitRecord(UnitId(0, 0), zeros, zeros[:3], [zeros[:1]], [(0.0, 0.5)], [0.0, 0.0], 0, 0, 0, 0, 0.0, 0.0)
    entry = explain_unit(rec, llm=None)  # no LLM is needed to see there is nothing to explain
    assert entry.explanation is None and "never activates" in entry.failure and not entry.retryable
    m = score([np.zeros(4)], [np.arange(4.0)]).correlation
    assert m.value is None and "constant" in m.reason


def test_the_viewer_and_report_default_finds_the_newest_run_or_says_how_to_make_one(tmp_path):
    import os

    from nbutils.core.layout import find_run

    outputs = tmp_path / "outputs"
    with pytest.raises(UserError, match=r"no run under .*outputs yet.*nbutils run --preset quick"):
        find_run(outputs / "latest")  # not even an outputs folder
    (outputs / "test-artifacts").mkdir(parents=True)  # a folder without a collection is no run
    with pytest.raises(UserError, match="no folder there holds a 01_collect"):
        find_run(outputs / "latest")
    for age, name in [(300, "run-old"), (100, "run-new"), (200, "interactive")]:
        stage = outputs / name / "01_collect"
        (stage / "layer_000").mkdir(parents=True)
        for p in (stage, stage / "layer_000"):
            os.utime(p, (1e9 - age, 1e9 - age))
    assert find_run(outputs / "latest") == outputs / "run-new"
    assert find_run(outputs / "run-old") == outputs / "run-old"  # a named run is itself
    (outputs / "latest").mkdir()
    assert find_run(outputs / "latest") == outputs / "latest"  # a run that is called "latest" wins
