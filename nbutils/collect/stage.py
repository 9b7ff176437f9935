"""Stage 01: run the subject model over the excerpts and write every unit's record.

`collect_activations` hooks the unit type's site in each requested layer (the MLP neuron by default, see
`nbutils.subject.units`), feeds the unit values of every batch to the streaming `Collector`, checkpoints its
state every ``checkpoint_every_s`` seconds, and writes the collection (format: `nbutils.core.records`).
Calling it again with the same arguments continues from the checkpoint (the result equals an uninterrupted
run) or, once finished, returns the collection; different arguments on the same folder are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbutils.collect.collector import CollectConfig, Collector, band_quantiles, merge_states, sorted_lists
from nbutils.collect.corpus import ExcerptSet, load_texts, make_excerpts
from nbutils.core.config import RunConfig
from nbutils.core.distribute import default_shards, release_ray, run_shards
from nbutils.core.errors import UserError
from nbutils.core.io import atomic_save_npy, atomic_write_bytes, atomic_write_json
from nbutils.core.layout import CollectionLayout
from nbutils.core.progress import progress_bar
from nbutils.core.records import CollectionMeta, RecordStore
from nbutils.core.units import NEURON
from nbutils.subject.loading import SubjectModel, load_subject_model
from nbutils.subject.outputs import written_tokens
from nbutils.subject.sites import NeuronCapture, NeuronSite, check_layers, num_layers
from nbutils.subject.units import MLPNeurons, UnitType, unit_for


def choose_neurons(width: int, layers: list[int], spec: int | list[int] | None, seed: int) -> dict[int, np.ndarray]:
    """Which unit indices to collect in each layer (sorted)."""
    if spec is None:
        return {layer: np.arange(width, dtype=np.int64) for layer in layers}
    if isinstance(spec, int):
        if not 0 < spec <= width:
            raise UserError(f"neurons={spec} is not between 1 and the layer width {width}.", "Ask for fewer neurons.")
        return {
            layer: np.sort(np.random.default_rng([seed, layer]).choice(width, spec, replace=False)).astype(np.int64)
            for layer in layers
        }
    idx = np.unique(np.asarray(list(spec), dtype=np.int64))
    bad = idx[(idx < 0) | (idx >= width)]
    if len(bad) or not len(idx):
        raise UserError(
            f"Neuron indices {bad.tolist() or '[]'} are out of range: each layer has neurons 0..{width - 1}.",
            f"Use indices between 0 and {width - 1}.",
        )
    return {layer: idx for layer in layers}


def _fingerprint(parts: dict[str, Any], excerpts: ExcerptSet) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(excerpts.tokens).tobytes())
    return h.hexdigest()[:20]


def _write_collection(
    out: CollectionLayout, subject: SubjectModel, excerpts: ExcerptSet, col: Collector, meta: CollectionMeta,
    unit: UnitType,
) -> None:  # fmt: skip
    tok = subject.tokenizer
    atomic_save_npy(out.tokens, excerpts.tokens.astype(np.int32))
    atomic_save_npy(out.places, excerpts.places.astype(np.int64))
    atomic_save_npy(out.random_sample, col.random_index)
    vocab = set(np.unique(excerpts.tokens).tolist())
    top: dict[int, np.ndarray] = {}
    for layer, state in col.layers.items():
        t = state.t
        atomic_save_npy(out.array(layer, "neurons"), col.neurons[layer])
        writes = written_tokens(subject.model, unit.output_directions(subject.model, layer, col.neurons[layer]))
        for name, arr in (writes or {}).items():  # what each unit writes (nbutils.subject.outputs)
            atomic_save_npy(out.array(layer, f"writes_{name}"), arr)
            if name.endswith("_ids"):
                vocab |= set(np.unique(arr).tolist())
        atomic_save_npy(out.array(layer, "stats"), state.stats())
        atomic_save_npy(out.array(layer, "active"), t["active"].cpu().numpy().astype(np.int64))
        lists = {
            "top": sorted_lists(t["top_key"], t["top_index"], t["top_acts"], largest=True),
            "band": sorted_lists(t["band_key"], t["band_index"], t["band_acts"], largest=False),
        }
        if col.bottom_k:
            lists["bottom"] = sorted_lists(t["bottom_key"], t["bottom_index"], t["bottom_acts"], largest=True)
        top[layer] = lists["top"][0].cpu().numpy()
        for name, (index, acts) in lists.items():
            atomic_save_npy(out.array(layer, f"{name}_index"), index.cpu().numpy())
            atomic_save_npy(out.array(layer, f"{name}_acts"), acts.cpu().numpy())
        atomic_save_npy(out.array(layer, "random_acts"), t["random_acts"].cpu().numpy())
        atomic_save_npy(out.array(layer, "band_edges"), t["band_edges"].cpu().numpy())
    _write_looks(out, subject, excerpts, col, unit, top)
    atomic_write_json(out.vocab, {int(i): tok.decode([int(i)]) for i in sorted(vocab)})
    fields = asdict(meta)
    if meta.unit == {"kind": NEURON}:  # format 1 without a unit field means MLP neurons: keep it that way
        del fields["unit"]
    atomic_write_json(out.meta, fields)  # written last: marks the folder complete


def _write_looks(
    out: CollectionLayout, subject: SubjectModel, excerpts: ExcerptSet, col: Collector, unit: UnitType,
    top: dict[int, np.ndarray],
) -> None:  # fmt: skip
    """Where each unit looks (`UnitType.looks`: attention heads) on its top excerpts and the random sample, in
    one more pass over just those excerpts: ``top_<name>`` ``[units, k, T]`` and ``random_<name>``
    ``[units, n_random, T]`` per layer (an empty top slot holds zeros)."""
    wanted = np.unique(np.concatenate([col.random_index, *(t[t >= 0] for t in top.values())]))
    details = unit.looks(subject.model, excerpts.tokens[wanted], sorted(top)) if len(wanted) else None
    if not details:
        return
    row = np.full(len(excerpts), -1, dtype=np.int64)
    row[wanted] = np.arange(len(wanted))
    for layer, arrays in details.items():
        units, kept = col.neurons[layer], top[layer]
        for name, values in arrays.items():  # [wanted, width, T]
            at_top = values[row[np.maximum(kept, 0)], units[:, None]]  # [units, k, T]
            at_top[kept < 0] = 0
            atomic_save_npy(out.array(layer, f"top_{name}"), np.ascontiguousarray(at_top))
            at_random = values[row[col.random_index]][:, units].transpose(1, 0, 2)
            atomic_save_npy(out.array(layer, f"random_{name}"), np.ascontiguousarray(at_random))


class _Plan:
    """What one collection will do: the unit type and site, layers, units per layer, and its fingerprint."""

    def __init__(self, subject: SubjectModel, excerpts: ExcerptSet, cfg: CollectConfig, unit: UnitType) -> None:
        band_quantiles(cfg.bands)
        model = subject.model
        self.unit, self.site = unit, unit.site(model)
        self.layers = check_layers(model, cfg.layers)
        self.width = unit.width(model)
        self.neurons = choose_neurons(self.width, self.layers, cfg.neurons, cfg.seed)
        max_ctx = getattr(model.config, "max_position_embeddings", None)
        if max_ctx is not None and excerpts.excerpt_len > max_ctx:
            raise UserError(
                f"Excerpts of {excerpts.excerpt_len} tokens are longer than the model's context ({max_ctx}).",
                f"Use excerpt_len <= {max_ctx}.",
            )
        # how often it checkpoints changes no result: hashed at its default, so a checkpoint resumes under another
        # interval and fingerprints stay those of earlier versions
        config = {**asdict(cfg), "checkpoint_every_s": CollectConfig.checkpoint_every_s}
        parts = {"model": subject.spec, "site": self.site.as_dict(), "config": config, "layers": self.layers}
        if unit.as_dict() != {"kind": NEURON}:
            parts["unit"] = unit.as_dict()
        if getattr(model, "fingerprint", None):  # models defined by code (planted neurons): their source's hash
            parts["model_fingerprint"] = model.fingerprint
        self.fingerprint = _fingerprint(parts, excerpts)

    def meta(self, subject: SubjectModel, excerpts: ExcerptSet, cfg: CollectConfig, col: Collector) -> CollectionMeta:
        return CollectionMeta(
            model=subject.spec, site=self.site.as_dict(), n_model_layers=num_layers(subject.model),
            neurons_per_layer=self.width, layers=self.layers, excerpt_len=excerpts.excerpt_len,
            n_excerpts=len(excerpts), top_k=cfg.top_k, bottom_k=col.bottom_k, n_random=len(col.random_index),
            band_size=cfg.band_size, bands=[list(b) for b in cfg.bands], seed=cfg.seed, corpus=excerpts.corpus,
            signed=self.unit.signed(subject.model), tokens_seen=col.tokens_seen, unit=self.unit.as_dict(),
        )  # fmt: skip


def _resume(out: CollectionLayout, fingerprint: str, col: Collector) -> None:
    """Load a matching checkpoint into the collector; refuse one made with other settings."""
    if not out.checkpoint.is_file():
        return
    saved = torch.load(out.checkpoint, weights_only=False)
    if saved.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out.checkpoint} is a checkpoint of a collection with different settings.",
            "Rerun with the settings of the interrupted run to resume it, or delete the checkpoint to start over.",
        )
    col.load_state_dict(saved["state"])
    print(f"resumed the collection from its checkpoint ({out.checkpoint}): {col.position} excerpts already done")


def _stream(subject: SubjectModel, excerpts: ExcerptSet, plan: _Plan, col: Collector, checkpoint: Path | None,
            cfg: CollectConfig, progress: bool, stop: int | None = None,
            interrupted: Callable[[], bool] | None = None) -> None:  # fmt: skip
    """Feed every remaining batch's unit values (up to excerpt ``stop``) to the collector, checkpointing every
    ``checkpoint_every_s`` seconds (unless ``checkpoint`` is None) and on Ctrl-C: the interrupt is held until
    the batch in progress is in the collector, then the checkpoint is written and KeyboardInterrupt raised.
    ``interrupted``: the caller holds the interrupt already (`_held_interrupt`) and passes its flag."""
    device = next(subject.model.parameters()).device
    n, batch = stop or len(excerpts), cfg.batch_size
    bar = progress_bar(total=n, initial=col.position, unit="excerpt", desc="collect", disable=not progress)
    last_save = time.monotonic()

    def save() -> None:
        buf = io.BytesIO()
        torch.save({"fingerprint": plan.fingerprint, "state": col.state_dict()}, buf)
        atomic_write_bytes(checkpoint, buf.getvalue())

    held = contextlib.nullcontext(interrupted) if interrupted is not None else _held_interrupt()
    with NeuronCapture(subject.model, plan.site, plan.layers, stacked=True) as capture, held as interrupted:
        for start in range(col.position, n, batch):
            ids = torch.from_numpy(excerpts.tokens[start : min(start + batch, n)].astype(np.int64)).to(device)
            captured = capture.run(ids)
            units = {layer: plan.unit.transform(v, layer) for layer, v in captured.items()}
            same = all(units[layer] is captured[layer] for layer in units)  # neurons: the capture's stacked buffer
            col.update(start, capture.buffer if same else units)
            bar.update(len(ids))
            if (
                checkpoint
                and col.position < n
                and (interrupted() or time.monotonic() - last_save > cfg.checkpoint_every_s)
            ):
                save()
                last_save = time.monotonic()
            if interrupted():
                bar.close()
                print(f"interrupted: checkpoint at {col.position} of {n} excerpts", file=sys.stderr, flush=True)
                raise KeyboardInterrupt
    bar.close()


@contextlib.contextmanager
def _held_interrupt() -> Iterator[Callable[[], bool]]:
    """While inside, Ctrl-C (SIGINT) only sets a flag, which the yielded function reads; outside the main
    thread (where no handler can be set) the interrupt is not held."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_collect_stage(out_dir: str | Path, config: RunConfig | None = None, progress: bool = True) -> RecordStore:
    """Stage 01 as the chain runs it: load the subject model and the corpus that ``config`` names, cut the
    excerpts, and collect (resuming an interrupted collection)."""
    c = config or RunConfig()
    devices = resolve_devices(c.devices, c.executor)  # before anything loads
    subject, excerpts, unit, layers = _inputs(c)
    print(f"{len(excerpts)} excerpts of {c.excerpt_len} tokens, from {excerpts.windows_available} available")
    if layers != c.layers:
        print(f"units: the {unit.noun}s of {c.units} at layer(s) {layers} (the layers parameter is not used)")
    cfg = CollectConfig(
        layers=layers, neurons=c.neurons, top_k=c.top_k, n_random=c.n_random, band_size=c.band_size,
        batch_size=c.batch_size, seed=c.seed, checkpoint_every_s=c.checkpoint_every_s,
    )  # fmt: skip
    if len(devices) > 1:  # one shard per device after the warm-up, side by side in this process
        print(f"collecting on {len(devices)} devices: {', '.join(devices)}")
        return collect_sharded(subject, excerpts, out_dir, cfg, unit, len(devices), devices=devices)
    shards = c.shards or default_shards(c.executor, c.ray_address)
    if shards > 1 or c.executor != "local":
        return collect_sharded(subject, excerpts, out_dir, cfg, unit, shards, c.executor, c.ray_address)
    return collect_activations(subject, excerpts, out_dir, cfg, progress=progress, unit=unit)


def resolve_devices(devices: str | list[str] | None, executor: str = "local") -> list[str]:
    """The devices stage 01 runs on (`RunConfig.devices`): "all" is every visible GPU; each named device must
    exist here. An empty list: the model's own device, one collector."""
    if devices is None:
        return []
    if executor != "local":
        raise UserError(
            f"devices={devices!r} is for the local executor; executor={executor!r} gives each shard its own GPU.",
            "Leave devices unset with executor=ray (shards sets how many), or use executor=local.",
        )
    count = torch.cuda.device_count()
    names = [f"cuda:{i}" for i in range(count)] if devices == "all" else devices
    if devices == "all" and not names:
        raise UserError("devices=all, but no GPU is visible to this process.",
                        "Leave devices unset to collect on the CPU (CUDA_VISIBLE_DEVICES may hide the GPUs).")  # fmt: skip
    if isinstance(names, str) or not names:
        raise UserError(f"devices={devices!r} is not a list of devices.", 'Write devices=all or ["cuda:0", "cuda:1"].')
    for name in names:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise UserError(f"devices: {name!r} is not a device.", 'Name devices like "cuda:0" or "cpu".') from None
        if device.type == "cuda" and (device.index or 0) >= count:
            raise UserError(
                f"devices: {name} is not visible here ({count} GPU(s)).", "Name only the GPUs this machine has."
            )
    return [str(n) for n in names]


def _inputs(c: RunConfig) -> tuple[SubjectModel, ExcerptSet, UnitType, list[int] | None]:
    """The subject model, the excerpts, the unit type and the layers a config names."""
    subject = load_subject_model(c.model)
    texts = load_texts(c.corpus, c.corpus_text_field)
    excerpts = make_excerpts(subject.tokenizer, texts, c.excerpt_len, c.n_excerpts, c.seed, corpus=c.corpus)
    unit = unit_for(c.units, c.site, c.extension_settings.get("unit_type"))
    return subject, excerpts, unit, unit.own_layers(subject.model) or c.layers


def collect_activations(
    subject: SubjectModel,
    excerpts: ExcerptSet,
    out_dir: str | Path,
    config: CollectConfig | None = None,
    site: NeuronSite | dict[str, Any] | None = None,
    progress: bool = True,
    unit: UnitType | None = None,
) -> RecordStore:
    """Run the collection pass (resuming from a checkpoint if one matches) and write the records.

    ``unit``: the unit type (default: MLP neurons at ``site``, or the architecture's built-in site)."""
    cfg = config or CollectConfig()
    out = CollectionLayout(out_dir)
    plan = _Plan(subject, excerpts, cfg, unit or MLPNeurons(site))
    if _finished(out, plan):
        return RecordStore(out.root)
    col = _collector(subject, excerpts, plan, cfg)
    _resume(out, plan.fingerprint, col)
    out.root.mkdir(parents=True, exist_ok=True)
    with _held_interrupt() as interrupted:  # from the fingerprint on: a Ctrl-C now still keeps the first batch
        atomic_write_bytes(out.fingerprint, plan.fingerprint.encode())
        _stream(subject, excerpts, plan, col, out.checkpoint, cfg, progress, interrupted=interrupted)
    _write_collection(out, subject, excerpts, col, plan.meta(subject, excerpts, cfg, col), plan.unit)
    out.checkpoint.unlink(missing_ok=True)
    return RecordStore(out.root)


def _finished(out: CollectionLayout, plan: _Plan) -> bool:
    """Whether ``out`` holds this collection, finished; a finished one with other settings is refused."""
    if not out.meta.is_file():
        return False
    if out.fingerprint.is_file() and out.fingerprint.read_text().strip() == plan.fingerprint:
        return True
    raise UserError(
        f"{out.root} already holds a finished collection made with different settings.",
        "Choose another output folder (or run id), or delete that folder to recollect.",
    )


def _collector(subject: SubjectModel, excerpts: ExcerptSet, plan: _Plan, cfg: CollectConfig) -> Collector:
    device = next(subject.model.parameters()).device
    signed = plan.unit.signed(subject.model)
    return Collector(len(excerpts), excerpts.excerpt_len, plan.neurons, cfg, signed=signed, device=device)


# ----------------------------------------------------------------------------------------------------------
# Sharded collection (executor="ray", or several shards in this process)
# ----------------------------------------------------------------------------------------------------------


def shard_ranges(n: int, warmup: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """Excerpt ranges: the quantile warm-up ``0..warmup-1`` first, the rest cut into ``shards`` pieces on batch
    boundaries (so every batch is the one a single collector would feed, with the same band keys)."""
    batches = list(range(warmup, n, batch))
    cuts = [batches[i * len(batches) // shards] for i in range(shards)] if batches else []
    edges = sorted(set([warmup, *cuts, n]))
    return [(0, warmup)] + [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


_LOADING = threading.Lock()
"""Shards on several devices of one process load their models one at a time."""


def collect_shard(
    model: str, excerpts: ExcerptSet, cfg: CollectConfig, unit: UnitType, lo: int, hi: int, warm: str | None,
    path: str, device: str | None = None,
) -> str:  # fmt: skip
    """Collect excerpts ``lo..hi-1`` (one task of `collect_sharded`) and save the collector's state at ``path``.
    ``warm``: the warm-up shard's state file, whose shift and band edges this shard starts from. ``device``: where
    the model runs (None: the GPU where there is one)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _LOADING:
        subject = load_subject_model(model, device=device)
    plan = _Plan(subject, excerpts, cfg, unit)
    col = _collector(subject, excerpts, plan, cfg)
    col.position = lo
    if warm is not None:
        start = torch.load(warm, weights_only=False)["state"]["layers"]
        for layer, state in col.layers.items():
            for name in ("shift", "band_edges"):
                state.t[name].copy_(start[layer][name])
        col.shift_fixed = True
    Path(path).with_suffix(".started").write_text(f"{os.getpid()}\n")  # which process works on it (tests)
    _stream(subject, excerpts, plan, col, None, cfg, progress=False, stop=hi)
    buf = io.BytesIO()
    torch.save({"fingerprint": plan.fingerprint, "range": (lo, hi), "state": col.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def collect_sharded(
    subject: SubjectModel, excerpts: ExcerptSet, out_dir: str | Path, config: CollectConfig, unit: UnitType,
    shards: int, executor: str = "local", ray_address: str | None = None, devices: list[str] | None = None,
) -> RecordStore:  # fmt: skip
    """`collect_activations`, cut into excerpt shards run by ``executor`` (`nbutils.core.distribute`): the
    warm-up shard first, then the others side by side; their states merge exactly (`merge_states`) into the
    collection a single collector writes. A rerun skips the shards whose state is saved. ``devices`` (local
    executor): the shards after the warm-up run in threads of this process, one per device, dealt in turn."""
    out = CollectionLayout(out_dir)
    plan = _Plan(subject, excerpts, config, unit)
    if _finished(out, plan):
        return RecordStore(out.root)
    col = _collector(subject, excerpts, plan, config)
    ranges = shard_ranges(len(excerpts), col.warmup, config.batch_size, shards)
    out.shards.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.fingerprint, plan.fingerprint.encode())

    def calls(which: list[int]) -> list[dict[str, Any]]:
        warm = str(out.shard(0)) if which != [0] else None
        common = {"model": subject.spec, "excerpts": excerpts, "cfg": config, "unit": plan.unit, "warm": warm}
        placed = [{"device": devices[max(0, i - 1) % len(devices)]} if devices else {} for i in which]
        return [{**common, "lo": ranges[i][0], "hi": ranges[i][1], "path": str(out.shard(i)), **placed[j]}
                for j, i in enumerate(which)]  # fmt: skip

    try:
        for which in ([0], list(range(1, len(ranges)))):  # the warm-up sets the band edges the others use
            todo = [i for i in which if not _shard_done(out.shard(i), plan.fingerprint, ranges[i])]
            run_shards(collect_shard, calls(todo), executor, ray_address, threads=len(devices or [None]))
    finally:
        release_ray()
    parts = [(*ranges[i], torch.load(out.shard(i), weights_only=False)["state"]) for i in range(len(ranges))]
    merge_states(col, parts)
    _write_collection(out, subject, excerpts, col, plan.meta(subject, excerpts, config, col), plan.unit)
    shutil.rmtree(out.shards)
    return RecordStore(out.root)


def _shard_done(path: Path, fingerprint: str, excerpt_range: tuple[int, int]) -> bool:
    if not path.is_file():
        return False
    saved = torch.load(path, weights_only=False, mmap=True)  # reads the header fields, not the large arrays
    return saved.get("fingerprint") == fingerprint and tuple(saved.get("range", ())) == tuple(excerpt_range)


def sample_collection(c: RunConfig, out_dir: str | Path, batches: int = 4) -> dict[str, Any]:
    """Stage 01 as the run would do it, on a prefix of its excerpts, into ``out_dir`` (`nbutils.run.plan`):
    a small collection of every unit the run collects (enough excerpts that each unit's top, random and band
    samples fill up), and what it measured: seconds to load the model and corpus, seconds per batch once warm
    (the first batch, where kernels are compiled, is left out), seconds to write, and the run's excerpts and
    batches. One process, the run's device; shards are not counted."""
    started = time.perf_counter()
    subject, excerpts, unit, layers = _inputs(c)
    batch = c.batch_size
    n = min(len(excerpts), batch * max(batches + 1, -(-8 * (c.top_k + c.n_random) // batch)))
    cfg = CollectConfig(
        layers=layers, neurons=c.neurons, top_k=c.top_k, n_random=c.n_random, band_size=c.band_size,
        batch_size=batch, seed=c.seed, quantile_warmup=max(1, n // 2),
    )  # fmt: skip
    prefix = replace(excerpts, tokens=excerpts.tokens[:n], places=excerpts.places[:n])
    loaded = time.perf_counter()
    plan = _Plan(subject, prefix, cfg, unit)
    col = _collector(subject, prefix, plan, cfg)
    _stream(subject, prefix, plan, col, None, cfg, False, stop=min(n, batch), interrupted=lambda: False)
    warm = time.perf_counter()
    _stream(subject, prefix, plan, col, None, cfg, False, stop=n, interrupted=lambda: False)
    streamed = time.perf_counter()
    out = CollectionLayout(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    _write_collection(out, subject, prefix, col, plan.meta(subject, prefix, cfg, col), plan.unit)
    timed = max(1, -(-(n - batch) // batch))
    return {
        "load_seconds": loaded - started, "seconds_per_batch": (streamed - warm) / timed if n > batch else warm - loaded,
        "write_seconds": time.perf_counter() - streamed, "sample_excerpts": n, "timed_batches": timed,
        "excerpts": len(excerpts), "batches": -(-len(excerpts) // batch),
        "units": sum(len(v) for v in plan.neurons.values()),
    }  # fmt: skip
