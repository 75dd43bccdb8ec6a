"""`eval`: perplexity on held-out text; with a reference, KL and top-1 agreement; lm-eval tasks."""

from __future__ import annotations

from .. import distributed
from ..calibration import check_text_source
from ..errors import UserError
from ..plan import EvalRunPlan
from ..preflight import inspect
from ..progress import QUIET, Reporter
from ..quality import calibration_overlap, check_windows
from .loading import load
from .results import Evaluated


def check(plan: EvalRunPlan) -> None:
    """What can be checked before any weights load."""
    check_text_source(plan.data, "--data")
    check_windows(plan.seq_len, plan.stride)
    if plan.tasks and distributed.active():
        raise UserError("--tasks runs lm-evaluation-harness, which is not split over ranks; run it on one process")
    if plan.tasks:
        from ..tasks import require_lm_eval

        require_lm_eval()


def evaluate(plan: EvalRunPlan, reporter: Reporter = QUIET) -> Evaluated:
    from ..quality import run_eval

    check(plan)
    # Configs are read once, up front (seconds for a GGUF), and reused for loading.
    inspected = inspect(plan.model)
    ref_inspected = inspect(plan.reference) if plan.reference is not None else None
    warning = calibration_overlap(inspected.source, plan.data)
    if warning:
        reporter.warn(warning)
    loaded = load(inspected, plan.device, plan.dtype, reporter, plan.execution, plan.batch_size)
    ref = load(ref_inspected, plan.device, plan.dtype, reporter, plan.execution, plan.batch_size) if ref_inspected else None
    measured = run_eval(loaded, plan.data, plan.seq_len, plan.stride, plan.max_windows, plan.batch_size, ref, reporter)
    tasks = None
    if plan.tasks and distributed.is_main():
        from ..tasks import run_tasks

        tasks = run_tasks(loaded, list(plan.tasks), plan.task_limit, plan.batch_size)
    return Evaluated(loaded.source.describe(), ref.source.describe() if ref else None, plan.data, measured,
                     (warning,) if warning else (), tasks)
