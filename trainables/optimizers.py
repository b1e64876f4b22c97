"""The optimizers a trial may name (`TrainConfig.optimizer`, search spaces): one entry each, the
name and how it is built from the network's parameter groups and the trial's configuration.

Weight decay is set per parameter group by the caller (none on biases and norms), so the
builders take only what is their own: the learning rate and, for SGD, the momentum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OPTIMIZERS: dict[str, Callable[[list[dict], object], torch.optim.Optimizer]] = {
    "adamw": lambda groups, config: torch.optim.AdamW(groups, lr=config.lr),
    "adam": lambda groups, config: torch.optim.Adam(groups, lr=config.lr),
    "sgd": lambda groups, config: torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True),
}


def build_optimizer(groups: list[dict], config) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names (validated by `TrainConfig`)."""
    return OPTIMIZERS[config.optimizer](groups, config)
