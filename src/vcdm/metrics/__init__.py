"""Image-quality metrics: TensorFlow-compatible Inception features, FID with EDM-compatible reference
statistics, KID and precision/recall (the last two through torch-fidelity)."""
from vcdm.metrics.fid import fid_score, frechet_distance
from vcdm.metrics.inception import (FEATURE_DIM, WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, InceptionFeatures,
                                    InceptionWeightsError, cached_weights_path, resolve_weights)
from vcdm.metrics.kid import kid_score, precision_recall
from vcdm.metrics.stats import FeatureExtractor, FeatureStats, StatsError, compute_stats, load_reference

METRICS = ("fid", "kid", "pr")  # names accepted by `vcdm fid calc --metrics`

__all__ = ["METRICS", "FEATURE_DIM", "WEIGHTS_ENV", "WEIGHTS_FILE", "WEIGHTS_URL", "FeatureExtractor", "FeatureStats",
           "InceptionFeatures", "InceptionWeightsError", "StatsError", "cached_weights_path", "compute_stats", "fid_score",
           "frechet_distance", "kid_score", "load_reference", "precision_recall", "resolve_weights"]
