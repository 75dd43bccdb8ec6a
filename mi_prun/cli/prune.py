"""`mi-prun-edge prune`: choose the blocks, write a pruned Hugging Face checkpoint + pruning.json."""

from __future__ import annotations

from ..plan import DEFAULT_OBJECTIVES, Estimator, Method, StateView
from . import options as o, output
from .app import app
from .common import execution_of, load_for_plan, make_plan, require_one_of


@app.command()
def prune(
    out: o.Out,
    model: o.Model = None,
    remove: o.Remove = None,
    ratio: o.Ratio = None,
    method: o.MethodOpt = Method.mi_prun,
    estimator: o.EstimatorOpt = Estimator.token,
    view: o.ViewOpt = StateView.raw,
    calib: o.Calib = o.CALIB_DEFAULTS.source,
    n_samples: o.NSamples = o.CALIB_DEFAULTS.n_samples,
    seq_len: o.SeqLen = o.CALIB_DEFAULTS.seq_len,
    top_k: o.TopK = None,
    verify: o.Verify = True,
    objective: o.Objectives = None,
    swaps: o.Swaps = 0,
    compensate: o.Compensate = True,
    compensation_samples: o.CompensationSamples = None,
    seed: o.Seed = 0,
    plan_file: o.PlanFile = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    streamed: o.Streamed = None,
    force: o.Force = False,
    quiet: o.Quiet = False,
):
    """Score blocks, choose the ones to remove, and write a pruned checkpoint + pruning.json."""
    from ..calibration import CalibrationSpec
    from ..pipeline import prune as run_prune, save_pruned
    from ..preflight import check_plan
    from ..progress import Reporter

    require_one_of(remove, ratio, plan_file)
    plan = make_plan(
        plan_file, model=model, method=method, estimator=estimator, view=view, remove=remove, ratio=ratio,
        calibration=CalibrationSpec(source=calib, n_samples=n_samples, seq_len=seq_len, seed=seed), top_k=top_k,
        verify=verify, objectives=tuple(objective or DEFAULT_OBJECTIVES), swaps=swaps, compensate=compensate,
        compensation_samples=compensation_samples, seed=seed, device=device, dtype=dtype,
        execution=execution_of(streamed),
    )
    inspected = check_plan(plan, out, force)
    reporter = Reporter(quiet)
    loaded = load_for_plan(inspected, plan, reporter)
    result = run_prune(loaded, plan, reporter)
    manifest = save_pruned(loaded, plan, result, out, force)
    output.block_table(manifest.block_scores, manifest.removed)
    output.decision(manifest)
    output.timings(manifest)
    output.line(f"wrote {out}")
