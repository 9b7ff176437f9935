"""The token-lookup baseline: an explanation, a simulator and a judge that need no LLM.

It names the tokens with the highest mean activation in a unit's train excerpts; it simulates by predicting
each token's mean train activation (0 for tokens it never saw); it judges a detection item by the largest
such value among the excerpt's tokens and a fuzzing item by the smallest among its marked tokens. Every
unit gets its scores beside the LLM's, so an explanation is always compared with something (Bills et al.
2023 used the same kind of baseline).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from nbutils.core.records import Excerpt
from nbutils.llm.prompts import JudgeItem


def token_table(excerpts: Sequence[Excerpt]) -> dict[str, float]:
    """Mean activation of each distinct token over the excerpts."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in excerpts:
        for tok, act in zip(e.tokens, e.activations):
            sums[tok] += float(act)
            counts[tok] += 1
    return {tok: sums[tok] / counts[tok] for tok in sums}


def token_lookup_explanation(table: dict[str, float], n_tokens: int = 5) -> str:
    """'the tokens "a", "b", ...' for the tokens with the highest mean activation."""
    best = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:n_tokens]
    return "the tokens " + ", ".join(json.dumps(tok) for tok, _ in best)


def token_lookup_simulate(table: dict[str, float], excerpts: Sequence[Excerpt]) -> list[np.ndarray]:
    """Each token's mean train activation (0 for tokens not seen in training)."""
    return [np.array([table.get(t, 0.0) for t in e.tokens], dtype=np.float64) for e in excerpts]


def token_lookup_judge(table: dict[str, float], items: Sequence[JudgeItem]) -> np.ndarray:
    """The baseline's answer per item, in activation units: the largest mean training activation among the
    excerpt's tokens (detection) or the smallest among its marked tokens (fuzzing)."""
    out = []
    for item in items:
        values = [table.get(t, 0.0) for t in item.tokens]
        if item.marked is not None:
            values = [v for v, m in zip(values, item.marked) if m] or [0.0]
        out.append(max(values) if item.marked is None else min(values))
    return np.asarray(out, dtype=np.float64)
