"""`mi-prun-edge prune`: choose the blocks, write a pruned Hugging Face checkpoint + pruning.json."""

from __future__ import annotations

from . import output
from .app import app
from .options import PRUNING, takes
from .plans import pruning_plan, require_one_of


@app.command()
@takes("out", "model", "remove", "ratio", "granularity", *PRUNING, "compensate", "compensation_samples", "seed", "plan_file", "device", "dtype",
       "streamed", "force", "quiet")
def prune(**options):
    """Score blocks, choose the ones to remove, and write a pruned checkpoint + pruning.json."""
    from .. import jobs
    from ..progress import Reporter

    require_one_of(options)
    plan = pruning_plan(options)
    output.pruned(jobs.prune(plan, options["out"], options["force"], Reporter(options["quiet"])))
