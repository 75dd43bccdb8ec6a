"""What linear compensation cannot recover: the cost of a run once its fitted map is folded in.

The tool ships compensated removals (`compensate.py`): run a..b is replaced by a map T on the
residual-projection output M of block a-1, so that Y + M T ~ h_{b+1} (Y = h_a - M). What no such
map carries across the run is what compensated removal loses, so that is the quantity to rank runs
by. From one dense capture pass (its boundary states and each block's projection output):

    lost(a..b) = min over ridge of  E_heldout |R - M T_ridge|^2  /  E |h_{b+1}|^2,   R = h_{b+1} - Y,

cross-validated over two folds of windows, as the shipped fit chooses its ridge (with T = diag(t)
for families that fold a per-channel scale); plain removal
(T = I) is one of the choices, so lost(a..b) never exceeds plain removal's error. It is the lost
fraction of a Gaussian channel of I = -1/2 log(lost) nats: the information about the run's output
that the best linear map of its input recovers ("linear information"). A run that starts at
block 0 has no block before it to fold into, so its cost is plain removal's.

The first token of every window (the attention sink) is left out, as in the fits; the shipped fit
also constrains the sink's map (`ridge._sink_correction`), which moves T only along the sink's
outlier directions and is not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .capture import SINK_TOKENS
from .ridge import FOLDS

# Ridge strengths tried (relative to the mean diagonal of M^T M, as `compensate.RIDGE_GRID`); plain
# removal is always a further choice. A coarser grid than the shipped fit's: a ranking, not a map.
RIDGE_GRID = (1e-2, 1e-1, 1.0)


def _rows(x: torch.Tensor, fold: int) -> torch.Tensor:
    """The ordinary tokens of one fold's windows (windows alternate between folds), as rows."""
    return x[fold::FOLDS, SINK_TOKENS:, :].reshape(-1, x.shape[-1]).float()


@dataclass
class FoldBasis:
    """One fold's side of a cross-validated ridge fit, for a fixed regressor M: the eigenbasis of the
    other folds' M^T M (to solve every ridge at once) and this fold's M^T M in that basis."""

    values: np.ndarray  # eigenvalues of the training M^T M
    vectors: np.ndarray  # its eigenvectors (columns)
    held_mm: np.ndarray  # V^T (held-out M^T M) V
    scale: float  # mean diagonal of the training M^T M (the ridge unit)


def fold_bases(mm: list[np.ndarray]) -> list[FoldBasis]:
    """Per held-out fold f: the basis of the sum of the other folds' M^T M."""
    out = []
    for f, held in enumerate(mm):
        train = sum(m for k, m in enumerate(mm) if k != f)
        values, vectors = np.linalg.eigh(train)
        out.append(FoldBasis(values, vectors, vectors.T @ held @ vectors, float(np.trace(train)) / train.shape[0]))
    return out


def heldout_errors(bases: list[FoldBasis], mr: list[np.ndarray], rr: list[float], grid=RIDGE_GRID) -> dict[float, float]:
    """Held-out |R - M T|^2 summed over folds, per ridge, with T = argmin |M T - R|^2 + lam |T - I|^2
    fitted on the other folds (lam = ridge * scale), from the moments M^T R and |R|^2 per fold."""
    errors = {ridge: 0.0 for ridge in grid}
    for f, basis in enumerate(bases):
        train_mr = sum(m for k, m in enumerate(mr) if k != f)
        projected = basis.vectors.T @ train_mr  # V^T (M^T R), the ridge's right-hand side in the basis
        held_mr = basis.vectors.T @ mr[f]
        for ridge in grid:
            lam = ridge * basis.scale
            # T = V C with C = (S + lam)^-1 V^T (M^T R + lam I): the ridge solution in the basis.
            c = (projected + lam * basis.vectors.T) / (basis.values + lam)[:, None]
            errors[ridge] += float(np.sum(c * (basis.held_mm @ c)) - 2.0 * np.sum(c * held_mr) + rr[f])
    return errors


def heldout_errors_diagonal(mm: list[np.ndarray], mr: list[np.ndarray], rr: list[float], grid=RIDGE_GRID) -> dict[float, float]:
    """The same for a per-channel map T = diag(t), from the diagonals of M^T M and M^T R per fold."""
    errors = {ridge: 0.0 for ridge in grid}
    for f in range(len(mm)):
        train_mm = sum(m for k, m in enumerate(mm) if k != f)
        train_mr = sum(m for k, m in enumerate(mr) if k != f)
        for ridge in grid:
            lam = ridge * float(train_mm.mean())
            t = (train_mr + lam) / (train_mm + lam)
            errors[ridge] += float(np.sum(t * t * mm[f]) - 2.0 * np.sum(t * mr[f]) + rr[f])
    return errors


@dataclass
class LinearRecovery:
    """Compensated run costs on the windows of one capture pass (dense states and projection taps),
    measured on demand, cached and counted like `scoring.BoundaryMI`."""

    dense: dict[int, torch.Tensor]
    taps: dict[int, torch.Tensor]
    diagonal: bool = False  # the family folds a per-channel scale (`archs.Fold.scale`)
    measured: int = 0
    _cache: dict[tuple[int, int], float] = field(default_factory=dict)
    _prev: tuple[int, list[torch.Tensor], list[FoldBasis]] | None = None

    def run_cost(self, start: int, end: int) -> float:
        """Lost fraction of blocks start..end removed and compensated (see the module docstring)."""
        if (start, end) not in self._cache:
            error, energy = self._measure(start, end)
            self._cache[(start, end)] = error / energy if energy else 0.0
            self.measured += 1
        return self._cache[(start, end)]

    def _regressor(self, prev: int) -> tuple[list[torch.Tensor], list[FoldBasis]]:
        # Runs are measured grouped by their first block, so one regressor is kept at a time
        # (at hidden size 4096 its bases take about 1 GB).
        if self._prev is None or self._prev[0] != prev:
            m = [_rows(self.taps[prev], f) for f in range(FOLDS)]
            bases = fold_bases([(x.T @ x).double().cpu().numpy() for x in m])
            self._prev = (prev, m, bases)
        return self._prev[1], self._prev[2]

    def _measure(self, start: int, end: int) -> tuple[float, float]:
        """(compensated held-out error, output energy) of run start..end."""
        target = [_rows(self.dense[end + 1], f) for f in range(FOLDS)]
        entry = [_rows(self.dense[start], f) for f in range(FOLDS)]
        energy = sum(float(t.double().pow(2).sum()) for t in target)
        plain = sum(float((t - e).double().pow(2).sum()) for t, e in zip(target, entry))
        if start == 0 or energy == 0.0:
            return plain, energy
        if self.diagonal:
            m = [_rows(self.taps[start - 1], f) for f in range(FOLDS)]
        else:
            m, bases = self._regressor(start - 1)
        r = [t - e + mf for t, e, mf in zip(target, entry, m)]  # R = h_{b+1} - Y, Y = h_a - M
        rr = [float(rf.double().pow(2).sum()) for rf in r]
        if self.diagonal:
            mm = [mf.double().pow(2).sum(0).cpu().numpy() for mf in m]
            mr = [(mf.double() * rf.double()).sum(0).cpu().numpy() for mf, rf in zip(m, r)]
            errors = heldout_errors_diagonal(mm, mr, rr)
        else:
            mr = [(mf.T @ rf).double().cpu().numpy() for mf, rf in zip(m, r)]
            errors = heldout_errors(bases, mr, rr)
        best = min(min(errors.values()), plain)
        return max(best, 0.0), energy

    def block_costs(self, n_blocks: int) -> list[float]:
        return [self.run_cost(i, i) for i in range(n_blocks)]
