"""Image-quality metrics: TensorFlow-compatible Inception features, FID with EDM-compatible reference
statistics, KID and precision/recall (the last two through torch-fidelity), and FD-DINOv2 (the Fréchet
distance in DINOv2 ViT-L/14's feature space, as EDM2 reports it)."""
from typing import Mapping, Sequence

from vcdm.metrics.fid import fid_score, frechet_distance
from vcdm.metrics.inception import (FEATURE_DIM, WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, InceptionFeatures,
                                    InceptionWeightsError, cached_weights_path, resolve_weights)
from vcdm.metrics.kid import kid_score, precision_recall
from vcdm.metrics.stats import (FeatureExtractor, FeatureStats, StatsError, compute_references, compute_stats,
                                load_reference, load_references, save_references)

METRICS = ("fid", "kid", "pr", "fd_dinov2")  # names accepted by `vcdm fid calc --metrics`
SPACE = {"fid": "inception", "kid": "inception", "pr": "inception", "fd_dinov2": "dinov2"}  # each metric's features
SET_METRICS = ("kid", "pr")  # these compare feature sets, so the reference must keep its features


def spaces(metrics: Sequence[str]) -> list[str]:
    """The feature spaces the ``metrics`` need, in a fixed order."""
    return [space for space in ("inception", "dinov2") if any(SPACE[m] == space for m in metrics)]


def missing(reference: Mapping[str, FeatureStats], metrics: Sequence[str]) -> str | None:
    """What a reference lacks to serve ``metrics`` (one phrase), or None."""
    absent = [m for m in metrics if SPACE[m] not in reference]
    if absent:
        return f"no {SPACE[absent[0]]} statistics, which {','.join(absent)} need{'s' if len(absent) == 1 else ''}"
    lacking = [m for m in metrics if m in SET_METRICS and reference[SPACE[m]].features is None]
    if lacking:
        return f"only mu/sigma, but {','.join(lacking)} need{'s' if len(lacking) == 1 else ''} the features"
    return None


def scores(stats: Mapping[str, FeatureStats], reference: Mapping[str, FeatureStats],
           metrics: Sequence[str]) -> dict[str, float]:
    """The named ``metrics`` of ``stats`` against ``reference`` (both keyed by feature space): fid, fd_dinov2;
    kid (mean, std); pr (precision, recall). kid and pr need both sides' features."""
    results: dict[str, float] = {}
    if "fid" in metrics:
        results["fid"] = fid_score(stats["inception"], reference["inception"])
    if "kid" in metrics:
        results.update(kid_score(stats["inception"].features, reference["inception"].features))
    if "pr" in metrics:
        results.update(precision_recall(stats["inception"].features, reference["inception"].features))
    if "fd_dinov2" in metrics:
        results["fd_dinov2"] = fid_score(stats["dinov2"], reference["dinov2"])
    return results

__all__ = ["METRICS", "SET_METRICS", "SPACE", "compute_references", "load_references", "missing", "save_references",
           "spaces", "FEATURE_DIM", "WEIGHTS_ENV", "WEIGHTS_FILE", "WEIGHTS_URL", "FeatureExtractor", "FeatureStats",
           "InceptionFeatures", "InceptionWeightsError", "StatsError", "cached_weights_path", "compute_stats", "fid_score",
           "frechet_distance", "kid_score", "load_reference", "precision_recall", "resolve_weights", "scores"]
