"""Grad-CAM (MONAI) of a survival network: where in the volume the risk comes from.

The map is the gradient-weighted activation of the backbone's last stage for the network's risk
output (the Cox log-hazard or 1-year logit; the mean hazard logit for the logistic-hazard head),
upsampled to the input grid and scaled to [0, 1]. Overlays show T1c and FLAIR in the three
planes through the attention maximum, in the QC montages' radiological orientation.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.visualize import GradCAM  # noqa: E402
from torch import nn  # noqa: E402

from datasets.qc import plane  # noqa: E402

PLANES = ("axial", "coronal", "sagittal")


class _Risk(nn.Module):
    """One output per volume, higher = worse, from the padded network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.mean(dim=1, keepdim=True) if out.shape[1] > 1 else out


def cam_layer(model: nn.Module, x: torch.Tensor, min_size: int = 4) -> str:
    """The deepest stage whose output keeps at least `min_size` voxels per axis.

    On small (CPU-sized) inputs the last stage is 1 x 1 x 1 and its Grad-CAM is constant.
    """
    shapes = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape[2:]))
             for name in model.stages]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    usable = [name for name in model.stages if min(shapes[name]) >= min_size]
    return usable[-1] if usable else model.stages[0]


def gradcam_map(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Grad-CAM map [X, Y, Z] in [0, 1] of one float image [C, X, Y, Z] for a `Backbone`."""
    model = model.eval()
    x = model.pad(torch.from_numpy(np.asarray(image, dtype=np.float32))[None])
    layer = cam_layer(model, x)
    # MONAI's default post-processing maps the maximum to 0 and the minimum to 1 (an inverted
    # scale for some colour maps): keep the raw map and scale it here, maximum = most important.
    cam = GradCAM(nn_module=_Risk(model.net).eval(), target_layers=layer, postprocessing=lambda m: m)
    with torch.enable_grad():
        result = cam(x=x.requires_grad_(True), class_idx=0)[0, 0].detach().numpy()
    # Undo the entry padding so the map lies on the image grid.
    starts = [(p - s) // 2 for p, s in zip(x.shape[2:], image.shape[1:])]
    result = result[tuple(slice(a, a + s) for a, s in zip(starts, image.shape[1:]))]
    low, high = float(result.min()), float(result.max())
    return (result - low) / (high - low) if high > low else np.zeros_like(result)


def overlay(image: np.ndarray, sequences: list[str], cam: np.ndarray, mask: np.ndarray, label: np.ndarray | None,
            title: str, path: Path) -> tuple[int, int, int]:
    """T1c and FLAIR with the map (inside the head mask) in three planes; returns the voxel cut through.

    The planes pass through the tumour centroid when the store has a tumour label (so one sees
    whether the attention lands on it), else through the attention maximum inside the head.
    """
    inside_head = mask > 0 if mask.any() else np.ones(cam.shape, dtype=bool)
    if label is not None and label.any():
        centre = tuple(int(round(v)) for v in np.argwhere(label > 0).mean(axis=0))
    else:
        centre = tuple(int(v) for v in np.unravel_index(np.argmax(np.where(inside_head, cam, -1)), cam.shape))
    cam = np.where(inside_head, cam, 0.0)
    rows = [s for s in ("t1c", "flair") if s in sequences] or sequences[:1]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.1 * len(rows)), squeeze=False)
    for r, sequence in enumerate(rows):
        volume = image[sequences.index(sequence)].astype(np.float32)
        inside = volume[mask > 0] if mask.any() else volume.ravel()
        low, high = np.percentile(inside, (1, 99)) if inside.size else (0.0, 1.0)
        for c, name in enumerate(PLANES):
            ax = axes[r, c]
            ax.imshow(plane(volume, name, centre), cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
            heat = plane(cam, name, centre)
            ax.imshow(np.ma.masked_less(heat, 0.3), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if label is not None and label.any():
                ax.contour(plane(label.astype(np.float32), name, centre), levels=[0.5], colors="white", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(sequence, fontsize=9)
    fig.suptitle(f"{title}\nGrad-CAM inside the head (jet, shown above 0.3), tumour label (white); "
                 f"planes through voxel {centre}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return centre


def save_nifti(cam: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """The 3D map on the store's RAS grid, for a NIfTI viewer."""
    nib.save(nib.Nifti1Image(cam.astype(np.float32), affine), str(path))
