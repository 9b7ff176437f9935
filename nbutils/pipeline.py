"""The stage chain: run the numbered notebooks in order with papermill into ``outputs/<run_id>/``.

Each stage is a notebook with a cell tagged ``parameters``. The chain

- checks every parameter against the schema in `nbutils.config` before anything runs (names, types, choices,
  paths resolved from the folder the command runs in), and fills in the defaults;
- gives each stage the parameters its notebook declares, plus its own artifact folder (``output_dir``) and
  the folders of the stages before it (``collection_dir`` ..., or ``run_dir`` for stages 04 and 05), which
  the chain owns;
- writes the executed notebook to ``outputs/<run_id>/<notebook>.ipynb`` and, when the stage succeeds,
  ``outputs/<run_id>/<stage>/manifest.json`` with the parameters, package versions and every artifact's
  size and SHA-256;
- skips a stage whose manifest already records the same parameters, so rerunning the same command with the
  same run id continues an interrupted run (stage 01 also resumes from its own checkpoint). The default run
  id is a hash of every effective parameter, so stating a default explicitly lands in the same run.

Kernels talk over IPC sockets (no TCP), their output reaches the console once, and a finished kernel is
shut down without the interrupt signal jupyter_client sends by default.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbutils.config import OWNED, PRESETS, check_parameters, did_you_mean, schema
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


def notebooks_dir() -> Path:
    """The stage notebooks: ``nbutils/notebooks/`` in an installed package (pyproject.toml maps the
    repository's ``notebooks/`` there), else the repository's ``notebooks/`` (an editable install)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "notebooks", here.parent / "notebooks"):
        if all((folder / s.notebook).is_file() for s in STAGES):
            return folder
    raise UserError(
        f"The stage notebooks are missing: neither {here / 'notebooks'} nor {here.parent / 'notebooks'} holds them.",
        'Reinstall nbutils (pip install . or pip install -e ".[dev]" from the repository), or pass --notebooks.',
    )


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """The names and default values a notebook declares in its ``parameters`` cell (literals only)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise UserError(f"{notebook} has no cell tagged 'parameters'.", "Tag the cell holding its parameters.")
    out: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                raise UserError(
                    f"The parameters cell of {notebook} sets {node.targets[0].id} to an expression, not a literal "
                    "(papermill inserts its values after that cell, so a value derived there is never recomputed).",
                    "Keep only literals (numbers, strings, lists, None) in the parameters cell; derive values in the "
                    "next cell.",
                ) from None
    return out


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars and lists (``3``, ``[0, 5]``), else the plain string.
    ``null``, ``~`` and ``None`` all mean None."""
    import yaml

    if text.strip() == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | Path) -> dict[str, Any]:
    """Parameters from a YAML file of ``name: value`` lines (``None`` is null there too)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist.", "Check the path given to --config.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark, start = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = (
            f" ({e.context} that starts at line {start.line + 1})" if start and getattr(e, "context", None) else ""
        )
        raise UserError(
            f"{path} is not valid YAML{where}: {what}{context}.",
            "Write it as `name: value` lines, e.g. `n_excerpts: 500` and `layers: [0, 15]`.",
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of parameter names to values.", "Write it as `name: value` lines.")
    return {k: None if v == "None" else v for k, v in data.items()}


def effective_parameters(
    params: dict[str, Any] | None = None, preset: str | None = None, cwd: str | Path | None = None
) -> dict[str, Any]:
    """Every parameter's value for a run: the schema defaults, then the preset's, then the given ones;
    checked and with paths made absolute (see `nbutils.config.check_parameters`)."""
    if preset is not None and preset not in PRESETS:
        raise UserError(
            f"Unknown preset {preset!r}.{did_you_mean(preset, list(PRESETS))}", f"Use one of: {', '.join(PRESETS)}."
        )
    return check_parameters({**(PRESETS[preset] if preset else {}), **(params or {})}, cwd)


def default_run_id(effective: dict[str, Any]) -> str:
    """``run-<hash of every effective parameter>``: the same run lands in (and resumes) the same folder,
    whether a default is stated or not."""
    digest = hashlib.sha256(json.dumps(effective, sort_keys=True, default=str).encode()).hexdigest()[:8]
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


def _kernel_manager_class():
    """A kernel manager whose kernels use IPC sockets in a private temporary folder (no TCP port, so none of
    ipykernel's warning about unencrypted TCP) and are shut down without first being sent SIGINT (which a
    finished, idle kernel answers with a spurious "KeyboardInterrupt caught in kernel")."""
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(tempfile.gettempdir(), f"nbutils-kernel-{uuid.uuid4().hex[:12]}")

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return QuietKernelManager


def _stage_parameters(
    stage: Stage, declared: dict[str, Any], effective: dict[str, Any], run_dir: Path
) -> dict[str, Any]:
    """What a stage receives: its declared parameters' effective values and the folders the chain owns."""
    out = {k: effective[k] for k in declared if k in effective}
    unknown = sorted(set(declared) - set(schema()) - set(OWNED))
    if unknown:
        raise UserError(
            f"{stage.notebook} declares parameters {unknown} that nbutils.config.RunConfig does not have.",
            "Add them to RunConfig (with type, default and help) or remove them from the notebook.",
        )
    upstream = {s.provides: run_dir / s.folder for s in STAGES if s.folder < stage.folder}
    for name, folder in upstream.items():
        if name in declared and "run_dir" not in declared:
            if not folder.is_dir():
                raise UserError(
                    f"Stage {stage.folder} needs the output of an earlier stage ({name}), which is not in {run_dir}.",
                    "Run the earlier stages first (leave out --stages), or reuse the run id of a run that has them.",
                )
            out[name] = str(folder)
    if "run_dir" in declared:
        out["run_dir"] = str(run_dir)
    return out | {"output_dir": str(run_dir / stage.folder)}


def _execute(stage: Stage, nb_dir: Path, run_dir: Path, params: dict[str, Any], cwd: Path, log: Any) -> None:
    """Run one stage notebook with papermill, then write its manifest. Raises `StageFailed`."""
    import papermill

    executed = run_dir / stage.notebook
    log(f"[{stage.folder}] running {stage.notebook} -> {executed}")
    started = time.time()
    os.environ["NBUTILS_PLAIN_PROGRESS"] = "1"  # the kernel inherits it: text progress, streamed below
    try:
        papermill.execute_notebook(
            str(nb_dir / stage.notebook),
            str(executed),
            parameters=params,
            cwd=str(cwd),
            kernel_name="python3",
            progress_bar=False,
            log_output=False,  # True would print the kernel's stderr a second time, through logging
            stdout_file=sys.stdout,
            stderr_file=sys.stderr,
            kernel_manager_class=_kernel_manager_class(),
        )
    except papermill.PapermillExecutionError as e:
        raise StageFailed(stage.folder, executed, f"{e.ename}: {e.evalue}") from None
    folder = run_dir / stage.folder
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        folder / "manifest.json",
        {
            "stage": stage.folder,
            "notebook": str(executed.relative_to(run_dir)),
            "parameters": params,
            "versions": _versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "command": " ".join(sys.argv),
            "artifacts": artifact_list(folder, run_dir),
        },
    )
    log(f"[{stage.folder}] done in {time.time() - started:.0f} s" + failure_line(folder))


def failure_line(folder: Path, first: int = 3) -> str:
    """``; 1 of 10 neurons failed: L0 N1: <reason>; ...`` from a stage's summary.json ("" when none failed)."""
    path = folder / "summary.json"
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    if not summary.get("failed"):
        return ""
    reasons = "; ".join(f"L{f['layer']} N{f['neuron']}: {f['failure']}" for f in summary["failures"][:first])
    retry = f", {summary['retryable']} retried on rerun" if summary.get("retryable") else ""
    return f"; {summary['failed']} of {summary['neurons']} neurons failed{retry}. First: {reasons}"


def run_pipeline(
    params: dict[str, Any] | None = None,
    run_id: str | None = None,
    output_root: str | Path = "outputs",
    stages: list[str] | None = None,
    nb_dir: str | Path | None = None,
    log: Any = print,
    preset: str | None = None,
    cwd: str | Path | None = None,
) -> Path:
    """Execute the stage notebooks in order; return the run folder. Raises `StageFailed` on a failed stage.

    Every parameter is checked (and relative paths resolved from ``cwd``, default the current folder) before
    any stage starts."""
    nb_dir = Path(nb_dir) if nb_dir else notebooks_dir()
    cwd = Path(cwd or os.getcwd()).resolve()
    chosen = [s for s in STAGES if stages is None or s.folder[:2] in stages or s.folder in stages]
    if not chosen:
        raise UserError(f"No stage matches {stages}.", f"Stages are: {', '.join(s.folder for s in STAGES)}.")
    effective = effective_parameters(params, preset, cwd)
    run_dir = (cwd / Path(output_root) / (run_id or default_run_id(effective))).resolve()
    declared = {s.notebook: declared_parameters(nb_dir / s.notebook) for s in STAGES}
    _stage_parameters(chosen[0], declared[chosen[0].notebook], effective, run_dir)  # earlier stages' output?
    run_dir.mkdir(parents=True, exist_ok=True)
    upstream_ran = False
    for stage in chosen:
        stage_params = _stage_parameters(stage, declared[stage.notebook], effective, run_dir)
        manifest = run_dir / stage.folder / "manifest.json"
        if not upstream_ran and _stage_done(manifest, stage_params):
            verify_artifacts(manifest, run_dir)
            log(f"[{stage.folder}] already done in {run_dir}; skipping")
            continue
        upstream_ran = True  # later stages run too (each resumes and skips finished neurons)
        _execute(stage, nb_dir, run_dir, stage_params, cwd, log)
    return run_dir


def where_to_look(run_dir: Path) -> list[str]:
    """Lines naming what a finished run produced, as paths: the neuron page, the report and its figures."""
    lines = [f"run folder:   {run_dir}"]
    page = run_dir / "04_inspect" / "run.html"
    report = run_dir / "05_report.ipynb"
    figures = sorted((run_dir / "05_report" / "figures").glob("*.png"))
    if page.is_file():
        lines.append(f"neuron page:  {page}   (open in a browser)")
    if report.is_file():
        lines.append(f"report:       {report}   (open in JupyterLab; figures inline)")
    if figures:
        lines.append(f"figures:      {figures[0].parent}/ ({', '.join(p.name for p in figures)})")
    inspect = notebooks_dir() / STAGES[3].notebook
    lines.append(f'interactive:  open {inspect} in JupyterLab and set run_dir = "{run_dir}"')
    return lines


class StageFailed(Exception):
    """A stage notebook raised; the executed notebook (with the error in it) is at ``notebook``."""

    def __init__(self, stage: str, notebook: Path, reason: str) -> None:
        self.stage, self.notebook, self.reason = stage, notebook, reason
        super().__init__(f"stage {stage} failed: {reason}\nexecuted notebook: {notebook}")
