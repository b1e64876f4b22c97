"""What a usable patient looks like: geometry at the converter's entry, content at its exit.

A scan that is not a head MRI must never be marked usable. A NaN in an affine, or an infinite
output spacing, once produced all-zero volumes with a full head mask that trained like any other
patient; a 2-slice slab converted with no problem noted. The converter checks every file's
geometry when it reads it and every patient's result before marking it done, and
``python -m datasets.convert --verify`` repeats the content checks on a finished store. The
ranges below are wide on purpose: they refuse what cannot be a head scan, not unusual protocols.

=========================  ===================  ===============================================
check                      range                why
=========================  ===================  ===============================================
affine                     finite, invertible   the grid's position in the scanner is its geometry
voxel size                 0.05-20 mm per axis  finer is not MRI, coarser is not a volume
voxels per axis            at least 4           2-slice slabs and 2 x 2 x 2 stubs are not volumes
field of view              30-1,000 mm          per axis: a head is about 150 x 180 x 130 mm
declared voxels            at most 2**27        checked in the header before decompressing: a
                                                1.8 MB .nii.gz declaring 1 GiB took 5.9 GB
sequences' head masks      overlap (Dice) 0.5   on the output grid: a sequence whose head lies
                                                elsewhere has a wrong affine (or is another scan)
left-right asymmetry       correlation > -0.3   between each sequence and the others, on grids
                                                where the head is 64+ voxels wide: a mirrored
                                                sequence's is negated (``datasets.laterality``)
``--spacing``              0.1-10 mm            the output grid (finite)
head mask                  100-8,000 mL         an infant head to a very large adult one
intensities in the mask    not constant         per present sequence: constant means no image
=========================  ===================  ===============================================
"""

from __future__ import annotations

import math

import numpy as np

VOXEL_MM = (0.05, 20.0)
MIN_VOXELS = 4
MIN_FIELD_OF_VIEW_MM = 30.0
MAX_FIELD_OF_VIEW_MM = 1000.0
MAX_DECLARED_VOXELS = 2 ** 27  # 512 x 512 x 512: finer than any head MRI protocol
MIN_MASK_OVERLAP = 0.5  # Dice of a sequence's head mask with the reference sequence's
SPACING_MM = (0.1, 10.0)
HEAD_ML = (100.0, 8000.0)


def spacing_problem(spacing: float) -> str | None:
    """Why an output spacing [mm] is refused, or None."""
    if not (math.isfinite(spacing) and SPACING_MM[0] <= spacing <= SPACING_MM[1]):
        return f"spacing must be a finite {SPACING_MM[0]:g}-{SPACING_MM[1]:g} mm, got {spacing}"
    return None


def geometry_problem(affine: np.ndarray, shape) -> str | None:
    """Why a volume's grid (4 x 4 affine, 3 spatial sizes) cannot be a head scan, or None."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return "its affine has NaN or infinite entries"
    linear = affine[:3, :3]
    if abs(np.linalg.det(linear)) < 1e-12 or np.linalg.cond(linear) > 1e6:
        return "its affine is not invertible (a zero or degenerate axis)"
    voxel = np.linalg.norm(linear, axis=0)
    if not ((voxel >= VOXEL_MM[0]) & (voxel <= VOXEL_MM[1])).all():
        return (f"voxel size {[round(float(v), 4) for v in voxel]} mm is outside "
                f"{VOXEL_MM[0]:g}-{VOXEL_MM[1]:g} mm")
    sizes = [int(s) for s in shape]
    if min(sizes) < MIN_VOXELS:
        return f"shape {sizes} has fewer than {MIN_VOXELS} voxels along an axis (a slab, not a volume)"
    field = voxel * np.asarray(sizes, dtype=float)
    if field.min() < MIN_FIELD_OF_VIEW_MM:
        return (f"field of view {[round(float(f), 1) for f in field]} mm is under {MIN_FIELD_OF_VIEW_MM:g} mm "
                "along an axis (a slab, not a head)")
    if field.max() > MAX_FIELD_OF_VIEW_MM:
        return (f"field of view {[round(float(f), 1) for f in field]} mm is over {MAX_FIELD_OF_VIEW_MM:g} mm along "
                "an axis (not a head scan)")
    if math.prod(sizes) > MAX_DECLARED_VOXELS:
        return f"it declares {sizes} = {math.prod(sizes):,} voxels, more than any head scan ({MAX_DECLARED_VOXELS:,})"
    return None


def content_problem(image: np.ndarray, mask: np.ndarray, missing: np.ndarray, voxel_mm: float) -> str | None:
    """Why a converted patient (image [C, X, Y, Z], head mask, missing flags, isotropic voxel [mm])
    is not usable, or None."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return "empty head mask"
    millilitres = float(mask.sum()) * voxel_mm ** 3 / 1000.0
    if not HEAD_ML[0] <= millilitres <= HEAD_ML[1]:
        return f"head mask of {millilitres:.0f} mL is outside {HEAD_ML[0]:g}-{HEAD_ML[1]:g} mL"
    for channel, absent in enumerate(np.asarray(missing, dtype=bool)):
        if absent:
            continue
        values = np.asarray(image[channel], dtype=np.float32)[mask]
        if not np.isfinite(values).all():
            return f"sequence {channel} has NaN/inf values in the head mask"
        if float(values.max() - values.min()) == 0.0:
            return f"sequence {channel} is constant inside the head mask (no image)"
    return None
