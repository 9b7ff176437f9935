"""A run's plan and budget: the forecast from a sample of the run's own units against what the run then sends
(through the OpenAI-compatible backend to `bench/stand_in_api.py`, a real HTTP server), the sample kept for the
run, a budget that stops a stage and a rerun with more that continues without sending anything twice, and the
bad inputs refused before anything is spent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations
from nbutils.core.budget import PLAN_FILE, BudgetReached, Limits, check_limits, spent
from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.core.parallel import as_finished
from nbutils.core.store import ResultStore, StoredSequence
from nbutils.explain.stage import run_explain_stage
from nbutils.llm.contract import LLMFailed
from nbutils.llm.transport import HTTPTransport
from nbutils.run.plan import interval, measure_sample
from nbutils.score.stage import run_score_stage


def test_the_interval_is_students_t_on_the_sample():
    scipy_stats = pytest.importorskip("scipy.stats")
    for values in ([3.0, 5.0], [10.0, 12.0, 9.0, 14.0, 11.0, 10.0, 13.0, 12.0], [1.0] * 20 + [2.0]):
        got = interval(values)
        n = len(values)
        mean = sum(values) / n
        sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
        half = (scipy_stats.t.ppf(0.975, n - 1) if n <= 16 else 1.96) * sd / n**0.5
        assert got["mean"] == pytest.approx(mean)
        assert got["high"] == pytest.approx(mean + half, rel=1e-3)
        assert got["low"] == pytest.approx(max(0.0, mean - half), rel=1e-3, abs=1e-9)


def test_a_refusal_stops_new_items_and_the_ones_in_flight_finish():
    started, gate = [], threading.Event()

    def work(i: int) -> int:
        started.append(i)
        gate.wait(5)
        return i

    asked = []

    def may_start(in_flight: int) -> bool:
        asked.append(in_flight)
        if len(asked) == 3:
            gate.set()
        return len(asked) <= 3  # three start; the fourth is refused, and none after it

    got = sorted(i for i, _ in as_finished(work, list(range(10)), 4, may_start))
    assert got == [0, 1, 2] and sorted(started) == [0, 1, 2]
    assert asked[:3] == [0, 1, 2]  # asked with the units already in flight
    calls = []
    gate_one = lambda in_flight: calls.append(in_flight) or len(calls) <= 2  # noqa: E731
    assert [i for i, _ in as_finished(lambda i: i, list(range(5)), 1, gate_one)] == [0, 1]  # one at a time too
    assert calls == [0, 0, 0]


def test_failed_attempts_are_counted_for_the_budget():
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = HTTPTransport("none", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff=0.01, timeout=2)

    async def one(client, _):
        return await t._request(client, "chat", {"messages": [{"role": "user", "content": "x"}]})

    with pytest.raises(LLMFailed):
        t._gather(one, [0])
    assert t.usage.requests == 0 and t.usage.failed_attempts == 3 and t.usage.sent() == 3


def _plan_file(root, per_unit_cost=0.01, per_unit_requests=40.0):
    per_unit = {"units": 8, "sent": {"mean": per_unit_requests}, "cost": {"mean": per_unit_cost}}
    (root / PLAN_FILE).write_text(
        json.dumps({"stages": {s: {"per_unit": per_unit} for s in ("02_explain", "03_score")}})
    )


def test_bad_budgets_are_refused_before_anything_is_spent(tmp_path):
    prices = {"prompt": 1.0, "completion": 2.0}
    with pytest.raises(UserError, match="no prices") as e:
        check_limits(Limits(1.0, None, None), tmp_path, ["02_explain"])
    assert "prices=" in e.value.fix
    with pytest.raises(UserError, match="needs the run's plan") as e:
        check_limits(Limits(1.0, None, prices), tmp_path, ["02_explain", "03_score"])
    assert "nbutils plan" in e.value.fix
    with pytest.raises(UserError, match="must be positive"):
        check_limits(Limits(None, 0, prices), tmp_path, ["02_explain"])
    _plan_file(tmp_path)
    with pytest.raises(UserError, match="less than one unit of 02_explain costs") as e:
        check_limits(Limits(0.005, None, prices), tmp_path, ["02_explain", "03_score"])
    assert "at least 0.01" in e.value.fix
    with pytest.raises(UserError, match="fewer than one unit of 03_score sends"):
        check_limits(Limits(None, 39, prices), tmp_path, ["03_score"])
    # what was spent already counts: 0.02 of 0.025 spent leaves less than a unit
    (tmp_path / "02_explain").mkdir()
    (tmp_path / "02_explain" / "usage.json").write_text(json.dumps({"requests": 10, "prompt_tokens": 20_000}))
    assert spent(tmp_path).cost(prices) == pytest.approx(0.02)
    with pytest.raises(UserError, match="after the 0.02 this run spent"):
        check_limits(Limits(0.025, None, prices), tmp_path, ["02_explain"])
    check_limits(Limits(0.05, 100, prices), tmp_path, ["02_explain", "03_score"])  # enough: no error
    check_limits(Limits(0.001, None, prices), tmp_path, ["04_inspect"])  # no LLM stage to run


# -- against a real HTTP server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collection(embedded, tmp_path_factory):
    ex = make_excerpts(embedded.tokenizer, load_texts("embedded"), 16, 96, seed=2, corpus="embedded")
    cfg = CollectConfig(layers=[3, 9], neurons=[1, 2, 5, 8, 13, 21], top_k=4, n_random=3, band_size=2,
                        quantile_warmup=16)  # fmt: skip
    return collect_activations(embedded, ex, tmp_path_factory.mktemp("c") / "01", cfg, progress=False).path


def _config(url: str, **kw) -> RunConfig:
    return RunConfig(
        explain_neurons="all", explainer_backend="openai", explainer_model="stand-in", explainer_base_url=url,
        simulator_backend="openai", simulator_model="stand-in", simulator_base_url=url, simulation_mode="chat",
        n_boot=50, judge_per_class=2, prices={"prompt": 0.5, "completion": 1.5}, **kw,
    )  # fmt: skip


def _served(url: str) -> int:
    return json.loads(urllib.request.urlopen(url + "/stats", timeout=5).read())["served"]


def _write_plan(run, collection, config, sample):
    plan = measure_sample(collection, run, config, sample, cache_path="none")  # every request to the server
    (run / PLAN_FILE).write_text(json.dumps(plan))
    return plan


def test_the_forecast_matches_the_run_and_the_sample_is_not_paid_twice(stand_in, collection, tmp_path):
    run = tmp_path / "run"
    config = _config(stand_in, max_in_flight=8)
    before = _served(stand_in)
    plan = _write_plan(run, collection, config, 4)
    by_plan = _served(stand_in) - before
    assert plan["units"]["02_explain"] == 12 and len(plan["keys"]) == 4
    assert {r["part"] for r in plan["rows"]} >= {"explain", "score", "score:simulation", "score:detection"}
    # the plan's requests are in the run's accounts, and they are what the server served
    assert spent(run).sent() == by_plan
    run_explain_stage(collection, run / "02_explain", config, False, "none")
    run_score_stage(collection, run / "02_explain", run / "03_score", config, False, "none")
    by_run = _served(stand_in) - before - by_plan
    used = spent(run)
    assert used.sent() == by_plan + by_run  # every request sent is counted once
    # the sampled units were not sent again: the run sent for the other 8 only, at the plan's rate per unit
    per_unit = sum(s["per_unit"]["sent"]["mean"] for s in plan["stages"].values())
    assert by_run == pytest.approx(8 * per_unit, rel=0.10)
    for stage in plan["stages"].values():  # the whole run's counts against the forecast
        assert stage["total"]["sent"]["low"] <= stage["total"]["sent"]["mean"] <= stage["total"]["sent"]["high"]
    forecast = {m: sum(s["total"][m]["mean"] for s in plan["stages"].values()) for m in ("sent", "prompt_tokens")}
    assert used.sent() == pytest.approx(forecast["sent"], rel=0.10)
    assert used.prompt_tokens == pytest.approx(forecast["prompt_tokens"], rel=0.15)
    cost = sum(s["total"]["cost"]["mean"] for s in plan["stages"].values())
    assert used.cost(config.prices) == pytest.approx(cost, rel=0.15)
    scored = StoredSequence.of(run / "03_score", dict)
    assert len(scored.keys) == 12 and not scored.failed()


def test_a_budget_stops_the_stage_and_a_higher_one_continues_without_resending(stand_in, collection, tmp_path):
    run = tmp_path / "run"
    free = _config(stand_in, max_in_flight=2)
    plan = _write_plan(run, collection, free, 2)
    per_unit = plan["stages"]["02_explain"]["per_unit"]["sent"]["mean"]
    first = spent(run).sent()
    # room for about five more explanations in stage 02 (one request each)
    capped = _config(stand_in, max_in_flight=2, max_requests=int(first + 5 * per_unit))
    before = _served(stand_in)
    with pytest.raises(BudgetReached) as e:
        run_explain_stage(collection, run / "02_explain", capped, False, "none")
    message = f"{e.value.problem} {e.value.fix}"
    assert "stopped at the budget" in message and "were not started" in message and "-p max_requests=" in message
    assert spent(run).sent() <= capped.max_requests  # never past the cap
    with ResultStore(run / "02_explain") as saved:
        kept = len(saved)
    assert 2 + 3 <= kept < 12  # the plan's two, then what fit
    assert _served(stand_in) - before == spent(run).sent() - first  # what was sent is what is counted
    # a higher budget continues: nothing already answered is sent again (no request cache here: "none")
    more = _config(stand_in, max_in_flight=2, max_requests=10_000)
    before = _served(stand_in)
    entries = run_explain_stage(collection, run / "02_explain", more, False, "none")
    assert len(entries) == 12 and all(x.explanation for x in entries)
    assert _served(stand_in) - before == 12 - kept


@pytest.mark.slow
def test_plan_with_an_unreachable_server_forecasts_the_collection_and_names_the_fix(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "nbutils", "plan", "--output-root", str(tmp_path), "--run-id", "r", "-p", "n_excerpts=96",
         "-p", "layers=[0]", "-p", "neurons=8", "-p", "top_k=4", "-p", "n_random=4", "-p", "explainer_backend=openai",
         "-p", f"explainer_base_url={url}", "-p", "explainer_model=x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert url in done.stderr and "Fix:" in done.stderr
    plan = json.loads((tmp_path / "r" / PLAN_FILE).read_text())
    assert plan["collection"]["units"] == 8 and plan["collection"]["seconds_per_batch"] > 0
    assert plan["collection"]["seconds"] < (time.monotonic() - started) * 10
    assert plan["stages"] == {} and any(url in why for why in plan["not_measured"])
    assert "01 collect" in done.stdout and "not measured: stages 02-03" in done.stdout


def test_from_the_command_line_the_plan_is_kept_and_a_budget_exits_with_its_code(stand_in, tmp_path):
    server = [f"explainer_base_url={stand_in}", f"simulator_base_url={stand_in}"]
    params = ["n_excerpts=96", "layers=[3]", "neurons=[1, 2, 5, 8, 13, 21]", "top_k=4", "n_random=3", "band_size=2",
              "explain_neurons=all", "explainer_backend=openai", "explainer_model=stand-in", "simulator_backend=openai",
              "simulator_model=stand-in", "simulation_mode=chat", "judge_per_class=2", "n_boot=50", *server]  # fmt: skip
    args = [a for p in params for a in ("-p", p)] + ["--output-root", str(tmp_path), "--run-id", "r"]

    def nbutils(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nbutils", *extra], capture_output=True, text=True, cwd=tmp_path,
                              timeout=600)  # fmt: skip

    assert nbutils("run", *args, "--stages", "01").returncode == 0
    before = _served(stand_in)
    planned = nbutils("plan", *args, "--sample", "3")
    assert planned.returncode == 0, planned.stderr[-2000:]
    plan = json.loads((tmp_path / "r" / PLAN_FILE).read_text())
    assert plan["sampled"]["kept_for_the_run"] and plan["collection"]["finished"]
    assert _served(stand_in) - before == plan["spent_by_plan"]["sent"] > 0
    with ResultStore(tmp_path / "r" / "02_explain") as saved:
        assert len(saved) == 3  # the sample, stored for the run
    again = nbutils("plan", *args, "--sample", "3")  # the same plan again: measured already, nothing sent
    assert again.returncode == 0 and _served(stand_in) - before == plan["spent_by_plan"]["sent"]
    assert "02_explain" in again.stdout and "03_score" in again.stdout
    cap = int(spent(tmp_path / "r").sent() + 2)  # two more explanations, then stage 02 stops
    stopped = nbutils("run", *args, "-p", f"max_requests={cap}")
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert "stopped at the budget" in stopped.stderr and "-p max_requests=" in stopped.stderr
    assert spent(tmp_path / "r").sent() <= cap
    done = nbutils("run", *args, "-p", "max_requests=100000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        StoredSequence.of(tmp_path / "r" / "03_score", dict).keys
        and not StoredSequence.of(tmp_path / "r" / "03_score", dict).failed()
    )


def test_the_cost_gate_counts_the_run_the_shard_and_the_units_in_flight(tmp_path):
    """`Budget.may_start` in currency: what the run's accounts hold (shards' files too) plus this shard's unsaved
    counts plus the plan's cost per unit for each unit in flight and the next; then the shard's own mean."""
    from nbutils.core.budget import Budget
    from nbutils.core.usage import Usage

    prices = {"prompt": 1.0, "completion": 0.0}  # a million prompt tokens cost 1
    _plan_file(tmp_path, per_unit_cost=0.01, per_unit_requests=1.0)
    (tmp_path / "03_score").mkdir()
    (tmp_path / "03_score" / "usage.json").write_text(json.dumps({"requests": 5, "prompt_tokens": 30_000}))
    (tmp_path / "03_score" / "usage.shard-001.json").write_text(json.dumps({"prompt_tokens": 20_000}))
    unsaved = Usage(prompt_tokens=10_000)
    gate = Budget(Limits(0.1, None, prices), tmp_path, "03_score", unsaved)
    assert gate.total().cost(prices) == pytest.approx(0.06)
    assert gate.may_start(3)  # 0.06 + 4 x 0.01 = 0.10: fits exactly
    assert not gate.may_start(4) and not gate.may_start(0)  # refused once, refused after
    own = Budget(Limits(1.0, None, prices), tmp_path, "03_score", unsaved)
    for _ in range(9):  # more units than the plan measured (8): the shard's own mean from now on
        own.unit_finished()
    unsaved.add(Usage(prompt_tokens=900_000))  # 0.1 per unit finished here
    assert own.per_unit()[0] == pytest.approx(0.1)
    assert own.may_start(0) is False  # 0.96 + 0.1 > 1.0
