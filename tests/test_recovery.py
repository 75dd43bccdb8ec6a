"""The compensated run cost: moments and eigenbasis shortcuts against fits made row by row."""

import numpy as np
import torch

from mi_prun.recovery import RIDGE_GRID, LinearRecovery


def _states(seed: int, windows: int = 6, seq: int = 40, dim: int = 12):
    g = torch.Generator().manual_seed(seed)
    h1 = torch.randn(windows, seq, dim, generator=g)
    m0 = torch.randn(windows, seq, dim, generator=g)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    # The run's output: a linear function of M plus noise, so a map recovers most of it.
    h2 = h1 + m0 @ mix + 0.3 * torch.randn(windows, seq, dim, generator=g)
    h0 = h1 - m0  # what entered block 0 (unused by the cost of run 1..1)
    return {0: h0, 1: h1, 2: h2}, {0: m0}


def _direct_lost(dense, taps, start, end):
    """The same quantity, fitted and evaluated on explicit token rows (no moments, no eigenbasis)."""
    rows = lambda x, f: x[f::2, 1:, :].reshape(-1, x.shape[-1]).double().numpy()
    target = [rows(dense[end + 1], f) for f in range(2)]
    entry = [rows(dense[start], f) for f in range(2)]
    m = [rows(taps[start - 1], f) for f in range(2)]
    r = [t - e + mf for t, e, mf in zip(target, entry, m)]
    best = sum(float(((t - e) ** 2).sum()) for t, e in zip(target, entry))  # plain removal
    for ridge in RIDGE_GRID:
        err = 0.0
        for f in range(2):
            mt, rt = m[1 - f], r[1 - f]
            a = mt.T @ mt
            lam = ridge * np.trace(a) / a.shape[0]
            t = np.linalg.solve(a + lam * np.eye(len(a)), mt.T @ rt + lam * np.eye(len(a)))
            err += float(((m[f] @ t - r[f]) ** 2).sum())
        best = min(best, err)
    return best / sum(float((t**2).sum()) for t in target)


def test_lost_fraction_matches_direct_fit():
    dense, taps = _states(0)
    got = LinearRecovery(dense, taps).run_cost(1, 1)
    assert abs(got - _direct_lost(dense, taps, 1, 1)) < 1e-6


def test_map_recovers_a_linear_run_but_not_noise():
    dense, taps = _states(1)
    plain = float(((dense[2] - dense[1])[:, 1:] ** 2).sum() / (dense[2][:, 1:] ** 2).sum())
    lost = LinearRecovery(dense, taps).run_cost(1, 1)
    # Most of the run's update is M @ mix: compensation keeps it; the noise it cannot.
    assert lost < 0.25 * plain
    assert lost > 0.0


def test_run_at_block_zero_costs_plain_removal_and_is_cached():
    dense, taps = _states(2)
    recovery = LinearRecovery(dense, taps)
    expected = float(((dense[1] - dense[0])[:, 1:] ** 2).sum() / (dense[1][:, 1:] ** 2).sum())
    assert abs(recovery.run_cost(0, 0) - expected) < 1e-6
    recovery.run_cost(0, 0)
    assert recovery.measured == 1


def test_diagonal_lost_fraction_matches_direct_fit():
    dense, taps = _states(3)
    rows = lambda x, f: x[f::2, 1:, :].reshape(-1, x.shape[-1]).double().numpy()
    m = [rows(taps[0], f) for f in range(2)]
    r = [rows(dense[2], f) - rows(dense[1], f) + m[f] for f in range(2)]
    best = sum(float(((rows(dense[2], f) - rows(dense[1], f)) ** 2).sum()) for f in range(2))
    for ridge in RIDGE_GRID:
        err = 0.0
        for f in range(2):
            mt, rt = m[1 - f], r[1 - f]
            lam = ridge * float((mt * mt).sum(0).mean())
            t = ((mt * rt).sum(0) + lam) / ((mt * mt).sum(0) + lam)
            err += float(((m[f] * t - r[f]) ** 2).sum())
        best = min(best, err)
    expected = best / sum(float((rows(dense[2], f) ** 2).sum()) for f in range(2))
    assert abs(LinearRecovery(dense, taps, diagonal=True).run_cost(1, 1) - expected) < 1e-6
