"""Stage 03: score every explanation of stage 02 with the chosen scorers, beside the token-lookup baseline.

For each unit side, every scorer (`nbutils.score.contract`; by default ``simulation``, ``detection`` and
``fuzzing``) scores the token-lookup baseline and then the explanation, on excerpts the explainer never saw.
A scorer whose LLM requests fail records the failure and the scorers after it do not run (a rerun retries the
unit if the server was at fault); the baseline is always scored.

Artifacts in the stage folder (`nbutils.core.layout.ResultsLayout`): the results store
(`nbutils.core.store`), where each unit side's result, its scorers' details and numbers are written in one
transaction, the unit sides it was asked for (stage 02's selection less rare units: `ResultStore.select`),
``summary.json`` and ``usage.json``. Nothing is rewritten whole at the end: ``scores.jsonl`` for other tools
is an export on request (``nbutils export-jsonl``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from nbutils.core.config import RunConfig
from nbutils.core.errors import UserError
from nbutils.core.io import read_jsonl
from nbutils.core.layout import explanations, scores
from nbutils.core.records import RecordStore, split_excerpts
from nbutils.core.results import ExplanationEntry
from nbutils.core.store import ResultStore, StoredSequence, shard_part
from nbutils.core.unit_stage import UnitStage, store_as_finished
from nbutils.core.units import Key, key_of
from nbutils.llm.contract import (
    BACKENDS,
    Backend,
    BackendSpec,
    LLMFailed,
    backend_spec,
    make_backend,
)
from nbutils.llm.rule_language import Rule
from nbutils.score.baseline import token_table
from nbutils.score.contract import (
    SCORERS,
    ScoredSide,
    Scorer,
    ScoreSettings,
    UnitContext,
    UnitDetails,
    UnitScores,
    number_notes,
    registered,
    result_numbers,
    scorer,
)
from nbutils.subject.heads import HEAD
from nbutils.subject.intervene import intervention_for
from nbutils.subject.units import kind_named


def simulator_spec(config: RunConfig, cache_path: str | None = None) -> BackendSpec:
    """The simulator backend a config names (it also judges detection and fuzzing items)."""
    return backend_spec(config, "simulator", cache_path)


def settings(config: RunConfig) -> ScoreSettings:
    """Stage 03's settings that every scorer reads, taken from the config by name."""
    if config.judge_items_per_request < 1:
        raise UserError(
            f"judge_items_per_request={config.judge_items_per_request} must be at least 1.",
            "Give 1 (each item its own question) or e.g. 5 items per request.",
        )
    return config.subset(ScoreSettings)


def chosen_scorers(config: RunConfig, kind: str | None = None) -> list[Scorer]:
    """The scorers a config asks for: ``scorers``, ``ablation`` / ``intervention`` when those are True, and
    for attention heads ``looks`` and ``pairs`` (where each head looks is what their explanations are also
    about). ``kind``: the collection's unit kind (default: the one ``config.units`` names)."""
    names = list(config.scorers)
    names += [n for n in ("ablation", "intervention") if getattr(config, n) and n not in names]
    heads = (kind or kind_named(config.units)) == HEAD
    names += [n for n in ("looks", "pairs") if heads and n not in names]
    given = config.extension_settings.get("scorer")
    return [scorer(name, SCORERS.settings(name, given)) for name in names]


def unit_context(entry: ExplanationEntry, store: RecordStore, s: ScoreSettings, subject: Any = None) -> UnitContext:
    """What the scorers get for one stage-02 entry (refused if stage 02 split the excerpts differently)."""
    if entry.split != s.split:
        raise UserError(
            f"L{entry.layer} N{entry.neuron} was explained from the split={entry.split!r} excerpts; scoring it "
            f"with split={s.split!r} could score excerpts the explainer saw.",
            f"Run stage 03 with split={entry.split!r} (nbutils run passes one split to both stages).",
        )
    rec = store.record(entry.layer, entry.neuron)
    splits = split_excerpts(rec, entry.negative, s.per_band, s.split)
    return UnitContext(rec, entry, splits, token_table(splits["train"]), s, subject)


def score_entry(
    entry: ExplanationEntry, store: RecordStore, llm: Backend | None, scorers: list[Scorer], s: ScoreSettings,
    subject: Any = None, meter: Callable[[str, Backend], AbstractContextManager[Any]] | None = None,
) -> tuple[UnitScores, UnitDetails | None]:  # fmt: skip
    """Scores of one stage-02 entry, and the details to save (None when no scorer of the explanation ran).
    ``subject``: the subject model for scorers that run it (`nbutils.subject.intervene.UnitIntervention`);
    ``meter(scorer name, backend)``: a context around each scorer of the explanation (a plan's measurement)."""
    ctx = unit_context(entry, store, s, subject)
    baseline = ScoredSide(entry.baseline.explanation if entry.baseline else None)
    result = UnitScores(layer=entry.layer, neuron=entry.neuron, sign=entry.sign, explanation=entry.explanation,
                        baseline=baseline)  # fmt: skip
    for sc in scorers:
        base = sc.baseline(ctx)
        if base is not None:
            baseline.results[sc.name] = base
    if not entry.explanation:
        result.failure = entry.failure or "no explanation"
        return result, None
    details = UnitDetails(entry.layer, entry.neuron, entry.sign, entry.explanation)
    llm = exact_simulator(entry) or llm  # e.g. a rule: simulated exactly, by the rule the entry records
    for sc in scorers:
        try:
            with meter(sc.name, llm) if meter else nullcontext():
                result.results[sc.name], details.by_scorer[sc.name] = done = sc.explanation(ctx, llm)
            ctx.done[sc.name] = done
        except LLMFailed as e:  # the scores so far stay; a rerun retries the unit if the fault was the server's
            result.failure, result.retryable = f"{sc.name} failed: {e}", e.retryable
            break
    return result, (details if details.by_scorer else None)


def exact_simulator(entry: ExplanationEntry) -> Backend | None:
    """The backend the entry names as simulating its explanation exactly (`ExplanationEntry.simulator`; made
    by its ``for_entry``), or None: the run's simulator. Entries from before explainers named one: a rules
    explainer's entry is the one whose explanation is its recorded rule's own description."""
    name = entry.simulator
    if name is None and entry.rule is not None and entry.explanation == Rule.from_dict(entry.rule).describe():
        name = "rules"
    if name is None:
        return None
    return BACKENDS.resolve(name).for_entry(entry)


def stored_numbers(result: dict[str, Any]) -> dict[str, float | None]:
    """Every registered scorer's numbers in a stored result of any format (what the store indexes)."""
    return result_numbers(UnitScores.from_dict(result), registered())


def stored_scores(saved: ResultStore, key: Key) -> UnitScores | None:
    """A unit side's stored stage-03 result, typed (None where it has none)."""
    found = saved.get(key)
    return None if found is None else UnitScores.from_dict(found)


def _needs_scoring(old: UnitScores | None, explanation: str | None, scorers: list[Scorer]) -> bool:
    """Not scored with this explanation, a retryable failure, or a scorer missing from its result."""
    if old is None or old.retryable or old.explanation != explanation:
        return True
    return bool(explanation) and not old.failure and any(old.of(sc.name) is None for sc in scorers)


def explained(explanation_dir: str | Path) -> dict[Key, str | None]:
    """What stage 02 chose and explained, in its order, with each explanation's text: its store's selection
    (read from columns, no entry parsed); for a folder from before selections were kept, or one holding only an
    ``explanations.jsonl`` written by hand, that file's entries; else every entry its store holds."""
    with ResultStore(explanation_dir) as asked:
        if asked.selection() is not None:
            texts = dict(asked.explanations())
            return {k: texts[k] for k in asked.chosen()}
        listed = read_jsonl(explanations(explanation_dir).jsonl)
        if listed:
            return {key_of(e): e.get("explanation") for e in listed}
        return {k: t for k, t in asked.explanations()}


def run_score_stage(
    collection_dir: str | Path,
    explanation_dir: str | Path,
    out_dir: str | Path,
    config: RunConfig | None = None,
    progress: bool = True,
    cache_path: str | None = None,
    workers: int | None = None,
) -> StoredSequence[UnitScores]:
    """Score every stage-02 entry with ``config.scorers`` into ``out_dir`` (resumable); return all results (a
    sequence read from the store as it is used). ``workers``: units in progress at once (default: what the
    backend asks for). With ``executor="ray"`` the units are dealt into shards run as Ray tasks; with several
    ``simulator_base_url`` they are dealt over the servers (`nbutils.core.distribute`)."""
    config = config or RunConfig()
    asked = explained(explanation_dir)
    stage = UnitStage("03_score", collection_dir, scores(out_dir), config)
    keys = [k for k in asked if k[:2] not in stage.rare]
    if not keys:
        raise UserError(
            f"No explanations in {explanations(explanation_dir).root}.",
            "Run stage 02 first (python -m nbutils run runs every stage in order).",
        )
    stage.open(numbers_of=stored_numbers)
    chosen = chosen_scorers(config, stage.store.meta.kind)
    stage.run(
        keys, lambda k: _needs_scoring(stored_scores(stage.saved, k), asked[k], chosen), score_units,
        "simulator_base_url", collection_dir=str(collection_dir), explanation_dir=str(explanation_dir),
        out_dir=str(out_dir), cache_path=cache_path, workers=workers, progress=progress,
    )  # fmt: skip
    results, _ = stage.finish(UnitScores.from_dict, len(asked) - len(keys))
    return results


def store_scores(
    saved: ResultStore, done: tuple[UnitScores, UnitDetails | None], indexed: list[Scorer] | None = None
) -> None:
    """One unit side's scores into the stage's store, in one transaction: its result, details, the numbers of
    every registered scorer (``indexed``) and their notes."""
    result, details = done
    indexed = registered() if indexed is None else indexed
    saved.put(result.to_dict(), None if details is None else details.to_dict(), result_numbers(result, indexed),
              number_notes(result, indexed))  # fmt: skip


def score_units(
    collection_dir: str, explanation_dir: str, out_dir: str, config: RunConfig, keys: list[Key],
    cache_path: str | None, workers: int | None, progress: bool, shard: int | None,
) -> int:  # fmt: skip
    """Score these units (one shard of `run_score_stage`), storing each unit as it finishes; the LLM
    usage goes to ``usage.json`` (or, for a shard, its own file that the stage adds up). Returns the count."""
    store, out = RecordStore(collection_dir), scores(out_dir)
    asked = ResultStore(explanation_dir)
    found = [asked.get(k) for k in keys]
    if None in found:  # a folder holding only explanations.jsonl (written or edited by hand): its entries
        listed = {key_of(e): e for e in read_jsonl(explanations(explanation_dir).jsonl)}
        found = [e if e is not None else listed.get(k) for k, e in zip(keys, found)]
    todo = [ExplanationEntry.from_dict(e) for e in found if e is not None]
    saved = ResultStore(out.root, part=shard_part(shard), numbers_of=stored_numbers)
    chosen, s = chosen_scorers(config, store.meta.kind), settings(config)
    llm = make_backend(simulator_spec(config, cache_path))
    subject = None
    if any(sc.needs_subject for sc in chosen):  # loaded once, shared by the units in progress
        subject = intervention_for(store.meta.model, store.meta.unit, store.meta.site)
    asked.close()
    indexed = registered()  # every registered scorer's numbers are indexed
    work = lambda e: score_entry(e, store, llm, chosen, s, subject)  # noqa: E731

    try:
        store_as_finished(
            work, todo, lambda done: store_scores(saved, done, indexed), llm.usage, out.usage, config, shard, workers or llm.parallel_units, "simulate+score",
            progress,
        )  # fmt: skip
    finally:
        saved.close()
    return len(todo)
