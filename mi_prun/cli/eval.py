"""`mi-prun-edge eval`: perplexity on held-out text; with a reference, KL and top-1 agreement."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o, output
from .app import app


@app.command("eval")
def eval_(
    data: Annotated[str, typer.Option("--data", help="Evaluation text: .txt/.jsonl/.parquet file, or a dataset (wikitext2 = its test split, PATH[@CONFIG][:SPLIT]).")],
    model: o.Model = None,
    reference: Annotated[Optional[str], typer.Option("--reference", "-r", help="Reference (dense) model for KL and top-1 agreement; any --model source.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Strided windows: shift by this many tokens, score only the new ones (default: non-overlapping).")] = None,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate only the first N windows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated lm-eval tasks (e.g. arc_easy,hellaswag); needs the 'tasks' extra.")] = None,
    task_limit: Annotated[Optional[int], typer.Option("--task-limit", help="Examples per lm-eval task.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON to this file ('-' for stdout).")] = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    streamed: o.Streamed = None,
    quiet: o.Quiet = False,
):
    """Perplexity on held-out text; with --reference, KL(reference || model) and top-1 agreement."""
    from .. import distributed
    from ..calibration import check_text_source
    from ..errors import UserError
    from ..preflight import inspect
    from ..progress import Reporter
    from ..quality import calibration_overlap, check_windows, eval_rows, run_eval
    from .common import execution_of, load

    check_text_source(data, "--data")
    check_windows(seq_len, stride)
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if task_list and distributed.active():
        raise UserError("--tasks runs lm-evaluation-harness, which is not split over ranks; run it on one process")
    if task_list:
        from ..tasks import require_lm_eval

        require_lm_eval()
    # Configs are read once, up front (seconds for a GGUF), and reused for loading.
    inspected = inspect(model)
    ref_inspected = inspect(reference) if reference is not None else None
    warning = calibration_overlap(inspected.source, data)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    reporter = Reporter(quiet)
    execution = execution_of(streamed)
    loaded = load(inspected, device, dtype, reporter, execution, batch_size)
    ref = load(ref_inspected, device, dtype, reporter, execution, batch_size) if ref_inspected is not None else None
    result = run_eval(loaded, data, seq_len, stride, max_windows, batch_size, ref, reporter)
    if not distributed.is_main():  # every rank holds the summed result: rank 0 reports it
        return
    payload = {"model": loaded.source.describe(), "reference": ref.source.describe() if ref else None, "data": data,
               **result.to_dict(), "warnings": [warning] if warning else []}
    if task_list:
        from ..tasks import run_tasks

        payload["tasks"] = run_tasks(loaded, task_list, task_limit, batch_size)
    if json_out is not None and str(json_out) == "-":
        print(json.dumps(payload, indent=2))
        return
    output.metric_table(f"{payload['model']} on {data}", eval_rows(result, payload.get("tasks")))
    if json_out is not None:
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
        output.line(f"wrote {json_out}")
