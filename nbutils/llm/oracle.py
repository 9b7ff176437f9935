"""The oracle backend: a simulator and judge that knows the rules of planted neurons (`nbutils.subject.planted`).

Given an explanation that is some planted neuron's ground truth it answers perfectly, so the ground truth
scores 1.0 and the scoring path is checked end to end; for an explanation it does not know it raises
`SimulationFailed`, so it is never scored by accident. ``model`` (in its spec) names the planted set:
"planted" (or "embedded") for the built-in one, or "planted:<file.py>".

- Simulation: each token's rule value (clipped to 0..10) as a distribution over the labels with that
  expected value.
- Detection: yes if any token's rule value is positive. Fuzzing: yes if every marked token's is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from nbutils.core.errors import UserError
from nbutils.llm.contract import (
    Backend,
    BackendSpec,
    ExplainRequest,
    Judgements,
    JudgeRequest,
    SimulationFailed,
    SimulationRequest,
    Usage,
)
from nbutils.llm.prompts import LABELS, MAX_LABEL
from nbutils.subject.planted import BUILT_IN, PREFIX, PlantedNeuron, planted_neurons


class OracleBackend(Backend):
    """Answers like a perfect simulator and judge for planted neurons' ground-truth explanations."""

    name = "oracle"
    context = 1 << 20

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> OracleBackend:
        return cls(planted_neurons(PREFIX if spec.model == "embedded" else spec.model))

    def __init__(self, neurons: Sequence[PlantedNeuron] = BUILT_IN) -> None:
        self.by_explanation = {_norm(n.explanation): n for n in neurons}
        self.model_name = "oracle"
        self.usage = Usage()

    def _neuron(self, explanation: str) -> PlantedNeuron:
        neuron = self.by_explanation.get(_norm(explanation))
        if neuron is None:
            raise SimulationFailed(f"the oracle knows no planted neuron explained as {explanation!r}")
        return neuron

    def explain(self, request: ExplainRequest) -> list[str]:
        raise UserError("The oracle only simulates and judges.", "Explain with a real LLM backend.")

    def simulate(self, request: SimulationRequest) -> list[np.ndarray]:
        neuron = self._neuron(request.explanation)
        return [
            two_point_distribution(np.clip(neuron.activations(tokens), 0, MAX_LABEL)) for tokens in request.excerpts
        ]

    def judge(self, request: JudgeRequest) -> Judgements:
        neuron = self._neuron(request.explanation)
        out = []
        for item in request.items:
            on = neuron.activations(item.tokens) > 0
            out.append(float(on.any() if item.marked is None else all(o for o, m in zip(on, item.marked) if m)))
        return Judgements(np.array(out))


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip(".").lower()


def two_point_distribution(values: np.ndarray) -> np.ndarray:
    """[tokens, 11] two-point distributions over the labels 0..10 whose expected values are ``values``."""
    out = np.zeros((len(values), len(LABELS)))
    low = np.floor(values).astype(int)
    frac = values - low
    out[np.arange(len(values)), low] = 1 - frac
    high = np.minimum(low + 1, MAX_LABEL)
    out[np.arange(len(values)), high] += frac
    return out
