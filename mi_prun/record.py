"""Assemble `pruning.json` from a plan and what the run measured and decided."""

from __future__ import annotations

import resource
import sys

from . import distributed
from .calibration import canonical_source, diversity
from .compensate import can_compensate
from .manifest import (CalibrationInfo, CompensationInfo, CompensationRun, DistributedInfo, ExportInfo, PruningManifest, QualityInfo,
                       LinearAttentionInfo, SublayerInfo, package_versions, unit_name)
from .plan import Estimator, Plan
from .replay import shapes_of
from .sublayer_maps import projection


def sublayer_info(result, spec) -> SublayerInfo | None:
    decision = result.sublayers
    if decision is None:
        return None
    return SublayerInfo(removed=[unit_name(u) for u in decision.removed], removed_units=decision.removed,
                        dropped_blocks=decision.dropped, bytes_removed=sum(decision.sizes[u] for u in decision.removed),
                        budget_bytes=decision.budget_bytes, unit_bytes=decision.sizes, unit_scores=decision.scores.block_table(),
                        linear_attention=[LinearAttentionInfo(block=m.block, weight=projection(spec, 2 * m.block), ridge=m.ridge,
                                                              heldout_error_ratio=m.heldout_ratio, fit_error_ratio=m.fit_ratio)
                                          for m in decision.linear],
                        linear_candidates_nll=decision.linear_nll, calibration_nll=decision.calibration_nll)


def _run_weight(spec, r) -> str | None:
    """The weight holding a sublayer run's map: the slot's output projection, or the one folded into."""
    unit = 2 * r.slot if r.slot is not None else r.prev
    return projection(spec, unit) if unit is not None else None


def compensation_info(loaded, plan: Plan, result) -> CompensationInfo:
    if not plan.compensate:
        return CompensationInfo(enabled=False, note="disabled (--no-compensate)")
    if not can_compensate(loaded.spec):
        return CompensationInfo(
            enabled=False, note=f"{loaded.spec.model_type}: no weight before the residual add to fold a map into"
        )
    samples = plan.compensation_samples or plan.calibration.n_samples
    if result.sublayers is not None:  # runs of units: first, last and folded_into are unit indices
        return CompensationInfo(enabled=True, samples=samples, form=loaded.spec.compensation_fold.value, runs=[
            CompensationRun(first=r.first, last=r.last, folded_into=r.prev, weight=_run_weight(loaded.spec, r), slot=r.slot,
                            ridge=r.ridge, heldout_error_ratio=r.heldout_ratio, fit_error_ratio=r.fit_ratio)
            for r in result.sublayers.maps
        ], note="--granularity sublayer: runs of units (2b: block b's attention, 2b+1: its feed-forward network), each fitted on the dense model's states"
           + ("; a run with `slot` carries its map in that block's attention slot (deci linear attention)" if plan.run_map_slots else ""))
    weight = f"{loaded.spec.residual_projection}.weight"
    runs = [
        CompensationRun(
            first=r.first, last=r.last, folded_into=r.prev, weight=weight if r.prev is not None else None,
            ridge=r.ridge, heldout_error_ratio=r.heldout_ratio, fit_error_ratio=r.fit_ratio,
        )
        for r in result.compensation
    ]
    note = "a run starting at block 0 has no block before it: removed without compensation" if any(r.prev is None for r in result.compensation) else None
    return CompensationInfo(enabled=True, samples=samples, runs=runs, note=note, form=loaded.spec.compensation_fold.value)


def distributed_info() -> DistributedInfo | None:
    if not distributed.active():
        return None
    traffic = distributed.TRAFFIC
    return DistributedInfo(ranks=distributed.world(), backend=distributed.backend(), reductions=traffic.reductions,
                           reduced_mib=round(traffic.bytes / 2**20, 3))


def peak_gpu_mib(device) -> float | None:
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_manifest(loaded, plan: Plan, result, quality: QualityInfo | None = None, exports: list[ExportInfo] = ()) -> PruningManifest:
    cal = plan.calibration
    scores = result.scores
    return PruningManifest(
        plan=plan,
        source_model=loaded.source.describe(),
        architecture=loaded.spec.model_type,
        shapes=shapes_of(loaded.model.config.to_dict()),
        blocks_before=result.n_blocks,
        blocks_after=len(result.kept),
        method=plan.method.value,
        estimator=plan.estimator.value,
        view=plan.view.value,
        seed=plan.seed,
        removed=result.removed,
        kept=result.kept,
        block_scores=scores.block_table() if scores else {},
        run_scores=scores.run_scores() if scores else [],
        selection=result.selection,
        compensation=compensation_info(loaded, plan, result),
        calibration=CalibrationInfo(
            source=canonical_source(cal.source),
            n_samples=cal.n_samples,
            seq_len=cal.seq_len,
            tokens_observed=scores.tokens if scores else 0,
            max_tokens_sampled=None if plan.estimator is Estimator.token else plan.max_tokens,
            seed=cal.seed,
            diversity=diversity(result.calibration_ids) if result.calibration_ids is not None else {},
        ),
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        execution=loaded.execution.value,
        distributed=distributed_info(),
        heal=result.heal,
        sublayers=sublayer_info(result, loaded.spec),
        peak_rss_mib=round(peak_rss_bytes() / 2**20, 1),
        peak_gpu_mib=peak_gpu_mib(loaded.device),
        peak_rss_mib_after=dict(result.peak_rss_mib),
        timings_s={k: round(v, 3) for k, v in result.timings.items()},
        profile_s=dict(result.profile),
        block_forwards=dict(result.block_forwards),
        versions=package_versions(),
        quality=quality,
        exports=list(exports),
    )
