"""Training: backbones, survival heads and losses, the fold trainer and the fold models it leaves.

Names are imported on first use, so that importing one light module of the package (or a
command's ``--help``) does not load torch and MONAI.
"""

import importlib

_LAZY = {
    "BACKBONES": "trainables.backbones", "build_backbone": "trainables.backbones",
    "TrainConfig": "trainables.config",
    "CheckpointError": "trainables.fold", "FoldData": "trainables.fold", "FoldResult": "trainables.fold",
    "FoldTrainer": "trainables.fold", "TrainingDivergedError": "trainables.fold", "train_fold": "trainables.fold",
    "FoldModel": "trainables.fold_model",
    "HEADS": "trainables.heads", "build_head": "trainables.heads",
    "binary_nll": "trainables.losses", "cox_nll": "trainables.losses", "logistic_hazard_nll": "trainables.losses",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainables' has no attribute {name!r}")


__all__ = sorted(_LAZY)
