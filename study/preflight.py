"""Checks before a study starts: will its checkpoints fit on the storage path?

A finished trial keeps its K fold models (one copy of the weights each); a running trial keeps
its last checkpoint (Tune's ``num_to_keep=1``): per fold the network, its optimiser state and,
with a selection split, the selected epoch's weights; a trial ASHA stopped keeps nothing. A
full-size study (240 trials x 10 folds of 3D ResNets) keeps a few hundred gigabytes; finding
that out when the disk fills on day three loses the running trials' last epochs, so it is
checked first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from datasets.errors import StudyError
from datasets.remote import is_remote

# A running trial: weights + AdamW's two moments + the selected epoch's weights, float32.
RUNNING_COPIES_PER_FOLD = 4
HEADROOM = 1.2


def parameter_count(backbone: str, in_channels: int, out_features: int, width: float, depth: float) -> int:
    """Parameters of a backbone, counted without allocating them (meta device)."""
    import torch

    from trainables.backbones import build_backbone

    with torch.device("meta"):
        model = build_backbone(backbone, in_channels, out_features, width, depth, 0.0)
    return sum(p.numel() for p in model.parameters())


def checkpoint_bytes(config, in_channels: int) -> int:
    """Storage the study's kept checkpoints need: every trial's fold models, plus the full state of
    as many running trials as run at once (of the largest backbone)."""
    protocol = config.protocol
    per_backbone = {b: parameter_count(b, in_channels, 19, protocol.width, protocol.depth) for b in config.backbones}
    trials_per_backbone = len(config.tasks) * config.num_samples
    finished = sum(n * 4 * protocol.folds * trials_per_backbone for n in per_backbone.values())
    running = max(per_backbone.values()) * 4 * RUNNING_COPIES_PER_FOLD * protocol.folds * config.max_concurrent
    return int(finished + running)


def check_free_space(config, in_channels: int) -> int:
    """Raise StudyError if a local storage path lacks room for the checkpoints; returns the estimate."""
    needed = checkpoint_bytes(config, in_channels)
    if is_remote(config.storage_path):
        return needed
    root = Path(config.storage_path)
    while not root.exists():
        root = root.parent
    free = shutil.disk_usage(root).free
    if free < needed * HEADROOM:
        raise StudyError(f"--storage-path {config.storage_path}: the study's checkpoints need about "
                         f"{needed / 2**30:.1f} GiB ({needed * HEADROOM / 2**30:.1f} GiB with headroom) and "
                         f"{free / 2**30:.1f} GiB are free; free space, use fewer --num-samples, or store to "
                         "object storage (s3:// gs://)")
    return needed
