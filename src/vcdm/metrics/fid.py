"""Fréchet distance between two Gaussians fitted to features (FID when the features are Inception's)."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

from vcdm.metrics.stats import FeatureStats


RETRY_EPS = 1e-8  # the release's fid.py: on failure, retry with sigmas + 1e-8 I (inflated again each time)
MAX_RETRIES = 10


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), computed as EDM does.

    scipy's sqrtm of the (non-symmetric) product; rounding can leave a tiny imaginary part, which is
    dropped, so scores match EDM's. With fewer images than feature dimensions the covariances are
    singular; scipy warns about that, but the trace is still accurate, so the warning is silenced.
    When the square root is not finite (near-singular products), both covariances are inflated by
    1e-8 I and it is tried again, as the release's fid.py does (it also retries on a negative or
    > 1e5 value; rounding makes identical statistics slightly negative, and large-scale features
    legitimately exceed 1e5, so those are not retried here).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    m = np.square(mu1 - mu2).sum()
    eye = np.eye(len(sigma1))
    for attempt in range(MAX_RETRIES + 1):
        s1, s2 = sigma1 + attempt * RETRY_EPS * eye, sigma2 + attempt * RETRY_EPS * eye
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            s = scipy.linalg.sqrtm(s1 @ s2)
        fd = float(np.real(m + np.trace(s1 + s2 - 2 * s)))
        if np.isfinite(s).all() and np.isfinite(fd):
            return fd
    raise ValueError(f"Frechet distance: the matrix square root stays non-finite "
                     f"after {MAX_RETRIES} retries inflating the covariances by {RETRY_EPS:g} I")


def fid_score(stats: FeatureStats, ref: FeatureStats) -> float:
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
