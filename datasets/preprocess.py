"""Preprocessing of one patient's sequences into a fixed-shape, normalised, RAS-oriented volume.

The geometry is done with MONAI transforms (no hand-written resampling):

1. `LoadImage` reads each file (NIfTI, NRRD) with its affine, `datasets.dicom` each DICOM series;
   NRRD/DICOM LPS coordinates become RAS.
2. The sequence with the finest voxels is the reference: `Orientation("RAS")`, then a head
   (valid-voxel) mask thresholded on it gives the bounding box, and `SpatialCrop` crops to it.
3. `Spacing` resamples the crop once, straight to isotropic voxels of
   ``max(spacing, head extent / shape)`` mm: never finer than `spacing`, coarse enough that the
   head fits the output shape (a single interpolation: less blur and ~10x less work than
   resampling to 1 mm first and resizing after). `ResizeWithPadOrCrop` then pads to `shape`.
   Geometry is preserved; the output spacing is recorded per patient.
4. Every other sequence (and the tumour label, nearest-neighbour) is resampled onto that grid by
   physical coordinates with `ResampleToMatch`, so sequences whose affines differ line up.
5. Per sequence, intensities inside the mask are clipped to percentiles and z-scored; outside
   the mask they are 0.

Array axes of the result are RAS: x (left -> right), y (posterior -> anterior),
z (inferior -> superior).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from datasets.errors import ImageError
from datasets.laterality import doubtful, laterality_scores, mirrored
from datasets.plausibility import content_problem, geometry_problem

# MONAI's pydicom plugin prints a notice on import when nvImageCodec is absent.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

from monai.transforms import (  # noqa: E402
    LoadImage,
    Orientation,
    ResampleToMatch,
    ResizeWithPadOrCrop,
    Spacing,
    SpatialCrop,
)
from monai.transforms.utils import generate_spatial_bounding_box  # noqa: E402

from datasets.preprocessing_config import PreprocessConfig  # noqa: E402,F401 (re-exported)
from datasets.raw_steps import BRAIN_MASK_KEY  # noqa: E402
from datasets.sequences import LABEL_KEY  # noqa: E402


@dataclass
class PreprocessedPatient:
    """Result of preprocessing one patient.

    Attributes
    ----------
    image
        float16 [C, X, Y, Z], normalised; zeros for a missing sequence.
    mask
        uint8 [X, Y, Z], 1 inside the head (valid-voxel) mask.
    label
        uint8 [X, Y, Z] tumour label (0 where none was given).
    missing
        bool [C], True where the sequence was absent or unusable.
    affine
        4x4 RAS affine of the output grid (mm).
    has_label
        Whether a tumour label was given.
    info
        Shapes and spacings before and after, intensity statistics, problems noted.
    """

    image: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    missing: np.ndarray
    affine: np.ndarray
    has_label: bool
    info: dict = field(default_factory=dict)


_loader = LoadImage(image_only=True)


def declared_problem(path: Path) -> str | None:
    """A NIfTI file's geometry as its header declares it, checked before its voxels are
    decompressed (a small .nii.gz can declare gigabytes); None for other formats or a header
    nibabel cannot read (the reader then says why)."""
    import nibabel as nib

    if not path.is_file() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        header = nib.load(str(path)).header  # lazy: reads the header only
        shape = tuple(int(s) for s in header.get_data_shape())
        affine = header.get_best_affine()
    except Exception:
        return None
    if len(shape) < 3:
        return None
    extra = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    return geometry_problem(affine, (shape[0], shape[1], shape[2] * extra))


def _read_dicom(path: Path, patient_id: str, key: str):
    """A DICOM series (`datasets.dicom`) as a MetaTensor [X, Y, Z] with its RAS affine, its
    declared geometry checked before the pixels are read."""
    from monai.data import MetaTensor

    from datasets import dicom

    try:
        data, affine = dicom.read_volume(path, check=geometry_problem)  # headers read once, checked first
    except ImageError as exc:
        raise ImageError(f"patient {patient_id}: {key} series {path}: {exc}") from None
    except Exception as exc:  # pydicom raises many types for truncated or foreign files
        raise ImageError(f"patient {patient_id}: cannot read {key} series {path}: {type(exc).__name__}: {exc}") from exc
    import torch

    # As MONAI's readers make it: a volume without a channel axis says so ("no_channel"). Without that,
    # MONAI 1.6 takes the first axis of a 3D tensor for channels, counts 2 spatial axes, and SpatialCrop
    # then moves the origin along two axes only (a one-slice shift of the crop in 2 patients of 12).
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data)),
                      affine=torch.as_tensor(np.array(affine, dtype=np.float64)),
                      meta={"original_channel_dim": "no_channel", "spatial_shape": np.array(data.shape)})


def load_volume(path: Path, patient_id: str, key: str):
    """Read one file (or DICOM series) as a channel-first 3D MetaTensor [1, X, Y, Z], with clear errors."""
    from datasets import dicom

    problem = declared_problem(Path(path))
    if problem:
        raise ImageError(f"patient {patient_id}: {key} file {path}: {problem} (its header, read before the voxels)")
    if dicom.is_dicom_source(Path(path)):
        volume = _read_dicom(Path(path), patient_id, key)
    else:
        try:
            volume = _loader(str(path))
        except Exception as exc:  # readers raise many types for truncated or foreign files
            raise ImageError(f"patient {patient_id}: cannot read {key} file {path}: {type(exc).__name__}: {exc}") from exc
    shape = tuple(volume.shape)
    squeezed = [s for s in shape[3:] if s != 1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise ImageError(f"patient {patient_id}: {key} file {path} is 2D (shape {shape}); a 3D volume is needed")
    if squeezed:
        raise ImageError(
            f"patient {patient_id}: {key} file {path} is {len(shape)}D (shape {shape}); "
            "a single 3D volume is needed"
        )
    problem = geometry_problem(np.asarray(volume.affine), shape[:3])
    if problem:
        raise ImageError(f"patient {patient_id}: {key} file {path}: {problem}")
    volume = volume.reshape(shape[:3])[None].float()
    data = volume.numpy() if hasattr(volume, "numpy") else np.asarray(volume)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise ImageError(f"patient {patient_id}: {key} file {path} has {bad} NaN/inf voxels")
    return volume


def _misplaced(planes: list, sequences: list[str], reference_key: str, fraction: float) -> str | None:
    """A sequence whose head, on the output grid, barely overlaps the reference sequence's: its
    affine puts it elsewhere (shifted, or another scan's), which resampling would silently crop."""
    from datasets.plausibility import MIN_MASK_OVERLAP

    reference = _head_mask([planes[sequences.index(reference_key)]], fraction)
    for key, plane in zip(sequences, planes):
        if plane is None or key == reference_key:
            continue
        # All zero here, not in its file (empty files are set aside before): its head lies wholly
        # outside the reference's grid, a Dice of 0, not a missing sequence.
        own = _head_mask([plane], fraction)
        dice = 2.0 * float((own & reference).sum()) / max(1.0, float(own.sum() + reference.sum()))
        if dice < MIN_MASK_OVERLAP:
            return (f"the head of {key} overlaps that of {reference_key} by a Dice of {dice:.2f} on the common grid "
                    f"(at least {MIN_MASK_OVERLAP:g} expected): their affines disagree (a shifted or mirrored header, "
                    "or a scan of another session); fix the header or register the sequences (--register rigid)")
    return None


def _spacing_of(volume) -> list[float]:
    affine = np.asarray(volume.affine, dtype=float)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def _head_mask(channels: list[np.ndarray], fraction: float, fill_slices: bool = True) -> np.ndarray:
    """Largest connected region above `fraction` of the 99th percentile in any channel, holes filled."""
    mask = np.zeros(channels[0].shape, dtype=bool)
    for data in channels:
        positive = data[data > 0]
        if positive.size == 0:
            continue
        mask |= data > fraction * np.percentile(positive, 99)
    if not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    # Fill slice by slice as well: a head open at the field-of-view edge is not a closed hole.
    mask = ndimage.binary_fill_holes(mask)
    if not fill_slices:
        return mask
    for axis in range(3):
        mask = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)], axis=axis)
    return mask


def _normalise(data: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray, dict]:
    inside = data[mask]
    low, high = np.percentile(inside, percentiles)
    clipped = np.clip(data, low, high)
    mean, std = float(clipped[mask].mean()), float(clipped[mask].std())
    out = np.where(mask, (clipped - mean) / (std if std > 0 else 1.0), 0.0).astype(np.float32)
    stats = {"raw_mean": float(inside.mean()), "raw_std": float(inside.std()),
             "raw_p_low": float(low), "raw_p_high": float(high)}
    return out, stats


def preprocess_patient(files: Mapping[str, Path], patient_id: str, config: PreprocessConfig) -> PreprocessedPatient:
    """`preprocess_files`, after the raw-export steps (`datasets.raw_steps`) when `config` asks for them."""
    if not config.raw_steps:
        return preprocess_files(files, patient_id, config)

    from datasets.raw_steps import prepare_raw

    with tempfile.TemporaryDirectory(prefix="raw-steps-") as workdir:
        prepared, raw_info = prepare_raw(dict(files), patient_id, config, Path(workdir))
        patient = preprocess_files(prepared, patient_id, config)
    flags = [f"{sequence}: registration flagged: {r['flag']}" for sequence, r in raw_info.get("registration", {}).items()
             if r.get("flag")]
    patient.info["problems"] += flags
    patient.info["raw_steps"] = raw_info
    return patient


def _load_sequences(files: Mapping[str, Path], patient_id: str, config: PreprocessConfig):
    """(loaded volumes, their shapes and spacings before, problems noted); an all-zero sequence
    counts as missing."""
    problems: list[str] = []
    loaded = {}
    before = {}
    for key in (*config.sequences, LABEL_KEY):
        if key not in files:
            continue
        volume = load_volume(Path(files[key]), patient_id, key)
        before[key] = {"shape": list(volume.shape[1:]), "spacing": _spacing_of(volume)}
        if key != LABEL_KEY and float(volume.abs().max()) == 0.0:
            problems.append(f"{key}: file {files[key]} is empty (all zero); treated as missing")
            continue
        loaded[key] = volume
    if not any(k in loaded for k in config.sequences):
        raise ImageError(f"patient {patient_id}: none of the sequences {list(config.sequences)} is usable")
    problems += [f"{key}: missing; zero-filled and flagged" for key in config.sequences if key not in files]
    return loaded, before, problems


def _common_grid(loaded: dict, files: Mapping[str, Path], patient_id: str, config: PreprocessConfig):
    """(every loaded volume on the output grid, the reference sequence, the head's extent in mm,
    the output spacing in mm):
    the finest sequence, reoriented to RAS, cropped to its head and resampled once."""
    available = [k for k in config.sequences if k in loaded]
    reference_key = min(available, key=lambda k: float(np.prod(_spacing_of(loaded[k]))))
    reference = Orientation(axcodes="RAS", labels=None)(loaded[reference_key])
    native = reference[0].numpy()
    stride = tuple(2 if s > 128 else 1 for s in native.shape)  # the crop needs only the head's extent
    coarse = _head_mask([native[::stride[0], ::stride[1], ::stride[2]]], config.mask_fraction, fill_slices=False)
    if not coarse.any():
        raise ImageError(f"patient {patient_id}: no head foreground found in {reference_key} file {files[reference_key]}")
    crop_mask = np.zeros(native.shape, dtype=np.float32)
    crop_mask[::stride[0], ::stride[1], ::stride[2]] = coarse
    box_start, box_end = generate_spatial_bounding_box(crop_mask[None], margin=[m * config.margin for m in stride])
    cropped = SpatialCrop(roi_start=box_start, roi_end=box_end)(reference)
    extent_mm = np.array(cropped.shape[1:]) * np.array(_spacing_of(cropped))
    # One interpolation straight to the output grid: isotropic, never finer than `spacing`, and
    # coarse enough that the head fits the output shape.
    out_spacing = float(max(config.spacing, *(extent_mm / np.array(config.shape))))
    grid = {reference_key: Spacing(pixdim=out_spacing, mode="bilinear")(cropped)}
    grid[reference_key] = ResizeWithPadOrCrop(spatial_size=config.shape, method="symmetric")(grid[reference_key])
    resample = ResampleToMatch(mode="bilinear", padding_mode="zeros")
    resample_label = ResampleToMatch(mode="nearest", padding_mode="zeros")
    for key in loaded:
        if key != reference_key:
            grid[key] = (resample_label if key == LABEL_KEY else resample)(loaded[key], img_dst=grid[reference_key])
    return grid, reference_key, extent_mm, out_spacing


def _output_mask(reference, planes: dict, files: Mapping[str, Path], patient_id: str,
                 config: PreprocessConfig) -> np.ndarray:
    """The brain mask where one was given (the brain, not the head, is then normalised and stored),
    else the head's; `reference` is the output grid's reference volume."""
    if BRAIN_MASK_KEY in files:
        brain = load_volume(Path(files[BRAIN_MASK_KEY]), patient_id, "brain mask")
        mask = ResampleToMatch(mode="nearest", padding_mode="zeros")(brain, img_dst=reference)[0].numpy() > 0.5
        if not mask.any():
            raise ImageError(f"patient {patient_id}: the brain mask is empty")
    else:
        mask = _head_mask(list(planes.values()), config.mask_fraction)
    if not mask.any():
        raise ImageError(f"patient {patient_id}: no head foreground left after resampling")
    return mask


def preprocess_files(files: Mapping[str, Path], patient_id: str, config: PreprocessConfig) -> PreprocessedPatient:
    """Load, align, crop, resize and normalise one patient's sequences.

    Parameters
    ----------
    files
        sequence key -> file (or DICOM folder); keys outside `config.sequences` other than
        the tumour label are ignored. Absent sequences are zero-filled and flagged.
    patient_id
        Used in error messages.

    Raises
    ------
    ImageError
        A file is unreadable, not 3D, has NaN/inf voxels, no sequence has any signal, or the
        sequences disagree in where the head is or in left and right.
    """
    loaded, before, problems = _load_sequences(files, patient_id, config)
    grid, reference_key, extent_mm, out_spacing = _common_grid(loaded, files, patient_id, config)
    planes = {k: grid[k][0].numpy() for k in config.sequences if k in grid}
    misplaced = _misplaced([planes.get(k) for k in config.sequences], list(config.sequences), reference_key,
                           config.mask_fraction)
    if misplaced:
        raise ImageError(f"patient {patient_id}: {misplaced}")
    out_mask = _output_mask(grid[reference_key], planes, files, patient_id, config)
    laterality = laterality_scores(planes, out_mask)
    disagreement = mirrored(laterality)
    if disagreement:
        raise ImageError(f"patient {patient_id}: {disagreement}")
    problems += doubtful(laterality)
    out = np.zeros((len(config.sequences), *config.shape), dtype=np.float32)
    stats = {}
    for i, key in enumerate(config.sequences):
        if key in planes:
            out[i], stats[key] = _normalise(planes[key], out_mask, config.clip_percentiles)
    missing = np.array([k not in planes for k in config.sequences], dtype=bool)
    problem = content_problem(out, out_mask, missing, out_spacing)
    if problem:
        raise ImageError(f"patient {patient_id}: after preprocessing, {problem}")
    info = {
        "reference_sequence": reference_key,
        "before": before,
        "after": {"shape": list(config.shape), "spacing": _spacing_of(grid[reference_key]),
                  "head_extent_mm": [round(float(e), 1) for e in extent_mm]},
        "intensity": stats,
        "mask_voxels": int(out_mask.sum()),
        "laterality": laterality,
        "problems": problems,
    }
    return PreprocessedPatient(
        image=out.astype(np.float16),
        mask=out_mask.astype(np.uint8),
        label=(grid[LABEL_KEY][0].numpy() > 0.5).astype(np.uint8) if LABEL_KEY in grid else np.zeros(config.shape, np.uint8),
        missing=missing,
        affine=np.asarray(grid[reference_key].affine, dtype=float),
        has_label=LABEL_KEY in grid,
        info=info,
    )
