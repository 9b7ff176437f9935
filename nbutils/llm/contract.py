"""The contract every LLM backend keeps, and the registry that makes one by name.

A backend answers three structured requests and renders their prompts itself (the shared text is in
`nbutils.llm.prompts`), fitting as many worked examples as its context allows:

- `Backend.explain` (`ExplainRequest`: a unit's excerpts on the 0..10 scale) -> raw replies that continue the
  explanation prefix;
- `Backend.simulate` (`SimulationRequest`: an explanation and excerpts' tokens) -> per excerpt a
  ``[tokens, 11]`` array of label probabilities;
- `Backend.judge` (`JudgeRequest`: a detection or fuzzing task, an explanation, items) -> `Judgements`.

It counts what it sends in ``usage`` and raises `LLMFailed` for a server fault that outlasted its retries
(retried when the stage is rerun) or `SimulationFailed` for a reply that holds nothing usable (the model's
doing; not retried). Adding a backend is one module with a `Backend` subclass and one line in `BACKENDS`
(or a call to `register_backend`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.core.registry import Registry
from nbutils.core.usage import Usage
from nbutils.llm.prompts import (
    WORKED_EXAMPLES,
    JudgeItem,
    ShownExcerpt,
    WorkedExample,
    explanation_messages,
    fit_examples,
    judge_piece,
    judge_prefix,
    simulation_prefix,
)


class LLMFailed(Exception):
    """An LLM call that gave no usable reply; the message says why.

    Stages record it as the unit's failure and carry on with the other units. ``retryable``: a server fault
    that outlasted the retries (a rerun tries again), as opposed to an unusable reply from the model.
    """

    retryable = True

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SimulationFailed(LLMFailed):
    """A reply that held no usable answer (the model's doing, so not retried on rerun)."""

    retryable = False


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplainRequest:
    """Explain one unit from its excerpts (values on the 0..10 scale); ``n`` candidate replies."""

    excerpts: tuple[ShownExcerpt, ...]
    n: int = 1
    temperature: float = 1.0
    seed: int = 0
    examples: tuple[WorkedExample, ...] = WORKED_EXAMPLES
    writes: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    """For the output-aware explainer: the tokens the unit raises and lowers as the next token."""
    noun: str = "neuron"
    """What the prompt calls the unit ("feature" for SAE latents; `nbutils.llm.prompts.speak_of`)."""
    rule: str | None = None
    """With ``explain_with_rules``: the rule the rules explainer found, listed after the activations."""
    pairs: tuple[tuple[str, str, int], ...] | None = None
    """For attention heads: (token, the token it attends to most, the head's 0..10 value there), strongest
    first (`nbutils.llm.prompts.pairs_text`)."""


@dataclass(frozen=True)
class SimulationRequest:
    """Predict a unit's 0..10 value at every token of each excerpt from its explanation alone."""

    explanation: str
    excerpts: tuple[tuple[str, ...], ...]
    max_prompt_tokens: int | None = None
    """A cap on the prompt below the context (fewer worked examples, cheaper requests)."""
    examples: tuple[WorkedExample, ...] = WORKED_EXAMPLES
    noun: str = "neuron"


@dataclass(frozen=True)
class JudgeRequest:
    """Answer yes/no for each item: does the unit fire in it (detection), are its marked tokens the ones the
    explanation describes (fuzzing)?"""

    task: str
    explanation: str
    items: tuple[JudgeItem, ...]
    max_prompt_tokens: int | None = None
    examples: tuple[WorkedExample, ...] = WORKED_EXAMPLES
    per_request: int = 1
    """Items shown in one chat request (HTTP backends in chat mode); backends that answer each item from its
    own prompt at no cost per request (local, oracle) judge one item at a time whatever this says."""
    noun: str = "neuron"


@dataclass
class Judgements:
    """P(yes) per item (NaN where a reply held no answer), and whether they are probabilities (else hard 0/1
    answers, with which AUROC does not exist)."""

    p_yes: np.ndarray
    probabilities: bool = True


# ----------------------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSpec:
    """How to make a backend: its kind (a name in `BACKENDS`), the model, and where it is served."""

    kind: str = "local"
    model: str = "embedded"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    simulation_mode: str = "auto"
    cache_path: str | None = None
    max_in_flight: int = 64
    """HTTP backends: requests in flight at once, across all units in progress."""
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    settings: Any = None
    """The backend's own settings (its ``settings_type``: ``-p backend.<kind>.<setting>=...``), or None."""


class Backend(ABC):
    """An LLM that explains, simulates and judges (see the module docstring)."""

    name: ClassVar[str]
    context: int = 8192
    usage: Usage
    parallel_units: int = 1
    """How many units a stage keeps in progress at once with this backend (threads). 1 for a backend that
    computes in this process (the local model already uses every core); an HTTP backend says enough to fill
    its cap on requests in flight."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: BackendSpec) -> Backend: ...

    @classmethod
    def for_entry(cls, entry: Any) -> Backend:
        """The backend that simulates one stage-02 entry exactly, for a backend an explainer names on its
        entries (`nbutils.core.results.ExplanationEntry.simulator`; e.g. the rules simulator of the entry's rule)."""
        raise UserError(
            f"The {cls.name!r} backend cannot simulate an entry on its own, yet an explainer named it as the "
            "entry's exact simulator.",
            "Give the backend a for_entry classmethod, or leave ExplanationEntry.simulator None in the explainer.",
        )

    @abstractmethod
    def explain(self, request: ExplainRequest) -> list[str]: ...

    @abstractmethod
    def simulate(self, request: SimulationRequest) -> list[np.ndarray]: ...

    @abstractmethod
    def judge(self, request: JudgeRequest) -> Judgements: ...

    def count_tokens(self, text: str) -> int:
        return len(text) // 3 + 1  # a conservative estimate where the tokenizer is unknown

    def fit(
        self, render: Callable[[Sequence[WorkedExample]], str], reserve: int, examples: Sequence[WorkedExample],
        cap: int | None = None,
    ) -> tuple[WorkedExample, ...]:  # fmt: skip
        """The worked examples that leave ``reserve`` tokens free in the context (or under ``cap``)."""
        limit = min(self.context, cap or self.context)
        return fit_examples(lambda ex: self.count_tokens(render(ex)) + reserve, limit, examples)

    def explanation_messages(self, request: ExplainRequest) -> list[dict[str, str]]:
        """The explainer's chat, with as many worked examples as fit (120 tokens left for the reply)."""
        made: dict[tuple[WorkedExample, ...], list[dict[str, str]]] = {}  # each candidate rendered once

        def render(ex: Sequence[WorkedExample]) -> str:
            made[tuple(ex)] = explanation_messages(
                request.excerpts, ex, request.writes, request.noun, request.rule, request.pairs
            )
            return "".join(m["content"] for m in made[tuple(ex)])

        return made[self.fit(render, 120, request.examples)]

    def simulation_examples(self, request: SimulationRequest) -> tuple[WorkedExample, ...]:
        """The worked examples of a simulation prompt that leave room for its longest excerpt."""
        longest = max(len(tokens) for tokens in request.excerpts) * 8  # generous tokens per line + branch tokens
        return self.fit(
            lambda ex: simulation_prefix(request.explanation, ex, request.noun),
            longest,
            request.examples,
            request.max_prompt_tokens,
        )

    def judge_examples(self, request: JudgeRequest) -> tuple[WorkedExample, ...]:
        """The worked examples of a judging prompt that leave room for its longest item."""
        longest = max(self.count_tokens(judge_piece(i)) for i in request.items) + 4
        return self.fit(
            lambda ex: judge_prefix(request.task, request.explanation, ex, request.noun), longest, request.examples,
            request.max_prompt_tokens,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------

BACKENDS = Registry(
    "LLM backend",
    {
        "local": "nbutils.llm.local:LocalBackend",
        "openai": "nbutils.llm.openai_compat:OpenAIBackend",
        "oracle": "nbutils.llm.oracle:OracleBackend",
        "rules": "nbutils.llm.rule_language:RulesSimulator",  # no LLM: a rule's text, simulated exactly
    },
    role="backend",
)
"""Backends by name: a class, or ``"module:Class"`` imported when first asked for."""


def register_backend(name: str, backend: str | type[Backend]) -> None:
    """Make a backend available by name (to `make_backend`, the stages and the command line)."""
    BACKENDS[name] = backend


def traffic_options(config: RunConfig) -> dict[str, Any]:
    """The request cap and rate limits a run config (`nbutils.core.config.RunConfig`) gives its backends."""
    return {
        "max_in_flight": config.max_in_flight,
        "requests_per_minute": config.requests_per_minute,
        "tokens_per_minute": config.tokens_per_minute,
    }


def backend_spec(config: RunConfig, role: str, cache_path: str | None = None) -> BackendSpec:
    """The backend a run's parameters give the ``"explainer"`` or the ``"simulator"`` (its ``<role>_backend``,
    ``<role>_model`` ... parameters, by name), with its own settings where its class declares them."""
    kind = getattr(config, f"{role}_backend")
    return BackendSpec(
        kind=kind, model=getattr(config, f"{role}_model"), base_url=getattr(config, f"{role}_base_url"),
        api_key_env=getattr(config, f"{role}_api_key_env"),
        simulation_mode=config.simulation_mode if role == "simulator" else "auto", cache_path=cache_path,
        settings=BACKENDS.settings(kind, config.extension_settings.get("backend")), **traffic_options(config),
    )  # fmt: skip


def make_backend(spec: BackendSpec) -> Backend:
    """A backend for explaining, simulating and judging, made from its spec."""
    return BACKENDS.resolve(spec.kind).from_spec(spec)
