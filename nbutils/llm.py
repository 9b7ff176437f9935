"""Choosing an LLM backend by name: ``local`` (transformers in this process), ``openai`` (any compatible
server), or ``oracle`` (simulates planted neurons from their rules; ``model`` names the planted set)."""

from __future__ import annotations

from nbutils.backends import LocalBackend
from nbutils.cache import RequestCache
from nbutils.errors import UserError
from nbutils.openai_backend import OpenAIBackend
from nbutils.planted import OracleJudge, planted_neurons

BACKENDS = ("local", "openai", "oracle")


def make_backend(
    kind: str = "local",
    model: str = "embedded",
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    simulation: str = "auto",
    cache_path: str | None = None,
) -> LocalBackend | OpenAIBackend | OracleJudge:
    """A backend for explaining and simulating. HTTP backends use the persistent request cache."""
    if kind == "local":
        return LocalBackend(model)
    if kind == "oracle":
        return OracleJudge(planted_neurons("planted" if model == "embedded" else model))
    if kind == "openai":
        cache = None if cache_path == "none" else RequestCache(cache_path)
        return OpenAIBackend(model, base_url=base_url, api_key_env=api_key_env, simulation=simulation, cache=cache)
    raise UserError(f"Unknown LLM backend {kind!r}.", f"Use one of: {', '.join(BACKENDS)}.")
