"""`mi-prun-edge eval`: perplexity on held-out text; with a reference, KL and top-1 agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..plan import EvalRunPlan
from . import output
from .app import app
from .options import Option, takes
from .plans import eval_run_plan

DEFAULTS = EvalRunPlan(data="")
EVAL_OPTIONS = (
    ("data", Option(Annotated[str, typer.Option("--data", help="Evaluation text: .txt/.jsonl/.parquet file, or a dataset (wikitext2 = its test split, PATH[@CONFIG][:SPLIT]).")])),
    "model",
    ("reference", Option(Annotated[Optional[str], typer.Option("--reference", "-r", help="Reference (dense) model for KL and top-1 agreement; any --model source.")], DEFAULTS.reference)),
    ("seq_len", Option(Annotated[int, typer.Option("--seq-len", help="Tokens per window.")], DEFAULTS.seq_len)),
    ("stride", Option(Annotated[Optional[int], typer.Option("--stride", help="Strided windows: shift by this many tokens, score only the new ones (default: non-overlapping).")], DEFAULTS.stride)),
    ("max_windows", Option(Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate only the first N windows.")], DEFAULTS.max_windows)),
    ("batch_size", Option(Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")], DEFAULTS.batch_size)),
    ("tasks", Option(Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated lm-eval tasks (e.g. arc_easy,hellaswag); needs the 'tasks' extra.")], None)),
    ("task_limit", Option(Annotated[Optional[int], typer.Option("--task-limit", help="Examples per lm-eval task.")], DEFAULTS.task_limit)),
    ("json_out", Option(Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON to this file ('-' for stdout).")], None)),
    "device", "dtype", "streamed", "quiet",
)


@app.command("eval")
@takes(*EVAL_OPTIONS)
def eval_(**options):
    """Perplexity on held-out text; with --reference, KL(reference || model) and top-1 agreement."""
    from .. import distributed, jobs
    from ..progress import Reporter
    from ..quality import eval_rows

    result = jobs.evaluate(eval_run_plan(options), Reporter(options["quiet"]))
    if not distributed.is_main():  # every rank holds the summed result: rank 0 reports it
        return
    json_out = options["json_out"]
    if json_out is not None and str(json_out) == "-":
        print(json.dumps(result.payload(), indent=2))
        return
    output.metric_table(f"{result.model} on {result.data}", eval_rows(result.measured, result.tasks))
    if json_out is not None:
        json_out.write_text(json.dumps(result.payload(), indent=2) + "\n")
        output.line(f"wrote {json_out}")
