"""Checking user parameters against the schema (`nbutils.core.config.RunConfig`) before anything runs.

`check_parameters` validates a whole set of values: unknown names (with "did you mean"), types
(``-p n_excerpts=abc`` is refused), choices (backends and scorers from their registries), the form of
``explain_neurons``, and paths, which are resolved from the folder the command runs in and must exist when
they are clearly paths. `PRESETS` are named sets of values (``nbutils run --preset quick``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nbutils.core.checks import conforms, describe, did_you_mean, shown
from nbutils.core.config import RunConfig, defaults, hints, rule_threshold, schema
from nbutils.core.errors import UserError
from nbutils.core.registry import GROUPS, Registry
from nbutils.explain.contract import EXPLAINERS, explainer_name
from nbutils.llm.contract import BACKENDS
from nbutils.score.contract import SCORERS
from nbutils.subject.units import NEURON_UNITS, UNIT_TYPES, is_registered_kind, kind_named

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "n_excerpts": 512,
        "layers": [0, 15, 29],
        "explain_neurons": "strongest:1",
        "judge_per_class": 5,
        "n_boot": 200,
    },
}
"""Named sets of values (``nbutils run --preset quick``); command-line values win over them. ``quick``: a first
look in a few minutes (see README for the measured time)."""

OWNED = ("output_dir", "run_dir", "collection_dir", "explanation_dir", "score_dir")
"""Folders the chain sets itself: a stage's own output folder, the run folder and the earlier stages' folders."""


# ----------------------------------------------------------------------------------------------------------
# Checking a set of values
# ----------------------------------------------------------------------------------------------------------


def check_names(params: dict[str, Any]) -> None:
    """Refuse names the chain owns or no stage takes (with the closest real name)."""
    owned = sorted(set(params) & set(OWNED))
    if owned:
        raise UserError(
            f"Parameter(s) {owned} are set by the pipeline itself (each stage's folder inside the run folder).",
            "Leave them out; choose where runs go with --output-root and --run-id.",
        )
    known = list(schema())
    for name in params:
        if name not in known:
            raise UserError(
                f"Unknown parameter {name!r}: no stage takes it.{did_you_mean(name, known)}",
                "See every parameter with `nbutils run --list-params`.",
            )


def fold_extension_settings(params: dict[str, Any]) -> dict[str, Any]:
    """Extension settings gathered into ``extension_settings`` (``{role: {name: {setting: value}}}``) from
    the forms a user writes: ``-p scorer.keyword.min_count=2`` (a dotted name), a YAML section
    ``scorer: {keyword: {min_count: 2}}`` (a role's name holding a mapping), or ``extension_settings`` itself;
    a dotted name wins over the same setting in a section."""
    out = {k: v for k, v in params.items() if not _settings_form(k, v)}
    folded: dict[str, dict[str, dict[str, Any]]] = {}
    given = params.get("extension_settings") or {}
    if not isinstance(given, dict):  # refused with the other type errors, in their words
        return {**out, "extension_settings": given}
    sections = [(role, v) for role, v in params.items() if role in GROUPS and isinstance(v, dict)]
    for role, names in [*given.items(), *sections]:
        if not isinstance(names, dict) or not all(isinstance(v, dict) for v in names.values()):
            raise UserError(
                f"The settings section {role!r} must map each {role} name to its settings, got {names!r}.",
                f"Write it as {role}: {{<name>: {{<setting>: <value>}}}}, or -p {role}.<name>.<setting>=<value>.",
            )
        for name, values in names.items():
            folded.setdefault(role, {}).setdefault(name, {}).update(values)
    for key, value in params.items():
        if "." in key:
            role, _, rest = key.partition(".")
            name, _, setting = rest.partition(".")
            if role not in GROUPS or not name or not setting or "." in setting:
                raise UserError(
                    f"Parameter {key!r} is not of the form <role>.<name>.<setting> with a role among {list(GROUPS)}.",
                    "Write e.g. -p scorer.keyword.min_count=2 (the scorer keyword's setting min_count).",
                )
            folded.setdefault(role, {}).setdefault(name, {})[setting] = value
    if folded or "extension_settings" in params:
        out["extension_settings"] = folded
    return out


def _settings_form(key: str, value: Any) -> bool:
    return "." in key or key == "extension_settings" or (key in GROUPS and isinstance(value, dict))


def registries() -> dict[str, Registry]:
    """Each role's registry (`nbutils.core.registry.GROUPS`)."""
    return {"explainer": EXPLAINERS, "scorer": SCORERS, "backend": BACKENDS, "unit_type": UNIT_TYPES}


def check_extension_settings(values: dict[str, Any]) -> None:
    """Each extension's settings checked against its declared dataclass, for an extension the run uses."""
    used = {
        "explainer": {explainer_name(RunConfig.pick(values))},
        "scorer": set(values["scorers"]) | {n for n in ("ablation", "intervention") if values[n]},
        "backend": {values["explainer_backend"], values["simulator_backend"]},
        "unit_type": {kind_named(values["units"])},
    }
    for role, names in values["extension_settings"].items():
        if role not in GROUPS:
            raise UserError(
                f"extension_settings has a section {role!r}, which is no role.{did_you_mean(role, list(GROUPS))}",
                f"Roles: {', '.join(GROUPS)}.",
            )
        registry = registries()[role]
        for name, given in names.items():
            if name not in registry:
                raise registry.unknown(name)
            registry.settings(name, {name: given})  # checked: names, types, the dataclass's own checks
            if name not in used[role]:
                raise UserError(
                    f"Settings were given for the {registry.what} {name!r}, which this run does not use.",
                    f"Use it (e.g. -p {_use_hint(role, name)}), or leave out its settings.",
                )


def _use_hint(role: str, name: str) -> str:
    return {"explainer": f"explainer={name}", "scorer": f"'scorers=[simulation, {name}]'",
            "backend": f"simulator_backend={name}", "unit_type": f"units={name}"}[role]  # fmt: skip


def check_parameters(params: dict[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """Validate user values (names, types, choices, paths) and return every parameter's effective value:
    defaults filled in, integers given for numbers turned into floats, relative paths made absolute from
    ``cwd`` (default: the current folder), extension settings gathered (`fold_extension_settings`) and checked.
    Raises `UserError` naming the first problem and its fix."""
    params = fold_extension_settings(params)
    check_names(params)
    tps = hints()
    out = {**defaults(), **params}
    for name, value in params.items():
        if not conforms(value, tps[name]):
            meta = schema()[name].metadata
            example = meta.get("example", _yaml(defaults()[name]))
            raise UserError(
                f"Parameter {name}={value!r}: expected {describe(tps[name])}, got {shown(value)}.",
                f"Give it as YAML, e.g. -p '{name}={example}' ({meta['help']}).",
            )
        if tps[name] is float and isinstance(value, int):
            out[name] = float(value)
    for name, f in schema().items():
        spec = f.metadata.get("choices")
        _check_choice(name, out[name], choices(spec), registries_by_choice().get(spec))
    _check_explain_neurons(out["explain_neurons"])
    rule_threshold(out["llm_when"])
    check_extension_settings(out)
    _check_output_scores(out)
    base = Path(cwd or os.getcwd())
    out["model"] = resolve_model(out["model"], base, "model")
    out["corpus"] = resolve_corpus(out["corpus"], base)
    if out["units"] != NEURON_UNITS and not is_registered_kind(out["units"]):  # an SAE folder
        out["units"] = _absolute(out["units"], base, "SAE folder (units)", True)
    for name, backend in (("explainer_model", "explainer_backend"), ("simulator_model", "simulator_backend")):
        if out[backend] == "local":
            out[name] = resolve_model(out[name], base, name)
    return out


def _check_output_scores(values: dict[str, Any]) -> None:
    """Ablation and intervention run the subject model's language-model head, which planted neurons lack."""
    asked = [n for n in ("ablation", "intervention") if values[n] or n in values["scorers"]]
    if asked and str(values["model"]).startswith("planted"):
        raise UserError(
            f"{' and '.join(asked)} scores compare the model's next-token predictions, and the planted model "
            "predicts no next token.",
            f"For model={values['model']}, set {' and '.join(f'{n}=false' for n in asked)} and leave them out of scorers.",
        )


def registries_by_choice() -> dict[str, Registry]:
    """The registries a schema field's ``choices`` may name."""
    return {"backends": BACKENDS, "scorers": SCORERS, "explainers": EXPLAINERS}


def choices(spec: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A field's allowed values: listed in the schema, or the names in a registry ("backends", "scorers" ...)."""
    if isinstance(spec, str):
        return tuple(registries_by_choice()[spec])
    return spec


def _yaml(value: Any) -> str:
    import json

    return "null" if value is None else json.dumps(value).replace('"', "") if not isinstance(value, str) else value


def _check_choice(name: str, value: Any, choices: tuple[str, ...] | None, registry: Registry | None = None) -> None:
    if not choices:
        return
    for v in value if isinstance(value, list) else [value]:
        if v not in choices:
            fix = f"Use one of those, e.g. -p {name}={choices[0]}."
            if registry is not None:  # where each name comes from, and where more could
                fix = f"Use one of: {registry.sources()}. {registry.where()}"
            raise UserError(
                f"Parameter {name}={v!r} is not one of {', '.join(map(repr, choices))}.{did_you_mean(v, choices)}",
                fix,
            )


def _check_explain_neurons(value: Any) -> None:
    fix = (
        'Write e.g. -p explain_neurons=4, -p explain_neurons=strongest:5, or -p "explain_neurons=[[0, 12], [29, 700]]".'
    )
    if isinstance(value, str):
        kind, _, n = value.partition(":")
        if value != "all" and not (kind == "strongest" and n.isdigit() and int(n) > 0):
            raise UserError(f'explain_neurons={value!r} is not "all" or "strongest:N" (N > 0).', fix)
    elif isinstance(value, int) and value < 1:
        raise UserError(f"explain_neurons={value} is not positive.", fix)
    elif isinstance(value, list) and any(len(pair) != 2 for pair in value):
        raise UserError(f"explain_neurons={value!r} holds entries that are not [layer, neuron] pairs.", fix)


def looks_like_path(spec: str, suffixes: tuple[str, ...]) -> bool:
    """A spec that can only be a local path: starts with . / ~, ends with a file suffix, or has two or more
    slashes (Hugging Face ids have one)."""
    return spec.startswith((".", "/", "~")) or spec.endswith(suffixes) or spec.count("/") > 1 or "\\" in spec


def _absolute(spec: str, base: Path, what: str, must_exist: bool) -> str:
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else (base / path)
    if must_exist and not path.exists():
        raise UserError(
            f"The {what} {spec!r} does not exist (looked for {path.resolve()}; relative paths are taken from the "
            "folder the command runs in).",
            "Check the path, or run the command from the folder the path is relative to.",
        )
    return str(path.resolve())


def resolve_model(spec: str, base: Path, name: str = "model") -> str:
    """A model spec with a local path made absolute; a path that does not exist is refused."""
    if spec in ("embedded", "planted"):
        return spec
    if spec.startswith("planted:"):
        return "planted:" + _absolute(spec[len("planted:") :], base, f"planted-neuron file of {name}", True)
    if looks_like_path(spec, (".gguf", ".safetensors", ".bin")):
        return _absolute(spec, base, f"{name} path", True)
    if (base / spec).exists():
        return _absolute(spec, base, name, True)
    return spec  # a Hugging Face id


def resolve_corpus(spec: str, base: Path) -> str:
    """A corpus spec with a local path made absolute; a path that does not exist is refused."""
    if spec == "embedded":
        return spec
    if looks_like_path(spec, (".txt", ".jsonl")) or (base / spec).exists():
        return _absolute(spec, base, "corpus", True)
    return spec  # a Hugging Face dataset name
