"""Training: EDM's loop with the original release's structures and embedders.

options (TrainOptions, the flags) · build (dataset, embedder, Structure, network, loss) · batches
(data batch → x, y, augment labels) · sampler (resumable, rank-sharded positions) · loop (Trainer)
· state (training states) · loggers (log.txt, stats.jsonl, loss.png, TensorBoard, wandb) · preview
(sample grids) · finetune (--pretrained_weights, --transfer) · distributed (torchrun, DDP).
"""
from vcdm.train.loop import TrainingError, train
from vcdm.train.options import OptionError, TrainOptions

__all__ = ["OptionError", "TrainOptions", "TrainingError", "train"]
