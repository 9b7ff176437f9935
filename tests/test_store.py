"""The results store of stages 02 and 03 (`nbutils.core.store`): exact round trips, one transaction per unit
(a killed writer loses at most the unit in progress), shard parts written by several processes at once and
merged, folders written before the store, and damaged, truncated or newer stores named with their fix."""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nbutils.core.codec import MIN_ARRAY, pack, unpack
from nbutils.core.errors import UserError
from nbutils.core.integrity import sqlite_problem
from nbutils.core.store import STORE_FORMAT, ResultStore

REPO = Path(__file__).resolve().parents[1]


def _entry(layer: int, neuron: int, sign: str = "positive", **extra) -> dict:
    return {"layer": layer, "neuron": neuron, "sign": sign, "explanation": f"unit {layer}/{neuron}", **extra}


def _details(seed: int, tokens: int = 64) -> dict:
    """Details shaped like the simulation scorer's: float32 activations, float64 expected values."""
    rng = np.random.default_rng(seed)
    acts = [float(x) for x in rng.normal(size=tokens).astype(np.float32)]
    expected = [float(x) for x in rng.random(tokens) * 10]  # not exact in float32
    return {"simulation": {"excerpts": [{"tokens": [f"t{i}" for i in range(tokens)], "activations": acts,
                                         "expected": expected, "split": "top", "index": seed}]}}  # fmt: skip


def test_entries_details_and_numbers_read_back_equal(tmp_path):
    store = ResultStore(tmp_path)
    store.put(_entry(1, 2, retryable=True, x=1))
    store.put(_entry(0, 5, "negative", x=2), _details(1), {"simulation/a": 0.5, "baseline:simulation/a": None})
    store.put(_entry(0, 5, x=3), _details(2))
    store.put(_entry(1, 2, x=4), _details(3))  # the retried unit replaces its entry
    assert [e["x"] for e in store.entries()] == [3, 2, 4]  # layer, neuron, positive before negative
    assert [e["x"] for e in store.entries(batch=1)] == [3, 2, 4]  # paged reads see the same order
    assert store.keys() == [(0, 5, "positive"), (0, 5, "negative"), (1, 2, "positive")] and len(store) == 3
    assert store.get((0, 5, "negative")) == _entry(0, 5, "negative", x=2)
    assert store.details((0, 5, "negative")) == _details(1) and store.details((1, 2, "positive")) == _details(3)
    assert store.get((9, 9, "positive")) is None and store.details((9, 9, "positive")) is None
    with sqlite3.connect(tmp_path / "results.sqlite") as db:  # the numbers a view sorts by, with their unit
        assert db.execute("SELECT layer, neuron, side, name, value FROM numbers ORDER BY name").fetchall() == [
            (0, 5, 1, "baseline:simulation/a", None), (0, 5, 1, "simulation/a", 0.5)]  # fmt: skip
        store.put(_entry(0, 5, "negative", x=5))  # rewritten without numbers or details: both gone
        assert db.execute("SELECT count(*) FROM numbers").fetchone() == (0,)
    assert store.details((0, 5, "negative")) is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("results.sqlite")] == []


def test_pack_is_exact_and_compact():
    d = _details(7, tokens=1280)
    d["nested"] = [[0.1] * MIN_ARRAY, [1, 2, 3], [True] * 9, {"ints": list(range(20))}, [float("nan")] * 9]
    back = unpack(pack(d))
    assert back["simulation"] == d["simulation"]  # every float as written (float32 or float64 inside)
    assert back["nested"][:4] == d["nested"][:4] and all(math.isnan(x) for x in back["nested"][4])
    assert type(back["nested"][1][0]) is int and type(back["nested"][2][0]) is bool  # not turned into floats
    text = json.dumps(d).encode()
    assert len(pack(d)) < len(text) / 2.5, (len(pack(d)), len(text))
    # the float32-exact activations take 4 bytes each, the others 8: at most 12 bytes a token besides its text
    plain = _details(8, tokens=1280)
    plain["simulation"]["excerpts"][0]["tokens"] = []
    assert 1280 * 10 < len(pack(plain)) < 1280 * 12 + 200


_WRITER = """
import sys, time
from nbutils.core.store import ResultStore
store = ResultStore(sys.argv[1], part=sys.argv[2] if sys.argv[2] != "-" else None)
first, n = int(sys.argv[3]), int(sys.argv[4])
for i in range(first, first + n):
    d = {"simulation": {"expected": [float(i) + 0.1 * k for k in range(400)]}}
    store.put({"layer": 0, "neuron": i, "sign": "positive", "explanation": "e" * 2000}, d, {"n": float(i)})
    time.sleep(float(sys.argv[5]))
store.close()
"""


def _writer(root: Path, part: str | None, first: int, n: int, pause: float) -> subprocess.Popen:
    args = [sys.executable, "-c", _WRITER, str(root), part or "-", str(first), str(n), str(pause)]
    return subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True)


def _expected(i: int) -> dict:
    return {"simulation": {"expected": [float(i) + 0.1 * k for k in range(400)]}}


def test_a_killed_writer_loses_at_most_the_unit_in_progress_and_resumes(tmp_path):
    proc = _writer(tmp_path, None, 0, 100_000, 0.0)
    deadline = time.monotonic() + 120
    while not (tmp_path / "results.sqlite").is_file() or len(ResultStore(tmp_path)) < 20:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ResultStore(tmp_path)
    keys = store.keys()
    assert len(keys) >= 20 and [k[1] for k in keys] == list(range(len(keys)))  # a prefix, nothing half-written
    assert all(store.details(k) == _expected(k[1]) for k in keys)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store.close()
    done = len(keys)
    resumed = _writer(tmp_path, None, done, 5, 0.0)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert [k[1] for k in ResultStore(tmp_path).keys()] == list(range(done + 5))


def test_shard_parts_written_at_once_by_several_processes_merge_into_one_store(tmp_path):
    ResultStore(tmp_path).put(_entry(0, 1, x="old"))  # what the main store held before: replaced by the shard's
    procs = [_writer(tmp_path, f"shard-{s:03d}", s * 40, 40, 0.001) for s in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0], [p.stderr.read() for p in procs]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [f"shard-{s:03d}.sqlite" for s in range(4)]
    store = ResultStore(tmp_path)
    assert store.keys() == [(0, 1, "positive")]  # parts are not read before they are merged
    assert store.merge_parts() == 160
    assert [k[1] for k in store.keys()] == list(range(160)) and list((tmp_path / "parts").iterdir()) == []
    assert store.get((0, 1, "positive"))["explanation"] == "e" * 2000
    assert all(store.details((0, i, "positive")) == _expected(i) for i in range(160))
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT count(*), sum(value) FROM numbers").fetchone() == (160, sum(range(160)))
    assert store.merge_parts() == 0  # nothing left to merge


def test_a_half_written_part_is_named_and_the_other_parts_still_merge(tmp_path):
    for s in range(2):
        assert _writer(tmp_path, f"shard-{s:03d}", s * 10, 10, 0.0).wait(timeout=120) == 0
    bad = tmp_path / "parts" / "shard-001.sqlite"
    bad.write_bytes(bad.read_bytes()[:1500])  # cut inside its first pages
    store = ResultStore(tmp_path)
    with pytest.raises(UserError, match="shard-001.sqlite is damaged") as err:
        store.merge_parts()
    assert f"nbutils check {tmp_path.parent} --repair" in err.value.fix  # the run's one repair path
    assert [k[1] for k in store.keys()] == list(range(10)) and bad.is_file()  # shard 0's units are kept


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_is_named_with_the_fix(tmp_path, damage):
    store = ResultStore(tmp_path)
    for i in range(50):
        store.put(_entry(0, i), _details(i))
    store.close()
    path = tmp_path / "results.sqlite"
    data = path.read_bytes()
    path.write_bytes(b"not a database at all " * 100 if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(UserError, match="results.sqlite is damaged") as err:
        list(ResultStore(tmp_path).entries())
    assert f"nbutils check {tmp_path.parent} --repair" in err.value.fix and "same `nbutils run`" in err.value.fix


def test_a_store_format_that_is_not_a_number_is_named_not_a_traceback(tmp_path):
    store = ResultStore(tmp_path)
    store.put(_entry(0, 1), _details(1))
    store.close()
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        db.execute("UPDATE meta SET value='one' WHERE name='format'")
    with pytest.raises(UserError, match="its store format is 'one', not a number") as err:
        ResultStore(tmp_path).keys()
    assert "--repair" in err.value.fix


def test_a_store_written_by_a_newer_version_is_refused(tmp_path):
    ResultStore(tmp_path).put(_entry(0, 1))
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        db.execute("UPDATE meta SET value=? WHERE name='format'", (str(STORE_FORMAT + 1),))
        db.execute("UPDATE meta SET value='nbutils 9.0' WHERE name='written_by'")
    with pytest.raises(UserError, match=f"written by nbutils 9.0 in store format {STORE_FORMAT + 1}") as err:
        ResultStore(tmp_path).get((0, 1, "positive"))
    assert "Upgrade nbutils" in err.value.fix


def test_a_folder_written_before_the_store_is_read_and_then_copied_in(tmp_path):
    old = [_entry(0, 3, "negative", x=1), _entry(0, 3, x=2), _entry(2, 0, x=3)]
    (tmp_path / "neurons").mkdir()
    (tmp_path / "simulations").mkdir()
    for e in old:
        name = f"L{e['layer']}_N{e['neuron']}_{e['sign']}.json"
        (tmp_path / "neurons" / name).write_text(json.dumps(e))
        (tmp_path / "simulations" / name).write_text(json.dumps(_details(e["x"])))
    store = ResultStore(tmp_path)
    assert [e["x"] for e in store.entries()] == [2, 1, 3] and store.details((2, 0, "positive")) == _details(3)
    assert not (tmp_path / "results.sqlite").exists()  # reading writes nothing
    store.put(_entry(2, 0, x=4))  # the first write copies the old files in, then replaces this unit
    again = ResultStore(tmp_path)
    assert [e["x"] for e in again.entries()] == [2, 1, 4] and again.details((0, 3, "positive")) == _details(2)


def test_queries_read_the_index_and_the_explanation_column(tmp_path):
    store = ResultStore(tmp_path)
    items = [
        (_entry(2, 0, explanation="Months of the year"), None, {"sim": 0.2, "baseline:sim": 0.9}),
        (_entry(0, 1, "negative", explanation="the word 'of'"), None, {"sim": 0.7}),
        (_entry(0, 1, explanation=None, failure="no reply"), None, {"sim": None}),
        (_entry(1, 4, explanation="MONTH names, and the day"), None, {"sim": 0.7, "other": 1.0}),
    ]
    assert store.put_many(iter(items), batch=3) == 4  # two transactions
    assert store.ranked("sim") == [(0.7, (0, 1, "negative")), (0.7, (1, 4, "positive")), (0.2, (2, 0, "positive"))]
    assert store.ranked("baseline:sim") == [(0.9, (2, 0, "positive"))] and store.ranked("missing") == []
    assert sorted(store.number_names()) == ["baseline:sim", "other", "sim"]
    assert store.explanations()[:2] == [((0, 1, "positive"), None), ((0, 1, "negative"), "the word 'of'")]
    assert store.search("month") == [(1, 4, "positive"), (2, 0, "positive")]  # ignoring case
    store.put(_entry(1, 4, explanation="weekdays"), None, {"sim": 0.1})  # rewritten: its old numbers go
    assert store.search("month") == [(2, 0, "positive")] and store.ranked("sim")[-1] == (0.1, (1, 4, "positive"))
    assert store.indexed and ResultStore(tmp_path / "empty").ranked("sim") == []


def test_the_selection_lists_the_chosen_entries_in_its_order_and_the_export_streams_them(tmp_path):
    store = ResultStore(tmp_path)
    store.put_many([(_entry(2, 0, x=1), None, None), (_entry(0, 1, x=2), None, None), (_entry(1, 3, x=3), None, None)])
    assert store.selection() is None and store.chosen() == store.keys()  # none recorded: every key, key order
    store.select([(1, 3, "positive"), (9, 9, "positive"), (2, 0, "positive")])
    assert ResultStore(tmp_path).selection() == [(1, 3, "positive"), (9, 9, "positive"), (2, 0, "positive")]
    assert store.chosen() == [(1, 3, "positive"), (2, 0, "positive")]  # (9, 9) has no entry (yet)
    store.select([(0, 1, "positive")])  # a new selection replaces the old one; the entries all stay
    assert store.chosen() == [(0, 1, "positive")] and len(store) == 3
    store.select([(2, 0, "positive"), (1, 3, "positive")])
    out = tmp_path / "x" / "explanations.jsonl"
    assert store.export_jsonl(out) == 2
    assert [json.loads(line)["x"] for line in out.read_text().splitlines()] == [1, 3]


def test_an_export_that_fails_half_way_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    from nbutils.core.io import write_lines

    out = tmp_path / "scores.jsonl"
    assert write_lines(out, ["a", "b"]) == 2

    def lines():
        yield "c"
        raise RuntimeError("the store went away")

    with pytest.raises(RuntimeError):
        write_lines(out, lines())
    assert out.read_text() == "a\nb\n" and [p.name for p in tmp_path.iterdir()] == ["scores.jsonl"]


def test_a_stored_sequence_reads_each_result_when_asked_and_parses_only_failures_to_count_them(tmp_path):
    from nbutils.core.store import StoredSequence

    store = ResultStore(tmp_path)
    store.put_many([(_entry(0, n, x=n, failure="boom" if n == 2 else None), None, None) for n in range(5)])
    store.select([(0, n, "positive") for n in (4, 2, 0)])
    parsed = []
    seq = StoredSequence.of(tmp_path, lambda e: parsed.append(e["x"]) or e["x"])
    assert len(seq) == 3 and parsed == []  # nothing read yet
    assert seq.failed() == [2] and parsed == [2]
    assert seq[0] == 4 and seq[-1] == 0 and seq[1:] == [2, 0] and list(seq) == [4, 2, 0] and seq == [4, 2, 0]
    assert seq != [4, 2] and 2 in seq
    store.put(_entry(0, 4, x=40))  # read when asked: the store as it is now
    assert seq[0] == 40


def test_stage_03_takes_stage_02s_selection_or_else_its_jsonl_file(tmp_path):
    from nbutils.core.io import write_jsonl
    from nbutils.score.stage import explained

    new = ResultStore(tmp_path / "new")
    new.put_many([(_entry(0, n, explanation=f"e{n}"), None, None) for n in range(3)])
    new.select([(0, 2, "positive"), (0, 0, "positive")])
    assert explained(tmp_path / "new") == {(0, 2, "positive"): "e2", (0, 0, "positive"): "e0"}
    old = ResultStore(tmp_path / "old")  # a store from before selections were kept, beside its JSON-lines file
    old.put_many([(_entry(0, n, explanation=f"e{n}"), None, None) for n in range(3)])
    old.close()
    with sqlite3.connect(tmp_path / "old" / "results.sqlite") as db:
        db.execute("DROP TABLE selection")
    write_jsonl(tmp_path / "old" / "explanations.jsonl", [_entry(0, 1, explanation="e1")])
    assert ResultStore(tmp_path / "old").selection() is None
    assert explained(tmp_path / "old") == {(0, 1, "positive"): "e1"}
    write_jsonl(tmp_path / "hand" / "explanations.jsonl", [_entry(3, 3, explanation="by hand")])  # no store
    assert explained(tmp_path / "hand") == {(3, 3, "positive"): "by hand"}
    ResultStore(tmp_path / "old").select([(0, 0, "positive")])  # the next stage-02 run adds the table back
    assert explained(tmp_path / "old") == {(0, 0, "positive"): "e0"}


def test_check_finds_a_damaged_store_and_repair_keeps_every_unit_that_reads_back(tmp_path):
    """`nbutils check RUN` names a finished stage whose store SQLite finds damaged (or whose checksum changed);
    `--repair` rebuilds it from the unit sides that still read back whole and removes the stage's manifest, so
    the same `nbutils run` recomputes only the rest."""
    from nbutils.run.cli import main
    from nbutils.run.manifests import write_manifest
    from nbutils.run.repair import check_run

    run = tmp_path / "run"
    stage = run / "02_explain"
    with ResultStore(stage) as store:
        for i in range(400):
            store.put(_entry(0, i, explanation="words " * 40), _details(i, 16))
    (stage / "summary.json").write_text("{}")
    write_manifest(stage / "manifest.json", "02_explain", "02.ipynb", {}, time.time(), run)
    assert [c.ok for c in check_run(run)] == [True] and main(["check", str(run)]) == 0
    path = stage / "results.sqlite"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096  # one page in the middle of the file
    data[middle + 100 : middle + 4000] = bytes(3900)
    path.write_bytes(bytes(data))
    (found,) = check_run(run)
    assert not found.ok and found.changed and "results.sqlite was truncated or altered" in found.line()
    assert main(["check", str(run)]) == 1
    assert main(["check", str(run), "--repair"]) == 0
    assert not (stage / "manifest.json").exists() and (stage / ".results.sqlite.damaged").is_file()
    with ResultStore(stage) as store:
        kept = store.keys()
        assert 0 < len(kept) <= 400  # what read back whole, each unit as it was written
        assert all(store.get(k) == _entry(0, k[1], explanation="words " * 40) for k in kept)
        assert all(store.details(k) == _details(k[1], 16) for k in kept)
    assert sqlite_problem(path) is None and (stage / "summary.json").is_file()  # intact files stay


def test_a_manifest_checksums_the_store_with_its_log_folded_in(tmp_path):
    """A write still in SQLite's log (another connection open, as a viewer's may be when a stage ends) is
    folded into the file before the manifest checksums it: the checksum covers every write."""
    from nbutils.core.integrity import changed_files
    from nbutils.run.manifests import write_manifest

    run = tmp_path / "run"
    stage = run / "03_score"
    with ResultStore(stage) as store:
        store.put(_entry(0, 1), _details(1))
    reader = sqlite3.connect(stage / "results.sqlite")  # held open, so closing the writer below folds nothing
    reader.execute("SELECT count(*) FROM entries").fetchone()
    writer = sqlite3.connect(stage / "results.sqlite")
    with writer:
        writer.execute("INSERT OR REPLACE INTO meta VALUES ('late', 'write')")
    writer.close()
    assert (stage / "results.sqlite-wal").stat().st_size > 0  # the write is only in the log
    write_manifest(stage / "manifest.json", "03_score", "03.ipynb", {}, time.time(), run)
    assert (stage / "results.sqlite-wal").stat().st_size == 0 and changed_files(stage, run) == []
    reader.close()
    assert changed_files(stage, run) == []  # closing the last reader changes nothing the manifest vouched for


# ----------------------------------------------------------------------------------------------------------
# Ranked full-text search
# ----------------------------------------------------------------------------------------------------------


def _texts() -> list[dict]:
    return [
        _entry(0, 0, explanation="names of months and days of the week"),
        _entry(0, 1, explanation="the month name after a date", candidates=[{"explanation": "calendar dates", "reply": "r"}]),
        _entry(1, 2, explanation="closing brackets", baseline={"explanation": "the tokens \")\", \"]\""}),
        _entry(1, 3, explanation="commas", rule={"clauses": [{"kind": "class", "value": 1.0, "token": "a comma"}]}),
        _entry(2, 0, explanation=None, failure="no reply", baseline={"explanation": "the tokens \" month\", \" day\""}),
    ]  # fmt: skip


def test_text_search_ranks_by_words_matched_stems_and_where_they_matched(tmp_path):
    """BM25 over the explanation, candidates, rule and baseline tokens: an explanation with both query words
    ranks above one with one; stems match ("months" finds "month"); a candidate, a rule's words and the
    baseline's tokens are found too, below explanation matches; the matched words come back."""
    store = ResultStore(tmp_path)
    store.put_many(iter((e, None, None) for e in _texts()))
    found = store.text_search("months days")
    keys = [k for k, _, _ in found]
    assert keys[0] == (0, 0, "positive") and set(keys) == {(0, 0, "positive"), (0, 1, "positive"), (2, 0, "positive")}
    assert found[0][2] == ["months", "days"] and [r for _, r, _ in found] == sorted(
        (r for _, r, _ in found), reverse=True
    )
    one = [k for k, _, _ in store.text_search("month")]
    assert one.index((0, 1, "positive")) < one.index((2, 0, "positive"))  # in the explanation before the tokens
    assert [k for k, _, _ in store.text_search("calendar")] == [(0, 1, "positive")]  # a candidate
    assert [k for k, _, _ in store.text_search("comma")] == [(1, 3, "positive")]  # explanation "commas", stemmed
    assert store.text_search("zzqxv") == [] and len(store.text_search("month", limit=1)) == 1
    # a filter box: the words in order, the last typed in part
    assert [k for k, _, _ in store.text_search("month name aft", phrase=True)] == [(0, 1, "positive")]
    assert store.text_search("month after", phrase=True) == []
    unranked = store.text_search("months days", limit=None, ranked=False)  # a filter: every match, key order
    assert [k for k, _, _ in unranked] == sorted(keys) and all(r == 0.0 and w == [] for _, r, w in unranked)
    with pytest.raises(UserError, match="has no words"):
        store.text_search(" !? ")


def test_the_index_follows_rewrites_and_merged_parts(tmp_path):
    """Rewriting an entry replaces its words in the index; entries merged from shard parts are indexed."""
    store = ResultStore(tmp_path)
    store.put_many(iter((e, None, None) for e in _texts()))
    store.put(_entry(0, 0, explanation="colours"))
    assert (0, 0, "positive") not in [k for k, _, _ in store.text_search("months")]
    assert [k for k, _, _ in store.text_search("colours")] == [(0, 0, "positive")]
    part = ResultStore(tmp_path, part="1")
    part.put(_entry(5, 5, explanation="rainbow colours"))
    part.close()
    store.close()
    ResultStore(tmp_path).merge_parts()
    assert [k for k, _, _ in ResultStore(tmp_path).text_search("rainbow")] == [(5, 5, "positive")]


def test_a_store_without_the_index_is_searched_in_memory_and_indexed_by_the_next_writer(tmp_path, capsys):
    """A store written before the index (its table dropped here) answers the same search from an index built
    in memory, saying so once; the next stage that opens it to write fills the index in the store."""
    store = ResultStore(tmp_path)
    store.put_many(iter((e, None, None) for e in _texts()))
    want = store.text_search("month brackets")
    store.close()
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        conn.execute("DROP TABLE search")
    old = ResultStore(tmp_path)
    assert old.text_search("month brackets") == want and old.text_search("month brackets") == want
    assert capsys.readouterr().err.count("building a text index") == 1
    old.close()
    ResultStore(tmp_path).merge_parts()  # what a stage does first when it opens its store to write
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM search").fetchone()[0] == len(_texts())
    assert ResultStore(tmp_path).text_search("month brackets") == want
    assert "building" not in capsys.readouterr().err


def test_explanation_columns_equal_what_the_decoded_entries_say(tmp_path):
    """What `RunView.explanations_frame` reads with SQLite's JSON functions equals the same fields taken from
    each decoded `ExplanationEntry`: baseline, candidate count, the kept candidate's calibration score (not
    another candidate's), failure and retryable, on both sides, with and without each field."""
    from nbutils.core.results import ExplanationEntry

    cand = [{"explanation": "dates", "reply": "r1", "calibration_score": 0.25},
            {"explanation": "months", "reply": "r2", "calibration_score": 0.75}]  # fmt: skip
    entries = [
        _entry(0, 0, explanation="months", candidates=cand, baseline={"explanation": 'the tokens " May"'}),
        _entry(0, 0, "negative", explanation="dates", candidates=cand),
        _entry(0, 1, explanation=None, failure="no reply", retryable=True, candidates=[]),
        _entry(1, 0, explanation="not among the candidates", candidates=cand[:1]),
        _entry(1, 1, explanation="no candidates at all"),
    ]
    store = ResultStore(tmp_path)
    store.put_many(iter((e, None, None) for e in entries))
    for key, text, base, n, calibration, failure, retry in store.explanation_columns():
        e = ExplanationEntry.from_dict(store.get(key))
        kept = e.kept
        want = (e.explanation, e.baseline.explanation if e.baseline else None, len(e.candidates),
                kept.calibration_score if kept else None, e.failure, bool(e.retryable))  # fmt: skip
        assert (text, base, n, calibration, failure, bool(retry)) == want, key
    assert [k for k, *_ in store.explanation_columns()] == store.keys()


def test_number_rows_give_the_numbers_table_through_rewrites_parts_and_a_backfill(tmp_path):
    """Every side's numbers are also kept as one row (float64 in the order of a stored set of names), which
    `number_table` reads in bulk: it equals the table read name by name from the numbers table, with sides
    whose sets of names differ, None values, a rewritten side, a merged part whose set ids are its own, and a
    store written before the rows (their table dropped here), which readers read name by name and the next
    writer fills."""
    names = ["simulation:all", "detection:auroc", "baseline simulation:all", "absent"]
    rng = np.random.default_rng(0)

    def numbers(i: int) -> dict:
        out = {"simulation:all": float(rng.normal()), "detection:auroc": None if i % 3 == 0 else float(rng.random())}
        if i % 4 == 0:  # another set of names
            out["baseline simulation:all"] = float(rng.normal())
        return out

    store = ResultStore(tmp_path)
    store.put_many(iter((_entry(0, i), None, numbers(i)) for i in range(12)))
    store.put(_entry(0, 5), None, {"simulation:all": 0.5})  # rewritten with a set of its own
    part = ResultStore(tmp_path, part="shard-000")
    part.put_many(iter((_entry(1, i), None, numbers(100 + i)) for i in range(6)))  # its first set: another id
    part.put(_entry(0, 2), None, {"detection:auroc": 0.25})  # a side the main store has: replaced
    part.close()
    store.merge_parts()
    keys, fast = store.number_table(names)
    store.close()
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT count(*) FROM number_rows").fetchone()[0] == 18
        by_name = {n: dict(((r[0], r[1]), r[2]) for r in db.execute(
            "SELECT layer, neuron, value FROM numbers WHERE name=?", (n,))) for n in names}  # fmt: skip
        db.execute("DROP TABLE number_rows")
    for i, key in enumerate(keys):  # against the numbers table itself
        for n in names:
            want = by_name[n].get(key[:2])
            assert (math.isnan(fast[n][i]) and want is None) or fast[n][i] == want, (key, n)
    assert fast["simulation:all"][keys.index((0, 5, "positive"))] == 0.5
    assert math.isnan(fast["detection:auroc"][keys.index((0, 5, "positive"))])
    assert fast["detection:auroc"][keys.index((0, 2, "positive"))] == 0.25
    old = ResultStore(tmp_path)  # written before the rows: read name by name, the same
    assert old.number_table(names)[0] == keys
    assert all(np.array_equal(old.number_table(names)[1][n], fast[n], equal_nan=True) for n in names)
    old.close()
    ResultStore(tmp_path).merge_parts()  # a writer opens it: the rows are filled
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT count(*) FROM number_rows").fetchone()[0] == 18
    again = ResultStore(tmp_path).number_table(names)
    assert again[0] == keys and all(np.array_equal(again[1][n], fast[n], equal_nan=True) for n in names)
