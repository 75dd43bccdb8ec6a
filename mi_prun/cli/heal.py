"""`mi-prun-edge heal`: distil a pruned checkpoint toward the dense model it was pruned from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o, output
from .app import app


@app.command()
def heal(
    model: Annotated[Path, typer.Option("--model", "-m", help="Pruned checkpoint: a folder written by `prune` (or build --keep-hf's hf/).")],
    out: o.Out,
    reference: Annotated[Optional[str], typer.Option(
        "--reference", "-r", help="The dense model it was pruned from (default: the model its pruning.json records).")] = None,
    heal_steps: o.HealSteps = o.HEAL_DEFAULTS.steps,
    heal_minutes: o.HealMinutes = o.HEAL_DEFAULTS.minutes,
    heal_samples: o.HealSamples = None,
    heal_reach: o.HealReach = o.HEAL_DEFAULTS.reach,
    heal_rank: o.HealRank = o.HEAL_DEFAULTS.rank,
    heal_norms: o.HealNorms = o.HEAL_DEFAULTS.norms,
    heal_precision: o.HealPrecisionOpt = o.HEAL_DEFAULTS.precision,
    heal_objective: o.HealObjectiveOpt = o.HEAL_DEFAULTS.objective,
    heal_text: o.HealText = None,
    eval_data: o.EvalData = None,
    eval_windows: o.EvalWindows = 16,
    streamed: o.Streamed = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    force: o.Force = False,
    quiet: o.Quiet = False,
):
    """Heal a pruned checkpoint: LoRA beside each cut, distilled toward the dense model, merged into plain weights.
    A dense model too large for memory is streamed and healed block by block (--heal-objective blocks)."""
    from ..pipeline import heal_checkpoint
    from ..plan import EvalPlan, HealPlan, default_heal_text
    from ..preflight import check_heal, check_heal_objective
    from ..progress import Reporter
    from .common import execution_of, load

    manifest, inspected = check_heal(model, reference, out, force, eval_data, heal_text)
    reporter = Reporter(quiet)
    plan = HealPlan(steps=heal_steps, minutes=heal_minutes, samples=heal_samples, reach=heal_reach, rank=heal_rank, norms=heal_norms, precision=heal_precision,
                    objective=heal_objective, source=heal_text or default_heal_text(manifest.calibration.source))
    check_heal_objective(plan)
    loaded = load(inspected, device, dtype, reporter, execution_of(streamed), needs_in_memory=plan.needs_in_memory())
    healed = heal_checkpoint(
        loaded, manifest, model, plan,
        EvalPlan(data=eval_data, windows=eval_windows) if eval_data else None, out, force, reporter,
    )
    output.healed(healed)
    if healed.quality:
        output.quality(healed.quality)
    output.line(f"wrote {out} (export it with `mi-prun-edge export --model {out}`)")
