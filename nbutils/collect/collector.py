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

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nbutils.collect import cpu_kernel
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


def _merge_best(
    keys: torch.Tensor,
    index: torch.Tensor,
    acts: torch.Tensor,
    new_keys: torch.Tensor,
    new_index: torch.Tensor,
    x: torch.Tensor,
    row_unit: torch.Tensor,
    largest: bool,
    dense: bool,
) -> None:
    """Merge a batch into every layer's per-row lists of the m best keys with their excerpts, in place.

    keys/index [L, R, m] and acts [L, R, m, T] hold the lists, unordered (`sorted_lists` orders them at the
    end); new_keys [L, R, B] and new_index [B] describe the batch, whose values are x [L, B, T, N]; row r's
    activations are unit ``row_unit[r]``'s. One ``topk`` over the kept and the new keys picks the m best
    (equal keys: the earlier excerpt, `order_keys`); the j-th displaced slot of a row receives the j-th new
    entry taken.

    ``dense`` works on every row and writes every slot through a mask: no ``nonzero``, so the host never
    waits for the device (the GPU path). Otherwise only the rows the batch can change are merged and only
    their displaced slots written (the CPU path: once the lists fill, few rows change per batch).
    """
    L, R, m = keys.shape
    B, T = new_keys.shape[-1], acts.shape[-1]
    keys, index, acts, new_keys = (
        keys.view(L * R, m),
        index.view(L * R, m),
        acts.view(L * R, m, T),
        new_keys.reshape(L * R, B),
    )
    rows = None
    if not dense:  # rows whose best new key reaches the worst kept one (equal keys and NaN decided below)
        if largest:
            hit = ~(new_keys.amax(-1) < keys.amin(-1))
        else:
            hit = ~(new_keys.amin(-1) > keys.amax(-1))
        rows = hit.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
    k, i, n = (keys, index, new_keys) if rows is None else (keys[rows], index[rows], new_keys[rows])
    old = order_keys(k, i, largest)
    new = order_keys(n, new_index.expand_as(n), largest)
    chosen = torch.topk(torch.cat([old, new], dim=-1), m, dim=-1, largest=largest, sorted=False).indices
    taken = torch.zeros(old.shape[0], m + B, dtype=torch.bool, device=keys.device)
    taken.scatter_(-1, chosen, True)
    displaced, entering = ~taken[:, :m], taken[:, m:]
    if rows is not None:
        _write_displaced(keys, index, acts, n, new_index, x, rows, row_unit, displaced, entering, R)
    else:
        _write_masked(keys, index, acts, new_keys, new_index, x, row_unit, displaced, entering, R)


def _write_displaced(
    keys: Tensor, index: Tensor, acts: Tensor, n: Tensor, new_index: Tensor, x: Tensor, rows: Tensor,
    row_unit: Tensor, displaced: Tensor, entering: Tensor, R: int,
) -> None:  # fmt: skip
    """The CPU path of `_merge_best`: write the displaced slots of ``rows`` only, pairing each row's j-th
    displaced slot with its j-th entering excerpt (both found row-major by ``nonzero``)."""
    row, slot = displaced.nonzero(as_tuple=True)
    pos = entering.nonzero(as_tuple=True)[1]
    flat = rows[row]
    layer, unit = flat // R, row_unit[flat % R]
    # read x in memory order: x[layer, excerpt, :, unit] strides T by N, so unsorted reads (thousands of rows
    # while the lists fill) miss the cache on every value; sorted, neighbours share cache lines
    order = torch.argsort((layer * x.shape[1] + pos) * x.shape[-1] + unit)
    row, slot, pos, flat, layer, unit = (v[order] for v in (row, slot, pos, flat, layer, unit))
    keys[flat, slot] = n[row, pos]
    index[flat, slot] = new_index[pos]
    acts[flat, slot] = x[layer, pos, :, unit].to(acts.dtype)


def _write_masked(
    keys: Tensor, index: Tensor, acts: Tensor, new_keys: Tensor, new_index: Tensor, x: Tensor, row_unit: Tensor,
    displaced: Tensor, entering: Tensor, R: int,
) -> None:  # fmt: skip
    """The GPU path of `_merge_best`: every slot written through the ``displaced`` mask, the j-th displaced slot
    of a row taking the j-th entering excerpt found by ranks (no ``nonzero``, so no wait for the device)."""
    rank = (displaced.cumsum(-1) - 1).clamp(min=0)  # the how-many-th displaced slot of its row
    first = torch.argsort((~entering).to(torch.int8), dim=-1, stable=True)  # entering positions first
    src = first.gather(-1, rank)  # [rows, m]: the batch position each displaced slot receives
    keys.copy_(torch.where(displaced, new_keys.gather(-1, src), keys))
    index.copy_(torch.where(displaced, new_index[src], index))
    flat = torch.arange(keys.shape[0], device=keys.device)[:, None].expand_as(src)
    fresh = x[flat // R, src, :, row_unit[flat % R]].to(acts.dtype)  # [rows, m, T]
    acts.copy_(torch.where(displaced.unsqueeze(-1), fresh, acts))


def sorted_lists(
    keys: torch.Tensor, index: torch.Tensor, acts: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists of `_merge_best` ordered best first (equal keys: earlier excerpt first); slots never filled
    (infinite key) get index -1."""
    order = torch.argsort(order_keys(keys, index, largest), dim=-1, descending=largest, stable=True)
    keys = torch.gather(keys, -1, order)
    index = torch.where(torch.isinf(keys), -1, torch.gather(index, -1, order))
    acts = torch.gather(acts, -2, order.unsqueeze(-1).expand(*order.shape, acts.shape[-1]))
    return index, acts


def _mul32(h: Any, c: int) -> Any:
    """(h * c) mod 2**32 for h < 2**32, in int64 without overflow (c split into 16-bit halves)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(h: Any) -> Any:
    """lowbias32 (Chris Wellons' hash-prospector), on a Python int or an int64 tensor of values < 2**32; the same
    function as ``mix32`` in cpu_kernel.cpp."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def band_keys(seed: int, layer_id: Tensor, unit_id: Tensor, start: int, batch: int) -> Tensor:
    """[L, N, batch] band-sample priority keys in [0, 1) for the excerpts ``start..start+batch-1``: a hash of
    (seed, layer, unit, excerpt) computed where the tensors live, so every device, shard, batch size and subset
    of units draws the same key for the same excerpt, with no generator on the host (collection format 2; format
    1 drew them from a CPU generator per batch). ``layer_id`` [L] and ``unit_id`` [L, N] are int64."""
    h = _mix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = _mix32(layer_id ^ h)
    h = _mix32(h[:, None] ^ (unit_id & 0xFFFFFFFF))
    excerpts = torch.arange(start, start + batch, dtype=torch.int64, device=unit_id.device) & 0xFFFFFFFF
    h = _mix32(h[..., None] ^ excerpts)
    return (h >> 8).to(torch.float32) * 2.0**-24


BAND_KEYS = "hash32"
"""What a checkpoint's band-sample keys were drawn by (`band_keys`); checkpoints of format 1 have none."""


def check_band_keys(state: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint whose band samples were drawn another way: the run would mix two."""
    if state.get("band_keys") != BAND_KEYS:
        raise UserError(
            "The collection checkpoint was written by an older nbutils that drew band samples differently.",
            "Delete the checkpoint (checkpoint.pt, and any shard checkpoints, in the stage folder) and rerun to "
            "collect from the start.",
        )


class LayerState:
    """One layer's rows of the collector's stacked state: ``t`` maps each state name to a view of that layer
    (setting ``t`` copies the given tensors in), so checkpoints and shard merges stay per layer."""

    def __init__(self, stack: dict[str, torch.Tensor], row: int) -> None:
        self._stack, self._row = stack, row

    @property
    def t(self) -> dict[str, torch.Tensor]:
        return {k: v[self._row] for k, v in self._stack.items()}

    @t.setter
    def t(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self._stack[k][self._row].copy_(v)

    def stats(self) -> np.ndarray:
        """[N, 6] float64: mean, variance, skewness, excess kurtosis, max, min."""
        t = {k: v.cpu() for k, v in self.t.items() if k in ("count", "sums", "shift", "max", "min")}
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


def batch_stats(
    x: torch.Tensor, shift: torch.Tensor, signed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one pass over a batch x [L, B, T, N] adds to the state: the power sums 1..4 of (x - shift) over
    every token in float64 [L, 4, N], each excerpt's max and min [L, B, N], and the active-token counts
    [L, N]. Written so that `torch.compile` fuses it into one read of x (`Collector`'s ``fused``)."""
    d = x.double() - shift[:, None, None, :].double()
    d2 = d * d
    sums = torch.stack([d.sum((1, 2)), d2.sum((1, 2)), (d2 * d).sum((1, 2)), (d2 * d2).sum((1, 2))], dim=1)
    active = ((x != 0) if signed else (x > 0)).sum((1, 2))
    return sums, x.amax(2).float(), x.amin(2).float(), active


@functools.cache
def _compiled_batch_stats() -> Any:
    return torch.compile(batch_stats, dynamic=False)


def _initial_state(
    L: int, n: int, T: int, cfg: CollectConfig, bottom_k: int, n_random: int, warmup: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The collector's empty state for L layers of n units and excerpts of T tokens, stacked per kind."""
    f32, i64 = torch.float32, torch.int64
    nb, m, k = len(cfg.bands), cfg.band_size, cfg.top_k
    state = {
        # power sums of (x - shift) in float64; shift = the first batch's mean keeps them well conditioned
        "count": torch.zeros(L, dtype=torch.float64),
        "shift": torch.zeros(L, n, dtype=f32),
        "sums": torch.zeros(L, 4, n, dtype=torch.float64),
        "max": torch.full((L, n), -math.inf, dtype=f32),
        "min": torch.full((L, n), math.inf, dtype=f32),
        "active": torch.zeros(L, n, dtype=i64),  # tokens > 0 (!= 0 if signed): dead and rare units
        "top_key": torch.full((L, n, k), -math.inf, dtype=f32),
        "top_index": torch.full((L, n, k), -1, dtype=i64),
        "top_acts": torch.zeros((L, n, k, T), dtype=f32),
        "bottom_key": torch.full((L, n, bottom_k), -math.inf, dtype=f32),
        "bottom_index": torch.full((L, n, bottom_k), -1, dtype=i64),
        "bottom_acts": torch.zeros((L, n, bottom_k, T), dtype=f32),
        "random_acts": torch.zeros((L, n, n_random, T), dtype=f32),
        "warmup_max": torch.zeros((L, warmup, n), dtype=f32),
        "band_edges": torch.full((L, n, nb + 1), math.nan, dtype=f32),
        "band_key": torch.full((L, n, nb, m), math.inf, dtype=f32),
        "band_index": torch.full((L, n, nb, m), -1, dtype=i64),
        "band_acts": torch.zeros((L, n, nb, m, T), dtype=f32),
    }
    return {name: v.to(device) for name, v in state.items()}


class Collector:
    """The streaming collector for a set of layers; feed it batches with `update`.

    Every layer's state lives in one stacked tensor per kind ([layers, units, ...]), and a batch updates all
    layers together with a fixed number of tensor operations, not a number per layer: on a GPU the
    collector's cost is kernel launches and host waits, not arithmetic."""

    def __init__(
        self,
        n_excerpts: int,
        excerpt_len: int,
        neurons: dict[int, np.ndarray],
        cfg: CollectConfig,
        signed: bool,
        device: str | torch.device = "cpu",
        fused: bool | None = None,
        dense: bool | None = None,
        kernel: bool | None = None,
    ):
        """State lives on ``device`` (the model's), so a GPU model's activations never leave the GPU.

        ``fused``: compute each batch's statistics with `torch.compile` (one pass over the values; None: on a
        GPU, or on the CPU from 10^9 values read: enough to repay the compile, about 20 s once per process).
        ``dense``: merge the kept lists without ``nonzero`` (None: on a GPU). ``kernel``: on the CPU, update with
        the compiled kernel (`nbutils.collect.cpu_kernel`; None: where it builds and dense is off). Every way the
        results agree: the lists exactly, the statistics to float64 rounding."""
        self.cfg = cfg
        self.signed = signed
        self.device = torch.device(device)
        self.bottom_k = (cfg.top_k if signed else 0) if cfg.bottom_k is None else cfg.bottom_k
        rng = np.random.default_rng(cfg.seed)
        n_random = min(cfg.n_random, n_excerpts)
        self.random_index = np.sort(rng.choice(n_excerpts, size=n_random, replace=False)).astype(np.int64)
        # the warm-up ends on a batch boundary; leave at least half the excerpts for band sampling
        warm = min(cfg.quantile_warmup, max(1, n_excerpts // 2))
        self.warmup = min(n_excerpts, math.ceil(warm / cfg.batch_size) * cfg.batch_size)
        self.neurons = neurons
        self.order = sorted(neurons)
        widths = {len(neurons[layer]) for layer in self.order}
        if len(widths) != 1:
            raise ValueError(f"every layer needs the same number of units to stack, got {sorted(widths)}")
        n, T, L = widths.pop(), excerpt_len, len(self.order)
        self.stack = _initial_state(L, n, T, cfg, self.bottom_k, n_random, self.warmup, self.device)
        self.layers = {layer: LayerState(self.stack, i) for i, layer in enumerate(self.order)}
        self.position = 0
        self.tokens_seen = 0
        self.shift_fixed = False
        """True when ``shift`` was given (a shard takes the warm-up shard's, so shards' sums add up)."""
        gpu = self.device.type != "cpu"
        work = L * n * excerpt_len * n_excerpts  # values the collection reads
        self.fused = (gpu or work >= 1e9) if fused is None else fused
        self.dense = gpu if dense is None else dense
        self._fused_shape: tuple[int, ...] | None = None
        self.kernel = (not self.dense and self.device.type == "cpu") if kernel is None else kernel
        self._pick = torch.from_numpy(np.stack([neurons[layer] for layer in self.order]).astype(np.int64))
        self._pick = self._pick.to(self.device).contiguous()  # [L, N]: the unit each column holds
        self._layer_id = torch.tensor(self.order, dtype=torch.int64, device=self.device)
        self._all_units = bool((self._pick == torch.arange(n, device=self.device)).all())
        self._row_unit = {"unit": torch.arange(n, device=self.device)}
        self._row_unit["band"] = self._row_unit["unit"].repeat_interleave(len(cfg.bands))

    def _batch_stats(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`batch_stats`, compiled when ``fused`` (for the first batch's shape: a smaller last batch runs
        eagerly rather than compile again); a compiler that fails falls back to eager once, with a note."""
        if self.fused and self._fused_shape in (None, tuple(x.shape)):
            try:
                out = _compiled_batch_stats()(x, shift, self.signed)
                self._fused_shape = tuple(x.shape)
                return out
            except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported device: stay correct
                print(f"collect: torch.compile unavailable ({type(e).__name__}); statistics computed eagerly")
                self.fused = False
        return batch_stats(x, shift, self.signed)

    def update(self, start: int, values: dict[int, torch.Tensor] | torch.Tensor) -> None:
        """Add a batch of excerpts ``start, start+1, ...``: values[layer] is [batch, tokens, all units], or
        ``values`` is every layer's stacked in the collector's layer order ([layers, batch, tokens, units], as
        `NeuronCapture(stacked=True)` keeps them: no copy)."""
        t, cfg = self.stack, self.cfg
        if isinstance(values, dict):
            values = torch.stack([values[layer].to(self.device) for layer in self.order])
        x = values.to(self.device)
        if x.shape[-1] != len(self._pick[0]) or not self._all_units:  # a subset of the units: pick them
            x = torch.gather(x, 3, self._pick[:, None, None, :].expand(*x.shape[:3], self._pick.shape[1]))
        L, B, T, N = x.shape
        if self.position == 0 and start == 0 and not self.shift_fixed:
            t["shift"].copy_(x.float().mean(dim=(1, 2)))
        bands = start >= self.warmup  # band edges known: sample this batch into the bands
        if self.kernel and cpu_kernel.usable(x):
            bmax, bmin = cpu_kernel.collect_batch(
                x, start, t, self.signed, t["band_edges"] if bands else None, self.cfg.seed, self._layer_id, self._pick
            )
        else:
            bmax, bmin = self._torch_update(x, start, bands)
        t["count"] += B * T
        torch.maximum(t["max"], bmax.amax(1), out=t["max"])
        torch.minimum(t["min"], bmin.amin(1), out=t["min"])
        lo, hi = np.searchsorted(self.random_index, [start, start + B])
        if hi > lo:  # the random sample's excerpts in this batch, every layer at once
            rows = torch.from_numpy(self.random_index[lo:hi] - start).to(self.device)
            t["random_acts"][:, :, lo:hi] = x[:, rows].permute(0, 3, 1, 2).to(torch.float32)
        if not bands:
            t["warmup_max"][:, start : start + B] = bmax[:, : self.warmup - start]
            if start + B >= self.warmup:
                q = torch.tensor(band_quantiles(cfg.bands), dtype=torch.float32, device=self.device)
                for i in range(L):  # once per collection; per layer since quantile() caps its input size
                    # sorted along memory (each unit's maxima contiguous): the same edges, in 2/3 of the time
                    t["band_edges"][i] = torch.quantile(t["warmup_max"][i].T.contiguous(), q, dim=1).T
        self.position = start + B
        self.tokens_seen += B * T

    def _torch_update(self, x: Tensor, start: int, bands: bool) -> tuple[Tensor, Tensor]:
        """The batch's statistics and list merges in tensor operations (the GPU's path, and the CPU's where the
        kernel is not built); returns each excerpt's max and min [L, B, N]."""
        t, (L, B, T, N) = self.stack, x.shape
        sums, bmax, bmin, active = self._batch_stats(x, t["shift"])  # bmax, bmin: [L, B, N]
        t["sums"] += sums
        t["active"] += active
        index = torch.arange(start, start + B, dtype=torch.int64, device=self.device)
        top, bottom = bmax.transpose(1, 2), bmin.transpose(1, 2)  # [L, N, B]
        units = self._row_unit["unit"]
        _merge_best(t["top_key"], t["top_index"], t["top_acts"], top, index, x, units, True, self.dense)
        if self.bottom_k:
            _merge_best(t["bottom_key"], t["bottom_index"], t["bottom_acts"], -bottom, index, x, units, True,
                        self.dense)  # fmt: skip
        if bands:
            nb, m = len(self.cfg.bands), self.cfg.band_size
            keys = band_keys(self.cfg.seed, self._layer_id, self._pick, start, B)  # [L, N, B]
            edges = t["band_edges"]  # [L, N, nb + 1]
            inside = top.unsqueeze(2) < edges[..., 1:, None]  # [L, N, nb, B]
            inside[:, :, 1:] &= top.unsqueeze(2) >= edges[..., 1:nb, None]
            candidates = torch.where(inside, keys.unsqueeze(2), math.inf).reshape(L, N * nb, B)
            _merge_best(
                t["band_key"].view(L, N * nb, m), t["band_index"].view(L, N * nb, m),
                t["band_acts"].view(L, N * nb, m, T), candidates, index, x, self._row_unit["band"], False, self.dense,
            )  # fmt: skip
        return bmax, bmin

    def state_dict(self) -> dict[str, Any]:
        return {
            "band_keys": BAND_KEYS,
            "position": self.position,
            "tokens_seen": self.tokens_seen,
            "layers": {layer: {k: v.to("cpu", copy=True) for k, v in s.t.items()} for layer, s in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_band_keys(state)
        self.position = int(state["position"])
        self.tokens_seen = int(state["tokens_seen"])
        for layer, tensors in state["layers"].items():
            missing = set(self.stack) - set(tensors)
            if missing:
                raise UserError(
                    f"The collection checkpoint was written by an older nbutils (it lacks {sorted(missing)}).",
                    "Delete the checkpoint (checkpoint.pt in the stage folder) and rerun to collect from the start.",
                )
            self.layers[int(layer)].t = tensors


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
    for part in parts:
        check_band_keys(part[2])
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
