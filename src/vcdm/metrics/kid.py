"""Set-based metrics on Inception features through torch-fidelity: KID and precision/recall.

KID is the unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / D + 1)³, averaged over
random subsets (Bińkowski et al. 2018); torch-fidelity's defaults: 100 subsets of 1000, seed 2020.
torch-fidelity is imported where it is used: it is slow to import, and FID alone does not need it.
"""
from __future__ import annotations

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020


def kid_score(features: np.ndarray, ref_features: np.ndarray, *, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> dict[str, float]:
    """{'kid_mean', 'kid_std', 'kid_subset_size'}; the subset size shrinks to the smaller set if needed."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(features), len(ref_features))
    if size < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(features)} and {len(ref_features)}")
    out = kid_features_to_metric(torch.as_tensor(features), torch.as_tensor(ref_features), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid_mean": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_subset_size": size}


def precision_recall(features: np.ndarray, ref_features: np.ndarray, *, neighborhood: int = 3) -> dict[str, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k = `neighborhood`: {'precision', 'recall'}."""
    try:
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    except ImportError:
        raise ValueError("precision/recall needs torch-fidelity >= 0.4 (pip install -U torch-fidelity)") from None
    if min(len(features), len(ref_features)) <= neighborhood:
        raise ValueError(f"precision/recall needs more than {neighborhood} features in each set")
    out = prc_features_to_metric(torch.as_tensor(features), torch.as_tensor(ref_features),
                                 prc_neighborhood=neighborhood, save_cpu_ram=True, verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL]}
