"""Everything checked before any stage runs: each careless input is refused in seconds, without loading
weights, with a fix that, applied, is accepted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import typing

import numpy as np
import pytest
from servers import free_port

from nbutils.core.config import COLLECT, EXPLAIN, SCORE, defaults, hints
from nbutils.core.errors import UserError
from nbutils.run.pipeline import effective_parameters, parse_value
from nbutils.run.preflight import MINIMUM, model_layers, preflight

ALL = [COLLECT, EXPLAIN, SCORE]


def check(params: dict, cwd) -> None:
    preflight(effective_parameters(params, cwd=cwd), ALL)


def suggested(fix: str) -> dict:
    """The parameters a fix's first alternative sets (``-p name=value`` before its first " or "), else its
    first ``-p name=value``."""
    pair = r"-p (?:'(\w+)=([^']+)'|(\w+)=(\S+?))(?=[\s,;)]|\.?$|\.\s)"
    found = re.findall(pair, fix.split(" or ")[0]) or re.findall(pair, fix)[:1]
    assert found, f"the fix names no value to set: {fix}"
    return {q or n: parse_value(qv or v) for q, qv, n, v in found}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty_sae").mkdir()
    (tmp_path / "texts.jsonl").write_text(json.dumps({"body": "The meeting moved to March.", "id": 3}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    return tmp_path


# each careless input of the issue, the words its message must hold, and (where the fix is not a -p value)
# the parameters that carry out its fix
CASES = [
    ({"n_excerpts": 0}, "n_excerpts=0 is below its least value, 1", None),
    ({"n_excerpts": -5}, "n_excerpts=-5 is below its least value, 1", None),
    ({"units": "empty_sae"}, "an empty folder", None),
    ({"corpus": "/bin/ls"}, "is a binary file, not text", None),
    ({"corpus": "empty.txt"}, "is empty", None),
    ({"corpus": "texts.jsonl"}, "has no 'text' field (its fields: ['body', 'id'])", None),
    ({"layers": [-1]}, "layer -1 does not exist; the model's layers are 0..29; the last is 29", None),
    ({"layers": [999]}, "layer 999 does not exist", None),
    ({"neurons": [0, 5000]}, "neuron 5000 does not exist; each MLP layer of embedded has 1536 neurons", None),
    ({"neurons": [-1]}, "neuron -1 does not exist", None),
    (
        {"top_k": 100000, "n_excerpts": 8},
        "Parameters top_k=100000 and n_random=20 ask for more excerpts per unit",
        None,
    ),
    ({"n_random": 50, "n_excerpts": 30}, "n_random=50 asks for more excerpts", None),
    ({"top_k": 100000, "n_excerpts": None}, "The collector's state would take about", None),  # all excerpts
]


@pytest.mark.parametrize("bad, words, _", CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_each_careless_input_is_refused_and_its_fix_is_accepted(bad, words, _, files):
    with pytest.raises(UserError) as err:
        check(bad, files)
    assert words in str(err.value)
    check({**bad, **suggested(err.value.fix)}, files)  # the fix, applied, passes


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_every_number_below_its_range_is_refused_with_a_fix_that_passes(name, files):
    least = MINIMUM[name]
    value = least - 1 if int in typing.get_args(hints()[name]) or hints()[name] is int else least - 0.5
    with pytest.raises(UserError, match=rf"Parameter {name}=\S+ is below its least value") as err:
        check({name: value}, files)
    check(suggested(err.value.fix), files)


def test_a_wrong_type_is_refused_for_every_parameter(files):
    for name, value in defaults().items():
        wrong = [1, 2] if not isinstance(value, list) else "x"
        if name in ("layers", "neurons", "explain_neurons", "scorers", "simulator_base_url", "explainer_base_url"):
            wrong = {"a": 1}
        with pytest.raises(UserError, match=rf"Parameter {name}="):
            check({name: wrong}, files)


def test_the_layer_count_is_read_from_config_alone(tmp_path):
    from conftest import tiny_model

    assert model_layers("embedded") == 30  # from the GGUF file's metadata
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    assert model_layers(str(tmp_path / "gpt2")) == 3
    with pytest.raises(UserError, match=r"layer 3 does not exist; the model's layers are 0..2"):
        check({"model": str(tmp_path / "gpt2"), "layers": [0, 3]}, tmp_path)
    assert model_layers("planted") is None


def test_http_backends_need_a_key_or_a_server_that_answers(llama_server, files, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="environment variable OPENAI_API_KEY is not set") as err:
        check({"explainer_backend": "openai"}, files)
    assert "explainer_base_url" in err.value.fix
    dead = "http://127.0.0.1:9/v1"
    for role in ("explainer", "simulator"):
        with pytest.raises(UserError, match=rf"Nothing answers at {re.escape(dead)} \({role}_base_url\)") as err:
            check({f"{role}_backend": "openai", f"{role}_base_url": dead}, files)
        assert f"-p {role}_base_url=" in err.value.fix
        check({f"{role}_backend": "openai", f"{role}_base_url": llama_server}, files)  # the fix: a running server
    with pytest.raises(UserError, match=r"Nothing answers at .*simulator_base_url"):
        check({"simulator_backend": "openai", "simulator_base_url": [llama_server, dead]}, files)  # every server


def test_the_command_refuses_before_any_model_loads_in_seconds_with_one_paragraph(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    offline = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(tmp_path / "hub")}
    for bad in (
        ["-p", "n_excerpts=0"],
        ["-p", "layers=[999]"],
        ["-p", "explainer_backend=openai"],
        ["-p", "model=gpt2"],
    ):
        started = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "nbutils", "run", *bad], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120, env=offline)  # fmt: skip
        took = time.monotonic() - started
        assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
        assert "Fix:" in res.stderr and not (tmp_path / "outputs").exists(), (bad, took)  # nothing started


def test_a_hub_model_is_refused_up_front_unless_cached_or_on_a_hub_that_answers(files, monkeypatch):
    """A Hugging Face id the machine cannot load offline is refused in seconds (the hub asked once, with a
    short timeout), never after a minute of the hub client's retries; a cached one needs no hub."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from huggingface_hub import constants

    asked = []

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the http.server API
            asked.append(self.path)
            self.send_response(200 if self.path == "/api/models/owner/there" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    hub = HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(files / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
        check({"model": "owner/there"}, files)  # on the hub: stage 01 downloads it
        with pytest.raises(UserError, match=r"model='owner/missing' is a Hugging Face model id that is not in the "
                           r"local cache .* has no model of that name .*\(HTTP 404\)") as e:  # fmt: skip
            check({"model": "owner/missing"}, files)
        assert "-p model=embedded" in e.value.fix
        with pytest.raises(UserError, match=r"explainer_model='owner/missing' .* has no model"):
            check({"explainer_backend": "local", "explainer_model": "owner/missing"}, files)
        assert asked == ["/api/models/owner/there", "/api/models/owner/missing", "/api/models/owner/missing"]
    finally:
        hub.shutdown()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens: offline
    started = time.monotonic()
    with pytest.raises(UserError, match=r"model='gpt2' .* cannot be reached") as e:
        check({"model": "gpt2"}, files)
    assert time.monotonic() - started < 5
    check(suggested(e.value.fix), files)  # the fix (the embedded model) is accepted
    with pytest.raises(UserError, match="neither a local file or folder nor a Hugging Face model id"):
        check({"model": "owner/na me"}, files)
    snapshot = files / "hub-cache" / "models--owner--cached" / "snapshots" / "abc123"  # the hub client's cache layout
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "intermediate_size": 8}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    check({"model": "owner/cached"}, files)  # cached: no hub needed
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check({"model": "owner/cached"}, files)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        check({"model": "gpt2"}, files)


def test_the_collectors_memory_is_estimated_from_the_config_and_checked_against_what_is_available(files):
    from nbutils.collect.collector import CollectConfig, Collector
    from nbutils.run.preflight import check_memory, collector_bytes_per_unit

    values = effective_parameters({"n_excerpts": 64, "excerpt_len": 16, "top_k": 6, "n_random": 5, "band_size": 2})
    state = Collector(64, 16, {0: np.arange(100)}, CollectConfig(top_k=6, n_random=5, band_size=2), signed=True)
    real = sum(v.nbytes for v in state.layers[0].t.values()) / 100  # the real state's bytes per unit
    assert real <= collector_bytes_per_unit(values) <= real * 1.2
    need = 5 * 1536 * collector_bytes_per_unit(values)  # the default five layers of the embedded model
    check_memory(values, available=int(2.1 * need))  # fits in half
    with pytest.raises(UserError, match=r"more than half the .* GiB of memory available") as err:
        check_memory(values, available=int(1.5 * need))
    fixed = {**values, **suggested(err.value.fix)}
    assert fixed["top_k"] < 6
    check_memory(fixed, available=int(1.5 * need))
