"""Artifacts for the edge runtimes, each checked where it will run: a pruned GGUF (in place from a
GGUF source, else through llama.cpp's converter) or an ONNX folder (onnxruntime-genai's builder).

`export_folder` is the export step alone, for any Hugging Face folder (dense or pruned), so the
dense model can be compared in the same runtime.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import gguf
import numpy as np

from .runtimes import llamacpp
from .runtimes.formats import GGUF_TYPES, GGUFType
from .runtimes.gguf_export import check_gguf, export_gguf, layer_flag_kv, spec_of_folder
from .runtimes.deci import write_deci
from .runtimes.gguf_prune import KVValue, prune_gguf
from .runtimes.formats import OnnxPrecision
from .runtimes.onnx_export import check_onnx, check_supported, export_onnx

from .archs import REGISTRY
from .atomic import atomic_dir, check_target
from .load import ModelSource
from .manifest import MANIFEST_NAME, ExportInfo
from .plan import CompensatedType, ExportPlan, Target
from .progress import QUIET, Reporter
from .sublayer_maps import gguf_weights
from .repack import compensated_gguf_tensors, healed_gguf_tensors, save_checkpoint


DEFAULT_GGUF_TYPE = GGUFType.q8_0
HF_SUBDIR = "hf"
ONNX_SUBDIR = "onnx"
# Types that keep 8 bits or more per weight: a compensated tensor of such a type keeps it under `auto`.
EIGHT_BITS_OR_MORE = {gguf.GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q8_1", "Q8_K")}


def compensated_ggml(own: gguf.GGMLQuantizationType, choice: CompensatedType, gguf_type: GGUFType | None):
    """The type a compensated tensor is written in (before any --gguf-type requantization)."""
    if gguf_type is not None:
        return gguf.GGMLQuantizationType.F32  # llama.cpp's quantizer rounds it once, to gguf_type
    if choice is CompensatedType.auto:
        return own if own in EIGHT_BITS_OR_MORE else gguf.GGMLQuantizationType.Q8_0
    return {CompensatedType.same: own, CompensatedType.q8_0: gguf.GGMLQuantizationType.Q8_0,
            CompensatedType.f16: gguf.GGMLQuantizationType.F16}[choice]


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


def gguf_in_place(
    source: ModelSource, removed: list[int], gguf_type: GGUFType | None, out_dir: Path, stem: str, reporter: Reporter,
    replace: dict[str, np.ndarray] | None = None, layer_flags: dict[str, KVValue] | None = None,
    compensated_type: CompensatedType = CompensatedType.auto,
) -> ExportInfo:
    """Prune the source GGUF itself: its tensors keep their bytes and quantization, except the
    ones in `replace` (compensated weights).

    `layer_flags`: per-layer GGUF arrays of the pruned model, written explicitly (e.g. Gemma 3's
    sliding-window pattern from its `layer_types`): a source that relies on llama.cpp's implicit
    pattern (every 6th Gemma 3 layer global) would otherwise run its later layers with the wrong
    attention after a cut.

    The compensated tensors are written in the type `compensated_type` picks for each; with
    `gguf_type`, as F32, rounded once, by llama.cpp's quantizer to that type, not first to the
    source's type and then again."""
    src = Path(source.location) / source.gguf_file
    start = time.perf_counter()
    archs = sorted({spec.gguf_arch for spec in REGISTRY.values()})
    def replace_type(own: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
        return compensated_ggml(own, compensated_type, gguf_type)

    pruned_name = f"{stem}-pruned{len(removed)}.gguf"
    with reporter.task("pruning the GGUF in place (tensor bytes copied)", None):
        report = prune_gguf(src, out_dir / pruned_name, removed, archs, replace, layer_flags, replace_type)
    warnings = []
    target = out_dir / pruned_name
    route = "in-place GGUF pruning (original tensor bytes and quantization kept)"
    if report.replaced:
        written = sorted(set(report.replaced.values()))
        how = "written in f32 for the quantizer" if gguf_type is not None else f"written as {', '.join(written)}"
        route = (
            f"in-place GGUF pruning (original tensor bytes and quantization kept, except {len(report.replaced)} "
            f"rewritten (compensated or healed) tensors {how})"
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
            **check.__dict__, "sliced_keys": report.sliced_keys, "set_keys": report.set_keys,
            "tensors_dropped": report.tensors_dropped, "tensors_replaced": report.replaced,
        },
        warnings=warnings, seconds=round(time.perf_counter() - start, 2),
    )


def pruned_layer_config(config: dict, spec, kept: list[int]) -> dict:
    """The per-layer config lists of the pruned model (sliced by the kept blocks)."""
    out = {}
    for key in spec.per_layer_config_keys:
        values = config.get(key)
        if values:
            out[key] = [values[i] for i in kept]
    return out


def export_pruned(loaded, export: ExportPlan, result, tmp: Path, reporter: Reporter = QUIET) -> ExportInfo:
    """The artifact of a decision: a GGUF source pruned in place, anything else repacked into a
    Hugging Face checkpoint (in tmp/hf) and exported from it. The repacked checkpoint stays in
    tmp/hf when asked for (`keep_hf`) or when the export reads it."""
    stem = artifact_stem(loaded.source)
    in_place = export.target is Target.gguf and loaded.source.kind == "gguf"
    kept = result.kept
    if result.sublayers is not None:
        return deci_export(loaded, export, result, tmp, stem, reporter)
    if export.keep_hf or not in_place:
        (tmp / HF_SUBDIR).mkdir()
        save_checkpoint(loaded, kept, result.compensation, tmp / HF_SUBDIR, result.healed)
    if export.target is Target.onnx:
        return onnx_from_folder(tmp / HF_SUBDIR, export.onnx_precision, tmp, len(kept), reporter)
    if in_place:
        replace = {**compensated_gguf_tensors(loaded.spec, result.compensation), **healed_gguf_tensors(loaded.spec, result.healed)}
        flags = layer_flag_kv(loaded.spec, pruned_layer_config(loaded.model.config.to_dict(), loaded.spec, kept))
        return gguf_in_place(loaded.source, result.removed, export.gguf_type, tmp, stem, reporter, replace, flags,
                             export.compensated_type)
    gtype = export.gguf_type or DEFAULT_GGUF_TYPE
    return gguf_from_folder(tmp / HF_SUBDIR, gtype, tmp, f"{stem}-pruned{len(result.removed)}", len(kept), reporter)


def deci_export(loaded, export: ExportPlan, result, tmp: Path, stem: str, reporter: Reporter = QUIET) -> ExportInfo:
    """A sublayer decision as llama.cpp's deci GGUF: from a GGUF source directly (kept tensors keep
    their bytes), from any other through the llama.cpp converter's GGUF of the checkpoint with
    zeroed projections (and linear attentions' maps in their output projections), whose zeroed
    tensors (and those linear attentions' q/k/v) the rewrite then leaves out."""
    start = time.perf_counter()
    n_units, n_linear = len(result.sublayers.removed), len(result.sublayers.linear)
    target = tmp / f"{stem}-sublayers{n_units}{f'-linear{n_linear}' if n_linear else ''}.deci.gguf"
    if export.keep_hf or loaded.source.kind != "gguf":
        (tmp / HF_SUBDIR).mkdir()
        save_checkpoint(loaded, result.kept, [], tmp / HF_SUBDIR, result.healed)
    if loaded.source.kind == "gguf":
        source, forms = Path(loaded.source.location) / loaded.source.gguf_file, result.sublayers.forms(result.n_blocks)
        route = "deci rewrite of the source GGUF (kept tensors' bytes and quantization kept)"
    else:
        gtype = export.gguf_type or DEFAULT_GGUF_TYPE
        source = tmp / f"{stem}-zeroed.{gtype.value}.gguf"
        with reporter.task(f"converting to GGUF {gtype.value} (llama.cpp converter)", None):
            export_gguf(tmp / HF_SUBDIR, source, gtype, workdir=tmp)
        forms = [result.sublayers.forms(result.n_blocks)[b] for b in result.kept]
        route = f"llama.cpp convert_hf_to_gguf ({gtype.value}), then deci rewrite without the zeroed sublayers"
    replace = gguf_weights(loaded.spec, result.sublayers.maps, result.sublayers.linear) if loaded.source.kind == "gguf" else {}
    with reporter.task("writing the deci GGUF (llama.cpp's heterogeneous-layer Llama)", None):
        report = write_deci(source, target, forms, replace, lambda own: compensated_ggml(own, export.compensated_type, None))
    if source.parent == tmp:
        source.unlink()
    with reporter.task("checking the GGUF (read back, load in llama.cpp)", None):
        check = check_gguf(target, report.layers, uniform=False)
    return ExportInfo(
        target="gguf", file=target.name, format_type=file_type_name(check.file_type), bytes=target.stat().st_size, route=route,
        check={**check.__dict__, "head_count": report.head_count, "head_count_kv": report.head_count_kv,
               "feed_forward_length": report.feed_forward_length, "stub_ffn_layers": report.stub_ffn_layers,
               "tensors_dropped": report.tensors_dropped, "tensors_replaced": report.replaced},
        seconds=round(time.perf_counter() - start, 2),
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


def export_folder(
    folder: Path, target: Target, out: Path, gguf_type: GGUFType | None, force: bool, reporter: Reporter = QUIET,
    onnx_precision: OnnxPrecision = OnnxPrecision.int4,
) -> ExportInfo:
    """Export a Hugging Face folder (dense or pruned) without pruning."""
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
