"""`frontier`: build every point, measure each in its runtime, write the frontier folder at once."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from ..atomic import atomic_dir
from ..frontier.measure import (Candidate, built, check, exported_candidates, held_out_windows, measured_points,
                                prepare_work, quantized_candidates, source_file_type)
from ..frontier.points import RUNTIME, SPEED_RUNTIME, Build, Frontier, FrontierPlan, point_name, with_fronts
from ..frontier.report import write
from ..machine import Contention, machine_line
from ..manifest import PruningManifest
from ..plan import Target
from ..preflight import Inspected
from ..progress import QUIET, Reporter
from .loading import load_for_plan


def frontier(plan: FrontierPlan, out: Path, force: bool = False, reporter: Reporter = QUIET, command: str | None = None) -> Frontier:
    """Build every point, measure them in their runtime, and write `out` at once: every model, each
    build's pruning.json, frontier.json / frontier.md / frontier.png. Returns the frontier."""
    inspected, counts = check(plan, out, force)
    source = inspected.source
    dense_gguf = Path(source.location) / source.gguf_file if source.kind == "gguf" else None
    contention = Contention()
    windows = held_out_windows(plan, inspected, dense_gguf)  # before any weights load
    work = prepare_work(out, plan, source.describe())
    source_type = source_file_type(dense_gguf) if dense_gguf is not None else None
    manifests = _builds(plan, inspected, counts, work, reporter)
    if plan.target is Target.onnx:
        candidates = exported_candidates(_checkpoints(manifests, work, inspected.n_blocks), plan, reporter)
        reference = candidates[0].file  # the unpruned model's fp32 export: ONNX has no "model as given"
    else:
        bases = [Candidate(0, [], False, dense_gguf, f"{source_type} (as given)", None)] + [
            Candidate(b.n, m.removed, b.healed, work / point_name(b) / m.exports[0].file, f"{m.exports[0].format_type} (in place)",
                      m.timings_s, granularity=m.plan.granularity, removed_sublayers=m.sublayers.removed if m.sublayers else None,
                      linear_attention=[a.block for a in m.sublayers.linear_attention] if m.sublayers and m.sublayers.linear_attention else None)
            for b, m in manifests.items()]
        candidates = quantized_candidates(bases, plan, work, reporter)
        reference = dense_gguf
    points, timing = measured_points(candidates, windows, reference, plan, work, reporter)
    result = _frontier(plan, inspected, dense_gguf, source_type, windows, with_fronts(points), command,
                       contention.summary(), timing)
    _write(result, work, out, force)
    return result


def _builds(plan: FrontierPlan, inspected: Inspected, counts: list[int], work: Path,
            reporter: Reporter) -> dict[Build, PruningManifest]:
    """Every pruned point built by `build` (those complete from an interrupted run kept); for ONNX,
    the unpruned checkpoint too. The model loads once for all of them."""
    from .. import pipeline
    from ..repack import save_checkpoint

    builds = plan.builds(counts)
    done = {b: built(work / point_name(b), plan.point_plan(b)) for b in builds}
    dense_hf = work / point_name(Build(0)) / "hf"
    needs_dense_hf = plan.target is Target.onnx and not (dense_hf / "config.json").is_file()
    if all(m is not None for m in done.values()) and not needs_dense_hf:
        return done
    # Loaded once for every build (a healed one needs the whole model in memory); the
    # calibration text is made once too (calibration_batches keeps it on the model).
    loaded = load_for_plan(inspected, plan.point_plan(_widest(builds)) if builds else plan.build, reporter)
    if needs_dense_hf:
        with reporter.task("writing the unpruned checkpoint (for its ONNX exports)", None), atomic_dir(dense_hf, force=True) as tmp:
            save_checkpoint(loaded, range(inspected.n_blocks), [], tmp)
    for b, manifest in done.items():
        if manifest is None:
            reporter.say(f"building: {b.n} blocks removed" + (", healed" if b.healed else "")
                         + (" (that many blocks' worth of sublayers)" if b.sublayer else "")
                         + (f", {b.linear} attentions as linear maps" if b.linear else ""))
            done[b] = pipeline.build(loaded, plan.point_plan(b), work / point_name(b), force=True, reporter=reporter)
    del loaded
    gc.collect()
    return done


def _widest(builds: list[Build]) -> Build:
    """The build the model is loaded for: a healed one needs the whole model in memory."""
    return next((b for b in builds if b.healed), builds[-1])


def _checkpoints(manifests: dict[Build, PruningManifest], work: Path, n_blocks: int) -> list[Candidate]:
    """--target onnx: the checkpoints every precision is exported from, the unpruned one first."""
    dense = Candidate(0, [], False, None, "", None, hf=work / point_name(Build(0)) / "hf", blocks=n_blocks)
    return [dense] + [Candidate(b.n, m.removed, b.healed, None, "", m.timings_s, hf=work / point_name(b) / "hf",
                                blocks=m.blocks_after) for b, m in manifests.items()]


def _frontier(plan: FrontierPlan, inspected: Inspected, dense_gguf: Path | None, source_type: str | None, windows: dict,
              points, command: str | None, contention: dict, timing: dict) -> Frontier:
    from ..load import default_model_path

    onnx = plan.target is Target.onnx
    primary, speed_runtime = plan.texts[0], SPEED_RUNTIME[plan.target]
    reference = "the unpruned model's fp32 export" if onnx else "the model as given"
    tokenizer = "llama.cpp" if dense_gguf else "the model"
    return Frontier(
        command=command, model=inspected.source.describe(), default_model=dense_gguf == default_model_path(),
        target=plan.target.value, runtime=RUNTIME[plan.target], speed_runtime=speed_runtime, reference=reference,
        n_blocks=inspected.n_blocks, source_type=source_type, plan=plan.model_dump(mode="json"), primary_text=primary,
        eval={name: f"first {len(w)} x {plan.seq_len} tokens ({tokenizer}'s tokenizer)" for name, w in windows.items()},
        kl=f"KL({reference} || point) and top-1 agreement over the first {min(plan.kl_windows, len(windows[primary]))} windows of {primary}",
        speed=f"prefill of {plan.prompt_tokens} tokens and greedy decode of {plan.decode_tokens}, {speed_runtime} with {plan.threads} "
              f"threads, {plan.speed_repeats} rounds, every model in turn",
        long_speed=None if onnx else (
            f"the KV cache llama.cpp keeps for {plan.long_context} tokens (its state after {plan.long_context} tokens less after one); "
            f"greedy decode of {plan.decode_tokens} tokens after a {plan.long_context - plan.decode_tokens}-token prompt, "
            f"{plan.speed_repeats} rounds, every model in turn"),
        machine=machine_line(f"{speed_runtime} with {plan.threads} threads"), points=points,
        contention=contention, timing_contention=timing)


def _write(frontier: Frontier, work: Path, out: Path, force: bool) -> None:
    with atomic_dir(out, force) as tmp:
        write(frontier, tmp)
        # Last, so that a failure above leaves the work folder whole for the next run.
        for entry in work.iterdir():
            if entry.name != "plan.json":
                entry.rename(tmp / entry.name)
        for cache in tmp.glob("*/*.quality.json"):
            cache.unlink()
        for checkpoint in tmp.glob("*/hf"):  # --target onnx: what the exports were made from, not a point
            shutil.rmtree(checkpoint)
    shutil.rmtree(work, ignore_errors=True)
