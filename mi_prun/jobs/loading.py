"""Loading a model for a job: the memory policy a plan implies, and the messages that say what loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..choices import SELF_TEXT, Execution
from ..plan import Plan
from ..preflight import Inspected
from ..progress import Reporter

if TYPE_CHECKING:
    from ..load import LoadedModel


def quiet_libraries() -> None:
    """--quiet also silences the libraries' own progress bars (transformers' GGUF dequantization)."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # That bar is a plain tqdm (not transformers' switchable one), bound at import: hand the
    # module a tqdm that is off. (TQDM_DISABLE is read only when tqdm itself is imported.)
    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def load(inspected: Inspected, device: str, dtype: str, reporter: Reporter, execution: Execution = Execution.auto,
         batch_size: int = 4, needs_in_memory: str | None = None) -> LoadedModel:
    import time

    from ..load import load_inspected
    from ..profile import PROFILE, stage_profile

    if reporter.quiet:
        quiet_libraries()
    reporter.say(f"loading {inspected.source.describe()}")
    start, before = time.perf_counter(), PROFILE.snapshot()
    loaded = load_inspected(inspected.source, inspected.spec, device, dtype, execution, inspected.hf_config, batch_size,
                            needs_in_memory)
    wall = time.perf_counter() - start
    loaded.load_profile = {"wall": round(wall, 3), **stage_profile(PROFILE.since(before)[0], wall)}
    reporter.say(f"{loaded.execution.value}: {loaded.weight_bytes / 2**30:.2f} GiB of weights as "
                 f"{str(loaded.dtype).removeprefix('torch.')}" + (", blocks loaded one at a time" if not loaded.in_memory else ""))
    return loaded


def load_for_plan(inspected: Inspected, plan: Plan, reporter: Reporter) -> LoadedModel:
    """Load as the plan says; a plan that generates its own calibration needs the whole model."""
    from ..calibration import SELF_NEEDS_MEMORY

    generates = plan.calibration.source == SELF_TEXT and (plan.replay is None or plan.compensate)
    needs = SELF_NEEDS_MEMORY if generates else plan.heal.needs_in_memory() if plan.heal is not None else None
    return load(inspected, plan.device, plan.dtype, reporter, plan.execution, plan.batch_size, needs)
