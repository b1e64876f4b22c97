"""Training batches straight from in-memory volumes, augmented as whole batches on their device.

When a trial has the cohort's volumes in memory (shared through Ray's object store), a
DataLoader only adds per-item Python work: indexing, a float32 copy, MONAI's per-item random
transforms on the CPU. Here a `VolumeCache` holds the float16 volumes where one device reads them
(on a GPU: uploaded once, when they fit), a batch is gathered with one index, converted to
float32 on the device and augmented there with batched torch ops drawing from the same
distributions as `datasets.torch_data.training_augmentation`: left-right flip (p 0.5), a small
rotation + scaling (p 0.5 x strength, one trilinear resampling), a random affine intensity change
of every sequence (x -> a x + b, a in 1 +- 0.25 strength, b in +- 0.25 strength, always) and
Gaussian noise (p 0.3).

Why every sequence's intensity is jittered: each sequence is z-scored over the whole head, so a
large tumour shifts the normalised intensity of all the normal tissue (on the demo cohort the
normal tissue's mean correlates with log tumour volume at r = -0.7, though it moves by only 0.02-0.07
SD). A network learns tumour size from that global shift instead of from the tumour, and its
Grad-CAM then lies on normal tissue and the head's edge (enrichment on tumour + oedema 0.04-0.7
with a global jitter of +-10%, 2-3.3 with this one; `benchmarks/results/learning.md`). The
jitter, far larger than that shift, takes the shortcut away.
"""

from __future__ import annotations

import warnings

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

        # One copy of the batch, then every step in place on it and on the chosen volumes only:
        # a whole-batch temporary per step cost a third of the augmentation time on a CPU.
        out = images.clone()
        flipped = (uniform(batch) < 0.5).nonzero().squeeze(1)
        if flipped.numel():
            out[flipped] = images[flipped].flip(2)
        affine = uniform(batch) < 0.5 * min(1.0, s)
        angles = uniform(batch, 3, low=-0.12 * s, high=0.12 * s)
        scales = uniform(batch, 3, low=1 - 0.08 * s, high=1 + 0.08 * s)
        chosen = affine.nonzero().squeeze(1)
        if chosen.numel():  # resample only the chosen volumes: the costly step on a CPU
            matrix = _rotation(angles[chosen]) * scales[chosen].view(-1, 1, 3)
            theta = torch.cat([matrix, torch.zeros(len(chosen), 3, 1, device=device)], dim=2).to(images.dtype)
            grid = F.affine_grid(theta, [len(chosen), *images.shape[1:]], align_corners=False)
            out[chosen] = F.grid_sample(out[chosen], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        channels = images.shape[1]
        scale = uniform(batch, channels, low=1 - 0.25 * s, high=1 + 0.25 * s)
        shift = uniform(batch, channels, low=-0.25 * s, high=0.25 * s)
        out.mul_(scale.view(batch, channels, 1, 1, 1).to(images.dtype))
        out.add_(shift.view(batch, channels, 1, 1, 1).to(images.dtype))
        noisy = (uniform(batch) < 0.3).nonzero().squeeze(1)
        std = uniform(batch, high=0.05 * s)
        if noisy.numel():
            noise = torch.randn((len(noisy), *images.shape[1:]), generator=generator, device=device, dtype=images.dtype)
            out[noisy] += noise * std[noisy].view(-1, 1, 1, 1, 1).to(images.dtype)
        return out


PLACEMENTS = ("auto", "device", "host")
DEVICE_SHARE = 0.25  # "auto" uploads the volumes when they take at most this share of the trial's GPU memory
_UPLOAD_CHUNK_BYTES = 256 << 20


def fits_on_device(nbytes: int, free: int, total: int, gpu_fraction: float = 1.0) -> bool:
    """Whether "auto" uploads `nbytes` of volumes: at most `DEVICE_SHARE` of this trial's part of the
    GPU (trials sharing a GPU start at once and each sees it empty) and of what is free now."""
    return nbytes <= DEVICE_SHARE * min(free, total * min(1.0, gpu_fraction))


class VolumeCache:
    """The cohort's float16 volumes as one device reads them; shared by every fold trained there.

    On a GPU with ``placement`` "auto" the whole array is uploaded once when it fits in
    `DEVICE_SHARE` of the trial's share of device memory (1,100 patients at 4 x 120 x 120 x 78
    take 10 GB; an H100 has 80; see `fits_on_device`): a batch is then one ``index_select`` on the device and the host does no work
    per batch, so the loader cannot starve the GPU. Otherwise ("host", or too large) each batch is
    gathered on the host into a reused pinned buffer and copied over. On the CPU the host array
    is read in place.

    Parameters
    ----------
    volumes
        float16 [N, C, X, Y, Z] (e.g. the node's shared copy; read only).
    device
        The training device.
    placement
        ``auto`` | ``device`` (upload, whatever the size) | ``host``.
    gpu_fraction
        Share of the GPU this trial holds (Ray's fractional GPUs: 0.25 when four trials share one).
    """

    def __init__(self, volumes: np.ndarray, device: torch.device | str, placement: str = "auto",
                 gpu_fraction: float = 1.0):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.volumes, self.device = volumes, torch.device(device)
        with warnings.catch_warnings():  # the shared copy is read only; this view is never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self._host = torch.from_numpy(volumes)
        upload = self.device.type == "cuda" and (placement == "device" or (
            placement == "auto" and fits_on_device(volumes.nbytes, *torch.cuda.mem_get_info(self.device), gpu_fraction)))
        self.resident = self._upload() if upload else None
        self._staging: torch.Tensor | None = None

    @property
    def on_device(self) -> bool:
        return self.resident is not None

    def _upload(self) -> torch.Tensor:
        resident = torch.empty(self.volumes.shape, dtype=torch.float16, device=self.device)
        step = max(1, _UPLOAD_CHUNK_BYTES // max(1, self.volumes[:1].nbytes))
        for start in range(0, len(self.volumes), step):
            resident[start:start + step].copy_(self._host[start:start + step])
        return resident

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """float32 [len(rows), C, X, Y, Z] on the device: a new tensor the caller may keep."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.resident is not None:
            return self.resident.index_select(0, torch.from_numpy(rows).to(self.device)).float()
        if self.device.type != "cuda":
            # Row by row into the float32 batch: gathers and converts in one pass (1.5x a fancy
            # index followed by .float() at the reference shape).
            return _gather_rows(self._host, rows, torch.empty((len(rows), *self._host.shape[1:])))
        # Into a reused pinned buffer, then one synchronous copy to the device (the next gather reuses it).
        return _gather_rows(self._host, rows, self._staging_for(len(rows))).to(self.device).float()

    def _staging_for(self, count: int) -> torch.Tensor:
        if self._staging is None or len(self._staging) < count:
            self._staging = torch.empty((count, *self.volumes.shape[1:]), dtype=torch.float16, pin_memory=True)
        return self._staging[:count]


def _gather_rows(source: torch.Tensor, rows: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    for i, row in enumerate(rows):
        out[i].copy_(source[int(row)])
    return out


class InMemoryBatches:
    """Gathers batches of a fold from a `VolumeCache` onto its device.

    Parameters
    ----------
    cache
        The volumes as the training device reads them.
    rows
        Row of the cached volumes for each fold position (None: position = row).
    """

    def __init__(self, cache: VolumeCache, rows: np.ndarray | None):
        self.cache, self.rows = cache, rows

    def images(self, positions: np.ndarray) -> torch.Tensor:
        return self.cache.gather(positions if self.rows is None else self.rows[positions])

    @staticmethod
    def order(count: int, batch_size: int, generator: torch.Generator, drop_last: bool) -> list[np.ndarray]:
        """Shuffled index batches of range(count), like a shuffling DataLoader with this generator."""
        permutation = torch.randperm(count, generator=generator).numpy()
        stop = (count // batch_size) * batch_size if drop_last else count
        return [permutation[i:i + batch_size] for i in range(0, stop, batch_size)] or [permutation]
