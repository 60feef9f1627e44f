"""Safe import of EDM2's, EDM's and the original VCDM release's network pickles.

- :mod:`vcdm.legacy.records`: inert stand-ins for what a pickle may construct, and the errors.
- :mod:`vcdm.legacy.unpickle`: the restricted unpickler and torch's stream/zip file readers.
- :mod:`vcdm.legacy.edm`: a pickle's network → vcdm checkpoint config and state dict (``import_edm``).
- :mod:`vcdm.legacy.edm2`: the same for EDM2's pickles (post-hoc reconstructions, raw snapshots as post-hoc
  EMA inputs, their encoders).
- :mod:`vcdm.legacy.pretrained`: initialising a training network from pretrained weights.
"""
from vcdm.legacy.edm import NET_CLASSES, PRECOND_KINDS, LegacyNetwork, import_edm, load_legacy_pickle, to_vcdm
from vcdm.legacy.pretrained import PretrainedReport, load_pretrained
from vcdm.legacy.records import LegacyError, Record, UnsafePickleError
from vcdm.legacy.unpickle import read_pickle

__all__ = ["NET_CLASSES", "PRECOND_KINDS", "LegacyError", "LegacyNetwork", "PretrainedReport", "Record",
           "UnsafePickleError", "import_edm", "load_legacy_pickle", "load_pretrained", "read_pickle", "to_vcdm"]
