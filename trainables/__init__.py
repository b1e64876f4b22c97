"""Training: backbones, survival heads and losses, and the fold trainer."""

from trainables.backbones import BACKBONES, build_backbone
from trainables.config import TrainConfig
from trainables.fold import CheckpointError, FoldData, FoldResult, FoldTrainer, TrainingDivergedError, train_fold
from trainables.heads import HEADS, build_head
from trainables.losses import binary_nll, cox_nll, logistic_hazard_nll

__all__ = [
    "BACKBONES", "HEADS", "CheckpointError", "FoldData", "FoldResult", "FoldTrainer", "TrainConfig",
    "TrainingDivergedError", "binary_nll", "build_backbone", "build_head", "cox_nll", "logistic_hazard_nll",
    "train_fold",
]
