"""Neuron records: the plain data classes every stage shares, and their on-disk format.

A *collection* folder, written once by `nbutils.collect` and read by `RecordStore`, looks like this
(``T`` = excerpt length, ``n`` = neurons collected in a layer, ``k`` = top/bottom excerpts kept):

    collection.json                 metadata (`CollectionMeta`): model, neuron site, layers, sizes, seed, corpus
    excerpts/tokens.npy             int32  [n_excerpts, T]  token ids of every excerpt; row = excerpt index
    excerpts/places.npy             int64  [n_excerpts, 2]  (document index, token offset in the document)
    excerpts/vocab.json             {"token id": "token text"} for every id that occurs in an excerpt
    random_sample.npy               int64  [n_random]       excerpt indices of the random sample, shared by all neurons
    layer_LLL/neurons.npy           int64  [n]              neuron indices collected in layer LLL (sorted)
    layer_LLL/stats.npy             float64 [n, 6]          mean, variance, skewness, kurtosis, max, min over all tokens
    layer_LLL/top_index.npy         int64  [n, k]           excerpts with the highest max activation, strongest first
    layer_LLL/top_acts.npy          float32 [n, k, T]       their per-token activations
    layer_LLL/bottom_index.npy      int64  [n, k]           signed sites only: excerpts with the lowest min activation
    layer_LLL/bottom_acts.npy       float32 [n, k, T]
    layer_LLL/random_acts.npy       float32 [n, n_random, T] activations on the shared random sample
    layer_LLL/band_index.npy        int64  [n, bands, m]    uniform samples of excerpts whose max lies in each band
    layer_LLL/band_acts.npy         float32 [n, bands, m, T]
    layer_LLL/band_edges.npy        float32 [n, bands + 1]  activation values at the band quantiles

An excerpt index of -1 marks an empty slot (fewer excerpts qualified than were asked for). Every array is
a plain ``.npy`` file opened memory-mapped, so loading one neuron reads only that neuron's rows. Token ids
and corpus places are kept so any excerpt can be recomputed exactly.

Also here: export to and import from the per-neuron JSON of OpenAI's neuron-explainer (Bills et al. 2023),
whose ``NeuronRecord`` holds ``neuron_id``, ``random_sample``, ``random_sample_by_quantile``,
``quantile_boundaries``, the four moments and ``most_positive_activation_records``, with every object tagged
by a ``dataclass_name`` field.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.errors import UserError

FORMAT_VERSION = 1
STAT_FIELDS = ("mean", "variance", "skewness", "kurtosis", "max", "min")
DEFAULT_BANDS = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 0.999))


# ----------------------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class NeuronId:
    """A neuron, addressed by layer and index within the layer."""

    layer: int
    neuron: int


@dataclass
class Excerpt:
    """One excerpt of text with one neuron's activation on each of its tokens."""

    tokens: list[str]
    activations: np.ndarray
    token_ids: list[int] = field(default_factory=list)
    index: int = -1
    """Row in the collection's excerpt table (-1 when unknown, e.g. imported from elsewhere)."""
    doc: int = -1
    """Index of the corpus document the excerpt starts in."""
    offset: int = -1
    """Token offset of the excerpt's first token within that document."""

    @property
    def max(self) -> float:
        return float(np.max(self.activations)) if len(self.activations) else math.nan


@dataclass
class NeuronRecord:
    """Everything collected about one neuron: its excerpts and activation statistics."""

    id: NeuronId
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


@dataclass
class CollectionMeta:
    """What a collection folder holds and how it was made (stored as collection.json)."""

    model: str
    site: dict[str, str]
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CollectionMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------------------
# Atomic file writing
# ----------------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary file in the same folder and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=_json_default).encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    atomic_write_bytes(path, buf.getvalue())


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map one array; a truncated or damaged file raises a UserError naming it."""
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise UserError(
            f"{path} is truncated or damaged ({e}).",
            f"Restore it, or delete {path.parent.parent} and rerun stage 01 (same command) to collect again.",
        ) from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries of a JSON-lines artifact (empty if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class NeuronEntries:
    """Per-neuron JSON results of a stage, one atomically written file each (``L{layer}_N{neuron}_{sign}.json``
    in ``folder``), so a killed run loses at most the neuron in progress and a retried neuron replaces its file."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, layer: int, neuron: int, sign: str) -> Path:
        return self.folder / f"L{layer}_N{neuron}_{sign}.json"

    def get(self, layer: int, neuron: int, sign: str) -> dict[str, Any] | None:
        p = self.path(layer, neuron, sign)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, entry: dict[str, Any]) -> None:
        atomic_write_json(self.path(entry["layer"], entry["neuron"], entry["sign"]), entry)

    def all(self) -> list[dict[str, Any]]:
        """Every entry, ordered by layer, neuron, sign."""
        entries = [json.loads(p.read_text()) for p in self.folder.glob("L*_N*_*.json")] if self.folder.is_dir() else []
        return sorted(entries, key=lambda e: (e["layer"], e["neuron"], e["sign"] != "positive"))


def write_jsonl(path: str | os.PathLike, entries: list[dict[str, Any]]) -> None:
    """All entries as JSON lines, written atomically."""
    atomic_write_bytes(path, "".join(json.dumps(e) + "\n" for e in entries).encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def layer_dir(root: str | os.PathLike, layer: int) -> Path:
    return Path(root) / f"layer_{layer:03d}"


# ----------------------------------------------------------------------------------------------------------
# Reading a collection
# ----------------------------------------------------------------------------------------------------------


class RecordStore:
    """Read access to a collection folder; loads one neuron at a time from memory-mapped arrays."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / "collection.json"
        if not meta_path.is_file():
            raise UserError(
                f"No finished activation collection at {self.path} (collection.json is missing).",
                "Run stage 01 (`python -m nbutils run`, or nbutils.collect.collect_activations) into that "
                "folder first, or pass the folder that stage 01 wrote.",
            )
        self.meta = CollectionMeta.from_dict(json.loads(meta_path.read_text()))
        if self.meta.format_version != FORMAT_VERSION:
            raise UserError(
                f"{meta_path} has record format {self.meta.format_version}; this nbutils reads {FORMAT_VERSION}.",
                "Re-run stage 01 with this version of nbutils.",
            )
        self.tokens = _load_npy(self.path / "excerpts" / "tokens.npy")
        self.places = _load_npy(self.path / "excerpts" / "places.npy")
        self.random_index = np.asarray(_load_npy(self.path / "random_sample.npy"))
        vocab = json.loads((self.path / "excerpts" / "vocab.json").read_text())
        self.vocab = {int(k): v for k, v in vocab.items()}
        self._layers: dict[int, dict[str, np.ndarray]] = {}

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    def _layer(self, layer: int) -> dict[str, np.ndarray]:
        if layer not in self._layers:
            if layer not in self.meta.layers:
                raise UserError(
                    f"Layer {layer} is not in the collection at {self.path}; it holds layers {self.meta.layers}.",
                    "Choose one of those layers, or collect this layer with stage 01.",
                )
            d = layer_dir(self.path, layer)
            self._layers[layer] = {p.stem: _load_npy(p) for p in sorted(d.glob("*.npy")) if not p.name.startswith(".")}
        return self._layers[layer]

    def neurons(self, layer: int) -> np.ndarray:
        """Indices of the neurons collected in a layer."""
        return np.asarray(self._layer(layer)["neurons"])

    def all_ids(self) -> Iterator[NeuronId]:
        for layer in self.layers:
            for n in self.neurons(layer):
                yield NeuronId(layer, int(n))

    def stats(self, layer: int) -> dict[str, np.ndarray]:
        """Per-neuron statistics of a layer as named columns (plus ``neuron``)."""
        arr = np.asarray(self._layer(layer)["stats"])
        out = {name: arr[:, i] for i, name in enumerate(STAT_FIELDS)}
        out["neuron"] = self.neurons(layer)
        return out

    def strength(self, layer: int) -> np.ndarray:
        """Per neuron of a layer, its max activation over its standard deviation: large for neurons that fire
        rarely and strongly (0 for a neuron that never varies)."""
        s = self.stats(layer)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s["variance"] > 0, s["max"] / np.sqrt(s["variance"]), 0.0)

    def strongest(self, layer: int, n: int) -> list[int]:
        """The ``n`` neurons of a layer with the largest `strength`, strongest first."""
        order = np.argsort(-self.strength(layer), kind="stable")[:n]
        return [int(self.neurons(layer)[i]) for i in order]

    def _row(self, layer: int, neuron: int) -> int:
        neurons = self.neurons(layer)
        row = int(np.searchsorted(neurons, neuron))
        if row >= len(neurons) or neurons[row] != neuron:
            raise UserError(
                f"Neuron {neuron} of layer {layer} was not collected (this layer holds {len(neurons)} neurons, "
                f"indices {int(neurons[0])}..{int(neurons[-1])}).",
                "Pick a collected neuron, or re-run stage 01 with that neuron included.",
            )
        return row

    def excerpt_tokens(self, index: int) -> list[str]:
        return [self.vocab[int(t)] for t in self.tokens[index]]

    def _excerpt(self, index: int, acts: np.ndarray) -> Excerpt:
        ids = [int(t) for t in self.tokens[index]]
        doc, offset = (int(x) for x in self.places[index])
        return Excerpt(
            tokens=[self.vocab[t] for t in ids],
            activations=np.array(acts, dtype=np.float32),
            token_ids=ids,
            index=int(index),
            doc=doc,
            offset=offset,
        )

    def _excerpts(self, index: np.ndarray, acts: np.ndarray) -> list[Excerpt]:
        return [self._excerpt(int(i), a) for i, a in zip(index, acts) if i >= 0]

    def record(self, layer: int, neuron: int) -> NeuronRecord:
        """Load one neuron's record, reading only its rows from disk."""
        arrays = self._layer(layer)
        row = self._row(layer, neuron)
        stats = np.asarray(arrays["stats"][row], dtype=np.float64)
        bottom = []
        if "bottom_index" in arrays:
            bottom = self._excerpts(arrays["bottom_index"][row], arrays["bottom_acts"][row])
        bands = [self._excerpts(i, a) for i, a in zip(arrays["band_index"][row], arrays["band_acts"][row])]
        return NeuronRecord(
            id=NeuronId(layer, neuron),
            top=self._excerpts(arrays["top_index"][row], arrays["top_acts"][row]),
            bottom=bottom,
            random=self._excerpts(self.random_index, arrays["random_acts"][row]),
            bands=bands,
            band_quantiles=[tuple(b) for b in self.meta.bands],
            band_edges=[float(x) for x in arrays["band_edges"][row]],
            **{name: float(stats[i]) for i, name in enumerate(STAT_FIELDS)},
        )


# ----------------------------------------------------------------------------------------------------------
# OpenAI neuron-explainer JSON
# ----------------------------------------------------------------------------------------------------------


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _oa_activation_record(e: Excerpt) -> dict[str, Any]:
    return {
        "dataclass_name": "ActivationRecord",
        "tokens": list(e.tokens),
        "activations": [float(a) for a in e.activations],
    }


def to_openai_json(record: NeuronRecord) -> dict[str, Any]:
    """Convert a record to OpenAI neuron-explainer's ``NeuronRecord`` JSON object.

    Our band edges become ``quantile_boundaries`` (activation values at the band quantiles, one more than
    the number of bands). Fields the format has no place for (bottom excerpts, token ids, corpus places)
    are left out.
    """
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {
            "dataclass_name": "NeuronId",
            "layer_index": record.id.layer,
            "neuron_index": record.id.neuron,
        },
        "random_sample": [_oa_activation_record(e) for e in record.random],
        "random_sample_by_quantile": [[_oa_activation_record(e) for e in band] for band in record.bands],
        "quantile_boundaries": [float(x) for x in record.band_edges],
        "mean": _nan_to_none(record.mean),
        "variance": _nan_to_none(record.variance),
        "skewness": _nan_to_none(record.skewness),
        "kurtosis": _nan_to_none(record.kurtosis),
        "most_positive_activation_records": [_oa_activation_record(e) for e in record.top],
    }


def _expect(obj: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("dataclass_name") != name:
        got = obj.get("dataclass_name") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(
            f"{where}: expected an object tagged dataclass_name={name!r}, found {got!r}.",
            "Pass a per-neuron NeuronRecord JSON file as written by OpenAI's neuron-explainer or by "
            "nbutils.records.export_openai.",
        )
    return obj


def _from_oa_records(items: list[Any], where: str) -> list[Excerpt]:
    out = []
    for i, item in enumerate(items or []):
        d = _expect(item, "ActivationRecord", f"{where}[{i}]")
        out.append(Excerpt(tokens=list(d["tokens"]), activations=np.array(d["activations"], dtype=np.float32)))
    return out


def from_openai_json(obj: dict[str, Any]) -> NeuronRecord:
    """Build a record from OpenAI neuron-explainer ``NeuronRecord`` JSON (the inverse of `to_openai_json`)."""
    d = _expect(obj, "NeuronRecord", "record")
    nid = _expect(d.get("neuron_id"), "NeuronId", "record.neuron_id")
    top = _from_oa_records(d.get("most_positive_activation_records"), "most_positive_activation_records")
    rand = _from_oa_records(d.get("random_sample"), "random_sample")
    bands = [
        _from_oa_records(b, f"random_sample_by_quantile[{i}]")
        for i, b in enumerate(d.get("random_sample_by_quantile") or [])
    ]
    every = [e.activations for e in top + rand + [e for b in bands for e in b]]
    flat = np.concatenate(every) if every else np.zeros(0, dtype=np.float32)

    def num(key: str) -> float:
        v = d.get(key)
        return math.nan if v is None else float(v)

    # The format does not record which quantiles its bands cover; assume ours when the count matches.
    band_q = list(DEFAULT_BANDS) if len(bands) == len(DEFAULT_BANDS) else []
    return NeuronRecord(
        id=NeuronId(int(nid["layer_index"]), int(nid["neuron_index"])),
        top=top,
        random=rand,
        bands=bands,
        band_quantiles=band_q,
        band_edges=[float(x) for x in d.get("quantile_boundaries") or []],
        mean=num("mean"),
        variance=num("variance"),
        skewness=num("skewness"),
        kurtosis=num("kurtosis"),
        max=float(flat.max()) if flat.size else math.nan,
        min=float(flat.min()) if flat.size else math.nan,
    )


def openai_record_path(root: str | os.PathLike, nid: NeuronId) -> Path:
    """Where neuron-explainer keeps a neuron's file: ``<root>/<layer>/<neuron>.json``."""
    return Path(root) / str(nid.layer) / f"{nid.neuron}.json"


def export_openai(store: RecordStore, out_dir: str | os.PathLike, ids: Iterable[NeuronId] | None = None) -> int:
    """Write neuron-explainer ``NeuronRecord`` files for the given neurons (default: all). Returns the count."""
    count = 0
    for nid in ids if ids is not None else store.all_ids():
        atomic_write_json(openai_record_path(out_dir, nid), to_openai_json(store.record(nid.layer, nid.neuron)))
        count += 1
    return count


def import_openai(path: str | os.PathLike) -> NeuronRecord:
    """Read one neuron-explainer ``NeuronRecord`` JSON file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}).", "Pass an intact NeuronRecord JSON file.") from None
    return from_openai_json(obj)


# ----------------------------------------------------------------------------------------------------------
# Splits of a record for explaining and scoring
# ----------------------------------------------------------------------------------------------------------


def _negated(excerpts: list[Excerpt]) -> list[Excerpt]:
    return [Excerpt(e.tokens, -np.asarray(e.activations), e.token_ids, e.index, e.doc, e.offset) for e in excerpts]


SPLITS = ("nbutils", "paper")
"""How `split_excerpts` deals a record's excerpts into train / calibration / valid sets."""


def split_excerpts(
    record: NeuronRecord, negative: bool = False, per_band: int = 0, split: str = "nbutils"
) -> dict[str, list[Excerpt]]:
    """Disjoint excerpt sets for explaining, calibrating and scoring one neuron.

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
    negative side of a signed neuron is explained like a positive one.
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
