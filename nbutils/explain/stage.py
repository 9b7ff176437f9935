"""Stage 02: explain the chosen units of a collection, resumably.

Results go to the stage folder (`nbutils.core.layout.ResultsLayout`): one file per unit side, written
atomically as each finishes (a rerun skips finished units and retries those that failed by a server's
fault), then ``explanations.jsonl`` with all of them, ``summary.json`` and ``usage.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbutils.core.config import RunConfig
from nbutils.core.failures import needs_work, write_summary
from nbutils.core.io import write_jsonl
from nbutils.core.layout import explanations
from nbutils.core.progress import progress_bar
from nbutils.core.records import RecordStore, UnitEntries
from nbutils.explain.explainer import explain_unit, units_to_explain
from nbutils.llm.contract import BackendSpec, make_backend


def explainer_spec(config: RunConfig, cache_path: str | None = None) -> BackendSpec:
    """The explainer backend a config names."""
    return BackendSpec(
        config.explainer_backend, config.explainer_model, config.explainer_base_url, config.explainer_api_key_env,
        cache_path=cache_path,
    )  # fmt: skip


def run_explain_stage(
    collection_dir: str | Path,
    out_dir: str | Path,
    config: RunConfig | None = None,
    progress: bool = True,
    cache_path: str | None = None,
) -> list[dict[str, Any]]:
    """Explain the units ``config.explain_neurons`` names into ``out_dir`` (resumable); return every entry.

    ``config.split`` says which excerpts the explainer sees (`nbutils.core.records.split_excerpts`); stage 03
    must use the same."""
    config = config or RunConfig()
    store = RecordStore(collection_dir)
    out = explanations(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    saved = UnitEntries(out)
    signs = ["positive", "negative"] if config.explain_negative and store.meta.signed else ["positive"]
    chosen = [nid.key(sign) for nid in units_to_explain(store, config.explain_neurons, config.seed) for sign in signs]
    todo = [key for key in chosen if needs_work(saved.get(key))]
    if todo:
        llm = make_backend(explainer_spec(config, cache_path))
        for layer, neuron, sign in progress_bar(iterable=todo, desc="explain", unit="neuron", disable=not progress):
            rec = store.record(layer, neuron)
            negative = sign == "negative"
            c = config
            saved.put(explain_unit(rec, llm, c.n_samples, c.temperature, negative, c.seed, c.split))
            llm.usage.save(out.usage, config.prices)
    entries = [saved.get(key) for key in chosen]
    write_jsonl(out.jsonl, entries)
    write_summary(out.summary, entries)
    return entries
