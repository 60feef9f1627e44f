"""vcdm: two-stage ("visual chain-of-thought") diffusion models in PyTorch."""

__version__ = "0.1.0"
