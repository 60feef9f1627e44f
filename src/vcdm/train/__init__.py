"""Training: EDM's loop with the original release's structures and embedders (see loop.py)."""
from vcdm.train.loop import TrainingError, train
from vcdm.train.options import OptionError, TrainOptions

__all__ = ["OptionError", "TrainOptions", "TrainingError", "train"]
