"""Read-only access to a run folder for the viewer and the report: records, explanations, scores, simulations.

A run folder holds the stage folders ``01_collect``, ``02_explain``, ``03_score`` (see ``nbutils.pipeline``).
Only the collection is required: neurons that were not explained or scored yet still have their excerpts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from nbutils.errors import UserError
from nbutils.explain import NEURONS
from nbutils.flags import explanation_notes
from nbutils.records import NeuronEntries, NeuronRecord, RecordStore
from nbutils.simulate import simulation_path

Key = tuple[int, int, str]
"""(layer, neuron, sign) of an explained neuron; sign is "positive" or "negative"."""

SORTS = ("layer, neuron", "score: best first", "score: worst first", "baseline: best first")


def judge_score(result: dict[str, Any] | None, task: str, metric: str = "balanced_accuracy") -> float | None:
    """A detection or fuzzing metric of a stage-03 result (None when missing, undefined or not finite)."""
    value = (((result or {}).get(task) or {}).get(metric) or {}).get("value")
    return value if value is not None and math.isfinite(value) else None


def main_score(result: dict[str, Any] | None, which: str = "top_and_random") -> float | None:
    """The pooled correlation of a stage-03 result (None when missing or undefined)."""
    if not result:
        return None
    return ((result.get(which) or {}).get("correlation") or {}).get("value")


@dataclass
class RunView:
    """Everything the viewer and the report read from one run."""

    store: RecordStore
    explanations: dict[Key, dict[str, Any]] = field(default_factory=dict)
    scores: dict[Key, dict[str, Any]] = field(default_factory=dict)
    score_dir: Path | None = None
    stage_dirs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_dirs(
        cls,
        collection_dir: str | Path,
        explanation_dir: str | Path | None = None,
        score_dir: str | Path | None = None,
    ) -> RunView:
        """Open the stage folders; the later two may be missing or empty."""
        if not (Path(collection_dir) / "collection.json").is_file():
            raise UserError(
                f"{collection_dir} holds no finished collection (collection.json is missing).",
                "Run stage 01 first (python -m nbutils run), or point the viewer at a run folder that has it.",
            )
        view = cls(store=RecordStore(collection_dir), stage_dirs={"01_collect": Path(collection_dir)})
        if explanation_dir is not None:
            view.stage_dirs["02_explain"] = Path(explanation_dir)
            view.explanations = {_key(e): e for e in NeuronEntries(Path(explanation_dir) / NEURONS).all()}
        if score_dir is not None:
            view.score_dir = Path(score_dir)
            view.stage_dirs["03_score"] = Path(score_dir)
            view.scores = {_key(r): r for r in NeuronEntries(Path(score_dir) / NEURONS).all()}
        return view

    @classmethod
    def open(
        cls,
        run_dir: str | Path | None,
        collection_dir: str | Path | None = None,
        explanation_dir: str | Path | None = None,
        score_dir: str | Path | None = None,
    ) -> RunView:
        """Open a run folder written by ``nbutils run`` (``outputs/<run_id>``); a stage folder given explicitly
        replaces that stage's folder inside it (``run_dir`` may then be None)."""
        if run_dir is None and collection_dir is None:
            raise UserError("Neither a run folder nor a collection folder was given.", "Pass run_dir=outputs/<run_id>.")
        run = Path(run_dir) if run_dir is not None else None
        return cls.from_dirs(
            collection_dir or run / "01_collect",
            explanation_dir or (run / "02_explain" if run else None),
            score_dir or (run / "03_score" if run else None),
        )

    @cached_property
    def explanation_notes(self) -> dict[Key, list[str]]:
        """Notes on explanations that copy a worked example or repeat other neurons' (`nbutils.flags`)."""
        return explanation_notes({k: e.get("explanation") for k, e in self.explanations.items()})

    def record(self, layer: int, neuron: int) -> NeuronRecord:
        return self.store.record(layer, neuron)

    def signs(self, layer: int, neuron: int) -> list[str]:
        """The explained sides of a neuron ("positive" first), or ["positive"] when it has none yet."""
        found = [s for s in ("positive", "negative") if (layer, neuron, s) in self.explanations]
        return found or ["positive"]

    def simulation(self, key: Key) -> dict[str, Any] | None:
        if self.score_dir is None:
            return None
        path = simulation_path(self.score_dir, *key)
        return json.loads(path.read_text()) if path.is_file() else None

    def usage(self) -> dict[str, dict[str, Any]]:
        """Each LLM stage's usage.json (tokens, requests, cache hits, estimated cost), where present."""
        out = {}
        for stage, folder in self.stage_dirs.items():
            path = folder / "usage.json"
            if path.is_file():
                out[stage] = json.loads(path.read_text())
        return out

    def neuron_ids(self, sort: str = SORTS[0], text: str = "") -> list[tuple[int, int]]:
        """Neurons to step through: all collected ones, or only those whose explanation contains ``text``;
        sorted by index or by score (scored neurons first, then the rest by index)."""
        if sort not in SORTS:
            raise UserError(f"Unknown sort {sort!r}.", f"Use one of: {', '.join(SORTS)}.")
        if text:
            needle = text.lower()
            ids = sorted(
                {(k[0], k[1]) for k, e in self.explanations.items() if needle in (e["explanation"] or "").lower()}
            )
        else:
            ids = [(n.layer, n.neuron) for n in self.store.all_ids()]
        if sort == SORTS[0]:
            return ids
        order = [(k[0], k[1]) for _, k in self.ranked(baseline=sort.startswith("baseline")) if k[2] == "positive"]
        if "worst" in sort:
            order.reverse()
        wanted = set(ids)
        known = [i for i in order if i in wanted]
        placed = set(known)
        return known + [i for i in ids if i not in placed]

    def ranked(self, baseline: bool = False) -> list[tuple[float, Key]]:
        """Scored neuron sides with a defined top+random score (the baseline's with ``baseline``), best first."""
        pairs = [(main_score(r.get("baseline") if baseline else r), k) for k, r in self.scores.items()]
        return sorted(((v, k) for v, k in pairs if v is not None and math.isfinite(v)), key=lambda p: -p[0])


def _key(entry: dict[str, Any]) -> Key:
    return (int(entry["layer"]), int(entry["neuron"]), str(entry["sign"]))
