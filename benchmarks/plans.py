"""Plans as the command line spells them: a benchmark row says which `mi-prun-edge prune` flags give it."""

from __future__ import annotations

from mi_prun.plan import CalibrationSpec, Plan

# Plan fields the command line has no flag for: shown as field=value when not at their default.
NO_FLAG = ("max_tokens", "batch_size")


def source_name(source: str) -> str:
    """A calibration source as a report shows it: a file by its name, `self` and dataset specs as given."""
    return source.rsplit("/", 1)[-1] if "/" in source and ":" not in source else source


def plan_flags(plan: Plan) -> str:
    """The flags of `mi-prun-edge prune` (or `build`) that run `plan`; defaults left out, the model too."""
    default = {name: f.default for name, f in Plan.model_fields.items()}
    cal, dcal = plan.calibration, CalibrationSpec()
    flags = []
    for name in ("method", "estimator", "view"):
        if getattr(plan, name) != default[name]:
            flags.append(f"--{name} {getattr(plan, name).value}")
    if plan.remove is not None:
        flags.append(f"--remove {plan.remove}")
    if plan.ratio is not None:
        flags.append(f"--ratio {plan.ratio}")
    if cal.source != dcal.source:
        flags.append(f"--calib {source_name(cal.source)}")
    if cal.n_samples != dcal.n_samples:
        flags.append(f"--n-samples {cal.n_samples}")
    if cal.seq_len != dcal.seq_len:
        flags.append(f"--seq-len {cal.seq_len}")
    if plan.seed != cal.seed:  # --seed sets both; a plan may differ
        flags.append(f"--seed {plan.seed} (calibration seed {cal.seed})")
    elif plan.seed != default["seed"]:
        flags.append(f"--seed {plan.seed}")
    if plan.top_k is not None:
        flags.append(f"--top-k {plan.top_k}")
    if not plan.verify:
        flags.append("--no-verify")
    if not plan.compensate:
        flags.append("--no-compensate")
    elif plan.compensation_samples is not None:
        flags.append(f"--compensation-samples {plan.compensation_samples}")
    flags += [f"{name}={getattr(plan, name)}" for name in NO_FLAG if getattr(plan, name) != default[name]]
    return " ".join(flags)
