"""Runs killed for real (SIGKILL and SIGINT to the whole process group) during collection, explanation and
scoring, then rerun with the same command: they complete with artifacts equal to an uninterrupted run, and no
LLM request that had completed is sent again. Also: two runs sharing one LLM cache, and no API key on disk."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import FaultProxy

from nbutils.core.layout import cache_dir
from nbutils.core.store import ResultStore
from nbutils.llm.cache import RequestCache

pytestmark = pytest.mark.slow  # whole `nbutils run` chains, killed and resumed

SMALL = [
    "n_excerpts=48",
    "excerpt_len=32",
    "layers=[2, 20]",
    "neurons=[0, 1, 2]",
    "batch_size=8",
    "top_k=8",
    "n_random=6",
    "band_size=2",
    "explain_neurons=[[2, 0], [2, 1], [20, 2]]",  # three units: kills after the first and the second leave some
    "n_boot=50",
    # what is resumed does not depend on the scorers: one of them (detection and fuzzing would triple stage 03's
    # LLM calls); the HTTP runs below name their own
    "scorers=[simulation]",
]
UNITS = 3
COMPARED = ["01_collect"]
STORES = ["02_explain", "03_score"]  # compared by what they hold (a database's pages depend on its write order)
SECRET = "sk-nbutils-test-0123456789abcdef-SECRET"


def _cmd(run_id: str, root: Path, extra: list[str] = ()) -> list[str]:
    pairs = [x for p in [*SMALL, *extra] for x in ("-p", p)]
    return [sys.executable, "-m", "nbutils", "run", *pairs, "--run-id", run_id, "--output-root", str(root)]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def _count(stage_dir: Path) -> int:
    """Unit sides a stage has stored so far (read while the run writes)."""
    if not (stage_dir / "results.sqlite").is_file():
        return 0
    with ResultStore(stage_dir) as store:
        return len(store)


def _files(run: Path) -> dict[str, bytes]:
    out = {}
    for item in COMPARED:
        base = run / item
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in paths:
            if p.name not in ("manifest.json", "checkpoint.pt"):
                out[str(p.relative_to(run))] = p.read_bytes()
    for stage in STORES:
        with ResultStore(run / stage) as store:
            for key in store.keys():
                held = {"entry": store.get(key), "details": store.details(key)}
                out[f"{stage}/{key}"] = json.dumps(held, sort_keys=True).encode()
    return out


def _kill_when(cmd: list[str], ready, sig: int, env: dict[str, str] | None = None) -> str:
    """Start the run in its own process group and send ``sig`` to the whole group once ``ready()`` holds, as a
    terminal's Ctrl-C does; returns what the run printed."""
    log = open(Path(cmd[cmd.index("--output-root") + 1]) / "killed-run.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 600
    while not ready():
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill point: {log.read()[-3000:]}")
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.seek(0)
    return log.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    _run(_cmd("ref", root, []) + ["--stages", "01,02,03"])
    return root / "ref"


def test_a_run_killed_in_every_stage_resumes_to_the_same_artifacts(reference, tmp_path):
    """One run cut four times (one chain, not four: each chain costs a minute and a half on 2 cores), each cut
    sent to the whole process group as a terminal sends it: Ctrl-C (SIGINT) while collecting, Ctrl-C after the
    first explained unit, SIGKILL after the second, Ctrl-C after the first scored unit; each time the same
    command resumes it from where it stopped (collection: the interrupted batch's checkpoint; stages 02-03:
    every unit stored before the cut), and the last one completes it."""
    run = tmp_path / "k"
    cmd = _cmd("k", tmp_path) + ["--stages", "01,02,03"]
    kills = [
        ("collect", signal.SIGINT, lambda: (run / "01_collect" / "fingerprint.txt").is_file()),  # under way
        ("explain", signal.SIGINT, lambda: _count(run / "02_explain") >= 1),
        ("explain", signal.SIGKILL, lambda: _count(run / "02_explain") >= 2),
        ("score", signal.SIGINT, lambda: _count(run / "03_score") >= 1),
    ]
    logs = []
    for where, sig, ready in kills:
        logs.append(_kill_when(cmd, ready, sig))
        assert not (run / "03_score" / "manifest.json").is_file(), where  # it really was cut short
        if where == "collect":  # the batch in progress was finished and checkpointed, nothing collected is lost
            assert (run / "01_collect" / "checkpoint.pt").is_file(), logs[-1][-3000:]
            done = int(re.search(r"interrupted: checkpoint at (\d+) of 48 excerpts", logs[-1]).group(1))
            assert 0 < done < 48 and not (run / "01_collect" / "collection.json").exists()
        if where == "explain":
            assert not (run / "02_explain" / "manifest.json").is_file() and _count(run / "02_explain") < UNITS
        if sig == signal.SIGINT:
            assert "rerun the same command (with the same --run-id) to continue" in logs[-1], logs[-1][-3000:]
        if where == "score":  # the unit stored before the Ctrl-C is still there
            assert _count(run / "03_score") >= 1
    # each rerun says where it resumed from: the collection from the interrupted batch's checkpoint
    assert (
        f"resumed the collection from its checkpoint ({run / '01_collect' / 'checkpoint.pt'}): {done} excerpts"
        in (logs[1])
    )
    _run(cmd)
    want, got = _files(reference), _files(run)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    assert _count(run / "02_explain") == UNITS == _count(run / "03_score")


def _env(cache: Path) -> dict[str, str]:
    """A private LLM cache (the converted model is shared through a link) and an API key in the environment."""
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
        (cache / "models").symlink_to(cache_dir() / "models")
    return {**os.environ, "NBUTILS_CACHE": str(cache), "NBUTILS_TEST_KEY": SECRET}


def _openai_params(url: str) -> list[str]:
    return [
        "explainer_backend=openai",
        "simulator_backend=openai",
        "explainer_model=smollm2",
        "simulator_model=smollm2",
        f"explainer_base_url={url}",
        f"simulator_base_url={url}",
        "explainer_api_key_env=NBUTILS_TEST_KEY",
        "simulator_api_key_env=NBUTILS_TEST_KEY",
        "simulation_mode=echo",
        "max_in_flight=2",  # two units in progress at once; more queue past the request timeout on a slow machine
        # llama.cpp's prompt log-probabilities cost ~30 ms a token on 2 cores: keep the HTTP runs' prompts short
        "excerpt_len=8",
        "max_prompt_tokens=320",
        "judge_per_class=1",  # detection and fuzzing requests go through the same cache: one item per class
        "per_band=0",  # no stratified excerpts: each simulated excerpt is one slow echo request
        # detection and fuzzing only: every request is an echo request through the cache, as simulations are,
        # and the 135M model, with so little prompt, may find no label among its top log-probabilities
        "scorers=[detection, fuzzing]",
        "temperature=0.0",  # two runs that ask at the same moment both compute: greedy replies agree
        "top_k=4",
        "n_random=3",
        "explain_neurons=[[2, 0], [20, 2]]",
    ]


def _keys(cache_file: Path) -> set[str]:
    with sqlite3.connect(cache_file) as db:
        return {k for (k,) in db.execute("SELECT key FROM requests")}


def test_killed_http_run_sends_no_completed_request_again(llama_server, tmp_path):
    proxy = FaultProxy(llama_server).start()
    try:
        env = _env(tmp_path / "cache")
        run = tmp_path / "h"
        cmd = _cmd("h", tmp_path, _openai_params(proxy.url)) + ["--stages", "01,02,03"]
        _kill_when(cmd, lambda: _count(run / "03_score") >= 1, signal.SIGKILL, env)
        done_before = _keys(tmp_path / "cache" / "llm_requests.sqlite")
        sent_before = len(proxy.sent())
        proxy.log.clear()
        _run(cmd, env)
        resent = []
        for entry in proxy.sent():
            request = {k: v for k, v in entry["request"].items() if k != "model"}
            endpoint = "chat" if entry["path"].endswith("/chat/completions") else "completions"
            key = RequestCache.key(f"openai:{endpoint}:{proxy.url}", "smollm2", request)
            resent += [key] if key in done_before else []
        assert sent_before > 0 and proxy.sent() and resent == []
        assert _count(run / "03_score") == 2
    finally:
        proxy.stop()


def test_two_runs_share_one_cache_and_no_key_reaches_disk(llama_server, tmp_path):
    proxy = FaultProxy(llama_server).start()
    try:
        env = _env(tmp_path / "cache")
        # one request in flight per run: llama.cpp answers one at a time, so two runs keep at most two queued
        # (more, on a slow machine, wait past the client's 60 s timeout)
        # one unit each: what is shared does not depend on how many (the killed run above needs two)
        one = [*_openai_params(proxy.url), "max_in_flight=1", "explain_neurons=[[2, 0]]"]
        cmds = [_cmd(r, tmp_path, one) for r in ("a", "b")]
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
        outs = [p.communicate(timeout=900) for p in procs]
        for cmd, run, proc, out in zip(cmds, ("a", "b"), procs, outs):
            summaries = [json.loads(f.read_text()) for f in sorted((tmp_path / run).glob("0[23]_*/summary.json"))]
            retryable = sum(s["retryable"] for s in summaries)
            # a run may exit non-zero only when every unit of a stage failed for a reason a rerun retries (a timeout
            # under this load); the rerun then completes it from the shared cache
            assert proc.returncode == 0 or retryable, out[1][-2000:]
            if retryable:
                _run(cmd, env)
        a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
        assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []  # same results, from the shared cache
        with sqlite3.connect(tmp_path / "cache" / "llm_requests.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert any(e["authorization"] == f"Bearer {SECRET}" for e in proxy.sent())  # the key was really used
        leaked = []
        for root in (tmp_path / "a", tmp_path / "b", tmp_path / "cache"):
            for p in root.rglob("*"):
                if p.is_file() and not p.is_symlink() and "models" not in p.relative_to(root).parts[:1]:
                    leaked += [str(p)] if SECRET.encode() in p.read_bytes() else []
        leaked += [k for k, v in {**a, **b}.items() if SECRET.encode() in v]  # the stores' details, unpacked
        assert leaked == []
        summary = json.loads((tmp_path / "a" / "03_score" / "summary.json").read_text())
        assert summary["neurons"] == 1 and summary["retryable"] == 0  # no server-side failure (a weak model's may)
    finally:
        proxy.stop()
