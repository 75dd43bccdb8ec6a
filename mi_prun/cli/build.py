"""`mi-prun-edge build`: prune, repack, export for an edge runtime, check, describe: one folder."""

from __future__ import annotations

from . import output
from .app import app
from .options import HEALING, PRUNING, Option, takes
from .options import BuildRatio
from .plans import build_plan


@app.command()
@takes("out", "target", "model", "remove", ("ratio", Option(BuildRatio, None)), "granularity", "linear_attention", *PRUNING, "gguf_type", "compensated_type",
       "onnx_precision", "keep_hf", "eval_data", "eval_windows", "compensate", "compensation_samples", "run_map", "heal", *HEALING,
       "seed", "plan_file", "device", "dtype", "streamed", "max_size", "min_speedup", "max_ppl_increase", "frontier",
       "force", "quiet")
def build(**options):
    """Prune, repack and export for an edge runtime in one step (a .gguf input is pruned in place)."""
    from .. import jobs
    from ..progress import Reporter

    o = options
    if any(o[k] is not None for k in ("max_size", "min_speedup", "max_ppl_increase", "frontier")):
        return ship_budget(o)
    plan = build_plan(o)
    output.built(jobs.build(plan, o["out"], o["force"], Reporter(o["quiet"])))


def ship_budget(o: dict) -> None:
    """build with budgets: the best point of a measured frontier that meets them, shipped as measured."""
    from .. import jobs
    from ..budget import Budget, parse_fraction, parse_size

    budget = Budget(max_bytes=parse_size(o["max_size"]) if o["max_size"] is not None else None, min_speedup=o["min_speedup"],
                    max_ppl_increase=parse_fraction(o["max_ppl_increase"]) if o["max_ppl_increase"] is not None else None)
    decided = any(o[k] is not None for k in ("remove", "ratio", "plan_file"))
    shipped = jobs.ship_budget(o["model"], budget, o["frontier"], o["out"], o["force"], decided=decided)
    for line in shipped.why:
        output.line(line)
    output.line(f"wrote {shipped.path} (the file the frontier measured; why: {o['out'] / 'budget.json'})")
