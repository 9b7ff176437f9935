"""The contract every explainer keeps, and the registry of explainers.

An explainer writes one unit side's explanation from what was collected for it (`ExplainContext`: its
record, its excerpt split, the train excerpts as the 0..10 values an LLM is shown). Stage 02, the
interactive ``Unit.explain`` and every view go through this contract; the built-ins are:

- ``llm`` (`nbutils.explain.explainer.LLMExplainer`): the paper's explainer, a prompt to the run's
  ``explainer_backend``, best-of-n when ``n_samples > 1``;
- ``rules`` (`nbutils.explain.rules.RulesExplainer`): no LLM, a rule found by running the subject model,
  simulated exactly (``explainer_backend="rules"`` still names it);
- ``triage`` (`nbutils.explain.explainer.TriageExplainer`): the rule first, the LLM only where the rule's
  calibration correlation is below ``llm_when="rule_below:X"`` (which names it).

An explainer fills the entry (explanation and candidates, or a failure and whether a rerun could fix it),
and, where a backend simulates its explanations exactly, names that backend on the entry
(`ExplanationEntry.simulator`): stage 03 then simulates the entry with it, whatever the run's simulator is
(the rules explainer names ``rules``, which simulates the entry's recorded rule). An explainer may declare
its own settings (``settings_type``, a dataclass; ``-p explainer.<name>.<setting>=...``). Adding one is a
class here or in another package, registered in `EXPLAINERS` or declared as an entry point in the group
``nbutils.explainers`` (see `nbutils.core.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from nbutils.core.config import RunConfig, rule_threshold
from nbutils.core.errors import UserError
from nbutils.core.records import Excerpt, UnitRecord, split_excerpts
from nbutils.core.registry import Registry, settings_or_defaults
from nbutils.core.results import BaselineExplanation, ExplanationEntry, OutputsShown
from nbutils.llm.contract import Backend, ExplainRequest, Usage
from nbutils.llm.prompts import WRITES_SHOWN, ShownExcerpt, normalise
from nbutils.score.baseline import token_lookup_explanation, token_table


@dataclass
class ExplainContext:
    """What an explainer gets for one unit side, and the entry it fills."""

    record: UnitRecord
    negative: bool
    splits: dict[str, list[Excerpt]]
    """`nbutils.core.records.split_excerpts`: ``train`` (what it may look at), the calibration sets."""
    request: ExplainRequest
    """The train excerpts as an LLM explainer is shown them (0..10 values; the tokens it raises and lowers
    where ``explain_with_outputs``)."""
    entry: ExplanationEntry
    sent: ExplainRequest | None = None
    """The request the explainer sent to its LLM, where it sent one (what ``Unit.explain`` shows as the chat)."""

    @property
    def train(self) -> list[Excerpt]:
        return self.splits["train"]

    @property
    def calibration(self) -> list[Excerpt]:
        """Excerpts it may score candidates on (best-of-n, triage), never the ones stage 03 scores on."""
        return self.splits["calibration_top"] + self.splits["calibration_random"]


class Explainer(ABC):
    """Writes explanations one way (see the module docstring)."""

    name: ClassVar[str]
    title: ClassVar[str] = ""
    """A short description for messages and docs."""
    settings_type: ClassVar[type | None] = None
    """Its own settings: a dataclass (``-p explainer.<name>.<setting>=...``), or None."""
    uses_llm: ClassVar[bool] = True
    """Whether it sends requests to the run's ``explainer_backend`` (stage 02 then makes the backend)."""

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings_or_defaults(type(self), settings)
        self.config = RunConfig()
        self.llm: Backend | None = None
        self.meta: Any = None
        self._no_llm = Usage()

    def bind(self, config: RunConfig, llm: Backend | None, meta: Any) -> None:
        """Once per process before any unit: the run's parameters, its explainer backend (None where
        ``uses_llm`` is False) and the collection's description (`nbutils.core.records.CollectionMeta`)."""
        self.config, self.llm, self.meta = config, llm, meta

    @property
    def usage(self) -> Usage:
        """What its LLM requests cost so far (zero without an LLM)."""
        return self.llm.usage if self.llm is not None else self._no_llm

    @property
    def parallel_units(self) -> int:
        """Unit sides stage 02 keeps in progress at once (what its backend asks for; 1 without one)."""
        return self.llm.parallel_units if self.llm is not None else 1

    @abstractmethod
    def explain(self, ctx: ExplainContext) -> None:
        """Fill ``ctx.entry``: ``explanation`` and ``candidates``, or ``failure`` (with ``retryable`` where a
        rerun could fix it). A failed LLM request is recorded there, not raised."""


EXPLAINERS = Registry(
    "explainer",
    {
        "llm": "nbutils.explain.explainer:LLMExplainer",
        "rules": "nbutils.explain.rules:RulesExplainer",
        "triage": "nbutils.explain.explainer:TriageExplainer",
    },
    role="explainer",
)
"""Explainers by name: a class, or ``"module:Class"`` imported when needed."""


def register_explainer(explainer: type[Explainer]) -> type[Explainer]:
    """Make an explainer available by its name (``-p explainer=<name>``); usable as a decorator."""
    EXPLAINERS[explainer.name] = explainer
    return explainer


def explainer_name(config: RunConfig) -> str:
    """The explainer a run's parameters choose: ``explainer``, else the names of before it had one
    (``explainer_backend="rules"``: the rules explainer; ``llm_when="rule_below:X"``: triage)."""
    threshold = rule_threshold(config.llm_when)
    if config.explainer == "triage" and threshold is None:
        raise UserError(
            "explainer=triage sends a unit to the LLM when its rule's calibration correlation is below a threshold, "
            f"and llm_when={config.llm_when!r} gives none.",
            "Give the threshold as -p llm_when=rule_below:0.7 (that alone chooses triage).",
        )
    if config.explainer != "llm":
        return config.explainer
    if config.explainer_backend == "rules":
        return "rules"
    return "triage" if threshold is not None else "llm"


def make_explainer(config: RunConfig, llm: Any = None, meta: Any = None) -> Explainer:
    """The explainer a run's parameters choose, with its settings, bound to ``llm`` (a `Backend`, or a
    callable that makes it: called only for an explainer that ``uses_llm``) and the collection ``meta``."""
    name = explainer_name(config)
    cls = EXPLAINERS.resolve(name)
    explainer = cls(EXPLAINERS.settings(name, config.extension_settings.get("explainer")))
    backend = llm() if callable(llm) and cls.uses_llm else (llm if cls.uses_llm else None)
    explainer.bind(config, backend, meta)
    return explainer


# ----------------------------------------------------------------------------------------------------------
# One unit side: what every explainer gets
# ----------------------------------------------------------------------------------------------------------


def shown_excerpts(excerpts: list[Excerpt], max_activation: float) -> list[ShownExcerpt]:
    """Excerpts as an LLM explainer sees them: tokens and their 0..10 values."""
    return [
        ShownExcerpt(tuple(e.tokens), tuple(int(v) for v in normalise(e.activations, max_activation))) for e in excerpts
    ]


def outputs_shown(record: UnitRecord, negative: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The tokens a unit side raises and lowers as the next token (a negative side lowers what the unit's
    direction promotes), for the output-aware explainer; None where the collection has none."""
    if not record.writes:
        return None
    up, down = (tuple(t for t, _ in record.writes[k][:WRITES_SHOWN]) for k in ("promotes", "suppresses"))
    return (down, up) if negative else (up, down)


def base_entry(
    record: UnitRecord, negative: bool = False, split: str = "nbutils", train: list[Excerpt] | None = None
) -> ExplanationEntry:
    """A unit side's stage-02 entry before its explanation: which side, which split, and the token-lookup
    baseline's explanation of its train excerpts (what stage 03 scores beside any explanation). ``train``:
    those excerpts when the caller has split them already."""
    train = split_excerpts(record, negative, split=split)["train"] if train is None else train
    baseline = BaselineExplanation(token_lookup_explanation(token_table(train)))
    sign = "negative" if negative else "positive"
    return ExplanationEntry(record.id.layer, record.id.index, sign, split=split, baseline=baseline)


def explainer_request(
    record: UnitRecord, n_samples: int = 1, temperature: float = 1.0, negative: bool = False, seed: int = 0,
    split: str = "nbutils", with_outputs: bool = False, train: list[Excerpt] | None = None, rule: str | None = None,
) -> ExplainRequest | None:  # fmt: skip
    """What an LLM explainer is asked for one unit side: its train excerpts as 0..10 values (and,
    ``with_outputs``, the tokens it raises and lowers; ``rule``, the rule the rules explainer found); None when
    the side never activates on them (nothing to explain)."""
    train = split_excerpts(record, negative, split=split)["train"] if train is None else train
    max_act = max((float(np.max(e.activations)) for e in train), default=0.0)
    if not train or max_act <= 0:
        return None
    writes = outputs_shown(record, negative) if with_outputs else None
    shown = tuple(shown_excerpts(train, max_act))
    pairs = looks_shown(train, max_act)
    return ExplainRequest(
        shown, n_samples, temperature, seed, writes=writes, noun=record.noun, rule=rule, pairs=pairs or None
    )


def looks_shown(train: list[Excerpt], max_activation: float, per_excerpt: int = 3) -> tuple[tuple[str, str, int], ...]:
    """For an attention head (excerpts with `Looks`): (token, the token it attends to most, its 0..10 value) at
    each excerpt's ``per_excerpt`` strongest tokens, strongest first; empty for other units."""
    pairs = []
    for e in train:
        if e.looks is None:
            continue
        values = normalise(e.activations, max_activation)
        for i in np.argsort(-np.asarray(e.activations), kind="stable")[:per_excerpt]:
            if values[i] > 0:
                pairs.append((e.tokens[i], e.tokens[int(e.looks.source[i])], int(values[i])))
    return tuple(sorted(pairs, key=lambda p: -p[2]))


def explain_side(record: UnitRecord, explainer: Explainer, negative: bool = False) -> ExplainContext:
    """Explain one unit side with a bound explainer: its entry (with the token-lookup baseline's explanation
    and the explainer's name) in the returned context. A side that never activates on its train excerpts gets
    a failure without asking the explainer."""
    c = explainer.config
    sp = split_excerpts(record, negative, split=c.split)  # once: the entry, the request and the calibration
    entry = base_entry(record, negative, c.split, sp["train"])
    entry.explainer = explainer.name
    request = explainer_request(
        record, c.n_samples, c.temperature, negative, c.seed, c.split, c.explain_with_outputs, sp["train"]
    )
    if request is None:
        entry.failure = f"the {record.noun} never activates on its training excerpts, so there is nothing to explain"
        return ExplainContext(record, negative, sp, ExplainRequest((), noun=record.noun), entry)
    if request.writes is not None:
        entry.outputs_shown = OutputsShown(list(request.writes[0]), list(request.writes[1]))
    ctx = ExplainContext(record, negative, sp, request, entry)
    explainer.explain(ctx)
    return ctx
