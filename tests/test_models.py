"""Subject model loading: embedded default, GGUF conversion cache (atomic under concurrency), folders, hub ids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nbutils.core.errors import UserError
from nbutils.core.layout import cache_dir
from nbutils.subject.loading import load_subject_model
from nbutils.subject.models import embedded_gguf_path


def test_embedded_is_smollm2(embedded):
    cfg = embedded.model.config
    assert embedded.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size) == (30, 1536, 576)
    ids = embedded.tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert embedded.tokenizer.decode(ids) == "Hello world"


def test_cache_folder_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NBUTILS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


USER_ENV = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # as a user runs it
CONVERT = (
    "from nbutils.subject.models import convert_gguf, embedded_gguf_path; print(convert_gguf(embedded_gguf_path()))"
)


@pytest.mark.slow
def test_two_processes_converting_at_once_leave_one_good_cache(tmp_path):
    env = {**os.environ, "NBUTILS_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert any("nbutils: converting SmolLM2-135M-Instruct.Q4_1.gguf" in o[1] for o in outs)  # announced
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(folders) == 1
    entries = list((tmp_path / "models").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary folder left behind
    # the converted copy loads as a local folder, and the .gguf path maps to the same cache
    os.environ["NBUTILS_CACHE"] = str(tmp_path)
    try:
        from_folder = load_subject_model(folders.pop())
        from_gguf = load_subject_model(str(embedded_gguf_path()))
    finally:
        os.environ.pop("NBUTILS_CACHE")
    assert from_folder.model.config.num_hidden_layers == from_gguf.model.config.num_hidden_layers == 30


def test_unknown_model_offline_and_bad_paths(tmp_path):
    with pytest.raises(UserError, match="Could not load model 'no-such-org/no-such-model'"):
        load_subject_model("no-such-org/no-such-model")
    with pytest.raises(UserError, match="does not exist"):
        load_subject_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        load_subject_model(str(tmp_path))
    for path in ("./no-such-folder", str(tmp_path / "a" / "b"), "../x/y/z"):  # clearly paths, not hub ids
        with pytest.raises(UserError, match=r"Model path .* does not exist"):
            load_subject_model(path)


def test_loading_the_embedded_model_prints_no_tokenizer_warning(embedded):
    res = subprocess.run(
        [sys.executable, "-c", "from nbutils.subject.loading import load_subject_model as m; m('embedded')"],
        capture_output=True, text=True, timeout=300, env=USER_ENV,
    )  # fmt: skip
    assert res.returncode == 0 and "legacy" not in res.stderr, res.stderr[-2000:]
