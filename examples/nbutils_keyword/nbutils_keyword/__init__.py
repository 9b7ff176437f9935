"""An example nbutils extension package: an explainer, a scorer and a unit type, each with its own settings.

nbutils finds them through the entry points in this package's ``pyproject.toml``; each class declares its
settings as a dataclass (``settings_type``), which nbutils checks before any stage runs and records with the
run. Nothing here is imported by nbutils itself.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nbutils.core.results import Candidate
from nbutils.explain.contract import ExplainContext, Explainer
from nbutils.score.contract import Column, Scorer, UnitContext
from nbutils.score.metrics import Metric
from nbutils.subject.sites import NeuronSite, neurons_per_layer, resolve_site
from nbutils.subject.units import UnitType

# ------------------------------------------------------------------------------------------------------------
# An explainer
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeywordSettings:
    n_words: int = 3
    """How many of the unit's strongest tokens the explanation names."""

    def __post_init__(self) -> None:
        if self.n_words < 1:
            raise ValueError("n_words must be at least 1")


class KeywordExplainer(Explainer):
    """Names the tokens at which the unit's train excerpts peak, most frequent first (no LLM)."""

    name = "keyword"
    title = "the tokens a unit peaks on, as quoted words (no LLM)"
    settings_type = KeywordSettings
    uses_llm = False

    def explain(self, ctx: ExplainContext) -> None:
        peaks: Counter[str] = Counter()
        for excerpt in ctx.train:
            acts = np.asarray(excerpt.activations)
            if len(acts) and acts.max() > 0:
                peaks.update(words(excerpt.tokens[int(acts.argmax())]))
        named = [w for w, _ in peaks.most_common(self.settings.n_words)]
        if not named:
            ctx.entry.failure = "no word among the unit's peak tokens"
            return
        text = "the words " + ", ".join(f'"{w}"' for w in named)
        ctx.entry.explanation = text
        ctx.entry.candidates.append(Candidate(text, text))


# ------------------------------------------------------------------------------------------------------------
# A scorer
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeywordScorerSettings:
    min_fraction: float = 0.5
    """A held-out token counts as a firing where its activation is at least this fraction of the largest."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError("min_fraction must be in (0, 1]")


@dataclass
class KeywordResult:
    recall: Metric
    """Of the held-out firing tokens, the fraction whose word the explanation names in quotes."""
    firing_tokens: int
    min_fraction: float
    """The setting this result was computed with."""


def words(token: str) -> list[str]:
    """A token's word, lower case, without spaces and punctuation ([] for none)."""
    return re.findall(r"[a-z0-9_]+", token.lower())[:1]


def named_words(explanation: str) -> set[str]:
    """The words an explanation names in double quotes."""
    return {w for quoted in re.findall(r'"([^"]*)"', explanation) for w in words(quoted)}


class KeywordScorer(Scorer):
    """Recall of the unit's held-out firing tokens by the words the explanation quotes (no LLM)."""

    name = "keyword"
    title = "keyword recall: held-out firing tokens the explanation names"
    label_prefix = "keyword"
    result_type = KeywordResult
    settings_type = KeywordScorerSettings
    columns = (Column("recall", ("recall",)),)

    def _score(self, ctx: UnitContext, explanation: str) -> KeywordResult:
        held_out = [e for name, es in ctx.splits.items() if name.startswith("valid") for e in es]
        values = np.concatenate([e.activations for e in held_out]) if held_out else np.zeros(0)
        top = float(values.max()) if len(values) else 0.0
        firing = [
            w for e in held_out for t, v in zip(e.tokens, e.activations)
            if top > 0 and v >= self.settings.min_fraction * top for w in words(t)[:1] or [""]
        ]  # fmt: skip
        if not firing:
            return KeywordResult(Metric(None, "no held-out token fires"), 0, self.settings.min_fraction)
        named = named_words(explanation)
        return KeywordResult(
            Metric(sum(w in named for w in firing) / len(firing)), len(firing), self.settings.min_fraction
        )

    def baseline(self, ctx: UnitContext) -> KeywordResult | None:
        base = ctx.entry.baseline
        return self._score(ctx, base.explanation) if base is not None else None

    def explanation(self, ctx: UnitContext, llm: Any) -> tuple[KeywordResult, None]:
        return self._score(ctx, ctx.entry.explanation or ""), None


# ------------------------------------------------------------------------------------------------------------
# A unit type
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrideSettings:
    stride: int = 2
    """Every ``stride``-th MLP neuron of a layer is a unit (unit i is neuron i * stride)."""

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError("stride must be at least 1")


class StridedNeurons(UnitType):
    """Every ``stride``-th MLP neuron, read at the architecture's own neuron site."""

    kind = "strided_neurons"
    noun = "neuron"
    settings_type = StrideSettings

    def site(self, model: Any) -> NeuronSite:
        return resolve_site(model, None)

    def width(self, model: Any) -> int:
        return -(-neurons_per_layer(model, self.site(model)) // self.settings.stride)

    def transform(self, captured: torch.Tensor, layer: int) -> torch.Tensor:
        return captured[..., :: self.settings.stride]

    def edit(
        self, captured: torch.Tensor, layer: int, index: int, values: torch.Tensor | float, add: bool = False
    ) -> torch.Tensor:
        return super().edit(captured, layer, index * self.settings.stride, values, add)
