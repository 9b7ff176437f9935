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


def pytest_collection_modifyitems(items: list) -> None:
    """nbval runs the notebooks with their default parameters. The walkthrough of one unit (00_explore_a_unit)
    reads the run that the stage notebooks 01-05 write with theirs, so it runs after them (a stable sort: the
    rest keep their order). The hook lives here, not in notebooks/, so that ``from conftest import`` in the
    tests keeps meaning this file."""
    items.sort(key=lambda item: Path(str(item.fspath)).name.startswith("00_"))
