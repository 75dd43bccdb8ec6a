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


def rows_up_to(dim: int) -> int:
    """The most ordinary tokens a fold keeps as rows rather than moments (see RunMoments)."""
    return dim // 2


@dataclass
class RunMoments:
    """Sufficient statistics of one run's regression R ~ M T, with R = h_j - Y (R - M = h_j - h_{i-1}).

    mm = M^T M, mr = M^T R, rr = sum |R|^2, ee = sum |R - M|^2 (the plain-removal error), over the
    ordinary tokens. The first token of each window (the attention sink) is kept apart, as rows
    `sink_m`, `sink_r`: its activations are orders of magnitude larger, so in the sums it would
    decide the fit alone, yet a map fitted without it sends the sink somewhere else and every
    token that attends to it goes wrong (measured: calibration NLL 4.25 -> 15.5 for blocks 12-15
    of SmolLM2-135M). So the map is fitted on the ordinary tokens and then constrained to move
    the sink where the removed blocks would have put it.

    While there are at most half as many ordinary tokens as channels (`ROWS_UP_TO`), the rows M
    and R themselves are kept instead of the d x d moments (`in_rows`): the fit is then solved
    through a factorization of M, in O(tokens^2 d) once and about O(tokens^2 d) per ridge strength
    instead of O(d^3) for each, and gives the same map (tests hold the two forms equal). With more
    tokens the moments take over (measured at d = 2048: the factorization of 1,020 tokens takes
    a quarter of a solve, that of 2,040 tokens longer than one)."""

    dim: int
    rr: float = 0.0
    ee: float = 0.0
    tokens: int = 0
    sink_m: np.ndarray = None
    sink_r: np.ndarray = None
    rows_m: np.ndarray | None = None  # (tokens, dim) while in_rows
    rows_r: np.ndarray | None = None
    _mm: np.ndarray | None = None  # the moments, once the rows are given up
    _mr: np.ndarray | None = None

    def __post_init__(self) -> None:
        empty = np.zeros((0, self.dim))
        self.sink_m = empty if self.sink_m is None else self.sink_m
        self.sink_r = empty if self.sink_r is None else self.sink_r
        if self._mm is None and self.rows_m is None:
            self.rows_m, self.rows_r = empty, empty

    @classmethod
    def zeros(cls, dim: int) -> "RunMoments":
        return cls(dim)

    @classmethod
    def of_moments(cls, mm: np.ndarray, mr: np.ndarray, rr: float, ee: float, tokens: int, sink_m: np.ndarray,
                   sink_r: np.ndarray) -> "RunMoments":
        return cls(mm.shape[0], rr, ee, tokens, sink_m, sink_r, None, None, mm, mr)

    @property
    def in_rows(self) -> bool:
        return self.rows_m is not None

    @property
    def mm(self) -> np.ndarray:
        return self.rows_m.T @ self.rows_m if self.in_rows else self._mm

    @property
    def mr(self) -> np.ndarray:
        return self.rows_m.T @ self.rows_r if self.in_rows else self._mr

    def trace_mm(self) -> float:
        return float(np.sum(self.rows_m * self.rows_m)) if self.in_rows else float(np.trace(self._mm))

    def diagonals(self) -> tuple[np.ndarray, np.ndarray]:
        """diag(mm) and diag(mr), without the d x d matrices when the rows are kept."""
        if self.in_rows:
            return np.sum(self.rows_m * self.rows_m, 0), np.sum(self.rows_m * self.rows_r, 0)
        return np.diag(self._mm).copy(), np.diag(self._mr).copy()

    def to_moments(self) -> None:
        """Give up the rows for the moments (in place)."""
        if self.in_rows:
            self._mm, self._mr = self.mm, self.mr
            self.rows_m = self.rows_r = None

    def add(self, m: np.ndarray, r: np.ndarray) -> None:
        self.rr += float((r * r).sum())
        self.ee += float(((r - m) ** 2).sum())
        self.tokens += m.shape[0]
        if self.in_rows and self.tokens <= rows_up_to(self.dim):
            self.rows_m, self.rows_r = np.vstack([self.rows_m, m]), np.vstack([self.rows_r, r])
            return
        self.to_moments()
        self._mm += m.T @ m
        self._mr += m.T @ r

    def add_sink(self, m: np.ndarray, r: np.ndarray) -> None:
        self.sink_m = np.vstack([self.sink_m, m])
        self.sink_r = np.vstack([self.sink_r, r])

    def absorb(self, other: "RunMoments") -> None:
        """self += other, in place (the same sums as `+`, without new d x d matrices)."""
        self.rr += other.rr
        self.ee += other.ee
        self.tokens += other.tokens
        self.sink_m = np.vstack([self.sink_m, other.sink_m])
        self.sink_r = np.vstack([self.sink_r, other.sink_r])
        if self.in_rows and other.in_rows and self.tokens <= rows_up_to(self.dim):
            self.rows_m, self.rows_r = np.vstack([self.rows_m, other.rows_m]), np.vstack([self.rows_r, other.rows_r])
            return
        self.to_moments()
        if other.in_rows:
            self._mm += other.rows_m.T @ other.rows_m
            self._mr += other.rows_m.T @ other.rows_r
        else:
            self._mm += other._mm
            self._mr += other._mr

    def copy(self) -> "RunMoments":
        def dup(a):
            return None if a is None else a.copy()

        return RunMoments(self.dim, self.rr, self.ee, self.tokens, self.sink_m.copy(), self.sink_r.copy(), dup(self.rows_m),
                          dup(self.rows_r), dup(self._mm), dup(self._mr))

    def __add__(self, other: "RunMoments") -> "RunMoments":
        out = self.copy()
        out.absorb(other)
        return out


# The sink constraint acts only along directions where the sink rows are outliers: per-row
# singular values of the sink rows above this multiple of an ordinary token's RMS norm. (A model
# without massive sink activations gets no constraint; constraining ordinary rows would just
# overfit them.)
SINK_OUTLIER = 10.0


def _sink_pinv(moments: RunMoments) -> np.ndarray | None:
    """The pseudo-inverse of the sink rows within their outlier directions, (dim, sinks); None: no
    outlying sink rows. The least change of T mapping them onto their targets is P (sink_r - sink_m T)."""
    s = moments.sink_m
    if not len(s) or moments.tokens == 0:
        return None
    typical = np.sqrt(moments.trace_mm() / moments.tokens)
    u, sv, vt = np.linalg.svd(s, full_matrices=False)
    keep = sv / np.sqrt(len(s)) > SINK_OUTLIER * typical
    if not keep.any():
        return None
    return vt[keep].T @ np.diag(1.0 / sv[keep]) @ u[:, keep].T


@dataclass
class LowRankMap:
    """T = I + U V: a map fitted through the rows' factorization, formed as d x d only when folded."""

    u: np.ndarray  # (dim, rank)
    v: np.ndarray  # (rank, dim)

    def dense(self) -> np.ndarray:
        t = self.u @ self.v
        t[np.diag_indices(t.shape[0])] += 1.0
        return t


class RowSolver:
    """The ridge fits of one set of rows, for any strength: M = A S B^T is factored once, and
    (M^T M + lam I)^-1 (M^T R + lam I) = I + B F with F = S/(S^2+lam) A^T R - S^2/(S^2+lam) B^T.

    The factors come from the tokens' Gram matrix M M^T (tokens x tokens: eigh of it is 5 times
    faster than an SVD of M at 1,020 x 2,048). Directions with a squared singular value below
    rounding of the largest are dropped: their weight in T is at most s / lam, zero to rounding."""

    def __init__(self, moments: RunMoments) -> None:
        self.moments = moments
        x = moments.rows_m
        eig, a = np.linalg.eigh(x @ x.T)
        keep = eig > max(float(eig.max(initial=0.0)), 0.0) * len(eig) * np.finfo(np.float64).eps
        a, self.s = a[:, keep], np.sqrt(eig[keep])
        self.bt = (a.T @ x) / self.s[:, None]
        self.g = a.T @ moments.rows_r
        self.pinv = _sink_pinv(moments)
        # The sink correction's columns join the factor's: T = I + [B P] [F; E].
        self.u = self.bt.T if self.pinv is None else np.hstack([self.bt.T, self.pinv])

    def fit(self, lam: float) -> LowRankMap:
        s2 = self.s * self.s
        f = (self.s / (s2 + lam))[:, None] * self.g - (s2 / (s2 + lam))[:, None] * self.bt
        if self.pinv is None:
            return LowRankMap(self.u, f)
        sink = self.moments.sink_m
        e = self.moments.sink_r - sink - (sink @ self.bt.T) @ f  # sink_r - sink_m T
        return LowRankMap(self.u, np.vstack([f, e]))


class HeldOut:
    """sum |M T - R|^2 over a fold's tokens for maps T = I + U V sharing U: ee + 2 <A, V> + <V, B V>,
    with A = U^T (M^T M - M^T R) and B = U^T M^T M U computed once (from the rows or the moments)."""

    def __init__(self, held: RunMoments, u: np.ndarray) -> None:
        self.ee = held.ee
        if held.in_rows:
            mu = held.rows_m @ u
            self.a = mu.T @ (held.rows_m - held.rows_r)
            self.b = mu.T @ mu
        else:
            hu = held._mm @ u
            self.a = hu.T - u.T @ held._mr
            self.b = u.T @ hu

    def residual(self, t: LowRankMap) -> float:
        return float(self.ee + 2.0 * np.sum(self.a * t.v) + np.sum(t.v * (self.b @ t.v)))


def fit_map(moments: RunMoments, ridge: float, diagonal: bool = False) -> np.ndarray:
    """argmin_T |M T - R|^2 + lam |T - I|^2, lam = ridge * mean diag(M^T M), then the least change
    of T that maps outlying sink rows onto their targets. `diagonal`: T = diag(t), one scale per
    channel, each fitted on its own (a scale moves the sink with every other token, so the sink
    constraint does not apply)."""
    dim = moments.dim
    scale = moments.trace_mm() / dim
    if moments.tokens == 0 or scale <= 0.0:
        return np.eye(dim)  # nothing observed: plain removal
    lam = ridge * scale
    if diagonal:
        mm, mr = moments.diagonals()
        return np.diag((mr + lam) / (mm + lam))
    if moments.in_rows:
        return RowSolver(moments).fit(lam).dense()
    # mm + lam I and mr + lam I, with lam added on the diagonal in place (no identity matrix and
    # no temporaries: at hidden size 4096 each d x d float64 matrix is 134 MB).
    diagonal = np.diag_indices(dim)
    a, b = moments.mm.copy(), moments.mr.copy()
    a[diagonal] += lam
    b[diagonal] += lam
    t = np.linalg.solve(a, b)
    del a, b
    pinv = _sink_pinv(moments)
    if pinv is not None:
        t += pinv @ (moments.sink_r - moments.sink_m @ t)
    return t


def residual(moments: RunMoments, t: np.ndarray) -> float:
    """sum |M T - R|^2 from the moments alone (T = I gives the plain-removal error `ee`)."""
    if moments.in_rows:
        return float(np.sum((moments.rows_m @ t - moments.rows_r) ** 2))
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
    err = {ridge: 0.0 for ridge in grid}
    plain = 0.0
    for k, held in enumerate(folds):
        others = [f for i, f in enumerate(folds) if i != k]
        train = sum(others[1:], others[0])
        scale = train.trace_mm() / train.dim
        if train.in_rows and not diagonal and train.tokens > 0 and scale > 0.0 and grid:
            # One SVD for every strength, and the held-out error from small products.
            solver = RowSolver(train)
            measure = HeldOut(held, solver.u)
            for ridge in grid:
                err[ridge] += measure.residual(solver.fit(ridge * scale))
        else:
            for ridge in grid:
                err[ridge] += residual(held, fit_map(train, ridge, diagonal))
        plain += held.ee
    return {ridge: err[ridge] / plain if plain > 0 else 1.0 for ridge in grid}


def pick_ridge(ratios: dict[float, float]) -> RidgeChoice:
    """The ridge strength with the lowest held-out ratio."""
    # Ties (e.g. a fold with no windows) go to the stronger ridge, the one closer to plain removal.
    best = min(ratios, key=lambda ridge: (ratios[ridge], -ridge))
    return RidgeChoice(best, ratios)


def choose_ridge(folds: Sequence[RunMoments], grid: Sequence[float] = RIDGE_GRID, diagonal: bool = False) -> RidgeChoice:
    """Cross-validate the ridge strength: fit on all folds but one, measure on that one."""
    return pick_ridge(heldout_ratios(folds, grid, diagonal))
