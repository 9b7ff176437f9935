"""Unit records: the plain data classes every stage shares, and the collection's on-disk format.

A *collection* folder (`nbutils.core.layout.CollectionLayout`), written once by stage 01 and read by
`RecordStore`, looks like this (``T`` = excerpt length, ``n`` = units collected in a layer, ``k`` =
top/bottom excerpts kept):

    collection.json                 metadata (`CollectionMeta`): model, unit type, site, layers, sizes, seed, corpus
    excerpts/tokens.npy             int32  [n_excerpts, T]  token ids of every excerpt; row = excerpt index
    excerpts/places.npy             int64  [n_excerpts, 2]  (document index, token offset in the document)
    excerpts/vocab.json             {"token id": "token text"} for every id that occurs in an excerpt
    random_sample.npy               int64  [n_random]       excerpt indices of the random sample, shared by all units
    layer_LLL/neurons.npy           int64  [n]              unit indices collected in layer LLL (sorted)
    layer_LLL/stats.npy             float64 [n, 6]          mean, variance, skewness, kurtosis, max, min over all tokens
    layer_LLL/active.npy            int64  [n]              tokens where the unit's value is > 0 (signed: != 0): dead, rare units
    layer_LLL/top_index.npy         int64  [n, k]           excerpts with the highest max activation, strongest first
    layer_LLL/top_acts.npy          float32 [n, k, T]       their per-token activations
    layer_LLL/bottom_index.npy      int64  [n, k]           signed units only: excerpts with the lowest min activation
    layer_LLL/bottom_acts.npy       float32 [n, k, T]
    layer_LLL/random_acts.npy       float32 [n, n_random, T] activations on the shared random sample
    layer_LLL/band_index.npy        int64  [n, bands, m]    uniform samples of excerpts whose max lies in each band
    layer_LLL/band_acts.npy         float32 [n, bands, m, T]
    layer_LLL/band_edges.npy        float32 [n, bands + 1]  activation values at the band quantiles
    layer_LLL/{top,random}_source.npy        int32 [n, k, T]  attention heads only: the position each token
    layer_LLL/{top,random}_source_weight.npy float32            attends to most, its weight, and the norm of
    layer_LLL/{top,random}_source_write.npy  float32            what the head writes from there (`Looks`)

An excerpt index of -1 marks an empty slot (fewer excerpts qualified than were asked for). Every array is
a plain ``.npy`` file opened memory-mapped, so loading one unit reads only that unit's rows. Token ids
and corpus places are kept so any excerpt can be recomputed exactly. Format version 2 (version 1 has the same
files, its band samples drawn with other keys: both are read); ``collection.json``
of collections written before unit types existed has no ``unit`` field and means MLP neurons.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.integrity import repair_fix
from nbutils.core.layout import MANIFEST, CollectionLayout
from nbutils.core.units import NEURON, UnitId

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
"""Format 2 (the same files as 1) draws band-sample keys from a hash of (seed, layer, unit, excerpt) instead of a
CPU generator per batch: the band samples of a rerun differ from a format-1 collection's; both read alike."""
STAT_FIELDS = ("mean", "variance", "skewness", "kurtosis", "max", "min")
DEFAULT_BANDS = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 0.999))


# ----------------------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Excerpt:
    """One excerpt of text with one unit's activation on each of its tokens."""

    tokens: list[str]
    activations: np.ndarray
    token_ids: list[int] = field(default_factory=list)
    index: int = -1
    """Row in the collection's excerpt table (-1 when unknown, e.g. imported from elsewhere)."""
    doc: int = -1
    """Index of the corpus document the excerpt starts in."""
    offset: int = -1
    """Token offset of the excerpt's first token within that document."""

    looks: Looks | None = None
    """Where an attention head looks from each token (`Looks`); None for other units and unkept excerpts."""

    @property
    def max(self) -> float:
        return float(np.max(self.activations)) if len(self.activations) else math.nan


@dataclass
class Looks:
    """Where an attention head looks from each token of an excerpt (`nbutils.subject.heads.head_looks`)."""

    source: np.ndarray
    """Per token, the position it attends to most: itself or an earlier token (ties: the earliest)."""
    weight: np.ndarray
    """That attention weight (0..1)."""
    write: np.ndarray
    """The norm of what the head writes from that position to this token (weight x its value's write norm)."""

    LOOKS_FILES = ("source", "source_weight", "source_write")
    """The collection files' names after ``top_`` / ``random_``, in the order of the fields."""

    def pairs(self, tokens: list[str], n: int = 3) -> list[tuple[int, int, float]]:
        """The ``n`` (token, source, weight) pairs with the largest writes, largest first."""
        order = np.argsort(-np.asarray(self.write), kind="stable")[:n]
        return [(int(i), int(self.source[i]), float(self.weight[i])) for i in order if self.write[i] > 0]


@dataclass
class UnitRecord:
    """Everything collected about one unit: its excerpts and activation statistics."""

    id: UnitId
    top: list[Excerpt]
    random: list[Excerpt]
    bands: list[list[Excerpt]]
    band_quantiles: list[tuple[float, float]]
    band_edges: list[float]
    mean: float
    variance: float
    skewness: float
    kurtosis: float
    max: float
    min: float
    bottom: list[Excerpt] = field(default_factory=list)
    writes: dict[str, list[tuple[str, float]]] | None = None
    """What the unit writes (`nbutils.subject.outputs`): ``{"promotes": [(token, logit change), ...],
    "suppresses": [...]}``, strongest first; None where the collection has none (older ones, planted)."""
    active: int | None = None
    """Tokens of the collection on which the unit's value is > 0 (None in collections made before it was kept)."""
    noun: str = "neuron"
    """What prompts and views call the unit ("feature" for SAE latents)."""


@dataclass
class CollectionMeta:
    """What a collection folder holds and how it was made (stored as collection.json)."""

    model: str
    site: dict[str, Any]
    n_model_layers: int
    neurons_per_layer: int
    layers: list[int]
    excerpt_len: int
    n_excerpts: int
    top_k: int
    bottom_k: int
    n_random: int
    band_size: int
    bands: list[list[float]]
    seed: int
    corpus: str
    signed: bool
    tokens_seen: int = 0
    format_version: int = FORMAT_VERSION
    unit: dict[str, Any] = field(default_factory=lambda: {"kind": NEURON})
    """The unit type (`nbutils.subject.units`) as its kind and settings; MLP neurons when absent."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CollectionMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def kind(self) -> str:
        return str(self.unit.get("kind", NEURON))

    @property
    def noun(self) -> str:
        """What prompts and views call one unit: "neuron", or the unit type's word ("feature" for latents)."""
        return str(self.unit.get("noun", "neuron"))


# ----------------------------------------------------------------------------------------------------------
# Reading a collection
# ----------------------------------------------------------------------------------------------------------


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map one array; a truncated or damaged file raises a UserError naming it. The map is returned as a
    plain array view (same pages, read-only): `np.memmap`'s Python-level indexing cost more than the rest of
    reading a unit's record."""
    try:
        return np.asarray(np.load(path, mmap_mode="r"))
    except (ValueError, OSError, EOFError) as e:
        stage = path.parent.parent  # <collection>/layer_LLL/<array>.npy
        in_run = (stage / MANIFEST).is_file()  # a finished stage 01 of a run: the run's one repair path
        raise UserError(
            f"{path} is truncated or damaged ({e}).",
            repair_fix(stage.parent) if in_run else f"Restore it, or delete {stage} and collect again.",
        ) from None


class RecordStore:
    """Read access to a collection folder; loads one unit at a time from memory-mapped arrays."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.layout = CollectionLayout(path)
        self.path = self.layout.root
        if not self.layout.meta.is_file():
            raise UserError(
                f"No finished activation collection at {self.path} (collection.json is missing).",
                "Run stage 01 (`python -m nbutils run`, or nbutils.collect.stage.collect_activations) into that "
                "folder first, or pass the folder that stage 01 wrote.",
            )
        self.meta = CollectionMeta.from_dict(json.loads(self.layout.meta.read_text()))
        if self.meta.format_version not in READABLE_FORMATS:
            raise UserError(
                f"{self.layout.meta} has record format {self.meta.format_version}; this nbutils reads "
                f"{', '.join(map(str, READABLE_FORMATS))}.",
                "Re-run stage 01 with this version of nbutils.",
            )
        self.tokens = _load_npy(self.layout.tokens)
        self.places = _load_npy(self.layout.places)
        self.random_index = np.asarray(_load_npy(self.layout.random_sample))
        self.vocab = {int(k): v for k, v in json.loads(self.layout.vocab.read_text()).items()}
        self._layers: dict[int, dict[str, np.ndarray]] = {}
        # Units are read from several threads (stages 02/03 keep many in flight). The lock makes each layer
        # load once, and keeps np.load's header parsing (ast.literal_eval) on one thread at a time: CPython
        # 3.11 can raise "AST constructor recursion depth mismatch" when two threads parse at once.
        self._layers_lock = threading.Lock()

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    def _layer(self, layer: int) -> dict[str, np.ndarray]:
        with self._layers_lock:
            return self._load_layer(layer)

    def _load_layer(self, layer: int) -> dict[str, np.ndarray]:
        if layer not in self._layers:
            if layer not in self.meta.layers:
                raise UserError(
                    f"Layer {layer} is not in the collection at {self.path}; it holds layers {self.meta.layers}.",
                    "Choose one of those layers, or collect this layer with stage 01.",
                )
            d = self.layout.layer_dir(layer)
            self._layers[layer] = {p.stem: _load_npy(p) for p in sorted(d.glob("*.npy")) if not p.name.startswith(".")}
        return self._layers[layer]

    def neurons(self, layer: int) -> np.ndarray:
        """Indices of the units collected in a layer."""
        return np.asarray(self._layer(layer)["neurons"])

    def unit(self, layer: int, index: int) -> UnitId:
        return UnitId(layer, index, self.meta.kind)

    def all_ids(self) -> Iterator[UnitId]:
        for layer in self.layers:
            for n in self.neurons(layer):
                yield self.unit(layer, int(n))

    def stats(self, layer: int) -> dict[str, np.ndarray]:
        """Per-unit statistics of a layer as named columns (plus ``neuron``, the unit indices)."""
        arr = np.asarray(self._layer(layer)["stats"])
        out = {name: arr[:, i] for i, name in enumerate(STAT_FIELDS)}
        out["neuron"] = self.neurons(layer)
        return out

    def active(self, layer: int) -> np.ndarray | None:
        """Per unit of a layer, the tokens on which its value is > 0 (None for collections without the count)."""
        arrays = self._layer(layer)
        return np.asarray(arrays["active"]) if "active" in arrays else None

    def rare_units(self, min_active: int) -> dict[tuple[int, int], int] | None:
        """Dead and rare units: ``{(layer, index): active tokens}`` for every unit active on fewer than
        ``min_active`` tokens; None for a collection made before the counts were kept."""
        out = {}
        for layer in self.layers:
            counts = self.active(layer)
            if counts is None:
                return None
            for i in np.flatnonzero(counts < min_active):
                out[(layer, int(self.neurons(layer)[i]))] = int(counts[i])
        return out

    def strength(self, layer: int) -> np.ndarray:
        """Per unit of a layer, its max activation over its standard deviation: large for units that fire
        rarely and strongly (0 for a unit that never varies)."""
        s = self.stats(layer)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s["variance"] > 0, s["max"] / np.sqrt(s["variance"]), 0.0)

    def strongest(self, layer: int, n: int) -> list[int]:
        """The ``n`` units of a layer with the largest `strength`, strongest first."""
        order = np.argsort(-self.strength(layer), kind="stable")[:n]
        return [int(self.neurons(layer)[i]) for i in order]

    def require(self, layer: int, neuron: int) -> None:
        """Raise a clear error if this unit was not collected (without reading its record)."""
        self._row(layer, neuron)

    def _row(self, layer: int, neuron: int) -> int:
        neurons = self.neurons(layer)
        row = int(np.searchsorted(neurons, neuron))
        if row >= len(neurons) or neurons[row] != neuron:
            noun = self.meta.noun
            raise UserError(
                f"{noun.capitalize()} {neuron} of layer {layer} was not collected (this layer holds {len(neurons)} "
                f"{noun}s, indices {int(neurons[0])}..{int(neurons[-1])}).",
                f"Pick a collected {noun}, or re-run stage 01 with that {noun} included.",
            )
        return row

    def excerpt_tokens(self, index: int) -> list[str]:
        return [self.vocab[int(t)] for t in self.tokens[index]]

    def _excerpt(self, index: int, acts: np.ndarray, looks: Looks | None = None) -> Excerpt:
        ids = np.asarray(self.tokens[index]).tolist()  # one read of the row, not one per token
        doc, offset = np.asarray(self.places[index]).tolist()
        vocab = self.vocab
        return Excerpt(
            tokens=[vocab[t] for t in ids],
            activations=np.array(acts, dtype=np.float32),
            token_ids=ids,
            index=int(index),
            doc=doc,
            offset=offset,
            looks=looks,
        )

    def _excerpts(self, index: np.ndarray, acts: np.ndarray, looks: list[np.ndarray] | None = None) -> list[Excerpt]:
        """Excerpts of a list's rows; ``looks``: its `Looks` arrays (``[k, T]`` each), where kept."""
        acts = np.asarray(acts)
        return [
            self._excerpt(i, acts[j], Looks(*(np.asarray(a[j]) for a in looks)) if looks else None)
            for j, i in enumerate(np.asarray(index).tolist())
            if i >= 0
        ]

    def _looks(self, arrays: dict[str, np.ndarray], which: str, row: int) -> list[np.ndarray] | None:
        names = [f"{which}_{name}" for name in Looks.LOOKS_FILES]
        return [arrays[n][row] for n in names] if all(n in arrays for n in names) else None

    def record(self, layer: int, neuron: int) -> UnitRecord:
        """Load one unit's record, reading only its rows from disk."""
        arrays = self._layer(layer)
        row = self._row(layer, neuron)
        stats = np.asarray(arrays["stats"][row], dtype=np.float64)
        bottom = []
        if "bottom_index" in arrays:
            bottom = self._excerpts(arrays["bottom_index"][row], arrays["bottom_acts"][row])
        bands = [self._excerpts(i, a) for i, a in zip(arrays["band_index"][row], arrays["band_acts"][row])]
        writes = None
        if "writes_promote_ids" in arrays:
            writes = {
                plural: [
                    (self.vocab[int(t)], float(v))
                    for t, v in zip(arrays[f"writes_{side}_ids"][row], arrays[f"writes_{side}_logits"][row])
                ]
                for side, plural in (("promote", "promotes"), ("suppress", "suppresses"))
            }
        return UnitRecord(
            id=self.unit(layer, neuron),
            top=self._excerpts(arrays["top_index"][row], arrays["top_acts"][row], self._looks(arrays, "top", row)),
            bottom=bottom,
            random=self._excerpts(self.random_index, arrays["random_acts"][row], self._looks(arrays, "random", row)),
            bands=bands,
            band_quantiles=[tuple(b) for b in self.meta.bands],
            band_edges=[float(x) for x in arrays["band_edges"][row]],
            writes=writes,
            active=int(arrays["active"][row]) if "active" in arrays else None,
            noun=self.meta.noun,
            **{name: float(stats[i]) for i, name in enumerate(STAT_FIELDS)},
        )


# ----------------------------------------------------------------------------------------------------------
# Splits of a record for explaining and scoring
# ----------------------------------------------------------------------------------------------------------


def _negated(excerpts: list[Excerpt]) -> list[Excerpt]:
    return [
        Excerpt(e.tokens, -np.asarray(e.activations), e.token_ids, e.index, e.doc, e.offset, e.looks) for e in excerpts
    ]


SPLITS = ("nbutils", "paper")
"""How `split_excerpts` deals a record's excerpts into train / calibration / valid sets."""


def split_excerpts(
    record: UnitRecord, negative: bool = False, per_band: int = 0, split: str = "nbutils"
) -> dict[str, list[Excerpt]]:
    """Disjoint excerpt sets for explaining, calibrating and scoring one unit.

    Top excerpts are dealt round-robin into train / calibration / valid / test, random ones into
    calibration / valid / test (the interleaved split of OpenAI's neuron-explainer). The explainer sees only
    ``train``; best-of-n choice and the linear calibration use ``calibration_*``; scores use ``valid_*``.

    ``split="nbutils"`` (the default) uses every excerpt collected: ``train = top[0::4]``, ``valid_top =
    top[2::4]``, ``valid_random = random[1::3]``, and leaves out of the random sets any excerpt the
    explainer also sees among its train excerpts. With the main job's 20 top and 20 random excerpts that is
    5 train, 5 + 6-7 calibration and 5 + 6-7 scored excerpts (top + random). ``split="paper"`` is
    neuron-explainer's exact split (``ActivationRecordSliceParams`` with equal splits): ``n = min(len(top)
    // 4, len(random) // 3)`` excerpts per split, ``train = top[0:4n:4]``, ``valid = top[2:4n:4] +
    random[1:3n:3]`` (1:1, nothing removed), so scores compare with the paper's (which scored 5 + 5).

    With ``per_band``, ``stratified`` holds the same number of excerpts (at most ``per_band``) from every
    non-empty quantile band, none of them a train or calibration excerpt: a sample spread evenly over
    activation levels (positive side only; bands are sampled by maximum activation).
    With ``negative`` the bottom excerpts stand in for the top ones and every activation is negated, so the
    negative side of a signed unit is explained like a positive one.
    """
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of {SPLITS}.", 'Use split="nbutils" or split="paper".')
    top = _negated(record.bottom) if negative else record.top
    rand = _negated(record.random) if negative else record.random
    if split == "paper":
        n = min(len(top) // 4, len(rand) // 3)
        top, rand = top[: 4 * n], rand[: 3 * n]
    train = top[0::4]
    shown = {e.index for e in train if e.index >= 0}
    if split == "nbutils":
        rand = [e for e in rand if e.index not in shown]  # a random excerpt may also be a top one
    sets = {
        "train": train,
        "calibration_top": top[1::4],
        "calibration_random": rand[0::3],
        "valid_top": top[2::4],
        "valid_random": rand[1::3],
    }
    used = {e.index for name in ("train", "calibration_top", "calibration_random") for e in sets[name]} - {-1}
    bands = [] if negative else [[e for e in band if e.index not in used] for band in record.bands]
    bands = [band for band in bands if band]
    even = min([per_band] + [len(band) for band in bands]) if bands else 0
    return sets | {"stratified": [e for band in bands for e in band[:even]]}
