"""Stage 02: explanations per neuron, from an LLM explainer and from a token-lookup baseline.

The LLM explainer sees the neuron's ``train`` excerpts (see `nbutils.records.split_excerpts`) as 0..10
values and completes "the main thing this neuron does is find ...". With ``n_samples > 1`` every candidate is
simulated on the calibration split and the one with the highest correlation is kept (best-of-n); all
candidates are recorded with their scores. The token-lookup baseline needs no LLM: it names the tokens with
the highest mean activation in the train excerpts, and its simulator predicts each token's mean activation,
so every neuron gets a baseline score to compare with.

Results go to ``explanations.jsonl`` in the stage folder, one line per neuron and sign, appended as each
neuron finishes; a rerun skips the neurons already there.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.backends import LocalBackend, expected_values
from nbutils.errors import UserError
from nbutils.llm import make_backend
from nbutils.openai_backend import LLMFailed, OpenAIBackend
from nbutils.progress import progress_bar
from nbutils.prompts import (
    ShownExcerpt,
    explanation_messages,
    fit_examples,
    normalise,
    parse_explanation,
    simulation_prefix,
)
from nbutils.records import (
    Excerpt,
    NeuronEntries,
    NeuronId,
    NeuronRecord,
    RecordStore,
    atomic_write_json,
    split_excerpts,
    write_jsonl,
)
from nbutils.scoring import correlation

EXPLANATIONS = "explanations.jsonl"
NEURONS = "neurons"  # per-neuron result files inside a stage folder


# ----------------------------------------------------------------------------------------------------------
# Token-lookup baseline
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# LLM explanation and simulation
# ----------------------------------------------------------------------------------------------------------


def shown_excerpts(excerpts: Sequence[Excerpt], max_activation: float) -> list[ShownExcerpt]:
    return [
        ShownExcerpt(tuple(e.tokens), tuple(int(v) for v in normalise(e.activations, max_activation))) for e in excerpts
    ]


def simulate_explanation(
    backend: LocalBackend | OpenAIBackend,
    explanation: str,
    excerpts: Sequence[Excerpt],
    max_prompt_tokens: int | None = None,
) -> list[np.ndarray]:
    """Label distributions [tokens, 11] per excerpt, with as many worked examples as the context (or
    ``max_prompt_tokens``) allows."""
    prefix = fitted_simulation_prefix(backend, explanation, max(len(e.tokens) for e in excerpts), max_prompt_tokens)
    return backend.simulate(prefix, [e.tokens for e in excerpts])


def fitted_simulation_prefix(
    backend: LocalBackend | OpenAIBackend, explanation: str, excerpt_len: int, max_prompt_tokens: int | None = None
) -> str:
    """The simulation prompt's shared prefix, with as many worked examples as leave room for an excerpt.

    ``max_prompt_tokens`` caps the prompt below the model's context, to save cost (fewer worked examples)."""
    longest = excerpt_len * 8  # generous tokens per line plus branch tokens
    limit = min(backend.context, max_prompt_tokens or backend.context)
    examples = fit_examples(lambda ex: backend.count_tokens(simulation_prefix(explanation, ex)) + longest, limit)
    return simulation_prefix(explanation, examples)


def true_activations(excerpts: Sequence[Excerpt]) -> list[np.ndarray]:
    """The excerpts' activations as float64 arrays (the truth a simulation is scored against)."""
    return [np.asarray(e.activations, dtype=np.float64) for e in excerpts]


def explain_neuron(
    record: NeuronRecord,
    explainer: LocalBackend | OpenAIBackend,
    simulator: LocalBackend | OpenAIBackend | None = None,
    n_samples: int = 1,
    temperature: float = 1.0,
    negative: bool = False,
    seed: int = 0,
    split: str = "nbutils",
) -> dict[str, Any]:
    """Explain one neuron (one sign of it); returns the JSON-ready entry for explanations.jsonl."""
    sp = split_excerpts(record, negative, split=split)
    train = sp["train"]
    entry: dict[str, Any] = {
        "layer": record.id.layer,
        "neuron": record.id.neuron,
        "sign": "negative" if negative else "positive",
        "explanation": None,
        "failure": None,
        "candidates": [],
        "split": split,
    }
    table = token_table(train)
    entry["baseline"] = {"explanation": token_lookup_explanation(table), "method": "token lookup"}
    max_act = max((float(np.max(e.activations)) for e in train), default=0.0)
    if not train or max_act <= 0:
        entry["failure"] = "the neuron never activates on its training excerpts, so there is nothing to explain"
        return entry
    shown = shown_excerpts(train, max_act)
    examples = fit_examples(
        lambda ex: explainer.count_tokens("".join(m["content"] for m in explanation_messages(shown, ex))) + 120,
        explainer.context,
    )
    try:
        replies = explainer.chat(explanation_messages(shown, examples), n=n_samples, temperature=temperature, seed=seed)
    except LLMFailed as e:
        entry["failure"], entry["retryable"] = f"explainer request failed: {e}", e.retryable
        return entry
    calibration = sp["calibration_top"] + sp["calibration_random"]
    for reply in replies:
        text = parse_explanation(reply)
        cand: dict[str, Any] = {"explanation": text, "reply": reply, "calibration_score": None, "reason": None}
        if not text:
            cand["reason"] = "empty or unusable explainer reply"
        elif n_samples > 1 and simulator is not None and calibration:
            try:
                ev = expected_values(simulate_explanation(simulator, text, calibration))
            except LLMFailed as e:
                cand["reason"] = f"simulation failed: {e}"
                entry["retryable"] = entry.get("retryable") or e.retryable
            else:
                m = correlation(np.concatenate(true_activations(calibration)), np.concatenate(ev))
                cand["calibration_score"], cand["reason"] = m.value, m.reason
        entry["candidates"].append(cand)
    usable = [c for c in entry["candidates"] if c["explanation"]]
    if not usable:
        entry["failure"] = f"no usable explanation among {len(replies)} replies"
        return entry
    best = max(usable, key=lambda c: -np.inf if c["calibration_score"] is None else c["calibration_score"])
    entry["explanation"] = best["explanation"]
    return entry


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------


def neurons_to_explain(store: RecordStore, spec: Any, seed: int = 0) -> list[NeuronId]:
    """Which neurons to explain: "all"; an int (that many per collected layer, a seeded sample);
    "strongest:N" (per layer, the N with the largest max activation over standard deviation, the most
    selective ones, strongest first); or [[layer, neuron], ...]."""
    if spec == "all" or spec is None:
        return list(store.all_ids())
    if isinstance(spec, str) and spec.startswith("strongest:") and spec[len("strongest:") :].isdigit():
        n = int(spec[len("strongest:") :])
        return [NeuronId(layer, neuron) for layer in store.layers for neuron in store.strongest(layer, n)]
    if isinstance(spec, int):
        ids = []
        for layer in store.layers:
            neurons = store.neurons(layer)
            pick = np.random.default_rng([seed, layer]).choice(len(neurons), min(spec, len(neurons)), replace=False)
            ids += [NeuronId(layer, int(neurons[i])) for i in sorted(pick)]
        return ids
    try:
        ids = [NeuronId(int(layer), int(neuron)) for layer, neuron in spec]
    except (TypeError, ValueError):
        raise UserError(
            f"explain_neurons={spec!r} is not 'all', 'strongest:N', a number per layer, or a list of [layer, neuron] "
            "pairs.",
            "Write e.g. explain_neurons=4, explain_neurons=strongest:5 or explain_neurons=[[0, 12], [29, 700]].",
        ) from None
    for nid in ids:
        store.record(nid.layer, nid.neuron)  # raises a clear error for neurons that were not collected
    return ids


def run_explain_stage(
    collection_dir: str | Path,
    out_dir: str | Path,
    neurons: Any = 2,
    model: str = "embedded",
    backend: str = "local",
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    n_samples: int = 1,
    temperature: float = 1.0,
    explain_negative: bool = False,
    seed: int = 0,
    prices: dict[str, float] | None = None,
    progress: bool = True,
    cache_path: str | None = None,
    split: str = "nbutils",
) -> list[dict[str, Any]]:
    """Explain the chosen neurons of a collection into ``out_dir/explanations.jsonl`` (resumable).

    ``split``: which excerpts the explainer sees (`nbutils.records.split_excerpts`); stage 03 must use the same."""
    store = RecordStore(collection_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = NeuronEntries(out / NEURONS)
    signs = ["positive", "negative"] if explain_negative and store.meta.signed else ["positive"]
    chosen = [(nid, sign) for nid in neurons_to_explain(store, neurons, seed) for sign in signs]
    todo = [(nid, sign) for nid, sign in chosen if _needs_work(saved.get(nid.layer, nid.neuron, sign))]
    if todo:
        llm = make_backend(backend, model, base_url, api_key_env, cache_path=cache_path)
        for nid, sign in progress_bar(iterable=todo, desc="explain", unit="neuron", disable=not progress):
            rec = store.record(nid.layer, nid.neuron)
            saved.put(explain_neuron(rec, llm, llm, n_samples, temperature, sign == "negative", seed, split))
            llm.usage.save(out / "usage.json", prices)
    entries = [saved.get(nid.layer, nid.neuron, sign) for nid, sign in chosen]
    write_jsonl(out / EXPLANATIONS, entries)
    write_summary(out, entries)
    return entries


def _needs_work(entry: dict[str, Any] | None) -> bool:
    """Not done yet, or failed for a reason a retry can fix (a server error, not an unusable reply)."""
    return entry is None or bool(entry.get("retryable"))


def write_summary(out: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Count successes and failures into ``out/summary.json`` (the pipeline reruns a stage that had failures)."""
    failed = [e for e in entries if e.get("failure")]
    summary = {
        "neurons": len(entries),
        "succeeded": len(entries) - len(failed),
        "failed": len(failed),
        "retryable": sum(1 for e in failed if e.get("retryable")),
        "failures": [{k: e.get(k) for k in ("layer", "neuron", "sign", "failure", "retryable")} for e in failed],
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


class StageHadFailures(Exception):
    """Raised (when asked to) after a stage finished with failed neurons, to make the run's exit code non-zero."""


def check_failures(out_dir: str | Path, fail_on_errors: bool = False) -> str:
    """One line counting a stage's successes and failures (from its summary.json), with the first reasons.

    Raises StageHadFailures (so the stage, and ``nbutils run``, exit non-zero) when every neuron failed, or
    when any failed and ``fail_on_errors`` is set."""
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    line = f"{summary['succeeded']} succeeded, {summary['failed']} failed ({summary['retryable']} will be retried on rerun)"
    if not summary["failed"]:
        return line
    reasons = "; ".join(f"L{f['layer']} N{f['neuron']}: {f['failure']}" for f in summary["failures"][:3])
    if summary["failed"] == summary["neurons"]:
        raise StageHadFailures(f"every neuron failed ({line}). First failures: {reasons}")
    if fail_on_errors:
        raise StageHadFailures(f"{line}. First failures: {reasons}")
    return f"{line}. First failures: {reasons}"
