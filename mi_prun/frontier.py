"""The prune x quantize frontier: which model to ship, measured.

Every combination of blocks removed (each pruned point made by `build`, healed as well where asked)
and type is measured side by side in the runtime that ships it: for `--target gguf`, llama.cpp
types made by llama.cpp's own quantizer from each build, measured in llama.cpp; for `--target
onnx`, fp32 and int4 exports by onnxruntime-genai's model builder, measured in onnxruntime
(quality) and onnxruntime-genai (speed). Measured: held-out perplexity, KL and top-1 agreement to
the reference (the model as given; for ONNX the unpruned model's fp32 export), size, prefill time
and decode speed. A point is on a front when no other point is at least as good on both axes and
better on one. `build --max-size / --min-speedup / --max-ppl-increase` pick from it
(`budget.py`).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import pipeline
from .atomic import atomic_dir
from .calibration import check_text_source, read_text_source
from .errors import UserError
from .manifest import MANIFEST_NAME
from .machine import Contention, contention_line, machine_line
from .plan import ExportPlan, HealPlan, OnnxPrecision, Plan, Target
from .progress import QUIET, Reporter

FRONTIER_JSON = "frontier.json"
DEFAULT_RATIOS = (0.0, 0.0625, 0.125, 0.1875, 0.25)
DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m", "q4_0")
ONNX_TYPES = ("fp32", "int4")
RUNTIME = {Target.gguf: "llama.cpp", Target.onnx: "onnxruntime"}


class FrontierPlan(BaseModel):
    """What `frontier` builds and measures. Every pruned point is `build` with `build`'s choices."""

    model_config = ConfigDict(frozen=True)

    build: Plan  # the build of every pruned point; its remove/ratio is replaced per point
    target: Target = Target.gguf  # the runtime every point is made for and measured in
    removes: tuple[int, ...] | None = None  # blocks removed at each point (0: the model as given)
    ratios: tuple[float, ...] | None = None  # or fractions of the blocks
    gguf_types: tuple[str, ...] = DEFAULT_TYPES  # llama.cpp types every point is quantized to (--target gguf)
    onnx_types: tuple[str, ...] = ONNX_TYPES  # model builder precisions every point is exported at (--target onnx)
    heal_at: tuple[int, ...] = ()  # blocks-removed values also built healed (build.heal's budget)
    texts: tuple[str, ...]  # held-out texts; the first decides the fronts and carries the KL
    windows: int = Field(24, ge=1)
    seq_len: int = Field(512, ge=16)
    kl_windows: int = Field(8, ge=1)
    speed_repeats: int = Field(3, ge=1)
    prompt_tokens: int = Field(128, ge=1)
    decode_tokens: int = Field(64, ge=2)
    # Runtime threads for decode and prompt (llama-cpp-python's own default decodes on half the cores).
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "FrontierPlan":
        if (self.removes is None) == (self.ratios is None):
            raise ValueError("give the points as --remove 0,2,4 or as --ratio 0,0.1,0.2, not both")
        if any(r < 0 for r in self.removes or ()) or any(not 0 <= r < 1 for r in self.ratios or ()):
            raise ValueError("blocks removed must be >= 0 and ratios in [0, 1)")
        if not self.texts:
            raise ValueError("give at least one held-out text (--eval)")
        return self

    def counts(self, n_blocks: int) -> list[int]:
        """The distinct numbers of blocks removed, checked against the model before any weights load."""
        counts = sorted({*(self.removes or ()), *(round(r * n_blocks) for r in self.ratios or ())} | {0})
        if counts[-1] >= n_blocks:
            raise UserError(f"cannot remove {counts[-1]} of {n_blocks} blocks: at least one must stay")
        missing = [n for n in self.heal_at if n not in counts or n == 0]
        if missing:
            raise UserError(f"--heal-at {missing}: heal only points that are built (removing {counts[1:]} blocks)")
        return counts

    @property
    def types(self) -> tuple[str, ...]:
        return self.gguf_types if self.target is Target.gguf else self.onnx_types

    def point_plan(self, n: int, healed: bool) -> Plan:
        # An ONNX point is built at fp32 with its checkpoint kept: the other precisions are exported from it.
        export = ExportPlan(target=Target.gguf) if self.target is Target.gguf else \
            ExportPlan(target=Target.onnx, onnx_precision=OnnxPrecision.fp32, keep_hf=True)
        return self.build.model_copy(update={
            "remove": n, "ratio": None, "heal": (self.build.heal or HealPlan()) if healed else None,
            "export": export, "evaluation": None})


def check(plan: FrontierPlan, out: Path, force: bool):
    """Everything that can be checked before a model loads: output, texts, tools, the points."""
    from exporters.gguf_export import GGUFType

    from .preflight import check_output, inspect, require_export_tools

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
        from exporters.onnx_export import check_supported

        check_supported(inspected.spec)
    return inspected, plan.counts(inspected.n_blocks)


def source_file_type(path: Path) -> str:
    """The GGUF's general.file_type as llama.cpp names it (q4_1, q4_k_m, ...)."""
    from exporters.gguf_prune import model_info, open_gguf

    from .export import file_type_name

    return file_type_name(model_info(open_gguf(path), path).file_type)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def pareto(points: list[dict], better_x) -> list[bool]:
    """Whether each point is on the front of quality (lower ppl is better) against an axis where
    `better_x(a, b)` says a is at least as good as b; ties on both count as not beaten."""
    flags = []
    for p in points:
        beaten = False
        for q in points:
            if q is p:
                continue
            if q["ppl_primary"] <= p["ppl_primary"] and better_x(q, p) and (
                    q["ppl_primary"] < p["ppl_primary"] or not better_x(p, q)):
                beaten = True
                break
        flags.append(not beaten)
    return flags


def _point_name(n: int, healed: bool) -> str:
    return f"remove-{n}" + ("-healed" if healed else "")


def work_dir(out: Path) -> Path:
    """Where an unfinished run keeps its complete points (beside `out`, hidden): a run interrupted
    after an hour of builds and measurements resumes from them; a finished run moves them into `out`."""
    return out.parent / f".{out.name}.work"


def _same_plan(work: Path, plan: FrontierPlan, model: str) -> bool:
    stamp = work / "plan.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == {"model": model, "plan": json.loads(plan.model_dump_json())}


def _built(folder: Path, point_plan: Plan):
    """The manifest of a complete earlier build of this very point, else None."""
    from .manifest import PruningManifest

    if not (folder / MANIFEST_NAME).is_file():
        return None
    manifest = PruningManifest.read(folder)
    return manifest if manifest.plan == point_plan and manifest.exports and (folder / manifest.exports[0].file).is_file() else None


def _quantized(base: Path, target: Path, ftype: str) -> None:
    """llama.cpp's quantizer into a temporary name, renamed when complete (resumable)."""
    from exporters import llamacpp

    if target.is_file():
        return
    partial = target.with_name(target.name + ".partial")
    llamacpp.quantize(base, partial, ftype)
    partial.rename(target)


def _bytes(path: Path) -> int:
    """A GGUF file's size, or an ONNX export folder's."""
    from exporters.onnx_export import folder_bytes

    return folder_bytes(path) if path.is_dir() else path.stat().st_size


def _measured(p: dict, windows: dict, primary: str, reference: Path, plan: FrontierPlan, cached: bool) -> dict:
    """Quality of one point in its runtime, kept beside it (resumable; stamped with the windows)."""
    from exporters import llamacpp, onnx_export

    cache = p["file"].with_name(p["file"].name + ".quality.json") if cached else None
    stamp = {"windows": {k: [len(w), w.shape[1], int(w.sum())] for k, w in windows.items()}, "kl_windows": plan.kl_windows,
             "bytes": _bytes(p["file"])}
    if cache is not None and cache.is_file():
        hit = json.loads(cache.read_text())
        if hit["stamp"] == stamp:
            return hit["quality"]
    quality = {"ppl": {}}
    for name, w in windows.items():
        ref = reference if name == primary else None
        if plan.target is Target.gguf:
            got = llamacpp.compare(p["file"], w, reference=ref, kl_windows=plan.kl_windows, n_threads=plan.threads)
        else:
            got = onnx_export.compare(p["file"], w, reference=ref, kl_windows=plan.kl_windows, threads=plan.threads)
        quality["ppl"][name] = got["ppl"]
        if name == primary:
            quality["kl_to_dense"], quality["top1_agreement"] = got["kl_to_dense"], got["top1_agreement"]
    if cache is not None:
        cache.write_text(json.dumps({"stamp": stamp, "quality": quality}))
    return quality


def _token_ids(inspected, dense_gguf: Path | None, text: str):
    """The held-out text as token ids, from the tokenizer alone (no weights loaded): llama.cpp's for
    a GGUF source, the checkpoint's own otherwise."""
    import numpy as np

    if dense_gguf is not None:
        from exporters import llamacpp

        return np.array(llamacpp.tokenize(dense_gguf, text))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inspected.source.location)
    return np.array(tokenizer(text, add_special_tokens=False)["input_ids"])


def _quantized_points(bases: list[dict], plan: FrontierPlan, work: Path, reporter: Reporter) -> list[dict]:
    """--target gguf: every base file and its llama.cpp quantizations."""
    from exporters.gguf_export import GGUF_TYPES, GGUFType

    points = []
    # The point as built (or as given) is of its own type already (same file name, same weights): not quantized again.
    todo = [(b, [t for t in plan.gguf_types if t != b["type"].split()[0]]) for b in bases]
    with reporter.task("quantizing with llama.cpp", sum(len(types) for _, types in todo)) as advance:
        for base, types in todo:
            folder = base["file"].parent if base["build"] else work / _point_name(0, False)
            folder.mkdir(exist_ok=True)
            points.append({**base})
            for name in types:
                target = folder / f"{base['file'].name.split('.')[0]}.{name}.gguf"
                _quantized(base["file"], target, GGUF_TYPES[GGUFType(name)].llama_ftype)
                points.append({**base, "file": target, "type": name})
                advance(name)
    return points


def _onnx_export(hf: Path, folder: Path, precision: str, blocks: int) -> Path:
    """One precision of a checkpoint's ONNX export, in `folder` (fp32: `onnx/`, as build writes it;
    others `onnx-PRECISION/`); made in a hidden folder and renamed when complete (resumable)."""
    from .export import onnx_from_folder

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


def _exported_points(bases: list[dict], plan: FrontierPlan, reporter: Reporter) -> list[dict]:
    """--target onnx: every base checkpoint exported at each precision by the model builder."""
    points = []
    with reporter.task("exporting ONNX (onnxruntime-genai model builder)", len(bases) * len(plan.onnx_types)) as advance:
        for base in bases:
            for precision in plan.onnx_types:
                folder = _onnx_export(base["hf"], base["hf"].parent, precision, base["blocks"])
                points.append({**base, "file": folder, "type": precision})
                advance(f"{base['removed_blocks']} removed, {precision}")
    return points


def run(plan: FrontierPlan, out: Path, force: bool = False, reporter: Reporter = QUIET, command: str | None = None) -> dict:
    """Build every point, measure them in their runtime, and write `out` at once: every model, each
    build's pruning.json, frontier.json / frontier.md / frontier.png. Returns the frontier."""
    from exporters import llamacpp, onnx_export

    from .cli.common import load_for_plan
    from .load import default_model_path
    from .repack import save_checkpoint

    inspected, counts = check(plan, out, force)
    onnx = plan.target is Target.onnx
    source = inspected.source
    dense_gguf = Path(source.location) / source.gguf_file if source.kind == "gguf" else None
    texts = {name: read_text_source(name, "evaluation") for name in plan.texts}
    contention = Contention()
    # Held-out windows, from the tokenizer alone, before any weights load.
    windows = {}
    for name, text in texts.items():
        ids = _token_ids(inspected, dense_gguf, text)
        n = min(plan.windows, len(ids) // plan.seq_len)
        if n < 1:
            raise UserError(f"--eval {name} has {len(ids)} tokens: fewer than one window of {plan.seq_len}")
        windows[name] = ids[: n * plan.seq_len].reshape(n, plan.seq_len)

    work = work_dir(out)
    if work.exists() and not _same_plan(work, plan, source.describe()):
        shutil.rmtree(work)  # points of another frontier: not reusable
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps({"model": source.describe(), "plan": json.loads(plan.model_dump_json())}))

    source_type = source_file_type(dense_gguf) if dense_gguf is not None else None
    dense_hf = work / _point_name(0, False) / "hf"  # --target onnx: the unpruned checkpoint every precision is exported from
    builds = [(n, False) for n in counts if n > 0] + [(n, True) for n in counts if n in plan.heal_at]
    done = {b: _built(work / _point_name(*b), plan.point_plan(*b)) for b in builds}
    needs_dense_hf = onnx and not (dense_hf / "config.json").is_file()
    if any(m is None for m in done.values()) or needs_dense_hf:
        # Loaded once for every build (a healed one needs the whole model in memory); the
        # calibration text is made once too (calibration_batches keeps it on the model).
        loaded = load_for_plan(inspected, plan.point_plan(*builds[-1]) if builds else plan.build, reporter)
        if needs_dense_hf:
            with reporter.task("writing the unpruned checkpoint (for its ONNX exports)", None), \
                    atomic_dir(dense_hf, force=True) as tmp:
                save_checkpoint(loaded, range(inspected.n_blocks), [], tmp)
        for b, manifest in done.items():
            if manifest is None:
                reporter.say(f"building: {b[0]} blocks removed" + (", healed" if b[1] else ""))
                done[b] = pipeline.build(loaded, plan.point_plan(*b), work / _point_name(*b), force=True, reporter=reporter)
        del loaded
        gc.collect()

    if onnx:
        bases = [{"removed_blocks": 0, "removed": [], "healed": False, "hf": dense_hf, "blocks": inspected.n_blocks, "build": None}]
        for (n, healed), manifest in done.items():
            bases.append({"removed_blocks": n, "removed": manifest.removed, "healed": healed, "hf": work / _point_name(n, healed) / "hf",
                          "blocks": manifest.blocks_after, "build": manifest.timings_s})
        points = _exported_points(bases, plan, reporter)
        for p in points:
            del p["hf"], p["blocks"]
        # The reference is the unpruned model's fp32 export: ONNX has no "model as given".
        reference = points[0]["file"]
    else:
        bases = [{"removed_blocks": 0, "removed": [], "healed": False, "file": dense_gguf, "type": f"{source_type} (as given)", "build": None}]
        for (n, healed), manifest in done.items():
            [export] = manifest.exports
            bases.append({"removed_blocks": n, "removed": manifest.removed, "healed": healed, "file": work / _point_name(n, healed) / export.file,
                          "type": f"{export.format_type} (in place)", "build": manifest.timings_s})
        points = _quantized_points(bases, plan, work, reporter)
        reference = dense_gguf

    primary = plan.texts[0]
    runtime = RUNTIME[plan.target]
    with reporter.task(f"measuring quality in {runtime}", len(points)) as advance:
        for p in points:
            p.update(_measured(p, windows, primary, reference, plan, cached=p["file"].is_relative_to(work)))
            p["ppl_primary"] = p["ppl"][primary]
            p["bytes"] = _bytes(p["file"])
            advance(f"{p['removed_blocks']} removed, {p['type']}: ppl {p['ppl_primary']:.2f}")

    # The times are what a busy machine falsifies: the load is taken over the timing too, on its own.
    timing = Contention()
    speed_runtime = "onnxruntime-genai" if onnx else "llama.cpp"
    with reporter.task(f"timing {len(points)} models side by side in {speed_runtime}", plan.speed_repeats) as advance:
        if onnx:
            runs = onnx_export.speeds([p["file"] for p in points], plan.speed_repeats, plan.prompt_tokens, plan.decode_tokens,
                                      threads=plan.threads, on_round=advance)
        else:
            runs = llamacpp.speeds([p["file"] for p in points], plan.speed_repeats, plan.prompt_tokens, plan.decode_tokens,
                                   n_threads=plan.threads, on_round=advance)
    for p, r in zip(points, runs):
        p["prefill_ms"], p["decode_tok_s"] = _stats(r["prefill_ms"]), _stats(r["decode_tok_s"])

    as_given = points[0]
    for p in points:
        p["speedup"] = p["decode_tok_s"]["median"] / as_given["decode_tok_s"]["median"]
        p["ppl_increase"] = p["ppl_primary"] / as_given["ppl_primary"] - 1
    for p, on in zip(points, pareto(points, lambda a, b: a["bytes"] <= b["bytes"])):
        p["on_size_front"] = on
    for p, on in zip(points, pareto(points, lambda a, b: a["decode_tok_s"]["median"] >= b["decode_tok_s"]["median"])):
        p["on_speed_front"] = on
    for p in points:
        p["file"] = str(p["file"].relative_to(work)) if p["file"].is_relative_to(work) else str(p["file"])

    reference_name = "the unpruned model's fp32 export" if onnx else "the model as given"
    frontier = {
        "command": command, "model": source.describe(), "default_model": dense_gguf == default_model_path(),
        "target": plan.target.value, "runtime": runtime, "speed_runtime": speed_runtime, "reference": reference_name,
        "n_blocks": inspected.n_blocks, "source_type": source_type,
        "plan": json.loads(plan.model_dump_json()), "primary_text": primary,
        "eval": {name: f"first {len(w)} x {plan.seq_len} tokens ({'llama.cpp' if dense_gguf else 'the model'}'s tokenizer)"
                 for name, w in windows.items()},
        "kl": f"KL({reference_name} || point) and top-1 agreement over the first {min(plan.kl_windows, len(windows[primary]))} windows of {primary}",
        "speed": f"prefill of {plan.prompt_tokens} tokens and greedy decode of {plan.decode_tokens}, {speed_runtime} with {plan.threads} "
                 f"threads, {plan.speed_repeats} rounds, every model in turn",
        "machine": machine_line(f"{speed_runtime} with {plan.threads} threads"),
        "points": points,
        "contention": contention.summary(), "timing_contention": timing.summary(),
    }
    with atomic_dir(out, force) as tmp:
        (tmp / FRONTIER_JSON).write_text(json.dumps(frontier, indent=2, default=str) + "\n")
        (tmp / "frontier.md").write_text(report(frontier))
        chart(frontier, tmp / "frontier.png")
        # Last, so that a failure above leaves the work folder whole for the next run.
        for entry in work.iterdir():
            if entry.name != "plan.json":
                entry.rename(tmp / entry.name)
        for cache in tmp.glob("*/*.quality.json"):
            cache.unlink()
        for checkpoint in tmp.glob("*/hf"):  # --target onnx: what the exports were made from, not a point
            shutil.rmtree(checkpoint)
    shutil.rmtree(work, ignore_errors=True)
    return frontier


def label(p: dict) -> str:
    return f"{p['removed_blocks']} removed{' healed' if p['healed'] else ''}, {p['type']}"


def report(frontier: dict) -> str:
    points, primary = frontier["points"], frontier["primary_text"]
    others = [t for t in points[0]["ppl"] if t != primary]
    lines = [
        f"# Prune x quantize frontier: {Path(frontier['model']).name}",
        "",
        f"Command: `{frontier['command']}`" if frontier.get("command") else "",
        "",
        (f"Every point measured in one run: quality in {frontier['runtime']}, speed in {frontier['speed_runtime']}. "
         if frontier.get("target") == Target.onnx.value else "Every point measured in llama.cpp in one run. ")
        + "Quality: perplexity on "
        + "; ".join(f"{k} ({v})" for k, v in frontier["eval"].items()) + f"; {frontier['kl']}. "
        f"Speed: {frontier['speed']}; median (min-max). Machine: {frontier['machine']}.",
        "Whole run: " + contention_line(frontier["contention"]),
        "While timing: " + contention_line(frontier["timing_contention"]) if "timing_contention" in frontier else "",
        "",
        "| blocks removed | removed | type | size MiB | ppl " + Path(primary).name + " | " + " | ".join(f"ppl {Path(t).name}" for t in others)
        + (" | " if others else "") + "KL | top-1 | prefill ms | decode tok/s | speedup | front: size | front: speed |",
        "|---" * (12 + len(others)) + "|",
    ]
    for p in points:
        d, f = p["decode_tok_s"], p["prefill_ms"]
        lines.append(
            f"| {p['removed_blocks']}{' healed' if p['healed'] else ''} | {p['removed']} | {p['type']} | {p['bytes'] / 2**20:.1f} | "
            f"{p['ppl_primary']:.2f} | " + "".join(f"{p['ppl'][t]:.2f} | " for t in others)
            + f"{p['kl_to_dense']:.4f} | {p['top1_agreement']:.1%} | {f['median']:.1f} ({f['min']:.1f}-{f['max']:.1f}) | "
            f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {p['speedup']:.2f}x | "
            f"{'yes' if p['on_size_front'] else ''} | {'yes' if p['on_speed_front'] else ''} |")
    lines += ["", *answer(frontier), ""]
    return "\n".join(lines) + "\n"


def answer(frontier: dict) -> list[str]:
    """The question the frontier is for, answered from its own points."""
    points = frontier["points"]
    out = []
    for front, what in (("on_size_front", "quality against size"), ("on_speed_front", "quality against decode speed")):
        pruned = [label(p) for p in points if p[front] and p["removed_blocks"] > 0]
        dense = [label(p) for p in points if p[front] and p["removed_blocks"] == 0]
        if pruned:
            out.append(f"- Front of {what}: pruned points on it: {', '.join(pruned)}; unpruned: {', '.join(dense) or 'none'}.")
        else:
            out.append(f"- Front of {what}: no pruned point is on it; every pruned point is beaten by an unpruned "
                       f"quantization ({', '.join(dense)}): a lower quantization pays more than removing blocks here.")
    if frontier.get("target") == Target.onnx.value and frontier.get("source_type") not in (None, "f32", "f16", "bf16"):
        out.append(f"- The model as given is {frontier['source_type']}: its fp32 export holds those rounded weights (the reference "
                   "the KL is taken to), and int4 rounds them again.")
    elif frontier.get("source_type") not in (None, "f32", "f16", "bf16"):
        out.append(f"- The model as given is {frontier['source_type']}: every other type is made from its weights, so "
                   "f16 and q8_0 carry its quantization error (they cannot beat it by more than the rounding of the "
                   "activations), and a lower type rounds already rounded weights again.")
    return out


def chart(frontier: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, primary = frontier["points"], frontier["primary_text"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x_of, xlabel, front in (
            (axes[0], lambda p: p["bytes"] / 2**20, "size (MiB)", "on_size_front"),
            (axes[1], lambda p: p["decode_tok_s"]["median"], f"decode tokens/s ({frontier.get('speed_runtime', 'llama.cpp')})", "on_speed_front")):
        for n in sorted({p["removed_blocks"] for p in points}):
            for healed in (False, True):
                group = [p for p in points if p["removed_blocks"] == n and p["healed"] == healed]
                if group:
                    ax.scatter([x_of(p) for p in group], [p["ppl_primary"] for p in group], marker="^" if healed else "o",
                               label=f"{n} removed{' healed' if healed else ''}")
        best = sorted((p for p in points if p[front]), key=x_of)
        ax.plot([x_of(p) for p in best], [p["ppl_primary"] for p in best], "k--", lw=1, label="front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"perplexity, {Path(primary).name}")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"prune x quantize: {Path(frontier['model']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
