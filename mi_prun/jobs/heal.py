"""`heal`: a pruned checkpoint written earlier, distilled toward the dense model it was pruned from."""

from __future__ import annotations

from pathlib import Path

from ..heal_plan import default_heal_text
from ..plan import HealRunPlan
from ..preflight import check_heal, check_heal_objective
from ..progress import QUIET, Reporter
from .loading import load
from .results import Written


def heal(plan: HealRunPlan, out: Path, force: bool = False, reporter: Reporter = QUIET) -> Written:
    from .. import pipeline

    manifest, inspected = check_heal(plan.pruned, plan.reference, out, force,
                                     plan.evaluation.data if plan.evaluation else None, plan.text)
    heal_plan = plan.heal.model_copy(update={"source": plan.text or default_heal_text(manifest.calibration.source)})
    check_heal_objective(heal_plan)
    loaded = load(inspected, plan.device, plan.dtype, reporter, plan.execution, needs_in_memory=heal_plan.needs_in_memory())
    healed = pipeline.heal_checkpoint(loaded, manifest, plan.pruned, heal_plan, plan.evaluation, out, force, reporter)
    return Written(out, healed)
