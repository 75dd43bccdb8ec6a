"""Linear compensation of removed runs: the closed-form fit, its moments, and folding into a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mi_prun.archs import blocks, get_path
from mi_prun.blockset import blocks_kept, keep_indices
from mi_prun.compensate import applied, final_states, fit_compensation, run_moments
from mi_prun.select import runs_of
from mi_prun.ridge import RIDGE_GRID, RunMoments, _sink_pinv, choose_ridge, fit_map, heldout_ratios, residual, rows_up_to
from mi_prun.load import load_model
from mi_prun.runner import Windows

from .conftest import TINY_BLOCKS


def moments_of(m: np.ndarray, r: np.ndarray) -> RunMoments:
    mo = RunMoments.zeros(m.shape[1])
    mo.add(m, r)
    return mo


def test_runs_of():
    assert runs_of([]) == []
    assert runs_of([5, 3, 4, 9]) == [(3, 5), (9, 9)]
    assert runs_of([0, 2]) == [(0, 0), (2, 2)]


def test_fit_recovers_a_linear_map_and_ridge_shrinks_to_identity():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4000, 8))
    t_true = np.eye(8) + 0.5 * rng.normal(size=(8, 8))
    r = m @ t_true + 0.01 * rng.normal(size=(4000, 8))
    mo = moments_of(m, r)
    np.testing.assert_allclose(fit_map(mo, 1e-9), t_true, atol=1e-3)
    np.testing.assert_allclose(fit_map(mo, 1e9), np.eye(8), atol=1e-6)
    # the moment formula equals the direct residual, and T = I is plain removal
    t = fit_map(mo, 0.1)
    assert residual(mo, t) == pytest.approx(((m @ t - r) ** 2).sum(), rel=1e-9)
    assert residual(mo, np.eye(8)) == pytest.approx(mo.ee, rel=1e-9)


def test_choose_ridge_follows_the_held_out_error():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(2000, 16))
    # A real linear relation: cross-validation picks a weak ridge and beats plain removal by far.
    r = m @ (0.3 * rng.normal(size=(16, 16))) + 0.1 * rng.normal(size=(2000, 16))
    folds = [moments_of(m[:1000], r[:1000]), moments_of(m[1000:], r[1000:])]
    choice = choose_ridge(folds)
    assert choice.ridge <= 1e-2 and choice.heldout_ratio[choice.ridge] < 0.1
    # Nothing to recover beyond the identity (R = M + independent noise), few samples: the strongest
    # ridge (closest to plain removal) wins and the gain is nil.
    m = rng.normal(size=(40, 16))
    r = m + rng.normal(size=(40, 16))
    choice = choose_ridge([moments_of(m[:20], r[:20]), moments_of(m[20:], r[20:])])
    assert choice.ridge == 10.0
    assert choice.heldout_ratio[choice.ridge] == pytest.approx(1.0, abs=0.05)
    assert choice.heldout_ratio[1e-3] > 1.0


def test_moments_add_up():
    rng = np.random.default_rng(2)
    m, r = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    whole = moments_of(m, r)
    parts = moments_of(m[:10], r[:10]) + moments_of(m[10:], r[10:])
    np.testing.assert_allclose(parts.mm, whole.mm)
    np.testing.assert_allclose(parts.mr, whole.mr)
    assert parts.ee == pytest.approx(whole.ee) and parts.tokens == 30


def dense_windows(loaded, ids):
    return loaded.runner.dense_pass(Windows(ids))


def test_run_moments_match_hidden_states(tiny_models):
    loaded = load_model(str(tiny_models["llama"]))
    ids = torch.randint(0, 384, (2, 24))
    windows = dense_windows(loaded, ids)
    tap = []
    h = loaded.runner.run_block(2, windows.dense[2], tap=tap)
    folds = run_moments(tap[0], h, windows.dense[5])
    with torch.no_grad():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    # ee = |R - M|^2 = |h_4 - h_2| over tokens 1.. (hidden_states[k + 1] is block k's output)
    direct = float(((hidden[5][:, 1:] - hidden[3][:, 1:]).double() ** 2).sum())
    assert sum(f.ee for f in folds) == pytest.approx(direct, rel=1e-5)
    assert [f.tokens for f in folds] == [23, 23]  # windows alternate between the two folds


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_fit_compensation_lowers_the_error_and_leaves_the_model_alone(model_type, tiny_models):
    loaded = load_model(str(tiny_models[model_type]))
    model, spec = loaded.model, loaded.spec
    before = [get_path(b, spec.residual_projection).weight.clone() for b in blocks(model, spec)]
    torch.manual_seed(0)
    ids = torch.randint(0, 384, (16, 48))
    windows = dense_windows(loaded, ids)
    removed = [0, 3, 4, 6]
    runs, _ = fit_compensation(loaded.runner, spec, removed, windows)
    assert [(r.first, r.last, r.prev) for r in runs] == [(0, 0, None), (3, 4, 2), (6, 6, 5)]
    assert runs[0].weight is None  # nothing before block 0 to fold into
    for r in runs[1:]:
        assert r.ridge in RIDGE_GRID
        assert r.weight.shape == before[r.prev].shape
    for w, b in zip(before, blocks(model, spec)):
        assert torch.equal(w, get_path(b, spec.residual_projection).weight)

    # The folded weight realizes the fit: for a single run, the error of the state entering the
    # next kept block, relative to plain removal, is exactly the fitted error ratio. Measured
    # through the model's own forward with the weight folded in, not through the runner.
    (run,), _ = fit_compensation(loaded.runner, spec, [3, 4], windows)
    errors = {}
    with torch.no_grad():
        dense = model(input_ids=ids, output_hidden_states=True).hidden_states
        for label, runs_in in (("plain", []), ("compensated", [run])):
            with applied(model, spec, runs_in), blocks_kept(model, spec, keep_indices(TINY_BLOCKS, [3, 4])):
                pruned = model(input_ids=ids, output_hidden_states=True).hidden_states
            # block 5's input: pruned hidden_states[3] (kept blocks 0, 1, 2 before it), dense [5]
            errors[label] = float(((pruned[3][:, 1:] - dense[5][:, 1:]).double() ** 2).sum())
    assert errors["compensated"] / errors["plain"] == pytest.approx(run.fit_ratio, rel=1e-3)
    assert errors["compensated"] < errors["plain"]
    for w, b in zip(before, blocks(model, spec)):
        assert torch.equal(w, get_path(b, spec.residual_projection).weight)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_walk_equals_the_model_with_the_maps_folded_in(model_type, tiny_models):
    """States after a multi-run fit (from cached boundaries) equal the whole model's forward with
    the blocks skipped and the maps folded in (Gemma 3: per-channel scales in its post-norms)."""
    loaded = load_model(str(tiny_models[model_type]))
    model, spec = loaded.model, loaded.spec
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(3))
    windows = dense_windows(loaded, ids)
    removed = [2, 3, 6]
    runs, _ = fit_compensation(loaded.runner, spec, removed, windows)
    final = final_states(loaded.runner, windows, runs)
    with torch.no_grad(), applied(model, spec, runs), blocks_kept(model, spec, keep_indices(TINY_BLOCKS, removed)):
        out = model(input_ids=ids)
    torch.testing.assert_close(loaded.runner.logits(final[0]), out.logits[0].float(), rtol=1e-4, atol=1e-4)


def test_the_sink_rows_land_on_their_targets():
    """An outlying first token (attention sink) is mapped onto its target; ordinary ones are left alone."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(3000, 8))
    r = m @ (np.eye(8) + 0.3 * rng.normal(size=(8, 8))) + 0.05 * rng.normal(size=(3000, 8))
    mo = moments_of(m, r)
    sink = np.zeros((1, 8))
    sink[0, 2] = 300.0  # one massive activation
    sink_target = sink.copy()
    sink_target[0, 5] = 40.0
    free = fit_map(mo, 1e-3)
    assert np.abs(sink @ free - sink_target).max() > 1.0  # unconstrained, the sink goes astray
    mo.add_sink(sink + 1e-3 * rng.normal(size=(1, 8)), sink_target)
    mo.add_sink(sink + 1e-3 * rng.normal(size=(1, 8)), sink_target)
    constrained = fit_map(mo, 1e-3)
    np.testing.assert_allclose(sink @ constrained, sink_target, atol=1e-2)
    # first tokens of ordinary size are no outliers: no constraint, the plain ridge fit
    plain = moments_of(m, r)
    plain.add_sink(m[:16], r[:16] + 5.0)
    np.testing.assert_array_equal(fit_map(plain, 1e-3), free)


def test_too_few_windows_fall_back_to_plain_removal():
    """One calibration window: one fold is empty, nothing is cross-validated, the strongest ridge wins."""
    rng = np.random.default_rng(4)
    m = rng.normal(size=(20, 8))
    empty = RunMoments.zeros(8)
    np.testing.assert_array_equal(fit_map(empty, 0.1), np.eye(8))
    choice = choose_ridge([moments_of(m, m + 1.0), empty])
    assert choice.ridge == max(choice.heldout_ratio)


def test_rows_and_moments_give_the_same_fits_and_held_out_errors():
    """At most half as many tokens as channels: a fold keeps its rows and fits through their
    factorization; the same fold
    as moments (the d x d solve) gives the same maps, with the sink constraint too, and the same
    held-out ratios at every ridge strength."""
    rng = np.random.default_rng(5)
    dim = 128
    m = rng.normal(size=(60, dim))
    r = m @ (np.eye(dim) + 0.2 * rng.normal(size=(dim, dim))) + 0.1 * rng.normal(size=(60, dim))
    sink = np.zeros((2, dim))
    sink[:, 3] = 400.0
    folds = []
    for part in (slice(0, 30), slice(30, 60)):
        mo = RunMoments.zeros(dim)
        for start in range(part.start, part.stop, 10):  # windows of 10 tokens
            mo.add(m[start : start + 10], r[start : start + 10])
        mo.add_sink(sink + rng.normal(size=(2, dim)), sink + 30.0 * rng.normal(size=(2, dim)))
        folds.append(mo)
    assert all(f.in_rows for f in folds)
    as_moments = [f.copy() for f in folds]
    for f in as_moments:
        f.to_moments()
    assert not as_moments[0].in_rows
    np.testing.assert_allclose(as_moments[0].mm, m[:30].T @ m[:30], rtol=1e-12)
    rows_ratios, moment_ratios = heldout_ratios(folds, RIDGE_GRID), heldout_ratios(as_moments, RIDGE_GRID)
    for ridge in RIDGE_GRID:
        assert rows_ratios[ridge] == pytest.approx(moment_ratios[ridge], rel=1e-8), ridge
    whole_rows, whole_moments = folds[0] + folds[1], as_moments[0] + as_moments[1]
    assert whole_rows.in_rows and whole_rows.tokens == 60
    for ridge in (1e-3, 0.1):
        t_rows, t_moments = fit_map(whole_rows, ridge), fit_map(whole_moments, ridge)
        np.testing.assert_allclose(t_rows, t_moments, rtol=1e-7, atol=1e-9)
        assert residual(whole_rows, t_rows) == pytest.approx(residual(whole_moments, t_moments), rel=1e-8)
    assert _sink_pinv(whole_rows) is not None  # the sink constraint was part of both fits
    # Past `dim` tokens the rows give way to the moments, with the same sums.
    assert rows_up_to(dim) == 64
    whole_rows.add(m[:10], r[:10])
    assert not whole_rows.in_rows and whole_rows.tokens == 70
    np.testing.assert_allclose(whole_rows.mm, m.T @ m + m[:10].T @ m[:10], rtol=1e-12)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_fits_from_rows_equal_fits_from_moments_in_a_model(model_type, tiny_models, monkeypatch):
    """Short windows keep every fold in rows (hidden 64: up to 32 tokens); the maps folded into
    the model, their ridges and error ratios equal those of the moment form within 1e-6."""
    import mi_prun.ridge as ridge_module

    loaded = load_model(str(tiny_models[model_type]))
    ids = torch.randint(0, 384, (4, 9), generator=torch.Generator().manual_seed(7))
    windows = dense_windows(loaded, ids)
    seen = []
    monkeypatch.setattr(ridge_module.RunMoments, "to_moments", lambda self: seen.append(self.dim))
    rows, _ = fit_compensation(loaded.runner, loaded.spec, [2, 3, 5], windows)
    assert not seen  # no fold gave up its rows
    monkeypatch.undo()
    monkeypatch.setattr(ridge_module, "rows_up_to", lambda dim: 0)
    moments, _ = fit_compensation(loaded.runner, loaded.spec, [2, 3, 5], windows)
    for a, b in zip(rows, moments):
        assert (a.ridge, a.prev) == (b.ridge, b.prev)
        assert a.heldout_ratio == pytest.approx(b.heldout_ratio, rel=1e-6) and a.fit_ratio == pytest.approx(b.fit_ratio, rel=1e-6)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-6)
