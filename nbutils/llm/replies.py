"""Reading an OpenAI-compatible server's replies (`nbutils.llm.openai_compat`): label distributions from
top log-probabilities, per-token values written in a chat reply aligned to the excerpt's tokens, and P(yes)
from a judge's answer."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from nbutils.llm.contract import SimulationFailed
from nbutils.llm.prompts import LABELS


def yes_probability(probs: dict[str, float]) -> float:
    """P("1") / (P("1") + P("0")) from token probabilities (tokens compared without spaces); NaN if neither."""
    yes = sum(p for tok, p in probs.items() if tok.strip() == "1")
    no = sum(p for tok, p in probs.items() if tok.strip() == "0")
    return yes / (yes + no) if yes + no > 0 else math.nan


def label_distribution(reply_tokens: list[dict[str, Any]], content: str, start: int) -> np.ndarray | None:
    """Probabilities of the labels 0..10 for the value written at character ``start`` of a chat reply.

    Reads the ``top_logprobs`` of the reply token that holds that character: each alternative that matches
    the chosen token up to ``start`` and then spells a label counts for that label. "10" written as "1", "0"
    is split exactly with the next token's log-probabilities: P(10) = P("1") P("0" | "1").
    Returns None where the reply has no usable log-probabilities (the caller keeps the one-hot value).
    """
    if not reply_tokens or "".join(t.get("token", "") for t in reply_tokens) != content:
        return None
    ends = np.cumsum([len(t.get("token", "")) for t in reply_tokens])
    i = int(np.searchsorted(ends, start, side="right"))  # the token whose span holds character `start`
    if i >= len(reply_tokens):
        return None
    tok, text = reply_tokens[i], reply_tokens[i].get("token", "")
    pos = int(ends[i]) - len(text)
    lead = text[: start - pos]  # e.g. the tab before the number, when the token holds both
    probs = np.zeros(len(LABELS))
    for alt in tok.get("top_logprobs") or []:
        alt_text = alt.get("token", "")
        rest = alt_text[len(lead) :].strip() if alt_text.startswith(lead) else None
        if rest in LABELS:
            probs[LABELS.index(rest)] += math.exp(alt.get("logprob", -math.inf))
    chosen = text[len(lead) :].strip()
    if chosen == "1" and i + 1 < len(reply_tokens) and probs[1] > 0:
        nxt = {a.get("token", ""): a.get("logprob", -math.inf) for a in reply_tokens[i + 1].get("top_logprobs") or []}
        p_zero = math.exp(nxt["0"]) if "0" in nxt else 0.0
        probs[10] += probs[1] * p_zero
        probs[1] *= 1 - p_zero
    if probs.sum() <= 0:
        return None
    return probs / probs.sum()


_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*$")


def parse_value_lines(reply: str, tokens: Sequence[str], with_offsets: bool = False) -> Any:
    """Integer values 0..10 per token from a reply of ``token<TAB>value`` lines, aligned to the tokens.

    Tolerates code fences, ``<start>``/``<end>`` markers, blank lines and spaces instead of tabs; values are
    rounded and clipped to 0..10. Raises SimulationFailed when the lines cannot be matched to the tokens.
    With ``with_offsets``, also returns where in the reply each value starts (to find its log-probabilities).
    """
    rows, pos = [], 0
    for line in reply.split("\n"):
        begin, pos = pos, pos + len(line) + 1
        line = line.rstrip("\r")
        if not line.strip() or line.strip() in ("<start>", "<end>") or line.strip().startswith("```"):
            continue
        m = _NUMBER.search(line)
        if m is None:
            continue
        rows.append((line[: m.start()].rstrip("\t "), float(m.group(1)), begin + m.start(1)))
    if len(rows) != len(tokens):
        # try to align by token text: keep the rows whose text matches the next expected token
        aligned, k = [], 0
        for row in rows:
            if k < len(tokens) and row[0].strip() == tokens[k].strip():
                aligned.append(row)
                k += 1
        if k != len(tokens):
            raise SimulationFailed(
                f"the reply has {len(rows)} value lines for {len(tokens)} tokens and could not be aligned"
            )
        rows = aligned
    values = np.clip(np.rint([v for _, v, _ in rows]), 0, len(LABELS) - 1).astype(np.int64)
    return (values, [start for _, _, start in rows]) if with_offsets else values
