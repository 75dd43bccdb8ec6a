"""`mi-prun-edge frontier`: build and measure every blocks-removed x type point in its runtime, mark the fronts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..frontier import DEFAULT_RATIOS, DEFAULT_TYPES, ONNX_TYPES
from ..plan import DEFAULT_OBJECTIVES, Method, Target
from . import options as o, output
from .app import app


def _numbers(text: str | None, kind, flag: str):
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{flag} takes a comma-separated list of numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@app.command()
def frontier(
    out: o.Out,
    eval_data: Annotated[list[str], typer.Option(
        "--eval", help="Held-out text (repeat for several; the first decides the fronts and carries the KL to the model as given).")],
    target: o.TargetOpt = Target.gguf,
    model: o.Model = None,
    remove: Annotated[Optional[str], typer.Option("--remove", "-n", help="Blocks removed at each point, e.g. 0,2,4,6,8.")] = None,
    ratio: Annotated[Optional[str], typer.Option(
        "--ratio", help=f"Fractions of the blocks removed at each point (default {','.join(map(str, DEFAULT_RATIOS))}).")] = None,
    gguf_types: Annotated[str, typer.Option("--gguf-types", help="--target gguf: llama.cpp types every point is quantized to.")] = ",".join(DEFAULT_TYPES),
    onnx_types: Annotated[str, typer.Option("--onnx-types", help="--target onnx: precisions every point is exported at.")] = ",".join(ONNX_TYPES),
    heal_at: Annotated[Optional[str], typer.Option(
        "--heal-at", help="Blocks-removed values also built with --heal (e.g. 4,8; healing takes up to --heal-minutes each).")] = None,
    heal_minutes: o.HealMinutes = o.HEAL_DEFAULTS.minutes,
    heal_steps: o.HealSteps = o.HEAL_DEFAULTS.steps,
    windows: Annotated[int, typer.Option("--eval-windows", min=1, help="Windows of --eval-seq-len tokens per held-out text.")] = 24,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", min=16, help="Tokens per evaluation window.")] = 512,
    kl_windows: Annotated[int, typer.Option("--kl-windows", min=1, help="Windows of the first text the KL and top-1 are taken on.")] = 8,
    speed_repeats: Annotated[int, typer.Option("--speed-repeats", min=1, help="Rounds of timing (every model in turn each round).")] = 3,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Runtime threads for timing and evaluation (default: every core).")] = None,
    calib: o.Calib = o.CALIB_DEFAULTS.source,
    n_samples: o.NSamples = o.CALIB_DEFAULTS.n_samples,
    seq_len: o.SeqLen = o.CALIB_DEFAULTS.seq_len,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    force: o.Force = False,
    quiet: o.Quiet = False,
):
    """Which model to ship: every blocks-removed x type point built, measured in its runtime, the Pareto fronts marked."""
    from ..calibration import CalibrationSpec
    from ..errors import UserError
    from ..frontier import FrontierPlan, label, run
    from pydantic import ValidationError

    from ..plan import HealPlan, Plan, default_heal_text, validation_line
    from ..progress import Reporter

    # The other target's types would be ignored: say so rather than measure something else than asked.
    if target is Target.onnx and _names(gguf_types) != DEFAULT_TYPES:
        raise UserError("--gguf-types applies to --target gguf; for --target onnx give --onnx-types (fp32, int4)")
    if target is Target.gguf and _names(onnx_types) != ONNX_TYPES:
        raise UserError("--onnx-types applies to --target onnx; for --target gguf give --gguf-types")
    removes, ratios = _numbers(remove, int, "--remove"), _numbers(ratio, float, "--ratio")
    if removes is None and ratios is None:
        ratios = DEFAULT_RATIOS
    try:
        plan = FrontierPlan(
            build=Plan.make(model=model, method=Method.mi_prun, remove=1, objectives=DEFAULT_OBJECTIVES, seed=seed, device=device,
                            calibration=CalibrationSpec(source=calib, n_samples=n_samples, seq_len=seq_len, seed=seed),
                            heal=HealPlan(steps=heal_steps, minutes=heal_minutes, source=default_heal_text(calib))),
            target=target, removes=removes, ratios=ratios, gguf_types=_names(gguf_types), onnx_types=_names(onnx_types),
            heal_at=_numbers(heal_at, int, "--heal-at") or (), texts=tuple(eval_data), windows=windows, seq_len=eval_seq_len,
            kl_windows=kl_windows, speed_repeats=speed_repeats, **({"threads": threads} if threads else {}))
    except ValidationError as err:
        raise UserError(validation_line(err)) from None
    import shlex
    import sys

    result = run(plan, out, force, Reporter(quiet), "mi-prun-edge " + shlex.join(sys.argv[1:]))
    for p in result["points"]:
        marks = [m for m, key in (("size", "on_size_front"), ("speed", "on_speed_front")) if p[key]]
        output.line(f"{label(p)}: {p['bytes'] / 2**20:.1f} MiB, ppl {p['ppl_primary']:.2f}, {p['decode_tok_s']['median']:.1f} tok/s"
                    + (f"  [front: {', '.join(marks)}]" if marks else ""))
    output.line(f"wrote {out / 'frontier.md'}")
