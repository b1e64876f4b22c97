"""Grad-CAM (MONAI) of a survival network: where in the volume the risk comes from.

The map is the gradient-weighted activation of the backbone's deepest stage that keeps a spatial
map (at least 3 voxels per axis) for the score whose increasing affine function is the DPI the
report ranks by (`trainables.heads.SurvivalHead.score_tensor`: the Cox log-hazard, the 1-year
logit, minus the restricted mean survival time for the logistic-hazard head), placed on the input
grid and scaled to [0, 1].

A map on the tumour is weak evidence of what a network learned: tumours are the brightest
structures of T2 and FLAIR, and the map of the same network *untrained* also favours them (on a
demo-size network trained to tell large from small tumours, the median enrichment defined below
was 1.54 trained and about 1.9 untrained). `attention_in_region` therefore goes with a control:
the report and `benchmarks.learning` give it for the trained network and for the same
architecture untrained (`untrained_twin`). Placing it: a feature
cell of a strided stage is centred where its receptive field is centred, which is not where a
plain upsampling puts it (a stride-2 stem and a stride-2 max-pool centre cell j of a /4 stage on
input voxel 4j; trilinear upsampling puts it on 4j + 1.5, 1 cm off at the demo's 7 mm voxels).
`feature_grid` measures that centre from the gradient of one cell with respect to the input, so
the correction holds for any backbone. Overlays show T1c
and FLAIR in the axial, coronal and sagittal planes through the map's maximum and, when the store
has a tumour label, through the tumour's centre as well (each row says which), in the QC
montages' radiological orientation. The reference group found the coronal and sagittal planes
more telling than the axial one.

`attention_in_region` scores a map against a known region (tumour plus oedema on synthetic
cohorts): the share of the map's mass inside the region divided by the region's share of the
head (1 = no better than uniform attention), in 3D and in each plane through the tumour, and
whether the map's maximum falls in the region (the pointing game).
"""

from __future__ import annotations

import copy
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
    """One output per volume, higher = worse, from the padded network: the head's score (the mean
    output when no head is given or the network's outputs are not the head's, a fusion's image branch)."""

    def __init__(self, net: nn.Module, head=None):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.head is not None and out.shape[1] == self.head.out_features:
            return self.head.score_tensor(out)[:, None]
        return out.mean(dim=1, keepdim=True) if out.shape[1] > 1 else out


def cam_layer(model: nn.Module, x: torch.Tensor, min_size: int = 3) -> str:
    """The deepest stage whose output keeps at least `min_size` voxels per axis (the deepest is the
    most class-specific, Selvaraju et al. 2017).

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


_GRIDS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def feature_grid(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Where a stage's feature cells sit on the input grid: cell j is centred on input voxel
    ``stride * j + offset`` (per axis). The stride is the ratio of the shapes; the offset is the
    mean, over the 8 central cells and 2 seeded noise inputs, of the centre of mass of a cell's
    input gradient (its receptive field) minus ``stride * j``. Noise rather than an image: on a
    flat background a max-pool routes a cell's gradient to one corner of its window. Cached per
    architecture, layer and input shape: the geometry depends on neither the image nor the
    weights, so the K fold models of a cell share one measurement."""
    key = (str(model), layer, tuple(x.shape))
    if key in _GRIDS:
        return _GRIDS[key]
    captured = {}
    hook = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    offsets = []
    try:
        for seed in (0, 1):
            probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
            with torch.enable_grad():
                model(probe)
                features = captured["out"]
                shape = np.array(features.shape[2:])
                stride = np.array(x.shape[2:], dtype=float) / shape
                for corner in np.ndindex(2, 2, 2):
                    cell = tuple(int(v) for v in np.minimum((shape - 1) // 2 + np.array(corner), shape - 1))
                    (grad,) = torch.autograd.grad(features[(0, slice(None), *cell)].abs().sum(), probe,
                                                  retain_graph=True)
                    weight = grad[0].abs().sum(0).numpy().astype(np.float64)
                    if weight.sum() > 0:
                        mass = [(weight.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(n)).sum()
                                for axis, n in enumerate(weight.shape)]
                        offsets.append(np.array(mass) / weight.sum() - stride * np.array(cell))
    finally:
        hook.remove()
    # Without a usable gradient (dead cells), the plain centred geometry.
    _GRIDS[key] = stride, (np.mean(offsets, axis=0) if offsets else (stride - 1) / 2)
    return _GRIDS[key]


def gradcam_map(model: nn.Module, image: np.ndarray, head=None) -> np.ndarray:
    """Grad-CAM map [X, Y, Z] in [0, 1] of one float image [C, X, Y, Z] for a `Backbone`; `head`: the
    fold model's survival head, whose score (the DPI's) is explained."""
    from scipy import ndimage

    model = model.eval()
    x = model.pad(torch.from_numpy(np.asarray(image, dtype=np.float32))[None])
    layer = cam_layer(model, x)
    cam = GradCAM(nn_module=_Risk(model.net, head).eval(), target_layers=layer)
    with torch.enable_grad():
        low_res = cam.compute_map(x.clone().requires_grad_(True), class_idx=0)[0, 0].detach().numpy()
    stride, offset = feature_grid(model.net, x, layer.removeprefix("net."))
    # Each input voxel u reads the feature grid at (u - offset) / stride (trilinear; the border
    # cells extend outwards), with the entry padding undone so the map lies on the image grid.
    starts = [(p - s) // 2 for p, s in zip(x.shape[2:], image.shape[1:])]
    coordinates = np.meshgrid(*[(np.arange(n) + a - o) / st for n, a, o, st in
                                zip(image.shape[1:], starts, offset, stride)], indexing="ij")
    result = ndimage.map_coordinates(low_res.astype(np.float64), coordinates, order=1, mode="nearest")
    low, high = float(result.min()), float(result.max())
    return (result - low) / (high - low) if high > low else np.zeros_like(result)


def untrained_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with fresh (seeded) weights: the control of an attention score."""
    twin = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in twin.modules():
        if hasattr(module, "reset_parameters") and module is not twin:
            module.reset_parameters()
    torch.random.set_rng_state(generator_state)
    return twin.eval()


def map_maximum(cam: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel of the map's maximum inside the head mask."""
    inside_head = mask > 0 if mask.any() else np.ones(cam.shape, dtype=bool)
    return tuple(int(v) for v in np.unravel_index(np.argmax(np.where(inside_head, cam, -1)), cam.shape))


def region_centre(region: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in np.argwhere(region).mean(axis=0))


def attention_in_region(cam: np.ndarray, mask: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """How much of a map's positive mass lies in `region`, against the region's share of the head.

    Returns ``mass_share`` (map mass in the region / map mass in the head), ``region_share``
    (region voxels / head voxels), ``enrichment`` (their ratio, 3D), ``enrichment_<plane>`` in
    the axial, coronal and sagittal planes through the region's centre, and ``hit`` (1 when the
    map's maximum in the head lies in the region dilated by one voxel, the pointing game).
    """
    from scipy import ndimage

    head = mask > 0 if mask.any() else np.ones(cam.shape, dtype=bool)
    region = (region > 0) & head
    if not region.any():
        raise ValueError("the region is empty inside the head")
    weights = np.clip(cam, 0, None) * head

    def enrichment(w: np.ndarray, r: np.ndarray, h: np.ndarray) -> float:
        share, total = r.sum() / max(h.sum(), 1), w.sum()
        return float((w[r].sum() / total) / share) if total > 0 and share > 0 else float("nan")

    out = {"mass_share": float(weights[region].sum() / weights.sum()) if weights.sum() > 0 else float("nan"),
           "region_share": float(region.sum() / head.sum()), "enrichment": enrichment(weights, region, head)}
    centre = region_centre(region)
    for name in PLANES:
        out[f"enrichment_{name}"] = enrichment(plane(weights, name, centre), plane(region, name, centre),
                                               plane(head, name, centre))
    out["hit"] = float(ndimage.binary_dilation(region, iterations=1)[map_maximum(cam, mask)])
    return out


def overlay(image: np.ndarray, sequences: list[str], cam: np.ndarray, mask: np.ndarray, label: np.ndarray | None,
            title: str, path: Path) -> list[tuple[str, tuple[int, int, int]]]:
    """T1c and FLAIR with the map (inside the head mask) in three planes, through the map's maximum
    and, when `label` marks a tumour, through its centre; returns [(what, voxel)] of the cuts."""
    cuts = [("map maximum", map_maximum(cam, mask))]
    has_tumour = label is not None and label.any()
    if has_tumour:
        cuts.append(("tumour centre", region_centre(label > 0)))
    inside_head = mask > 0 if mask.any() else np.ones(cam.shape, dtype=bool)
    cam = np.where(inside_head, cam, 0.0)
    sequences_shown = [s for s in ("t1c", "flair") if s in sequences] or sequences[:1]
    rows = [(sequence, what, centre) for what, centre in cuts for sequence in sequences_shown]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.1 * len(rows)), squeeze=False)
    for r, (sequence, what, centre) in enumerate(rows):
        volume = image[sequences.index(sequence)].astype(np.float32)
        inside = volume[mask > 0] if mask.any() else volume.ravel()
        low, high = np.percentile(inside, (1, 99)) if inside.size else (0.0, 1.0)
        for c, name in enumerate(PLANES):
            ax = axes[r, c]
            ax.imshow(plane(volume, name, centre), cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
            heat = plane(cam, name, centre)
            ax.imshow(np.ma.masked_less(heat, 0.3), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if has_tumour:
                ax.contour(plane(label.astype(np.float32), name, centre), levels=[0.5], colors="white", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{sequence}\nthrough {what}\n{centre}", fontsize=8)
    legend = "Grad-CAM inside the head (jet, shown above 0.3)"
    legend += ", tumour label (white)" if has_tumour else " (this store has no tumour label)"
    fig.suptitle(f"{title}\n{legend}", fontsize=9, parse_math=False)  # the title holds a patient id
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return cuts


def save_nifti(cam: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """The 3D map on the store's RAS grid, for a NIfTI viewer."""
    nib.save(nib.Nifti1Image(cam.astype(np.float32), affine), str(path))
