"""Making and measuring a frontier's points: llama.cpp quantizations or ONNX exports of each build,
quality in the runtime (cached beside each file, so an interrupted run resumes), speed side by side."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..calibration import check_text_source
from ..errors import UserError
from ..manifest import MANIFEST_NAME, PruningManifest
from ..plan import Granularity, OnnxPrecision, Plan, Target
from ..preflight import Inspected
from ..progress import QUIET, Reporter
from .points import RUNTIME, SPEED_RUNTIME, Build, FrontierPlan, FrontierPoint, Stats, point_name


@dataclass(frozen=True)
class Candidate:
    """A model to measure: a point before its numbers (`hf`, `blocks`: the checkpoint an ONNX point is exported from)."""

    removed_blocks: int
    removed: list[int]
    healed: bool
    file: Path | None
    type: str
    build: dict[str, float] | None
    hf: Path | None = None
    blocks: int = 0
    granularity: Granularity = Granularity.block
    removed_sublayers: list[str] | None = None
    linear_attention: list[int] | None = None


def check(plan: FrontierPlan, out: Path, force: bool) -> tuple[Inspected, list[int]]:
    """Everything that can be checked before a model loads: output, texts, tools, the points."""
    from ..preflight import check_output, inspect, require_export_tools
    from ..runtimes.formats import GGUFType

    check_output(out, force)
    require_export_tools(plan.target)
    for text in plan.texts:
        check_text_source(text, "--eval")
    check_text_source(plan.build.calibration.source, "--calib")
    known = GGUFType.__members__ if plan.target is Target.gguf else OnnxPrecision.__members__
    unknown = [t for t in plan.types if t not in known]
    if unknown or not plan.types:
        raise UserError(f"unknown {plan.target.value} type {unknown}: choose from {', '.join(known)}")
    inspected = inspect(plan.build.model)
    if plan.target is Target.gguf and inspected.source.kind != "gguf":
        raise UserError("frontier --target gguf measures llama.cpp quantizations of a .gguf model: convert the model first "
                        "(mi-prun-edge export, or llama.cpp's convert_hf_to_gguf) and pass the .gguf as --model")
    if plan.target is Target.onnx:
        from ..runtimes.onnx_export import check_supported

        check_supported(inspected.spec)
    counts = plan.counts(inspected.n_blocks)
    if plan.sublayer_at:
        from ..preflight import check_sublayers

        # Each sublayer point: the family and, with --linear-attention K, that K attentions are left to replace.
        for build in plan.builds(counts):
            if build.sublayer:
                check_sublayers(plan.point_plan(build), inspected)
    return inspected, counts


def source_file_type(path: Path) -> str:
    """The GGUF's general.file_type as llama.cpp names it (q4_1, q4_k_m, ...)."""
    from ..export import file_type_name
    from ..runtimes.gguf_prune import model_info, open_gguf

    return file_type_name(model_info(open_gguf(path), path).file_type)


def work_dir(out: Path) -> Path:
    """Where an unfinished run keeps its complete points (beside `out`, hidden): a run interrupted
    after an hour of builds and measurements resumes from them; a finished run moves them into `out`."""
    return out.parent / f".{out.name}.work"


def prepare_work(out: Path, plan: FrontierPlan, model: str) -> Path:
    """The work folder of this frontier: kept from an interrupted run of the same plan, else new."""
    work = work_dir(out)
    stamp = {"model": model, "plan": json.loads(plan.model_dump_json())}
    if work.exists() and not ((work / "plan.json").is_file() and json.loads((work / "plan.json").read_text()) == stamp):
        shutil.rmtree(work)  # points of another frontier: not reusable
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps(stamp))
    return work


def built(folder: Path, point_plan: Plan) -> PruningManifest | None:
    """The manifest of a complete earlier build of this very point, else None."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    manifest = PruningManifest.read(folder)
    return manifest if manifest.plan == point_plan and manifest.exports and (folder / manifest.exports[0].file).is_file() else None


def held_out_windows(plan: FrontierPlan, inspected: Inspected, dense_gguf: Path | None) -> dict:
    """Each held-out text as windows of token ids, from the tokenizer alone (no weights loaded):
    llama.cpp's for a GGUF source, the checkpoint's own otherwise."""
    import numpy as np

    from ..calibration import read_text_source

    windows = {}
    for name in plan.texts:
        text = read_text_source(name, "evaluation")
        if dense_gguf is not None:
            from ..runtimes import llamacpp

            ids = np.array(llamacpp.tokenize(dense_gguf, text))
        else:
            from transformers import AutoTokenizer

            ids = np.array(AutoTokenizer.from_pretrained(inspected.source.location)(text, add_special_tokens=False)["input_ids"])
        n = min(plan.windows, len(ids) // plan.seq_len)
        if n < 1:
            raise UserError(f"--eval {name} has {len(ids)} tokens: fewer than one window of {plan.seq_len}")
        windows[name] = ids[: n * plan.seq_len].reshape(n, plan.seq_len)
    return windows


def file_bytes(path: Path) -> int:
    """A GGUF file's size, or an ONNX export folder's."""
    from ..runtimes.onnx_export import folder_bytes

    return folder_bytes(path) if path.is_dir() else path.stat().st_size


def quantized_candidates(bases: list[Candidate], plan: FrontierPlan, work: Path, reporter: Reporter) -> list[Candidate]:
    """--target gguf: every base file and its llama.cpp quantizations (made into a temporary name,
    renamed when complete: resumable)."""
    from ..runtimes import llamacpp
    from ..runtimes.formats import GGUF_TYPES, GGUFType

    out = []
    # The point as built (or as given) is of its own type already (same file name, same weights): not quantized again.
    todo = [(b, [t for t in plan.gguf_types if t != b.type.split()[0]]) for b in bases]
    with reporter.task("quantizing with llama.cpp", sum(len(types) for _, types in todo)) as advance:
        for base, types in todo:
            folder = base.file.parent if base.build is not None else work / point_name(Build(0))
            folder.mkdir(exist_ok=True)
            out.append(base)
            for name in types:
                target = folder / f"{base.file.name.split('.')[0]}.{name}.gguf"
                if not target.is_file():
                    partial = target.with_name(target.name + ".partial")
                    llamacpp.quantize(base.file, partial, GGUF_TYPES[GGUFType(name)].llama_ftype)
                    partial.rename(target)
                out.append(replace(base, file=target, type=name))
                advance(name)
    return out


def onnx_export(hf: Path, folder: Path, precision: str, blocks: int) -> Path:
    """One precision of a checkpoint's ONNX export, in `folder` (fp32: `onnx/`, as build writes it;
    others `onnx-PRECISION/`); made in a hidden folder and renamed when complete (resumable)."""
    from ..export import onnx_from_folder

    target = folder / ("onnx" if precision == OnnxPrecision.fp32.value else f"onnx-{precision}")
    if (target / "genai_config.json").is_file():
        return target
    partial = folder / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    export = onnx_from_folder(hf, OnnxPrecision(precision), partial, blocks, QUIET)
    (partial / export.file).rename(target)
    shutil.rmtree(partial)
    return target


def exported_candidates(bases: list[Candidate], plan: FrontierPlan, reporter: Reporter) -> list[Candidate]:
    """--target onnx: every base checkpoint exported at each precision by the model builder."""
    out = []
    with reporter.task("exporting ONNX (onnxruntime-genai model builder)", len(bases) * len(plan.onnx_types)) as advance:
        for base in bases:
            for precision in plan.onnx_types:
                folder = onnx_export(base.hf, base.hf.parent, precision, base.blocks)
                out.append(replace(base, file=folder, type=precision, hf=None))
                advance(f"{base.removed_blocks} removed, {precision}")
    return out


def quality(c: Candidate, windows: dict, reference: Path, plan: FrontierPlan, cached: bool) -> dict:
    """Quality of one model in its runtime, kept beside it (resumable; stamped with the windows)."""
    from ..runtimes import llamacpp, onnx_export as onnx

    cache = c.file.with_name(c.file.name + ".quality.json") if cached else None
    stamp = {"windows": {k: [len(w), w.shape[1], int(w.sum())] for k, w in windows.items()}, "kl_windows": plan.kl_windows,
             "bytes": file_bytes(c.file)}
    if cache is not None and cache.is_file():
        hit = json.loads(cache.read_text())
        if hit["stamp"] == stamp:
            return hit["quality"]
    primary = plan.texts[0]
    measured = {"ppl": {}}
    for name, w in windows.items():
        ref = reference if name == primary else None
        if plan.target is Target.gguf:
            got = llamacpp.compare(c.file, w, reference=ref, kl_windows=plan.kl_windows, n_threads=plan.threads)
        else:
            got = onnx.compare(c.file, w, reference=ref, kl_windows=plan.kl_windows, threads=plan.threads)
        measured["ppl"][name] = got["ppl"]
        if name == primary:
            measured["kl_to_dense"], measured["top1_agreement"] = got["kl_to_dense"], got["top1_agreement"]
    if cache is not None:
        cache.write_text(json.dumps({"stamp": stamp, "quality": measured}))
    return measured


def speeds(files: list[Path], plan: FrontierPlan, on_round) -> list[dict]:
    """Prefill and decode timings of every model, side by side, `plan.speed_repeats` rounds."""
    from ..runtimes import llamacpp, onnx_export as onnx

    if plan.target is Target.onnx:
        return onnx.speeds(files, plan.speed_repeats, plan.prompt_tokens, plan.decode_tokens, threads=plan.threads, on_round=on_round)
    return llamacpp.speeds(files, plan.speed_repeats, plan.prompt_tokens, plan.decode_tokens, n_threads=plan.threads, on_round=on_round)


def long_context(files: list[Path], plan: FrontierPlan, on_round) -> tuple[list[int], list[dict]]:
    """llama.cpp: the KV cache each model keeps at the long context, and decode after a prompt that
    fills it, side by side."""
    from ..runtimes import llamacpp

    kv = [llamacpp.kv_cache_bytes(f, plan.long_context) for f in files]
    runs = llamacpp.speeds(files, plan.speed_repeats, plan.long_context - plan.decode_tokens, plan.decode_tokens,
                           n_threads=plan.threads, on_round=on_round)
    return kv, runs


def measured_points(candidates: list[Candidate], windows: dict, reference: Path, plan: FrontierPlan, work: Path,
                    reporter: Reporter) -> tuple[list[FrontierPoint], dict]:
    """Every candidate measured: quality one by one, speed side by side (fronts not yet marked);
    and the machine's load while timing."""
    from ..machine import Contention

    qualities = []
    with reporter.task(f"measuring quality in {RUNTIME[plan.target]}", len(candidates)) as advance:
        for c in candidates:
            q = quality(c, windows, reference, plan, cached=c.file.is_relative_to(work))
            qualities.append(q)
            advance(f"{c.removed_blocks} removed, {c.type}: ppl {q['ppl'][plan.texts[0]]:.2f}")
    # The times are what a busy machine falsifies: the load is taken over the timing too, on its own.
    timing = Contention()
    with reporter.task(f"timing {len(candidates)} models side by side in {SPEED_RUNTIME[plan.target]}",
                       plan.speed_repeats) as advance:
        runs = speeds([c.file for c in candidates], plan, advance)
    long_runs: list = [None] * len(candidates)
    kv: list = [None] * len(candidates)
    if plan.target is Target.gguf:
        with reporter.task(f"KV cache and decode at {plan.long_context} tokens of context, side by side", plan.speed_repeats) as advance:
            kv, long_runs = long_context([c.file for c in candidates], plan, advance)
    points = [FrontierPoint(
        removed_blocks=c.removed_blocks, removed=c.removed, healed=c.healed, type=c.type, build=c.build,
        file=str(c.file.relative_to(work)) if c.file.is_relative_to(work) else str(c.file),
        ppl=q["ppl"], kl_to_dense=q["kl_to_dense"], top1_agreement=q["top1_agreement"], ppl_primary=q["ppl"][plan.texts[0]],
        bytes=file_bytes(c.file), prefill_ms=Stats.of(r["prefill_ms"]), decode_tok_s=Stats.of(r["decode_tok_s"]),
        granularity=c.granularity, removed_sublayers=c.removed_sublayers, linear_attention=c.linear_attention, kv_cache_bytes=k,
        decode_tok_s_long=Stats.of(long["decode_tok_s"]) if long is not None else None,
    ) for c, q, r, k, long in zip(candidates, qualities, runs, kv, long_runs)]
    return points, timing.summary()
