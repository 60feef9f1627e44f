"""Image-quality metrics: TensorFlow-compatible Inception features, FID with EDM-compatible reference
statistics, KID and precision/recall (the last two through torch-fidelity)."""
from vcdm.metrics.fid import fid_score, frechet_distance
from vcdm.metrics.inception import (FEATURE_DIM, WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, InceptionFeatures,
                                    InceptionWeightsError, cached_weights_path, resolve_weights)
from vcdm.metrics.kid import kid_score, precision_recall
from vcdm.metrics.stats import FeatureExtractor, FeatureStats, StatsError, compute_stats, load_reference

METRICS = ("fid", "kid", "pr")  # names accepted by `vcdm fid calc --metrics`


def scores(stats: FeatureStats, reference: FeatureStats, metrics: tuple[str, ...] | list[str]) -> dict[str, float]:
    """The named ``metrics`` of ``stats`` against ``reference``: fid; kid (mean, std); pr (precision, recall).
    kid and pr need both sides' features."""
    results: dict[str, float] = {}
    if "fid" in metrics:
        results["fid"] = fid_score(stats, reference)
    if "kid" in metrics:
        results.update(kid_score(stats.features, reference.features))
    if "pr" in metrics:
        results.update(precision_recall(stats.features, reference.features))
    return results

__all__ = ["METRICS", "FEATURE_DIM", "WEIGHTS_ENV", "WEIGHTS_FILE", "WEIGHTS_URL", "FeatureExtractor", "FeatureStats",
           "InceptionFeatures", "InceptionWeightsError", "StatsError", "cached_weights_path", "compute_stats", "fid_score",
           "frechet_distance", "kid_score", "load_reference", "precision_recall", "resolve_weights", "scores"]
