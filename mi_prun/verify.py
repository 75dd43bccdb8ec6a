"""Score a candidate removal by calibration NLL, as it would ship: the one verifier every
evaluation-driven decision uses (MI-PRUN's proposals, SLEB, ppl)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .archs import block_count
from .blockset import blocks_kept, keep_indices
from .compensate import applied, can_compensate, capture_passes, compensation_for
from .evaluate import perplexity


class RemovalScorer:
    """Mean calibration NLL of the model with `removed` blocks taken out; counts its forward passes.

    With `compensate`, each removal is scored compensated (its runs' linear maps folded in), and
    cross-fitted: maps fitted on the even windows are scored on the odd ones and vice versa.
    (Scored on their own fitting windows, selections with more runs, hence more fitted parameters,
    look better than they are.) Cost: per run one capture pass, plus the scoring pass.

    Give it the compensation windows: maps fitted on too few tokens rank proposals unlike the maps
    that ship, and a long run's fit is the first to suffer."""

    def __init__(self, loaded, calib_ids: torch.Tensor, batch_size: int, compensate: bool = False,
                 advance: Callable[[], None] | None = None) -> None:
        self.loaded, self.calib_ids, self.batch_size = loaded, calib_ids, batch_size
        self.compensate = compensate
        self.advance = advance
        self.passes = 0
        self.nll: dict[tuple[int, ...], float] = {}

    @property
    def cross_fitted(self) -> bool:
        """Whether removals are scored compensated (needs a weight to fold into and two halves)."""
        return self.compensate and can_compensate(self.loaded.spec) and len(self.calib_ids) >= 2

    def describe(self) -> str:
        windows = f"{len(self.calib_ids)} windows x {self.calib_ids.shape[1]} tokens"
        if self.cross_fitted:
            return f"compensated calibration NLL, maps fitted on one half of {windows} and scored on the other, both ways"
        return f"calibration NLL on {windows}"

    def __call__(self, removed: Sequence[int]) -> float:
        key = tuple(sorted(removed))
        if key not in self.nll:
            # NLL rather than perplexity: exp() overflows for a collapsed model, NLL stays comparable.
            self.nll[key] = self._cross_fitted_nll(key) if self.cross_fitted else self._nll(key, [], self.calib_ids)
            if self.advance is not None:
                self.advance()
        return self.nll[key]

    def _nll(self, removed: Sequence[int], runs, ids: torch.Tensor) -> float:
        model, spec = self.loaded.model, self.loaded.spec
        keep = keep_indices(block_count(model, spec), removed)
        with applied(model, spec, runs), blocks_kept(model, spec, keep):
            nll = perplexity(model, ids, self.batch_size).nll
        self.passes += 1
        return nll

    def _cross_fitted_nll(self, removed: Sequence[int]) -> float:
        halves = (self.calib_ids[0::2], self.calib_ids[1::2])
        total = 0.0
        for fit_ids, score_ids in (halves, halves[::-1]):
            runs = compensation_for(self.loaded, removed, fit_ids, self.batch_size)
            total += self._nll(removed, runs, score_ids) * len(score_ids)
        # Two half fits and two half scorings: one pass per run plus one scoring pass, in all.
        self.passes += capture_passes(runs) - 1
        return total / len(self.calib_ids)
