"""The stage chain: run the numbered notebooks in order with papermill into ``outputs/<run_id>/``.

Each stage is a notebook in ``notebooks/`` with a cell tagged ``parameters``. The chain

- checks every user parameter against the parameters the stage notebooks declare (papermill only warns
  about unknown names; here they are refused before anything runs);
- gives each stage the parameters it declares, plus its own artifact folder (``output_dir``) and the
  folders of the stages before it (``collection_dir`` ...), which the chain owns;
- writes the executed notebook to ``outputs/<run_id>/<notebook>.ipynb`` and, when the stage succeeds,
  ``outputs/<run_id>/<stage>/manifest.json`` with the parameters, package versions and every artifact's
  size and SHA-256;
- skips a stage whose manifest already records the same parameters, so rerunning the same command with the
  same run id continues an interrupted run (stage 01 also resumes from its own checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbutils.errors import UserError
from nbutils.records import atomic_write_json


@dataclass(frozen=True)
class Stage:
    notebook: str
    """Notebook file name in the notebooks folder."""
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

OWNED = {"output_dir"} | {s.provides for s in STAGES}
"""Parameters the chain sets itself; users cannot pass them."""

MAIN_JOB: dict[str, Any] = {
    "model": "embedded",
    "corpus": "embedded",
    "layers": [0, 7, 15, 22, 29],
    "neurons": None,
    "n_excerpts": 4000,
    "excerpt_len": 64,
    "top_k": 20,
    "n_random": 20,
    "band_size": 5,
    "batch_size": 32,
    "seed": 0,
    "explain_neurons": 2,
    "n_samples": 1,
    "judge_per_class": 10,
}
"""The main job's defaults (`python -m nbutils run` with no arguments): SmolLM2-135M-Instruct on the
embedded corpus, 4,000 excerpts of 64 tokens (256k tokens), every neuron of five layers spread from first
to last; then 2 neurons per layer explained, simulated and scored (correlation, detection and fuzzing with
10 items per class); then the viewer's static page and the report. Notebook defaults are smaller, sized for CI."""


def notebooks_dir() -> Path:
    """The repository's notebooks folder (the package is installed in editable mode from the repository)."""
    return Path(__file__).resolve().parent.parent / "notebooks"


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """The parameters a notebook declares in its ``parameters`` cell, with their default values."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars and lists (``3``, ``[0, 5]``, ``null``), else the plain string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist.", "Check the path given to --config.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of parameter names to values.", "Write it as `name: value` lines.")
    return data


def check_parameters(
    params: dict[str, Any], stages: list[Stage], nb_dir: Path, strict: bool = True
) -> dict[str, dict[str, Any]]:
    """Split parameters by stage; if ``strict``, refuse names no stage declares, or that the chain owns."""
    declared = {s.notebook: declared_parameters(nb_dir / s.notebook) for s in stages}
    known = {name for d in declared.values() for name in d} - OWNED
    owned = sorted(set(params) & OWNED)
    if strict and owned:
        raise UserError(
            f"Parameter(s) {owned} are set by the pipeline itself (each stage's folder inside the run folder).",
            "Leave them out; choose where runs go with --output-root and --run-id.",
        )
    unknown = sorted(set(params) - known)
    if strict and unknown:
        raise UserError(
            f"Unknown parameter(s) {unknown}: no stage notebook declares them.",
            f"Use one of: {', '.join(sorted(known))} (see `nbutils run --list-params`).",
        )
    return {
        s.notebook: {k: v for k, v in params.items() if k in declared[s.notebook] and k not in OWNED} for s in stages
    }


def default_run_id(params: dict[str, Any]) -> str:
    """``run-<hash of the parameters>``: the same command lands in (and resumes) the same run folder."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"run-{digest}"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("nbutils", "torch", "transformers", "numpy", "papermill"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        )
        out["git_commit"] = commit.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_list(folder: Path, run_dir: Path) -> list[dict[str, Any]]:
    """Every file under a stage folder (but the manifest and hidden files) with its size and checksum."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"
    )
    return [{"path": str(p.relative_to(run_dir)), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files]


def _stage_done(manifest: Path, params: dict[str, Any]) -> bool:
    """Finished with the same parameters, and without failures that a rerun could fix (see summary.json)."""
    if not manifest.is_file():
        return False
    try:
        same = json.loads(manifest.read_text()).get("parameters") == json.loads(json.dumps(params))
    except json.JSONDecodeError:
        return False
    summary = manifest.parent / "summary.json"
    if same and summary.is_file():
        return not json.loads(summary.read_text()).get("retryable")
    return same


def verify_artifacts(manifest: Path, run_dir: Path) -> None:
    """Check every artifact a stage's manifest lists against its recorded size and SHA-256."""
    for art in json.loads(manifest.read_text())["artifacts"]:
        path = run_dir / art["path"]
        fix = (
            f"Restore the file, or delete {manifest.parent} and rerun the same command to recompute that stage "
            "(and the stages after it)."
        )
        if not path.is_file():
            raise UserError(f"{path} is listed in {manifest} but is missing.", fix)
        if path.stat().st_size != art["bytes"] or _sha256(path) != art["sha256"]:
            raise UserError(
                f"{path} was truncated or altered after its stage wrote it (size or SHA-256 differs from {manifest}).",
                fix,
            )


def run_pipeline(
    params: dict[str, Any] | None = None,
    run_id: str | None = None,
    output_root: str | Path = "outputs",
    stages: list[str] | None = None,
    nb_dir: str | Path | None = None,
    log: Any = print,
) -> Path:
    """Execute the stage notebooks in order; return the run folder. Raises `StageFailed` on a failed stage."""
    import papermill

    nb_dir = Path(nb_dir) if nb_dir else notebooks_dir()
    chosen = [s for s in STAGES if stages is None or s.folder[:2] in stages or s.folder in stages]
    if not chosen:
        raise UserError(f"No stage matches {stages}.", f"Stages are: {', '.join(s.folder for s in STAGES)}.")
    check_parameters(params or {}, list(STAGES), nb_dir)
    by_stage = check_parameters({**MAIN_JOB, **(params or {})}, chosen, nb_dir, strict=False)
    run_id = run_id or default_run_id(params or {})
    run_dir = (Path(output_root) / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    upstream = {s.provides: str(run_dir / s.folder) for s in STAGES}
    upstream_ran = False
    for stage in chosen:
        declared = declared_parameters(nb_dir / stage.notebook)
        stage_params = {
            **by_stage[stage.notebook],
            **{k: v for k, v in upstream.items() if k in declared and k != stage.provides},
            "output_dir": str(run_dir / stage.folder),
        }
        missing = [k for k, v in upstream.items() if k in declared and k != stage.provides and not Path(v).is_dir()]
        if missing:
            raise UserError(
                f"Stage {stage.folder} needs the output of an earlier stage ({', '.join(missing)}), "
                f"which is not in {run_dir}.",
                "Run the earlier stages first (leave out --stages), or reuse the run id of a run that has them.",
            )
        manifest = run_dir / stage.folder / "manifest.json"
        executed = run_dir / stage.notebook
        if not upstream_ran and _stage_done(manifest, stage_params):
            verify_artifacts(manifest, run_dir)
            log(f"[{stage.folder}] already done in {run_dir}; skipping")
            continue
        upstream_ran = True  # later stages run too (each resumes and skips finished neurons)
        log(f"[{stage.folder}] running {stage.notebook} -> {executed}")
        started = time.time()
        os.environ["NBUTILS_PLAIN_PROGRESS"] = "1"  # the kernel inherits it: text progress, streamed below
        try:
            papermill.execute_notebook(
                str(nb_dir / stage.notebook),
                str(executed),
                parameters=stage_params,
                cwd=str(nb_dir),
                kernel_name="python3",
                progress_bar=False,
                log_output=True,
                stdout_file=sys.stdout,
                stderr_file=sys.stderr,
            )
        except papermill.PapermillExecutionError as e:
            raise StageFailed(stage.folder, executed, f"{e.ename}: {e.evalue}") from None
        (run_dir / stage.folder).mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            manifest,
            {
                "stage": stage.folder,
                "notebook": str(executed.relative_to(run_dir)),
                "parameters": stage_params,
                "versions": _versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "seconds": round(time.time() - started, 1),
                "command": " ".join(sys.argv),
                "artifacts": artifact_list(run_dir / stage.folder, run_dir),
            },
        )
        log(f"[{stage.folder}] done in {time.time() - started:.0f} s")
    return run_dir


class StageFailed(Exception):
    """A stage notebook raised; the executed notebook (with the error in it) is at ``notebook``."""

    def __init__(self, stage: str, notebook: Path, reason: str) -> None:
        self.stage, self.notebook, self.reason = stage, notebook, reason
        super().__init__(f"stage {stage} failed: {reason}\nexecuted notebook: {notebook}")
