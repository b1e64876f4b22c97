"""Steps for raw clinical exports, before the common preprocessing (`datasets.preprocess`):
co-registration of every sequence to a reference sequence, N4 bias-field correction, and brain
extraction (``python -m datasets.convert --preset raw``).

Library: SimpleITK (ITK's registration framework and N4, from a 60 MB wheel with no other
dependency). ANTsPy does the same with ANTs' SyN machinery, but its wheel is several times
larger and its rigid registration was not faster on 2 cores; SimpleITK's multi-resolution
Mattes mutual information with a versor (rigid) or affine transform is the standard recipe
for aligning sequences of one examination.

- **Registration** (`register`): each sequence onto the reference (T1c by default, else the
  first sequence present), initialised by aligning the images' centres of mass, then
  multi-resolution (shrink 4, 2, 1; smoothing 2, 1, 0 mm) Mattes mutual information (32 bins,
  a seeded 20% voxel sample) with a regular-step gradient descent; rigid (versor, 6 parameters)
  or rigid then affine (12). The result is resampled (linear) onto the reference grid. A
  registration whose rotation exceeds `MAX_ROTATION_DEG`, whose shift exceeds
  `MAX_SHIFT_MM` or whose final metric is weaker than `MIN_METRIC` (MI of a misaligned pair is
  near 0) is flagged in the QC report: sequences of one examination move little.
- **Bias field** (`bias_correct`): N4 (Tustison et al. 2010) on a 4x shrunken copy, the log
  field then evaluated at full resolution and divided out; inside the brain mask when
  ``--brain-mask`` made one (and the sequences share its grid), else inside the Otsu head mask
  (strictly positive voxels only: N4 fits log intensities). On the synthetic head of
  ``tests/test_raw_steps.py`` N4 inside the brain took the white matter's coefficient of
  variation under a known field from 0.12 to 0.03, while inside a head mask that included a
  bright scalp shell it corrected nothing: so brain extraction runs first.
- **Brain extraction** (`brain_mask`): deepbet (Fisch et al. 2024, MIT licence, weights in its
  wheel; ``pip install -e ".[raw]"``) on the T1 if present, else the reference; it expects a
  T1-weighted head and runs on the CPU in seconds. Normalisation and the stored mask then use
  the brain instead of the head.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.errors import ImageError, InputError

MAX_ROTATION_DEG = 15.0
MAX_SHIFT_MM = 30.0
MIN_METRIC = -0.05  # Mattes MI is reported negated: more negative is better aligned
REGISTRATIONS = ("none", "rigid", "affine")
BRAIN_MASK_KEY = "brainmask"


def _sitk():
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # a worker process per patient already
    return sitk


def read_image(path: Path):
    """A file or a DICOM series folder as a float32 SimpleITK image (physical space, LPS)."""
    from datasets import dicom

    sitk = _sitk()
    path = Path(path)
    if dicom.is_dicom_source(path):  # one reader of DICOM series for every step (its affine is RAS)
        data, affine = dicom.read_volume(path)
        lps = dicom.LPS_TO_RAS @ affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
        image.SetSpacing([float(v) for v in spacing])
        image.SetOrigin([float(v) for v in lps[:3, 3]])
        image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    else:
        image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise ImageError(f"{path}: a 3D scalar volume is needed for registration")
    return sitk.Cast(image, sitk.sitkFloat32)


@dataclass
class RegistrationResult:
    kind: str
    rotation_deg: float
    shift_mm: float
    metric: float
    parameters: list[float]
    seconds: float
    flag: str | None = None

    def info(self) -> dict:
        return {"kind": self.kind, "rotation_deg": round(self.rotation_deg, 2), "shift_mm": round(self.shift_mm, 2),
                "metric": round(self.metric, 4), "parameters": [round(p, 5) for p in self.parameters],
                "seconds": round(self.seconds, 2), "flag": self.flag}


def _rotation_angle(matrix: np.ndarray) -> float:
    """The rotation angle [degrees] of the rotation nearest to a 3 x 3 matrix."""
    u, _, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    return float(np.degrees(math.acos(max(-1.0, min(1.0, (np.trace(rotation) - 1) / 2)))))


def register(fixed, moving, kind: str = "rigid", seed: int = 0):
    """Align `moving` to `fixed` (SimpleITK images); returns (moving resampled on fixed's grid,
    the transform mapping fixed's physical points into moving, RegistrationResult)."""
    sitk = _sitk()
    started = time.perf_counter()
    transform = sitk.CenteredTransformInitializer(fixed, moving, sitk.VersorRigid3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
    stages = [transform] if kind == "rigid" else [transform, None]
    method = None
    for stage, initial in enumerate(stages):
        if initial is None:  # the affine stage starts from the rigid result
            affine = sitk.AffineTransform(3)
            affine.SetMatrix(transform.GetMatrix())
            affine.SetTranslation(transform.GetTranslation())
            affine.SetCenter(transform.GetCenter())
            initial = affine
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.2, seed)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=200,
                                                        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([4, 2, 1])
        method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(initial, inPlace=False)
        transform = method.Execute(fixed, moving)
        if hasattr(transform, "GetNthTransform"):
            transform = transform.GetNthTransform(0) if transform.GetNumberOfTransforms() == 1 else transform
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    matrix = np.array(transform.GetMatrix()).reshape(3, 3) if hasattr(transform, "GetMatrix") else np.eye(3)
    shift = float(np.linalg.norm(transform.GetTranslation())) if hasattr(transform, "GetTranslation") else 0.0
    result = RegistrationResult(kind, _rotation_angle(matrix), shift, float(method.GetMetricValue()),
                                list(transform.GetParameters()), time.perf_counter() - started)
    if result.rotation_deg > MAX_ROTATION_DEG:
        result.flag = f"rotation {result.rotation_deg:.1f} degrees > {MAX_ROTATION_DEG:g}"
    elif result.shift_mm > MAX_SHIFT_MM:
        result.flag = f"shift {result.shift_mm:.1f} mm > {MAX_SHIFT_MM:g}"
    elif result.metric > MIN_METRIC:
        result.flag = f"final mutual information {result.metric:.3f} is weak (> {MIN_METRIC:g})"
    return resampled, transform, result


def head_mask(image) -> np.ndarray:
    """Otsu foreground of an image, holes filled (a SimpleITK image, 0/1)."""
    sitk = _sitk()
    mask = sitk.OtsuThreshold(image, 0, 1, 128)
    mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
    return sitk.BinaryFillhole(mask)


def bias_correct(image, mask=None, shrink: int = 4, iterations: tuple[int, ...] = (50, 50, 30, 20)):
    """N4 bias-field correction inside `mask` (Otsu head mask if None); returns the corrected image."""
    sitk = _sitk()
    mask = head_mask(image) if mask is None else mask
    # N4 works on log intensities: a zero inside the mask (air between scalp and brain, filled
    # into the head mask) would be log(0) and stop the fit at once.
    mask = sitk.And(sitk.Cast(mask > 0, sitk.sitkUInt8), sitk.Cast(image > 0, sitk.sitkUInt8))
    small = sitk.Shrink(image, [shrink] * 3)
    small_mask = sitk.Shrink(mask, [shrink] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.SetConvergenceThreshold(1e-6)
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_field), sitk.sitkFloat32)


def brain_mask(image):
    """deepbet's brain mask of a T1-weighted head (a SimpleITK image, 0/1 on the image's grid)."""
    if importlib.util.find_spec("deepbet") is None:
        raise InputError("--brain-mask needs deepbet (MIT licence, weights in its wheel): "
                         "pip install -e \".[raw]\", or convert without --brain-mask")
    sitk = _sitk()
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "t1.nii.gz", Path(tmp) / "mask.nii.gz"
        sitk.WriteImage(image, str(source))
        _bet().run(str(source), mask_path=str(target))
        mask = sitk.ReadImage(str(target))
    return sitk.Cast(mask > 0, sitk.sitkUInt8)


_BET = None


def _bet():
    """deepbet's networks, loaded once per process."""
    global _BET
    if _BET is None:
        from deepbet.bet import BrainExtraction

        _BET = BrainExtraction(no_gpu=True)
    return _BET


def known_motion(image, rotation_deg, shift_mm, spacing):
    """`image` moved by a known rigid motion (Euler angles [deg] about its centre, shift [mm]) onto
    another grid (voxel size and slice thickness `spacing`): the known answer of the registration
    tests and benchmark. Returns the moved image and the transform registration should find."""
    sitk = _sitk()
    truth = sitk.Euler3DTransform()
    truth.SetCenter(image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()]))
    truth.SetRotation(*np.radians(rotation_deg))
    truth.SetTranslation(shift_mm)
    size = [max(8, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(image, grid, truth.GetInverse(), sitk.sitkLinear, 0.0), truth


def mean_displacement(image, mask: np.ndarray, found, truth, every: int = 37) -> float:
    """Mean distance [mm] between where two transforms send the points of `mask` (x, y, z voxels
    of `image`), over every `every`-th point."""
    points = np.argwhere(mask)[::every]
    physical = [image.TransformIndexToPhysicalPoint(tuple(int(v) for v in p)) for p in points]
    return float(np.mean([np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
                          for p in physical]))


def checkerboard(fixed: np.ndarray, moving: np.ndarray, squares: int = 8) -> np.ndarray:
    """A 2D checkerboard of two planes scaled to [0, 1] each: misalignment shows at the squares' edges."""
    def scale(plane):
        low, high = np.percentile(plane, (1, 99))
        return np.clip((plane - low) / max(high - low, 1e-6), 0, 1)

    a, b = scale(fixed), scale(moving)
    rows, cols = np.indices(a.shape)
    board = ((rows * squares // a.shape[0]) + (cols * squares // a.shape[1])) % 2 == 0
    return np.where(board, a, b)


def _same_grid(a, b) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def prepare_raw(files: dict, patient_id: str, config, workdir: Path) -> tuple[dict, dict]:
    """Register, bias-correct and brain-mask a patient's sequences as `config` says; returns the
    files to preprocess (written in `workdir`, on the reference sequence's grid) and the record
    of what was done (per-step seconds, each registration's parameters and flag)."""
    sitk = _sitk()
    sequences = [s for s in config.sequences if s in files]
    if not sequences:
        return files, {}
    reference = config.reference_sequence if config.reference_sequence in sequences else sequences[0]
    seconds: dict[str, float] = {}
    info: dict = {"reference": reference, "registration": {}, "seconds": seconds}
    try:
        images = {s: read_image(files[s]) for s in sequences}
    except RuntimeError as exc:
        raise ImageError(f"patient {patient_id}: SimpleITK cannot read a sequence ({str(exc).splitlines()[0]})") from exc
    # An all-zero sequence is treated as missing by the common preprocessing: nothing to align or correct.
    empty = {s for s, image in images.items() if _sitk().GetArrayViewFromImage(image).max() <= 0}
    sequences = [s for s in sequences if s not in empty]
    if not sequences:
        return files, {}
    if reference in empty:
        reference = sequences[0]
        info["reference"] = reference
    fixed = images[reference]
    out = dict(files)
    if config.register != "none":
        started = time.perf_counter()
        for sequence in sequences:
            if sequence == reference:
                continue
            try:
                images[sequence], _, result = register(fixed, images[sequence], config.register)
            except RuntimeError as exc:
                raise ImageError(f"patient {patient_id}: registering {sequence} to {reference} failed "
                                 f"({str(exc).splitlines()[0][:200]})") from exc
            info["registration"][sequence] = result.info()
        seconds["register"] = time.perf_counter() - started
    brain = None
    if config.brain_mask:
        started = time.perf_counter()
        source = "t1" if "t1" in images else reference
        brain = brain_mask(images[source])
        out[BRAIN_MASK_KEY] = workdir / f"{BRAIN_MASK_KEY}.nii.gz"
        sitk.WriteImage(brain, str(out[BRAIN_MASK_KEY]))
        info["brain_mask_from"] = source
        seconds["brain_mask"] = time.perf_counter() - started
    if config.bias_correct:
        started = time.perf_counter()
        # Inside the brain when there is one: see the module docstring.
        mask = brain if brain is not None and _same_grid(brain, fixed) and config.register != "none" else None
        for sequence in sequences:
            images[sequence] = bias_correct(images[sequence], mask)
        seconds["bias_correct"] = time.perf_counter() - started
    for sequence in sequences:
        out[sequence] = workdir / f"{sequence}.nii.gz"
        sitk.WriteImage(images[sequence], str(out[sequence]))
    return out, info
