"""`mi-prun-edge score`: the per-block MI table and the run-MI heatmap, nothing written but them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..plan import Estimator, StateView
from . import options as o, output
from .app import app


@app.command()
def score(
    model: o.Model = None,
    remove: Annotated[int, typer.Option("--remove", "-n", help="Blocks to remove when marking the chosen runs.")] = 4,
    estimator: o.EstimatorOpt = Estimator.token,
    view: o.ViewOpt = StateView.raw,
    calib: o.Calib = o.CALIB_DEFAULTS.source,
    n_samples: o.NSamples = o.CALIB_DEFAULTS.n_samples,
    seq_len: o.SeqLen = o.CALIB_DEFAULTS.seq_len,
    seed: o.Seed = 0,
    heatmap: Annotated[Path, typer.Option("--heatmap", help="PNG heatmap of run MI (start x end).")] = Path("run_mi.png"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write block and run scores as JSON.")] = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    streamed: o.Streamed = None,
    quiet: o.Quiet = False,
):
    """Print the per-block MI table and draw the run-MI heatmap with the MI-PRUN choice marked."""
    from .. import distributed
    from ..calibration import CalibrationSpec
    from ..pipeline import score_blocks
    from ..plan import Plan
    from ..plots import run_heatmap
    from ..preflight import check_plan
    from ..progress import Reporter
    from .common import execution_of, load_for_plan

    plan = Plan.make(model=model, estimator=estimator, view=view, remove=remove, seed=seed, device=device, dtype=dtype, execution=execution_of(streamed),
                     calibration=CalibrationSpec(source=calib, n_samples=n_samples, seq_len=seq_len, seed=seed))
    inspected = check_plan(plan)
    reporter = Reporter(quiet)
    loaded = load_for_plan(inspected, plan, reporter)
    scores, removed = score_blocks(loaded, plan, reporter)
    if not distributed.is_main():  # the same scores on every rank: rank 0 writes them
        return
    table = scores.block_table()
    output.block_table(table, removed)
    run_heatmap(scores.run_matrix(), removed, heatmap, title=f"{loaded.source.describe()} ({estimator.value} MI, nats)")
    output.line(f"MI-PRUN would remove {removed}; heatmap: {heatmap}")
    if json_out is not None:
        payload = {"block_scores": table, "removed": removed, "runs": [r.model_dump() for r in scores.run_scores()]}
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
