"""`mi-prun-edge export`: any Hugging Face folder to a runtime format, as is (e.g. the dense model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import output
from .app import app
from .options import Option, takes

FOLDER = Option(Annotated[Path, typer.Option("--model", "-m", help="Hugging Face folder (dense or pruned) to export as is.")])


@app.command()
@takes(("model", FOLDER), "out", "target", "gguf_type", "onnx_precision", "force", "quiet")
def export(**options):
    """Export a Hugging Face folder without pruning (e.g. the dense model, to compare in the same runtime)."""
    from .. import jobs
    from ..plan import ExportPlan
    from ..progress import Reporter

    plan = ExportPlan(target=options["target"], gguf_type=options["gguf_type"], onnx_precision=options["onnx_precision"])
    result = jobs.export(options["model"], plan, options["out"], options["force"], Reporter(options["quiet"]))
    output.export_line(result.export, result.out)
