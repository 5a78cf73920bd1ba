"""Numbers that say how good a model is: PSNR and the Frechet distance.

Both work on NumPy arrays (use `Tensor.numpy()` first).
"""

import numpy as np


def psnr(images, reference, data_range=1.0):
    """Peak signal-to-noise ratio in dB: 10 log10(range^2 / MSE), over the whole set."""
    mse = np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2)
    return float(10 * np.log10(data_range**2 / max(mse, 1e-20)))


def frechet_distance(features_a, features_b):
    """Frechet distance between Gaussians fitted to two sets of feature vectors (rows).

        d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    This is FID when the features come from an Inception network; here they
    come from our digit classifier. Tr((S_a S_b)^(1/2)) is computed as the sum
    of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is
    symmetric, so only `eigh` is needed.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: expected two (N, D) feature sets, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def _sqrt_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
