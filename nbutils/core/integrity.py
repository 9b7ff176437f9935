"""Whether a finished stage's files are still what it wrote, and the one way to repair a run that is not.

A finished stage's ``manifest.json`` lists every file it wrote with its size, modification time and SHA-256
(`nbutils.run.manifests`). `changed_files` compares a stage folder with it: ``cheap`` compares sizes and
modification times only (a stat per file, so a view of a 307,200-unit run opens in milliseconds) and hashes
just the files whose stat differs; otherwise every file is hashed. `sqlite_problem` asks SQLite itself
(``PRAGMA integrity_check``), which finds damage a stage that only reads some pages would never meet.

Every message about a damaged or altered run gives one path, `repair_fix`: ``nbutils check <run> --repair``
(`nbutils.run.repair`) keeps what is intact, and the same ``nbutils run`` command recomputes the rest.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from nbutils.core.layout import MANIFEST


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def repair_fix(run_dir: Path | str) -> str:
    """The fix every message about a damaged or altered run gives."""
    return (
        f"Run `nbutils check {run_dir} --repair` (it keeps every intact file and unit), then the same `nbutils run` "
        "command, which recomputes only what was damaged."
    )


def changed_files(
    stage_dir: Path, run_dir: Path, cheap: bool = False, only: str | None = None
) -> list[tuple[Path, str]]:
    """(file, what is wrong, in words) for each file a finished stage wrote that is missing or differs from its
    manifest; [] when the stage has no manifest (not finished: nothing to compare). ``only``: a file name to
    check alone."""
    manifest = stage_dir / MANIFEST
    if not manifest.is_file():
        return []
    out = []
    for art in json.loads(manifest.read_text())["artifacts"]:
        path = run_dir / art["path"]
        if only is not None and path.name != only:
            continue
        if not path.is_file():
            out.append((path, f"{path} is listed in {manifest} but is missing"))
            continue
        st = path.stat()
        wal = path.with_name(path.name + "-wal")
        if path.suffix == ".sqlite" and wal.is_file() and wal.stat().st_size > 0:  # the stage folded its log in
            out.append((path, f"{path} was changed after its stage wrote it (its write-ahead log {wal.name} holds "
                              "writes made since)"))  # fmt: skip
            continue
        if cheap and st.st_size == art["bytes"] and st.st_mtime_ns == art.get("mtime_ns"):
            continue
        if st.st_size != art["bytes"] or sha256(path) != art["sha256"]:
            why = f"{path} was truncated or altered after its stage wrote it (size or SHA-256 differs from {manifest})"
            out.append((path, why))
    return out


def fold_log(path: Path, tries: int = 100) -> bool:
    """Fold a database's write-ahead log into its file (SQLite's TRUNCATE checkpoint), retrying while a reader
    is in the middle of a query; True once the log is empty. A stage does this before checksumming its store,
    so the checksum covers every write."""
    wal = path.with_name(path.name + "-wal")
    if not wal.is_file() or wal.stat().st_size == 0:
        return True
    db = sqlite3.connect(path, timeout=5)
    try:
        for _ in range(tries):
            busy, _log, _done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return True
            time.sleep(0.05)
        return False
    finally:
        db.close()


def sqlite_problem(path: Path) -> str | None:
    """What SQLite's own check finds wrong with a database file (None: nothing)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError as e:
        return str(e)
    try:
        found = [r[0] for r in db.execute("PRAGMA integrity_check(20)")]
    except sqlite3.DatabaseError as e:
        return str(e)
    finally:
        db.close()
    return None if found == ["ok"] else "; ".join(found)
