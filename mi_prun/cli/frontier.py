"""`mi-prun-edge frontier`: build and measure every blocks-removed x type point in its runtime, mark the fronts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..frontier import DEFAULT_RATIOS, DEFAULT_TYPES, ONNX_TYPES, FrontierPlan
from . import output
from .app import app
from .options import Option, takes

FIELDS = FrontierPlan.model_fields
FRONTIER_OPTIONS = (
    "out",
    ("eval_data", Option(Annotated[list[str], typer.Option(
        "--eval", help="Held-out text (repeat for several; the first decides the fronts and carries the KL to the model as given).")])),
    "target", "model",
    ("remove", Option(Annotated[Optional[str], typer.Option("--remove", "-n", help="Blocks removed at each point, e.g. 0,2,4,6,8.")], None)),
    ("ratio", Option(Annotated[Optional[str], typer.Option(
        "--ratio", help=f"Fractions of the blocks removed at each point (default {','.join(map(str, DEFAULT_RATIOS))}).")], None)),
    ("gguf_types", Option(Annotated[str, typer.Option("--gguf-types", help="--target gguf: llama.cpp types every point is quantized to.")],
                          ",".join(DEFAULT_TYPES))),
    ("onnx_types", Option(Annotated[str, typer.Option("--onnx-types", help="--target onnx: precisions every point is exported at.")],
                          ",".join(ONNX_TYPES))),
    ("heal_at", Option(Annotated[Optional[str], typer.Option(
        "--heal-at", help="Blocks-removed values also built with --heal (e.g. 4,8; healing takes up to --heal-minutes each).")], None)),
    ("sublayer_at", Option(Annotated[Optional[str], typer.Option(
        "--sublayer-at", help="Blocks-removed values also built with --granularity sublayer: that many blocks' worth of "
                              "attention and feed-forward sublayers, shipped as llama.cpp's deci GGUF (Llama family).")], None)),
    ("linear_attention", Option(Annotated[Optional[str], typer.Option(
        "--linear-attention", help="At each --sublayer-at point, also a point with K of its kept attention sublayers as fitted "
                                   "linear maps (no KV cache), for each K given, e.g. 6,12.")], None)),
    ("long_context", Option(Annotated[int, typer.Option(
        "--long-context", min=256, help="Context at which the KV cache and a second decode speed are measured (llama.cpp).")],
                            FIELDS["long_context"].default)),
    "heal_minutes", "heal_steps",
    ("windows", Option(Annotated[int, typer.Option("--eval-windows", min=1, help="Windows of --eval-seq-len tokens per held-out text.")],
                       FIELDS["windows"].default)),
    ("eval_seq_len", Option(Annotated[int, typer.Option("--eval-seq-len", min=16, help="Tokens per evaluation window.")],
                            FIELDS["seq_len"].default)),
    ("kl_windows", Option(Annotated[int, typer.Option("--kl-windows", min=1, help="Windows of the first text the KL and top-1 are taken on.")],
                          FIELDS["kl_windows"].default)),
    ("speed_repeats", Option(Annotated[int, typer.Option("--speed-repeats", min=1, help="Rounds of timing (every model in turn each round).")],
                             FIELDS["speed_repeats"].default)),
    ("threads", Option(Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="Runtime threads for timing and evaluation (default: every core).")], None)),
    "calib", "n_samples", "seq_len", "seed", "device", "force", "quiet",
)


@app.command()
@takes(*FRONTIER_OPTIONS)
def frontier(**options):
    """Which model to ship: every blocks-removed x type point built, measured in its runtime, the Pareto fronts marked."""
    import shlex
    import sys

    from .. import jobs
    from ..progress import Reporter
    from .plans import frontier_plan

    plan = frontier_plan(options)
    result = jobs.frontier(plan, options["out"], options["force"], Reporter(options["quiet"]), "mi-prun-edge " + shlex.join(sys.argv[1:]))
    output.frontier_points(result, options["out"])
