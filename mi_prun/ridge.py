"""The ridge maths of linear compensation: pure functions of streamed moments, no model.

A removed run's map T is fitted so that Y + M T ~ h_last (see `compensate.py`): a ridge regression
of R = h_last - Y on M, shrunk toward T = I (plain removal), its strength chosen by cross-validation
over folds of calibration windows. Two forms: a full matrix (folded into a linear weight) and a
per-channel scale, T = diag(t) (folded into a norm's weight, for families whose residual update
ends in a norm, such as Gemma 3's post-feed-forward norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Ridge strengths, relative to the mean diagonal of M^T M; the largest is almost plain removal.
RIDGE_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 10.0)
FOLDS = 2


@dataclass
class RunMoments:
    """Sufficient statistics of one run's regression R ~ M T, with R = h_j - Y (R - M = h_j - h_{i-1}).

    mm = M^T M, mr = M^T R, rr = sum |R|^2, ee = sum |R - M|^2 (the plain-removal error), over the
    ordinary tokens. The first token of each window (the attention sink) is kept apart, as rows
    `sink_m`, `sink_r`: its activations are orders of magnitude larger, so in the sums it would
    decide the fit alone, yet a map fitted without it sends the sink somewhere else and every
    token that attends to it goes wrong (measured: calibration NLL 4.25 -> 15.5 for blocks 12-15
    of SmolLM2-135M). So the map is fitted on the ordinary tokens and then constrained to move
    the sink where the removed blocks would have put it."""

    mm: np.ndarray
    mr: np.ndarray
    rr: float
    ee: float
    tokens: int
    sink_m: np.ndarray
    sink_r: np.ndarray

    @classmethod
    def zeros(cls, dim: int) -> "RunMoments":
        return cls(np.zeros((dim, dim)), np.zeros((dim, dim)), 0.0, 0.0, 0, np.zeros((0, dim)), np.zeros((0, dim)))

    def add(self, m: np.ndarray, r: np.ndarray) -> None:
        self.mm += m.T @ m
        self.mr += m.T @ r
        self.rr += float((r * r).sum())
        self.ee += float(((r - m) ** 2).sum())
        self.tokens += m.shape[0]

    def add_sink(self, m: np.ndarray, r: np.ndarray) -> None:
        self.sink_m = np.vstack([self.sink_m, m])
        self.sink_r = np.vstack([self.sink_r, r])

    def absorb(self, other: "RunMoments") -> None:
        """self += other, in place (the same sums as `+`, without new d x d matrices)."""
        self.mm += other.mm
        self.mr += other.mr
        self.rr += other.rr
        self.ee += other.ee
        self.tokens += other.tokens
        self.sink_m = np.vstack([self.sink_m, other.sink_m])
        self.sink_r = np.vstack([self.sink_r, other.sink_r])

    def __add__(self, other: "RunMoments") -> "RunMoments":
        return RunMoments(
            self.mm + other.mm, self.mr + other.mr, self.rr + other.rr, self.ee + other.ee, self.tokens + other.tokens,
            np.vstack([self.sink_m, other.sink_m]), np.vstack([self.sink_r, other.sink_r]),
        )


# The sink constraint acts only along directions where the sink rows are outliers: per-row
# singular values of the sink rows above this multiple of an ordinary token's RMS norm. (A model
# without massive sink activations gets no constraint; constraining ordinary rows would just
# overfit them.)
SINK_OUTLIER = 10.0


def _sink_correction(moments: RunMoments, t: np.ndarray) -> np.ndarray | None:
    """The least change of T, within the sink rows' outlier directions, that maps them onto their
    targets (None: no outlying sink rows, no change)."""
    s = moments.sink_m
    if not len(s) or moments.tokens == 0:
        return None
    typical = np.sqrt(np.trace(moments.mm) / moments.tokens)
    u, sv, vt = np.linalg.svd(s, full_matrices=False)
    keep = sv / np.sqrt(len(s)) > SINK_OUTLIER * typical
    if not keep.any():
        return None
    pinv = vt[keep].T @ np.diag(1.0 / sv[keep]) @ u[:, keep].T
    return pinv @ (moments.sink_r - s @ t)


def fit_map(moments: RunMoments, ridge: float, diagonal: bool = False) -> np.ndarray:
    """argmin_T |M T - R|^2 + lam |T - I|^2, lam = ridge * mean diag(M^T M), then the least change
    of T that maps outlying sink rows onto their targets. `diagonal`: T = diag(t), one scale per
    channel, each fitted on its own (a scale moves the sink with every other token, so the sink
    constraint does not apply)."""
    dim = moments.mm.shape[0]
    scale = float(np.trace(moments.mm)) / dim
    if moments.tokens == 0 or scale <= 0.0:
        return np.eye(dim)  # nothing observed: plain removal
    lam = ridge * scale
    if diagonal:
        return np.diag((np.diag(moments.mr) + lam) / (np.diag(moments.mm) + lam))
    # mm + lam I and mr + lam I, with lam added on the diagonal in place (no identity matrix and
    # no temporaries: at hidden size 4096 each d x d float64 matrix is 134 MB).
    diagonal = np.diag_indices(dim)
    a, b = moments.mm.copy(), moments.mr.copy()
    a[diagonal] += lam
    b[diagonal] += lam
    t = np.linalg.solve(a, b)
    del a, b
    correction = _sink_correction(moments, t)
    if correction is not None:
        t += correction
    return t


def residual(moments: RunMoments, t: np.ndarray) -> float:
    """sum |M T - R|^2 from the moments alone (T = I gives the plain-removal error `ee`)."""
    # tr(T^T MM T) as a sum over (MM T) * T: one matrix product (a three-operand einsum loops in O(d^3) without BLAS).
    return float(np.sum(t * (moments.mm @ t)) - 2.0 * np.sum(t * moments.mr) + moments.rr)


@dataclass(frozen=True)
class RidgeChoice:
    ridge: float
    # Held-out error of the fitted map relative to plain removal (1.0 = no gain), per grid value.
    heldout_ratio: dict[float, float]


def heldout_ratios(folds: Sequence[RunMoments], grid: Sequence[float], diagonal: bool = False) -> dict[float, float]:
    """Per ridge strength: fit on all folds but one, measure on that one; held-out error relative
    to plain removal, summed over the folds."""
    ratios = {}
    for ridge in grid:
        err = plain = 0.0
        for k, held in enumerate(folds):
            others = [f for i, f in enumerate(folds) if i != k]
            t = fit_map(sum(others[1:], others[0]), ridge, diagonal)
            err += residual(held, t)
            plain += held.ee
        ratios[ridge] = err / plain if plain > 0 else 1.0
    return ratios


def pick_ridge(ratios: dict[float, float]) -> RidgeChoice:
    """The ridge strength with the lowest held-out ratio."""
    # Ties (e.g. a fold with no windows) go to the stronger ridge, the one closer to plain removal.
    best = min(ratios, key=lambda ridge: (ratios[ridge], -ridge))
    return RidgeChoice(best, ratios)


def choose_ridge(folds: Sequence[RunMoments], grid: Sequence[float] = RIDGE_GRID, diagonal: bool = False) -> RidgeChoice:
    """Cross-validate the ridge strength: fit on all folds but one, measure on that one."""
    return pick_ridge(heldout_ratios(folds, grid, diagonal))
