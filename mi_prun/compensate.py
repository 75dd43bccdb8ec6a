"""Linear compensation of a removed run of blocks, folded into a weight the model already has.

Removing blocks i..j makes block j+1 read h_{i-1} where it used to read h_j. Block i-1 (kept)
ends by adding its MLP update M to the residual stream: h_{i-1} = Y + M. A map T fitted so that
Y + M T ~ h_j carries the linearly predictable part of the run's work; T folds into the MLP's
output projection (W <- T^T W), so the checkpoint keeps its architecture and loads anywhere.
(ReplaceMe, Shopkhoev et al. 2025, fits the same form; here the fit is a ridge regression shrunk
toward T = I, i.e. toward plain removal, with the strength chosen by cross-validation over
calibration windows, so a run with nothing linear to recover stays a plain removal.)

The maths (fit, residual, choice of ridge) are pure functions of streamed moments (`ridge.py`);
the walks here run the model through the block runner. Families whose residual update ends in a
norm (Gemma 3's post-feed-forward norm) get a per-channel scale instead, folded into that norm's
weight: a norm rescales each token, so no matrix can pass through it, but a diagonal map can.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from . import distributed
from .archs import ArchSpec, Fold
from .ridge import FOLDS, RIDGE_GRID, RunMoments, fit_map, heldout_ratios, pick_ridge, residual, rows_up_to
from .profile import PROFILE, Part
from .select import runs_of


@dataclass
class RunCompensation:
    first: int  # first removed block of the run
    last: int
    prev: int | None  # kept block whose projection absorbs T; None: the run starts at block 0
    ridge: float | None = None
    heldout_ratio: float | None = None  # held-out error / plain-removal error at the chosen ridge
    fit_ratio: float | None = None  # the same on all calibration tokens with the final map
    weight: torch.Tensor | None = None  # the new projection weight (original dtype)
    # Sublayer runs only: the block whose attention slot holds the map as deci's linear attention
    # (`weight` is then W, a = W norm(h)); None: folded into `prev`'s projection.
    slot: int | None = None


@dataclass
class Walk:
    """States of a partly pruned model: what enters block `position` (original numbering), with
    the runs fitted so far removed and compensated. `clean`: nothing has changed yet, so the
    states are the dense ones and any later dense boundary can be read from the cache."""

    position: int
    states: torch.Tensor
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    clean: bool = True


def advance(runner, windows, walk: Walk, target: int) -> Walk:
    """The walk moved on to enter block `target`, running the kept blocks in between."""
    if walk.clean:
        return Walk(target, windows.dense[target])
    states = runner.run_blocks(range(walk.position, target), walk.states, walk.weights)
    return Walk(target, states, walk.weights, clean=False)


def start_walk(windows) -> Walk:
    return Walk(0, windows.dense[0])


def run_moments(m: torch.Tensor, h: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None = None) -> list[RunMoments]:
    """Moments for replacing a run, per fold of windows, from the projection output `m` and the
    output `h` of the block before the run and the run's output `t` (all (windows, seq, hidden));
    each window's first token goes to the sink rows. `index`: the windows' positions in the whole
    set (`Windows.index`), which pick their folds; in a distributed run the moments are summed
    over the ranks, so every rank holds the moments of all the windows."""
    with PROFILE.part(Part.moments):
        m, h, t = (x.double().cpu().numpy() for x in (m, h, t))
        r = t - h + m  # R = h_last - Y with Y = h_prev - M
        positions = range(m.shape[0]) if index is None else index.tolist()
        folds = [RunMoments.zeros(m.shape[-1]) for _ in range(FOLDS)]
        for window, position in enumerate(positions):
            fold = folds[position % FOLDS]
            fold.add(m[window, 1:], r[window, 1:])
            fold.add_sink(m[window, :1], r[window, :1])
    return [_over_ranks(f) for f in folds] if distributed.active() else folds


def _over_ranks(f: RunMoments) -> RunMoments:
    """One fold's moments summed over the ranks; sink rows (and rows kept in place of moments)
    gathered in window order. The form follows the fold's tokens over all ranks, so every rank
    takes the same one."""
    tokens = int(distributed.all_sum(f.tokens))
    rr, ee = distributed.all_sum(f.rr), distributed.all_sum(f.ee)
    sink_m, sink_r = distributed.gather_rows(f.sink_m), distributed.gather_rows(f.sink_r)
    if tokens <= rows_up_to(f.dim):
        return RunMoments(f.dim, rr, ee, tokens, sink_m, sink_r, distributed.gather_rows(f.rows_m), distributed.gather_rows(f.rows_r))
    f.to_moments()
    return RunMoments.of_moments(distributed.all_sum(f.mm), distributed.all_sum(f.mr), rr, ee, tokens, sink_m, sink_r)


FOLD_COLUMNS = 1024  # columns of the projection folded at a time (float64 temporaries stay small)


def folded_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a folded weight is returned in: W's, or float32 for a half-precision W (the fold is
    written to the exported file, which must not carry the bf16 rounding of a CUDA run)."""
    return torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype


def fold_map(t: np.ndarray, weight: torch.Tensor) -> torch.Tensor:
    """T^T W in float64, returned in `folded_dtype(W)`, a block of columns at a time (a linear weight)."""
    tt = torch.from_numpy(t.T)
    dtype = folded_dtype(weight)
    out = torch.empty(weight.shape, dtype=dtype)
    for start in range(0, weight.shape[1], FOLD_COLUMNS):
        cols = slice(start, start + FOLD_COLUMNS)
        out[:, cols] = (tt @ weight[:, cols].double().cpu()).to(dtype)
    return out


def fold_scale(t: np.ndarray, weight: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm weight that scales by (offset + w) t instead of (offset + w), for T = diag(t)."""
    scaled = (weight.double().cpu() + offset) * torch.from_numpy(np.diag(t).copy())
    return (scaled - offset).to(folded_dtype(weight))


def fit_run(record: RunCompensation, folds: list[RunMoments], weight: torch.Tensor, spec: ArchSpec) -> None:
    """Choose the ridge, fit the map and fold it into `weight`, the block's residual projection
    (a linear weight, or a norm's weight for a per-channel fold); the result is stored on `record`."""
    with PROFILE.part(Part.ridge):
        _fit_run(record, folds, weight, spec)


def _fit_run(record: RunCompensation, folds: list[RunMoments], weight: torch.Tensor, spec: ArchSpec) -> None:
    diagonal = spec.compensation_fold is Fold.scale
    # Every rank holds the same (all-reduced) moments: each measures its share of the ridge grid
    # and the held-out ratios are summed (each computed by one rank, zeros elsewhere: exact).
    mine = RIDGE_GRID[distributed.rank()::distributed.world()]
    part = heldout_ratios(folds, mine, diagonal)
    summed = distributed.all_sum(np.array([part.get(r, 0.0) for r in RIDGE_GRID]))
    choice = pick_ridge(dict(zip(RIDGE_GRID, summed.tolist())))
    total = folds[0]  # the folds are not needed once the ridge is chosen: summed in place
    for fold in folds[1:]:
        total.absorb(fold)
    folds.clear()
    t = fit_map(total, choice.ridge, diagonal)
    record.weight = fold_scale(t, weight, spec.norm_scale_offset) if diagonal else fold_map(t, weight)
    record.ridge = choice.ridge
    record.heldout_ratio = choice.heldout_ratio[choice.ridge]
    record.fit_ratio = residual(total, t) / total.ee if total.ee > 0 else 1.0


Memo = dict[tuple[tuple[int, int], ...], tuple[list[RunCompensation], Walk]]


@dataclass
class MemoryBudget:
    """Bytes that memos together may keep alive."""

    left: int


class BudgetMemo(dict):
    """Fits or walks by their leading runs, within a byte budget (shared between memos) for the
    tensors an entry keeps alive (its last fitted weight and its states): a fit of a 7B model's
    projection is 180 MB, and proposals rarely share more than a run or two, so past the budget
    entries are not kept."""

    def __init__(self, budget: MemoryBudget) -> None:
        super().__init__()
        self.budget = budget

    def __setitem__(self, key, value) -> None:
        walk = value if isinstance(value, Walk) else value[1]
        last = walk.weights.get(key[-1][0] - 1) if key else None
        size = sum(t.numel() * t.element_size() for t in (last, walk.states) if t is not None)
        # Ranks hold different shares: a hit on one and a miss on another would desynchronize the
        # fits' collectives, so an entry is kept only where every rank keeps it.
        if distributed.all_true(size <= self.budget.left):
            self.budget.left -= size
            super().__setitem__(key, value)


def skip_run(runner, windows, walk: Walk, record: "RunCompensation") -> Walk:
    """The walk past a removed run: the block before it carries its fitted weight (if any), and
    what entered block `first` now enters block last + 1."""
    if record.weight is None:
        walk = advance(runner, windows, walk, record.first)
        return Walk(record.last + 1, walk.states, walk.weights, clean=False)
    walk = advance(runner, windows, walk, record.prev)
    states = runner.run_block(record.prev, walk.states, record.weight)  # the compensated block, as it ships
    return Walk(record.last + 1, states, {**walk.weights, record.prev: record.weight}, clean=False)


def fit_compensation(runner, spec: ArchSpec, removed: Sequence[int], windows, memo: Memo | None = None) -> tuple[list[RunCompensation], Walk]:
    """Fit one map per removed run, in order, each in the model with the earlier runs already
    removed and compensated (so later fits see the states the pruned model really produces).

    Returns the maps and the walk after the last run (states entering the first block after it),
    from which scoring continues. `windows` must hold their dense boundary states. `memo` shares
    fits between removals that begin with the same runs."""
    runs = runs_of(removed)
    out: list[RunCompensation] = []
    walk = start_walk(windows)
    for k, (first, last) in enumerate(runs):
        key = tuple(runs[: k + 1])
        if memo is not None and key in memo:
            done, walk = memo[key]
            out = list(done)
            continue
        record = RunCompensation(first, last, first - 1 if first > 0 else None)
        if record.prev is not None:
            walk = advance(runner, windows, walk, record.prev)
            tap: list[torch.Tensor] = []
            h = runner.run_block(record.prev, walk.states, tap=tap)
            # Clean: the run's output is the dense boundary after it, already cached.
            t = windows.dense[last + 1] if walk.clean else runner.run_blocks(range(record.prev + 1, last + 1), h, walk.weights)
            fit_run(record, run_moments(tap[0], h, t, windows.index), runner.store.tensor(record.prev, f"{spec.residual_projection}.weight"), spec)
        walk = skip_run(runner, windows, walk, record)
        out.append(record)
        if memo is not None:
            memo[key] = (list(out), walk)
    return out, walk


def first_changed(runs: Sequence["RunCompensation"], rewritten_blocks: Iterable[int] = (), n_blocks: int = 0) -> int:
    """The first block whose input or weights the pruned model changes (`n_blocks` if none): the
    block before a compensated run, the first of a plain one, or a block rewritten in place."""
    return min([r.first if r.weight is None else r.prev for r in runs] + list(rewritten_blocks), default=n_blocks)


def final_states(runner, windows, runs: Sequence["RunCompensation"], memo: dict | None = None,
                 start: int | None = None) -> torch.Tensor:
    """States leaving the last block of the model with `runs` removed (their fitted weights in
    place), from the dense state entering the first changed block. `memo` keeps the walk after
    each leading sequence of runs, for removals that share them (scored on the same windows).
    `start` (at most `first_changed(runs)`): blocks from there on hold weights rewritten in place
    (healed), so the walk runs them rather than reading the dense states cached past it."""
    walk = start_walk(windows) if start is None else Walk(start, windows.dense[start], clean=False)
    for k, record in enumerate(runs):
        key = tuple((r.first, r.last, id(r.weight)) for r in runs[: k + 1])
        if memo is not None and key in memo:
            walk = memo[key]
            continue
        walk = skip_run(runner, windows, walk, record)
        if memo is not None:
            memo[key] = walk
    return advance(runner, windows, walk, runner.n_blocks).states


def plain_runs(removed: Sequence[int]) -> list["RunCompensation"]:
    """The runs of `removed` with no maps: plain removal."""
    return [RunCompensation(first, last, None) for first, last in runs_of(removed)]


def removal_runs(removed: Sequence[int], runs: Sequence["RunCompensation"]) -> list["RunCompensation"]:
    """What a decision ships: its fitted runs, or plain removal where nothing was fitted."""
    return list(runs) if runs else plain_runs(removed)


def compensated_weights(spec: ArchSpec, runs: Sequence[RunCompensation]) -> dict[str, torch.Tensor]:
    """The fitted weights by parameter name in the unpruned model (original block indices)."""
    return {spec.block_param(r.prev, f"{spec.residual_projection}.weight"): r.weight for r in runs if r.weight is not None}


def applied(model, spec: ArchSpec, runs: Sequence[RunCompensation]):
    """The fitted weights in place for the duration, the originals back afterwards."""
    return replaced(model, compensated_weights(spec, runs))


@contextmanager
def replaced(model, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Parameters named in `weights` (names of the unpruned model) hold those values for the
    duration (fitted or healed weights), the originals back afterwards."""
    params = dict(model.named_parameters())
    saved = []
    for name, value in weights.items():
        target = params[name].data
        saved.append((target, target.clone()))
        target.copy_(value.to(target.device, target.dtype))
    try:
        yield
    finally:
        for target, original in saved:
            target.copy_(original)


def can_compensate(spec: ArchSpec) -> bool:
    """Whether the family has a weight right before the residual add to fold a map into."""
    return spec.residual_projection is not None


def compensation_for(loaded, removed: Sequence[int], windows) -> list[RunCompensation]:
    """Fitted maps for `removed` (empty when the family has nowhere to fold them)."""
    if not can_compensate(loaded.spec):
        return []
    return fit_compensation(loaded.runner, loaded.spec, removed, windows)[0]


def capture_passes(runs: Sequence[RunCompensation]) -> int:
    """Forward passes a fit of `runs` took: one per run with a block before it."""
    return sum(r.prev is not None for r in runs)
