"""Where everything in a run folder lives. No other module builds a path inside a run.

    outputs/<run_id>/                        `RunLayout`
        01_collect_activations.ipynb ...     the executed stage notebooks
        01_collect/                          `CollectionLayout`: the records (format: nbutils.core.records)
        02_explain/  03_score/               `ResultsLayout`: per-unit results, their JSON lines, summaries
        04_inspect/run.html                  the static page of the run
        05_report/figures/*.png              the report's figures
        exports/                             ``nbutils export-jsonl``: explanations.jsonl, scores.jsonl
        <stage>/manifest.json                parameters, versions, every artifact's size and SHA-256

Each stage folder of results holds its results store ``results.sqlite`` (`nbutils.core.store`: every unit
side's entry and, for stage 03, its scorers' details and numbers; ``parts/`` while shards of a distributed
run write), ``summary.json`` (successes and failures), ``usage.json`` (LLM tokens and cost) and ``parameters.json`` (what it ran with).
Folders written before the store hold ``neurons/`` and ``simulations/`` files (one JSON file per unit side)
instead; they are still read. Folders written before the JSON-lines files became exports on request hold
``explanations.jsonl`` or ``scores.jsonl`` (`ResultsLayout.jsonl`): stage 03 reads stage 02's choice from it
where the store recorded none, and a folder holding only such a file (written by hand) is explained by it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nbutils.core.errors import UserError
from nbutils.core.units import Key

LATEST = "latest"  # a run folder's name that means: the newest run beside it (`find_run`)


@dataclass(frozen=True)
class Stage:
    notebook: str
    """Notebook file name in the notebooks folder (and of its executed copy in the run folder)."""
    folder: str
    """Artifact folder of the stage inside the run folder."""
    provides: str
    """Parameter name under which later stages receive this stage's folder."""


STAGES: tuple[Stage, ...] = (
    Stage("01_collect_activations.ipynb", "01_collect", "collection_dir"),
    Stage("02_explain_neurons.ipynb", "02_explain", "explanation_dir"),
    Stage("03_simulate_and_score.ipynb", "03_score", "score_dir"),
    Stage("04_inspect_neurons.ipynb", "04_inspect", "inspect_dir"),
    Stage("05_report.ipynb", "05_report", "report_dir"),
)


MANIFEST = "manifest.json"
"""A stage folder's manifest (`nbutils.run.manifests`)."""


def stem(key: Key) -> str:
    """The file stem of a unit side's results in folders written before the store: ``L{layer}_N{index}_{sign}``."""
    return f"L{key[0]}_N{key[1]}_{key[2]}"


class StoreLayout:
    """Where a stage folder's results store keeps its files (`nbutils.core.store`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.main = self.root / "results.sqlite"
        self.parts = self.root / "parts"
        """One database per shard of a distributed stage (``<shard>.sqlite``), removed once merged."""
        self.old_units = self.root / "neurons"
        """Before the store: one JSON file per unit side (`stem`), and for stage 03 ``simulations/`` beside it."""
        self.old_details = self.root / "simulations"

    def part(self, name: str) -> Path:
        return self.parts / f"{name}.sqlite"

    def old_unit(self, key: Key) -> Path:
        return self.old_units / f"{stem(key)}.json"

    def old_detail(self, key: Key) -> Path:
        return self.old_details / f"{stem(key)}.json"


class CollectionLayout:
    """A stage-01 folder: the collection's metadata, excerpt tables and per-layer arrays."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.meta = self.root / "collection.json"
        self.fingerprint = self.root / "fingerprint.txt"
        self.checkpoint = self.root / "checkpoint.pt"
        self.shards = self.root / "shards"
        """Partial collector states of a sharded collection (``shard-NNN.pt``), removed once merged."""
        self.tokens = self.root / "excerpts" / "tokens.npy"
        self.places = self.root / "excerpts" / "places.npy"
        self.vocab = self.root / "excerpts" / "vocab.json"
        self.random_sample = self.root / "random_sample.npy"

    def layer_dir(self, layer: int) -> Path:
        return self.root / f"layer_{layer:03d}"

    def shard(self, i: int) -> Path:
        return self.shards / f"shard-{i:03d}.pt"

    def array(self, layer: int, name: str) -> Path:
        """A per-layer array file (``neurons``, ``stats``, ``top_acts`` ...)."""
        return self.layer_dir(layer) / f"{name}.npy"


class ResultsLayout:
    """A stage folder of per-unit results (stage 02 or 03)."""

    def __init__(self, root: str | os.PathLike, jsonl_name: str) -> None:
        self.root = Path(root)
        self.store = StoreLayout(self.root)
        self.jsonl = self.root / jsonl_name
        self.summary = summary_path(self.root)
        self.usage = usage_path(self.root)
        self.manifest = self.root / MANIFEST
        self.parameters = self.root / "parameters.json"
        """The stage's parameters as it last ran (whoever ran it: the chain, a notebook or a call), so live
        calls on the run (`nbutils.open_run`) use the same ones."""


def summary_path(stage_dir: str | os.PathLike) -> Path:
    """A stage's count of succeeded and failed units."""
    return Path(stage_dir) / "summary.json"


def usage_path(stage_dir: str | os.PathLike) -> Path:
    """An LLM stage's token counts and cost estimate."""
    return Path(stage_dir) / "usage.json"


def explanations(root: str | os.PathLike) -> ResultsLayout:
    """Stage 02's folder."""
    return ResultsLayout(root, "explanations.jsonl")


def scores(root: str | os.PathLike) -> ResultsLayout:
    """Stage 03's folder."""
    return ResultsLayout(root, "scores.jsonl")


class RunLayout:
    """A run folder written by ``nbutils run`` (``outputs/<run_id>``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.collect = CollectionLayout(self.stage_dir("01_collect"))
        self.explain = explanations(self.stage_dir("02_explain"))
        self.score = scores(self.stage_dir("03_score"))
        self.page = page_path(self.stage_dir("04_inspect"))
        self.report = self.stage_dir("05_report")
        self.figures = figures_dir(self.report)
        self.exports = self.root / "exports"
        """JSON-lines exports of stages 02 and 03 (outside the stage folders, so no manifest lists them)."""

    def stage_dir(self, folder: str) -> Path:
        return self.root / folder

    def executed(self, stage: Stage) -> Path:
        """The executed copy of a stage notebook."""
        return self.root / stage.notebook

    def manifest(self, stage: Stage) -> Path:
        return self.stage_dir(stage.folder) / MANIFEST

    def summary(self, stage: Stage) -> Path:
        return summary_path(self.stage_dir(stage.folder))


def find_run(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` itself, or for ``<folder>/latest`` (the viewer's and the report's default, when no folder
    of that name exists) the run in ``<folder>`` whose collection changed last: a notebook opened in
    JupyterLab without edits shows the newest run. No run there is a `UserError` that says how to make one."""
    path = Path(run_dir)
    if path.name != LATEST or path.exists():
        return path
    runs = [p for p in path.parent.glob("*/01_collect") if p.is_dir()] if path.parent.is_dir() else []
    if not runs:
        raise UserError(
            f"There is no run under {path.parent.resolve()} yet (no folder there holds a 01_collect/ stage).",
            "Make one: `python -m nbutils run --preset quick` (minutes) or `python -m nbutils run` (the main job) "
            "from the repository root, or run notebooks 01-03; or set run_dir to a run folder (outputs/run-...).",
        )
    return max(runs, key=lambda p: max(q.stat().st_mtime for q in [p, *p.iterdir()])).parent


def cache_dir() -> Path:
    """The folder for converted models and the LLM request cache (``$NBUTILS_CACHE`` overrides the default,
    ``~/.cache/nbutils``)."""
    return Path(os.environ.get("NBUTILS_CACHE") or Path.home() / ".cache" / "nbutils")


def stage_output(run_dir: str | os.PathLike | None, output_dir: str | os.PathLike | None, folder: str) -> Path:
    """A stage's output folder: ``output_dir`` when given, else the stage's folder in ``run_dir``."""
    if output_dir is not None:
        return Path(output_dir)
    return RunLayout(run_dir).stage_dir(folder)


def figures_dir(report_dir: str | os.PathLike) -> Path:
    """Where a report folder keeps its figures."""
    return Path(report_dir) / "figures"


def page_path(inspect_dir: str | os.PathLike) -> Path:
    """Where an inspect folder keeps the static page of the run."""
    return Path(inspect_dir) / "run.html"
