"""Typed configuration of one trial's training; built from the dict Ray hands a trainable."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from datasets.errors import InputError
from trainables.backbones import BACKBONES
from datasets.clinical_features import FUSION_DEFAULT, IMAGE, INPUTS, check_known
from trainables.batches import PLACEMENTS
from trainables.heads import CUT_SPACINGS, HEADS
from trainables.optimizers import OPTIMIZERS


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and protocol of fold training.

    Attributes (units in brackets)
    ------------------------------
    backbone, width, depth, dropout
        Network (see `trainables.backbones`).
    head
        A name of `trainables.heads.HEADS` (``cox``, ``logistic_hazard``, ``binary``); the head's
        own options are the fields below (`cox_memory`; `intervals`, `horizon_days`, `cut_spacing`).
    inputs
        ``image`` (the backbone alone) or ``image+clinical`` (`trainables.fusion`).
    clinical_inputs, clinical_hidden, clinical_dropout
        Of ``image+clinical`` only: the stored clinical columns the network sees (encoded on the
        training fold, `datasets.clinical_features`), the width of the clinical branch's hidden
        layer (0: the clinical vector enters the read-out linearly) and its dropout.
    lr, weight_decay, batch_size, optimizer, momentum
        Optimisation; ``momentum`` is used by SGD only.
    epochs, warmup_epochs
        Linear warm-up then cosine decay to zero over `epochs`.
    grad_clip
        Maximum gradient norm (0: no clipping).
    patience
        Early stopping after this many epochs without a better selection C-index (0: off; needs
        a selection split).
    selection_fraction
        0 (default): the out-of-fold predictions come from the last epoch. Above 0: that
        fraction of each training fold is held out (stratified by event) to choose the best
        epoch and to stop early; see `trainables.fold` for why the last epoch is the default.
    augmentation
        Strength of the random training transforms (0: none).
    cox_memory
        Risk-set memory of the Cox head [samples of earlier batches]; 0: each batch's own risk
        sets. Off by default: 256 gave no better validation C-index and, at lr 1e-3, a log-hazard
        scale that kept growing (`benchmarks/results/cox_memory.md`).
    intervals, horizon_days, cut_spacing
        Discrete times of the logistic-hazard head: `intervals` intervals, ``uniform`` up to
        `horizon_days` [days] or ``exponential`` (the reference study's; `trainables.heads`).
    eval_times
        Times of the survival curves written out and integrated for the IBS [days].
    seed
        Seeds torch, shuffling and augmentation (per fold and epoch).
    num_workers
        DataLoader worker processes (0: in the training process).
    device
        ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
    precision
        Autocast of the network: ``auto`` (bfloat16 on a GPU, float32 on a CPU; see
        `trainables.fold.resolve_precision`), ``bf16`` or ``fp32``. Weights and optimizer state
        stay float32.
    volume_placement
        Where a GPU reads in-memory volumes from: ``auto`` (uploaded once when they take at most
        a quarter of the free GPU memory, else the host), ``device`` or ``host`` (see
        `trainables.batches.VolumeCache`).
    """

    backbone: str = "seresnext50"
    width: float = 1.0
    depth: float = 1.0
    dropout: float = 0.0
    head: str = "cox"
    inputs: str = IMAGE
    clinical_inputs: tuple[str, ...] = FUSION_DEFAULT
    clinical_hidden: int = 0
    clinical_dropout: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 1e-6
    batch_size: int = 64
    optimizer: str = "adamw"
    momentum: float = 0.9
    epochs: int = 200
    warmup_epochs: int = 5
    grad_clip: float = 1.0
    patience: int = 0
    selection_fraction: float = 0.0
    augmentation: float = 1.0
    cox_memory: int = 0
    intervals: int = 19
    horizon_days: float = 1825.0
    cut_spacing: str = "uniform"
    eval_times: tuple[float, ...] = (90.0, 180.0, 270.0, 365.0, 540.0, 730.0)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    precision: str = "auto"
    volume_placement: str = "auto"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InputError(f"unknown backbone {self.backbone!r}; valid backbones are {sorted(BACKBONES)}")
        if self.head not in HEADS:
            raise InputError(f"unknown head {self.head!r}; valid heads are {list(HEADS)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; valid optimizers are {list(OPTIMIZERS)}")
        if self.inputs not in INPUTS:
            raise InputError(f"unknown inputs {self.inputs!r}; valid inputs are {list(INPUTS)}")
        check_known(self.clinical_inputs)
        checks = [
            (int(self.clinical_hidden) >= 0, f"clinical_hidden must be >= 0, got {self.clinical_hidden}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.augmentation >= 0, f"augmentation must be >= 0, got {self.augmentation}"),
            (0 < self.width <= 4 and 0 < self.depth <= 4,
             f"width and depth must be in (0, 4], got width={self.width}, depth={self.depth}"),
            (self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}"),
            (0 <= self.clinical_dropout < 1, f"clinical_dropout must be in [0, 1), got {self.clinical_dropout}"),
            (self.inputs == IMAGE or len(self.clinical_inputs) > 0, "inputs image+clinical need clinical_inputs"),
            (0 < self.lr < math.inf, f"lr must be positive and finite, got {self.lr}"),
            (0 <= self.weight_decay < math.inf, f"weight_decay must be >= 0 and finite, got {self.weight_decay}"),
            (int(self.batch_size) >= 2, f"batch_size must be at least 2 (batch norm), got {self.batch_size}"),
            (int(self.epochs) >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}"),
            (self.volume_placement in PLACEMENTS,
             f"volume_placement must be one of {list(PLACEMENTS)}, got {self.volume_placement!r}"),
            (0 <= self.selection_fraction < 0.5, f"selection_fraction must be in [0, 0.5), got {self.selection_fraction}"),
            (not self.patience or self.selection_fraction > 0,
             f"patience {self.patience} needs a selection split to stop on (selection_fraction > 0)"),
            (self.cut_spacing in CUT_SPACINGS, f"cut_spacing must be one of {list(CUT_SPACINGS)}, got {self.cut_spacing!r}"),
            (len(self.eval_times) >= 2 and list(self.eval_times) == sorted(self.eval_times),
             f"eval_times must be at least two increasing times, got {self.eval_times}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        object.__setattr__(self, "batch_size", int(self.batch_size))
        object.__setattr__(self, "epochs", int(self.epochs))
        object.__setattr__(self, "eval_times", tuple(float(t) for t in self.eval_times))
        object.__setattr__(self, "clinical_inputs", tuple(self.clinical_inputs))
        object.__setattr__(self, "clinical_hidden", int(self.clinical_hidden))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict (e.g. a Tune config), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown training parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
