"""The stage chain: run the numbered notebooks in order into ``outputs/<run_id>/``.

Each stage is a notebook with a cell tagged ``parameters``. The chain

- checks every parameter against the schema (`nbutils.run.params`) before anything runs (names, types,
  choices, paths resolved from the folder the command runs in), and fills in the defaults;
- gives each stage the parameters its notebook declares, plus its own artifact folder (``output_dir``) and
  the folders of the stages before it (``collection_dir`` ..., or ``run_dir`` for stages 04 and 05), which
  the chain owns;
- executes it (`nbutils.run.executors`) into ``outputs/<run_id>/<notebook>.ipynb`` and, when it succeeds,
  writes its manifest (`nbutils.run.manifests`);
- skips a stage whose manifest already records the same parameters, so rerunning the same command with the
  same run id continues an interrupted run (stage 01 also resumes from its own checkpoint). The default run
  id is a hash of every effective parameter, so stating a default explicitly lands in the same run.

Every path inside the run folder comes from `nbutils.core.layout.RunLayout`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from nbutils.core.budget import Limits, check_limits
from nbutils.core.config import RunConfig, schema, unset_new
from nbutils.core.errors import UserError
from nbutils.core.failures import first_failures
from nbutils.core.io import read_json
from nbutils.core.layout import STAGES, RunLayout, Stage
from nbutils.run.executors import PapermillExecutor, StageFailed
from nbutils.run.manifests import stage_done, verify_artifacts, write_manifest
from nbutils.run.params import OWNED, PRESETS, check_parameters, did_you_mean
from nbutils.run.preflight import preflight

__all__ = ["STAGES", "StageFailed", "run_pipeline"]


def notebooks_dir() -> Path:
    """The stage notebooks: ``nbutils/notebooks/`` in an installed package (pyproject.toml maps the
    repository's ``notebooks/`` there), else the repository's ``notebooks/`` (an editable install)."""
    here = Path(__file__).resolve().parent.parent  # the nbutils package
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
    checked and with paths made absolute (see `nbutils.run.params.check_parameters`)."""
    if preset is not None and preset not in PRESETS:
        raise UserError(
            f"Unknown preset {preset!r}.{did_you_mean(preset, list(PRESETS))}", f"Use one of: {', '.join(PRESETS)}."
        )
    return check_parameters({**(PRESETS[preset] if preset else {}), **(params or {})}, cwd)


def default_run_id(effective: dict[str, Any]) -> str:
    """``run-<hash of every effective parameter>``: the same run lands in (and resumes) the same folder,
    whether a default is stated or not. Parameters of how the run is carried out (executor, shards, requests
    in flight, rate limits) are left out: the same job on Ray or with another cap continues the same run; so are
    parameters added later while at their defaults (``when_set``), so an earlier run keeps its id."""
    fields = schema()
    what = {
        k: v
        for k, v in effective.items()
        if not (k in fields and fields[k].metadata.get("how")) and not unset_new(k, v)
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"run-{digest}"


def _stage_parameters(
    stage: Stage, declared: dict[str, Any], effective: dict[str, Any], run: RunLayout
) -> dict[str, Any]:
    """What a stage receives: its declared parameters' effective values and the folders the chain owns. A
    parameter added after runs existed (``when_set``) is passed only when set: its manifest then records
    what it recorded before, and an existing run's finished stages are still found finished."""
    out = {k: effective[k] for k in declared if k in effective and not unset_new(k, effective[k])}
    unknown = sorted(set(declared) - set(schema()) - set(OWNED))
    if unknown:
        raise UserError(
            f"{stage.notebook} declares parameters {unknown} that nbutils.core.config.RunConfig does not have.",
            "Add them to RunConfig (with type, default and help) or remove them from the notebook.",
        )
    for earlier in STAGES[: STAGES.index(stage)]:
        name, folder = earlier.provides, run.stage_dir(earlier.folder)
        if name in declared and "run_dir" not in declared:
            if not folder.is_dir():
                raise UserError(
                    f"Stage {stage.folder} needs the output of an earlier stage ({name}), which is not in {run.root}.",
                    "Run the earlier stages first (leave out --stages), or reuse the run id of a run that has them.",
                )
            out[name] = str(folder)
    if "run_dir" in declared:
        out["run_dir"] = str(run.root)
    return out | {"output_dir": str(run.stage_dir(stage.folder))}


def failure_line(run: RunLayout, stage: Stage) -> str:
    """``; 1 of 10 neurons failed: L0 N1: <reason>; ...`` from a stage's summary.json ("" when none failed)."""
    summary = read_json(run.summary(stage))
    if not summary or not summary.get("failed"):
        return ""
    retry = f", {summary['retryable']} retried on rerun" if summary.get("retryable") else ""
    return f"; {summary['failed']} of {summary['neurons']} neurons failed{retry}. First: {first_failures(summary)}"


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
    run = RunLayout((cwd / Path(output_root) / (run_id or default_run_id(effective))).resolve())
    declared = {s.notebook: declared_parameters(nb_dir / s.notebook) for s in STAGES}
    _stage_parameters(chosen[0], declared[chosen[0].notebook], effective, run)  # earlier stages' output?
    to_run = _stages_to_run(chosen, declared, effective, run)
    preflight(effective, [s.folder for s in to_run])  # before anything loads or runs: seconds, no weights
    check_limits(Limits.of(RunConfig.pick(effective)), run.root, [s.folder for s in to_run])  # a budget, if any
    run.root.mkdir(parents=True, exist_ok=True)
    executor = PapermillExecutor()
    for stage in chosen:
        stage_params = _stage_parameters(stage, declared[stage.notebook], effective, run)
        if stage not in to_run:
            verify_artifacts(run.manifest(stage), run.root)
            log(f"[{stage.folder}] already done in {run.root}; skipping")
            continue
        if run.manifest(stage).is_file():  # finished before with other parameters: resumed only if intact
            verify_artifacts(run.manifest(stage), run.root)
            run.manifest(stage).unlink()  # until it finishes again, nothing vouches for its files
        log(f"[{stage.folder}] running {stage.notebook} -> {run.executed(stage)}")
        started = time.time()
        executor.execute(stage.folder, nb_dir / stage.notebook, run.executed(stage), stage_params, cwd)
        run.stage_dir(stage.folder).mkdir(parents=True, exist_ok=True)
        notebook = str(run.executed(stage).relative_to(run.root))
        write_manifest(run.manifest(stage), stage.folder, notebook, stage_params, started, run.root)
        log(f"[{stage.folder}] done in {time.time() - started:.0f} s" + failure_line(run, stage))
    return run.root


def _stages_to_run(
    chosen: list[Stage], declared: dict[str, Any], effective: dict[str, Any], run: RunLayout
) -> list[Stage]:
    """The chosen stages that will run: from the first one not already done with these parameters on (each
    later stage resumes and skips its finished units)."""
    for i, stage in enumerate(chosen):
        params = _stage_parameters(stage, declared[stage.notebook], effective, run)
        if not stage_done(run.manifest(stage), run.summary(stage), params):
            return chosen[i:]
    return []


def stage_finished(stage: Stage, effective: dict[str, Any], run: RunLayout, nb_dir: Path | None = None) -> bool:
    """Whether ``stage`` finished in ``run`` with these effective parameters (`nbutils run` would skip it)."""
    declared = declared_parameters((nb_dir or notebooks_dir()) / stage.notebook)
    return stage_done(run.manifest(stage), run.summary(stage), _stage_parameters(stage, declared, effective, run))


def where_to_look(run_dir: Path) -> list[str]:
    """Lines naming what a finished run produced, as paths: the neuron page, the report and its figures."""
    run = RunLayout(run_dir)
    lines = [f"run folder:   {run.root}"]
    report = run.executed(STAGES[4])
    figures = sorted(run.figures.glob("*.png"))
    if run.page.is_file():
        lines.append(f"neuron page:  {run.page}   (open in a browser)")
    if report.is_file():
        lines.append(f"report:       {report}   (open in JupyterLab; figures inline)")
    if figures:
        lines.append(f"figures:      {run.figures}/ ({', '.join(p.name for p in figures)})")
    # ways in that name this run, so they work from any folder, output root and install (the package's own
    # notebook opens the newest run under the repository's outputs/, which may be another)
    viewer = run.executed(STAGES[3])
    if viewer.is_file():
        lines.append(f"viewer:       open {viewer} in JupyterLab and run it (its run_dir is this run)")
    lines.append(f"interactive:  import nbutils; run = nbutils.open_run({str(run.root)!r})   (in JupyterLab or Python)")
    return lines
