"""A run's spending cap: ``max_cost`` (in the currency of ``prices``) and ``max_requests``, over stages 02 and
03 together, failed attempts included.

What is spent is read from the run's own accounts: every ``usage*.json`` of its stage-02 and stage-03 folders
(shards write their own, saved at least once a second, so shards on threads, servers or Ray workers see each
other's spending) plus what this shard has counted since its last save. Before a unit starts, its cost is
projected from the run's plan (``plan.json`` beside the stage folders, written by ``nbutils plan``: the mean per
unit measured on a sample of the run's own units), or from this stage's own mean once more units have finished
here than the plan measured. A unit starts only if what is spent, plus the projection for every unit in flight
and for it, stays within the budget; the units in flight finish, everything is stored, and the stage raises
`BudgetReached`, which ``nbutils run`` turns into exit code `BUDGET_EXIT` with what was spent, what is left and how
to continue. Rerunning with a higher budget sends nothing already answered again (stored units are skipped, and
repeated requests are served by the request cache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbutils.core.errors import UserError
from nbutils.core.usage import USAGE_FIELDS, Usage

BUDGET_EXIT = 3
"""``nbutils run``'s exit code when a stage stopped at the budget (1: a stage failed; 2: bad input)."""

PLAN_FILE = "plan.json"
BUDGET_STAGES = ("02_explain", "03_score")


class BudgetReached(UserError):
    """A stage stopped starting units at the run's budget; what it finished is stored."""


@dataclass(frozen=True)
class Limits:
    """The budget: at most ``cost`` (with ``prices``) and ``requests``; None: no cap on that."""

    cost: float | None
    requests: int | None
    prices: dict[str, float] | None

    @property
    def any(self) -> bool:
        return self.cost is not None or self.requests is not None

    @classmethod
    def of(cls, config: Any) -> Limits:
        return cls(getattr(config, "max_cost", None), getattr(config, "max_requests", None), config.prices)


def spent(run_root: Path) -> Usage:
    """Everything the run's stage-02 and stage-03 usage files count (shards' files included)."""
    total = Usage()
    for stage in BUDGET_STAGES:
        for path in sorted((run_root / stage).glob("usage*.json")):
            try:
                counts = json.loads(path.read_text())
            except (OSError, ValueError):  # a shard's file being replaced right now: read at the next unit
                continue
            total.add(Usage(**{k: counts.get(k, 0) for k in USAGE_FIELDS}))
    return total


def planned_per_unit(run_root: Path, stage: str) -> dict[str, float] | None:
    """The plan's mean requests and cost per unit side of ``stage`` (None where the run has no plan)."""
    path = run_root / PLAN_FILE
    if not path.is_file():
        return None
    per_unit = (json.loads(path.read_text()).get("stages", {}).get(stage) or {}).get("per_unit")
    if not per_unit:
        return None
    return {"requests": per_unit["sent"]["mean"], "cost": (per_unit.get("cost") or {}).get("mean") or 0.0,
            "units": per_unit["units"]}  # fmt: skip


def check_limits(limits: Limits, run_root: Path, stages: list[str]) -> None:
    """Refuse a budget before anything is spent: ``max_cost`` without ``prices``, a budget with no plan to
    project a unit's cost from, or one that is spent already or below one unit of the first stage to run."""
    if not limits.any:
        return
    if limits.cost is not None and not limits.prices:
        raise UserError(
            f"max_cost={limits.cost} is given, but no prices to count it in.",
            'Give the price table too, e.g. -p "prices={prompt: 0.15, completion: 0.6}" (per million tokens), or '
            "cap the requests instead: -p max_requests=N.",
        )
    for name, value in (("max_cost", limits.cost), ("max_requests", limits.requests)):
        if value is not None and value <= 0:
            raise UserError(f"{name}={value} must be positive.", f"Give a positive {name}, or leave it out.")
    todo = [s for s in stages if s in BUDGET_STAGES]
    if not todo:
        return
    plans = {s: planned_per_unit(run_root, s) for s in todo}
    if any(p is None for p in plans.values()):
        raise UserError(
            f"A budget (max_cost / max_requests) needs the run's plan, to know what one unit costs before it "
            f"starts; {run_root / PLAN_FILE} is missing or has no measurement for {', '.join(todo)}.",
            "Run `nbutils plan` with the same parameters first (it measures a sample of the run's units, kept for "
            "the run), then rerun this command.",
        )
    used, first = spent(run_root), plans[todo[0]]
    left_cost = None if limits.cost is None else limits.cost - used.cost(limits.prices)
    left_requests = None if limits.requests is None else limits.requests - used.sent()
    if left_cost is not None and left_cost < first["cost"]:
        left = f"leaves {left_cost:.4g}" if left_cost > 0 else "is spent"
        raise UserError(
            f"max_cost={limits.cost} {left} after the {used.cost(limits.prices):.4g} this run spent already: "
            f"less than one unit of {todo[0]} costs ({first['cost']:.4g} by the plan).",
            f"Raise max_cost to at least {used.cost(limits.prices) + first['cost']:.4g} (the plan's forecast "
            "for the whole run is in plan.json).",
        )
    if left_requests is not None and left_requests < first["requests"]:
        raise UserError(
            f"max_requests={limits.requests} leaves {max(left_requests, 0)} after the {used.sent()} requests this "
            f"run sent already: fewer than one unit of {todo[0]} sends ({first['requests']:.1f} by the plan).",
            f"Raise max_requests to at least {used.sent() + int(first['requests']) + 1}.",
        )


class Budget:
    """The gate a shard asks before starting each unit (see the module docstring)."""

    def __init__(self, limits: Limits, run_root: Path, stage: str, usage: Usage) -> None:
        """``usage``: what this shard counts and has not saved yet."""
        self.limits, self.run_root, self.stage, self.usage = limits, run_root, stage, usage
        planned = planned_per_unit(run_root, stage)
        if planned is None:
            check_limits(limits, run_root, [stage])  # raises: no plan
        self.planned = planned
        self.stopped = False
        self.finished = 0
        self._at_start = self.total()

    def total(self) -> Usage:
        """What the run has spent: its saved accounts and what this shard has not saved yet."""
        used = spent(self.run_root)
        used.add(self.usage.copy())
        return used

    def per_unit(self) -> tuple[float, float]:
        """Projected (cost, requests) of one more unit: the plan's, or the mean of the units this shard
        finished once it has finished more than the plan measured."""
        if self.finished > self.planned["units"]:
            done = self.total().minus(self._at_start)
            cost = done.cost(self.limits.prices) / self.finished if self.limits.prices else 0.0
            return cost, done.sent() / self.finished
        return self.planned["cost"], self.planned["requests"]

    def unit_finished(self) -> None:
        """One more unit finished here (the shard's loop calls this and `may_start` on its own thread)."""
        self.finished += 1

    def may_start(self, in_flight: int) -> bool:
        """Whether one more unit fits beside the ``in_flight`` ones; once refused, no more start."""
        if self.stopped:
            return False
        used = self.total()
        cost, requests = self.per_unit()
        if self.limits.cost is not None and used.cost(self.limits.prices) + (in_flight + 1) * cost > self.limits.cost:
            self.stopped = True
        if self.limits.requests is not None and used.sent() + (in_flight + 1) * requests > self.limits.requests:
            self.stopped = True
        return not self.stopped

    def reached(self, left_units: int) -> BudgetReached:
        """The error a stopped stage raises: what was spent, what is left, how to continue."""
        used = spent(self.run_root)
        parts = []
        if self.limits.cost is not None:
            parts.append(f"{used.cost(self.limits.prices):.4g} of max_cost {self.limits.cost:g}")
        if self.limits.requests is not None:
            parts.append(f"{used.sent()} requests of max_requests {self.limits.requests}")
        cost, requests = self.per_unit()
        need = []
        if self.limits.cost is not None:
            need.append(f"-p max_cost={used.cost(self.limits.prices) + left_units * cost:.4g}")
        if self.limits.requests is not None:
            need.append(f"-p max_requests={used.sent() + int(left_units * requests) + 1}")
        return BudgetReached(
            f"Stage {self.stage} stopped at the budget: spent {', '.join(parts)} (stages 02-03, failed "
            f"attempts included); {left_units} unit sides were not started, everything finished is stored.",
            f"Rerun the same command with a higher budget, e.g. {' '.join(need)} (what the rest should take at "
            "the mean so far); units already answered are kept and nothing is sent again.",
        )
