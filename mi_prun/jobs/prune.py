"""`prune`: choose the blocks, write a pruned Hugging Face checkpoint + pruning.json."""

from __future__ import annotations

from pathlib import Path

from ..plan import Plan
from ..preflight import check_plan
from ..progress import QUIET, Reporter
from .loading import load_for_plan
from .results import Written


def prune(plan: Plan, out: Path, force: bool = False, reporter: Reporter = QUIET) -> Written:
    from .. import pipeline

    inspected = check_plan(plan, out, force)
    loaded = load_for_plan(inspected, plan, reporter)
    result = pipeline.prune(loaded, plan, reporter)
    return Written(out, pipeline.save_pruned(loaded, plan, result, out, force))
