"""Counting a stage's failed units, and making a run fail when it must.

Stages 02 and 03 record a failed unit with its reason (``failure``) and whether a rerun could fix it
(``retryable``: a server fault, not an unusable reply) and carry on with the others. `write_summary` counts
them into the stage's ``summary.json`` (the chain reruns a stage that has retryable failures);
`check_failures` is the line a stage notebook prints, and raises when every unit failed (or any, when asked).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nbutils.core.io import atomic_write_json
from nbutils.core.layout import summary_path
from nbutils.core.store import StoredSequence
from nbutils.core.units import key_of, unit_name


def write_summary(
    path: str | Path, entries: Sequence[Any], rare: dict[tuple[int, int], int] | None = None,
    min_active: int = 1, skipped: int = 0, noun: str = "neuron",
) -> dict[str, Any]:  # fmt: skip
    """Count successes and failures of a stage's entries (`nbutils.core.results.ExplanationEntry` or
    `nbutils.score.contract.UnitScores`; a `StoredSequence` parses only its failed ones) into ``path`` (its
    summary.json). ``rare``: the collection's dead and rare units (`RecordStore.rare_units`), listed with their
    active-token counts; ``skipped``: how many of the units asked for were left out as rare."""
    failed = entries.failed() if isinstance(entries, StoredSequence) else [e for e in entries if e.failure]
    summary = {
        "neurons": len(entries),
        "succeeded": len(entries) - len(failed),
        "failed": len(failed),
        "retryable": sum(1 for e in failed if e.retryable),
        "failures": [
            {"layer": e.layer, "neuron": e.neuron, "sign": e.sign, "failure": e.failure, "retryable": e.retryable}
            for e in failed
        ],
    }
    if rare is not None:
        summary["rare"] = rare_listing(rare, min_active, skipped, noun)
    atomic_write_json(path, summary)
    return summary


def rare_listing(
    rare: dict[tuple[int, int], int], min_active: int, skipped: int = 0, noun: str = "neuron"
) -> dict[str, Any]:
    """Dead and rare units as a stage summary lists them: the rule, counts, and every unit with its count."""
    return {
        "noun": noun,
        "min_active": min_active,
        "reason": f"active (> 0, or != 0 for signed units) on fewer than min_active={min_active} tokens of the "
        "collection: not explained or scored",
        "count": len(rare),
        "dead": sum(1 for n in rare.values() if n == 0),
        "skipped_of_asked": skipped,
        "units": [[layer, index, n] for (layer, index), n in sorted(rare.items())],
    }


def rare_units_text(rare: dict[str, Any], shown: int) -> str:
    """The first ``shown`` dead and rare units of a listing (`rare_listing`) with their active-token counts:
    ``L3 N1 (0), L3 N7 (2)``, and how many more."""
    text = ", ".join(f"L{u[0]} N{u[1]} ({u[2]})" for u in rare["units"][:shown])
    return text + (f", and {rare['count'] - shown} more" if rare["count"] > shown else "")


def rare_line(stage_dir: str | Path) -> str:
    """One line on the dead and rare units a stage left out (from its summary.json)."""
    rare = json.loads(summary_path(stage_dir).read_text()).get("rare")
    if not rare:
        return "dead and rare units were not counted (a collection made before nbutils kept the counts)"
    noun = rare.get("noun", "neuron")
    if not rare["count"]:
        return f"no dead or rare {noun}s (all are active on at least min_active={rare['min_active']} tokens)"
    asked = f"; {rare['skipped_of_asked']} of those asked for were skipped" if rare.get("skipped_of_asked") else ""
    return (
        f"{rare['count']} {noun}s are dead or rare ({rare['dead']} never active; active on fewer than "
        f"{rare['min_active']} tokens): not explained or scored{asked}. First: {rare_units_text(rare, 5)}"
    )


def needs_work(entry: Any | None) -> bool:
    """Not done yet, or failed for a reason a retry can fix (a server error, not an unusable reply)."""
    return entry is None or bool(entry.retryable)


class StageHadFailures(Exception):
    """Raised after a stage finished with every unit failed (or any, when asked), so the run exits non-zero."""


def first_failures(summary: dict[str, Any], n: int = 3) -> str:
    """``L0 N1: <reason>; ...`` for the first ``n`` failures of a summary."""
    return "; ".join(f"{unit_name(key_of(f))}: {f['failure']}" for f in summary["failures"][:n])


def check_failures(stage_dir: str | Path, fail_on_errors: bool = False) -> str:
    """One line counting a stage's successes and failures (from its summary.json), with the first reasons.

    Raises StageHadFailures (so the stage, and ``nbutils run``, exit non-zero) when every unit failed, or
    when any failed and ``fail_on_errors`` is set."""
    summary = json.loads(summary_path(stage_dir).read_text())
    line = f"{summary['succeeded']} succeeded, {summary['failed']} failed ({summary['retryable']} will be retried on rerun)"
    if not summary["failed"]:
        return line
    reasons = first_failures(summary)
    if summary["failed"] == summary["neurons"]:
        raise StageHadFailures(f"every neuron failed ({line}). First failures: {reasons}")
    if fail_on_errors:
        raise StageHadFailures(f"{line}. First failures: {reasons}")
    return f"{line}. First failures: {reasons}"


def triage_line(stage_dir: str | Path) -> str:
    """One line on what ``llm_when="rule_below:X"`` decided and saved (from stage 02's summary.json)."""
    summary = json.loads(summary_path(stage_dir).read_text())
    triage, name = summary.get("triage"), summary.get("explainer")
    # summaries from before explainers had names recorded the backend under "explainer"
    backend = summary.get("explainer_backend", None if name in ("llm", "triage") else name)
    if not triage:
        if name == "rules":
            return "the rules explainer explained every unit: no LLM was asked (llm_when applies to an LLM explainer)"
        if "explainer_backend" in summary and name != "llm":
            asked = f"its LLM backend {backend}" if backend else "no LLM"
            return f"the {name} explainer explained every unit ({asked}; llm_when applies to the llm explainer)"
        return f"llm_when=always: every unit went to the {backend + ' ' if backend else ''}explainer backend"
    line = (
        f"llm_when=rule_below:{triage['threshold']}: {triage['kept_rule']} of {triage['units']} units kept their "
        f"rule (calibration correlation >= {triage['threshold']}), {triage['sent_to_llm']} went to the LLM"
    )
    if triage["requests_saved"] is not None:
        line += f"; saved ~{triage['requests_saved']:g} explainer requests"
        line += f" (~{triage['cost_saved']:.4f} in prices' currency)" if triage["cost_saved"] is not None else ""
        line += " and the kept units' simulator requests in stage 03 (a rule is simulated exactly)"
    return line + (f" ({triage['note']})" if triage.get("note") else "")
