"""`mi-prun-edge export`: any Hugging Face folder to a runtime format, as is (e.g. the dense model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..plan import OnnxPrecision, Target
from . import options as o, output
from .app import app


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="Hugging Face folder (dense or pruned) to export as is.")],
    out: o.Out,
    target: o.TargetOpt = Target.gguf,
    gguf_type: o.GGUFTypeOpt = None,
    onnx_precision: o.OnnxPrecisionOpt = OnnxPrecision.int4,
    force: o.Force = False,
    quiet: o.Quiet = False,
):
    """Export a Hugging Face folder without pruning (e.g. the dense model, to compare in the same runtime)."""
    from exporters.gguf_export import spec_of_folder

    from .. import distributed
    from ..errors import UserError
    from ..export import export_folder
    from ..preflight import check_output, require_export_tools
    from ..progress import Reporter

    if distributed.active():
        raise UserError("export runs no model, so nothing to split over ranks: run it as one process, without torchrun")
    check_output(out, force)
    spec, _ = spec_of_folder(model)
    require_export_tools(target)
    if target is Target.onnx:
        from exporters.onnx_export import check_supported

        check_supported(spec)
    e = export_folder(model, target, out, gguf_type, force, Reporter(quiet), onnx_precision=onnx_precision)
    output.line(f"{e.target} {e.format_type}: {out / e.file} ({e.bytes / 2**20:.1f} MiB; {e.route})")
