"""`mi-prun-edge build`: prune, repack, export for an edge runtime, check, describe: one folder."""

from __future__ import annotations

from ..plan import DEFAULT_BUILD_RATIO, DEFAULT_OBJECTIVES, CompensatedType, Estimator, Method, OnnxPrecision, StateView, Target
from . import options as o, output
from .app import app
from .common import execution_of, load_for_plan, make_plan


@app.command()
def build(
    out: o.Out,
    target: o.TargetOpt = Target.gguf,
    model: o.Model = None,
    remove: o.Remove = None,
    ratio: o.BuildRatio = None,
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
    gguf_type: o.GGUFTypeOpt = None,
    compensated_type: o.CompensatedTypeOpt = CompensatedType.auto,
    onnx_precision: o.OnnxPrecisionOpt = OnnxPrecision.int4,
    keep_hf: o.KeepHF = False,
    eval_data: o.EvalData = None,
    eval_windows: o.EvalWindows = 16,
    compensate: o.Compensate = True,
    compensation_samples: o.CompensationSamples = None,
    heal: o.Heal = False,
    heal_steps: o.HealSteps = o.HEAL_DEFAULTS.steps,
    heal_minutes: o.HealMinutes = o.HEAL_DEFAULTS.minutes,
    heal_samples: o.HealSamples = None,
    heal_reach: o.HealReach = o.HEAL_DEFAULTS.reach,
    heal_rank: o.HealRank = o.HEAL_DEFAULTS.rank,
    heal_norms: o.HealNorms = o.HEAL_DEFAULTS.norms,
    heal_precision: o.HealPrecisionOpt = o.HEAL_DEFAULTS.precision,
    heal_objective: o.HealObjectiveOpt = o.HEAL_DEFAULTS.objective,
    heal_text: o.HealText = None,
    seed: o.Seed = 0,
    plan_file: o.PlanFile = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    streamed: o.Streamed = None,
    max_size: o.MaxSize = None,
    min_speedup: o.MinSpeedup = None,
    max_ppl_increase: o.MaxPplIncrease = None,
    frontier: o.FrontierDir = None,
    force: o.Force = False,
    quiet: o.Quiet = False,
):
    """Prune, repack and export for an edge runtime in one step (a .gguf input is pruned in place)."""
    from ..calibration import CalibrationSpec
    from ..pipeline import build as run_build
    from ..plan import EvalPlan, ExportPlan, HealPlan, default_heal_text
    from ..preflight import check_plan
    from ..progress import Reporter

    if max_size is not None or min_speedup is not None or max_ppl_increase is not None or frontier is not None:
        return ship_budget(out, model, remove, ratio, plan_file, max_size, min_speedup, max_ppl_increase, frontier, force)
    if remove is None and ratio is None and plan_file is None:
        ratio = DEFAULT_BUILD_RATIO
    plan = make_plan(
        plan_file, model=model, method=method, estimator=estimator, view=view, remove=remove, ratio=ratio,
        calibration=CalibrationSpec(source=calib, n_samples=n_samples, seq_len=seq_len, seed=seed), top_k=top_k,
        verify=verify, objectives=tuple(objective or DEFAULT_OBJECTIVES), swaps=swaps, compensate=compensate,
        compensation_samples=compensation_samples, seed=seed, device=device, dtype=dtype,
        execution=execution_of(streamed),
        export=ExportPlan(target=target, gguf_type=gguf_type, compensated_type=compensated_type,
                          onnx_precision=onnx_precision, keep_hf=keep_hf),
        evaluation=EvalPlan(data=eval_data, windows=eval_windows) if eval_data else None,
        heal=HealPlan(steps=heal_steps, minutes=heal_minutes, samples=heal_samples, reach=heal_reach, rank=heal_rank, norms=heal_norms, precision=heal_precision,
                      objective=heal_objective,
                      source=heal_text or default_heal_text(calib)) if heal else None,
    )
    inspected = check_plan(plan, out, force)
    reporter = Reporter(quiet)
    loaded = load_for_plan(inspected, plan, reporter)
    manifest = run_build(loaded, plan, out, force, reporter)
    output.decision(manifest)
    for e in manifest.exports:
        output.line(f"{e.target} {e.format_type}: {out / e.file} ({e.bytes / 2**20:.1f} MiB; {e.route})")
    if manifest.heal:
        output.healed(manifest)
    if manifest.quality:
        output.quality(manifest.quality)
    output.timings(manifest)
    output.line(f"wrote {out} (model card: {out / 'README.md'})")


def ship_budget(out, model, remove, ratio, plan_file, max_size, min_speedup, max_ppl_increase, frontier, force) -> None:
    """build with budgets: the best point of a measured frontier that meets them, shipped as measured."""
    from ..budget import Budget, parse_fraction, parse_size, pick, read_frontier, ship
    from ..errors import UserError
    from ..preflight import check_output, inspect

    budget = Budget(max_bytes=parse_size(max_size) if max_size is not None else None, min_speedup=min_speedup,
                    max_ppl_increase=parse_fraction(max_ppl_increase) if max_ppl_increase is not None else None)
    if not budget.given:
        raise UserError("--frontier picks a point by a budget: add --max-size, --min-speedup or --max-ppl-increase")
    if frontier is None:
        raise UserError("budgets pick from measured points: run `mi-prun-edge frontier --out DIR --eval TEXT` first, then pass --frontier DIR")
    if remove is not None or ratio is not None or plan_file is not None:
        raise UserError("a budget decides how many blocks go: drop --remove / --ratio / --plan, or drop the budget")
    check_output(out, force)
    measured = read_frontier(frontier)
    source = inspect(model).source.describe()
    if source != measured["model"]:
        raise UserError(f"{frontier} measured {measured['model']}, not {source}: measure this model's frontier first")
    point, why = pick(measured, budget)
    shipped = ship(frontier, measured, point, why, budget, out, force)
    for line in why:
        output.line(line)
    output.line(f"wrote {shipped} (the file the frontier measured; why: {out / 'budget.json'})")
