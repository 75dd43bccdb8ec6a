"""`mi-prun-edge score`: the per-block MI table and the run-MI heatmap, nothing written but them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import output
from .app import app
from .options import Option, takes
from .plans import pruning_plan

REMOVE = Option(Annotated[int, typer.Option("--remove", "-n", help="Blocks to remove when marking the chosen runs.")], 4)
HEATMAP = Option(Annotated[Path, typer.Option("--heatmap", help="PNG heatmap of run MI (start x end).")], Path("run_mi.png"))
JSON_OUT = Option(Annotated[Optional[Path], typer.Option("--json", help="Also write block and run scores as JSON.")], None)


@app.command()
@takes("model", ("remove", REMOVE), "estimator", "view", "calib", "n_samples", "seq_len", "seed", ("heatmap", HEATMAP),
       ("json_out", JSON_OUT), "device", "dtype", "streamed", "quiet")
def score(**options):
    """Print the per-block MI table and draw the run-MI heatmap with the MI-PRUN choice marked."""
    from .. import distributed, jobs
    from ..plots import run_heatmap
    from ..progress import Reporter

    plan = pruning_plan(options)
    scored = jobs.score(plan, Reporter(options["quiet"]))
    if not distributed.is_main():  # the same scores on every rank: rank 0 writes them
        return
    removed = list(scored.removed)
    output.block_table(scored.block_table(), removed)
    run_heatmap(scored.scores.run_matrix(), removed, options["heatmap"],
                title=f"{scored.model} ({plan.estimator.value} MI, nats)")
    output.line(f"MI-PRUN would remove {removed}; heatmap: {options['heatmap']}")
    if options["json_out"] is not None:
        options["json_out"].write_text(json.dumps(scored.payload(), indent=2) + "\n")
