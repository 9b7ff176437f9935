"""The results store of stages 02 and 03: one SQLite database per stage folder, ``results.sqlite``.

Why SQLite (standard library, nothing to install): every unit side is written in its own transaction, so a
killed run loses at most the units in progress; the primary key and an index on each scorer number make
"this unit", "the next one", "sorted by a score" and "the explanations containing a word" queries, not
loads of every result; WAL lets a viewer read a run while its stage writes. SQLite must not be shared by
writers on several hosts over a network filesystem (its locks are not reliable there), so each shard of a
distributed stage writes a part of its own (``parts/<shard>.sqlite``: one writer, exclusive locking, no
shared-memory file) and the stage merges the parts into ``results.sqlite`` when its shards finish, and again
at its next start after a kill (`ResultStore.merge_parts`).

Tables (store format `STORE_FORMAT`, in ``meta``):

    entries(layer, neuron, side, explanation, failure, body)   body: the entry as JSON text
    details(layer, neuron, side, body)                         body: `pack`ed scorer details
    numbers(layer, neuron, side, name, value)                  one row per scorer number, indexed by value
    number_names(name)                                         every name in ``numbers``
    notes(layer, neuron, side, body)                           run-wide notes (JSON list), see below
    number_notes(layer, neuron, side, body)                    stage 03: the notes on each side's numbers, as text
    number_rows(layer, neuron, side, names, body)              each side's numbers again, as float64 in the order
                                                               of number_sets(id, names): a table of every side's
                                                               numbers is one read of one row per side
    entry_columns(layer, neuron, side, baseline, candidates,   stage 02: what a table shows of each entry, read
                  calibration, retryable)                      once from its JSON when it is written
    search(explanation, candidates, rule, tokens)              FTS5 full-text index (`ResultStore.text_search`)
    selection(position, layer, neuron, side)                   the unit sides the stage last chose, in order

``numbers`` also holds the flags the report counts beside each number (``<name>#noted``, ``#degenerate``,
``<scorer>#f1_chance``: `nbutils.score.contract.result_numbers`), so the report aggregates a run from the
index without parsing a result. ``notes`` holds what depends on every entry at once (an explanation the same
as other units' or copying the prompt's worked example), written by stage 02 when it finishes
(`ResultStore.put_notes`) and current until the next write (meta ``notes``); views compute them otherwise.
``number_rows`` and ``entry_columns`` are written with each entry; a store written before them gets them from
its next writer, and is read from ``numbers`` and the entries' JSON until then. ``selection`` is what the stage was last asked to do (`ResultStore.select`, written when it changes): stage 03
scores stage 02's selection, and `ResultStore.export_jsonl` and `StoredSequence` list it in that order. The
store may hold more (units of an earlier, wider run); nothing is deleted.

No file is rewritten whole when a stage ends: the JSON-lines files other tools read (``explanations.jsonl``,
``scores.jsonl``) are exports written on request (``nbutils export-jsonl``), streamed from the store.

``side`` is 0 for the positive side of a unit and 1 for the negative one, so the primary key's order is the
order views list units in. Entries stay JSON text, so SQLite's own JSON functions query them, e.g.
``sqlite3 03_score/results.sqlite "SELECT layer, neuron, json_extract(body, '$.failure') FROM entries"``.

Scorer details keep their per-token values as arrays, not JSON text (`nbutils.core.codec.pack`): float32 where every value
survives the round trip exactly (activations collected in float32), float64 otherwise, so what is read back
equals what was written. Folders written before the store (``neurons/*.json``, ``simulations/*.json``) are
read as they are (`nbutils.core.legacy`) and copied into the store the first time a stage writes there.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, overload

import numpy as np

from nbutils.core.codec import entry_body, entry_from, pack, unpack
from nbutils.core.errors import UserError
from nbutils.core.integrity import repair_fix
from nbutils.core.io import json_default, write_lines
from nbutils.core.layout import StoreLayout
from nbutils.core.legacy import LegacyFiles
from nbutils.core.units import Key

T = TypeVar("T")
STORE_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL,
    explanation TEXT, failure TEXT, body TEXT NOT NULL,
    PRIMARY KEY (layer, neuron, side)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_failed ON entries (failure IS NOT NULL);
CREATE TABLE IF NOT EXISTS details (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (layer, neuron, side)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS numbers (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (layer, neuron, side, name)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS numbers_by_value ON numbers (name, value);
CREATE TABLE IF NOT EXISTS number_names (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entry_columns (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL, baseline TEXT, candidates INTEGER,
    calibration REAL, retryable, PRIMARY KEY (layer, neuron, side)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS number_sets (id INTEGER PRIMARY KEY, names TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS number_rows (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL, names INTEGER NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (layer, neuron, side)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS number_rows_by_set ON number_rows (names);
CREATE TABLE IF NOT EXISTS notes (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (layer, neuron, side)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS number_notes (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (layer, neuron, side)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS selection (
    position INTEGER PRIMARY KEY, layer INTEGER NOT NULL, neuron INTEGER NOT NULL, side INTEGER NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(explanation, candidates, rule, tokens, tokenize='porter unicode61');
"""
SEARCH_WEIGHTS = (10.0, 3.0, 3.0, 1.0)
"""BM25 weights of the full-text index's columns (its ``rank``): a match in the explanation counts most."""
_SCHEMA += f"INSERT INTO search (search, rank) VALUES ('rank', 'bm25({', '.join(map(str, SEARCH_WEIGHTS))})');\n"
_MEMORY_SEARCH = _SCHEMA.splitlines()[-2].replace("IF NOT EXISTS search", "mem.search")
_MEMORY_RANK = _SCHEMA.splitlines()[-1].replace("search", "mem.search", 1)
_SEARCH_ROWS = """
SELECT (layer << 33) | (neuron << 1) | side, coalesce(explanation, ''),
    coalesce((SELECT group_concat(json_extract(c.value, '$.explanation'), ' ')
              FROM json_each(body, '$.candidates') AS c), ''),
    coalesce((SELECT group_concat(coalesce(json_extract(r.value, '$.token'), '') || ' '
                                  || coalesce(json_extract(r.value, '$.context'), '') || ' '
                                  || coalesce(json_extract(r.value, '$.token_class'), '') || ' '
                                  || coalesce(json_extract(r.value, '$.context_class'), ''), ' ')
              FROM json_each(body, '$.rule.clauses') AS r), ''),
    coalesce(json_extract(body, '$.baseline.explanation'), '')
FROM entries"""
"""Each entry's text for the full-text index ``search``: its explanation, its candidates, the words of its rule
(tokens, contexts, classes) and its token-lookup baseline (the tokens it fires on most); the rowid codes the key."""

_NOTES_CURRENT = "DELETE FROM meta WHERE name='notes'"  # any write makes the run-wide notes stale


# ----------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------


def _damaged(path: Path, e: Exception | str) -> UserError:
    stage = path.parent.parent if path.parent.name == "parts" else path.parent  # <run>/<stage>/[parts/]x.sqlite
    return UserError(f"The results store {path} is damaged or is not a results store ({e}).", repair_fix(stage.parent))


class ResultStore:
    """The results of one stage folder (``results.sqlite`` there, plus unmerged parts), read and written by key.

    ``part``: write to ``parts/<part>.sqlite`` instead (a shard of a distributed stage; `merge_parts` moves it
    into the main store). A folder without a store but with per-unit JSON files (written before the store) is
    read from those files until something is written; the first write copies them in. ``numbers_of(entry)``
    gives the numbers to index for an entry written without its own (stage 03: its scorers' numbers)."""

    def __init__(
        self,
        root: str | os.PathLike,
        part: str | None = None,
        numbers_of: Callable[[dict[str, Any]], dict[str, float | None]] | None = None,
    ) -> None:
        self.layout = StoreLayout(root)
        self.root, self.path = self.layout.root, self.layout.main
        self.part = part
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._wrote = False
        self._old = LegacyFiles(self.layout)
        self._numbers_of = numbers_of

    # -- connections ----------------------------------------------------------------------------------------

    @property
    def writes_to(self) -> Path:
        return self.layout.part(self.part) if self.part else self.path

    def _open(self, path: Path, create: bool) -> sqlite3.Connection:
        if not create and not path.is_file():
            raise FileNotFoundError(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, timeout=60, check_same_thread=False, isolation_level=None)
            if path != self.path:  # a part: one writer, no shared-memory file (safe on a network filesystem)
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a killed process loses no committed unit
            found = dict(conn.execute("SELECT name, value FROM meta").fetchall()) if _has_meta(conn) else {}
            if not str(found.get("format", 0)).isdigit():
                conn.close()
                raise _damaged(path, f"its store format is {found['format']!r}, not a number")
            if int(found.get("format", 0)) > STORE_FORMAT:
                conn.close()
                raise UserError(
                    f"{path} was written by {found.get('written_by', 'a newer nbutils')} in store format "
                    f"{found['format']}; this nbutils reads format {STORE_FORMAT} and older.",
                    "Upgrade nbutils (pip install -U nbutils, or git pull and reinstall) to read this run.",
                )
            if not found or create:  # (a store of this format written before a table was added gets it)
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('written_by', ?)",
                             (str(STORE_FORMAT), f"nbutils {_version()}"))  # fmt: skip
        except sqlite3.DatabaseError as e:
            raise _damaged(path, e) from None
        return conn

    def _connection(self, create: bool = False) -> sqlite3.Connection | None:
        if self._conn is None:
            target = self.writes_to if create else self.path
            if not create and not target.is_file():
                return None
            self._conn = self._open(target, create)
            if create and self.part is None:
                self._import_files()
                self._index_text()
                self._fill_entry_columns()
                self._fill_number_rows()
        return self._conn

    @contextmanager
    def _query(self, create: bool = False) -> Iterator[sqlite3.Connection | None]:
        with self._lock:
            try:
                yield self._connection(create)
            except sqlite3.DatabaseError as e:
                raise _damaged(self.writes_to if create else self.path, e) from None

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction on ``conn``: committed when the block ends, rolled back if it raises (an
        interrupt too); the store is then marked written (its log is folded in when it closes)."""
        conn.execute("BEGIN IMMEDIATE")
        self._wrote = True
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection. After writing, the write-ahead log is first folded into the database file
        (also while a viewer holds the store open), so the stage's manifest checksums the file as it stays."""
        with self._lock:
            if self._conn is not None:
                if self._wrote:
                    try:
                        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.DatabaseError:
                        pass  # a reader in the middle of a query: the last connection to close folds the log
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------------------

    def put(
        self, entry: dict[str, Any], details: Any = None, numbers: dict[str, float | None] | None = None,
        notes: list[tuple[str, str]] | None = None,
    ) -> None:  # fmt: skip
        """Write one unit side's entry (and its scorer details, numbers and the notes on its numbers) in one
        transaction, replacing what was there for that key."""
        self._write_batch([(entry, details, numbers, notes)])

    def put_many(
        self, items: Iterable[tuple[dict[str, Any], Any, dict[str, float | None] | None]], batch: int = 1000
    ) -> int:
        """Write many (entry, details, numbers) at once, ``batch`` unit sides per transaction: for imports and
        benchmarks, where losing the batch in progress to a kill is acceptable. Returns how many were written."""
        count, pending = 0, []
        for item in items:
            pending.append(item)
            if len(pending) >= batch:
                count += self._write_batch(pending)
                pending = []
        return count + (self._write_batch(pending) if pending else 0)

    def _write_batch(self, items: list[tuple[dict[str, Any], Any, Any]]) -> int:
        with self._query(create=True) as conn, self._transaction(conn):
            for entry, details, numbers, *notes in items:
                key = _row_key((int(entry["layer"]), int(entry["neuron"]), str(entry["sign"])))
                _write(conn, key, entry, details, self._numbers(entry, numbers), notes[0] if notes else None)
        return len(items)

    def _numbers(self, entry: dict[str, Any], given: dict[str, float | None] | None) -> dict | None:
        return given if given is not None or self._numbers_of is None else self._numbers_of(entry)

    def _import_files(self) -> None:
        """Copy per-unit JSON files of a folder written before the store into it (once, in one transaction)."""
        conn = self._conn
        legacy = self._old
        if not legacy.exists() or conn.execute("SELECT 1 FROM meta WHERE name='imported'").fetchone():
            return
        with self._transaction(conn):
            for entry in legacy.entries():
                key = (entry["layer"], entry["neuron"], entry["sign"])
                _write(conn, _row_key(key), entry, legacy.details(key), self._numbers(entry, None))
            conn.execute("INSERT INTO meta VALUES ('imported', 'neurons/ and simulations/ files')")

    def merge_parts(self) -> int:
        """Move every part (``parts/*.sqlite``) into the main store, one transaction per part, deleting each
        part once merged; returns the number of unit sides moved. A damaged part is left in place and named
        in a `UserError` after the others are merged. (A stage calls this first: it also creates the store and
        copies in the files of a folder written before it.)"""
        with self._query(create=True):
            pass
        folder = self.layout.parts
        found = sorted(folder.glob("*.sqlite")) if folder.is_dir() else []
        moved, bad = 0, []
        for part in found:
            try:
                src = self._open(part, create=False)
                src.close()  # recovers (or rolls back) what a killed writer left, and checks the format
            except UserError as e:
                bad.append(e)
                continue
            with self._query(create=True) as conn:
                conn.execute("ATTACH DATABASE ? AS part", (str(part),))
                try:
                    with self._transaction(conn):
                        _merge_part(conn)
                        moved += conn.execute("SELECT count(*) FROM part.entries").fetchone()[0]
                        conn.execute(_NOTES_CURRENT)
                finally:
                    conn.execute("DETACH DATABASE part")
            for p in (part, part.with_name(part.name + "-wal"), part.with_name(part.name + "-journal")):
                p.unlink(missing_ok=True)
        if bad:
            raise bad[0]
        return moved

    # -- reading --------------------------------------------------------------------------------------------

    def _legacy(self) -> LegacyFiles | None:
        return self._old if not self.path.is_file() and self._old.exists() else None

    def get(self, key: Key) -> dict[str, Any] | None:
        """A unit side's entry, or None."""
        if (legacy := self._legacy()) is not None:
            return legacy.get(key)
        with self._query() as conn:
            row = conn and conn.execute(f"SELECT body FROM entries WHERE {_AT}", _row_key(key)).fetchone()
        return entry_from(row[0]) if row else None

    def details(self, key: Key) -> Any:
        """A unit side's scorer details, or None."""
        if (legacy := self._legacy()) is not None:
            return legacy.details(key)
        with self._query() as conn:
            row = conn and conn.execute(f"SELECT body FROM details WHERE {_AT}", _row_key(key)).fetchone()
        return unpack(row[0]) if row else None

    def keys(self) -> list[Key]:
        """Every unit side held, in (layer, neuron, positive first) order."""
        if (legacy := self._legacy()) is not None:
            return [(e["layer"], e["neuron"], e["sign"]) for e in legacy.entries()]
        with self._query() as conn:
            rows = conn.execute("SELECT layer, neuron, side FROM entries ORDER BY layer, neuron, side") if conn else []
            return [(r[0], r[1], SIDES[r[2]]) for r in rows]

    def entries(self, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every entry in key order, read ``batch`` at a time (bounded memory for any number of units)."""
        if (legacy := self._legacy()) is not None:
            yield from legacy.entries()
            return
        after: tuple[int, int, int] = (-1, -1, -1)
        while True:
            with self._query() as conn:
                query = "SELECT layer, neuron, side, body FROM entries WHERE (layer, neuron, side) > (?, ?, ?) "
                rows = (
                    conn.execute(query + "ORDER BY layer, neuron, side LIMIT ?", (*after, batch)).fetchall()
                    if conn
                    else []
                )
            if not rows:
                return
            yield from (entry_from(r[3]) for r in rows)
            after = rows[-1][:3]

    def __len__(self) -> int:
        if (legacy := self._legacy()) is not None:
            return len(legacy.entries())
        with self._query() as conn:
            return conn.execute("SELECT count(*) FROM entries").fetchone()[0] if conn else 0

    # -- queries that read an index or a column, not the entries ----------------------------------------------

    @property
    def indexed(self) -> bool:
        """Whether the queries below can answer (False for a folder written before the store)."""
        return self._legacy() is None

    def explanations(self) -> list[tuple[Key, str | None]]:
        """(key, explanation text) of every entry in key order, read from its column (no entry is parsed)."""
        return self._text_column("explanation")

    def failures(self) -> list[tuple[Key, str | None]]:
        """(key, failure) of every entry in key order, read from its column."""
        return self._text_column("failure")

    def failed_keys(self) -> set[Key]:
        """The keys of entries that record a failure (read from the index of which do: no entry read)."""
        with self._query() as conn:
            rows = conn.execute(
                "SELECT layer, neuron, side FROM entries WHERE failure IS NOT NULL AND failure != ''"
            ).fetchall() if conn else []  # fmt: skip
        return {(r[0], r[1], SIDES[r[2]]) for r in rows}

    def _text_column(self, name: str) -> list[tuple[Key, str | None]]:
        if (legacy := self._legacy()) is not None:
            return [((e["layer"], e["neuron"], e["sign"]), e.get(name)) for e in legacy.entries()]
        with self._query() as conn:
            rows = conn.execute(_KEYED.format(name)).fetchall() if conn else []
        return [((r[0], r[1], SIDES[r[2]]), r[3]) for r in rows]

    def frame_columns(self) -> tuple[dict[Key, tuple[str | None, str | None, str | None, str | None]], bool]:
        """Per entry, in one read (what `RunView.scores_frame` needs of a store): its explanation, its failure,
        the notes stage 03 stored on its numbers as tables show them (None where none were stored: a side
        written before they were), and its run-wide notes as tables show them (``explanation: <note>`` joined
        by "; "; None where it has none, or where they are not current: `note_keys`); and whether they are
        current."""
        with self._query() as conn:
            if conn is None:
                return {}, False
            current = conn.execute("SELECT 1 FROM meta WHERE name='notes'").fetchone() is not None
            noted = (
                "(SELECT layer, neuron, side, group_concat('explanation: ' || j.value, '; ') AS text FROM notes, "
                "json_each(notes.body) AS j GROUP BY layer, neuron, side)"
                if current else "(SELECT layer, neuron, side, NULL AS text FROM notes WHERE 0)"
            )  # fmt: skip
            kept = "number_notes" if _has_table(conn, "number_notes") else "(SELECT *, NULL AS body FROM notes WHERE 0)"
            rows = conn.execute(
                "SELECT e.layer, e.neuron, e.side, e.explanation, e.failure, n.body, o.text FROM entries e "
                f"LEFT JOIN {kept} n ON {_SAME.format('n')} LEFT JOIN {noted} o ON {_SAME.format('o')}{_IN_ORDER}"
            ).fetchall()  # fmt: skip
        return {(r[0], r[1], SIDES[r[2]]): r[3:] for r in rows}, current

    def explanation_columns(self) -> list[tuple[Any, ...]]:
        """Per entry in key order, read with SQLite's JSON functions (no entry decoded in Python): ``(key,
        explanation, baseline explanation, candidates written, the kept candidate's calibration score, failure,
        retryable)``, the kept candidate being the one whose explanation is the entry's (stage 02's stores)."""
        with self._query() as conn:
            if conn is None:
                return []
            if _complete(conn, "entry_columns"):  # what each write stored beside its entry
                rows = conn.execute(
                    "SELECT e.layer, e.neuron, e.side, e.explanation, c.baseline, c.candidates, c.calibration, "
                    "e.failure, c.retryable FROM entries e JOIN entry_columns c ON " + _SAME.format("c") + _IN_ORDER
                ).fetchall()
            else:  # a store written before them: the same read from each entry's JSON
                rows = conn.execute(
                    f"SELECT e.layer, e.neuron, e.side, e.explanation, {_ENTRY_FACTS}, e.failure, retryable FROM "
                    f"entries e JOIN ({_ENTRY_COLUMNS}) c ON " + _SAME.format("c") + _IN_ORDER
                ).fetchall()
        return [((r[0], r[1], SIDES[r[2]]), *r[3:]) for r in rows]

    def number_table(self, names: list[str]) -> tuple[list[Key], dict[str, np.ndarray]]:
        """Every entry's key in key order, and each named number's values aligned to them (NaN where the
        number is missing or undefined): one indexed read per name, no entry parsed (what the report
        aggregates). For an `indexed` store only."""
        if not self.indexed:
            raise ValueError("number_table needs a store (this folder holds files from before the store)")
        with self._query() as conn:
            if conn and _complete(conn, "number_rows"):
                return _number_rows(conn, names)
            rows = conn.execute("SELECT layer, neuron, side FROM entries ORDER BY layer, neuron, side").fetchall() \
                if conn else []  # fmt: skip
            keys = [(r[0], r[1], SIDES[r[2]]) for r in rows]
            codes = _code(np.array(rows, dtype=np.int64).reshape(-1, 3))
            out: dict[str, np.ndarray] = {}
            for name in names:
                out[name] = column = np.full(len(keys), np.nan)
                found = conn.execute(
                    "SELECT layer, neuron, side, value FROM numbers WHERE name=? AND value IS NOT NULL", (name,)
                ).fetchall() if conn else []  # fmt: skip
                if found:
                    got = np.array(found, dtype=np.float64)
                    column[np.searchsorted(codes, _code(got[:, :3].astype(np.int64)))] = got[:, 3]
        return keys, out

    def put_notes(self, notes: Mapping[Key, list[str]]) -> None:
        """Replace the run-wide notes (notes that depend on every entry, such as an explanation the same as
        others'), in one transaction; they stay current until the next write (`note_keys`)."""
        with self._query(create=True) as conn, self._transaction(conn):
            conn.execute("DELETE FROM notes")
            conn.executemany("INSERT INTO notes VALUES (?, ?, ?, ?)",
                             [(*_row_key(k), json.dumps(v)) for k, v in notes.items() if v])  # fmt: skip
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('notes', 'current')")

    def note_keys(self) -> list[Key] | None:
        """The keys with run-wide notes, in key order; None when there are none current (never written, or an
        entry was written since)."""
        if not self.indexed:
            return None
        with self._query() as conn:
            if conn is None or not conn.execute("SELECT 1 FROM meta WHERE name='notes'").fetchone():
                return None
            rows = conn.execute("SELECT layer, neuron, side FROM notes ORDER BY layer, neuron, side").fetchall()
        return [(r[0], r[1], SIDES[r[2]]) for r in rows]

    def all_notes(self) -> list[tuple[Key, list[str]]]:
        """(key, notes) of every key with run-wide notes, in key order."""
        with self._query() as conn:
            rows = conn.execute(_KEYED.replace("entries", "notes").format("body")).fetchall() if conn else []
        return [((r[0], r[1], SIDES[r[2]]), json.loads(r[3])) for r in rows]

    def notes_of(self, key: Key) -> list[str]:
        """A key's run-wide notes (see `note_keys` for whether they are current)."""
        with self._query() as conn:
            row = conn and conn.execute(f"SELECT body FROM notes WHERE {_AT}", _row_key(key)).fetchone()
        return json.loads(row[0]) if row else []

    def search(self, text: str) -> list[Key]:
        """Keys whose explanation contains ``text`` (ignoring case, as Python's `str.lower` does), in key order."""
        needle = text.lower()
        return [k for k, t in self.explanations() if isinstance(t, str) and needle in t.lower()]

    def _index_text(self) -> None:
        """Fill the full-text index where it lags the entries (a store written before the index, or by an older
        nbutils): one transaction, when a stage opens the store to write."""
        conn = self._conn
        if _indexed_count(conn, "search") == conn.execute("SELECT count(*) FROM entries").fetchone()[0]:
            return
        with self._transaction(conn):
            conn.execute("DELETE FROM search")
            conn.execute(f"INSERT INTO search (rowid, explanation, candidates, rule, tokens) {_SEARCH_ROWS}")

    def _fill_entry_columns(self) -> None:
        """Write the entry columns a store written before them lacks (one transaction, when a stage opens it
        to write; readers of such a store read the same from each entry's JSON)."""
        conn = self._conn
        if _complete(conn, "entry_columns") or not conn.execute("SELECT 1 FROM entries LIMIT 1").fetchone():
            return
        with self._transaction(conn):
            conn.execute("DELETE FROM entry_columns")
            conn.execute(f"INSERT INTO entry_columns {_ENTRY_COLUMNS}")

    def _fill_number_rows(self) -> None:
        """Write the number rows a store written before them lacks (from its numbers): one transaction, when a
        stage opens the store to write (readers of such a store read the numbers table itself)."""
        conn = self._conn
        if _complete(conn, "number_rows") or not conn.execute("SELECT 1 FROM numbers LIMIT 1").fetchone():
            return
        with self._transaction(conn):
            rows = conn.execute("SELECT layer, neuron, side, name, value FROM numbers ORDER BY layer, neuron, side")
            for key, group in itertools.groupby(rows, key=lambda r: r[:3]):
                _write_number_row(conn, key, {r[3]: r[4] for r in group})

    def text_search(
        self, text: str, limit: int | None = 50, phrase: bool = False, ranked: bool = True
    ) -> list[tuple[Key, float, list[str]]]:
        """Ranked full-text search (SQLite FTS5, BM25, Porter-stemmed words) of each entry's explanation,
        candidates, rule and token-lookup baseline: ``(key, relevance, matched words)`` best first, where
        relevance is BM25's (higher is better; `SEARCH_WEIGHTS` favour the explanation) and the matched words
        are those of the entry's text that matched. Any word of ``text`` may match (more matched words rank
        higher); ``phrase``: an entry must hold the words in that order, next to each other, the last one as a
        prefix (a filter box's text as it is typed: "unit 4/" finds "unit 4/2", not "unit 1/4"). A store whose index lags its entries (written before the index) is indexed in memory for this
        process, with a message; a stage that writes to the store keeps an index in it."""
        words = re.findall(r"\w+", text)
        if not words:
            raise UserError(f"The search text {text!r} has no words.", "Give a word or two, e.g. 'month'.")
        quoted = ['"' + w.replace('"', '""') + '"' for w in words]
        query = '"' + " ".join(words).replace('"', '""') + '"*' if phrase else " OR ".join(quoted)
        with self._query() as conn:
            if conn is None:
                return []
            table = self._search_table(conn)
            if not ranked:
                codes = conn.execute(f"SELECT rowid FROM {table} WHERE search MATCH ? ORDER BY rowid", (query,))
                return [((c >> 33, (c >> 1) & 0xFFFFFFFF, SIDES[c & 1]), 0.0, []) for (c,) in codes][:limit]
            rows = conn.execute(  # ORDER BY rank: FTS5 keeps only the best ``limit`` as it goes
                "SELECT rowid, rank, "
                + ", ".join(f"highlight(search, {i}, char(1), char(2))" for i in range(4))
                + f" FROM {table} WHERE search MATCH ? ORDER BY rank"
                + (" LIMIT ?" if limit is not None else ""),
                (query, limit) if limit is not None else (query,),
            ).fetchall()
        out = []
        for code, rank, *marked in rows:
            found = dict.fromkeys(m.lower() for text in marked for m in re.findall("\x01(.*?)\x02", text))
            out.append(((code >> 33, (code >> 1) & 0xFFFFFFFF, SIDES[code & 1]), -float(rank), list(found)))
        return out

    def _search_table(self, conn: sqlite3.Connection) -> str:
        """``search`` where it is current; else an index built in memory for this connection (said once)."""
        entries = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        if _indexed_count(conn, "search") == entries:
            return "search"
        if _indexed_count(conn, "mem.search") != entries:
            print(f"building a text index of {self.path} in memory ({entries} entries; the store holds none or an "
                  "older one; the next stage that writes to it keeps one there)", file=sys.stderr)  # fmt: skip
            if not any(r[1] == "mem" for r in conn.execute("PRAGMA database_list")):
                conn.execute("ATTACH DATABASE ':memory:' AS mem")
            conn.execute("DROP TABLE IF EXISTS mem.search")
            conn.execute(_MEMORY_SEARCH)
            conn.execute(_MEMORY_RANK)
            conn.execute(f"INSERT INTO mem.search (rowid, explanation, candidates, rule, tokens) {_SEARCH_ROWS}")
        return "mem.search"

    def ranked(self, name: str) -> list[tuple[float, Key]]:
        """(value, key) of every unit side whose number ``name`` is defined, highest first (then key order);
        read from the index on ``numbers``."""
        with self._query() as conn:
            rows = conn.execute(
                "SELECT value, layer, neuron, side FROM numbers WHERE name=? AND value IS NOT NULL "
                "ORDER BY value DESC, layer, neuron, side", (name,)
            ).fetchall() if conn else []  # fmt: skip
        return [(r[0], (r[1], r[2], SIDES[r[3]])) for r in rows]

    def select(self, keys: list[Key]) -> None:
        """Record the unit sides this stage was asked for, in its order (one transaction; nothing is written
        when the selection is the one already recorded, so a rerun of the same stage writes nothing here)."""
        digest = _digest(keys)
        with self._query(create=True) as conn:
            if conn.execute("SELECT 1 FROM meta WHERE name='selection' AND value=?", (digest,)).fetchone():
                return
            with self._transaction(conn):
                conn.execute("DELETE FROM selection")
                conn.executemany("INSERT INTO selection VALUES (?, ?, ?, ?)",
                                 [(i, *_row_key(k)) for i, k in enumerate(keys)])  # fmt: skip
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('selection', ?)", (digest,))

    def selection(self) -> list[Key] | None:
        """The unit sides the stage last recorded with `select`, in its order; None where it recorded none (a
        store written before selections were kept, a folder of files from before the store, or no store)."""
        if not self.indexed:
            return None
        with self._query() as conn:
            if conn is None or not conn.execute("SELECT 1 FROM meta WHERE name='selection'").fetchone():
                return None
            rows = conn.execute("SELECT layer, neuron, side FROM selection ORDER BY position").fetchall()
        return [(r[0], r[1], SIDES[r[2]]) for r in rows]

    def chosen(self) -> list[Key]:
        """The selection's unit sides that have an entry, in its order (every key held, in key order, where no
        selection was recorded)."""
        held = self.keys()
        picked = self.selection()
        if picked is None:
            return held
        have = set(held)
        return [k for k in picked if k in have]

    def export_jsonl(self, path: str | os.PathLike) -> int:
        """Write the `chosen` entries to ``path`` as JSON lines (streamed: bounded memory for any number of
        units; atomic: readers see the old file or the new one). Returns how many were written."""
        keys = self.chosen()
        return write_lines(path, (json.dumps(self.get(k), default=json_default) for k in keys))

    def number_names(self) -> list[str]:
        """Every number name stored (`nbutils.score.contract.number_name`)."""
        with self._query() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM number_names")] if conn else []


class StoredSequence(Sequence[T]):
    """A stage's results in the order of its `ResultStore.chosen` keys, each read from the store (and parsed
    by ``parse``) when it is asked for: what a stage returns, so a run of any size is not held in memory.
    ``len``, indexing, slicing and iteration work as on a list; what is read is the store as it is then."""

    def __init__(self, root: str | os.PathLike, keys: list[Key], parse: Callable[[dict[str, Any]], T]) -> None:
        self.root, self.keys, self._parse = Path(root), list(keys), parse
        self._store: ResultStore | None = None

    @classmethod
    def of(cls, root: str | os.PathLike, parse: Callable[[dict[str, Any]], T]) -> StoredSequence[T]:
        """A stage folder's `ResultStore.chosen` results."""
        with ResultStore(root) as store:
            return cls(root, store.chosen(), parse)

    def failed(self) -> list[T]:
        """The results with a failure, found from the store's failure column (only those are parsed)."""
        with ResultStore(self.root) as store:
            failing = {k for k, f in store.failures() if f}
        return [self._read(k) for k in self.keys if k in failing]

    def _read(self, key: Key) -> T:
        if self._store is None:
            self._store = ResultStore(self.root)
        found = self._store.get(key)
        if found is None:
            raise KeyError(f"{key} is no longer in the results store {self._store.path}")
        return self._parse(found)

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self._read(k) for k in self.keys[i]]
        return self._read(self.keys[i])

    def __iter__(self) -> Iterator[T]:
        return (self._read(k) for k in self.keys)

    def __eq__(self, other: object) -> bool:  # as a list compares: item by item
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # (a sequence that compares by its items is not hashable)

    def __repr__(self) -> str:
        return f"<{len(self)} results in {self.root}>"


def shard_part(shard: int | None) -> str | None:
    """The part a shard of a distributed stage writes (None: one shard, which writes the main store)."""
    return None if shard is None else f"shard-{shard:03d}"


SIDES = ("positive", "negative")
_KEYED = "SELECT layer, neuron, side, {} FROM entries ORDER BY layer, neuron, side"
_AT = "layer=? AND neuron=? AND side=?"
_SAME = "{0}.layer = e.layer AND {0}.neuron = e.neuron AND {0}.side = e.side"
_IN_ORDER = " ORDER BY e.layer, e.neuron, e.side"
_ENTRY_COLUMNS = (
    "SELECT layer, neuron, side, json_extract(body, '$.baseline.explanation') AS baseline, "
    "coalesce(json_array_length(body, '$.candidates'), 0) AS candidates, "
    "(SELECT json_extract(c.value, '$.calibration_score') FROM json_each(body, '$.candidates') AS c "
    " WHERE json_extract(c.value, '$.explanation') = entries.explanation LIMIT 1) AS calibration, "
    "json_extract(body, '$.retryable') AS retryable FROM entries"
)
"""What `ResultStore.explanation_columns` reads of each entry's JSON: its baseline's explanation, how many
candidates it has, the kept candidate's calibration score and whether it is retryable; kept beside the entry
(``entry_columns``) by each write, so a table of them reads no JSON."""
_ENTRY_FACTS = "c.baseline, c.candidates, c.calibration"


def _digest(keys: list[Key]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k[0]},{k[1]},{k[2]};".encode())
    return f"{len(keys)}:{h.hexdigest()}"


def _indexed_count(conn: sqlite3.Connection, table: str) -> int | None:
    """Rows in a full-text index table (None where it does not exist)."""
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return None


def _merge_part(conn: sqlite3.Connection) -> None:
    """Every table's rows of the part attached as ``part`` into the main store (in the caller's transaction):
    its sides replace the store's."""
    merged = "(layer, neuron, side) IN (SELECT layer, neuron, side FROM part.entries)"
    for table in ("entries", "details"):
        conn.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM part.{table}")
    conn.execute(f"DELETE FROM number_notes WHERE {merged}")
    if conn.execute("SELECT 1 FROM part.sqlite_master WHERE name='number_notes'").fetchone():
        conn.execute("INSERT OR REPLACE INTO number_notes SELECT * FROM part.number_notes")
    conn.execute(f"DELETE FROM numbers WHERE {merged}")
    conn.execute("INSERT OR REPLACE INTO numbers SELECT * FROM part.numbers")
    conn.execute("INSERT OR IGNORE INTO number_names SELECT * FROM part.number_names")
    conn.execute(f"DELETE FROM number_rows WHERE {merged}")
    if conn.execute("SELECT 1 FROM part.sqlite_master WHERE name='number_rows'").fetchone():
        conn.execute("INSERT OR IGNORE INTO number_sets (names) SELECT names FROM part.number_sets")
        conn.execute(  # the part's set ids are its own: matched by the names they stand for
            "INSERT INTO number_rows SELECT r.layer, r.neuron, r.side, m.id, r.body FROM "
            "part.number_rows r JOIN part.number_sets p ON p.id = r.names JOIN number_sets m "
            "ON m.names = p.names"
        )
    conn.execute("DELETE FROM search WHERE rowid IN (SELECT (layer << 33) | (neuron << 1) | side FROM part.entries)")
    conn.execute(f"INSERT INTO search (rowid, explanation, candidates, rule, tokens) {_SEARCH_ROWS} WHERE {merged}")
    conn.execute(f"INSERT OR REPLACE INTO entry_columns {_ENTRY_COLUMNS} WHERE {merged}")


def _complete(conn: sqlite3.Connection, table: str) -> bool:
    """Whether ``table`` (one row per entry) has a row for every entry: the number rows of a store written
    before them do not (until a stage writes to it again)."""
    try:
        have = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # a store read as it was written, before the table existed
        return False
    return have > 0 and have == conn.execute("SELECT count(*) FROM entries").fetchone()[0]


def _number_rows(
    conn: sqlite3.Connection, names: list[str], chunk: int = 16384
) -> tuple[list[Key], dict[str, np.ndarray]]:
    """`ResultStore.number_table` from the number rows: one row per side, read ``chunk`` rows at a time, each set
    of names' rows decoded in bulk and scattered into one matrix of the names asked for."""
    sets = {i: json.loads(n) for i, n in conn.execute("SELECT id, names FROM number_sets")}
    wanted = {n: j for j, n in enumerate(names)}
    moves = {}  # per set: its columns that were asked for, and where they go
    for set_id, listed in sets.items():
        pairs = [(j, wanted[n]) for j, n in enumerate(listed) if n in wanted]
        moves[set_id] = (len(listed), [p[0] for p in pairs], [p[1] for p in pairs])
    count = conn.execute("SELECT count(*) FROM number_rows").fetchone()[0]
    table, keys = np.full((count, len(names)), np.nan), []
    cursor = conn.execute("SELECT layer, neuron, side, names, body FROM number_rows ORDER BY layer, neuron, side")
    while rows := cursor.fetchmany(chunk):
        start = len(keys)
        keys += [(r[0], r[1], SIDES[r[2]]) for r in rows]
        which = np.fromiter((r[3] for r in rows), dtype=np.int64, count=len(rows))
        for set_id in np.unique(which).tolist():
            width, src, dst = moves[set_id]
            at = np.flatnonzero(which == set_id)
            values = np.frombuffer(b"".join([rows[i][4] for i in at]), dtype=np.float64).reshape(len(at), width)
            if src:
                table[np.ix_(start + at, dst)] = values[:, src]
    return keys, {n: table[:, j] for n, j in wanted.items()}


def _row_key(key: Key) -> tuple[int, int, int]:
    """(layer, neuron, side) of a (layer, neuron, sign) key."""
    if key[2] not in SIDES:
        raise ValueError(f"sign {key[2]!r} is neither 'positive' nor 'negative'")
    return (int(key[0]), int(key[1]), SIDES.index(key[2]))


def _code(rows: np.ndarray) -> np.ndarray:
    """Rows of (layer, neuron, side) as one int64 each, ordered as the keys are."""
    return (rows[:, 0] << 40) | (rows[:, 1] << 1) | rows[:, 2]


def _version() -> str:
    """The installed nbutils's version (from its package metadata: the core imports nothing above it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nbutils")
    except PackageNotFoundError:
        return "unknown"


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name=?", (name,)).fetchone() is not None


def _has_meta(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is not None


def _write(
    conn: sqlite3.Connection, key: tuple[int, int, int], entry: dict[str, Any], details: Any, numbers: dict | None,
    notes: list[tuple[str, str]] | None = None,
) -> None:  # fmt: skip
    explanation, failure = entry.get("explanation"), entry.get("failure")
    conn.execute(
        "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)",
        (*key, explanation if isinstance(explanation, str) else None, failure, entry_body(entry)),
    )
    conn.execute(_NOTES_CURRENT)
    conn.execute(f"INSERT OR REPLACE INTO entry_columns {_ENTRY_COLUMNS} WHERE {_AT}", key)
    conn.execute("DELETE FROM search WHERE rowid=?", ((key[0] << 33) | (key[1] << 1) | key[2],))
    conn.execute(f"INSERT INTO search (rowid, explanation, candidates, rule, tokens) {_SEARCH_ROWS} WHERE {_AT}", key)
    conn.execute(f"DELETE FROM details WHERE {_AT}", key)
    if details is not None:
        conn.execute("INSERT INTO details VALUES (?, ?, ?, ?)", (*key, pack(details)))
    conn.execute(f"DELETE FROM number_notes WHERE {_AT}", key)
    if notes is not None:
        conn.execute("INSERT INTO number_notes VALUES (?, ?, ?, ?)", (*key, "; ".join(f"{w}: {n}" for w, n in notes)))
    conn.execute(f"DELETE FROM numbers WHERE {_AT}", key)
    if numbers:
        conn.executemany("INSERT INTO numbers VALUES (?, ?, ?, ?, ?)", [(*key, n, v) for n, v in numbers.items()])
        conn.executemany("INSERT OR IGNORE INTO number_names VALUES (?)", [(n,) for n in numbers])
    _write_number_row(conn, key, numbers)


def _write_number_row(conn: sqlite3.Connection, key: tuple[int, int, int], numbers: dict | None) -> None:
    """A side's numbers again as one row: float64 values (NaN for None) in the order of a stored set of names,
    so a table of every side's numbers is one read of one row per side (`ResultStore.number_table`)."""
    conn.execute(f"DELETE FROM number_rows WHERE {_AT}", key)
    if not numbers:
        return
    names = sorted(numbers)
    listed = json.dumps(names)
    conn.execute("INSERT OR IGNORE INTO number_sets (names) VALUES (?)", (listed,))
    found = conn.execute("SELECT id FROM number_sets WHERE names=?", (listed,)).fetchone()[0]
    values = np.array([np.nan if numbers[n] is None else numbers[n] for n in names], dtype=np.float64)
    conn.execute("INSERT INTO number_rows VALUES (?, ?, ?, ?, ?)", (*key, found, values.tobytes()))
