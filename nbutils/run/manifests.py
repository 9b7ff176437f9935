"""Stage manifests: what a finished stage ran with, and a checksum of everything it wrote.

``<stage>/manifest.json`` (`nbutils.core.layout.RunLayout.manifest`) holds the parameters, the package
versions and git commit, the timing, the command line, and every artifact's size and SHA-256. The chain skips
a stage whose manifest records the same parameters (and no retryable failures), after checking its
artifacts against it, so a truncated or altered file is named instead of silently reused.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nbutils.core.errors import UserError
from nbutils.core.integrity import changed_files, fold_log, repair_fix, sha256, sqlite_problem
from nbutils.core.io import atomic_write_json, read_json
from nbutils.core.layout import MANIFEST


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


TRANSIENT = ("-wal", "-shm", "-journal")
"""Suffixes of SQLite's log files beside a database that is open (folded into it when closed)."""


def artifact_list(folder: Path, run_dir: Path) -> list[dict[str, Any]]:
    """Every file under a stage folder (but the manifest, hidden files and a database's transient log files)
    with its size, modification time and checksum. A database is first checked by SQLite itself: a checksum
    is never written over a file that was not verified."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST and not p.name.endswith(TRANSIENT)
    )  # fmt: skip
    for p in files:
        if p.suffix == ".sqlite" and not fold_log(p):  # a viewer mid-query: the checksum would miss writes
            raise UserError(f"{p}'s write-ahead log could not be folded in (a reader held it for 5 s).",
                            "Close the viewer or notebook reading this run, then rerun the same command.")  # fmt: skip
        if p.suffix == ".sqlite" and (problem := sqlite_problem(p)) is not None:
            raise UserError(f"{p} is damaged ({problem}); the stage's manifest was not written.", repair_fix(run_dir))
    return [
        {"path": str(p.relative_to(run_dir)), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256(p)}
        for p in files
        for st in [p.stat()]
    ]


def stage_done(manifest: Path, summary_path: Path, params: dict[str, Any]) -> bool:
    """Finished with the same parameters, and without failures that a rerun could fix (see summary.json)."""
    if not manifest.is_file():
        return False
    try:
        same = json.loads(manifest.read_text()).get("parameters") == json.loads(json.dumps(params))
    except json.JSONDecodeError:
        return False
    summary = read_json(summary_path)
    if same and summary is not None:
        return not summary.get("retryable")
    return same


def verify_artifacts(manifest: Path, run_dir: Path) -> None:
    """Check every artifact a stage's manifest lists against its recorded size and SHA-256."""
    changed = [why for _, why in changed_files(manifest.parent, run_dir)]
    if changed:
        more = f" (and {len(changed) - 1} more file{'s' if len(changed) > 2 else ''})" if len(changed) > 1 else ""
        raise UserError(f"{changed[0]}{more}.", repair_fix(run_dir))


def write_manifest(
    path: Path, stage: str, notebook: str, params: dict[str, Any], started: float, run_dir: Path
) -> None:
    """A finished stage's manifest (written after its notebook ran without error)."""
    atomic_write_json(
        path,
        {
            "stage": stage,
            "notebook": notebook,
            "parameters": params,
            "versions": _versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "command": " ".join(sys.argv),
            "artifacts": artifact_list(path.parent, run_dir),
        },
    )
