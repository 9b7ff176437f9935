"""Every parameter of the stage chain, with its type, its main-job default and its help, in one place.

`RunConfig` is the schema: one typed field per parameter a user can set (`nbutils run -p name=value`, a YAML
file, or a preset); its field metadata says which stages take it, its help, and its choices. Its defaults
are the main job's (``nbutils run`` with no arguments). The stage functions take a `RunConfig`; the stage
notebooks' parameters cells hold the same names with smaller values sized for CI and JupyterLab (a test
checks that they declare exactly the schema's names, with its types), and build one with `RunConfig.pick`.
Folders the chain passes between stages (``output_dir``, ``collection_dir`` ...) are not parameters: the
chain owns them. Checking user values against this schema is `nbutils.run.params`.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nbutils.core.errors import UserError

COLLECT, EXPLAIN, SCORE, INSPECT = "01_collect", "02_explain", "03_score", "04_inspect"


def _param(default: Any, stages: tuple[str, ...], help: str, **extra: Any) -> Any:
    """A parameter: its default (the main job's value), the stages that take it, its help; ``how=True`` marks
    one that says how a run is carried out, shown or accounted, not what it computes (left out of the run id:
    changing it continues the same run folder instead of collecting everything again); ``when_set=True``
    one added after runs existed: part of the run id, and of a stage's recorded parameters, only when it
    differs from its default (so every earlier run keeps its id and its records)."""
    meta = {"stages": stages, "help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


BOTH = (EXPLAIN, SCORE)
WORK = (COLLECT, EXPLAIN, SCORE)


@dataclass
class RunConfig:
    """The chain's parameters and the main job's values (see the module docstring)."""

    # stage 01: collect
    model: str = _param(
        "embedded", (COLLECT,), '"embedded", a Hugging Face id, a model folder, a .gguf file, or "planted[:file.py]"',
    )  # fmt: skip
    corpus: str = _param(
        "embedded", (COLLECT,), '"embedded", a .txt/.jsonl file or folder, or a Hugging Face dataset name'
    )
    corpus_text_field: str = _param(
        "text", (COLLECT,), "the field of .jsonl objects (or dataset rows) holding the text"
    )
    layers: list[int] | None = _param([0, 7, 15, 22, 29], (COLLECT,), "layer indices, or None for every layer")
    neurons: int | list[int] | None = _param(
        None, (COLLECT,), "None for every neuron, an int for a seeded sample per layer, or a list of indices",
        example="[0, 1, 2]",
    )  # fmt: skip
    site: dict[str, str | bool] | None = _param(
        None, (COLLECT,), "None: the built-in neuron site of the architecture; else {module: ..., side: ..., signed: ...}",
        example='{module: "model.layers.{layer}.mlp.down_proj", side: input, signed: true}',
    )  # fmt: skip
    units: str = _param(
        "mlp_neurons", (COLLECT,), '"mlp_neurons", "attention_heads" (each head of the chosen layers; its value '
        "is the norm of what it writes), a folder holding an SAE or transcoder (SAELens or sparsify format): its "
        "latents are the units, at the layers of its hook points (layers is then not used), or the kind of another "
        "registered unit type",
        example="outputs/sae-l15",
    )  # fmt: skip
    n_excerpts: int | None = _param(4000, (COLLECT,), "how many excerpts to read (None for all)")
    excerpt_len: int = _param(64, (COLLECT,), "tokens per excerpt")
    top_k: int = _param(20, (COLLECT,), "top (and, for gated MLPs, bottom) excerpts kept per neuron")
    n_random: int = _param(20, (COLLECT,), "size of the random sample shared by all neurons")
    band_size: int = _param(5, (COLLECT,), "excerpts sampled per quantile band")
    batch_size: int = _param(32, (COLLECT,), "excerpts per forward pass")
    checkpoint_every_s: float = _param(
        120.0, (COLLECT,), "seconds between checkpoints of the collection; Ctrl-C checkpoints too (the batch in "
        "progress is finished first, so nothing is redone)", how=True,
    )  # fmt: skip
    seed: int = _param(0, (COLLECT, EXPLAIN, SCORE), "seed for every random choice")
    executor: str = _param(
        "local", WORK, '"local" (this process) or "ray" (shards as Ray tasks; pip install "nbutils[ray]")',
        choices=("local", "ray"), how=True,
    )  # fmt: skip
    ray_address: str | None = _param(
        None, WORK, "with executor=ray: the cluster's address; None starts a Ray instance on this machine",
        example="auto", how=True,
    )  # fmt: skip
    shards: int | None = _param(
        None, WORK, "with executor=ray: shards per stage (None: twice the cluster's GPUs, or CPUs without GPUs)",
        example="8", how=True,
    )  # fmt: skip
    devices: str | list[str] | None = _param(
        None, (COLLECT,), 'stage 01 on several devices of this machine, one excerpt shard each, merged exactly: "all" '
        '(every visible GPU) or a list such as ["cuda:0", "cuda:1"]; None: the one device the model loads on',
        example="all", how=True,
    )  # fmt: skip
    extension_settings: dict[str, dict[str, dict[str, Any]]] = _param(
        {}, WORK, "settings of explainers, scorers, backends and unit types that declare them, by role and name: "
        "-p scorer.<name>.<setting>=value, or a YAML section (docs/extensions.md)",
        example="{scorer: {keyword: {min_count: 2}}}", when_set=True,
    )  # fmt: skip
    # stage 02: explain
    explainer: str = _param(
        "llm", (EXPLAIN,), '"llm" (explainer_backend writes it), "rules" (no LLM), "triage" (rules first; see '
        "llm_when), or another registered explainer (nbutils.explain.contract)",
        choices="explainers", when_set=True,
    )  # fmt: skip
    explain_neurons: int | str | list[list[int]] = _param(
        2, (EXPLAIN,), 'neurons per layer (an int, seeded), "strongest:N" per layer, "all", or [[layer, neuron], ...]'
    )
    explainer_backend: str = _param(
        "local", (EXPLAIN,), '"local" (transformers in the kernel), "openai" (any compatible server), "rules" (no '
        "LLM: rules found by running the subject model, simulated exactly), or another registered backend",
        choices="backends",
    )  # fmt: skip
    explainer_model: str = _param(
        "embedded", (EXPLAIN,), 'local: "embedded", a Hugging Face id, folder or .gguf; openai: the model name',
    )  # fmt: skip
    explainer_base_url: str | list[str] | None = _param(
        None, (EXPLAIN,), 'for "openai": e.g. "http://127.0.0.1:8080/v1" (a list: several servers, neurons dealt '
        "over them); None means the OpenAI API",
        example="http://127.0.0.1:8080/v1",
    )  # fmt: skip
    explainer_api_key_env: str = _param(
        "OPENAI_API_KEY",
        (EXPLAIN,),
        "name of the environment variable holding the explainer's key (never the key)",
        how=True,
    )
    n_samples: int = _param(1, (EXPLAIN,), "candidate explanations per neuron (best-of-n when > 1)")
    temperature: float = _param(1.0, (EXPLAIN,), "explainer sampling temperature")
    explain_negative: bool = _param(False, (EXPLAIN,), "also explain the negative side of signed (gated) neurons")
    min_active: int = _param(
        10,
        BOTH,
        "units active (> 0; != 0 if signed) on fewer tokens than this are dead or rare: listed, not explained or scored",
    )
    explain_with_outputs: bool = _param(
        False, (EXPLAIN,), "the explainer also sees the tokens each neuron makes more and less likely next"
    )
    llm_when: str = _param(
        "always", (EXPLAIN,), '"always": every unit goes to explainer_backend; "rule_below:X": the rules explainer '
        "first, and the LLM only for units whose rule's correlation on their calibration excerpts is below X (the "
        "stage's summary.json says what that saved)",
        example="rule_below:0.7",
    )  # fmt: skip
    explain_with_rules: bool = _param(
        False, (EXPLAIN,), "the LLM explainer's prompt also lists the rule the rules explainer found for the unit"
    )
    split: str = _param(
        "nbutils", BOTH, '"nbutils" (every collected excerpt) or "paper" (neuron-explainer\'s exact 1:1 split)',
        choices=("nbutils", "paper"),
    )  # fmt: skip
    prices: dict[str, float] | None = _param(
        None, BOTH, 'e.g. {"prompt": 0.15, "completion": 0.6} per million tokens, for a cost estimate',
        example="{prompt: 0.15, completion: 0.6}", how=True,
    )  # fmt: skip
    max_cost: float | None = _param(
        None, BOTH, "stop starting units once stages 02-03 would spend more than this, in the currency of prices "
        "(needs prices and the run's plan: nbutils plan); rerun with more to continue", example="5.0", how=True,
        when_set=True,
    )  # fmt: skip
    max_requests: int | None = _param(
        None, BOTH, "stop starting units once stages 02-03 would send more LLM requests than this, failed "
        "attempts included (needs the run's plan)", example="100000", how=True, when_set=True,
    )  # fmt: skip
    max_in_flight: int = _param(
        64, BOTH, "HTTP backends: LLM requests in flight at once, across all neurons in progress", how=True
    )
    requests_per_minute: float | None = _param(
        None, BOTH, "HTTP backends: at most this many requests a minute (None: no limit)", example="500", how=True
    )
    tokens_per_minute: float | None = _param(
        None, BOTH, "HTTP backends: at most this many tokens a minute, prompt and reply (None: no limit)",
        example="200000", how=True,
    )  # fmt: skip
    fail_on_errors: bool = _param(False, BOTH, "True: any failed neuron makes the run's exit code non-zero", how=True)
    # stage 03: simulate and score
    simulator_backend: str = _param(
        "local", (SCORE,), '"local", "openai", "oracle" (planted neurons), or another registered backend',
        choices="backends",
    )  # fmt: skip
    simulator_model: str = _param("embedded", (SCORE,), "as explainer_model")
    simulator_base_url: str | list[str] | None = _param(
        None,
        (SCORE,),
        "as explainer_base_url (the simulator may be served elsewhere; a list: several servers)",
        example="http://127.0.0.1:8081/v1",
    )
    simulator_api_key_env: str = _param(
        "OPENAI_API_KEY",
        (SCORE,),
        "name of the environment variable holding the simulator's key (never the key)",
        how=True,
    )
    simulation_mode: str = _param(
        "auto", (SCORE,), 'for "openai": "echo" (prompt log-probabilities), "chat", or "auto"',
        choices=("auto", "echo", "chat"),
    )  # fmt: skip
    max_prompt_tokens: int | None = _param(
        None, (SCORE,), "cap on simulation prompt tokens; None: the context", example="4096"
    )
    per_band: int = _param(2, (SCORE,), "stratified score: excerpts from each quantile band (0 turns it off)")
    scorers: list[str] = _param(
        ["simulation", "detection", "fuzzing"], (SCORE,), "which registered scorers run (nbutils.score.contract)",
        choices="scorers",
    )  # fmt: skip
    judge_per_class: int = _param(10, (SCORE,), "detection/fuzzing: positive (and as many negative) items per neuron")
    ablation: bool = _param(
        False,
        (SCORE,),
        "also score by ablation: the unit replaced by its calibrated simulation (runs the subject model)",
    )
    intervention: bool = _param(
        False, (SCORE,), "also score by intervention: steer the unit, ask the judge which continuation it changed"
    )
    judge_items_per_request: int = _param(
        1, (SCORE,), "detection/fuzzing, HTTP chat mode: items shown in one request (1: each its own question)",
        example="5",
    )  # fmt: skip
    n_boot: int = _param(1000, (SCORE,), "bootstrap resamples for the 95% intervals")
    keep_distributions: bool = _param(
        False,
        (SCORE,),
        "keep every token's 11 simulated label probabilities (most of stage 03's disk); False: expected values",
    )
    # stage 04: inspect
    layer: int | None = _param(
        None, (INSPECT,), "layer of the neuron to open first in the viewer; None: the best-scored one", example="15",
        how=True,
    )  # fmt: skip
    neuron: int | None = _param(
        None, (INSPECT,), "that neuron's index; None: the best-scored one", example="955", how=True
    )
    page_units: int = _param(
        200, (INSPECT,), "unit sides the static page shows in full (the best, the worst, a sample); its table lists all"
    )
    embedding_base_url: str | None = _param(
        None, (INSPECT,), "search by meaning (run.search(text, by='meaning')): an OpenAI-compatible server's URL "
        "that serves /embeddings (OpenAI, vLLM, llama.cpp's server with embeddings on); None: no meaning search",
        example="http://127.0.0.1:8080/v1", when_set=True,
    )  # fmt: skip
    embedding_model: str | None = _param(
        None, (INSPECT,), "the embedding model's name on that server (None: the server's only model)",
        example="text-embedding-3-small", when_set=True,
    )  # fmt: skip
    embedding_api_key_env: str = _param(
        "OPENAI_API_KEY", (INSPECT,), "name of the environment variable holding the embeddings server's key",
        when_set=True,
    )  # fmt: skip

    def subset(self, cls: type, prefix: str = "", **renamed: str) -> Any:
        """A dataclass ``cls`` made from this config's values of the same names (``prefix`` + its field name,
        or the name ``renamed`` gives a field): by name, never by position, so adding a parameter moves none."""
        out = {}
        for f in fields(cls):
            name = renamed.get(f.name, prefix + f.name)
            if f.init and name in schema():
                out[f.name] = getattr(self, name)
        return cls(**out)

    def section(self, name: str) -> dict[str, Any]:
        """The values of one section of parameters (`SECTIONS`), by name."""
        return {n: getattr(self, n) for n in SECTIONS[name]}

    @classmethod
    def pick(cls, values: Mapping[str, Any]) -> RunConfig:
        """A config from the schema's names found in ``values`` (a notebook's ``globals()``, a dict); the
        others keep their defaults."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


SECTIONS: dict[str, tuple[str, ...]] = {
    "collection": (
        "model", "corpus", "corpus_text_field", "layers", "neurons", "site", "units", "n_excerpts", "excerpt_len",
        "top_k", "n_random", "band_size", "batch_size", "seed", "min_active",
    ),
    "explainer": (
        "explainer", "explain_neurons", "explainer_backend", "explainer_model", "explainer_base_url",
        "explainer_api_key_env", "n_samples", "temperature", "explain_negative", "explain_with_outputs", "llm_when",
        "explain_with_rules", "split",
    ),
    "simulator": (
        "simulator_backend", "simulator_model", "simulator_base_url", "simulator_api_key_env", "simulation_mode",
        "max_prompt_tokens",
    ),
    "scoring": (
        "scorers", "per_band", "judge_per_class", "judge_items_per_request", "ablation", "intervention", "n_boot",
        "keep_distributions",
    ),
    "execution": (
        "executor", "ray_address", "shards", "devices", "checkpoint_every_s", "max_in_flight", "requests_per_minute",
        "tokens_per_minute", "prices", "max_cost", "max_requests", "fail_on_errors",
    ),
    "views": ("layer", "neuron", "page_units", "embedding_base_url", "embedding_model", "embedding_api_key_env"),
    "extensions": ("extension_settings",),
}  # fmt: skip
"""The parameters by role: what `nbutils run --list-params` and docs/parameters.md group them by, and what
`RunConfig.section` returns. Every parameter is in exactly one section (a test checks); the names stay flat
(``-p top_k=10``, a notebook's parameters cell), as papermill needs literals."""


def schema() -> dict[str, Any]:
    """Every parameter's dataclass field, by name."""
    return {f.name: f for f in fields(RunConfig)}


def defaults() -> dict[str, Any]:
    """The main job's value of every parameter."""
    return {name: getattr(RunConfig(), name) for name in schema()}


def hints() -> dict[str, Any]:
    """Every parameter's type."""
    return typing.get_type_hints(RunConfig)


def stage_parameters(stage: str) -> list[str]:
    """The parameters a stage (``"01_collect"`` ...) takes, in schema order."""
    return [name for name, f in schema().items() if stage in f.metadata["stages"]]


def stage_values(config: RunConfig, stage: str) -> dict[str, Any]:
    """A config's values of the parameters a stage takes (what the stage records in its ``parameters.json``;
    a ``when_set`` parameter only where it differs from its default)."""
    values = {name: getattr(config, name) for name in stage_parameters(stage)}
    return {k: v for k, v in values.items() if not unset_new(k, v)}


def unset_new(name: str, value: Any) -> bool:
    """Whether ``name`` is a ``when_set`` parameter at its default (left out of run ids and records)."""
    f = schema().get(name)
    return f is not None and bool(f.metadata.get("when_set")) and value == defaults()[name]


def rule_threshold(llm_when: str) -> float | None:
    """The calibration correlation below which ``llm_when="rule_below:X"`` sends a unit to the LLM (None for
    "always"); a clear error for anything else."""
    kind, _, number = llm_when.partition(":")
    if llm_when == "always":
        return None
    try:
        threshold = float(number) if kind == "rule_below" else None
    except ValueError:
        threshold = None
    if threshold is None or not -1.0 <= threshold <= 1.0:
        raise UserError(
            f'llm_when={llm_when!r} is not "always" or "rule_below:X" with X a correlation in -1..1.',
            "Write e.g. -p llm_when=rule_below:0.7 (units whose rule scores 0.7 or more on their calibration "
            "excerpts keep the rule; the rest go to the LLM), or -p llm_when=always.",
        )
    return threshold
