"""From captured boundary states to block and run scores.

Boundary b is the state entering block b; the run of blocks a..b-1 maps boundary a to boundary b.
`BoundaryMI` implementations give I(h_a; h_b) for any pair, measured lazily and counted, so
Fast-Block-Select's "measure only the best candidates" is visible in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import numpy as np
import torch

from . import mi
from .capture import TokenSample

RMS_EPS = 1e-6


class Estimator(str, Enum):
    """`token`: per-token Gaussian channel (default). `gaussian`, `renyi`: across the token population."""

    token = "token"
    gaussian = "gaussian"
    renyi = "renyi"


class StateView(str, Enum):
    """What the estimators see of a state: as captured, or RMS-normalized per token.

    Per-token RMS normalization removes the norm growth with depth; the per-token estimator and
    cosine are invariant to it, the population estimators are not.
    """

    raw = "raw"
    rms = "rms"


def _view(states: torch.Tensor, view: StateView) -> torch.Tensor:
    if view is StateView.rms:
        return states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return states


class PairwiseTokenStats:
    """Streams, for every boundary pair, token means of per-token MI, cosine and angular distance.

    Memory is O(boundaries^2), independent of the number of calibration tokens.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def observe(self, states: Sequence[torch.Tensor]) -> None:
        x = torch.stack([s.double() for s in states])  # (B, T, d)
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        centered = x - x.mean(dim=-1, keepdim=True)
        centered = centered / centered.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        cos = torch.einsum("atd,btd->abt", unit, unit).clamp(-1, 1)
        rho2 = torch.einsum("atd,btd->abt", centered, centered).pow(2).clamp(max=mi.MAX_RHO2)
        batch = {
            "token_mi": (-0.5 * torch.log1p(-rho2)).sum(-1),
            "cosine": cos.sum(-1),
            "angular": (torch.arccos(cos) / torch.pi).sum(-1),
        }
        for key, value in batch.items():
            self.sums[key] = self.sums.get(key, 0) + value.cpu()
        self.tokens += x.shape[1]

    def mean(self, key: str) -> np.ndarray:
        if not self.tokens:
            raise ValueError("no tokens were observed")
        return (self.sums[key] / self.tokens).numpy()


@dataclass
class BoundaryMI:
    """I(h_a; h_b) on demand, with a cache and a count of distinct pairs measured."""

    estimator: Estimator
    table: np.ndarray | None = None  # precomputed (token estimator)
    samples: list[np.ndarray] | None = None  # token samples (population estimators)
    pca_dim: int = 64
    shrinkage: float = 0.05
    renyi_alpha: float = 1.01
    renyi_tokens: int = 512
    measured: int = 0
    _cache: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        """Dimensions the MI is spread over, to express it as a per-dimension lost fraction."""
        return min(self.pca_dim, self.samples[0].shape[1]) if self.estimator is Estimator.gaussian else 1

    def __call__(self, a: int, b: int) -> float:
        if (a, b) not in self._cache:
            self._cache[(a, b)] = self._measure(a, b)
            self.measured += 1
        return self._cache[(a, b)]

    def _measure(self, a: int, b: int) -> float:
        if self.estimator is Estimator.token:
            return float(self.table[a, b])
        x, y = self.samples[a], self.samples[b]
        if self.estimator is Estimator.gaussian:
            return mi.gaussian_mi(x, y, shrinkage=self.shrinkage, pca_dim=self.pca_dim)
        n = min(self.renyi_tokens, x.shape[0])
        return mi.renyi_mi(x[:n], y[:n], alpha=self.renyi_alpha) * np.log(2.0)  # bits -> nats

    def run_cost(self, start: int, end: int) -> float:
        """Lost fraction of the run start..end (blocks, inclusive): exp(-2 I(h_start; h_end+1) / dims)."""
        return float(mi.lost_fraction(self(start, end + 1), self.dims))

    def block_scores(self, n_blocks: int) -> list[float]:
        return [self(i, i + 1) for i in range(n_blocks)]


@dataclass
class CapturePlan:
    estimator: Estimator
    view: StateView
    max_tokens: int
    seed: int
    stats: PairwiseTokenStats = field(default_factory=PairwiseTokenStats)
    sample: TokenSample | None = None

    def __post_init__(self) -> None:
        if self.estimator is not Estimator.token:
            self.sample = TokenSample(self.max_tokens, self.seed)

    @property
    def observers(self) -> list:
        observers = [_ViewedObserver(self.stats, self.view)]
        if self.sample is not None:
            observers.append(_ViewedObserver(self.sample, self.view))
        return observers

    def boundary_mi(self, **options) -> BoundaryMI:
        if self.estimator is Estimator.token:
            return BoundaryMI(self.estimator, table=self.stats.mean("token_mi"), **options)
        return BoundaryMI(self.estimator, samples=[s.astype(np.float64) for s in self.sample.arrays()], **options)


class _ViewedObserver:
    def __init__(self, inner, view: StateView) -> None:
        self.inner, self.view = inner, view

    def observe(self, states: Sequence[torch.Tensor]) -> None:
        self.inner.observe([_view(s, self.view) for s in states])
