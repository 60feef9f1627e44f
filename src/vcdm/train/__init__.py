"""Training: EDM's loop with the original release's structures and embedders.

options (TrainOptions, the flags) · build (dataset, embedder, Structure, network, loss) · batches
(data batch → x, y, augment labels) · sampler (resumable, rank-sharded positions) · loop (Trainer)
· state (training states) · loggers (log.txt, stats.jsonl, loss.png, TensorBoard, wandb) · preview
(sample grids) · finetune (--pretrained_weights, --transfer) · distributed (torchrun, DDP).
"""
import sys
import types
from pathlib import Path

from vcdm.train.loop import TrainingError, train
from vcdm.train.options import OptionError, TrainOptions

__all__ = ["OptionError", "TrainOptions", "TrainingError", "train"]


class _CallablePackage(types.ModuleType):
    """``vcdm.train(options)`` runs ``train``: the package doubles as the Python API's function."""

    def __call__(self, options: TrainOptions | dict) -> Path | None:
        return train(options if isinstance(options, TrainOptions) else TrainOptions.from_dict(options))


sys.modules[__name__].__class__ = _CallablePackage
