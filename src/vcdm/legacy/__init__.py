"""Safe import of EDM2's, EDM's and the original VCDM release's network pickles.

- :mod:`vcdm.legacy.records`: inert stand-ins for what a pickle may construct, and the errors.
- :mod:`vcdm.legacy.unpickle`: the restricted unpickler and torch's stream/zip file readers.
- :mod:`vcdm.legacy.edm`: a pickle's network → vcdm checkpoint config and state dict (``import_edm``).
- :mod:`vcdm.legacy.edm2`: the same for EDM2's pickles (post-hoc reconstructions, raw snapshots as post-hoc
  EMA inputs, their encoders).
- :mod:`vcdm.legacy.pretrained`: initialising a training network from pretrained weights.

Submodules are imported on first use, so the embedders and the dataset tool can use the restricted
unpickler without loading the network importers.
"""
from __future__ import annotations

from vcdm.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["NET_CLASSES", "PRECOND_KINDS", "LegacyNetwork", "import_edm", "load_legacy_pickle", "to_vcdm"],
                    "vcdm.legacy.edm"),
    **dict.fromkeys(["PretrainedReport", "load_pretrained"], "vcdm.legacy.pretrained"),
    **dict.fromkeys(["LegacyError", "Record", "UnsafePickleError"], "vcdm.legacy.records"),
    "read_pickle": "vcdm.legacy.unpickle",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
