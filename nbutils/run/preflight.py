"""Checks before any stage runs: everything that can be known without loading weights, in a few seconds.

`check_parameters` (`nbutils.run.params`) checks names, types, choices and that paths exist; `preflight`
checks what those values mean together, for the stages about to run:

- numbers in range and consistent (``n_excerpts >= 1``; ``top_k`` and ``n_random`` at most ``n_excerpts``), and
  the collector's state for every unit against the memory available;
- the subject model's layer count, read from its config alone (``config.json``, or a GGUF file's metadata),
  against ``layers``;
- a Hugging Face model id (the subject model, a local backend's model) that is not in the local cache: the hub
  is asked whether it has it (one request, 5 s at most), so an offline machine refuses it at once;
- the corpus: a file or folder's first file opened and its first record read (binary, empty, not UTF-8, a
  JSON-lines record without ``corpus_text_field``);
- an SAE folder recognised (SAELens or sparsify) without reading its weights;
- each HTTP backend's key variable set (for api.openai.com) and its server answering ``GET /models``.

Each problem is a `UserError` whose fix is a value that passes (tests apply each fix and check it does).
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from nbutils.collect.stage import resolve_devices
from nbutils.core.config import COLLECT, EXPLAIN, SCORE
from nbutils.core.errors import UserError
from nbutils.llm.reach import check_llm_server
from nbutils.subject.heads import HEAD, OUTPUT_PROJECTIONS
from nbutils.subject.latents import sae_encoder_folders
from nbutils.subject.units import NEURON_UNITS, is_registered_kind, kind_named

# the smallest value each number may take (None: any); a parameter that may be None is checked when set
MINIMUM: dict[str, float] = {
    "n_excerpts": 1, "excerpt_len": 2, "top_k": 1, "n_random": 0, "band_size": 0, "batch_size": 1, "seed": 0,
    "shards": 1, "n_samples": 1, "temperature": 0, "max_in_flight": 1, "requests_per_minute": 1,
    "tokens_per_minute": 1, "max_prompt_tokens": 16, "per_band": 0, "judge_per_class": 1,
    "judge_items_per_request": 1, "n_boot": 0,
}  # fmt: skip


def preflight(values: dict[str, Any], stages: list[str], probe_servers: bool = True) -> None:
    """Check the effective parameters for the stage folders in ``stages`` (e.g. ``["01_collect", ...]``)."""
    check_numbers(values)
    if COLLECT in stages:
        check_hub_model(str(values["model"]), "model", probe_servers)
        check_layers(values)
        check_neurons(values)
        check_memory(values)
        check_corpus(values["corpus"], values["corpus_text_field"])
        resolve_devices(values.get("devices"), values["executor"])
        if values["units"] != NEURON_UNITS and not is_registered_kind(values["units"]):
            sae_encoder_folders(values["units"])
        if kind_named(values["units"]) == HEAD:
            check_heads(str(values["model"]))
    roles = [("explainer", EXPLAIN), ("simulator", SCORE)]
    for role, stage in roles:
        if stage in stages and values[f"{role}_backend"] == "openai":
            check_server(role, values, probe_servers)
        if stage in stages and values[f"{role}_backend"] == "local":
            check_hub_model(str(values[f"{role}_model"]), f"{role}_model", probe_servers)


def check_hub_model(spec: str, name: str, probe: bool = True) -> None:
    """A model named by a Hugging Face id must be in the local cache or on a hub that answers now: otherwise
    stage 01 (or the local backend) would spend a minute in the hub client's retries and then fail. Local
    paths, ``embedded`` and planted neurons are not asked about."""
    if spec == "embedded" or spec.startswith("planted") or Path(spec).expanduser().exists():
        return
    from huggingface_hub import constants, get_token, try_to_load_from_cache

    offline_fix = (
        f"Use -p {name}=embedded (works offline), a local model folder or .gguf file; or fetch the model once on "
        f"a machine with a network into the Hugging Face cache (HF_HOME) and copy that cache here."
    )
    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    except ValueError:  # huggingface_hub's HFValidationError: not a repository id
        raise UserError(
            f"Parameter {name}={spec!r} is neither a local file or folder nor a Hugging Face model id (owner/name).",
            f"Check the path, or use -p {name}=embedded.",
        ) from None
    where = f"a Hugging Face model id that is not in the local cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"Parameter {name}={spec!r} is {where}, and HF_HUB_OFFLINE is set.", offline_fix)
    if not probe:
        return
    request = urllib.request.Request(f"{constants.ENDPOINT}/api/models/{spec}", method="HEAD")
    token = get_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5):
            return  # the hub has it: stage 01 downloads it
    except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404):
            raise UserError(
                f"Parameter {name}={spec!r} is {where}, and the hub ({constants.ENDPOINT}) has no model of that "
                f"name that this machine may read (HTTP {e.code}).",
                "Check the id's spelling (owner/name); for a gated or private model, log in first "
                f"(huggingface-cli login); or use -p {name}=embedded.",
            ) from None
        return  # any other answer: the hub is there, and stage 01 reports what it says
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"Parameter {name}={spec!r} is {where}, and the hub ({constants.ENDPOINT}) cannot be reached ({reason}).",
            offline_fix,
        ) from None


def check_numbers(values: dict[str, Any]) -> None:
    kept = max(values["top_k"], values["n_random"])  # excerpts a unit keeps: the run must read at least that many
    for name, least in MINIMUM.items():
        value = values.get(name)
        if value is not None and value < least:
            shown = int(least) if float(least).is_integer() else least
            shown = max(shown, kept) if name == "n_excerpts" else shown
            raise UserError(
                f"Parameter {name}={value} is below its least value, {least:g}.", f"Use e.g. -p {name}={shown}."
            )
    n = values.get("n_excerpts")
    over = [name for name in ("top_k", "n_random") if n is not None and values[name] > n]
    if over:
        asked = " and ".join(f"{name}={values[name]}" for name in over)
        raise UserError(
            f"Parameter{'s' if len(over) > 1 else ''} {asked} ask{'' if len(over) > 1 else 's'} for more excerpts per "
            f"unit than the run reads (n_excerpts={n}).",
            f"Keep at most that many: {' '.join(f'-p {name}={n}' for name in over)}, or read more excerpts: "
            f"-p n_excerpts={kept}.",
        )


@functools.lru_cache(maxsize=16)
def check_heads(model: str) -> None:
    """Attention heads are read where each built-in architecture's attention output projection is: refuse a
    model whose architecture (from its config alone) has none nbutils knows, or planted neurons (no attention)."""
    arch = model_architecture(model)
    if model.startswith("planted") or (arch is not None and arch not in OUTPUT_PROJECTIONS):
        raise UserError(
            f"units=attention_heads: nbutils does not know where the attention heads of {model!r} "
            f"({'planted neurons have no attention' if arch is None else f'architecture {arch!r}'}) write; it "
            f"knows {', '.join(sorted(OUTPUT_PROJECTIONS))}.",
            "Collect MLP neurons (-p units=mlp_neurons) or SAE latents on this model, or register a unit type "
            "for its heads (docs/extensions.md).",
        )


def model_architecture(model: str) -> str | None:
    """The subject model's ``model_type`` from its config alone (None where it cannot be known so)."""
    from nbutils.subject.models import embedded_gguf_path

    if model.startswith("planted"):
        return None
    path = embedded_gguf_path() if model == "embedded" else Path(model)
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    config = path / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        return (cfg.get("text_config") or cfg).get("model_type")
    return None


def model_shape(model: str) -> tuple[int | None, int | None]:
    """(layers, MLP neurons per layer) of the subject model from its config alone (no weights); None where
    it cannot be known without loading (a Hugging Face id not in the local cache, planted neurons)."""
    from nbutils.subject.models import embedded_gguf_path

    if model.startswith("planted"):
        return None, None
    path = embedded_gguf_path() if model == "embedded" else Path(model)
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        fields = GGUFReader(path).fields

        def number(suffix: str) -> int | None:
            found = [f for name, f in fields.items() if name.endswith(suffix)]
            return int(found[0].parts[found[0].data[0]][0]) if found else None

        return number(".block_count"), number(".feed_forward_length")
    config = path / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model, local_files_only=True).to_dict()
        except Exception:  # not cached here: stage 01 downloads it and checks then
            return None, None
    cfg = cfg.get("text_config") or cfg
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    width = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim")
    if width is None and cfg.get("n_embd"):
        width = 4 * cfg["n_embd"]  # GPT-2's default MLP width
    return (int(layers) if layers is not None else None), (int(width) if width is not None else None)


def model_layers(model: str) -> int | None:
    """The subject model's number of layers from its config alone (see `model_shape`)."""
    return model_shape(model)[0]


def collector_bytes_per_unit(values: dict[str, Any]) -> int:
    """The collector's fixed-size state per unit (`nbutils.collect.collector.LayerState`), bottom excerpts
    counted as for signed units: keys, indices and per-token float32 values of every kept excerpt, plus the
    warm-up maxima."""
    from nbutils.collect.collector import CollectConfig

    cfg, t = CollectConfig(), values["excerpt_len"]
    n = values["n_excerpts"] or cfg.quantile_warmup
    kept = 2 * values["top_k"] * (12 + 4 * t) + values["n_random"] * 4 * t
    bands = len(cfg.bands) * values["band_size"] * (12 + 4 * t)
    return kept + bands + 4 * min(cfg.quantile_warmup, n) + 64


def available_memory() -> int | None:
    """Bytes of memory available now (Linux and macOS), or None where the system does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(values: dict[str, Any], available: int | None = None) -> None:
    """The collector's state for every unit of the run against the memory available (it must fit in half)."""
    layers, width = model_shape(str(values["model"]))
    neurons = values["neurons"]
    if values["units"] != NEURON_UNITS or width is None:
        return  # SAE widths come from their own cfg.json; a model not known here is checked by stage 01
    per_layer = (
        len(neurons) if isinstance(neurons, list) else min(neurons, width) if isinstance(neurons, int) else width
    )
    n_layers = len(values["layers"]) if values["layers"] is not None else layers or 1
    units, per_unit = n_layers * per_layer, collector_bytes_per_unit(values)
    available = available if available is not None else available_memory()
    if available is None or units * per_unit <= available / 2:
        return
    other = per_unit - 2 * values["top_k"] * (12 + 4 * values["excerpt_len"])
    # the fix leaves 2% of the limit spare, so memory that others take meanwhile does not refuse it again
    top_k = int((0.98 * available / 2 / units - other) // (2 * (12 + 4 * values["excerpt_len"])))
    fix = (f"Keep fewer excerpts per unit: -p top_k={top_k}" if top_k >= 1 else
           f"Collect a sample of the units: -p neurons={max(1, int(available / 2 / n_layers / per_unit))}")  # fmt: skip
    raise UserError(
        f"The collector's state would take about {units * per_unit / 2**30:.1f} GiB ({units:,} units x "
        f"{per_unit / 2**10:.0f} KiB: top_k={values['top_k']}, n_random={values['n_random']}, band_size="
        f"{values['band_size']}, excerpt_len={values['excerpt_len']}), more than half the "
        f"{available / 2**30:.1f} GiB of memory available.",
        f"{fix}, or fewer layers, or run with shards on several machines (executor=ray).",
    )


def check_layers(values: dict[str, Any]) -> None:
    layers = values["layers"]
    if layers is None:
        return
    if not layers:
        raise UserError(
            "Parameter layers=[] names no layer.", "Use e.g. -p layers=[0], or -p layers=null for every layer."
        )
    count = model_layers(str(values["model"]))
    for layer in layers:
        if layer < 0 or (count is not None and layer >= count):
            known = f"0..{count - 1}" if count is not None else "numbered from 0"
            last = f"; the last is {count - 1}" if count is not None else ""
            raise UserError(
                f"Parameter layers={layers}: layer {layer} does not exist; the model's layers are {known}{last}.",
                f"Use layers from that range, e.g. -p layers=[{0 if count is None else count - 1}].",
            )


def check_neurons(values: dict[str, Any]) -> None:
    """A list of neuron indices against the MLP's width from the model's config (when it can be known)."""
    neurons, width = values["neurons"], model_shape(str(values["model"]))[1]
    if values["units"] != NEURON_UNITS or not isinstance(neurons, list) or width is None:
        return
    bad = [n for n in neurons if not 0 <= n < width]
    if bad:
        raise UserError(
            f"Parameter neurons={neurons}: neuron {bad[0]} does not exist; each MLP layer of {values['model']} has "
            f"{width} neurons, 0..{width - 1}.",
            f"Use indices from that range, e.g. -p 'neurons=[0,{width - 1}]', or -p neurons={min(width, 64)} for a "
            "seeded sample of that many per layer.",
        )


def check_corpus(corpus: str, text_field: str) -> None:
    """Open a local corpus's first file and read its first record."""
    path = Path(corpus)
    if corpus == "embedded" or not path.exists():
        return  # the embedded corpus, or a Hugging Face dataset name
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    fix_any = "Point corpus at a .txt or .jsonl file (or a folder of them), or use -p corpus=embedded."
    if not files:
        raise UserError(f"The corpus folder {path} holds no .txt or .jsonl file.", fix_any)
    head = files[0].read_bytes()[:65536]
    if b"\0" in head:
        raise UserError(f"The corpus {files[0]} is a binary file, not text (it holds NUL bytes).", fix_any)
    if not head.strip():
        raise UserError(f"The corpus file {files[0]} is empty.", fix_any)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the 64 KiB boundary
            raise UserError(
                f"{files[0]} is not UTF-8 text (byte {e.start} is 0x{head[e.start]:02x}).",
                "Convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`, or use -p corpus=embedded.",
            ) from None
        text = head[: e.start].decode("utf-8")
    if files[0].suffix == ".jsonl":
        _check_first_record(files[0], text, text_field)


def _check_first_record(path: Path, text: str, text_field: str) -> None:
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(
            f"The first record of {path} is not valid JSON ({e.msg}).", "Fix or remove that line."
        ) from None
    if isinstance(record, dict) and text_field not in record:
        strings = [k for k, v in record.items() if isinstance(v, str)] or sorted(record)
        raise UserError(
            f"The first record of {path} has no {text_field!r} field (its fields: {sorted(record)[:8]}).",
            f"Name the field that holds the text: -p corpus_text_field={strings[0] if strings else 'text'}.",
        )


def check_server(role: str, values: dict[str, Any], probe: bool = True) -> None:
    """An HTTP backend's key (needed for api.openai.com) and each of its servers answering ``GET /models``."""
    check_llm_server(role, values[f"{role}_base_url"], values[f"{role}_api_key_env"], probe)
