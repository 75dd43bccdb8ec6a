"""The pruning core: calibrate -> capture -> estimate -> select, then repack. The CLI only calls this."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import select
from .archs import block_count
from .atomic import atomic_dir, check_target
from .blockset import apply_keep, blocks_kept, keep_indices
from .calibration import CalibrationSpec, calibration_batches, canonical_source
from .capture import capture_boundaries
from .compensate import RunCompensation, applied, fit_compensation, fold_in
from .errors import UserError
from .evaluate import perplexity
from .load import LoadedModel
from .manifest import (
    Candidate,
    CalibrationInfo,
    CompensationInfo,
    CompensationRun,
    PruningManifest,
    RunScore,
    SelectionInfo,
    package_versions,
)
from .progress import QUIET, Reporter
from .scoring import BoundaryMI, CapturePlan, Estimator, StateView


class Method(str, Enum):
    mi_prun = "mi-prun"
    mi_prun_exact = "mi-prun-exact"
    shortgpt = "shortgpt"
    angular = "angular"
    sleb = "sleb"
    ppl = "ppl"
    random = "random"


@dataclass(frozen=True)
class PruneOptions:
    method: Method = Method.mi_prun
    estimator: Estimator = Estimator.token
    view: StateView = StateView.raw
    remove: int | None = None
    ratio: float | None = None
    calibration: CalibrationSpec = CalibrationSpec()
    max_tokens: int = 2048  # token sample kept for the population estimators
    top_k: int | None = None  # Fast-Block-Select candidate runs (default 3N)
    verify: bool = True  # score differing MI-PRUN proposals by calibration NLL
    compensate: bool = True  # fold a fitted linear map for each removed run into the block before it
    # Calibration windows for the compensation fits (same source); None: the scoring windows.
    # A fit of d x d maps gains from more tokens than scoring needs; the compensated verification
    # of MI-PRUN's proposals uses these windows too, so it scores maps like the ones shipped.
    compensation_samples: int | None = None
    batch_size: int = 4
    seed: int = 0


def check_compensation_samples(samples: int | None) -> None:
    if samples is not None and samples < 1:
        raise UserError(f"--compensation-samples must be at least 1, got {samples}")


def blocks_to_remove(n_blocks: int, remove: int | None, ratio: float | None) -> int:
    if (remove is None) == (ratio is None):
        raise UserError("give exactly one of --remove N or --ratio R")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise UserError(f"--ratio must lie strictly between 0 and 1, got {ratio}")
        remove = round(ratio * n_blocks)
    if remove < 1:
        raise UserError(f"must remove at least one block (asked for {remove} of {n_blocks})")
    if remove >= n_blocks:
        raise UserError(f"cannot remove {remove} of {n_blocks} blocks: at least one must stay")
    return remove


@dataclass
class Scores:
    """Everything measured on the captured states."""

    n_blocks: int
    boundary_mi: BoundaryMI
    cosine: np.ndarray  # (B, B) token-mean cosine between boundaries
    angular: np.ndarray  # (B, B) token-mean angular distance
    tokens: int

    def block_table(self) -> dict[str, list[float]]:
        n = self.n_blocks
        return {
            "mi": self.boundary_mi.block_scores(n),
            "cost": [self.boundary_mi.run_cost(i, i) for i in range(n)],
            "shortgpt_bi": [float(1.0 - self.cosine[i, i + 1]) for i in range(n)],
            "angular": [float(self.angular[i, i + 1]) for i in range(n)],
        }

    def run_matrix(self) -> np.ndarray:
        """MI of every run as a (start, end) matrix, NaN below the diagonal."""
        n = self.n_blocks
        out = np.full((n, n), np.nan)
        for a in range(n):
            for b in range(a, n):
                out[a, b] = self.boundary_mi(a, b + 1)
        return out


@dataclass
class PruneResult:
    removed: list[int]
    kept: list[int]
    scores: Scores
    selection: SelectionInfo
    calibration_ids: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    compensation: list[RunCompensation] = field(default_factory=list)


def score_model(loaded: LoadedModel, calib_ids: torch.Tensor, options: PruneOptions, reporter: Reporter = QUIET) -> Scores:
    plan = CapturePlan(options.estimator, options.view, options.max_tokens, options.seed)
    batches = list(calib_ids.split(options.batch_size))
    with reporter.task("capturing block boundaries", len(batches)) as advance:
        tokens = capture_boundaries(loaded.model, loaded.spec, batches, plan.observers, on_batch=advance)
    return Scores(
        n_blocks=block_count(loaded.model, loaded.spec),
        boundary_mi=plan.boundary_mi(),
        cosine=plan.stats.mean("cosine"),
        angular=plan.stats.mean("angular"),
        tokens=tokens,
    )


def can_compensate(loaded: LoadedModel) -> bool:
    return loaded.spec.residual_projection is not None


def compensation_for(loaded: LoadedModel, removed: Sequence[int], calib_ids: torch.Tensor, batch_size: int) -> list[RunCompensation]:
    """Fitted maps for `removed` (empty when the architecture has nowhere to fold them)."""
    if not can_compensate(loaded):
        return []
    return fit_compensation(loaded.model, loaded.spec, removed, list(calib_ids.split(batch_size)))


def capture_passes(runs: Sequence[RunCompensation]) -> int:
    return sum(r.prev is not None for r in runs)


class CalibrationEvaluator:
    """Calibration perplexity of the model with some blocks removed; counts its forward passes.

    With `compensate`, each removal is scored as it will be shipped, with its runs' linear maps
    folded in, but never on the windows a map was fitted on: the maps fitted on the even windows
    are scored on the odd ones and vice versa. (Scored on their own fitting windows, selections
    with more runs, hence more fitted parameters, look better than they are.) Cost: per run one
    capture pass over the calibration set, plus the usual pass.

    Give it the compensation windows: maps fitted on too few tokens (576 x 576 from 2,040 tokens)
    rank proposals unlike the maps that ship, and a long run's fit is the first to suffer."""

    def __init__(self, loaded: LoadedModel, calib_ids: torch.Tensor, batch_size: int, advance=None, compensate: bool = False) -> None:
        self.loaded, self.calib_ids, self.batch_size = loaded, calib_ids, batch_size
        self.passes = 0
        self.advance = advance
        self.compensate = compensate
        self.nll: dict[tuple[int, ...], float] = {}

    @property
    def cross_fitted(self) -> bool:
        """Whether removals are scored compensated (needs a weight to fold into and two halves)."""
        return self.compensate and can_compensate(self.loaded) and len(self.calib_ids) >= 2

    def describe(self) -> str:
        windows = f"{len(self.calib_ids)} windows x {self.calib_ids.shape[1]} tokens"
        if self.cross_fitted:
            return f"compensated calibration NLL, maps fitted on one half of {windows} and scored on the other, both ways"
        return f"calibration NLL on {windows}"

    def __call__(self, removed: Sequence[int]) -> float:
        key = tuple(sorted(removed))
        if key in self.nll:
            return self.nll[key]
        n = block_count(self.loaded.model, self.loaded.spec)
        keep = keep_indices(n, removed)
        if self.cross_fitted:
            halves = (self.calib_ids[0::2], self.calib_ids[1::2])
            total = 0.0
            for fit_ids, score_ids in (halves, halves[::-1]):
                runs = compensation_for(self.loaded, removed, fit_ids, self.batch_size)
                with applied(self.loaded.model, self.loaded.spec, runs), blocks_kept(self.loaded.model, self.loaded.spec, keep):
                    total += perplexity(self.loaded.model, score_ids, self.batch_size).nll * len(score_ids)
            self.passes += capture_passes(runs)  # two half passes per run
            nll = total / len(self.calib_ids)
        else:
            with blocks_kept(self.loaded.model, self.loaded.spec, keep):
                nll = perplexity(self.loaded.model, self.calib_ids, self.batch_size).nll
        self.passes += 1
        if self.advance is not None:
            self.advance()
        # NLL rather than perplexity: exp() overflows for a collapsed model, NLL stays comparable.
        self.nll[key] = nll
        return nll


def select_blocks(
    loaded: LoadedModel,
    scores: Scores,
    calib_ids: torch.Tensor,
    options: PruneOptions,
    n_remove: int,
    reporter: Reporter = QUIET,
    verifier: CalibrationEvaluator | None = None,
) -> tuple[list[int], SelectionInfo]:
    """`verifier` scores MI-PRUN's proposals (default: calibration NLL without compensation)."""
    n = scores.n_blocks
    info = SelectionInfo(forward_passes=1)  # the capture pass
    method = options.method
    if method in (Method.mi_prun, Method.mi_prun_exact):
        verifier = verifier or CalibrationEvaluator(loaded, calib_ids, options.batch_size)
        removed = _mi_prun_select(scores, options, n_remove, info, verifier, reporter)
    elif method is Method.shortgpt:
        removed = select.lowest_scores([1.0 - scores.cosine[i, i + 1] for i in range(n)], n_remove)
    elif method is Method.angular:
        removed = select.best_contiguous_run(n, n_remove, lambda a, b: float(scores.angular[a, b + 1]))
    elif method is Method.random:
        removed = select.random_select(n, n_remove, options.seed)
    else:
        total = n if method is Method.ppl else sum(n - k for k in range(n_remove))
        with reporter.task(f"{method.value}: evaluating candidate removals", total) as advance:
            evaluator = CalibrationEvaluator(loaded, calib_ids, options.batch_size, advance)
            if method is Method.sleb:
                removed = select.greedy_eval_select(n, n_remove, evaluator)
            else:
                removed, _ = select.one_shot_eval_select(n, n_remove, evaluator)
        info.forward_passes += evaluator.passes
    return removed, info


class Objective(str, Enum):
    """Forms of the MI-PRUN objective whose optima are proposed; all built from the same run MI.

    channel: a run costs its measured lost fraction exp(-2 I(h_{i-1}; h_j)) (favours one long run);
    per_block: a run costs the sum of its blocks' lost fractions (no interaction, one-shot);
    length: the run's lost fraction times its length (between the two).
    """

    channel = "channel"
    per_block = "per-block"
    length = "length-penalized"


def objective_cost(objective: Objective, bmi: BoundaryMI, n_blocks: int) -> select.RunCost:
    if objective is Objective.per_block:
        return select.additive_over_blocks([bmi.run_cost(i, i) for i in range(n_blocks)])
    return select.length_penalized(bmi.run_cost, 1.0 if objective is Objective.length else 0.0)


def _mi_prun_select(scores: Scores, options: PruneOptions, n_remove: int, info: SelectionInfo, evaluator: CalibrationEvaluator, reporter) -> list[int]:
    """Propose the optimum of each form of the MI objective; verify on calibration text.

    Fast-Block-Select (or the exact DP for mi-prun-exact) solves each objective. When the
    proposals differ and `verify` is on, each is scored by calibration NLL (one forward pass over
    the calibration set per distinct proposal) and the best is kept.
    """
    n = scores.n_blocks
    bmi = scores.boundary_mi
    exact_method = options.method is Method.mi_prun_exact
    # The exact optimum needs every run measured: free for the streamed token estimator,
    # expensive for population estimators, so only then is Fast-Block-Select's gap recorded.
    gap_is_cheap = bmi.table is not None
    for objective in Objective:
        cost = objective_cost(objective, bmi, n)
        if exact_method:
            removed = select.exact_select(n, n_remove, cost)
        else:
            measured_before = bmi.measured
            removed, trace = select.fast_block_select(n, n_remove, [cost(i, i) for i in range(n)], cost, options.top_k)
            info.measured_runs += bmi.measured - measured_before
            info.iterations += trace.iterations
            info.history += trace.history
        exact = removed if exact_method else (select.exact_select(n, n_remove, cost) if gap_is_cheap else None)
        info.candidates.append(
            Candidate(
                objective=objective.value,
                removed=removed,
                objective_cost=select.selection_cost(removed, cost),
                exact_cost=None if exact is None else select.selection_cost(exact, cost),
            )
        )
    if exact_method:
        info.measured_runs = bmi.measured
    distinct = {tuple(c.removed) for c in info.candidates}
    chosen = info.candidates[0]
    if options.verify and len(distinct) > 1:
        nll: dict[tuple[int, ...], float] = {}
        with reporter.task("verifying MI-PRUN proposals on calibration text", len(distinct)) as advance:
            for candidate in info.candidates:
                key = tuple(candidate.removed)
                if key not in nll:
                    nll[key] = evaluator(candidate.removed)
                    advance()
                candidate.calibration_nll = nll[key]
        info.forward_passes += evaluator.passes
        info.verification = evaluator.describe()
        chosen = min(info.candidates, key=lambda c: c.calibration_nll)
    info.objective_cost, info.exact_cost = chosen.objective_cost, chosen.exact_cost
    return chosen.removed


def prune(loaded: LoadedModel, options: PruneOptions, reporter: Reporter = QUIET) -> PruneResult:
    timings: dict[str, float] = {}
    n = block_count(loaded.model, loaded.spec)
    n_remove = blocks_to_remove(n, options.remove, options.ratio)

    start = time.perf_counter()
    reporter.say(f"calibration: {options.calibration.source} ({options.calibration.n_samples} x {options.calibration.seq_len} tokens)")
    calib_ids = calibration_batches(loaded.model, loaded.tokenizer, options.calibration)
    timings["calibrate"] = time.perf_counter() - start

    start = time.perf_counter()
    scores = score_model(loaded, calib_ids, options, reporter)
    timings["capture"] = time.perf_counter() - start

    compensate = options.compensate and can_compensate(loaded)
    fit_ids = calib_ids
    if compensate and options.compensation_samples is not None and options.compensation_samples != options.calibration.n_samples:
        start = time.perf_counter()
        spec = replace(options.calibration, n_samples=options.compensation_samples)
        reporter.say(f"compensation calibration: {spec.source} ({spec.n_samples} x {spec.seq_len} tokens)")
        fit_ids = calibration_batches(loaded.model, loaded.tokenizer, spec)
        timings["calibrate"] += time.perf_counter() - start

    start = time.perf_counter()
    # Compensated proposals are scored with maps fitted like the shipped ones: on the same windows.
    verifier = CalibrationEvaluator(loaded, fit_ids, options.batch_size, compensate=compensate)
    removed, info = select_blocks(loaded, scores, calib_ids, options, n_remove, reporter, verifier)
    timings["select"] = time.perf_counter() - start

    runs: list[RunCompensation] = []
    if compensate:
        start = time.perf_counter()
        with reporter.task("fitting linear compensation for the removed runs", None):
            runs = compensation_for(loaded, removed, fit_ids, options.batch_size)
        info.forward_passes += capture_passes(runs)
        timings["compensate"] = time.perf_counter() - start
    return PruneResult(removed, keep_indices(n, removed), scores, info, calib_ids, timings, runs)


def run_scores(scores: Scores) -> list[RunScore]:
    """Every run's MI, cost and DPI bound (runs up to the whole depth)."""
    bi = scores.boundary_mi
    block_cost = [bi.run_cost(i, i) for i in range(scores.n_blocks)]
    return [
        RunScore(start=a, end=b, mi=bi(a, b + 1), cost=bi.run_cost(a, b), dpi_bound=select.dpi_bound(block_cost, a, b))
        for a in range(scores.n_blocks)
        for b in range(a, scores.n_blocks)
    ]


def compensation_info(loaded: LoadedModel, options: PruneOptions, result: PruneResult) -> CompensationInfo:
    if not options.compensate:
        return CompensationInfo(enabled=False, note="disabled (--no-compensate)")
    if not can_compensate(loaded):
        return CompensationInfo(
            enabled=False, note=f"{loaded.spec.model_type}: a norm follows the MLP output, no linear weight to fold a map into"
        )
    weight = f"{loaded.spec.residual_projection}.weight"
    runs = [
        CompensationRun(
            first=r.first, last=r.last, folded_into=r.prev, weight=weight if r.prev is not None else None,
            ridge=r.ridge, heldout_error_ratio=r.heldout_ratio, fit_error_ratio=r.fit_ratio,
        )
        for r in result.compensation
    ]
    note = "a run starting at block 0 has no block before it: removed without compensation" if any(r.prev is None for r in result.compensation) else None
    samples = options.compensation_samples or options.calibration.n_samples
    return CompensationInfo(enabled=True, samples=samples, runs=runs, note=note)


def build_manifest(loaded: LoadedModel, options: PruneOptions, result: PruneResult) -> PruningManifest:
    cal = options.calibration
    return PruningManifest(
        source_model=loaded.source.describe(),
        architecture=loaded.spec.model_type,
        blocks_before=result.scores.n_blocks,
        blocks_after=len(result.kept),
        method=options.method.value,
        estimator=options.estimator.value,
        view=options.view.value,
        seed=options.seed,
        removed=result.removed,
        kept=result.kept,
        block_scores=result.scores.block_table(),
        run_scores=run_scores(result.scores),
        selection=result.selection,
        compensation=compensation_info(loaded, options, result),
        calibration=CalibrationInfo(
            source=canonical_source(cal.source),
            n_samples=cal.n_samples,
            seq_len=cal.seq_len,
            tokens_observed=result.scores.tokens,
            max_tokens_sampled=None if options.estimator is Estimator.token else options.max_tokens,
            seed=cal.seed,
        ),
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        timings_s={k: round(v, 3) for k, v in result.timings.items()},
        versions=package_versions(),
    )


def write_pruned(loaded: LoadedModel, options: PruneOptions, result: PruneResult, folder: Path) -> PruningManifest:
    """Physically drop the removed blocks and write a plain transformers checkpoint into `folder`."""
    start = time.perf_counter()
    # The fitted maps go in by original block index, so before the blocks are renumbered.
    fold_in(loaded.model, loaded.spec, result.compensation)
    apply_keep(loaded.model, loaded.spec, result.kept)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    result.timings["repack"] = time.perf_counter() - start
    return build_manifest(loaded, options, result)


def save_pruned(loaded: LoadedModel, options: PruneOptions, result: PruneResult, out: Path, force: bool = False) -> PruningManifest:
    """The pruned checkpoint + pruning.json, written all at once into `out`."""
    check_target(out, force)
    with atomic_dir(out, force) as tmp:
        manifest = write_pruned(loaded, options, result, tmp)
        manifest.write(tmp)
    return manifest
