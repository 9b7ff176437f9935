"""Planted neurons: synthetic neurons defined by a rule over tokens, with a known (ground-truth) explanation.

They answer "is my explainer or simulator any good?" before money is spent on a real model. A planted
neuron's activation on each token of an excerpt is whatever its rule says, computed from the excerpt's token
strings (so a rule may look at earlier tokens: the word after a full stop, the depth of parentheses). A set
of planted neurons is wrapped as a one-layer model, `PlantedModel`, whose layer 0 has one neuron per rule at
the hook site ``layers.{layer}.neurons`` (input side); the collector hooks it exactly as it hooks a real
MLP, so the neurons flow through the unchanged pipeline: ``nbutils run -p model=planted -p layers=null``.

Define your own in a few lines, in a Python file holding a list named ``PLANTED``::

    from nbutils.subject.planted import PlantedNeuron, per_token
    PLANTED = [PlantedNeuron("commas", "commas", per_token(lambda toks, i: toks[i].strip() == ","))]

and use ``model="planted:path/to/file.py"``. After editing the file, collect into a new folder (a new run id):
the old collection is refused as made with different settings rather than silently reused. Tokens are those of the tokenizer (default: the embedded
model's), decoded one by one as the collection's vocabulary stores them.

The oracle backend (`nbutils.llm.oracle`) is a simulator and judge that knows every rule: given a
ground-truth explanation it predicts the rule's values exactly (scores 1.0), which checks the scoring path
end to end.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from nbutils.core.errors import UserError
from nbutils.subject.models import EMBEDDED, SubjectModel, load_tokenizer

Rule = Callable[[Sequence[str]], Sequence[float]]
"""Activations (one per token) of an excerpt, from its token strings."""

PREFIX = "planted"


@dataclass(frozen=True)
class PlantedNeuron:
    """A synthetic neuron: a name, its ground-truth explanation (completing "the main thing this neuron does
    is find ..."), and its rule."""

    name: str
    explanation: str
    rule: Rule

    def activations(self, tokens: Sequence[str]) -> np.ndarray:
        """The rule's values on an excerpt, checked to be one finite number per token."""
        values = np.asarray(self.rule(list(tokens)), dtype=np.float32)
        if values.shape != (len(tokens),) or not np.isfinite(values).all():
            raise UserError(
                f"Planted neuron {self.name!r}: its rule returned {values.shape} values for {len(tokens)} tokens "
                "(or non-finite ones).",
                "Make the rule return one finite number per token of the excerpt it is given.",
            )
        return values


def per_token(test: Callable[[Sequence[str], int], float | bool]) -> Rule:
    """A rule from a per-token test ``test(tokens, i)`` (a bool or a number), which may look at earlier tokens."""
    return lambda tokens: [float(test(tokens, i)) for i in range(len(tokens))]


def _word(tok: str) -> str:
    return tok.strip().lower()


def _after_full_stop(tokens: Sequence[str], i: int) -> bool:
    """A word token whose nearest earlier non-blank token ends with a full stop."""
    if not tokens[i].strip()[:1].isalpha():
        return False
    j = i - 1
    while j >= 0 and not tokens[j].strip():
        j -= 1
    return j >= 0 and tokens[j].strip().endswith(".")


def parenthesis_depth(tokens: Sequence[str]) -> list[float]:
    """Per token, how many parentheses are open before it within the excerpt (never below 0)."""
    depth, out = 0, []
    for tok in tokens:
        out.append(float(depth))
        for ch in tok:
            depth = depth + 1 if ch == "(" else max(0, depth - 1) if ch == ")" else depth
    return out


BUILT_IN: tuple[PlantedNeuron, ...] = (
    PlantedNeuron("digits", "digits and numbers", per_token(lambda t, i: any(c.isdigit() for c in t[i]))),
    PlantedNeuron("the", 'the word "the"', per_token(lambda t, i: _word(t[i]) == "the")),
    PlantedNeuron("sentence start", "the first word after a full stop", per_token(_after_full_stop)),
    PlantedNeuron("parentheses", "text inside parentheses, more strongly the more deeply nested", parenthesis_depth),
    PlantedNeuron(
        "capitals", "words that start with a capital letter", per_token(lambda t, i: t[i].strip()[:1].isupper())
    ),
)
"""The default set (``model="planted"``): one rule on a token class, one on a word, two on context."""


class PlantedLayer(torch.nn.Module):
    """One layer whose ``neurons`` module receives the planted activations as input (the hook site)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.neurons = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.neurons.weight.copy_(torch.eye(width))
        self.neurons.weight.requires_grad_(False)


class PlantedModel(torch.nn.Module):
    """A one-layer stand-in for a language model whose layer-0 neurons are the planted rules."""

    def __init__(self, neurons: Sequence[PlantedNeuron], tokenizer: Any) -> None:
        super().__init__()
        if not neurons:
            raise UserError("No planted neurons were given.", "Pass at least one PlantedNeuron.")
        self.planted = tuple(neurons)
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(model_type=PREFIX, num_hidden_layers=1, max_position_embeddings=1 << 20)
        self.layers = torch.nn.ModuleList([PlantedLayer(len(self.planted))])
        self._token = lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))

    def activations(self, tokens: Sequence[str]) -> np.ndarray:
        """[tokens, neurons]: every rule on one excerpt."""
        return np.stack([n.activations(tokens) for n in self.planted], axis=1)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        rows = [self.activations([self._token(int(i)) for i in row]) for row in input_ids.tolist()]
        values = torch.from_numpy(np.stack(rows)).to(self.layers[0].neurons.weight.device)
        return self.layers[0].neurons(values)


def load_planted(spec: str = PREFIX, tokenizer: str = EMBEDDED) -> SubjectModel:
    """A `SubjectModel` of planted neurons: ``"planted"`` (the built-in set) or ``"planted:<file.py>"``."""
    tok = load_tokenizer(tokenizer)
    model = PlantedModel(planted_neurons(spec), tok)
    if spec != PREFIX:  # the collector's fingerprint sees edits to the rule file (no stale collection is reused)
        model.fingerprint = hashlib.sha256(Path(spec[len(PREFIX) + 1 :]).expanduser().read_bytes()).hexdigest()
    return SubjectModel(model=model, tokenizer=tok, spec=spec)


def planted_neurons(spec: str = PREFIX) -> tuple[PlantedNeuron, ...]:
    """The neurons a planted spec names."""
    if spec == PREFIX:
        return BUILT_IN
    if not spec.startswith(PREFIX + ":"):
        raise UserError(f"{spec!r} is not a planted-neuron spec.", "Write 'planted' or 'planted:<file.py>'.")
    path = Path(spec[len(PREFIX) + 1 :]).expanduser()
    if not path.is_file():
        raise UserError(f"Planted-neuron file {path} does not exist.", "Give the path of a .py file defining PLANTED.")
    module_spec = importlib.util.spec_from_file_location(f"planted_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    neurons = getattr(module, "PLANTED", None)
    if not neurons or not all(isinstance(n, PlantedNeuron) for n in neurons):
        raise UserError(
            f"{path} defines no list PLANTED of PlantedNeuron objects.",
            "Add e.g. PLANTED = [PlantedNeuron('commas', 'commas', per_token(lambda t, i: t[i].strip() == ','))], "
            "importing them with: from nbutils.subject.planted import PlantedNeuron, per_token.",
        )
    return tuple(neurons)
