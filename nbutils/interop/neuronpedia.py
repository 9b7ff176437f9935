"""Writing a run in the layout of Neuronpedia's data exports, which its importer reads (``nbutils
export-neuronpedia``).

The layout and columns follow Neuronpedia's own export script, ``utils/neuronpedia-utils/neuronpedia_utils/
export-data.py`` (github.com/hijohnnylin/neuronpedia), and the field types its database schema,
``apps/webapp/prisma/schema.prisma`` (models ``Model``, ``SourceRelease``, ``SourceSet``, ``Source``,
``Neuron``, ``Activation``, ``Explanation``, ``ExplanationScore`` and the four type tables):

    OUT/config/explanation_type.jsonl, explanation_model_type.jsonl, explanation_score_type.jsonl,
               explanation_score_model.jsonl
    OUT/<model_id>/<source_id>/model.jsonl, release.jsonl, source.jsonl, sourceset.jsonl
    OUT/<model_id>/<source_id>/features/batch-<i>.jsonl.gz        one ``Neuron`` row per unit
    OUT/<model_id>/<source_id>/activations/batch-<i>.jsonl.gz     ``Activation`` rows: top and quantile-band excerpts
    OUT/<model_id>/<source_id>/explanations/batch-<i>.jsonl.gz    one ``Explanation`` row per explained unit side
    OUT/<model_id>/<source_id>/explanation_scores/batch-<i>.jsonl.gz   ``ExplanationScore`` rows, one per number

Batches hold 1,024 units' rows, as Neuronpedia's export writes them. A *source* is one layer of one kind of
unit: its id is ``<layer>-<source set>``, as on Neuronpedia (``6-res-jb``). The source set is
``mlp-neurons`` for MLP neurons, ``attn-heads`` for attention heads (each activation row's ``dfaValues``
holds, at the strongest token, the pair write from the source it attends to most: only that source, not
every one) and ``<space>-nbutils-<width>`` for SAE latents (``res``, ``mlp``, ``att``, or
``tc`` for a transcoder); a unit's ``index`` is its index in the layer (a latent's index in its SAE). Scores
are one ``ExplanationScore`` row per scorer number (type ``nbutils-<scorer>-<column>``), with the 95% interval
and the baseline's number in ``jsonDetails``. Ids are derived from the run (a rerun writes the same ids).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from nbutils.core.errors import UserError
from nbutils.core.records import Excerpt, UnitRecord
from nbutils.core.results import ExplanationEntry
from nbutils.core.units import Key
from nbutils.view.runview import RunView, finite, scorer_value

BATCH = 1024
CREATOR = "nbutils-export"
"""The creator/author id on every row; Neuronpedia's importer replaces it with its own default creator."""
EXPLANATION_TYPE = "nbutils-oai-token-act-pair"
SPACES = {"hook_resid_pre": "res", "hook_resid_mid": "res", "hook_resid_post": "res", "hook_mlp_out": "mlp",
          "hook_attn_out": "att", "hook_normalized": "ln", "mlp.hook_post": "neurons"}  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "model"


def model_id(model_spec: str) -> str:
    """A Neuronpedia model id (lower-case letters, digits, ``-`` and ``_``) for a run's model."""
    if model_spec == "embedded":
        return "smollm2-135m-instruct"
    return _slug(Path(model_spec.rstrip("/")).name.removesuffix(".gguf"))


def source_set(unit: dict[str, Any], width: int) -> str:
    """The source set name of a run's units (module docstring)."""
    if unit.get("kind", "mlp_neuron") == "mlp_neuron":
        return "mlp-neurons"
    if unit.get("kind") == "attention_head":
        return "attn-heads"
    if unit.get("transcoder"):
        return f"tc-nbutils-{width}"
    hook = (unit.get("hooks") or [""])[0]
    space = next((s for h, s in SPACES.items() if hook.endswith(h)), "res" if re.search(r"layers\.\d+$", hook) else "x")
    return f"{space}-nbutils-{width}"


def _id(*parts: Any) -> str:
    """A stable cuid-like id (letters and digits) from what the row is about."""
    return "c" + hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------


def _neuron_row(mid: str, source: str, sset: str, rec: UnitRecord, tokens_seen: int, hook: str) -> dict[str, Any]:
    writes = rec.writes or {"promotes": [], "suppresses": []}
    frac = (rec.active / tokens_seen) if rec.active is not None and tokens_seen else 0.0
    return {
        "modelId": mid, "layer": source, "index": str(rec.id.index), "maxActApprox": finite(rec.max) or 0.0,
        "creatorId": CREATOR, "frac_nonzero": float(frac),
        "freq_hist_data_bar_heights": [], "freq_hist_data_bar_values": [],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "neuron_alignment_indices": [], "neuron_alignment_l1": [], "neuron_alignment_values": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "decoder_weights_dist": [],
        "neg_str": [t for t, _ in writes["suppresses"]], "neg_values": [float(v) for _, v in writes["suppresses"]],
        "pos_str": [t for t, _ in writes["promotes"]], "pos_values": [float(v) for _, v in writes["promotes"]],
        "sourceSetName": sset, "topkCosSimIndices": [], "topkCosSimValues": [], "vector": [], "vectorLabel": None,
        "hookName": hook, "vectorDefaultSteerStrength": 10.0, "hasVector": False,
    }  # fmt: skip


def _activation_row(
    mid: str, source: str, rec: UnitRecord, e: Excerpt, corpus: str, band: tuple[float, float] | None
) -> dict[str, Any]:  # fmt: skip
    values = [float(v) for v in np.asarray(e.activations, dtype=np.float64)]
    top = int(np.argmax(values))
    dfa: list[float] = []
    if e.looks is not None:  # a head: what it writes into the strongest token from the source it attends to most
        dfa = [0.0] * len(values)
        dfa[int(e.looks.source[top])] = float(e.looks.write[top])
    return {
        "id": _id(mid, source, rec.id.index, e.index, band), "modelId": mid, "layer": source,
        "index": str(rec.id.index), "creatorId": CREATOR, "dataSource": corpus, "tokens": list(e.tokens),
        "maxValue": values[top], "minValue": float(min(values)), "values": values, "maxValueTokenIndex": top,
        "dfaValues": dfa, "dfaMaxValue": max(dfa) if dfa else None, "dfaTargetIndex": top if dfa else None,
        "binContains": None if band is None else float(band[1] - band[0]),
        "binMin": None if band is None else float(band[0]), "binMax": None if band is None else float(band[1]),
    }  # fmt: skip


def _explanation_row(mid: str, source: str, key: Key, entry: ExplanationEntry, explainer: str) -> dict[str, Any]:
    text = entry.explanation + (" (negative side)" if key[2] == "negative" else "")
    return {
        "id": _id(mid, source, *key, entry.explanation), "modelId": mid, "layer": source, "index": str(key[1]),
        "authorId": CREATOR, "description": text, "embedding": None, "typeName": EXPLANATION_TYPE,
        "explanationModelName": explainer, "umap_x": None, "umap_y": None, "umap_cluster": None,
        "umap_log_feature_sparsity": None,
    }  # fmt: skip


def _score_rows(view: RunView, key: Key, explanation_id: str, simulator: str) -> list[dict[str, Any]]:
    result = view.scores.get(key)
    if not result:
        return []
    rows = []
    for sc in view.scorers:
        for i, col in enumerate(sc.columns):
            value = scorer_value(result, sc, i)
            if value is None:
                continue
            base = scorer_value(result.baseline, sc, i)
            rows.append({
                "id": _id(explanation_id, sc.name, col.label), "initiatedByUserId": CREATOR, "value": value,
                "explanationId": explanation_id, "explanationScoreTypeName": score_type(sc.name, col.label),
                "explanationScoreModelName": simulator,
                "jsonDetails": json.dumps({"scorer": sc.name, "number": col.label, "token_lookup_baseline": base}),
            })  # fmt: skip
    return rows


def score_type(scorer: str, label: str) -> str:
    return f"nbutils-{scorer}-{_slug(label)}"


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]], compress: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, compresslevel=5))
    else:
        path.write_bytes(data)
    return path


def _batches(items: list[Any]) -> Iterator[tuple[int, list[Any]]]:
    for b, start in enumerate(range(0, len(items), BATCH)):
        yield b, items[start : start + BATCH]


def export_neuronpedia(
    run_dir: str | Path, out_dir: str | Path, model_name: str | None = None, set_name: str | None = None
) -> list[Path]:
    """Write a run (neurons or SAE latents) in Neuronpedia's export layout (module docstring); returns the
    files written. Units come from the run's collection; explanations and scores where stages 02-03 ran."""
    view = RunView.open(run_dir)
    meta, out = view.store.meta, Path(out_dir)
    mid = model_name or model_id(meta.model)
    sset = set_name or source_set(meta.unit, meta.neurons_per_layer)
    now = datetime.now(timezone.utc).isoformat()
    if not view.explanations:
        raise UserError(f"{run_dir} has no explanations (stage 02) to export.", "Run stage 02 first, then export.")
    explainer = _slug(str(_stage_param(run_dir, "explainer_model") or "unknown"))
    simulator = _slug(str(_stage_param(run_dir, "simulator_model") or "unknown"))
    written = _write_config(out, view, explainer, simulator, now)
    hooks = meta.unit.get("hooks") or []
    explained: dict[int, list[Key]] = {}  # from the explanation column: no entry is read yet
    for k in view.explained_keys():
        explained.setdefault(k[0], []).append(k)
    for layer in meta.layers:
        source = f"{layer}-{sset}"
        folder = out / mid / source
        hook = next((h for h in hooks if re.search(rf"(^|\.){layer}(\.|$)", h)), f"blocks.{layer}.mlp.hook_post")
        written += _write_source(folder, view, mid, source, sset, layer, explainer, now)
        keys = sorted(explained.get(layer, []))
        units = sorted({k[1] for k in keys})
        for b, chunk in _batches(units):
            recs = [view.record(layer, i) for i in chunk]
            features = [_neuron_row(mid, source, sset, r, meta.tokens_seen, hook) for r in recs]
            acts = [
                _activation_row(mid, source, r, e, meta.corpus, band)
                for r in recs
                for e, band in [(e, None) for e in r.top]
                + [(e, tuple(q)) for q, excerpts in zip(r.band_quantiles, r.bands) for e in excerpts]
            ]
            written.append(_write_jsonl(folder / "features" / f"batch-{b}.jsonl", features, True))
            written.append(_write_jsonl(folder / "activations" / f"batch-{b}.jsonl", acts, True))
        rows = [_explanation_row(mid, source, k, view.explanations[k], explainer) for k in keys]
        scores = [s for k, row in zip(keys, rows) for s in _score_rows(view, k, row["id"], simulator)]
        for b, chunk in _batches(rows):
            written.append(_write_jsonl(folder / "explanations" / f"batch-{b}.jsonl", chunk, True))
        for b, chunk in _batches(scores):
            written.append(_write_jsonl(folder / "explanation_scores" / f"batch-{b}.jsonl", chunk, True))
    return written


def _stage_param(run_dir: str | Path, name: str) -> Any:
    """A parameter of the run as its manifest recorded it (None if absent)."""
    for manifest in sorted(Path(run_dir).glob("*/manifest.json")):
        params = json.loads(manifest.read_text()).get("parameters", {})
        if name in params:
            return params[name]
    return None


def _write_config(out: Path, view: RunView, explainer: str, simulator: str, now: str) -> list[Path]:
    cfg = out / "config"
    common = {"creatorName": "nbutils", "createdAt": now, "updatedAt": now}
    types = [{"name": EXPLANATION_TYPE, "displayName": "nbutils token-activation explanation",
              "description": "One phrase completing 'the main thing this unit does is find ...', written from the "
              "unit's top and quantile-band excerpts (Bills et al. 2023)", "featured": True, "isAttention": False,
              "settings": None, "url": None, "creatorId": CREATOR, **common}]  # fmt: skip
    models = [{"name": explainer, "displayName": explainer, "description": "explainer model of an nbutils run",
               "featured": True, "openRouterModelId": None, "url": None, **common}]  # fmt: skip
    score_types = [
        {"name": score_type(sc.name, col.label), "displayName": f"{sc.name}: {col.label}",
         "description": f"nbutils scorer {sc.name!r}, number {col.label!r}", "featured": True, "isAttention": False,
         "scoreDescription": None, "scorerModel": simulator, "settings": None, "url": None, "creatorId": CREATOR,
         **common}
        for sc in view.scorers for col in sc.columns
    ]  # fmt: skip
    score_models = [{"name": simulator, "displayName": simulator, "description": "simulator/judge model of an "
                     "nbutils run", "featured": True, "openRouterModelId": None, "url": None, **common}]  # fmt: skip
    return [
        _write_jsonl(cfg / "explanation_type.jsonl", types, False),
        _write_jsonl(cfg / "explanation_model_type.jsonl", models, False),
        _write_jsonl(cfg / "explanation_score_type.jsonl", score_types, False),
        _write_jsonl(cfg / "explanation_score_model.jsonl", score_models, False),
    ]


def _write_source(
    folder: Path, view: RunView, mid: str, source: str, sset: str, layer: int, explainer: str, now: str
) -> list[Path]:  # fmt: skip
    meta = view.store.meta
    unit = meta.unit
    heads = unit.get("kind") == "attention_head"
    latents = unit.get("kind", "mlp_neuron") not in ("mlp_neuron", "attention_head")
    what = (
        "SAE latents"
        if latents
        else "attention heads (value: the norm of each head's write)"
        if heads
        else "MLP neurons"
    )
    saelens = None
    if latents and unit.get("format") == "saelens" and Path(unit["path"], "cfg.json").is_file():
        saelens = json.loads(Path(unit["path"], "cfg.json").read_text())
    release = f"nbutils-{mid}-{sset}"
    model = {
        "id": mid, "displayNameShort": mid, "displayName": meta.model, "creatorId": CREATOR, "tlensId": None,
        "openRouterId": None, "dimension": None, "thinking": False, "visibility": "PRIVATE",
        "defaultSourceSetName": None, "defaultSourceId": None, "defaultGraphSourceSetName": None,
        "inferenceEnabled": False, "instruct": False, "layers": meta.n_model_layers,
        "neuronsPerLayer": meta.neurons_per_layer, "createdAt": now, "owner": "nbutils", "updatedAt": now,
        "website": None,
    }  # fmt: skip
    rel = {
        "name": release, "visibility": "PRIVATE", "isNewUi": False, "featured": False,
        "description": f"nbutils run: {sset} of {meta.model}, explained by {explainer}", "descriptionShort": None,
        "urls": [], "creatorEmail": None, "creatorName": "nbutils", "creatorNameShort": None, "creatorId": CREATOR,
        "defaultSourceSetName": sset, "defaultSourceId": source, "defaultUmapSourceIds": [], "createdAt": now,
    }  # fmt: skip
    sourceset = {
        "modelId": mid, "name": sset, "hasDashboards": True, "allowInferenceSearch": False, "visibility": "PRIVATE",
        "description": what, "type": "sae" if latents else "neurons",
        "creatorName": "nbutils", "urls": [], "creatorEmail": None, "creatorId": CREATOR, "releaseName": release,
        "hasGraphs": False, "graphEnabled": False, "similarityMatrixEnabled": False, "defaultOfModelId": None,
        "defaultGraphModelId": None, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": heads,
        "showCorrelated": False, "showHeadAttribution": False, "showUmap": False, "createdAt": now,
    }  # fmt: skip
    src = {
        "id": source, "modelId": mid, "hasDashboards": True, "inferenceEnabled": False, "saelensConfig": saelens,
        "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PRIVATE",
        "defaultOfModelId": None, "setName": sset, "creatorId": CREATOR, "hasUmap": False,
        "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": meta.n_excerpts,
        "num_tokens_in_prompt": meta.excerpt_len, "dataset": meta.corpus,
        "notes": f"layer {layer}; exported by nbutils", "cosSimMatchModelId": None, "cosSimMatchSourceId": None,
        "createdAt": now,
    }  # fmt: skip
    return [
        _write_jsonl(folder / "model.jsonl", [model], False),
        _write_jsonl(folder / "release.jsonl", [rel], False),
        _write_jsonl(folder / "sourceset.jsonl", [sourceset], False),
        _write_jsonl(folder / "source.jsonl", [src], False),
    ]
