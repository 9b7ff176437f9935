"""Stage manifests: what a finished stage ran with, and a checksum of everything it wrote.

``<stage>/manifest.json`` (`nbutils.core.layout.RunLayout.manifest`) holds the parameters, the package
versions and git commit, the timing, the command line, and every artifact's size and SHA-256. The chain skips
a stage whose manifest records the same parameters (and no retryable failures), after checking its
artifacts against it, so a truncated or altered file is named instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nbutils.core.errors import UserError
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TRANSIENT = ("-wal", "-shm", "-journal")
"""Suffixes of SQLite's log files beside a database that is open (folded into it when closed)."""


def artifact_list(folder: Path, run_dir: Path) -> list[dict[str, Any]]:
    """Every file under a stage folder (but the manifest, hidden files and a database's transient log files)
    with its size and checksum."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST and not p.name.endswith(TRANSIENT)
    )  # fmt: skip
    return [{"path": str(p.relative_to(run_dir)), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files]


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
