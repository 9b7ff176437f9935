"""OpenAI's neuron-explainer JSON formats (Bills et al. 2023), in both directions.

- ``NeuronRecord`` (one file per neuron, ``<layer>/<neuron>.json``): ``neuron_id``, ``random_sample``,
  ``random_sample_by_quantile``, ``quantile_boundaries``, the four moments and
  ``most_positive_activation_records``, every object tagged by a ``dataclass_name`` field.
- ``NeuronSimulationResults`` (``<layer>/<neuron>.jsonl``): scored explanations with per-excerpt simulations.

A unit that is not an MLP neuron maps to ``layer_index`` = its layer and ``neuron_index`` = its index in the
layer (the collection's ``collection.json`` says what the units are).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.io import atomic_write_json
from nbutils.core.records import DEFAULT_BANDS, Excerpt, RecordStore, UnitRecord
from nbutils.core.units import UnitId
from nbutils.llm.prompts import LABELS
from nbutils.score.contract import UnitDetails
from nbutils.score.metrics import correlation, score
from nbutils.score.simulation import SimulatedExcerpt, Simulation

# ----------------------------------------------------------------------------------------------------------
# NeuronRecord
# ----------------------------------------------------------------------------------------------------------


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _oa_activation_record(e: Excerpt) -> dict[str, Any]:
    return {
        "dataclass_name": "ActivationRecord",
        "tokens": list(e.tokens),
        "activations": [float(a) for a in e.activations],
    }


def to_openai_json(record: UnitRecord) -> dict[str, Any]:
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
            "nbutils.interop.neuron_explainer.export_openai.",
        )
    return obj


def _from_oa_records(items: list[Any], where: str) -> list[Excerpt]:
    out = []
    for i, item in enumerate(items or []):
        d = _expect(item, "ActivationRecord", f"{where}[{i}]")
        out.append(Excerpt(tokens=list(d["tokens"]), activations=np.array(d["activations"], dtype=np.float32)))
    return out


def from_openai_json(obj: dict[str, Any]) -> UnitRecord:
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
    return UnitRecord(
        id=UnitId(int(nid["layer_index"]), int(nid["neuron_index"])),
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


def openai_record_path(root: str | os.PathLike, nid: UnitId) -> Path:
    """Where neuron-explainer keeps a neuron's file: ``<root>/<layer>/<neuron>.json``."""
    return Path(root) / str(nid.layer) / f"{nid.neuron}.json"


def export_openai(store: RecordStore, out_dir: str | os.PathLike, ids: Iterable[UnitId] | None = None) -> int:
    """Write neuron-explainer ``NeuronRecord`` files for the given neurons (default: all). Returns the count.

    One unit in memory at a time; each file compact JSON written atomically but not fsynced (an export is
    written again from the collection if a crash cut it short)."""
    count = 0
    for nid in ids if ids is not None else store.all_ids():
        record = to_openai_json(store.record(nid.layer, nid.neuron))
        atomic_write_json(openai_record_path(out_dir, nid), record, compact=True, durable=False)
        count += 1
    return count


def import_openai(path: str | os.PathLike) -> UnitRecord:
    """Read one neuron-explainer ``NeuronRecord`` JSON file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}).", "Pass an intact NeuronRecord JSON file.") from None
    return from_openai_json(obj)


# ----------------------------------------------------------------------------------------------------------
# NeuronSimulationResults
# ----------------------------------------------------------------------------------------------------------


def _distribution(x: SimulatedExcerpt, labels: list[float]) -> dict[str, Any]:
    """An excerpt's per-token distributions in neuron-explainer's fields: as stored, or, for a run that kept
    only expected values (``keep_distributions=False``), a point mass at each token's expected value (the
    expected activations are then exact; the spread over labels is what is lost)."""
    if x.distribution is None:
        return {
            "distribution_values": [[v] for v in x.expected],
            "distribution_probabilities": [[1.0] for _ in x.expected],
        }
    return {
        "distribution_values": x.distribution_values or [labels for _ in x.tokens],
        "distribution_probabilities": x.distribution,
    }


def to_openai_results(details: UnitDetails) -> dict[str, Any]:
    """A unit side's saved simulation (stage 03's saved details, `RunView.simulation`) as neuron-explainer's
    ``NeuronSimulationResults`` (the valid excerpts, one explanation).

    ``expected_activations`` stay on the simulator's 0..10 scale (``activation_scale`` says so) and
    ``ev_correlation_score`` is computed from them. ``rsquared_score`` and ``absolute_dev_explained_score``
    are computed after the record's linear calibration (`nbutils.score.metrics.calibrate`), per excerpt and pooled,
    as stage 03 does; they are null when the record has no calibration (e.g. an imported one). Per-token
    ``distribution_values`` are written as stored (imported records keep their own), else the labels 0..10;
    a run with ``keep_distributions=False`` gives each token a point mass at its expected value.
    """
    sim: Simulation = details.of("simulation") or Simulation()
    valid = sim.valid()
    labels = [float(v) for v in sim.labels]
    line = sim.calibration

    def scores(t: list[float], p: list[float]) -> dict[str, float | None]:
        out = {"ev_correlation_score": correlation(np.asarray(t), np.asarray(p)).value}
        if line is None:
            return out | {"rsquared_score": None, "absolute_dev_explained_score": None}
        s = score([np.asarray(t)], [np.asarray(p)], calibration=line, n_boot=0)
        return out | {
            "rsquared_score": s.rsquared.value,
            "absolute_dev_explained_score": s.absolute_dev_explained.value,
        }

    seqs = [
        {
            "dataclass_name": "ScoredSequenceSimulation",
            "simulation": {
                "dataclass_name": "SequenceSimulation",
                "tokens": x.tokens,
                "expected_activations": x.expected,
                "activation_scale": "simulated_normalized_activations",
                **_distribution(x, labels),
                "uncalibrated_simulation": None,
            },
            "true_activations": x.true,
            **scores(x.true, x.expected),
        }
        for x in valid
    ]
    pooled = scores(sum((x.true for x in valid), []), sum((x.expected for x in valid), []))
    nid = {"dataclass_name": "NeuronId", "layer_index": details.layer, "neuron_index": details.neuron}
    return {
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": nid,
        "scored_explanations": [
            {
                "dataclass_name": "ScoredExplanation",
                "explanation": details.explanation,
                "scored_simulation": {
                    "dataclass_name": "ScoredSimulation",
                    "scored_sequence_simulations": seqs,
                    **pooled,
                },
            }
        ],
    }


def from_openai_results(obj: dict[str, Any]) -> list[UnitDetails]:
    """Simulation details (what stage 03 saves, `UnitDetails` with a `Simulation`) from a
    ``NeuronSimulationResults`` object, one per explanation.

    Each token keeps its own ``distribution_values`` (floats; neuron-explainer stores, per token, the values
    its simulator saw among the top log-probabilities, so they differ from token to token) beside its
    ``distribution_probabilities``."""
    if not isinstance(obj, dict) or obj.get("dataclass_name") != "NeuronSimulationResults":
        raise UserError(
            "Expected a neuron-explainer NeuronSimulationResults object (dataclass_name='NeuronSimulationResults').",
            "Pass a results file written by neuron-explainer or by nbutils.interop.neuron_explainer.to_openai_results.",
        )
    nid = obj["neuron_id"]
    out = []
    for scored in obj["scored_explanations"]:
        seqs = scored["scored_simulation"]["scored_sequence_simulations"]
        excerpts = [
            SimulatedExcerpt(
                "valid",
                -1,
                s["simulation"]["tokens"],
                s["true_activations"],
                s["simulation"]["expected_activations"],
                s["simulation"]["distribution_probabilities"],
                [[float(v) for v in vs] for vs in s["simulation"]["distribution_values"]],
            )  # fmt: skip
            for s in seqs
        ]
        simulation = Simulation([int(x) for x in LABELS], None, excerpts)
        layer, neuron = int(nid["layer_index"]), int(nid["neuron_index"])
        out.append(UnitDetails(layer, neuron, "positive", scored["explanation"], {"simulation": simulation}))
    return out


def export_openai_results(details: UnitDetails, out_root: str | Path) -> Path:
    """Write ``<out_root>/<layer>/<neuron>.jsonl`` (neuron-explainer's results layout) from a unit side's
    scorer details (`nbutils.view.runview.RunView.simulation`)."""
    path = Path(out_root) / str(details.layer) / f"{details.neuron}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_openai_results(details)) + "\n")
    return path
