"""`export`: a Hugging Face folder (dense or pruned) in a runtime format, as is."""

from __future__ import annotations

from pathlib import Path

from .. import distributed
from ..errors import UserError
from ..plan import ExportPlan, Target
from ..preflight import check_output, require_export_tools
from ..progress import QUIET, Reporter
from .results import Exported


def export(folder: Path, plan: ExportPlan, out: Path, force: bool = False, reporter: Reporter = QUIET) -> Exported:
    from ..export import export_folder
    from ..runtimes.gguf_export import spec_of_folder

    if distributed.active():
        raise UserError("export runs no model, so nothing to split over ranks: run it as one process, without torchrun")
    check_output(out, force)
    spec, _ = spec_of_folder(folder)
    require_export_tools(plan.target)
    if plan.target is Target.onnx:
        from ..runtimes.onnx_export import check_supported

        check_supported(spec)
    return Exported(out, export_folder(folder, plan.target, out, plan.gguf_type, force, reporter, onnx_precision=plan.onnx_precision))
