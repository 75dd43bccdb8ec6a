"""The pipeline, top to bottom: calibrate -> capture -> select -> compensate, then repack and export.

Each stage is a function of its own module; this one only orders them, times them and keeps
what they return. Nothing here changes the loaded model for good.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import distributed, sublayers
from .atomic import atomic_dir
from .blockset import keep_indices
from .calibration import calibration_batches
from .compensate import RunCompensation, can_compensate, capture_passes, compensation_for
from .export import HF_SUBDIR, export_pruned
from .heal import fold_healed, heal
from .manifest import HealInfo, PruningManifest, SelectionInfo
from .methods import select_blocks
from .modelcard import write_model_card
from .plan import EvalPlan, Granularity, HealPlan, Method, Objective, Plan
from .profile import PROFILE, minimum_block_forwards, stage_profile
from .progress import QUIET, Reporter
from .quality import measure_quality
from .record import build_manifest, peak_rss_bytes
from .repack import rewritten_weights, save_checkpoint
from .scoring import Scores, chain_scores, score_model
from .sublayer_maps import shipped_weights
from .sublayers import SublayerDecision
from .runner import Windows
from .verify import RemovalScorer, ensure_dense

if TYPE_CHECKING:
    from .load import LoadedModel


@dataclass(frozen=True)
class PruneResult:
    n_blocks: int
    removed: list[int]
    kept: list[int]
    scores: Scores | None  # None when the decision was replayed
    selection: SelectionInfo
    calibration_ids: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)
    compensation: list[RunCompensation] = field(default_factory=list)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # the process's peak so far, after each stage
    healed: dict[str, torch.Tensor] = field(default_factory=dict)  # weights rewritten by healing (beside the maps)
    profile: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: seconds per part of the work
    block_forwards: dict[str, int] = field(default_factory=dict)  # per stage: blocks x windows run
    heal: HealInfo | None = None
    # --granularity sublayer: the units removed (`removed` then holds the blocks both of whose
    # sublayers went, `healed` the zeroed projections of the others).
    sublayers: SublayerDecision | None = None


class Stopwatch:
    """Wall time, its split by kind of work (`profile.py`), the block-forwards run and the
    process's peak memory after each stage, kept apart from the results until a stage's result is
    made (results are not changed once made)."""

    def __init__(self, timings: dict[str, float] | None = None, peaks: dict[str, float] | None = None,
                 parts: dict[str, dict[str, float]] | None = None, forwards: dict[str, int] | None = None):
        self.timings, self.peaks = dict(timings or {}), dict(peaks or {})
        self.parts = {k: dict(v) for k, v in (parts or {}).items()}  # per stage, before "other" is added
        self.forwards = dict(forwards or {})
        self.loading: dict[str, dict[str, float]] = {}  # {"load": the model's load profile}, when a job loaded it

    @classmethod
    def of(cls, result: PruneResult) -> "Stopwatch":
        timed = {stage: split for stage, split in result.profile.items() if stage in result.timings}
        parts = {stage: {k: v for k, v in split.items() if k != "other"} for stage, split in timed.items()}
        watch = cls(result.timings, result.peak_rss_mib, parts, result.block_forwards)
        watch.loading = {stage: split for stage, split in result.profile.items() if stage not in result.timings}
        return watch

    @contextmanager
    def stage(self, name: str, peak: bool = True):
        start, before = time.perf_counter(), PROFILE.snapshot()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        parts, forwards = PROFILE.since(before)
        mine = self.parts.setdefault(name, {})
        for part, seconds in parts.items():
            mine[part] = mine.get(part, 0.0) + seconds
        self.forwards[name] = self.forwards.get(name, 0) + forwards
        if peak:
            self.peaks[name] = round(peak_rss_bytes() / 2**20, 1)

    @property
    def profile(self) -> dict[str, dict[str, float]]:
        out = {stage: stage_profile(parts, self.timings[stage]) for stage, parts in self.parts.items() if stage in self.timings}
        return {**self.loading, **out}

    def results(self) -> dict:
        """The fields of a PruneResult this stopwatch measured."""
        return {"timings": self.timings, "peak_rss_mib": self.peaks, "profile": self.profile, "block_forwards": self.forwards}


def started(loaded: LoadedModel) -> Stopwatch:
    """A pruning run's stopwatch: the peak memory after loading, and loading's profile."""
    watch = Stopwatch(peaks={"load": round(peak_rss_bytes() / 2**20, 1)})
    if loaded.load_profile:
        watch.loading = {"load": dict(loaded.load_profile)}
    return watch


def prune(loaded: LoadedModel, plan: Plan, reporter: Reporter = QUIET) -> PruneResult:
    """Decide which blocks go (or replay a recorded decision) and fit their compensation maps.
    The model runs `plan.batch_size` windows a pass: it was loaded for this plan (`jobs.loading`)."""
    if plan.granularity is Granularity.sublayer:
        return prune_sublayers(loaded, plan, reporter)
    watch = started(loaded)
    runner = loaded.runner
    n = runner.n_blocks
    n_remove = plan.n_remove(n)
    compensate = plan.compensate and can_compensate(loaded.spec)
    cal = plan.calibration
    calib = fit = calib_ids = None
    if plan.replay is None or compensate:
        with watch.stage("calibrate"):
            reporter.say(f"calibration: {cal.source} ({cal.n_samples} x {cal.seq_len} tokens)")
            calib_ids = calibration_batches(loaded, cal)
            # Each rank runs its share of the windows (all of them in one process).
            calib = Windows.share(calib_ids)
            fit = compensation_windows(loaded, plan, calib, reporter)

    scores = None
    if plan.replay is not None:
        removed = list(plan.replay.removed)
        info = SelectionInfo(replayed_from=plan.replay.manifest)
        reporter.say(f"replaying {plan.replay.manifest}: removing blocks {removed}")
    else:
        with watch.stage("capture"):
            # Compensated run costs (the compensated objective, and the ranking of swaps) need the
            # projection taps of the capture pass.
            wants = Objective.compensated in plan.objectives or plan.swaps > 0
            taps = compensate and wants and plan.method in (Method.mi_prun, Method.mi_prun_exact)
            scores = score_model(loaded, calib, plan, reporter, taps=taps)
        with watch.stage("select"):
            removed, info = select_blocks(scores, plan, n_remove, _scorer(loaded, plan, calib, fit, compensate), reporter)

    runs: list[RunCompensation] = []
    if compensate:
        with watch.stage("compensate"), reporter.task("fitting linear compensation for the removed runs", None):
            runs = compensation_for(loaded, removed, ensure_dense(runner, fit))
        info.forward_passes += capture_passes(runs)
    if scores is not None and plan.method in (Method.mi_prun, Method.mi_prun_exact):
        info.block_forwards_minimum = least_block_forwards(n, info, len(calib), len(fit), compensate)
    return PruneResult(n, removed, keep_indices(n, removed), scores, info, calib_ids, compensation=runs, **watch.results())


def compensation_windows(loaded: LoadedModel, plan: Plan, calib: Windows, reporter: Reporter) -> Windows:
    """The windows the compensation maps are fitted on: `calib`, unless the plan compensates this
    model and --compensation-samples asks for another count (then as many from the same source)."""
    cal = plan.calibration
    if not (plan.compensate and can_compensate(loaded.spec)) or plan.compensation_samples in (None, cal.n_samples):
        return calib
    spec = cal.model_copy(update={"n_samples": plan.compensation_samples})
    reporter.say(f"compensation calibration: {spec.source} ({spec.n_samples} x {spec.seq_len} tokens)")
    return Windows.share(calibration_batches(loaded, spec))


def least_block_forwards(n: int, info: SelectionInfo, capture_windows: int, verify_windows: int, compensate: bool) -> int:
    """`profile.minimum_block_forwards` for this selection: its verified candidates (those with a
    calibration NLL), each from its first removed block, or the block before it where a map is
    folded in (compensated verification runs that block with its new weight)."""
    verified = list(dict.fromkeys(tuple(sorted(c.removed)) for c in info.candidates if c.calibration_nll is not None))
    starts = [max(0, p[0] - 1) if compensate and p[0] > 0 else p[0] for p in verified]
    return minimum_block_forwards(n, capture_windows, verified, verify_windows, starts)


def prune_sublayers(loaded: LoadedModel, plan: Plan, reporter: Reporter = QUIET) -> PruneResult:
    """--granularity sublayer: calibrate, capture the chain of sublayers, select (`sublayers.py`)."""
    watch = started(loaded)
    cal = plan.calibration
    with watch.stage("calibrate"):
        reporter.say(f"calibration: {cal.source} ({cal.n_samples} x {cal.seq_len} tokens)")
        ids = calibration_batches(loaded, cal)
        windows = Windows.share(ids)
        # The maps are fitted, and removals scored as shipped, on the compensation windows (their
        # chain captured in one more dense pass where they are windows of their own).
        fit = compensation_windows(loaded, plan, windows, reporter)
    with watch.stage("capture"):
        chain = sublayers.capture_chain(loaded, windows, reporter)
        scores = chain_scores(chain, plan)
        fit_chain = chain if fit is windows else sublayers.capture_chain(loaded, fit, reporter)
    with watch.stage("select"):
        decision, info = sublayers.decide(loaded, plan, scores, fit, fit_chain, reporter)
    info.forward_passes += fit is not windows
    n = loaded.runner.n_blocks
    removed = decision.dropped
    return PruneResult(n, removed, keep_indices(n, removed), None, info, ids, **watch.results(),
                       healed=shipped_weights(loaded, decision.removed, decision.maps, decision.linear), sublayers=decision)


def _scorer(loaded: LoadedModel, plan: Plan, calib: Windows, fit: Windows, compensate: bool) -> RemovalScorer:
    """MI-PRUN's proposals are scored as they ship (compensated, on the compensation windows);
    SLEB and ppl keep their published form: plain removal on the scoring windows."""
    if plan.method in (Method.mi_prun, Method.mi_prun_exact):
        return RemovalScorer(loaded, fit, compensate=compensate)
    return RemovalScorer(loaded, calib)


def heal_result(loaded: LoadedModel, plan: Plan, result: PruneResult, reporter: Reporter = QUIET) -> PruneResult:
    """Distil the pruned model toward the dense one (`heal/`); its weights join the result (a
    healed projection of a compensated block becomes that run's weight)."""
    before = None
    if plan.evaluation is not None:
        before = measure_quality(loaded, result.removed, result.compensation, plan.evaluation, reporter).pruned_ppl
    watch = Stopwatch.of(result)
    with watch.stage("heal"):
        healed = heal(loaded, result.kept, result.removed, result.compensation, plan.heal, plan.seed, reporter)
    return replace(result, healed=fold_healed(result.compensation, healed.weights, loaded.spec),
                   heal=healed.info.model_copy(update={"heldout_before": before}), **watch.results())


def heal_checkpoint(loaded: LoadedModel, manifest: PruningManifest, folder: Path, heal_plan: HealPlan, evaluation: EvalPlan | None,
                    out: Path, force: bool = False, reporter: Reporter = QUIET) -> PruningManifest:
    """`heal`: a pruned checkpoint written earlier (`folder`, its `manifest`), distilled toward the
    dense model it was pruned from (`loaded`), written as a healed checkpoint of the same form."""
    # The stages of this command; a second heal replaces the first one's record of them.
    watch = Stopwatch({k: v for k, v in manifest.timings_s.items() if k not in ("read pruned", "heal", "repack healed")})
    with watch.stage("read pruned", peak=False):
        rewritten = rewritten_weights(loaded, folder, manifest.kept)
    reporter.say(f"{folder}: {len(rewritten)} tensors differ from the dense model (compensated or healed before)")
    before = None
    if evaluation is not None:
        before = measure_quality(loaded, manifest.removed, [], evaluation, reporter, rewritten=rewritten).pruned_ppl
    with watch.stage("heal", peak=False):
        healed = heal(loaded, manifest.kept, manifest.removed, [], heal_plan, manifest.seed, reporter, rewritten=rewritten)
    weights = {**rewritten, **healed.weights}
    quality = measure_quality(loaded, manifest.removed, [], evaluation, reporter, rewritten=weights) if evaluation else None
    info = healed.info.model_copy(update={"heldout_before": before, "heldout_after": quality.pruned_ppl if quality else None})
    with atomic_dir(out, force) as tmp:
        with watch.stage("repack healed", peak=False):
            save_checkpoint(loaded, manifest.kept, [], tmp, weights)
        plan = manifest.plan.model_copy(update={"heal": heal_plan}) if manifest.plan is not None else None
        updated = manifest.model_copy(update={"plan": plan, "heal": info, "quality": quality, "exports": [],
                                              "timings_s": watch.timings, "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1)})
        updated.write(tmp)
    return updated


def save_pruned(loaded: LoadedModel, plan: Plan, result: PruneResult, out: Path, force: bool = False) -> PruningManifest:
    """The pruned checkpoint + pruning.json, written all at once into `out` (by rank 0 alone)."""
    if not distributed.is_main():
        return build_manifest(loaded, plan, result)
    watch = Stopwatch.of(result)
    with atomic_dir(out, force) as tmp:
        with watch.stage("repack"):
            save_checkpoint(loaded, result.kept, result.compensation, tmp, result.healed)
        manifest = build_manifest(loaded, plan, replace(result, **watch.results()))
        manifest.write(tmp)
    return manifest


def build(loaded: LoadedModel, plan: Plan, out: Path, force: bool = False, reporter: Reporter = QUIET) -> PruningManifest:
    """Prune, measure (with --eval), export and check, describe: one output folder, written at once."""
    result = prune(loaded, plan, reporter)
    if plan.heal is not None:
        result = heal_result(loaded, plan, result, reporter)
    quality = None
    if plan.evaluation is not None:
        linear = result.sublayers.linear_blocks if result.sublayers is not None else []
        quality = measure_quality(loaded, result.removed, result.compensation, plan.evaluation, reporter, rewritten=result.healed,
                                  linear_attention=linear)
    if quality is not None and result.heal is not None:
        result = replace(result, heal=result.heal.model_copy(update={"heldout_after": quality.pruned_ppl}))
    if not distributed.is_main():  # every rank took the same decision; rank 0 writes it
        return build_manifest(loaded, plan, result)
    watch = Stopwatch.of(result)
    with atomic_dir(out, force) as tmp:
        with watch.stage("export"):
            export = export_pruned(loaded, plan.export, result, tmp, reporter)
        manifest = build_manifest(loaded, plan, replace(result, **watch.results()),
                                  quality=quality, exports=[export])
        if plan.export.keep_hf:
            manifest.write(tmp / HF_SUBDIR)
        elif (tmp / HF_SUBDIR).exists():
            shutil.rmtree(tmp / HF_SUBDIR)  # the export's input, not asked for
        manifest.write(tmp)
        write_model_card(tmp, manifest, keep_hf=plan.export.keep_hf)
    return manifest


def score_blocks(loaded: LoadedModel, plan: Plan, reporter: Reporter = QUIET) -> tuple[Scores, list[int]]:
    """The scores of one capture pass and the blocks the plan's method would remove (uncompensated
    verification: `score` shows the MI criterion, it ships nothing)."""
    calib = Windows.share(calibration_batches(loaded, plan.calibration))
    scores = score_model(loaded, calib, plan, reporter)
    removed, _ = select_blocks(scores, plan, plan.n_remove(scores.n_blocks), RemovalScorer(loaded, calib), reporter)
    return scores, removed
