"""Sharded stages: stage 01 cut into excerpt shards merges into exactly the single-process collection, also
on a local Ray instance and when a worker dies mid-shard; stages 02 and 03 dealt over Ray workers give the
single-process explanations and scores.

torch runs with one thread in the reference runs, as in each Ray task here (one CPU each), so the model's
numbers are computed the same way in both.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nbutils.collect.stage as collect_stage
from nbutils.collect.collector import CollectConfig
from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.collect.stage import collect_activations, collect_sharded, shard_ranges
from nbutils.core.config import RunConfig
from nbutils.core.layout import CollectionLayout
from nbutils.explain.stage import run_explain_stage
from nbutils.score.stage import run_score_stage
from nbutils.subject.units import MLPNeurons

CFG = CollectConfig(layers=[2, 11], neurons=12, top_k=5, n_random=6, band_size=2, quantile_warmup=24, batch_size=8)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def excerpts(embedded):
    return make_excerpts(embedded.tokenizer, load_texts("embedded"), 16, 96, seed=3, corpus="embedded")


@pytest.fixture(scope="module")
def reference(embedded, excerpts, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return collect_activations(embedded, excerpts, tmp_path_factory.mktemp("ref") / "01", CFG, progress=False).path
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def assert_same_collection(a: Path, b: Path) -> None:
    """Every array of two collections equal; the moments (float64 sums added in another order) to 1e-12."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.npy")) and len(files) > 10
    for rel in files:
        x, y = np.load(a / rel), np.load(b / rel)
        if rel.name == "stats.npy":
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12, err_msg=str(rel))
        else:
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), rel
    assert (a / "collection.json").read_text() == (b / "collection.json").read_text()


def test_shard_ranges_start_with_the_warmup_and_cut_on_batch_boundaries():
    assert shard_ranges(96, 24, 8, 3) == [(0, 24), (24, 48), (48, 72), (72, 96)]
    assert shard_ranges(100, 24, 8, 2) == [(0, 24), (24, 64), (64, 100)]
    assert shard_ranges(20, 20, 8, 4) == [(0, 20)]  # everything is warm-up
    assert shard_ranges(40, 32, 8, 4) == [(0, 32), (32, 40)]  # fewer batches than shards asked for


def test_sharded_collection_equals_the_single_process_one_and_a_rerun_skips_finished_shards(
    embedded, excerpts, reference, tmp_path, monkeypatch, one_thread
):
    out = CollectionLayout(tmp_path / "01")
    ran: list[tuple[int, int]] = []
    real = collect_stage.collect_shard

    def shard(**kw):
        ran.append((kw["lo"], kw["hi"]))
        if kw["lo"] == 48 and len(ran) < 4:
            raise KeyboardInterrupt  # the run is stopped in its third shard
        return real(**kw)

    monkeypatch.setattr(collect_stage, "collect_shard", shard)
    with pytest.raises(KeyboardInterrupt):
        collect_sharded(embedded, excerpts, out.root, CFG, MLPNeurons(None), 3)
    assert ran == [(0, 24), (24, 48), (48, 72)] and out.shard(1).is_file() and not out.meta.is_file()
    collect_sharded(embedded, excerpts, out.root, CFG, MLPNeurons(None), 3)
    assert ran[3:] == [(48, 72), (72, 96)]  # the finished shards were not run again
    assert_same_collection(reference, out.root)
    assert not out.shards.exists()


def test_one_shard_per_device_side_by_side_equals_the_single_process_collection(
    embedded, excerpts, reference, tmp_path, monkeypatch, one_thread
):
    """devices=[...] (stage 01 on every GPU of a node): after the warm-up, one shard per device, run side by side
    in threads of this process and merged exactly; two CPU "devices" here, GPUs alike."""
    ran: list[tuple[int, str, float, float]] = []
    real = collect_stage.collect_shard

    def shard(**kw):
        began = time.monotonic()
        path = real(**kw)
        ran.append((kw["lo"], kw["device"], began, time.monotonic()))
        return path

    monkeypatch.setattr(collect_stage, "collect_shard", shard)
    out = CollectionLayout(tmp_path / "01")
    collect_sharded(embedded, excerpts, out.root, CFG, MLPNeurons(None), 2, devices=["cpu", "cpu"])
    assert_same_collection(reference, out.root)
    assert sorted((lo, device) for lo, device, *_ in ran) == [(0, "cpu"), (24, "cpu"), (56, "cpu")]
    (_, _, a0, a1), (_, _, b0, b1) = sorted(ran)[1:]
    assert a0 < b1 and b0 < a1  # the two shards after the warm-up overlapped in time


def test_ray_collection_equals_the_single_process_one_when_a_worker_dies(
    ray_instance, embedded, excerpts, reference, tmp_path
):
    out = CollectionLayout(tmp_path / "01")
    victim = out.shard(2).with_suffix(".started")
    killed: list[int] = []

    def kill_once() -> None:  # the worker that runs shard 2 is killed as soon as it has started
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if victim.is_file() and not out.shard(2).is_file():
                pid = int(victim.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_once, daemon=True)
    watcher.start()
    collect_sharded(embedded, excerpts, out.root, CFG, MLPNeurons(None), 3, executor="ray")
    watcher.join(timeout=1)
    assert len(killed) == 1  # the shard was killed mid-way; Ray ran it again
    assert_same_collection(reference, out.root)


def test_ray_explanations_and_scores_equal_the_single_process_ones(ray_instance, reference, tmp_path, one_thread):
    base = dict(explain_neurons=[[2, u] for u in _units(reference)[:2]] + [[11, u] for u in _units(reference, 11)[:1]],
                scorers=["simulation", "detection"], judge_per_class=2, n_boot=50, per_band=1)  # fmt: skip
    single = RunConfig(**base)
    sharded = RunConfig(**base, executor="ray", shards=2)
    runs = {}
    for name, config in (("single", single), ("ray", sharded)):
        e = run_explain_stage(reference, tmp_path / name / "02", config, progress=False)
        s = run_score_stage(reference, tmp_path / name / "02", tmp_path / name / "03", config, progress=False)
        runs[name] = (e, s)
    assert [e.explanation for e in runs["ray"][0]] == [e.explanation for e in runs["single"][0]]
    assert all(e.explanation for e in runs["ray"][0])
    for a, b in zip(runs["single"][1], runs["ray"][1]):
        assert a.key == b.key
        _assert_close(a.to_dict(), b.to_dict())
    usage = (tmp_path / "ray" / "03" / "usage.json").read_text()
    assert '"requests"' in usage and not list((tmp_path / "ray" / "03").glob("usage.shard-*.json"))


def _units(collection: Path, layer: int = 2) -> list[int]:
    return np.load(collection / f"layer_{layer:03d}" / "neurons.npy").tolist()


def _assert_close(a, b, path: str = "") -> None:
    """Equal structures, floats equal to 1e-6 (the simulator's probabilities come from another process)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


def test_a_users_mistake_in_a_ray_task_reaches_the_driver_as_the_same_error(ray_instance, tmp_path):
    from nbutils.core.distribute import run_shards
    from nbutils.core.errors import UserError
    from nbutils.core.records import RecordStore

    with pytest.raises(UserError, match="No finished activation collection") as caught:
        run_shards(RecordStore, [{"path": str(tmp_path / "missing")}], "ray")
    assert "Run stage 01" in caught.value.fix  # both parts arrive, so the command line prints its paragraph
