"""Training: one Trainer for both methods, their objectives, configs, checkpoints, schedules."""

from .data import EmbeddingDataset, batch_indices
from .losses import info_nce, reco_loss
from .tasks import LongTailTask, RECOTask, logit_adjustment
from .trainer import TrainConfig, Trainer, TrainingDivergedError

__all__ = [
    "EmbeddingDataset",
    "LongTailTask",
    "RECOTask",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "batch_indices",
    "info_nce",
    "logit_adjustment",
    "reco_loss",
]
