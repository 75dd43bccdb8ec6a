"""`build`: prune, repack, export for an edge runtime, check the artifact, describe it — one output folder.

`export`: the export step alone, for any Hugging Face folder (dense or pruned), so the dense model
can be compared in the same runtime.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import gguf
import numpy as np

from exporters.gguf_export import GGUF_TYPES, GGUFType, check_gguf, export_gguf, spec_of_folder
from exporters.gguf_prune import prune_gguf
from exporters import llamacpp
from exporters.onnx_export import OnnxPrecision, check_onnx, export_onnx

from .archs import REGISTRY, ArchSpec
from .compensate import RunCompensation, applied
from .atomic import atomic_dir, check_target
from .blockset import blocks_kept
from .errors import UserError
from .evaluate import Reference, evaluate, strided_windows
from .load import LoadedModel, ModelSource
from .manifest import MANIFEST_NAME, ExportInfo, PruningManifest, QualityInfo
from .modelcard import write_model_card
from .progress import QUIET, Reporter
from .prune import PruneOptions, PruneResult, build_manifest, prune, write_pruned
from .quality import eval_source
from .calibration import read_text_source, tokenize_text


class Target(str, Enum):
    gguf = "gguf"
    onnx = "onnx"


@dataclass(frozen=True)
class BuildOptions:
    target: Target
    prune: PruneOptions
    gguf_type: GGUFType | None = None  # None: a GGUF input keeps its own types; other inputs get q8_0
    onnx_precision: OnnxPrecision = OnnxPrecision.int4
    keep_hf: bool = False
    eval_data: str | None = None
    eval_windows: int = 16
    eval_seq_len: int = 512


DEFAULT_GGUF_TYPE = GGUFType.q8_0
HF_SUBDIR = "hf"
ONNX_SUBDIR = "onnx"


def file_type_name(file_type: int | None) -> str:
    """general.file_type as a short lowercase name (3 -> q4_1)."""
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except (ValueError, TypeError):
        return "unknown"


def artifact_stem(source: ModelSource) -> str:
    name = Path(source.gguf_file or source.location.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name)
    name = re.sub(r"[.-](q\d_\w+|f16|f32|bf16)$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def measure_quality(loaded: LoadedModel, result: PruneResult, options: BuildOptions, reporter: Reporter) -> QualityInfo:
    """Perplexity of dense and pruned, KL and top-1 to dense, on the --eval text (before repacking)."""
    ids = tokenize_text(loaded.tokenizer, read_text_source(eval_source(options.eval_data)))
    try:
        windows = strided_windows(ids, options.eval_seq_len, max_windows=options.eval_windows)
    except ValueError:
        raise UserError(f"--eval text has {ids.numel()} tokens, fewer than one window of {options.eval_seq_len}") from None
    # The dense pass keeps its log-probs: they are the reference for the pruned pass (one dense forward).
    reference = Reference(loaded.model, keep=True)
    n_batches = -(-len(windows) // 4)
    with reporter.task("evaluating the dense model on --eval text", n_batches) as advance:
        dense = evaluate(reference, windows, on_batch=advance)
    with applied(loaded.model, loaded.spec, result.compensation), blocks_kept(loaded.model, loaded.spec, result.kept):
        with reporter.task("evaluating the pruned model on --eval text", n_batches) as advance:
            pruned = evaluate(loaded.model, windows, reference, on_batch=advance)
    return QualityInfo(
        data=options.eval_data, windows=len(windows), seq_len=windows.seq_len, tokens=pruned.tokens,
        dense_ppl=dense.ppl, pruned_ppl=pruned.ppl, kl_to_dense=pruned.kl, top1_agreement=pruned.top1,
    )


def compensated_gguf_tensors(spec: ArchSpec, runs: list[RunCompensation]) -> dict[str, np.ndarray]:
    """The weights rewritten by compensation, under their GGUF names (original block indices)."""
    return {
        f"blk.{r.prev}.{spec.gguf_residual_projection}.weight": r.weight.float().numpy()
        for r in runs
        if r.weight is not None
    }


def gguf_in_place(
    source: ModelSource, removed: list[int], gguf_type: GGUFType | None, out_dir: Path, stem: str, reporter: Reporter,
    replace: dict[str, np.ndarray] | None = None,
) -> ExportInfo:
    """Prune the source GGUF itself: its tensors keep their bytes and quantization, except the
    ones in `replace` (compensated weights), which are encoded in their original type."""
    src = Path(source.location) / source.gguf_file
    start = time.perf_counter()
    archs = sorted({spec.gguf_arch for spec in REGISTRY.values()})
    pruned_name = f"{stem}-pruned{len(removed)}.gguf"
    with reporter.task("pruning the GGUF in place (tensor bytes copied)", None):
        report = prune_gguf(src, out_dir / pruned_name, removed, archs, replace)
    warnings = []
    target = out_dir / pruned_name
    route = "in-place GGUF pruning (original tensor bytes and quantization kept)"
    if report.replaced:
        route = (
            f"in-place GGUF pruning (original tensor bytes and quantization kept, except {len(report.replaced)} "
            "compensated tensors re-encoded in their original type)"
        )
    if gguf_type is not None:
        final = out_dir / f"{stem}-pruned{len(removed)}.{gguf_type.value}.gguf"
        reporter.say(f"requantizing to {gguf_type.value} with llama.cpp")
        llamacpp.quantize(target, final, GGUF_TYPES[gguf_type].llama_ftype)
        target.unlink()
        target = final
        route += f", then llama.cpp quantize to {gguf_type.value}"
        warnings.append(f"--gguf-type {gguf_type.value} re-encodes weights that were already quantized in the source; quality can only drop")
    check = check_gguf(target, len(report.kept))
    fmt = file_type_name(check.file_type)
    if gguf_type is None:
        final = out_dir / f"{stem}-pruned{len(removed)}.{fmt}.gguf"
        target.rename(final)
        target = final
    return ExportInfo(
        target="gguf", file=target.name, format_type=fmt, bytes=target.stat().st_size, route=route,
        check={
            **check.__dict__, "sliced_keys": report.sliced_keys, "tensors_dropped": report.tensors_dropped,
            "tensors_replaced": report.replaced,
        },
        warnings=warnings, seconds=round(time.perf_counter() - start, 2),
    )


def gguf_from_folder(folder: Path, gguf_type: GGUFType, out_dir: Path, stem: str, expected_blocks: int, reporter: Reporter) -> ExportInfo:
    start = time.perf_counter()
    target = out_dir / f"{stem}.{gguf_type.value}.gguf"
    with reporter.task(f"converting to GGUF {gguf_type.value} (llama.cpp converter)", None):
        export = export_gguf(folder, target, gguf_type, workdir=out_dir)
    with reporter.task("checking the GGUF (read back, load in llama.cpp)", None):
        check = check_gguf(target, expected_blocks)
    for warning in export.warnings:
        reporter.say(f"warning: {warning}", style="yellow")
    return ExportInfo(
        target="gguf", file=target.name, format_type=gguf_type.value, bytes=target.stat().st_size,
        route="llama.cpp convert_hf_to_gguf" + (" + llama.cpp quantize" if GGUF_TYPES[gguf_type].converter_outtype != gguf_type.value else ""),
        check={**check.__dict__, "set_keys": export.set_keys}, warnings=export.warnings,
        seconds=round(time.perf_counter() - start, 2),
    )


def onnx_from_folder(folder: Path, precision: OnnxPrecision, out_dir: Path, expected_blocks: int, reporter: Reporter) -> ExportInfo:
    start = time.perf_counter()
    target = out_dir / ONNX_SUBDIR
    with reporter.task(f"exporting ONNX {precision.value} (onnxruntime-genai model builder)", None):
        export_onnx(folder, target, precision, cache_dir=out_dir / ".onnx-cache")
    shutil.rmtree(out_dir / ".onnx-cache", ignore_errors=True)
    with reporter.task("checking the ONNX export (onnxruntime, onnxruntime-genai)", None):
        check = check_onnx(target, expected_blocks)
    return ExportInfo(
        target="onnx", file=ONNX_SUBDIR, format_type=precision.value, bytes=check.bytes,
        route="onnxruntime-genai model builder (CPU)", check=check.__dict__, seconds=round(time.perf_counter() - start, 2),
    )


def build(loaded: LoadedModel, options: BuildOptions, out: Path, force: bool = False, reporter: Reporter = QUIET) -> PruningManifest:
    check_target(out, force)
    result = prune(loaded, options.prune, reporter)
    quality = measure_quality(loaded, result, options, reporter) if options.eval_data else None
    stem = artifact_stem(loaded.source)
    in_place = options.target is Target.gguf and loaded.source.kind == "gguf"
    if options.target is Target.onnx:
        from exporters.onnx_export import check_supported

        check_supported(loaded.spec)
    with atomic_dir(out, force) as tmp:
        hf = tmp / HF_SUBDIR
        if options.keep_hf or not in_place:
            hf.mkdir()
            manifest = write_pruned(loaded, options.prune, result, hf)
        else:
            manifest = build_manifest(loaded, options.prune, result)
        manifest.quality = quality
        if options.target is Target.onnx:
            export = onnx_from_folder(hf, options.onnx_precision, tmp, len(result.kept), reporter)
        elif in_place:
            replace = compensated_gguf_tensors(loaded.spec, result.compensation)
            export = gguf_in_place(loaded.source, result.removed, options.gguf_type, tmp, stem, reporter, replace)
        else:
            gtype = options.gguf_type or DEFAULT_GGUF_TYPE
            export = gguf_from_folder(hf, gtype, tmp, f"{stem}-pruned{len(result.removed)}", len(result.kept), reporter)
        manifest.exports.append(export)
        if options.keep_hf:
            manifest.write(hf)
        else:
            shutil.rmtree(hf, ignore_errors=True)
        manifest.write(tmp)
        write_model_card(tmp, manifest, keep_hf=options.keep_hf)
    return manifest


def export_folder(
    folder: Path, target: Target, out: Path, gguf_type: GGUFType | None, force: bool, reporter: Reporter = QUIET,
    onnx_precision: OnnxPrecision = OnnxPrecision.int4,
) -> ExportInfo:
    """Export a Hugging Face folder (dense or pruned) without pruning."""
    from exporters.onnx_export import check_supported

    spec, config = spec_of_folder(folder)
    check_target(out, force)
    blocks = int(config.get(spec.layer_count_key, 0))
    stem = artifact_stem(ModelSource("folder", str(Path(folder).resolve())))
    with atomic_dir(out, force) as tmp:
        if target is Target.onnx:
            check_supported(spec)
            export = onnx_from_folder(Path(folder), onnx_precision, tmp, blocks, reporter)
        else:
            export = gguf_from_folder(Path(folder), gguf_type or DEFAULT_GGUF_TYPE, tmp, stem, blocks, reporter)
        (tmp / "export.json").write_text(export.model_dump_json(indent=2) + "\n")
        manifest_src = Path(folder) / MANIFEST_NAME
        if manifest_src.is_file():
            shutil.copy2(manifest_src, tmp / MANIFEST_NAME)
    return export
