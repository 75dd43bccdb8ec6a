"""From captured boundary states to block and run scores.

Boundary b is the state entering block b; the run of blocks a..b-1 maps boundary a to boundary b.
`BoundaryMI` implementations give I(h_a; h_b) for any pair, measured lazily and counted, so
Fast-Block-Select's "measure only the best candidates" is visible in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import distributed, mi, select
from .archs import Fold
from .capture import TokenSample, observe_cached
from .manifest import RunScore
from .plan import Estimator, Plan, StateView
from .progress import QUIET, Reporter
from .recovery import LinearRecovery
from .runner import Windows

RMS_EPS = 1e-6
# Values (boundaries x tokens x hidden) of one step of the pairwise statistics: 64 MB per float64
# temporary. A step holds about five: one batch of a 7B shape's 33 boundaries took 1.28 GiB above
# its inputs at 2**25 and 0.32 GiB at 2**23, in the same time (1.5 s / 1.4 s).
STATS_VALUES = 2**23


def _view(states: torch.Tensor, view: StateView) -> torch.Tensor:
    if view is StateView.rms:
        return states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return states


class PairwiseTokenStats:
    """Streams, for every boundary pair, token means of per-token MI, cosine and angular distance.

    The same quantities as `mi.token_gaussian_mi`, `mi.cosine_similarity` and `mi.angular_distance`
    (tests hold them equal on random states), computed for all pairs at once. Memory is
    O(boundaries^2), independent of the number of calibration tokens.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def observe(self, states: Sequence[torch.Tensor]) -> None:
        # A few tokens at a time: the float64 stack of every boundary and its normalized copies
        # are 4 x boundaries x tokens x d x 8 bytes (4.4 GB for a 7B shape's 1,020 tokens).
        step = max(1, STATS_VALUES // (len(states) * states[0].shape[-1]))
        for start in range(0, states[0].shape[0], step):
            self._observe([s[start : start + step] for s in states])
        self.tokens += states[0].shape[0]

    def _observe(self, states: Sequence[torch.Tensor]) -> None:
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

    def over_ranks(self) -> None:
        """Sums and token count of every rank's share (one process: unchanged)."""
        self.sums = {key: distributed.all_sum(value) for key, value in self.sums.items()}
        self.tokens = distributed.all_sum(self.tokens)

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


@dataclass
class Scores:
    """Everything measured on the captured states."""

    n_blocks: int
    boundary_mi: BoundaryMI
    cosine: np.ndarray  # (B, B) token-mean cosine between boundaries
    angular: np.ndarray  # (B, B) token-mean angular distance
    tokens: int
    recovery: LinearRecovery | None = None  # compensated run costs (None: not captured)

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

    def run_scores(self) -> list[RunScore]:
        """Every run's MI, cost and DPI bound (runs up to the whole depth)."""
        bi = self.boundary_mi
        block_cost = [bi.run_cost(i, i) for i in range(self.n_blocks)]
        return [
            RunScore(start=a, end=b, mi=bi(a, b + 1), cost=bi.run_cost(a, b), dpi_bound=select.dpi_bound(block_cost, a, b))
            for a in range(self.n_blocks)
            for b in range(a, self.n_blocks)
        ]


def score_model(loaded, windows: Windows, plan: Plan, reporter: Reporter = QUIET, taps: bool = False) -> Scores:
    """One dense pass over the calibration windows (their boundary states stay cached for the
    passes that follow); every score the methods need. `taps`: also keep each block's projection
    output, for the compensated run costs."""
    runner = loaded.runner
    with reporter.task("capturing block boundaries", runner.n_blocks) as advance:
        runner.dense_pass(windows, on_block=advance, taps=taps)
    recovery = LinearRecovery(windows.dense, windows.taps, runner.spec.compensation_fold is Fold.scale) if taps else None
    return chain_scores(windows, plan, recovery)


def chain_scores(windows: Windows, plan: Plan, recovery: LinearRecovery | None = None) -> Scores:
    """The scores of a chain of units from its cached states: `windows.dense[k]` enters unit k
    (blocks, or sublayers: `sublayers.py`), the last one leaves the chain."""
    capture = CapturePlan(plan.estimator, plan.view, plan.max_tokens, plan.seed)
    observe_cached(windows, capture.observers, plan.batch_size)
    capture.stats.over_ranks()
    return Scores(
        n_blocks=len(windows.dense) - 1,
        boundary_mi=capture.boundary_mi(),
        cosine=capture.stats.mean("cosine"),
        angular=capture.stats.mean("angular"),
        tokens=capture.stats.tokens,
        recovery=recovery,
    )
