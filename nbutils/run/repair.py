"""``nbutils check RUN [--repair]``: verify a run's files, and repair it keeping what is intact.

The check compares every finished stage's files with its manifest (size and SHA-256) and asks SQLite to check
each results store and each unmerged shard part (``PRAGMA integrity_check``). The repair, for each stage with
a problem:

- a results store (stages 02-03) is rebuilt from the unit sides that still read back whole: each entry and
  its scorer details are copied into a fresh store, and the numbers the views sort by are computed again from
  the entries (so an altered number is restored from its entry). What did not read back is left out, the old
  file is kept beside it as ``.results.sqlite.damaged`` (hidden: no manifest lists it), and the stage's
  manifest is removed, so the same ``nbutils run`` command runs the stage again: finished units are skipped,
  the missing ones computed. (An entry altered in a way SQLite cannot see is kept as it reads: no check can
  tell it from the original.)
- any other altered or missing file of stages 02-05 is deleted and the stage's manifest removed (the rerun
  writes it again).
- a damaged stage 01 is collected again: its arrays cannot be checked one unit at a time, so the folder is
  moved aside (``01_collect.damaged``) and the rerun collects from scratch (same settings, same records).

Later stages keep their results: a stage reruns (and skips what it finished) because an earlier one did.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from nbutils.core.codec import unpack
from nbutils.core.errors import UserError
from nbutils.core.integrity import changed_files, sqlite_problem
from nbutils.core.layout import MANIFEST, STAGES, find_run
from nbutils.core.store import ResultStore

COLLECT = STAGES[0].folder
STORE = "results.sqlite"


@dataclass
class StageCheck:
    """What `check_run` found in one stage folder."""

    stage: str
    finished: bool
    changed: list[tuple[Path, str]] = field(default_factory=list)
    """(file, what is wrong) for each file that differs from the stage's manifest or is missing."""
    damaged: dict[str, str] = field(default_factory=dict)
    """SQLite files (path -> SQLite's finding) that fail SQLite's own check."""

    @property
    def ok(self) -> bool:
        return not self.changed and not self.damaged

    def line(self) -> str:
        state = "finished" if self.finished else "not finished (no manifest: its files are checked by SQLite only)"
        if self.ok:
            return f"{self.stage}: ok, {state}"
        return f"{self.stage}: DAMAGED, {state}: " + "; ".join(
            [why for _, why in self.changed] + [f"{p}: SQLite finds {why}" for p, why in self.damaged.items()]
        )


def check_run(run_dir: str | Path) -> list[StageCheck]:
    """Every stage folder of a run checked against its manifest and by SQLite (see the module docstring)."""
    run = find_run(run_dir)
    found = []
    for stage in STAGES:
        folder = run / stage.folder
        if not folder.is_dir():
            continue
        check = StageCheck(stage.folder, (folder / MANIFEST).is_file(), changed_files(folder, run))
        for db in [folder / STORE, *sorted((folder / "parts").glob("*.sqlite"))]:
            if db.is_file() and (problem := sqlite_problem(db)) is not None:
                check.damaged[str(db)] = problem
        found.append(check)
    if not found:
        raise UserError(f"{run} holds no stage folder to check.", "Name a run folder (outputs/<run_id>).")
    return found


def repair_run(run_dir: str | Path) -> list[str]:
    """Repair every stage `check_run` finds a problem in (see the module docstring); returns what was done."""
    run = find_run(run_dir)
    done = []
    for check in check_run(run):
        if check.ok:
            continue
        folder = run / check.stage
        if check.stage == COLLECT:
            aside = run / f"{COLLECT}.damaged"
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            done.append(f"{check.stage}: moved to {aside.name}; the rerun collects again")
            continue
        if any(path.suffix == ".sqlite" for path, _ in check.changed) or check.damaged:
            kept, seen = _rebuild_store(folder)
            done.append(
                f"{check.stage}: results store rebuilt with the {kept} of {seen} unit sides that read back whole"
            )
        for path, _ in check.changed:
            if path.suffix != ".sqlite":
                path.unlink(missing_ok=True)
                done.append(f"{check.stage}: removed {path.relative_to(run)} (the rerun writes it again)")
        (folder / MANIFEST).unlink(missing_ok=True)
    return done


def _rebuild_store(folder: Path) -> tuple[int, int]:
    """Copy every unit side of the stage's store and parts that reads back whole into a fresh store; returns
    (kept, seen). The numbers are computed again from the entries (stage 03: its scorers' numbers)."""
    from nbutils.score.stage import stored_numbers

    numbers_of = stored_numbers if folder.name == STAGES[2].folder else None
    sources = [p for p in [folder / STORE, *sorted((folder / "parts").glob("*.sqlite"))] if p.is_file()]
    fresh = folder / ".rebuilt"
    shutil.rmtree(fresh, ignore_errors=True)
    kept = seen = 0
    with ResultStore(fresh, numbers_of=numbers_of) as out:
        for source in sources:
            for entry, details in _readable_rows(source):
                seen += 1
                if entry is not None:
                    out.put(entry, details)
                    kept += 1
    for source in sources:
        hidden = source.with_name(f".{source.name}.damaged")
        source.replace(hidden)
        for log in ("-wal", "-shm", "-journal"):
            source.with_name(source.name + log).unlink(missing_ok=True)
    (fresh / STORE).replace(folder / STORE)
    shutil.rmtree(fresh, ignore_errors=True)
    return kept, seen


def _readable_rows(path: Path):  # noqa: ANN202 - yields (entry or None, details)
    """(entry, details) of every unit side listed in a possibly damaged store; (None, None) for one whose entry
    or details do not read back whole (or, in a store whose stage wrote details, are missing)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        keys = db.execute("SELECT layer, neuron, side FROM entries ORDER BY layer, neuron, side").fetchall()
    except sqlite3.DatabaseError:
        return  # not even the list of units reads: nothing is kept, the rerun computes every unit again
    try:  # where the stage wrote details, a side without them may have lost them to the damage: not kept
        with_details = db.execute("SELECT 1 FROM details LIMIT 1").fetchone() is not None
    except sqlite3.DatabaseError:
        with_details = True
    try:
        for key in keys:
            try:
                (body,) = db.execute("SELECT body FROM entries WHERE layer=? AND neuron=? AND side=?", key).fetchone()
                row = db.execute("SELECT body FROM details WHERE layer=? AND neuron=? AND side=?", key).fetchone()
                entry = json.loads(body)
                if row is None and with_details:
                    raise ValueError("its details did not read back")
                details = unpack(row[0]) if row else None
                if (entry.get("layer"), entry.get("neuron")) != key[:2]:
                    raise ValueError("an entry filed under another unit")
            except (sqlite3.DatabaseError, ValueError, TypeError, KeyError, OSError, zlib.error, struct.error):
                yield None, None
                continue
            yield entry, details
    finally:
        db.close()
