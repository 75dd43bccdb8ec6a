"""`mi-prun-edge heal`: distil a pruned checkpoint toward the dense model it was pruned from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import output
from .app import app
from .options import HEALING, Option, takes
from .plans import heal_run_plan

PRUNED = Option(Annotated[Path, typer.Option(
    "--model", "-m", help="Pruned checkpoint: a folder written by `prune` (or build --keep-hf's hf/).")])
REFERENCE = Option(Annotated[Optional[str], typer.Option(
    "--reference", "-r", help="The dense model it was pruned from (default: the model its pruning.json records).")], None)


@app.command()
@takes(("model", PRUNED), "out", ("reference", REFERENCE), *HEALING, "eval_data", "eval_windows", "streamed", "device", "dtype",
       "force", "quiet")
def heal(**options):
    """Heal a pruned checkpoint: LoRA beside each cut, distilled toward the dense model, merged into plain weights.
    A dense model too large for memory is streamed and healed block by block (--heal-objective blocks)."""
    from .. import jobs
    from ..progress import Reporter

    plan = heal_run_plan(options)
    output.healed_checkpoint(jobs.heal(plan, options["out"], options["force"], Reporter(options["quiet"])))
