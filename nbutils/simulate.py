"""Stage 03: simulate each explanation on held-out excerpts and score it, beside the token-lookup baseline.

For every entry of stage 02 the simulator predicts the neuron's activations from the explanation alone on the
``calibration`` and ``valid`` excerpts (never the ``train`` excerpts the explainer saw). Scores, all on
``valid``: top-and-random, random-only and top-only pooled correlation with a bootstrap 95% interval, and
the two secondary scores after a linear calibration fitted on the calibration excerpts. The token-lookup
baseline is scored the same way.

Artifacts in the stage folder: ``scores.jsonl`` (one line per neuron and sign, appended as each finishes,
so a rerun continues) and ``simulations/L<layer>_N<neuron>_<sign>.json`` (per excerpt: tokens, true
activations, expected values and the 0..10 label distribution per token).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.backends import LocalBackend, expected_values
from nbutils.classify import (
    TASKS,
    Judge,
    baseline_judgements,
    item_records,
    judge_explanation,
    judge_items,
    task_result,
)
from nbutils.errors import UserError
from nbutils.explain import (
    EXPLANATIONS,
    NEURONS,
    simulate_explanation,
    token_lookup_simulate,
    token_table,
    true_activations,
    write_summary,
)
from nbutils.llm import make_backend
from nbutils.openai_backend import LLMFailed, OpenAIBackend
from nbutils.progress import progress_bar
from nbutils.prompts import LABELS
from nbutils.records import (
    Excerpt,
    NeuronEntries,
    NeuronRecord,
    RecordStore,
    atomic_write_json,
    read_jsonl,
    split_excerpts,
    write_jsonl,
)
from nbutils.scoring import Calibration, ScoreSet, calibrate, correlation, score

SCORES = "scores.jsonl"
SCORED_SETS = {
    "top_and_random": ("valid_top", "valid_random"),
    "random_only": ("valid_random",),
    "top_only": ("valid_top",),
    "stratified": ("stratified",),
}
NO_STRATIFIED = (
    "no quantile-band excerpts to score (bands are sampled for the positive side only, and per_band=0 "
    "turns the stratified score off)"
)


def _score_dict(s: ScoreSet) -> dict[str, Any]:
    return {
        "correlation": asdict(s.correlation),
        "rsquared": asdict(s.rsquared),
        "absolute_dev_explained": asdict(s.absolute_dev_explained),
        "n_excerpts": s.n_excerpts,
        "n_tokens": s.n_tokens,
    }


def score_predictions(
    splits: dict[str, list[Excerpt]], predicted: dict[str, list[np.ndarray]], n_boot: int, seed: int
) -> dict[str, Any]:
    """Every score of one simulator's predictions (keyed like the splits)."""

    cal_names = ("calibration_top", "calibration_random")
    cal = calibrate(
        [t for n in cal_names for t in true_activations(splits[n])], [p for n in cal_names for p in predicted[n]]
    )
    out: dict[str, Any] = {"calibration": asdict(cal)}
    for label, names in SCORED_SETS.items():
        t = [x for n in names for x in true_activations(splits[n])]
        p = [x for n in names for x in predicted[n]]
        if label == "stratified" and not t:
            none = {"value": None, "reason": NO_STRATIFIED, "low": None, "high": None}
            out[label] = {m: none for m in ("correlation", "rsquared", "absolute_dev_explained")}
            out[label] |= {"n_excerpts": 0, "n_tokens": 0}
            continue
        out[label] = _score_dict(score(t, p, calibration=cal, n_boot=n_boot, seed=seed))
    return out


def judge_scores(
    rec: NeuronRecord,
    entry: dict[str, Any],
    judge: Judge | None,
    tasks: Sequence[str],
    per_class: int,
    seed: int,
    max_prompt_tokens: int | None,
    split: str = "nbutils",
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Detection and fuzzing of one entry: the explanation's scores (none without a judge), the token-lookup
    baseline's, and the judged items to save. Raises LLMFailed from the judge."""
    mine, base, saved = {}, {}, {}
    negative = entry["sign"] == "negative"
    table = token_table(split_excerpts(rec, negative, split=split)["train"])
    for task in tasks:
        items, threshold = judge_items(rec, task, negative, per_class, seed, split)
        base[task] = task_result(items, baseline_judgements(table, items), True, threshold=threshold)
        if judge is not None:
            answers = judge_explanation(judge, task, entry["explanation"], [j.item for j in items], max_prompt_tokens)
            mine[task] = task_result(items, answers, judge.gives_probabilities)
            saved[task] = item_records(items, answers)
    return mine, base, saved


def score_entry(
    entry: dict[str, Any],
    store: RecordStore,
    simulator: LocalBackend | OpenAIBackend,
    n_boot: int = 1000,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    per_band: int = 2,
    judges: Sequence[str] = TASKS,
    judge_per_class: int = 10,
    split: str = "nbutils",
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Scores of one stage-02 entry, and the simulation record to save (None without an explanation).

    Correlation on each score set (``stratified``: ``per_band`` excerpts from every quantile band), then
    each of ``judges`` (detection, fuzzing) with at most ``judge_per_class`` positive and negative items.
    ``split`` must be the one stage 02 used (`nbutils.records.split_excerpts`)."""
    unknown = sorted(set(judges) - set(TASKS))
    if unknown:
        raise UserError(f"Unknown judges {unknown}.", f"Use a list of: {', '.join(TASKS)} (or [] for none).")
    if entry.get("split", "nbutils") != split:
        raise UserError(
            f"L{entry['layer']} N{entry['neuron']} was explained from the split={entry['split']!r} excerpts; scoring it "
            f"with split={split!r} could score excerpts the explainer saw.",
            f"Run stage 03 with split={entry['split']!r} (nbutils run passes one split to both stages).",
        )
    rec = store.record(entry["layer"], entry["neuron"])
    splits = split_excerpts(rec, entry["sign"] == "negative", per_band, split)
    names = [n for n in splits if n != "train"]
    result: dict[str, Any] = {k: entry[k] for k in ("layer", "neuron", "sign", "explanation")}
    table = token_table(splits["train"])
    result["baseline"] = {
        "explanation": entry["baseline"]["explanation"],
        **score_predictions(splits, {n: token_lookup_simulate(table, splits[n]) for n in names}, n_boot, seed),
        **judge_scores(rec, entry, None, judges, judge_per_class, seed, None, split)[1],
    }
    if not entry.get("explanation"):
        result["failure"] = entry.get("failure") or "no explanation"
        return result, None
    scored = [(n, e) for n in names for e in splits[n]]
    try:
        dists = simulate_explanation(simulator, entry["explanation"], [e for _, e in scored], max_prompt_tokens)
    except LLMFailed as e:
        result["failure"], result["retryable"] = f"simulation failed: {e}", e.retryable
        return result, None
    evs = expected_values(dists)
    result.update(
        score_predictions(splits, {n: [ev for (m, _), ev in zip(scored, evs) if m == n] for n in names}, n_boot, seed)
    )
    judged: dict[str, Any] = {}
    try:
        mine, _, judged = judge_scores(rec, entry, simulator, judges, judge_per_class, seed, max_prompt_tokens, split)
        result.update(mine)
    except LLMFailed as e:  # the correlation scores stay; a rerun retries the neuron if the fault was the server's
        result["failure"], result["retryable"] = f"detection/fuzzing failed: {e}", e.retryable
    return result, simulation_record(entry, scored, evs, dists, result["calibration"], judged)


def simulation_record(
    entry: dict[str, Any],
    scored: list[tuple[str, Excerpt]],
    evs: list[np.ndarray],
    dists: list[np.ndarray],
    calibration: dict[str, float],
    judged: dict[str, Any],
) -> dict[str, Any]:
    """What ``simulations/L*_N*_*.json`` holds: per scored excerpt its split, tokens, true activations,
    expected values and label distributions; the calibration line; every judged item."""
    return {
        **{k: entry[k] for k in ("layer", "neuron", "sign", "explanation")},
        "labels": [int(x) for x in LABELS],
        "calibration": calibration,
        "excerpts": [
            {
                "split": n,
                "index": e.index,
                "tokens": e.tokens,
                "true": [float(a) for a in e.activations],
                "expected": [float(x) for x in ev],
                "distribution": np.round(d, 6).tolist(),
            }
            for (n, e), ev, d in zip(scored, evs, dists)
        ],
        "judged": judged,
    }


def simulation_path(out: Path, layer: int, neuron: int, sign: str) -> Path:
    return out / "simulations" / f"L{layer}_N{neuron}_{sign}.json"


def run_score_stage(
    collection_dir: str | Path,
    explanation_dir: str | Path,
    out_dir: str | Path,
    model: str = "embedded",
    backend: str = "local",
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    simulation: str = "auto",
    n_boot: int = 1000,
    seed: int = 0,
    prices: dict[str, float] | None = None,
    progress: bool = True,
    cache_path: str | None = None,
    max_prompt_tokens: int | None = None,
    per_band: int = 2,
    judges: Sequence[str] = TASKS,
    judge_per_class: int = 10,
    split: str = "nbutils",
) -> list[dict[str, Any]]:
    """Simulate and score every stage-02 entry into ``out_dir`` (resumable); return all score lines."""
    store = RecordStore(collection_dir)
    entries = read_jsonl(Path(explanation_dir) / EXPLANATIONS)
    if not entries:
        raise UserError(
            f"No explanations in {Path(explanation_dir) / EXPLANATIONS}.",
            "Run stage 02 first (python -m nbutils run runs every stage in order).",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = NeuronEntries(out / NEURONS)

    def needs_work(entry: dict[str, Any]) -> bool:  # not scored with this explanation, or a retryable failure
        old = saved.get(entry["layer"], entry["neuron"], entry["sign"])
        if old is None or old.get("retryable") or old["explanation"] != entry["explanation"]:
            return True
        return bool(entry.get("explanation")) and not old.get("failure") and any(t not in old for t in judges)

    todo = [e for e in entries if needs_work(e)]
    if todo:
        llm = make_backend(backend, model, base_url, api_key_env, simulation, cache_path=cache_path)
        for entry in progress_bar(iterable=todo, desc="simulate+score", unit="neuron", disable=not progress):
            result, sim = score_entry(
                entry, store, llm, n_boot, seed, max_prompt_tokens, per_band, judges, judge_per_class, split
            )
            if sim is not None:
                atomic_write_json(simulation_path(out, entry["layer"], entry["neuron"], entry["sign"]), sim)
            saved.put(result)  # after the simulation file: a score on disk always has its simulation
            llm.usage.save(out / "usage.json", prices)
    results = [saved.get(e["layer"], e["neuron"], e["sign"]) for e in entries]
    write_jsonl(out / SCORES, results)
    write_summary(out, results)
    return results


# ----------------------------------------------------------------------------------------------------------
# OpenAI neuron-explainer results JSON
# ----------------------------------------------------------------------------------------------------------


def to_openai_results(sim: dict[str, Any]) -> dict[str, Any]:
    """A simulation record as neuron-explainer's ``NeuronSimulationResults`` (valid excerpts, one explanation).

    ``expected_activations`` stay on the simulator's 0..10 scale (``activation_scale`` says so) and
    ``ev_correlation_score`` is computed from them. ``rsquared_score`` and ``absolute_dev_explained_score``
    are computed after the record's linear calibration (`nbutils.scoring.calibrate`), per excerpt and pooled,
    as stage 03 does; they are null when the record has no calibration (e.g. an imported one). Per-token
    ``distribution_values`` are written as stored (imported records keep their own), else the labels 0..10.
    """
    valid = [x for x in sim["excerpts"] if x["split"].startswith("valid")]
    labels = [float(v) for v in sim["labels"]]
    cal = sim.get("calibration")
    line = Calibration(cal["slope"], cal["intercept"]) if cal else None

    def scores(t: list[float], p: list[float]) -> dict[str, float | None]:
        out = {"ev_correlation_score": correlation(np.asarray(t), np.asarray(p)).value}
        if line is None:
            return out | {"rsquared_score": None, "absolute_dev_explained_score": None}
        s = score([np.asarray(t)], [np.asarray(p)], calibration=line, n_boot=0)
        return out | {
            "rsquared_score": s.rsquared.value,
            "absolute_dev_explained_score": s.absolute_dev_explained.value,
        }

    seqs = [
        {
            "dataclass_name": "ScoredSequenceSimulation",
            "simulation": {
                "dataclass_name": "SequenceSimulation",
                "tokens": x["tokens"],
                "expected_activations": x["expected"],
                "activation_scale": "simulated_normalized_activations",
                "distribution_values": x.get("distribution_values") or [labels for _ in x["tokens"]],
                "distribution_probabilities": x["distribution"],
                "uncalibrated_simulation": None,
            },
            "true_activations": x["true"],
            **scores(x["true"], x["expected"]),
        }
        for x in valid
    ]
    pooled = scores(sum((x["true"] for x in valid), []), sum((x["expected"] for x in valid), []))
    return {
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": sim["layer"], "neuron_index": sim["neuron"]},
        "scored_explanations": [
            {
                "dataclass_name": "ScoredExplanation",
                "explanation": sim["explanation"],
                "scored_simulation": {
                    "dataclass_name": "ScoredSimulation",
                    "scored_sequence_simulations": seqs,
                    **pooled,
                },
            }
        ],
    }


def from_openai_results(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Simulation records (this project's layout) from a ``NeuronSimulationResults`` object, one per explanation.

    Each token keeps its own ``distribution_values`` (floats; neuron-explainer stores, per token, the values
    its simulator saw among the top log-probabilities, so they differ from token to token) beside its
    ``distribution_probabilities``."""
    if not isinstance(obj, dict) or obj.get("dataclass_name") != "NeuronSimulationResults":
        raise UserError(
            "Expected a neuron-explainer NeuronSimulationResults object (dataclass_name='NeuronSimulationResults').",
            "Pass a results file written by neuron-explainer or by nbutils.simulate.to_openai_results.",
        )
    nid = obj["neuron_id"]
    out = []
    for scored in obj["scored_explanations"]:
        seqs = scored["scored_simulation"]["scored_sequence_simulations"]
        out.append(
            {
                "layer": nid["layer_index"],
                "neuron": nid["neuron_index"],
                "sign": "positive",
                "explanation": scored["explanation"],
                "labels": [int(x) for x in LABELS],
                "excerpts": [
                    {
                        "split": "valid",
                        "index": -1,
                        "tokens": s["simulation"]["tokens"],
                        "true": s["true_activations"],
                        "expected": s["simulation"]["expected_activations"],
                        "distribution": s["simulation"]["distribution_probabilities"],
                        "distribution_values": [
                            [float(v) for v in vs] for vs in s["simulation"]["distribution_values"]
                        ],
                    }
                    for s in seqs
                ],
            }
        )
    return out


def export_openai_results(sim_path: str | Path, out_root: str | Path) -> Path:
    """Write ``<out_root>/<layer>/<neuron>.jsonl`` (neuron-explainer's results layout) from a simulation file."""
    sim = json.loads(Path(sim_path).read_text())
    path = Path(out_root) / str(sim["layer"]) / f"{sim['neuron']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_openai_results(sim)) + "\n")
    return path
