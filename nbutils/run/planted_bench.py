"""The planted-neuron benchmark: how good are an explainer and a simulator, on neurons whose answer is known?

Runs the pipeline's own stage functions on a set of planted neurons (see `nbutils.subject.planted`):
collection (stage 01) over the corpus, explanation by the explainer (stage 02), and scoring (stage 03) of
three explanation sets per neuron: the ground truth (how good the *simulator* is: a perfect one scores 1.0),
the explainer's (how good the *explainer* is, given that simulator), and the token-lookup baseline.
With ``oracle`` the ground truth is also scored by the oracle backend (`nbutils.llm.oracle`), which must score 1.0:
a check that collection, prompts and scoring lose nothing on the way.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.config import RunConfig
from nbutils.core.io import atomic_write_json, write_jsonl
from nbutils.core.layout import explanations
from nbutils.core.records import RecordStore, split_excerpts
from nbutils.core.results import BaselineExplanation, ExplanationEntry
from nbutils.core.store import ResultStore
from nbutils.explain.stage import run_explain_stage
from nbutils.score.baseline import token_lookup_explanation, token_table
from nbutils.score.contract import UnitScores, scorer
from nbutils.score.stage import run_score_stage
from nbutils.subject.loading import load_subject_model
from nbutils.subject.planted import planted_neurons
from nbutils.view.runview import main_score, scorer_value

METRICS = (
    ("r", lambda r: main_score(r)),
    ("detection", lambda r: scorer_value(r, scorer("detection"))),
    ("fuzzing", lambda r: scorer_value(r, scorer("fuzzing"))),
)
"""What the table reports per explanation: top+random correlation, and detection and fuzzing balanced accuracy."""


def write_truth_explanations(collection_dir: Path, out_dir: Path, spec: str) -> None:
    """A stage-02 folder whose explanations are the planted neurons' ground truths (with the baseline)."""
    store = RecordStore(collection_dir)
    entries = []
    for i, neuron in enumerate(planted_neurons(spec)):
        table = token_table(split_excerpts(store.record(0, i))["train"])
        baseline = BaselineExplanation(token_lookup_explanation(table))
        entries.append(ExplanationEntry(0, i, "positive", neuron.explanation, baseline=baseline).to_dict())
    layout = explanations(out_dir)
    saved = ResultStore(layout.root)
    for e in entries:
        saved.put(e)
    saved.close()
    write_jsonl(layout.jsonl, entries)


def run_planted_benchmark(
    out_dir: str | Path,
    spec: str = "planted",
    corpus: str = "embedded",
    n_excerpts: int = 1000,
    excerpt_len: int = 64,
    model: str = "embedded",
    backend: str = "local",
    base_url: str | None = None,
    oracle: bool = True,
    n_boot: int = 200,
    judge_per_class: int = 10,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run the benchmark into ``out_dir`` (resumable: each stage skips finished neurons); return the table.

    ``model``/``backend``/``base_url`` choose the explainer and simulator (one LLM, as in the main job);
    ``options``: other `RunConfig` fields (e.g. ``max_prompt_tokens``)."""
    out = Path(out_dir)
    subject = load_subject_model(spec)
    excerpts = make_excerpts(subject.tokenizer, load_texts(corpus), excerpt_len, n_excerpts, seed, corpus=corpus)
    cfg = CollectConfig(layers=None, top_k=20, n_random=20, band_size=5, quantile_warmup=256, seed=seed)
    store = collect_activations(subject, excerpts, out / "01_collect", cfg, progress=progress)
    write_truth_explanations(store.path, out / "02_truth", spec)
    # the rules explainer's rules are simulated exactly by their own simulator (`nbutils.llm.rule_language`); the
    # ground truths, which are no rules, then by the oracle
    simulator, sim_model = ("oracle", spec) if backend == "rules" else (backend, model)
    config = RunConfig(
        explain_neurons="all", explainer_backend=backend, explainer_model=model, explainer_base_url=base_url,
        simulator_backend=simulator, simulator_model=sim_model, simulator_base_url=base_url, n_boot=n_boot,
        seed=seed, judge_per_class=judge_per_class, **options,
    )  # fmt: skip
    run_explain_stage(store.path, out / "02_explain", config, progress=progress)
    scores = {
        "truth": run_score_stage(store.path, out / "02_truth", out / "03_truth", config, progress),
        "explainer": run_score_stage(store.path, out / "02_explain", out / "03_explain", config, progress),
    }
    if oracle:
        oracle_config = replace(config, simulator_backend="oracle", simulator_model=spec)
        scores["oracle"] = run_score_stage(store.path, out / "02_truth", out / "03_oracle", oracle_config, progress)
    rows = benchmark_rows(spec, scores, oracle)
    result = {
        "benchmark": "planted",
        "planted": spec,
        "corpus": corpus,
        "excerpts": len(excerpts),
        "explainer_and_simulator": f"{backend}:{model}",
        "rows": rows,
    }
    atomic_write_json(out / "planted.json", result)
    return result


def benchmark_rows(spec: str, scores: dict[str, list[UnitScores]], oracle: bool) -> list[dict[str, Any]]:
    """One row per planted neuron (and their mean): each metric of the truth, the generated explanation, the
    baseline and (with ``oracle``) the oracle."""
    rows = []
    by_neuron = {set_name: {s.neuron: s for s in found} for set_name, found in scores.items()}
    for i, neuron in enumerate(planted_neurons(spec)):
        row: dict[str, Any] = {"neuron": neuron.name, "ground truth": neuron.explanation}
        mine = by_neuron["explainer"].get(i)
        if mine is None:  # stage 02 passed over it: it never (or too rarely) fired on the corpus
            row["generated"] = "(none: it never activates on the corpus, so stage 02 passed over it)"
            rows.append(row)
            continue
        row["generated"] = mine.explanation or f"(none: {mine.failure})"
        for name, get in METRICS:
            row[f"truth {name}"] = get(by_neuron["truth"][i])
            row[f"generated {name}"] = get(mine)
            row[f"baseline {name}"] = get(by_neuron["truth"][i].baseline)
            if oracle:
                row[f"oracle {name}"] = get(by_neuron["oracle"][i])
        rows.append(row)
    mean = {"neuron": "mean", "ground truth": "", "generated": ""}
    for col in max(rows, key=len):
        if col not in mean:
            values = [r[col] for r in rows if isinstance(r.get(col), float)]
            mean[col] = float(np.mean(values)) if values else None
    return rows + [mean]


def markdown_table(result: dict[str, Any], columns: list[str] | None = None) -> str:
    """The result rows as a Markdown table (numbers to 2 decimals, "-" where undefined)."""
    rows = result["rows"]
    cols = columns or [c for c in max(rows, key=len) if c not in ("ground truth", "generated")]

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _cell_text(text: str) -> str:
    """Text safe inside one Markdown table cell (control characters escaped, pipes escaped)."""
    return json.dumps(text, ensure_ascii=False)[1:-1].replace("|", "\\|")


def explanations_table(result: dict[str, Any]) -> str:
    """Ground truth beside the generated explanation, per planted neuron."""
    rows = [r for r in result["rows"] if r["neuron"] != "mean"]
    return "\n".join(
        ["| neuron | ground truth | generated |", "|---|---|---|"]
        + [f"| {r['neuron']} | {r['ground truth']} | {_cell_text(r['generated'])} |" for r in rows]
    )
