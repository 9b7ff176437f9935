"""Read-only access to a run for the viewer and the report: records, explanations, scores, simulations.

A run folder holds the stage folders (`nbutils.core.layout.RunLayout`); only the collection is required:
units that were not explained or scored yet still have their excerpts. Opening a run reads nothing but the
collection's metadata: explanations and scores are read from the stages' results stores
(`nbutils.core.store`) when asked for, one unit at a time, and sorting and filtering read the store's
indexes and explanation column (`StoredResults`), so a run of 300,000 units opens as fast as one of ten.
Entries and results are read back typed (`nbutils.core.results.ExplanationEntry`,
`nbutils.score.contract.UnitScores`); those written in format 1 are upgraded as they are read, so older runs
open unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.integrity import changed_files, repair_fix
from nbutils.core.io import read_json
from nbutils.core.layout import STAGES, ResultsLayout, RunLayout, explanations, scores
from nbutils.core.records import RecordStore, UnitRecord
from nbutils.core.results import ExplanationEntry
from nbutils.core.store import ResultStore
from nbutils.core.units import Key
from nbutils.score import contract
from nbutils.score.contract import (
    ScoredSide,
    Scorer,
    UnitDetails,
    UnitScores,
    finite,
    headline_of,
    label,
    number_notes,
    registered,
)
from nbutils.score.flags import explanation_notes

SORTS = ("layer, neuron", "score: best first", "score: worst first", "baseline: best first")


def scorer_value(side: ScoredSide | None, sc: Scorer, column: int = 0) -> float | None:
    """A scorer's number (its headline by default) in a unit side's scores or its baseline's."""
    return None if side is None else finite(sc.columns[column].value(side.of(sc.name)))


def result_notes(result: UnitScores | None, scorers: list[Scorer], own: list[str]) -> list[tuple[str, str]]:
    """(which result, note) for a stage-03 result: ``own`` (its explanation's notes), then each scorer number's,
    the explanation's and the baseline's (`number_notes`)."""
    return [("explanation", n) for n in own] + ([] if result is None else number_notes(result, scorers))


def headline_value(side: ScoredSide | None, scorers: list[Scorer]) -> float | None:
    """The run's headline number (`nbutils.score.contract.headline_of` its scorers) in a unit side's scores or
    its baseline's (None when missing or undefined)."""
    sc = headline_of(scorers)
    return None if sc is None else scorer_value(side, sc, sc.headline)


def main_score(side: ScoredSide | None, which: str = "top_and_random") -> float | None:
    """The simulation scorer's pooled correlation in a unit side's scores (None when missing or undefined):
    the paper's number, for code that asks for it by name; views use the run's `headline_value`."""
    sim = None if side is None else side.of("simulation")
    return None if sim is None else finite(sim.set(which).correlation.value)


@dataclass
class ScoreTable:
    """Every scored unit side's scorer numbers as arrays, built in one streaming pass over stage 03's results
    (`RunView.score_table`): what the report aggregates, so a run of 300,000 units is read once and none of
    its results is kept. Columns are keyed by (who, scorer name, column index), who being "explanation" or
    "baseline"; NaN where a number is undefined or missing."""

    keys: list[Key]
    failed: np.ndarray
    values: dict[tuple[str, str, int], np.ndarray]
    noted: dict[tuple[str, str, int], np.ndarray]
    """Whether the number carries a note (`Column.notes`)."""
    degenerate: dict[tuple[str, str, int], np.ndarray]
    """Whether one of its notes says the judge was degenerate (the same answer for every item)."""
    f1_chance: dict[tuple[str, str], np.ndarray]
    """Per judging scorer: the F1 of answering yes to every item, where stored."""

    @classmethod
    def build(cls, results: Iterator[tuple[Key, UnitScores]], scorers: list[Scorer]) -> ScoreTable:
        cols = [(who, sc, i, c) for who in WHO for sc in scorers for i, c in enumerate(sc.columns)]
        keys: list[Key] = []
        failed: list[bool] = []
        values: dict[tuple, list[float]] = {(w, sc.name, i): [] for w, sc, i, _ in cols}
        noted: dict[tuple, list[bool]] = {k: [] for k in values}
        degenerate: dict[tuple, list[bool]] = {k: [] for k in values}
        chance: dict[tuple, list[float]] = {(w, sc.name): [] for w in WHO for sc in scorers}
        for key, r in results:
            keys.append(key)
            failed.append(bool(r.failure))
            parts = {"explanation": r, "baseline": r.baseline}
            for who, sc, i, column in cols:
                res = parts[who].of(sc.name)
                v = finite(column.value(res))
                notes = column.notes_of(res)
                values[(who, sc.name, i)].append(np.nan if v is None else v)
                noted[(who, sc.name, i)].append(bool(notes))
                degenerate[(who, sc.name, i)].append(any(n.startswith("degenerate") for n in notes))
            for who in WHO:
                for sc in scorers:
                    m = getattr(parts[who].of(sc.name), "f1_chance", None)
                    f1 = finite(m.value) if m is not None else None
                    chance[(who, sc.name)].append(np.nan if f1 is None else f1)
        return cls(
            keys, np.array(failed, dtype=bool),
            {k: np.array(v, dtype=float) for k, v in values.items()},
            {k: np.array(v, dtype=bool) for k, v in noted.items()},
            {k: np.array(v, dtype=bool) for k, v in degenerate.items()},
            {k: np.array(v, dtype=float) for k, v in chance.items()},
        )  # fmt: skip

    @classmethod
    def from_store(cls, store: ResultStore, scorers: list[Scorer]) -> ScoreTable:
        """The same table read from the store's numbers and flags (`nbutils.score.contract.result_numbers`),
        parsing no result: what `build` computes, at the speed of an indexed read."""
        names = {(who, sc.name, i): contract.number_name(sc, c, who == "baseline") for who in WHO for sc in scorers
                 for i, c in enumerate(sc.columns)}  # fmt: skip
        chance = {(who, sc.name): ("baseline:" if who == "baseline" else "") + sc.name + contract.F1_CHANCE
                  for who in WHO for sc in scorers}  # fmt: skip
        wanted = [n + flag for n in names.values() for flag in ("", contract.NOTED, contract.DEGENERATE)] + list(
            chance.values()
        )
        keys, table = store.number_table(wanted)
        failing = store.failed_keys()
        failed = np.array([k in failing for k in keys], dtype=bool) if failing else np.zeros(len(keys), bool)
        return cls(
            keys, failed.reshape(len(keys)),
            {k: table[n] for k, n in names.items()},
            {k: np.isfinite(table[n + contract.NOTED]) for k, n in names.items()},
            {k: np.isfinite(table[n + contract.DEGENERATE]) for k, n in names.items()},
            {k: table[n] for k, n in chance.items()},
        )  # fmt: skip

    def flagged_keys(self) -> set[Key]:
        """The unit sides with a note on any of their numbers."""
        flagged = np.logical_or.reduce([*self.noted.values(), np.zeros(len(self.keys), bool)])
        return {self.keys[i] for i in np.flatnonzero(flagged)}

    def column(self, who: str, scorer_name: str, index: int = 0) -> np.ndarray:
        """One number of every scored unit side (NaN where undefined; all NaN for a scorer not in the run)."""
        return self.values.get((who, scorer_name, index), np.full(len(self.keys), np.nan))

    @property
    def layers(self) -> np.ndarray:
        return np.array([k[0] for k in self.keys], dtype=np.int64)


WHO = ("explanation", "baseline")


class StoredNotes(Mapping[Key, list[str]]):
    """The notes on explanations that stage 02 stored when it finished (`ResultStore.put_notes`): the keys
    are read once, each key's notes when asked."""

    def __init__(self, store: ResultStore, keys: list[Key]) -> None:
        self.store, self._keys, self._set = store, keys, set(keys)

    def __getitem__(self, key: Key) -> list[str]:
        if key not in self._set:
            raise KeyError(key)
        return self.store.notes_of(key)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def values(self):  # one read of the table, not a query per key
        return [notes for _, notes in self.store.all_notes()]

    def items(self):
        return self.store.all_notes()


class StoredResults(Mapping[Key, Any]):
    """A stage's results as a read-only mapping from key to typed entry (``decode``: e.g.
    `ExplanationEntry.from_dict`), read from its store when asked: ``get`` and ``[]`` read one entry,
    iteration and ``len`` read the keys (once), ``values()`` and ``items()`` stream the entries in key order a
    batch at a time (so nothing holds every entry in memory)."""

    def __init__(self, store: ResultStore, decode: Callable[[dict[str, Any]], Any]) -> None:
        self.store, self._upgrade = store, decode
        self._keys: list[Key] | None = None

    def _all_keys(self) -> list[Key]:
        if self._keys is None:
            self._keys = self.store.keys()
        return self._keys

    def __getitem__(self, key: Key) -> Any:
        found = self.store.get(key)
        if found is None:
            raise KeyError(key)
        return self._upgrade(found)

    def get(self, key: Key, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and self.get(key) is not None

    def __iter__(self) -> Iterator[Key]:
        return iter(self._all_keys())

    def __len__(self) -> int:
        return len(self._all_keys())

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        return (self._upgrade(e) for e in self.store.entries())

    def items(self) -> Iterator[tuple[Key, Any]]:  # type: ignore[override]
        return ((e.key, e) for e in self.values())


def _check_unchanged(stage_dir: Path) -> None:
    """A finished stage's results store as its stage wrote it: its size and modification time against the
    stage's manifest (hashed only when they differ), so a 307,200-unit run still opens at once."""
    changed = changed_files(stage_dir, stage_dir.parent, cheap=True, only="results.sqlite")
    if changed:
        raise UserError(changed[0][1] + ": its numbers cannot be trusted.", repair_fix(stage_dir.parent))


@dataclass
class RunView:
    """Everything the viewer and the report read from one run."""

    store: RecordStore
    explanations: Mapping[Key, ExplanationEntry] = field(default_factory=dict)
    scores: Mapping[Key, UnitScores] = field(default_factory=dict)
    score_layout: ResultsLayout | None = None
    score_store: ResultStore | None = None
    """Stage 03's store, where the scorers' details are read (`simulation`)."""
    usage_files: dict[str, Path] = field(default_factory=dict)
    explanation_summary: Path | None = None

    @classmethod
    def from_dirs(
        cls,
        collection_dir: str | Path,
        explanation_dir: str | Path | None = None,
        score_dir: str | Path | None = None,
    ) -> RunView:
        """Open the stage folders; the later two may be missing or empty. A finished stage's results store that
        changed since its stage wrote it is refused, with the run's repair path (`_check_unchanged`)."""
        view = cls(store=RecordStore(collection_dir))
        for stage_dir in (explanation_dir, score_dir):
            if stage_dir is not None:
                _check_unchanged(Path(stage_dir))
        if explanation_dir is not None:
            layout = explanations(explanation_dir)
            view.explanations = StoredResults(ResultStore(layout.root), ExplanationEntry.from_dict)
            view.explanation_summary = layout.summary
            view.usage_files[STAGES[1].folder] = layout.usage
        if score_dir is not None:
            view.score_layout = scores(score_dir)
            view.score_store = ResultStore(score_dir)
            view.scores = StoredResults(view.score_store, UnitScores.from_dict)
            view.usage_files[STAGES[2].folder] = view.score_layout.usage
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
        run = RunLayout(run_dir) if run_dir is not None else None
        return cls.from_dirs(
            collection_dir or run.collect.root,
            explanation_dir or (run.explain.root if run else None),
            score_dir or (run.score.root if run else None),
        )

    @cached_property
    def explanation_notes(self) -> dict[Key, list[str]]:
        """Notes on explanations that copy a worked example or repeat other units' (`nbutils.score.flags`)."""
        stored = _store(self.explanations)
        found = stored.note_keys() if stored is not None else None
        if found is not None:  # written by stage 02 when it finished, and current
            return StoredNotes(stored, found)
        return explanation_notes(dict(self.explanation_texts()))

    @cached_property
    def scorers(self) -> list[Scorer]:
        """The registered scorers with results in this run, in registry order (from the store's list of the
        numbers it holds, where it has one)."""
        stored = _store(self.scores)
        if stored is not None and stored.indexed:
            names = {contract.scorer_of(n) for n in stored.number_names()}
            return [sc for sc in registered() if sc.name in names]
        return [
            sc
            for sc in registered()
            if any(r.of(sc.name) is not None or r.baseline.of(sc.name) is not None for r in self.scores.values())
        ]

    @cached_property
    def score_table(self) -> ScoreTable:
        """Every scored unit side's numbers (`ScoreTable`), read in one pass the first time it is asked for."""
        stored = _store(self.scores)
        if stored is not None and stored.indexed:
            return ScoreTable.from_store(stored, self.scorers)
        return ScoreTable.build(self.scores.items(), self.scorers)

    @cached_property
    def rare(self) -> dict[str, Any] | None:
        """The dead and rare units stage 02 left out (`nbutils.core.failures.rare_listing`), if it listed any."""
        if self.explanation_summary is None or not self.explanation_summary.is_file():
            return None
        return read_json(self.explanation_summary).get("rare")

    def explained_keys(self) -> list[Key]:
        """The unit sides with an explanation (not a failure), in (layer, neuron, positive first) order; read
        from the store's explanation column where there is one."""
        return [k for k, t in self.explanation_texts() if t]

    def explanation_texts(self) -> list[tuple[Key, str | None]]:
        """(key, explanation) of every stage-02 entry: the store's explanation column, or the entries."""
        stored = _store(self.explanations)
        return stored.explanations() if stored else [(k, e.explanation) for k, e in self.explanations.items()]

    def keys(self) -> list[Key]:
        """Every explained or scored unit side, in (layer, neuron, sign) order."""
        return sorted(set(self.explanations) | set(self.scores))

    def notes(self, key: Key) -> list[tuple[str, str]]:
        """(which result, note) for every note on a unit side (`nbutils.score.flags`): its explanation's
        (copied, repeated), then each scorer number's, the explanation's and the baseline's."""
        return result_notes(self.scores.get(key), self.scorers, self.explanation_notes.get(key, []))

    def noted_keys(self) -> set[Key]:
        """The unit sides with any note: on their explanation, or on a number (the store's flags)."""
        return set(self.explanation_notes) | self.score_table.flagged_keys()

    def scores_frame(self):
        """A pandas DataFrame, one row per explained or scored unit side: ``layer``, ``neuron``, ``sign``,
        ``explanation``, then every number of every scorer with results (NaN where undefined), each followed
        by the token-lookup baseline's (``baseline <number>``), then ``failure`` and ``notes`` (every note on
        the side's numbers, joined: a number's weakness travels with the row). Built from `score_table` and
        the stores' columns, and the notes stage 03 stored beside the numbers (a store written before them: the
        results that carry a note are read)."""
        import pandas as pd

        table, (scored, _), (given, current) = self.score_table, _frame_columns(self.scores), _frame_columns(
            self.explanations)  # fmt: skip
        keys = sorted(scored) if given.keys() <= scored.keys() else sorted(scored.keys() | given.keys())
        rows = None if keys == table.keys else _rows_of(table.keys, keys)
        frame: dict[str, Any] = {"layer": [k[0] for k in keys], "neuron": [k[1] for k in keys],
                                 "sign": [k[2] for k in keys]}  # fmt: skip
        for sc in self.scorers:
            for i, c in enumerate(sc.columns):
                for who, name in (("explanation", label(sc, c)), ("baseline", f"baseline {label(sc, c)}")):
                    column = table.column(who, sc.name, i)
                    frame[name] = column if rows is None else np.append(column, np.nan)[rows]  # -1: not scored
        noted = table.flagged_keys()  # the explanation's own notes are read with the store's columns
        own = (
            {} if current else {k: "; ".join(f"explanation: {n}" for n in v) for k, v in self.explanation_notes.items()}
        )

        def notes(k: Key, kept: str | None, mine: str | None) -> str:  # what stage 03 stored, else the result's
            if k not in noted and not mine:
                return ""
            if kept is None:
                return "; ".join(f"{w}: {n}" for w, n in self.notes(k))
            return f"{mine}; {kept}" if mine and kept else mine or kept

        texts, failures, noted_texts, nothing = [], [], [], (None, None, None, None)
        for k in keys:  # each side's read columns let go as its row is made (its notes are held once)
            a, b = scored.pop(k, nothing), given.pop(k, nothing)
            texts.append(a[0] if a is not nothing else b[0])
            failures.append(a[1] or b[1])
            noted_texts.append(notes(k, a[2], b[3] if current else own.get(k)))
        frame["failure"], frame["notes"] = failures, noted_texts
        frame = {**{n: frame[n] for n in ("layer", "neuron", "sign")}, "explanation": texts, **frame}
        return pd.DataFrame(frame)

    def explanations_frame(self):
        """A pandas DataFrame, one row per explained unit side: ``layer``, ``neuron``, ``sign``,
        ``explanation``, the token-lookup ``baseline`` explanation, ``candidates`` (how many were written),
        the kept one's ``calibration_score`` (best-of-n runs), ``failure``, ``retryable`` and ``notes``. Read
        from the store's columns where there is a store (no entry decoded), else from the entries."""
        import pandas as pd

        names = ["layer", "neuron", "sign", "explanation", "baseline", "candidates", "calibration_score", "failure",
                 "retryable", "notes"]  # fmt: skip
        notes = dict(self.explanation_notes.items())  # one read of the stored notes, not a query per side
        stored = _store(self.explanations)
        if stored is not None and stored.indexed:
            rows = [
                (key[0], key[1], key[2], text, base, n, finite(calibration), failure, bool(retry),
                 "; ".join(notes.get(key, [])))
                for key, text, base, n, calibration, failure, retry in stored.explanation_columns()
            ]  # fmt: skip
        else:
            rows = [_explanation_row(key, self.explanations[key], notes) for key in sorted(self.explanations)]
        return pd.DataFrame(rows, columns=names).astype({"calibration_score": "float64"})

    def record(self, layer: int, neuron: int) -> UnitRecord:
        return self.store.record(layer, neuron)

    def signs(self, layer: int, neuron: int) -> list[str]:
        """The explained sides of a unit ("positive" first), or ["positive"] when it has none yet."""
        found = [s for s in ("positive", "negative") if (layer, neuron, s) in self.explanations]
        return found or ["positive"]

    def simulation(self, key: Key) -> UnitDetails | None:
        """A unit side's saved scorer details (`UnitDetails`: each scorer's, typed), if any."""
        found = self.score_store.details(key) if self.score_store is not None else None
        return None if found is None else UnitDetails.from_dict(found)

    def usage(self) -> dict[str, dict[str, Any]]:
        """Each LLM stage's usage.json (tokens, requests, cache hits, estimated cost), where present."""
        return {stage: read_json(path) for stage, path in self.usage_files.items() if path.is_file()}

    def matching(
        self, text: str, k: int | None = None, phrase: bool = False, ranked: bool = True
    ) -> list[tuple[Key, float, list[str]]]:
        """Unit sides whose explanation, candidates, rule or strongest tokens match words of ``text`` (with
        ``phrase``, all of them in order, the last as a prefix), best first: ``(key, relevance, matched
        words)`` from the stage-02 store's full-text index (`ResultStore.text_search`); for results without
        a store, the explanations holding every word (case-insensitive), in key order."""
        store = _store(self.explanations)
        if store is not None and store.indexed:
            return store.text_search(text, k, phrase, ranked)
        words = text.lower().split()
        found = [(key, float(len(words)), words) for key, t in self.explanation_texts()
                 if t and all(w in t.lower() for w in words)]  # fmt: skip
        return found[:k] if k is not None else found

    def neuron_ids(self, sort: str = SORTS[0], text: str = "") -> list[tuple[int, int]]:
        """Units to step through: all collected ones, or only those whose explanation (candidates, rule,
        strongest tokens) holds the words of ``text`` in order, the last as a prefix (`matching`: the full-text
        index, words stemmed); sorted by index or by score (scored units first, then the rest by index)."""
        if sort not in SORTS:
            raise UserError(f"Unknown sort {sort!r}.", f"Use one of: {', '.join(SORTS)}.")
        if text:
            ids = sorted({(k[0], k[1]) for k, _, _ in self.matching(text, phrase=True, ranked=False)})
        else:
            ids = [(layer, n) for layer in self.store.layers for n in self.store.neurons(layer).tolist()]
        if sort == SORTS[0]:
            return ids
        order = [(k[0], k[1]) for _, k in self.ranked(baseline=sort.startswith("baseline")) if k[2] == "positive"]
        if "worst" in sort:
            order.reverse()
        wanted = set(ids)
        known = [i for i in order if i in wanted]
        placed = set(known)
        return known + [i for i in ids if i not in placed]

    @property
    def headline(self) -> Scorer | None:
        """The scorer whose headline number the run is sorted and summarised by (`headline_of` its scorers:
        the simulation scorer's top+random correlation where it ran); None before stage 03."""
        return headline_of(self.scorers)

    def ranked(self, baseline: bool = False, scorer: Scorer | None = None) -> list[tuple[float, Key]]:
        """Scored unit sides with a defined headline number (`headline`, or ``scorer``'s; the baseline's with
        ``baseline``), best first (read from the store's index where it has one)."""
        sc = scorer or self.headline
        if sc is None:
            return []
        stored = _store(self.scores)
        if stored is not None and stored.indexed:
            return stored.ranked(contract.number_name(sc, sc.columns[sc.headline], baseline))
        pairs = [(scorer_value(r.side(baseline), sc, sc.headline), k) for k, r in self.scores.items()]
        return sorted(((v, k) for v, k in pairs if v is not None), key=lambda p: -p[0])


def _frame_columns(results: Mapping[Key, Any]) -> tuple[dict[Key, tuple[Any, ...]], bool]:
    """Per side: explanation, failure, stored number notes and stored run-wide notes (`ResultStore.frame_columns`),
    or from the entries where there is no store (no notes stored: None); and whether its run-wide notes are
    current (`ResultStore.note_keys`)."""
    stored = _store(results)
    if stored is not None and stored.indexed:
        return stored.frame_columns()
    return {k: (r.explanation, r.failure, None, None) for k, r in results.items()}, False


def _rows_of(have: list[Key], keys: list[Key]) -> np.ndarray:
    """Where each of ``keys`` is in ``have`` (-1: not there)."""
    row_of = {k: i for i, k in enumerate(have)}
    return np.array([row_of.get(k, -1) for k in keys], dtype=np.int64)


def _explanation_row(key: Key, e: Any, notes: Mapping[Key, list[str]]) -> tuple[Any, ...]:
    """One row of `RunView.explanations_frame` from a decoded stage-02 entry."""
    kept = e.kept
    return (key[0], key[1], key[2], e.explanation, e.baseline.explanation if e.baseline else None, len(e.candidates),
            finite(kept.calibration_score) if kept else None, e.failure, bool(e.retryable),
            "; ".join(notes.get(key, [])))  # fmt: skip


def _store(results: Mapping[Key, Any]) -> ResultStore | None:
    """The store behind a view's results (None for results given as a plain dict)."""
    return results.store if isinstance(results, StoredResults) else None
