"""Training batches straight from in-memory volumes, augmented as whole batches on their device.

When a trial has the cohort's volumes in memory (shared through Ray's object store), a
DataLoader only adds per-item Python work: indexing, a float32 copy, MONAI's per-item random
transforms on the CPU. Here a batch is gathered with one fancy index, moved to the training
device (on a GPU: one host-to-device copy of float16), converted there, and augmented there with
batched torch ops drawing from the same distributions as `datasets.torch_data.training_augmentation`:
left-right flip (p 0.5), a small rotation + scaling (p 0.5 x strength, one trilinear resampling),
intensity scaling (p 0.5) and Gaussian noise (p 0.3).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [B, 3, 3] from angles [B, 3] (radians) about the three axes."""
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


class BatchAugmentation:
    """Random transforms of a batch [B, C, X, Y, Z] on its device; `strength` 0 is the identity."""

    def __init__(self, strength: float = 1.0):
        self.strength = float(strength)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.strength
        if s <= 0:
            return images
        batch, device = images.shape[0], images.device

        def uniform(*shape, low=0.0, high=1.0):
            return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

        flip = uniform(batch) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1, 1), images.flip(2), images)
        affine = uniform(batch) < 0.5 * min(1.0, s)
        angles = uniform(batch, 3, low=-0.12 * s, high=0.12 * s)
        scales = uniform(batch, 3, low=1 - 0.08 * s, high=1 + 0.08 * s)
        chosen = affine.nonzero().squeeze(1)
        if chosen.numel():  # resample only the chosen volumes: the costly step on a CPU
            matrix = _rotation(angles[chosen]) * scales[chosen].view(-1, 1, 3)
            theta = torch.cat([matrix, torch.zeros(len(chosen), 3, 1, device=device)], dim=2).to(images.dtype)
            grid = F.affine_grid(theta, [len(chosen), *images.shape[1:]], align_corners=False)
            images = images.clone()
            images[chosen] = F.grid_sample(images[chosen], grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)
        scale = torch.where(uniform(batch) < 0.5, uniform(batch, low=1 - 0.1 * s, high=1 + 0.1 * s),
                            torch.ones(batch, device=device))
        images = images * scale.view(-1, 1, 1, 1, 1).to(images.dtype)
        noisy = (uniform(batch) < 0.3).nonzero().squeeze(1)
        std = uniform(batch, high=0.05 * s)
        if noisy.numel():
            noise = torch.randn((len(noisy), *images.shape[1:]), generator=generator, device=device, dtype=images.dtype)
            images[noisy] += noise * std[noisy].view(-1, 1, 1, 1, 1).to(images.dtype)
        return images


class InMemoryBatches:
    """Gathers batches of a fold from in-memory float16 volumes onto the training device.

    Parameters
    ----------
    volumes
        float16 [N, C, X, Y, Z] (e.g. the node's shared copy; read only).
    rows
        Row of `volumes` for each fold position (None: position = row).
    device
        The training device.
    """

    def __init__(self, volumes: np.ndarray, rows: np.ndarray | None, device: torch.device):
        self.volumes, self.rows, self.device = volumes, rows, device

    def images(self, positions: np.ndarray) -> torch.Tensor:
        rows = positions if self.rows is None else self.rows[positions]
        batch = torch.from_numpy(np.ascontiguousarray(self.volumes[rows]))  # one gather, a new array
        # float16 crosses to the device (half the bytes); pinning this fresh array would copy it again.
        return batch.to(self.device).float()

    @staticmethod
    def order(count: int, batch_size: int, generator: torch.Generator, drop_last: bool) -> list[np.ndarray]:
        """Shuffled index batches of range(count), like a shuffling DataLoader with this generator."""
        permutation = torch.randperm(count, generator=generator).numpy()
        stop = (count // batch_size) * batch_size if drop_last else count
        return [permutation[i:i + batch_size] for i in range(0, stop, batch_size)] or [permutation]

