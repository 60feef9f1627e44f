"""Fréchet distance between two Gaussians fitted to features (FID when the features are Inception's)."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

from vcdm.metrics.stats import FeatureStats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), computed as EDM does.

    scipy's sqrtm of the (non-symmetric) product; rounding can leave a tiny imaginary part, which is
    dropped, so scores match EDM's. With fewer images than feature dimensions the covariances are
    singular; scipy warns about that, but the trace is still accurate, so the warning is silenced.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


def fid_score(stats: FeatureStats, ref: FeatureStats) -> float:
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
