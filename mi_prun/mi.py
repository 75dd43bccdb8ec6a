"""Mutual-information estimators: pure functions on arrays, no model and no I/O.

Two families, which differ in what counts as a *sample* of the random variables:

* Population estimators (`gaussian_mi`, `renyi_mi`): each token is one draw of the pair (X, Y),
  with X, Y the hidden vectors at two boundaries. They measure how well the whole population of
  states at one boundary predicts the other: this is dominated by the states' spectrum (a few
  huge outlier directions, norms growing with depth) more than by what a block changes.
* The per-token estimator (`token_gaussian_mi`): for one token, the hidden coordinates are the
  draws of a scalar pair (x_d, y_d); under a Gaussian channel y = a x + noise,
  I = -1/2 log(1 - rho^2) with rho the Pearson correlation over coordinates. It asks "how much
  of this token's state survives the block", which is what removing the block destroys.

All MI values are in nats unless a function says otherwise.
"""

from __future__ import annotations

import numpy as np

# Correlations are clipped below 1 so that an identity map has a finite (large) MI.
MAX_RHO2 = 1.0 - 1e-9


def _center(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array (samples, features), got shape {a.shape}")
    return a - a.mean(axis=0, keepdims=True)


def pca_project(a: np.ndarray, dim: int) -> np.ndarray:
    """Centered data projected on its top `dim` principal directions (all if dim >= rank)."""
    a = _center(a)
    if dim >= min(a.shape):
        return a
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    return a @ vt[:dim].T


def shrunk_covariance(a: np.ndarray, shrinkage: float) -> np.ndarray:
    """Sample covariance pulled toward a scaled identity: (1-s) C + s (tr C / d) I."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError("shrinkage must lie in [0, 1]")
    a = _center(a)
    cov = a.T @ a / max(a.shape[0] - 1, 1)
    target = np.trace(cov) / cov.shape[0]
    return (1.0 - shrinkage) * cov + shrinkage * target * np.eye(cov.shape[0])


def _logdet(m: np.ndarray) -> float:
    sign, value = np.linalg.slogdet(m)
    if sign <= 0:
        raise np.linalg.LinAlgError("covariance is not positive definite; raise shrinkage or lower pca_dim")
    return float(value)


def gaussian_mi(x: np.ndarray, y: np.ndarray, shrinkage: float = 0.05, pca_dim: int | None = None) -> float:
    """I(X;Y) of jointly Gaussian X, Y fitted to paired samples: 1/2 [log|Sx| + log|Sy| - log|Sxy|].

    Shrinkage is applied to the joint covariance and the marginals are read from its diagonal
    blocks, so the estimate is never negative (Fischer's inequality). `pca_dim` first projects
    each side on its own top principal directions, for hidden sizes large against the sample count.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError("x and y must hold the same number of samples")
    if pca_dim is not None:
        x, y = pca_project(x, pca_dim), pca_project(y, pca_dim)
    joint = shrunk_covariance(np.concatenate([_center(x), _center(y)], axis=1), shrinkage)
    dx = x.shape[1]
    value = 0.5 * (_logdet(joint[:dx, :dx]) + _logdet(joint[dx:, dx:]) - _logdet(joint))
    return max(value, 0.0)


def gaussian_kernel_gram(a: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Gaussian-kernel Gram matrix; sigma defaults to the median pairwise distance."""
    a = np.asarray(a, dtype=np.float64)
    sq = np.sum(a * a, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)
    if sigma is None:
        off = d2[~np.eye(len(a), dtype=bool)]
        sigma = float(np.sqrt(np.median(off))) if off.size and np.median(off) > 0 else 1.0
    return np.exp(-d2 / (2.0 * sigma * sigma))


def renyi_entropy(gram: np.ndarray, alpha: float = 1.01) -> float:
    """Matrix-based Renyi alpha-entropy (Sanchez Giraldo et al.) of a PSD Gram matrix, in bits."""
    if alpha <= 0 or alpha == 1:
        raise ValueError("alpha must be positive and different from 1")
    a = gram / np.trace(gram)
    eig = np.clip(np.linalg.eigvalsh(a), 0.0, None)
    return float(np.log2(np.sum(eig**alpha)) / (1.0 - alpha))


def renyi_mi(
    x: np.ndarray,
    y: np.ndarray,
    alpha: float = 1.01,
    sigma_x: float | None = None,
    sigma_y: float | None = None,
) -> float:
    """Matrix-based Renyi MI: S(A) + S(B) - S(A o B), Gram matrices of paired samples, in bits."""
    if x.shape[0] != y.shape[0]:
        raise ValueError("x and y must hold the same number of samples")
    kx, ky = gaussian_kernel_gram(x, sigma_x), gaussian_kernel_gram(y, sigma_y)
    return renyi_entropy(kx, alpha) + renyi_entropy(ky, alpha) - renyi_entropy(kx * ky, alpha)


def token_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation between x[t] and y[t] over hidden coordinates, for every token t."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError("x and y must have the same shape (tokens, hidden)")
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    denom = np.sqrt(np.sum(xc * xc, axis=1) * np.sum(yc * yc, axis=1))
    return np.sum(xc * yc, axis=1) / np.maximum(denom, 1e-300)


def mi_from_rho2(rho2: np.ndarray | float) -> np.ndarray | float:
    """I = -1/2 log(1 - rho^2): MI of a bivariate Gaussian with squared correlation rho^2."""
    return -0.5 * np.log1p(-np.minimum(rho2, MAX_RHO2))


def token_gaussian_mi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-token Gaussian-channel MI (nats), coordinates as samples; one value per token."""
    return mi_from_rho2(token_correlation(x, y) ** 2)


def lost_fraction(mi: float | np.ndarray, dims: int = 1) -> float | np.ndarray:
    """Fraction of signal variance a Gaussian channel of MI `mi` nats (over `dims` dims) loses."""
    return np.exp(-2.0 * np.asarray(mi, dtype=np.float64) / dims)


def cosine_similarity(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity (uncentered), used by the ShortGPT and angular baselines."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    num = np.sum(x * y, axis=1)
    return num / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-300)


def angular_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """arccos(cos) / pi per token (Gromov et al., 'The Unreasonable Ineffectiveness of the Deeper Layers')."""
    return np.arccos(np.clip(cosine_similarity(x, y), -1.0, 1.0)) / np.pi
