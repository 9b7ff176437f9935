"""The skeleton stages 02 (explain) and 03 (score) share: work unit side by unit side into a stage folder,
each stored in its own transaction as it finishes, so a killed stage resumes where it stopped.

`UnitStage` is one run of such a stage: it opens the stage folder (its parameters, its results store with the
parts a killed distributed run left merged in), knows the collection's dead and rare units, records which unit
sides the stage was asked for, runs the ones still to do as shards (`nbutils.core.distribute`: here, on Ray,
or dealt over several servers) with their usage added up, and writes the summary. `store_as_finished` is the
loop each shard runs: units in progress at once, each result stored as it finishes, the LLM usage saved as it
goes and when interrupted. What differs between the stages (which units, what "still to do" means, the work
on one unit) stays in each stage's module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nbutils.core.budget import Budget, BudgetReached, Limits
from nbutils.core.config import RunConfig, stage_values
from nbutils.core.distribute import run_unit_shards
from nbutils.core.errors import UserError
from nbutils.core.failures import write_summary
from nbutils.core.io import atomic_write_json
from nbutils.core.layout import ResultsLayout
from nbutils.core.parallel import as_finished
from nbutils.core.progress import progress_bar
from nbutils.core.records import RecordStore
from nbutils.core.store import ResultStore, StoredSequence
from nbutils.core.units import Key
from nbutils.core.usage import Usage, merge_shard_usage, shard_usage


class UnitStage:
    """One run of stage 02 or 03 into its folder (see the module docstring)."""

    def __init__(self, stage: str, collection_dir: str | Path, out: ResultsLayout, config: RunConfig) -> None:
        """Reads the collection (nothing is written until `open`)."""
        self.stage, self.out, self.config = stage, out, config
        self.store = RecordStore(collection_dir)
        self.counted = self.store.rare_units(config.min_active)
        """Dead and rare units with their active-token counts (None where the collection cannot count them)."""
        self.saved: ResultStore | None = None

    def open(self, numbers_of: Callable[[dict[str, Any]], dict[str, float | None]] | None = None) -> UnitStage:
        """Create the stage folder, record the stage's parameters, open its results store (``numbers_of``: what
        it indexes of a result) with what the shards of a killed distributed run finished merged in."""
        self.out.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out.parameters, stage_values(self.config, self.stage))
        self.saved = ResultStore(self.out.root, numbers_of=numbers_of)
        self.saved.merge_parts()
        return self

    @property
    def rare(self) -> dict[tuple[int, int], int]:
        return self.counted or {}

    def run(
        self, chosen: list[Key], still_to_do: Callable[[Key], bool], shard: Callable[..., int], url_parameter: str,
        **shard_args: Any,
    ) -> None:  # fmt: skip
        """Record ``chosen`` as what the stage was asked for, and run ``shard`` on those ``still_to_do`` (none:
        nothing runs); ``url_parameter``: the config's server list units are dealt over."""
        self.saved.select(chosen)
        todo = [k for k in chosen if still_to_do(k)]
        if todo:
            try:
                run_unit_shards(shard, todo, self.config, url_parameter, **shard_args)
            except BudgetReached:  # what the shards finished goes into the accounts now, where it can
                with contextlib.suppress(UserError):  # a shard elsewhere still writing its part: the next start
                    self._merge_shards()
                raise
            self._merge_shards()

    def _merge_shards(self) -> None:
        """The shards' usage and results into the stage's (after they all finished: a failed stage leaves
        them to its next start, as a shard still running elsewhere may be writing its part)."""
        merge_shard_usage(self.out.usage, self.config.prices)
        self.saved.merge_parts()

    def finish(self, decode: Callable[[dict[str, Any]], Any], skipped: int) -> tuple[StoredSequence, dict[str, Any]]:
        """Every chosen unit side's result (read from the store as it is used) and the stage's summary (written;
        ``skipped``: unit sides asked for that were left out as dead or rare). Closes the store."""
        results = StoredSequence(self.out.root, self.saved.chosen(), decode)
        summary = write_summary(
            self.out.summary, results, self.counted, self.config.min_active, skipped, self.store.meta.noun
        )
        self.saved.close()
        return results, summary


def store_as_finished(
    work: Callable[[Any], Any], items: list[Any], put: Callable[[Any], None], usage: Usage, usage_path: Path,
    config: RunConfig, shard: int | None, workers: int, desc: str, progress: bool,
) -> None:  # fmt: skip
    """A shard's loop: ``work`` on ``workers`` items at once, each result ``put`` as it finishes; the usage
    saved at most once a second as results come in and once more at the end, also when interrupted (the
    requests already paid for are counted). With ``max_cost`` / ``max_requests`` a unit starts only within the
    run's budget (`nbutils.core.budget`); at the budget, the units in progress finish and are stored, and
    `BudgetReached` is raised."""
    path = shard_usage(usage_path, shard)
    limits = Limits.of(config)
    budget = Budget(limits, usage_path.parent.parent, usage_path.parent.name, usage) if limits.any else None
    finished: Iterable[Any] = as_finished(work, items, workers, budget.may_start if budget else None)
    bar = progress_bar(iterable=finished, total=len(items), desc=desc, unit="neuron", disable=not progress)
    done = 0
    try:
        for _, result in bar:
            put(result)
            done += 1
            if budget:
                budget.unit_finished()
            usage.save(path, config.prices, at_most_every=1.0)
    finally:
        usage.save(path, config.prices)
    if budget and done < len(items):
        raise budget.reached(len(items) - done)
