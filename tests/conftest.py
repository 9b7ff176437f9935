"""Shared fixtures: tiny random-initialised models of each supported architecture and the embedded model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_config(arch: str, vocab_size: int = 512):
    """A small random config per architecture (2-3 layers, hidden 32)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, max_position_embeddings=128)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_inner=80, n_positions=128, vocab_size=vocab_size)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, **common
        )
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=8, hidden_act="gelu_pytorch_tanh", **llama_like)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=8, **llama_like)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=8, **llama_like)
    if arch == "opt":  # not built in: used to test hand-named sites
        return tf.OPTConfig(
            hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=32, **common
        )
    raise KeyError(arch)


ARCHS = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"]


def tiny_model(arch: str, vocab_size: int = 512, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32)
    with torch.no_grad():  # random init leaves norms at 1 and many tiny weights; widen for livelier activations
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
    return model.eval()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer alone (real tokens for tiny random models; fast tier). The first use on a
    machine converts the GGUF once (about 40 s), as any first run does; later ones take about a second."""
    from nbutils.subject.models import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def embedded():
    from nbutils.subject.loading import load_subject_model

    return load_subject_model("embedded")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on localhost with the embedded GGUF, one per test module.

    Per module, not per run: the server answers one request at a time and still computes requests whose
    client gave up (a killed run, a fault test's timeout), so a shared one can reach the next module with a
    queue that outlasts that module's timeouts.

    It must answer one real completion before any test uses it: a build with CPU instructions this machine
    cannot run (AMX from a native build) answers /v1/models and dies on the first matrix product, and that
    fails here once, naming the cause and the fix, instead of as a connection error in every test."""
    from servers import free_port, llama_server_command, start_server

    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "llama.log"
    try:
        proc, url = start_server(llama_server_command(port), port, log, probe=True)
    except Exception as e:  # a UserError naming the cause, with the log's last lines
        pytest.fail(f"llama.cpp's server could not serve: {e}", pytrace=False)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # still busy with queued requests
        proc.kill()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """`bench/stand_in_api.py` in its own process: an OpenAI-compatible server that answers after 0.25 s with
    replies made from the request (the same reply for the same request); ``/stats`` and ``/reset`` count what
    it served. bench/throughput.py is loaded by its path: bench/ on sys.path would let a bench script shadow an
    installed package (bench/llama_cpp.py once hid llama_cpp from every test collected after it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_throughput", Path(__file__).resolve().parent.parent / "bench" / "throughput.py"
    )
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    proc, url = throughput.start_stand_in(0.25, tmp_path_factory.mktemp("stand_in") / "log.txt")
    yield url
    proc.kill()


# The two tiers (docs/testing.md). A test is in the slow tier when it loads the embedded model, starts a server,
# Ray, JupyterLab or a browser, runs a notebook or a whole `nbutils run`: either it reaches one of these fixtures
# (directly or through another fixture, which `item.fixturenames` includes), or it is a notebook cell, or it
# carries `@pytest.mark.slow` itself. `python -m pytest -m "not slow"` is the fast tier; the guards installed by
# `pytest_configure` below fail a fast-tier test that does one of these things without the marker.
SLOW_FIXTURES = frozenset({"embedded", "llama_server", "chat_only_server", "ray_instance", "stand_in", "small_run"})


def is_slow(item) -> bool:
    return (
        item.get_closest_marker("slow") is not None
        or item.path.suffix == ".ipynb"
        or bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))
    )


def pytest_collection_modifyitems(items: list) -> None:
    """Marks the slow tier (above). nbval runs the notebooks with their default parameters; the walkthrough of
    one unit (00_explore_a_unit) reads the run that the stage notebooks 01-05 write with theirs, so it runs after
    them (a stable sort: the rest keep their order). The hook lives here, not in notebooks/, so that
    ``from conftest import`` in the tests keeps meaning this file."""
    for item in items:
        if is_slow(item):  # a second slow marker on a marked test changes nothing
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.path.name.startswith("00_"))


def _slow_command(args) -> str | None:
    """What a command line starts that belongs in the slow tier, or None."""
    argv = [str(a) for a in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
    line = " ".join(argv)
    for what in ("llama_cpp.server", "llamacpp_server", "jupyter", "chromium", "chromedriver", "transformers serve"):
        if what in line:
            return what
    if any(Path(a).parent.name == "bench" and a.endswith(".py") for a in argv):
        return "a benchmark"
    return None


_running: list = [None]  # the test whose set-up, call or tear-down runs now


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    try:
        return (yield)
    finally:
        _running[0] = None


def _refuse_in_fast_tier(what: str) -> None:
    item = _running[0]
    if item is not None and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} {what}: mark it @pytest.mark.slow (docs/testing.md)", pytrace=False)


def pytest_configure(config) -> None:
    """In a test of the fast tier (its set-up included, so module fixtures too), loading the embedded model (any
    GGUF model), starting Ray, a llama.cpp server, a browser, JupyterLab or a benchmark fails at once, naming the
    marker to add: the fast tier stays fast by construction, not by review."""
    import nbutils.subject.loading as loading

    load = loading.load_hf_model

    def guarded_load(spec="embedded", *args, **kwargs):
        gguf = str(spec).endswith(".gguf") and Path(spec).is_file()
        if spec == "embedded" or gguf:  # the tokenizer alone (`load_tokenizer`) is allowed
            _refuse_in_fast_tier("loads the embedded model (or another GGUF model)")
        return load(spec, *args, **kwargs)

    loading.load_hf_model = guarded_load
    popen_init = subprocess.Popen.__init__

    def guarded_popen(self, args, *rest, **kwargs):
        what = _slow_command(args)
        if what:
            _refuse_in_fast_tier(f"starts {what}")
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded_popen
    try:
        import ray
    except ImportError:
        return
    ray_init = ray.init

    def guarded_init(*args, **kwargs):
        _refuse_in_fast_tier("starts Ray")
        return ray_init(*args, **kwargs)

    ray.init = guarded_init
