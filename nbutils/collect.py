"""Stage 01: one streaming pass over the excerpts that keeps, per neuron, what the later stages need.

For every neuron of the requested layers the collector keeps, in memory that does not grow with the
corpus (all state is fixed-size per neuron):

- the ``top_k`` excerpts with the highest max activation, with per-token activations;
- for signed (gated) sites, the ``bottom_k`` excerpts with the lowest min activation;
- the activations on one random sample of excerpts, the same excerpts for every neuron;
- per band of the distribution of excerpt max activations (default [0,.5], [.5,.9], [.9,.99], [.99,.999],
  the bands of Bills et al. 2023), a uniform sample of ``band_size`` excerpts;
- mean, variance, skewness, (excess) kurtosis, max and min over all tokens.

Band edges are quantiles of the excerpt maxima over a warm-up prefix of ``quantile_warmup`` excerpts.
Excerpts are visited in seeded random order, so that prefix is itself a uniform sample; band samples are
then drawn from every later excerpt by priority sampling (keep the ``band_size`` smallest random keys),
which, like top-k lists and the moment sums, can be merged across shards later.

The pass saves a checkpoint every ``checkpoint_every_s`` seconds; calling `collect_activations` again with
the same arguments continues from it, and the result equals that of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbutils.corpus import ExcerptSet
from nbutils.errors import UserError
from nbutils.hooks import NeuronCapture, NeuronSite, check_layers, neurons_per_layer, num_layers, resolve_site
from nbutils.models import SubjectModel
from nbutils.progress import progress_bar
from nbutils.records import (
    DEFAULT_BANDS,
    STAT_FIELDS,
    CollectionMeta,
    RecordStore,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    layer_dir,
)

CHECKPOINT = "checkpoint.pt"


@dataclass
class CollectConfig:
    """What to keep per neuron. ``bottom_k=None`` means ``top_k`` for signed sites and 0 otherwise."""

    layers: list[int] | None = None
    neurons: int | list[int] | None = None
    """None: every neuron; an int: that many neurons per layer, chosen with ``seed``; a list: those indices."""
    top_k: int = 20
    bottom_k: int | None = None
    n_random: int = 20
    band_size: int = 5
    bands: list[list[float]] = field(default_factory=lambda: [list(b) for b in DEFAULT_BANDS])
    quantile_warmup: int = 1024
    batch_size: int = 32
    seed: int = 0
    checkpoint_every_s: float = 120.0


# ----------------------------------------------------------------------------------------------------------
# Streaming state
# ----------------------------------------------------------------------------------------------------------


def _keep_best(
    keys: torch.Tensor,
    index: torch.Tensor,
    acts: torch.Tensor,
    new_keys: torch.Tensor,
    new_index: torch.Tensor,
    batch_acts: torch.Tensor,
    largest: bool,
) -> None:
    """Merge a batch into per-neuron lists of the m best keys with their excerpts, in place.

    keys/index [N, m] and acts [N, m, T] hold the lists, unordered (`_sorted` orders them at the end);
    new_keys [N, B] and new_index [B] describe the batch, whose activations are batch_acts [B, T, N]. Only
    the slots whose entry is displaced are written, so the cost follows the number of replacements.
    """
    worst = keys.amin(1, keepdim=True) if largest else keys.amax(1, keepdim=True)
    rows = ((new_keys > worst) if largest else (new_keys < worst)).any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    m = keys.shape[1]
    cand = torch.topk(new_keys[rows], min(m, new_keys.shape[1]), dim=1, largest=largest, sorted=False)
    chosen = torch.topk(torch.cat([keys[rows], cand.values], dim=1), m, dim=1, largest=largest, sorted=False)
    taken = torch.zeros(len(rows), m + cand.values.shape[1], dtype=torch.bool, device=keys.device)
    taken.scatter_(1, chosen.indices, True)
    # per row, the j-th displaced old slot receives the j-th taken candidate (both counts are equal)
    slot_row, slot = (~taken[:, :m]).nonzero(as_tuple=True)
    cand_row, cand_pos = taken[:, m:].nonzero(as_tuple=True)
    neuron = rows[slot_row]
    batch_pos = cand.indices[cand_row, cand_pos]
    keys[neuron, slot] = cand.values[cand_row, cand_pos]
    index[neuron, slot] = new_index[batch_pos]
    acts[neuron, slot] = batch_acts[batch_pos, :, neuron]


def _sorted(
    keys: torch.Tensor, index: torch.Tensor, acts: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists of `_keep_best` ordered best first; slots never filled (infinite key) get index -1."""
    order = torch.argsort(keys, dim=-1, descending=largest, stable=True)
    keys = torch.gather(keys, -1, order)
    index = torch.where(torch.isinf(keys), -1, torch.gather(index, -1, order))
    acts = torch.gather(acts, -2, order.unsqueeze(-1).expand(*order.shape, acts.shape[-1]))
    return index, acts


class LayerState:
    """Fixed-size running state for the neurons of one layer."""

    def __init__(
        self, n: int, excerpt_len: int, cfg: CollectConfig, bottom_k: int, warmup: int, device: str = "cpu"
    ) -> None:
        T, f32, i64 = excerpt_len, torch.float32, torch.int64
        nb, m = len(cfg.bands), cfg.band_size
        self.t: dict[str, torch.Tensor] = {
            # power sums of (x - shift) in float64; shift = the first batch's mean keeps them well conditioned
            "count": torch.zeros((), dtype=torch.float64),
            "shift": torch.zeros(n, dtype=f32),
            "sums": torch.zeros(4, n, dtype=torch.float64),
            "max": torch.full((n,), -math.inf, dtype=f32),
            "min": torch.full((n,), math.inf, dtype=f32),
            "top_key": torch.full((n, cfg.top_k), -math.inf, dtype=f32),
            "top_index": torch.full((n, cfg.top_k), -1, dtype=i64),
            "top_acts": torch.zeros((n, cfg.top_k, T), dtype=f32),
            "bottom_key": torch.full((n, bottom_k), -math.inf, dtype=f32),
            "bottom_index": torch.full((n, bottom_k), -1, dtype=i64),
            "bottom_acts": torch.zeros((n, bottom_k, T), dtype=f32),
            "random_acts": torch.zeros((n, cfg.n_random, T), dtype=f32),
            "warmup_max": torch.zeros((warmup, n), dtype=f32),
            "band_edges": torch.full((n, nb + 1), math.nan, dtype=f32),
            "band_key": torch.full((n, nb, m), math.inf, dtype=f32),
            "band_index": torch.full((n, nb, m), -1, dtype=i64),
            "band_acts": torch.zeros((n, nb, m, T), dtype=f32),
        }
        self.t = {k: v.to(device) for k, v in self.t.items()}

    def update_moments(self, x: torch.Tensor, scratch: list[torch.Tensor]) -> None:
        """Add a batch (x: [tokens, N]) to the shifted power sums, using two preallocated scratch buffers."""
        t = self.t
        if float(t["count"]) == 0:
            t["shift"] = x.mean(dim=0)
        d, p = scratch
        torch.sub(x, t["shift"], out=d)
        s1 = d.sum(0)
        torch.mul(d, d, out=p)
        s2 = p.sum(0)
        torch.mul(p, d, out=d)
        s3 = d.sum(0)
        torch.mul(p, p, out=p)
        t["sums"] += torch.stack([s1, s2, s3, p.sum(0)]).double()
        t["count"] += x.shape[0]

    def stats(self) -> np.ndarray:
        """[N, 6] float64: mean, variance, skewness, excess kurtosis, max, min."""
        t = {k: self.t[k].cpu() for k in ("count", "sums", "shift", "max", "min")}
        n = float(t["count"])
        s1, s2, s3, s4 = (t["sums"] / n).numpy()
        mu = s1  # mean of (x - shift)
        var = s2 - mu**2
        m3 = s3 - 3 * mu * s2 + 2 * mu**3
        m4 = s4 - 4 * mu * s3 + 6 * mu**2 * s2 - 3 * mu**4
        with np.errstate(divide="ignore", invalid="ignore"):
            flat = var <= 1e-12 * np.maximum(s2, 1e-30)
            skew = np.where(flat, np.nan, m3 / var**1.5)
            kurt = np.where(flat, np.nan, m4 / var**2 - 3.0)
        mean = t["shift"].double().numpy() + mu
        cols = [mean, np.maximum(var, 0.0), skew, kurt, t["max"].double().numpy(), t["min"].double().numpy()]
        assert len(cols) == len(STAT_FIELDS)
        return np.stack(cols, axis=1)


class Collector:
    """The streaming collector for a set of layers; feed it batches with `update`."""

    def __init__(
        self,
        n_excerpts: int,
        excerpt_len: int,
        neurons: dict[int, np.ndarray],
        cfg: CollectConfig,
        signed: bool,
        device: str | torch.device = "cpu",
    ):
        """State lives on ``device`` (the model's), so a GPU model's activations never leave the GPU."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.bottom_k = (cfg.top_k if signed else 0) if cfg.bottom_k is None else cfg.bottom_k
        rng = np.random.default_rng(cfg.seed)
        n_random = min(cfg.n_random, n_excerpts)
        self.random_index = np.sort(rng.choice(n_excerpts, size=n_random, replace=False)).astype(np.int64)
        cfg_random = CollectConfig(**{**asdict(cfg), "n_random": n_random})
        # the warm-up ends on a batch boundary; leave at least half the excerpts for band sampling
        warm = min(cfg.quantile_warmup, max(1, n_excerpts // 2))
        self.warmup = min(n_excerpts, math.ceil(warm / cfg.batch_size) * cfg.batch_size)
        self.neurons = neurons
        self.layers = {
            layer: LayerState(len(idx), excerpt_len, cfg_random, self.bottom_k, self.warmup, self.device)
            for layer, idx in neurons.items()
        }
        self.position = 0
        self.tokens_seen = 0
        self._buffers: list[torch.Tensor] | None = None

    def _scratch(self, rows: int, cols: int) -> list[torch.Tensor]:
        if self._buffers is None or self._buffers[0].shape != (rows, cols):
            self._buffers = [torch.empty(rows, cols, device=self.device) for _ in range(2)]
        return self._buffers

    def _band_keys(self, layer: int, start: int, shape: tuple[int, int]) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.cfg.seed, layer, start]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same keys on every device
        return torch.rand(shape, generator=g).to(self.device)

    def update(self, start: int, values: dict[int, torch.Tensor]) -> None:
        """Add a batch of excerpts ``start, start+1, ...``; values[layer] is [batch, tokens, all neurons]."""
        for layer, full in values.items():
            state = self.layers[layer]
            t = state.t
            sel = self.neurons[layer]
            full = full.to(self.device)
            if len(sel) == full.shape[-1]:
                acts = full.float()
            else:
                acts = full[..., torch.from_numpy(sel).to(self.device)].float()
            B, T, N = acts.shape
            index = torch.arange(start, start + B, dtype=torch.int64, device=self.device)
            bmax = acts.amax(dim=1).T.contiguous()  # [N, B]
            bmin = acts.amin(dim=1).T.contiguous()
            state.update_moments(acts.reshape(B * T, N), self._scratch(B * T, N))
            t["max"] = torch.maximum(t["max"], bmax.amax(1))
            t["min"] = torch.minimum(t["min"], bmin.amin(1))
            _keep_best(t["top_key"], t["top_index"], t["top_acts"], bmax, index, acts, largest=True)
            if self.bottom_k:
                _keep_best(t["bottom_key"], t["bottom_index"], t["bottom_acts"], -bmin, index, acts, largest=True)
            lo, hi = np.searchsorted(self.random_index, [start, start + B])
            for slot in range(lo, hi):
                t["random_acts"][:, slot] = acts[int(self.random_index[slot]) - start].T
            if start < self.warmup:
                t["warmup_max"][start : start + B] = bmax.T[: self.warmup - start]
                if start + B >= self.warmup:
                    q = torch.tensor(band_quantiles(self.cfg.bands), dtype=torch.float32, device=self.device)
                    t["band_edges"] = torch.quantile(t["warmup_max"], q, dim=0).T.contiguous()
            else:
                keys = self._band_keys(layer, start, (N, B))
                edges = t["band_edges"]
                for b in range(len(self.cfg.bands)):
                    upper = bmax < edges[:, b + 1 : b + 2]
                    inside = upper if b == 0 else upper & (bmax >= edges[:, b : b + 1])
                    band_keys = torch.where(inside, keys, torch.full_like(keys, math.inf))
                    _keep_best(
                        t["band_key"][:, b], t["band_index"][:, b], t["band_acts"][:, b],
                        band_keys, index, acts, largest=False,
                    )  # fmt: skip
        batch, tokens = next(iter(values.values())).shape[:2]
        self.position = start + batch
        self.tokens_seen += batch * tokens

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "tokens_seen": self.tokens_seen,
            "layers": {layer: {k: v.cpu() for k, v in s.t.items()} for layer, s in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.tokens_seen = int(state["tokens_seen"])
        for layer, tensors in state["layers"].items():
            self.layers[int(layer)].t = {k: v.to(self.device) for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------


def band_quantiles(bands: list[list[float]]) -> list[float]:
    """The quantiles at the band edges; bands must be contiguous and increasing, e.g. [[0,.5],[.5,.9]]."""
    ok = bool(bands) and all(0 <= lo < hi <= 1 for lo, hi in bands)
    ok = ok and all(bands[i][1] == bands[i + 1][0] for i in range(len(bands) - 1))
    if not ok:
        raise UserError(
            f"Quantile bands {bands} are not contiguous increasing ranges within [0, 1].",
            "Give bands like [[0, 0.5], [0.5, 0.9], [0.9, 0.99], [0.99, 0.999]].",
        )
    return [bands[0][0]] + [hi for _, hi in bands]


def choose_neurons(width: int, layers: list[int], spec: int | list[int] | None, seed: int) -> dict[int, np.ndarray]:
    """Which neuron indices to collect in each layer (sorted)."""
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
    out: Path, subject: SubjectModel, excerpts: ExcerptSet, col: Collector, meta: CollectionMeta
) -> None:
    tok = subject.tokenizer
    atomic_save_npy(out / "excerpts" / "tokens.npy", excerpts.tokens.astype(np.int32))
    atomic_save_npy(out / "excerpts" / "places.npy", excerpts.places.astype(np.int64))
    vocab = {int(i): tok.decode([int(i)]) for i in np.unique(excerpts.tokens)}
    atomic_write_json(out / "excerpts" / "vocab.json", vocab)
    atomic_save_npy(out / "random_sample.npy", col.random_index)
    for layer, state in col.layers.items():
        d, t = layer_dir(out, layer), state.t
        atomic_save_npy(d / "neurons.npy", col.neurons[layer])
        atomic_save_npy(d / "stats.npy", state.stats())
        lists = {
            "top": _sorted(t["top_key"], t["top_index"], t["top_acts"], largest=True),
            "band": _sorted(t["band_key"], t["band_index"], t["band_acts"], largest=False),
        }
        if col.bottom_k:
            lists["bottom"] = _sorted(t["bottom_key"], t["bottom_index"], t["bottom_acts"], largest=True)
        for name, (index, acts) in lists.items():
            atomic_save_npy(d / f"{name}_index.npy", index.cpu().numpy())
            atomic_save_npy(d / f"{name}_acts.npy", acts.cpu().numpy())
        atomic_save_npy(d / "random_acts.npy", t["random_acts"].cpu().numpy())
        atomic_save_npy(d / "band_edges.npy", t["band_edges"].cpu().numpy())
    atomic_write_json(out / "collection.json", asdict(meta))  # written last: marks the folder complete


def collect_activations(
    subject: SubjectModel,
    excerpts: ExcerptSet,
    out_dir: str | Path,
    config: CollectConfig | None = None,
    site: NeuronSite | dict[str, Any] | None = None,
    progress: bool = True,
) -> RecordStore:
    """Run the collection pass (resuming from a checkpoint if one matches) and write the records."""
    cfg = config or CollectConfig()
    band_quantiles(cfg.bands)
    out = Path(out_dir)
    model = subject.model
    site = resolve_site(model, site)
    layers = check_layers(model, cfg.layers)
    width = neurons_per_layer(model, site)
    neurons = choose_neurons(width, layers, cfg.neurons, cfg.seed)
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    if max_ctx is not None and excerpts.excerpt_len > max_ctx:
        raise UserError(
            f"Excerpts of {excerpts.excerpt_len} tokens are longer than the model's context ({max_ctx}).",
            f"Use excerpt_len <= {max_ctx}.",
        )
    parts = {"model": subject.spec, "site": site.as_dict(), "config": asdict(cfg), "layers": layers}
    if getattr(model, "fingerprint", None):  # models defined by code (planted neurons): their source's hash
        parts["model_fingerprint"] = model.fingerprint
    fingerprint = _fingerprint(parts, excerpts)
    meta_path = out / "collection.json"
    stamp_path = out / "fingerprint.txt"
    if meta_path.is_file():
        if stamp_path.is_file() and stamp_path.read_text().strip() == fingerprint:
            return RecordStore(out)
        raise UserError(
            f"{out} already holds a finished collection made with different settings.",
            "Choose another output folder (or run id), or delete that folder to recollect.",
        )
    device = next(model.parameters()).device
    col = Collector(len(excerpts), excerpts.excerpt_len, neurons, cfg, signed=site.signed, device=device)
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            raise UserError(
                f"{ckpt} is a checkpoint of a collection with different settings.",
                "Rerun with the settings of the interrupted run to resume it, or delete the checkpoint to start over.",
            )
        col.load_state_dict(saved["state"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stamp_path, fingerprint.encode())

    def save_checkpoint() -> None:
        buf = io.BytesIO()
        torch.save({"fingerprint": fingerprint, "state": col.state_dict()}, buf)
        atomic_write_bytes(ckpt, buf.getvalue())

    n, B = len(excerpts), cfg.batch_size
    bar = progress_bar(total=n, initial=col.position, unit="excerpt", desc="collect", disable=not progress)
    last_save = time.monotonic()
    with NeuronCapture(model, site, layers) as capture:
        for start in range(col.position, n, B):
            ids = torch.from_numpy(excerpts.tokens[start : start + B].astype(np.int64)).to(device)
            col.update(start, capture.run(ids))
            bar.update(len(ids))
            if time.monotonic() - last_save > cfg.checkpoint_every_s and col.position < n:
                save_checkpoint()
                last_save = time.monotonic()
    bar.close()
    meta = CollectionMeta(
        model=subject.spec,
        site=site.as_dict(),
        n_model_layers=num_layers(model),
        neurons_per_layer=width,
        layers=layers,
        excerpt_len=excerpts.excerpt_len,
        n_excerpts=n,
        top_k=cfg.top_k,
        bottom_k=col.bottom_k,
        n_random=len(col.random_index),
        band_size=cfg.band_size,
        bands=[list(b) for b in cfg.bands],
        seed=cfg.seed,
        corpus=excerpts.corpus,
        signed=site.signed,
        tokens_seen=col.tokens_seen,
    )
    _write_collection(out, subject, excerpts, col, meta)
    ckpt.unlink(missing_ok=True)
    return RecordStore(out)
