"""`build`: prune, repack, export and check, describe: one folder; or, with budgets, a measured
frontier point shipped as measured."""

from __future__ import annotations

from pathlib import Path

from ..budget import Budget, pick, read_frontier, ship
from ..errors import UserError
from ..plan import Plan
from ..preflight import check_output, check_plan, inspect
from ..progress import QUIET, Reporter
from .loading import load_for_plan
from .results import Shipped, Written


def build(plan: Plan, out: Path, force: bool = False, reporter: Reporter = QUIET) -> Written:
    from .. import pipeline

    inspected = check_plan(plan, out, force)
    loaded = load_for_plan(inspected, plan, reporter)
    return Written(out, pipeline.build(loaded, plan, out, force, reporter))


def ship_budget(model: str | None, budget: Budget, frontier: Path | None, out: Path, force: bool = False,
                decided: bool = False) -> Shipped:
    """The best point of a measured frontier that meets the budget, copied into `out` as measured.
    `decided`: the blocks to remove were given as well (--remove / --ratio / --plan), which a budget refuses."""
    if not budget.given:
        raise UserError("--frontier picks a point by a budget: add --max-size, --min-speedup or --max-ppl-increase")
    if frontier is None:
        raise UserError("budgets pick from measured points: run `mi-prun-edge frontier --out DIR --eval TEXT` first, then pass --frontier DIR")
    if decided:
        raise UserError("a budget decides how many blocks go: drop --remove / --ratio / --plan, or drop the budget")
    check_output(out, force)
    measured = read_frontier(frontier)
    source = inspect(model).source.describe()
    if source != measured.model:
        raise UserError(f"{frontier} measured {measured.model}, not {source}: measure this model's frontier first")
    point, why = pick(measured, budget)
    return Shipped(ship(frontier, measured, point, why, budget, out, force), tuple(why))
