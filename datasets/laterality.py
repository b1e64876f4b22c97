"""Left and right agree across a patient's sequences: no sequence is mirrored in its voxels
while its header says otherwise (a flipped export, a converter that reversed one axis).

The head is nearly symmetric, so overlap of head masks (``datasets.preprocess``) cannot see a
mirror. What differs between the two hemispheres, the tumour above all, differs on the same side
in every sequence, whatever the contrast: a T1 shows the tumour dark, a FLAIR bright, both
show its edges. So, on the common grid, for each sequence:

1. edges: the gradient magnitude of the log of the smoothed image (contrast sign and a smooth
   bias field drop out);
2. its own mid-sagittal plane: the half-voxel mirror position that minimises the squared
   difference of the edge map and its mirror image (a mirrored sequence is also displaced, so
   each sequence is centred on its own plane);
3. its asymmetry: edges at distance u right of the plane minus edges at u left of it.

Each sequence's asymmetry is correlated with the sum of the others' (each standardised). Aligned
sequences correlate positively (their asymmetries share the lesion's side); a mirrored one
negatively (its asymmetry is the others' negated). A score below ``MIRRORED_BELOW`` excludes the
patient; one below ``DOUBTFUL_BELOW`` is noted among the patient's problems (kept, shown in the QC
page) for a person to look at. With two sequences the score says that they disagree, not which
one is mirrored.

Known answer (``python -m benchmarks.mirror_detection``, 40 synthetic heads on the default grid,
results in ``benchmarks/results/mirror_detection.md``): no aligned patient scored below
``MIRRORED_BELOW`` (the lowest aligned score, a FLAIR's, was -0.21); about four in five mirrored
T1, T1c and T2 and three in five mirrored FLAIRs did. A mirror is missed where the lesion lies
near the midline or is small. On coarse grids the edges are too blurred to tell: heads narrower
than ``MIN_HEAD_VOXELS`` voxels left to right are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

MIRRORED_BELOW = -0.3  # aligned synthetic sequences scored at least -0.21; mirrored ones mostly below -0.5
DOUBTFUL_BELOW = 0.0
MIN_HEAD_VOXELS = 64  # on coarser grids aligned and mirrored scores overlap (see the benchmark)


def _edges(plane: np.ndarray) -> np.ndarray:
    plane = plane.astype(np.float32)
    positive = plane[plane > 0]
    floor = 0.05 * float(np.percentile(positive, 99)) if positive.size else 1.0
    log = np.log(ndimage.gaussian_filter(np.maximum(plane, 0), 1.0) + floor)
    return np.sqrt(sum(ndimage.sobel(log, axis) ** 2 for axis in range(3)))


def _mid_plane(plane: np.ndarray, edges: np.ndarray, inner: np.ndarray) -> int:
    """Twice the x index (axis 0) of the mirror plane: the half-voxel position that best maps the
    edges onto themselves, searched within 15% of the head's width around this sequence's own head
    centre (a mirrored sequence's head is displaced by twice its field of view's offset from it)."""
    xs = np.nonzero(inner.any(axis=(1, 2)))[0]
    width = int(xs[-1] - xs[0] + 1)
    weight = np.clip(plane, 0, None).sum(axis=(1, 2))
    own = float(np.dot(np.arange(len(weight)), weight) / weight.sum()) if weight.sum() > 0 else (xs[0] + xs[-1]) / 2
    centre = int(round(2 * own))
    reach = max(4, int(2 * 0.15 * width))  # in half voxels
    n = edges.shape[0]
    best, best_cost = centre, np.inf
    for twice in range(centre - reach, centre + reach + 1):
        mirror = twice - np.arange(n)
        inside = (mirror >= 0) & (mirror < n)
        both = inner[inside] & inner[mirror[inside]]
        if not both.any():
            continue
        cost = float(np.mean((edges[inside] - edges[mirror[inside]])[both] ** 2))
        if cost < best_cost:
            best, best_cost = twice, cost
    return best


def _asymmetry(edges: np.ndarray, inner: np.ndarray, twice: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges right of the plane minus edges left of it, at distances 1..half (in plane-centred
    coordinates, so that sequences with different planes compare), and where both sides are inside."""
    n = edges.shape[0]
    out = np.zeros((half, *edges.shape[1:]), dtype=np.float32)
    valid = np.zeros((half, *edges.shape[1:]), dtype=bool)
    for k in range(half):
        right = (twice + 1) // 2 + k + (1 if twice % 2 == 0 else 0)
        left = twice - right
        if 0 <= left < n and 0 <= right < n:
            out[k] = edges[right] - edges[left]
            valid[k] = inner[right] & inner[left]
    return out, valid


def laterality_scores(planes: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, float]:
    """Each present sequence's correlation with the others' asymmetry (module docstring); empty
    when fewer than two sequences with some asymmetry are present or the head is too narrow on this
    grid to tell (then the patient's info records no scores: not checked)."""
    if len(planes) < 2:
        return {}
    if int(mask.any(axis=(1, 2)).sum()) < MIN_HEAD_VOXELS:
        return {}
    inner = ndimage.binary_erosion(mask, iterations=max(1, round(0.03 * mask.shape[0])))
    if not inner.any():
        return {}
    half = mask.shape[0] // 2
    maps = {}
    for key, plane in planes.items():
        edges = _edges(plane)
        maps[key] = _asymmetry(edges, inner, _mid_plane(plane, edges, inner), half)
    valid = np.logical_and.reduce([v for _, v in maps.values()])
    if valid.sum() < 100:
        return {}
    standard = {}
    for key, (asymmetry, _) in maps.items():
        values = asymmetry[valid].astype(np.float64)
        if np.isfinite(values).all() and values.std() > 0:  # a flat asymmetry says nothing either way
            standard[key] = (values - values.mean()) / values.std()
    if len(standard) < 2:
        return {}
    scores = {}
    for key, values in standard.items():
        others = sum(v for k, v in standard.items() if k != key)
        scores[key] = round(float(np.corrcoef(values, others)[0, 1]), 3)
    return scores


def doubtful(scores: Mapping[str, float]) -> list[str]:
    """Notes for sequences whose left and right agree only weakly with the others' (kept, for a person to look at)."""
    return [f"{key}: its left-right asymmetry agrees weakly with the other sequences' (correlation {score:+.2f}; "
            f"mirrored sequences score mostly below {MIRRORED_BELOW:g}): look at its laterality in the QC page"
            for key, score in sorted(scores.items()) if MIRRORED_BELOW <= score < DOUBTFUL_BELOW]


def mirrored(scores: Mapping[str, float]) -> str | None:
    """Why the patient is excluded when some sequence's left and right disagree with the others', else None."""
    flagged = sorted((score, key) for key, score in scores.items() if score < MIRRORED_BELOW)
    if not flagged:
        return None
    score, key = flagged[0]
    if len(scores) == 2:
        first, second = sorted(scores)
        return (f"{first} and {second} disagree left-right (asymmetry correlation {score:+.2f}, below "
                f"{MIRRORED_BELOW:g}): one of them is mirrored in its voxels while its header is not (a flipped "
                "export); check both against the scanner's images")
    return (f"{key} is mirrored left-right against the other sequences (asymmetry correlation {score:+.2f}, "
            f"below {MIRRORED_BELOW:g}; aligned sequences correlate positively): its voxels are flipped while its "
            "header is not (a flipped export); fix the file or leave the sequence out")
