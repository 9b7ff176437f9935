"""The streaming collector: one pass over the excerpts that keeps, per unit, what the later stages need.

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

Its state is a dict of tensors (`Collector.state_dict`), so the stage (`nbutils.collect.stage`) checkpoints
it and a resumed pass equals an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from nbutils.core.errors import UserError
from nbutils.core.records import DEFAULT_BANDS, STAT_FIELDS


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


def order_keys(keys: torch.Tensor, index: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys that order entries by their float32 key and, among equal keys, earlier excerpts first (as
    better): so the lists kept do not depend on the order excerpts arrive in, and shards merge exactly.

    The float's bits, mapped to an integer of the same order, fill the high 32 bits; the excerpt index (or
    its complement, when larger is better) the low 32."""
    bits = keys.contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)
    tie = (2**31 - 1 - index) if largest else (index + 1)
    return ordered * 2**32 + tie


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

    keys/index [N, m] and acts [N, m, T] hold the lists, unordered (`sorted_lists` orders them at the end);
    new_keys [N, B] and new_index [B] describe the batch, whose activations are batch_acts [B, T, N]. Among
    equal keys the earlier excerpt is kept (`order_keys`). Only the slots whose entry is displaced are
    written, so the cost follows the number of replacements.
    """
    old = order_keys(keys, index, largest)
    new = order_keys(new_keys, new_index.expand_as(new_keys), largest)
    worst = old.amin(1, keepdim=True) if largest else old.amax(1, keepdim=True)
    rows = ((new > worst) if largest else (new < worst)).any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    m = keys.shape[1]
    cand = torch.topk(new[rows], min(m, new.shape[1]), dim=1, largest=largest, sorted=False)
    chosen = torch.topk(torch.cat([old[rows], cand.values], dim=1), m, dim=1, largest=largest, sorted=False)
    taken = torch.zeros(len(rows), m + cand.values.shape[1], dtype=torch.bool, device=keys.device)
    taken.scatter_(1, chosen.indices, True)
    # per row, the j-th displaced old slot receives the j-th taken candidate (both counts are equal)
    slot_row, slot = (~taken[:, :m]).nonzero(as_tuple=True)
    cand_row, cand_pos = taken[:, m:].nonzero(as_tuple=True)
    neuron = rows[slot_row]
    batch_pos = cand.indices[cand_row, cand_pos]
    keys[neuron, slot] = new_keys[neuron, batch_pos]
    index[neuron, slot] = new_index[batch_pos]
    acts[neuron, slot] = batch_acts[batch_pos, :, neuron]


def sorted_lists(
    keys: torch.Tensor, index: torch.Tensor, acts: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists of `_keep_best` ordered best first (equal keys: earlier excerpt first); slots never filled
    (infinite key) get index -1."""
    order = torch.argsort(order_keys(keys, index, largest), dim=-1, descending=largest, stable=True)
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
            "active": torch.zeros(n, dtype=i64),  # tokens with a value > 0 (!= 0 if signed): dead and rare units
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
        self.shift_fixed = False
        """True when ``shift`` was given (a shard takes the warm-up shard's, so shards' sums add up)."""

    def update_moments(self, x: torch.Tensor, scratch: list[torch.Tensor]) -> None:
        """Add a batch (x: [tokens, N]) to the shifted power sums, using two preallocated scratch buffers."""
        t = self.t
        if float(t["count"]) == 0 and not self.shift_fixed:
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
        self.signed = signed
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
            t["active"] += ((acts != 0) if self.signed else (acts > 0)).sum(dim=(0, 1))
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
            missing = set(self.layers[int(layer)].t) - set(tensors)
            if missing:
                raise UserError(
                    f"The collection checkpoint was written by an older nbutils (it lacks {sorted(missing)}).",
                    "Delete the checkpoint (checkpoint.pt in the stage folder) and rerun to collect from the start.",
                )
            self.layers[int(layer)].t = {k: v.to(self.device) for k, v in tensors.items()}


def _best_of(parts: list[dict[str, torch.Tensor]], name: str, largest: bool, m: int) -> dict[str, torch.Tensor]:
    """The ``m`` best entries (by `order_keys`) of several shards' lists ``<name>_key/_index/_acts``."""
    keys = torch.cat([p[f"{name}_key"] for p in parts], dim=-1)
    index = torch.cat([p[f"{name}_index"] for p in parts], dim=-1)
    acts = torch.cat([p[f"{name}_acts"] for p in parts], dim=-2)
    order = torch.topk(order_keys(keys, index, largest), m, dim=-1, largest=largest, sorted=False).indices
    out_acts = torch.gather(acts, -2, order.unsqueeze(-1).expand(*order.shape, acts.shape[-1]))
    return {f"{name}_key": torch.gather(keys, -1, order), f"{name}_index": torch.gather(index, -1, order),
            f"{name}_acts": out_acts}  # fmt: skip


def merge_states(col: Collector, parts: list[tuple[int, int, dict[str, Any]]]) -> None:
    """Set ``col`` to the state of one collector that saw every excerpt, from the states (`state_dict`) of
    collectors that each saw the excerpts ``lo..hi-1`` (``parts``: (lo, hi, state); together every excerpt
    once, the first from excerpt 0 through the quantile warm-up, the others started with its shift and band
    edges, all on the same batch boundaries as a single collector).

    Exact: max/min; the top/bottom-k, band-sample and random lists (each the best keys over all excerpts, as
    one collector keeps them; only exactly equal keys could be ordered differently); the power sums are the
    same float64 sums added in another order (equal to about 1e-15 relative)."""
    parts = sorted(parts, key=lambda p: p[0])
    if parts[0][0] != 0 or any(a[1] != b[0] for a, b in zip(parts, parts[1:])):
        raise ValueError(f"the shards' excerpt ranges {[p[:2] for p in parts]} do not cover 0..n once")
    for layer, state in col.layers.items():
        ts = [{k: v.cpu() for k, v in p[2]["layers"][layer].items()} for p in parts]
        t = {k: v.cpu().clone() for k, v in state.t.items()}
        t["count"] = sum(x["count"] for x in ts)
        t["sums"] = sum(x["sums"] for x in ts)
        t["shift"], t["warmup_max"], t["band_edges"] = ts[0]["shift"], ts[0]["warmup_max"], ts[0]["band_edges"]
        t["max"] = torch.stack([x["max"] for x in ts]).amax(0)
        t["min"] = torch.stack([x["min"] for x in ts]).amin(0)
        t["active"] = sum(x["active"] for x in ts)
        t.update(_best_of(ts, "top", True, t["top_key"].shape[-1]))
        t.update(_best_of(ts, "bottom", True, t["bottom_key"].shape[-1]))
        t.update(_best_of(ts, "band", False, t["band_key"].shape[-1]))
        for slot, excerpt in enumerate(col.random_index):  # each random excerpt from the shard that read it
            owner = next(i for i, (lo, hi, _) in enumerate(parts) if lo <= excerpt < hi)
            t["random_acts"][:, slot] = ts[owner]["random_acts"][:, slot]
        state.t = {k: v.to(col.device) for k, v in t.items()}
    col.position = parts[-1][1]
    col.tokens_seen = sum(int(p[2]["tokens_seen"]) for p in parts)


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
