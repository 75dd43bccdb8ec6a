import numpy as np
import pytest

from mi_prun import mi


def correlated_gaussians(n, rhos, seed=0):
    rng = np.random.default_rng(seed)
    rhos = np.asarray(rhos)
    x = rng.standard_normal((n, len(rhos)))
    y = rhos * x + np.sqrt(1 - rhos**2) * rng.standard_normal((n, len(rhos)))
    return x, y


def known_mi(rhos):
    return -0.5 * np.sum(np.log(1 - np.asarray(rhos) ** 2))


@pytest.mark.parametrize("rhos", [[0.9], [0.5, 0.8, 0.3], [0.99, 0.0, 0.6, 0.7]])
def test_gaussian_mi_matches_closed_form(rhos):
    x, y = correlated_gaussians(200_000, rhos)
    assert mi.gaussian_mi(x, y, shrinkage=0.0) == pytest.approx(known_mi(rhos), rel=0.02, abs=0.005)


def test_gaussian_mi_invariant_to_invertible_linear_maps_and_symmetric():
    x, y = correlated_gaussians(20_000, [0.7, 0.4, 0.9])
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    base = mi.gaussian_mi(x, y, shrinkage=0.0)
    assert mi.gaussian_mi(x @ a + 5.0, y @ b - 2.0, shrinkage=0.0) == pytest.approx(base, rel=1e-6)
    assert mi.gaussian_mi(y, x, shrinkage=0.0) == pytest.approx(base, rel=1e-9)


def test_gaussian_mi_independent_is_near_zero_and_shrinkage_lowers_it():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((50_000, 4)), rng.standard_normal((50_000, 4))
    assert mi.gaussian_mi(x, y, shrinkage=0.0) < 1e-3
    x, y = correlated_gaussians(5_000, [0.9, 0.9])
    assert mi.gaussian_mi(x, y, shrinkage=0.3) < mi.gaussian_mi(x, y, shrinkage=0.0)


def test_gaussian_mi_with_pca_keeps_the_informative_directions():
    rng = np.random.default_rng(3)
    x, y = correlated_gaussians(20_000, [0.95, 0.9])
    # Embed in 32 dims with the informative pair carrying most variance.
    lift = rng.standard_normal((2, 32)) * 10
    noise_x, noise_y = rng.standard_normal((20_000, 32)) * 0.01, rng.standard_normal((20_000, 32)) * 0.01
    value = mi.gaussian_mi(x @ lift + noise_x, y @ lift + noise_y, shrinkage=0.0, pca_dim=2)
    assert value == pytest.approx(known_mi([0.95, 0.9]), rel=0.05)


def test_renyi_mi_properties():
    x, y = correlated_gaussians(300, [0.9, 0.9, 0.9])
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    base = mi.renyi_mi(x, y)
    # Gaussian kernels depend on distances only: rotations and translations leave it unchanged.
    assert mi.renyi_mi(x @ q + 3.0, y) == pytest.approx(base, rel=1e-8)
    assert mi.renyi_mi(y, x) == pytest.approx(base, rel=1e-9)
    # S(A o B) >= max(S(A), S(B)), so 0 <= I <= min(S(A), S(B)); a copy carries more than a noisy one.
    sx, sy = (mi.renyi_entropy(mi.gaussian_kernel_gram(a)) for a in (x, y))
    assert 0 <= base <= min(sx, sy)
    assert mi.renyi_mi(x, x) > base
    independent = mi.renyi_mi(x, rng.standard_normal((300, 3)))
    assert 0 <= independent < 0.5 * base


def test_renyi_entropy_of_n_distinct_points_is_log_n():
    gram = np.eye(64)
    assert mi.renyi_entropy(gram, alpha=2.0) == pytest.approx(np.log2(64))


def test_token_mi_matches_closed_form_with_coordinates_as_samples():
    # Each token's coordinates are draws of (x, y) with correlation rho: I = -1/2 log(1 - rho^2).
    rng = np.random.default_rng(5)
    tokens, dims, rho = 200, 4096, 0.8
    x = rng.standard_normal((tokens, dims))
    y = rho * x + np.sqrt(1 - rho**2) * rng.standard_normal((tokens, dims))
    values = mi.token_gaussian_mi(x, y)
    assert values.shape == (tokens,)
    assert values.mean() == pytest.approx(known_mi([rho]), rel=0.03)


def test_token_mi_invariances():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((10, 64)), rng.standard_normal((10, 64))
    y = 0.5 * x + y
    base = mi.token_gaussian_mi(x, y)
    scale = rng.uniform(0.1, 10, size=(10, 1))
    np.testing.assert_allclose(mi.token_gaussian_mi(x * scale + 7.0, y), base, rtol=1e-9)
    np.testing.assert_allclose(mi.token_gaussian_mi(y, x), base, rtol=1e-12)
    perm = rng.permutation(64)
    np.testing.assert_allclose(mi.token_gaussian_mi(x[:, perm], y[:, perm]), base, rtol=1e-9)
    # identical states: finite, and the largest possible value
    assert np.all(np.isfinite(mi.token_gaussian_mi(x, x)))
    assert np.all(mi.token_gaussian_mi(x, x) > base)


def test_lost_fraction_and_angular_distance():
    assert mi.lost_fraction(0.0) == pytest.approx(1.0)
    assert mi.lost_fraction(known_mi([0.6])) == pytest.approx(1 - 0.36)
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    y = np.array([[0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(mi.angular_distance(x, y), [0.5, 0.0], atol=1e-7)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        mi.gaussian_mi(np.zeros((10, 2)), np.zeros((9, 2)))
    with pytest.raises(ValueError):
        mi.token_gaussian_mi(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError):
        mi.renyi_entropy(np.eye(3), alpha=1.0)


@pytest.mark.parametrize("step_values", [None, 4 * 24 * 7], ids=["whole", "7-token-steps"])
def test_streamed_pair_statistics_are_the_mi_module_functions(step_values, monkeypatch):
    """What ships (all boundary pairs at once, in torch, a few tokens at a time when the states are
    large) equals mi.py's per-pair functions."""
    import torch

    import mi_prun.scoring as scoring
    from mi_prun.scoring import PairwiseTokenStats

    if step_values is not None:
        monkeypatch.setattr(scoring, "STATS_VALUES", step_values)

    rng = np.random.default_rng(3)
    base = rng.normal(size=(50, 24))
    states = [base + rng.normal(scale=s, size=base.shape) for s in (0.0, 0.3, 1.0, 3.0)]
    stats = PairwiseTokenStats()
    stats.observe([torch.from_numpy(s[:20]).float() for s in states])
    stats.observe([torch.from_numpy(s[20:]).float() for s in states])
    for a in range(4):
        for b in range(4):
            x, y = states[a].astype(np.float32), states[b].astype(np.float32)
            assert stats.mean("token_mi")[a, b] == pytest.approx(mi.token_gaussian_mi(x, y).mean(), rel=1e-5)
            assert stats.mean("cosine")[a, b] == pytest.approx(mi.cosine_similarity(x, y).mean(), rel=1e-6)
            assert stats.mean("angular")[a, b] == pytest.approx(mi.angular_distance(x, y).mean(), abs=1e-5)
