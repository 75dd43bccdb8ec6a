"""Score a candidate removal by calibration NLL, as it would ship: the one verifier every
evaluation-driven decision uses (MI-PRUN's proposals, SLEB, ppl)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

from . import distributed
from .compensate import BudgetMemo, Memo, MemoryBudget, can_compensate, capture_passes, final_states, fit_compensation, plain_runs
from .runner import BlockRunner, Windows


def ensure_dense(runner: BlockRunner, windows: Windows) -> Windows:
    """The windows with their dense boundary states (one dense pass, the first time)."""
    if not windows.dense:
        runner.dense_pass(windows)
    return windows


class RemovalScorer:
    """Mean calibration NLL of the model with `removed` blocks taken out; counts its forward passes.

    Every pass starts from the cached dense state entering the first block it changes.

    With `compensate`, each removal is scored compensated (its runs' linear maps folded in), and
    cross-fitted: maps fitted on the even windows are scored on the odd ones and vice versa.
    (Scored on their own fitting windows, selections with more runs, hence more fitted parameters,
    look better than they are.) Fits that removals share (the same leading runs) are made once.

    Give it the compensation windows: maps fitted on too few tokens rank proposals unlike the maps
    that ship, and a long run's fit is the first to suffer."""

    def __init__(self, loaded, windows: Windows, compensate: bool = False,
                 advance: Callable[[], None] | None = None) -> None:
        self.runner, self.spec, self.windows = loaded.runner, loaded.spec, windows
        self.compensate = compensate
        self.advance = advance
        self.total = distributed.all_sum(len(windows))  # windows over every rank
        self.passes = 0
        self.nll: dict[tuple[int, ...], float] = {}
        self.window_nll: dict[tuple[int, ...], np.ndarray] = {}  # mean NLL per window, in window order
        self._halves: list[Windows] | None = None
        # Fits and walks, per half, within one budget of about half a block's weights (at least 256 MiB).
        budget = MemoryBudget(max(256 * 2**20, self.runner.block_bytes() // 2))
        self._memos: list[Memo] = [BudgetMemo(budget), BudgetMemo(budget)]
        self._score_memos: list[dict] = [BudgetMemo(budget), BudgetMemo(budget)]  # walks of the scoring windows, per half

    @property
    def cross_fitted(self) -> bool:
        """Whether removals are scored compensated (needs a weight to fold into and two halves)."""
        return self.compensate and can_compensate(self.spec) and self.total >= 2

    def describe(self) -> str:
        windows = f"{self.total} windows x {self.windows.ids.shape[1]} tokens"
        if self.cross_fitted:
            return f"compensated calibration NLL, maps fitted on one half of {windows} and scored on the other, both ways"
        return f"calibration NLL on {windows}"

    def __call__(self, removed: Sequence[int]) -> float:
        key = tuple(sorted(removed))
        if key not in self.nll:
            ensure_dense(self.runner, self.windows)
            # NLL rather than perplexity: exp() overflows for a collapsed model, NLL stays comparable.
            self.nll[key] = self._cross_fitted_nll(key) if self.cross_fitted else self._plain_nll(key)
            if self.advance is not None:
                self.advance()
        return self.nll[key]

    def lower_p(self, challenger: Sequence[int], incumbent: Sequence[int]) -> float:
        """p-value that `challenger` scores a lower NLL than `incumbent` (both already scored),
        from their paired per-window NLLs: the same windows, so a window's own difficulty cancels."""
        return lower_p(self.window_nll[tuple(sorted(challenger))], self.window_nll[tuple(sorted(incumbent))])

    def _plain_nll(self, removed: Sequence[int]) -> float:
        final = final_states(self.runner, self.windows, plain_runs(removed), self._score_memos[0])
        self.passes += 1
        return self._record(removed, [(self.windows.index, *self.runner.window_nll(final, self.windows.ids))])

    def _cross_fitted_nll(self, removed: Sequence[int]) -> float:
        if self._halves is None:
            self._halves = [self.windows.half(0), self.windows.half(1)]
        parts = []
        for k, (fit_half, score_half) in enumerate((self._halves, self._halves[::-1])):
            runs, _ = fit_compensation(self.runner, self.spec, removed, fit_half, self._memos[k])
            final = final_states(self.runner, score_half, runs, self._score_memos[k])
            parity = 1 - k  # the scored half: odd windows first, then even
            parts.append((score_half.index * 2 + parity, *self.runner.window_nll(final, score_half.ids)))
        # Two half fits and two half scorings: one pass per run plus one scoring pass, in all.
        self.passes += capture_passes(runs) + 1
        return self._record(removed, parts)

    def _record(self, removed: Sequence[int], parts) -> float:
        self.window_nll[tuple(sorted(removed))], nll = window_means(parts)
        return nll


def window_means(parts) -> tuple[np.ndarray, float]:
    """From (window positions, summed NLLs, token counts) parts of every rank's windows: the mean
    NLL per window, in window order, and the mean NLL per token."""
    rows = np.concatenate([np.stack([np.asarray(index, dtype=np.float64), totals, counts], 1) for index, totals, counts in parts])
    rows = distributed.gather_rows(rows)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    return rows[:, 1] / rows[:, 2], float(rows[:, 1].sum() / rows[:, 2].sum())


def lower_p(challenger: np.ndarray, incumbent: np.ndarray) -> float:
    """One-sided paired t-test over windows: the p-value of "challenger's NLL is lower". Identical
    scores give 1; a difference with no spread (or a single window) gives 0 or 1 by its sign."""
    diff = np.asarray(challenger, dtype=np.float64) - np.asarray(incumbent, dtype=np.float64)
    if len(diff) < 2 or np.ptp(diff) == 0:
        return 0.0 if diff.mean() < 0 else 1.0
    return float(stats.ttest_rel(challenger, incumbent, alternative="less").pvalue)
