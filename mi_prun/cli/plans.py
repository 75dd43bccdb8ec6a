"""Command-line options to plans: the one place an option name meets the plan field it sets."""

from __future__ import annotations

import typer

from ..errors import UserError
from ..plan import (DEFAULT_BUILD_RATIO, DEFAULT_OBJECTIVES, CalibrationSpec, EvalPlan, EvalRunPlan, Execution, ExportPlan, HealPlan, HealRunPlan,
                    Plan, Target, default_heal_text, make_plan, validation_line)
from ..frontier.points import FrontierPlan

# Options named as the Plan field they set.
PLAN_FIELDS = ("model", "method", "granularity", "linear_attention", "estimator", "view", "remove", "ratio", "top_k", "verify", "swaps", "compensate",
               "compensation_samples", "run_map", "seed", "device", "dtype")
EXPORT_FIELDS = ("target", "gguf_type", "compensated_type", "onnx_precision", "keep_hf")
HEAL_FIELDS = {"heal_steps": "steps", "heal_minutes": "minutes", "heal_samples": "samples", "heal_reach": "reach",
               "heal_rank": "rank", "heal_norms": "norms", "heal_precision": "precision", "heal_objective": "objective"}


def execution_of(streamed: bool | None) -> Execution:
    """--streamed / --in-memory / neither (auto)."""
    return Execution.auto if streamed is None else Execution.streamed if streamed else Execution.in_memory


def calibration_of(o: dict) -> CalibrationSpec:
    return CalibrationSpec(source=o["calib"], n_samples=o["n_samples"], seq_len=o["seq_len"], seed=o["seed"])


def heal_of(o: dict, calibration_source: str) -> HealPlan:
    """The heal options a command took (HealPlan's defaults for the others); the text defaults to the calibration's."""
    return HealPlan(**{field: o[name] for name, field in HEAL_FIELDS.items() if name in o},
                    source=o.get("heal_text") or default_heal_text(calibration_source))


def evaluation_of(o: dict) -> EvalPlan | None:
    return EvalPlan(data=o["eval_data"], windows=o["eval_windows"]) if o.get("eval_data") else None


def pruning_plan(o: dict) -> Plan:
    """prune, build, score: the plan of their options (replayed from --plan where given)."""
    choices = {name: o[name] for name in PLAN_FIELDS if name in o}
    choices.update(calibration=calibration_of(o), execution=execution_of(o["streamed"]))
    if "objective" in o:
        choices["objectives"] = tuple(o["objective"] or DEFAULT_OBJECTIVES)
    if "target" in o:  # build
        choices.update(export=ExportPlan(**{name: o[name] for name in EXPORT_FIELDS}), evaluation=evaluation_of(o),
                       heal=heal_of(o, o["calib"]) if o["heal"] else None)
    return make_plan(o.get("plan_file"), **choices)


def require_one_of(o: dict) -> None:
    if o.get("plan_file") is None and o["remove"] is None and o["ratio"] is None:
        raise UserError("say how many blocks to remove: --remove N or --ratio R (or replay one with --plan pruning.json)")


def build_plan(o: dict) -> Plan:
    """build: with neither --remove nor --ratio nor --plan, DEFAULT_BUILD_RATIO of the blocks go."""
    if o["remove"] is None and o["ratio"] is None and o["plan_file"] is None:
        o = {**o, "ratio": DEFAULT_BUILD_RATIO}
    return pruning_plan(o)


def heal_run_plan(o: dict) -> HealRunPlan:
    return HealRunPlan(pruned=o["model"], reference=o["reference"], heal=HealPlan(**{f: o[n] for n, f in HEAL_FIELDS.items()}),
                       text=o["heal_text"], evaluation=evaluation_of(o), device=o["device"], dtype=o["dtype"],
                       execution=execution_of(o["streamed"]))


def eval_run_plan(o: dict) -> EvalRunPlan:
    tasks = tuple(t.strip() for t in (o["tasks"] or "").split(",") if t.strip())
    return EvalRunPlan(data=o["data"], model=o["model"], reference=o["reference"], seq_len=o["seq_len"], stride=o["stride"],
                       max_windows=o["max_windows"], batch_size=o["batch_size"], tasks=tasks, task_limit=o["task_limit"],
                       device=o["device"], dtype=o["dtype"], execution=execution_of(o["streamed"]))


def _numbers(text: str | None, kind, flag: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{flag} takes a comma-separated list of numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def frontier_plan(o: dict) -> FrontierPlan:
    """frontier: every point is `build` with the calibration and heal options given, MI-PRUN's defaults otherwise."""
    from pydantic import ValidationError

    from ..frontier import DEFAULT_RATIOS, DEFAULT_TYPES, ONNX_TYPES

    # The other target's types would be ignored: say so rather than measure something else than asked.
    if o["target"] is Target.onnx and _names(o["gguf_types"]) != DEFAULT_TYPES:
        raise UserError("--gguf-types applies to --target gguf; for --target onnx give --onnx-types (fp32, int4)")
    if o["target"] is Target.gguf and _names(o["onnx_types"]) != ONNX_TYPES:
        raise UserError("--onnx-types applies to --target onnx; for --target gguf give --gguf-types")
    removes, ratios = _numbers(o["remove"], int, "--remove"), _numbers(o["ratio"], float, "--ratio")
    build = Plan.make(model=o["model"], remove=1, seed=o["seed"], device=o["device"], calibration=calibration_of(o),
                      heal=heal_of(o, o["calib"]))
    try:
        return FrontierPlan(
            build=build, target=o["target"], removes=removes, ratios=DEFAULT_RATIOS if removes is None and ratios is None else ratios,
            gguf_types=_names(o["gguf_types"]), onnx_types=_names(o["onnx_types"]),
            heal_at=_numbers(o["heal_at"], int, "--heal-at") or (), sublayer_at=_numbers(o["sublayer_at"], int, "--sublayer-at") or (),
            linear_attention=_numbers(o["linear_attention"], int, "--linear-attention") or (),
            long_context=o["long_context"], texts=tuple(o["eval_data"]), windows=o["windows"],
            seq_len=o["eval_seq_len"], kl_windows=o["kl_windows"], speed_repeats=o["speed_repeats"],
            **({"threads": o["threads"]} if o["threads"] else {}))
    except ValidationError as err:
        raise UserError(validation_line(err)) from None
