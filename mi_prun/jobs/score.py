"""`score`: the block and run scores of one capture pass, and the blocks the plan's method would remove."""

from __future__ import annotations

from ..plan import Plan
from ..preflight import check_plan
from ..progress import QUIET, Reporter
from .loading import load_for_plan
from .results import Scored


def score(plan: Plan, reporter: Reporter = QUIET) -> Scored:
    from .. import pipeline

    inspected = check_plan(plan)
    loaded = load_for_plan(inspected, plan, reporter)
    scores, removed = pipeline.score_blocks(loaded, plan, reporter)
    return Scored(scores, tuple(removed), loaded.source.describe())
