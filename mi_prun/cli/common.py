"""The steps every model-running command shares: make the plan, check it, load the model."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..plan import SELF_TEXT, Execution, Plan, read_replay
from ..preflight import Inspected
from ..progress import Reporter


def make_plan(plan_file: Path | None, **choices) -> Plan:
    """The plan of this run from the command line, or, with --plan, the recorded one with its
    decision, keeping from the command line only what says where and how to run (the model, the
    device, the export)."""
    if plan_file is None:
        return Plan.make(**choices)
    recorded, replay = read_replay(plan_file)
    for key in ("model", "device", "dtype", "execution", "export", "evaluation", "heal"):
        if key in choices and (choices[key] is not None or key not in recorded):
            recorded[key] = choices[key]
    recorded.pop("replay", None)
    return Plan.make(**recorded, replay=replay)


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


def execution_of(streamed: bool | None) -> Execution:
    """--streamed / --in-memory / neither (auto)."""
    return Execution.auto if streamed is None else Execution.streamed if streamed else Execution.in_memory


def load(inspected: Inspected, device: str, dtype: str, reporter: Reporter, execution: Execution = Execution.auto,
         batch_size: int = 4, needs_in_memory: str | None = None):
    from ..load import load_inspected

    if reporter.quiet:
        quiet_libraries()
    reporter.say(f"loading {inspected.source.describe()}")
    loaded = load_inspected(inspected.source, inspected.spec, device, dtype, execution, inspected.hf_config, batch_size,
                            needs_in_memory)
    reporter.say(f"{loaded.execution.value}: {loaded.weight_bytes / 2**30:.2f} GiB of weights as "
                 f"{str(loaded.dtype).removeprefix('torch.')}" + (", blocks loaded one at a time" if not loaded.in_memory else ""))
    return loaded


def load_for_plan(inspected: Inspected, plan: Plan, reporter: Reporter):
    """Load as the plan says; a plan that generates its own calibration needs the whole model."""
    from ..calibration import SELF_NEEDS_MEMORY

    generates = plan.calibration.source == SELF_TEXT and (plan.replay is None or plan.compensate)
    needs = SELF_NEEDS_MEMORY if generates else plan.heal.needs_in_memory() if plan.heal is not None else None
    return load(inspected, plan.device, plan.dtype, reporter, plan.execution, plan.batch_size, needs)


def require_one_of(remove: int | None, ratio: float | None, plan_file: Path | None) -> None:
    if plan_file is None and remove is None and ratio is None:
        raise UserError("say how many blocks to remove: --remove N or --ratio R (or replay one with --plan pruning.json)")
