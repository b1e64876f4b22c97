"""A torch Dataset over a cohort store.

Zarr is opened lazily in whichever process reads (see `CohortStore.group`), so the dataset can be
used with forked DataLoader workers. With `volumes` given (an in-memory float16 array of the
cohort, e.g. loaded once per node), no file is read at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.store import CohortStore


def training_augmentation(strength: float = 1.0, seed: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """MONAI random transforms for training (flip, small affine, per-sequence intensity scale and
    shift, noise); the same distributions as `trainables.batches.BatchAugmentation`, which says
    why every sequence's intensity is jittered.

    `strength` scales every range; 0 gives the identity.
    """
    from monai.transforms import (
        Compose,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    if strength <= 0:
        return lambda image: image
    transform = Compose([
        RandFlip(prob=0.5, spatial_axis=0),  # left-right: hemisphere is not the prognostic signal
        RandAffine(prob=0.5 * min(1.0, strength), rotate_range=[0.12 * strength] * 3,
                   scale_range=[0.08 * strength] * 3, padding_mode="zeros"),
        RandScaleIntensity(factors=0.25 * strength, prob=1.0, channel_wise=True),
        RandShiftIntensity(offsets=0.25 * strength, prob=1.0, channel_wise=True),
        RandGaussianNoise(prob=0.3, std=0.05 * strength),
    ])
    if seed is not None:
        transform.set_random_state(seed)
    return lambda image: torch.as_tensor(transform(image)).float()


class CohortDataset(Dataset):
    """Items ``{"image": float32 [C, X, Y, Z], "time": days, "event": 0/1, "index"}``.

    Parameters
    ----------
    store
        The cohort store (read lazily per process).
    slots
        Store slots of the patients, in item order.
    time, event
        Per-item outcome arrays (same length as `slots`).
    transform
        Applied to the image tensor (training augmentation); None for evaluation.
    volumes
        Optional float16 array [len(slots), C, X, Y, Z] already in memory, used instead of the store.
    """

    def __init__(self, store: CohortStore, slots: Sequence[int], time: np.ndarray, event: np.ndarray,
                 transform: Callable | None = None,
                 volumes: np.ndarray | None = None):
        self.store = store
        self.slots = np.asarray(slots, dtype=int)
        self.time = np.asarray(time, dtype=np.float32)
        self.event = np.asarray(event, dtype=np.float32)
        self.transform = transform
        self.volumes = volumes
        if not len(self.slots) == len(self.time) == len(self.event):
            raise ValueError("slots, time and event must have the same length")
        if volumes is not None and len(volumes) != len(self.slots):
            raise ValueError(f"volumes has {len(volumes)} items for {len(self.slots)} slots")

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, item: int) -> dict:
        raw = self.volumes[item] if self.volumes is not None else self.store.image(int(self.slots[item]))
        image = torch.from_numpy(np.asarray(raw, dtype=np.float32))
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "time": torch.tensor(self.time[item]), "event": torch.tensor(self.event[item]),
                "index": item}
