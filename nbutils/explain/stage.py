"""Stage 02: explain the chosen units of a collection, resumably.

Results go to the stage folder (`nbutils.core.layout.ResultsLayout`): its results store
(`nbutils.core.store`), one transaction per unit side as each finishes (a rerun skips finished units and
retries those that failed by a server's fault), the units it was asked for (`ResultStore.select`: what stage
03 scores), ``summary.json`` and ``usage.json``. Nothing is rewritten whole at the end: ``explanations.jsonl``
for other tools is an export on request (``nbutils export-jsonl``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbutils.core.config import RunConfig, rule_threshold
from nbutils.core.failures import needs_work
from nbutils.core.io import atomic_write_json
from nbutils.core.layout import explanations
from nbutils.core.records import RecordStore
from nbutils.core.results import ExplanationEntry
from nbutils.core.store import ResultStore, StoredSequence, shard_part
from nbutils.core.unit_stage import UnitStage, store_as_finished
from nbutils.explain.contract import EXPLAINERS, explain_side, explainer_name, make_explainer
from nbutils.explain.selection import units_to_explain
from nbutils.llm.contract import BackendSpec, backend_spec, make_backend
from nbutils.score.flags import explanation_notes


def explainer_spec(config: RunConfig, cache_path: str | None = None) -> BackendSpec:
    """The explainer backend a config names."""
    return backend_spec(config, "explainer", cache_path)


def run_explain_stage(
    collection_dir: str | Path,
    out_dir: str | Path,
    config: RunConfig | None = None,
    progress: bool = True,
    cache_path: str | None = None,
    workers: int | None = None,
) -> StoredSequence[ExplanationEntry]:
    """Explain the units ``config.explain_neurons`` names into ``out_dir`` (resumable); return every entry (a
    sequence read from the store as it is used, so a run of any size fits in memory).

    ``config.split`` says which excerpts the explainer sees (`nbutils.core.records.split_excerpts`); stage 03
    must use the same. ``workers``: units in progress at once (default: what the backend asks for). With
    ``executor="ray"`` the units are dealt into shards run as Ray tasks; with several ``explainer_base_url``
    they are dealt over the servers (`nbutils.core.distribute`)."""
    config = config or RunConfig()
    stage = UnitStage("02_explain", collection_dir, explanations(out_dir), config).open()
    rare = stage.rare
    asked, chosen = chosen_sides(stage.store, config, rare)
    stage.run(
        chosen, lambda key: needs_work(stored_entry(stage.saved, key)), explain_units, "explainer_base_url",
        collection_dir=str(collection_dir), out_dir=str(out_dir), cache_path=cache_path, workers=workers,
        progress=progress,
    )  # fmt: skip
    saved = stage.saved
    saved.put_notes(explanation_notes(dict(saved.explanations())))  # copied or repeated: read by every view
    skipped = sum(1 for nid in asked if (nid.layer, nid.index) in rare)
    entries, summary = stage.finish(ExplanationEntry.from_dict, skipped)
    name = explainer_name(config)
    summary["explainer"] = name  # what `triage_line` names
    summary["explainer_backend"] = config.explainer_backend if EXPLAINERS.resolve(name).uses_llm else None
    if rule_threshold(config.llm_when) is not None:
        summary["triage"] = triage_savings(entries, stage.out.usage, config.prices)
    atomic_write_json(stage.out.summary, summary)
    return entries


def chosen_sides(
    store: RecordStore, config: RunConfig, rare: dict[tuple[int, int], int]
) -> tuple[list[Any], list[tuple[int, int, str]]]:
    """The units ``config.explain_neurons`` names (dead and ``rare`` ones included, to be listed as skipped)
    and the unit sides stage 02 explains: both signs of signed units with ``explain_negative``."""
    signs = ["positive", "negative"] if config.explain_negative and store.meta.signed else ["positive"]
    asked = units_to_explain(store, config.explain_neurons, config.seed, skip=set(rare))
    return asked, [nid.key(sign) for nid in asked if (nid.layer, nid.index) not in rare for sign in signs]


def stored_entry(saved: ResultStore, key: tuple[int, int, str]) -> ExplanationEntry | None:
    """A unit side's stored stage-02 entry, typed (None where it has none)."""
    found = saved.get(key)
    return None if found is None else ExplanationEntry.from_dict(found)


def explain_units(
    collection_dir: str, out_dir: str, config: RunConfig, keys: list[tuple[int, int, str]], cache_path: str | None,
    workers: int | None, progress: bool, shard: int | None,
) -> int:  # fmt: skip
    """Explain these units (one shard of `run_explain_stage`), storing each unit as it finishes; the
    LLM usage goes to ``usage.json`` (or, for a shard, its own file that the stage adds up). Returns the count."""
    store, out = RecordStore(collection_dir), explanations(out_dir)
    saved = ResultStore(out.root, part=shard_part(shard))
    explainer = make_explainer(config, lambda: make_backend(explainer_spec(config, cache_path)), store.meta)

    def work(key: tuple[int, int, str]) -> ExplanationEntry:
        return explain_side(store.record(key[0], key[1]), explainer, key[2] == "negative").entry

    try:
        store_as_finished(
            work, keys, lambda entry: saved.put(entry.to_dict()), explainer.usage, out.usage, config, shard,
            workers or explainer.parallel_units, "explain", progress,
        )  # fmt: skip
    finally:
        saved.close()
    return len(keys)


def triage_savings(
    entries: Sequence[ExplanationEntry], usage_path: Path, prices: dict[str, float] | None
) -> dict[str, Any]:
    """What ``llm_when="rule_below:X"`` saved: the unit sides kept on their rule, and the explainer requests and
    cost they would have taken at the mean of those sent to the LLM (this stage's ``usage.json``; requests
    served from the LLM cache count as requests). Stage 03 saves their simulator requests too: a rule is
    simulated exactly."""
    triaged = [e for e in entries if e.triage is not None]
    kept = [e for e in triaged if not e.triage.sent_to_llm]
    sent = len(triaged) - len(kept)
    usage = json.loads(usage_path.read_text()) if usage_path.is_file() else {}
    out: dict[str, Any] = {
        "threshold": triaged[0].triage.threshold if triaged else None,
        "units": len(triaged), "kept_rule": len(kept), "sent_to_llm": sent,
        "requests_saved": None, "cost_saved": None,
    }  # fmt: skip
    if not sent:
        out["note"] = "no unit went to the LLM: nothing to estimate the saving from"
        return out
    asked = usage.get("requests", 0) + usage.get("cache_hits", 0)
    out["requests_per_llm_unit"] = asked / sent
    out["requests_saved"] = round(len(kept) * asked / sent, 1)
    if prices and "estimated_cost" in usage:
        out["cost_saved"] = len(kept) * usage["estimated_cost"] / sent
    else:
        out["note"] = "set prices (per million tokens) for the cost saved"
    return out
