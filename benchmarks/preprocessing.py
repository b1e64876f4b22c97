"""The raw-export steps at 1 mm on this machine: time per step and per patient, and their accuracy
on known answers (``datasets.raw_steps``).

    python -m benchmarks.preprocessing [--voxel 1.0]

- a synthetic head at `--voxel` mm (the MNI152 tissue maps: CSF, GM, WM, and a scalp shell) as
  T1c; T1, T2 and FLAIR are the same head moved by known rigid motions (up to 10 degrees and
  10 mm) onto 1 x 1 x 4 mm grids: registration time and mean displacement error over the brain;
- N4 on the T1c under a known multiplicative field: time and white-matter CV before / after;
- deepbet on the T1 with a scalp: time and Dice against the brain mask it was built from (no
  package ships a real head with a reference brain mask that installs offline; the TCGA scan of
  ``../shared/data`` has no brain mask), so this Dice is on a synthetic head;
- the real TCGA scan (0.78 x 0.78 x 6.5 mm) moved by a known motion: registration error.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks._machine import describe, write_result

ROOT = Path(__file__).resolve().parents[1]
TCGA = ROOT.parent / "shared" / "data" / "tcga-02-0003" / "t1c.nrrd"
MOTIONS = {"t1": ((6.0, -4.0, 3.0), (5.0, -4.0, 3.0)), "t2": ((0.0, 0.0, 10.0), (10.0, 0.0, 0.0)),
           "flair": ((-7.0, 5.0, 0.0), (0.0, -7.0, 6.0))}


def _image(array: np.ndarray, voxel: float):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)).astype(np.float32))
    image.SetSpacing((voxel,) * 3)
    return image


def main(argv=None) -> int:
    import SimpleITK as sitk

    from datasets.raw_steps import (bias_correct, brain_mask, head_mask, known_motion, mean_displacement, read_image,
                                    register)
    from datasets.synthetic import _template

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voxel", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preprocessing.md")
    args = parser.parse_args(argv)
    maps = _template(args.voxel)
    brain = maps["brain"] > 0.5
    shell = int(round(4 / args.voxel))
    scalp = ndimage.binary_dilation(brain, iterations=2 * shell) & ~ndimage.binary_dilation(brain, iterations=shell)
    rng = np.random.default_rng(0)
    tissue = 300 * maps["csf"] + 600 * maps["gm"] + 900 * maps["wm"]
    head = (tissue + 750 * scalp + 20 * ndimage.binary_dilation(brain, iterations=2 * shell)) * rng.normal(1, 0.02,
                                                                                                         brain.shape)
    fixed = _image(head, args.voxel)
    rows = [f"# Raw-export steps at {args.voxel:g} mm", "", describe(), "",
            f"Synthetic head: {list(brain.shape)} voxels of {args.voxel:g} mm (MNI152 tissue maps, scalp shell).", "",
            "| step | what | seconds | accuracy |", "|---|---|---|---|"]
    total = 0.0
    for sequence, (rotation, shift) in MOTIONS.items():
        moving, truth = known_motion(fixed, rotation, shift, (1.0, 1.0, 4.0))
        started = time.perf_counter()
        _, found, result = register(fixed, moving, "rigid")
        seconds = time.perf_counter() - started
        total += seconds
        rows.append(f"| register (rigid) | {sequence}: {max(map(abs, rotation)):g} deg, "
                    f"{np.linalg.norm(shift):.1f} mm onto 1 x 1 x 4 mm | {seconds:.1f} | mean displacement "
                    f"{mean_displacement(fixed, brain, found, truth, every=97):.2f} mm over the brain (flag: {result.flag or 'none'}) |")
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in brain.shape], indexing="ij")
    field = np.exp(0.35 * grids[0] - 0.25 * grids[1] + 0.3 * grids[2] ** 2)
    biased = _image(tissue * field * rng.normal(1, 0.02, brain.shape), args.voxel)
    mask = _image(brain.astype(np.float32), args.voxel)
    started = time.perf_counter()
    corrected = bias_correct(biased, sitk.Cast(mask, sitk.sitkUInt8))
    seconds = time.perf_counter() - started
    total += 4 * seconds

    def cv(image) -> float:
        values = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))[maps["wm"] > 0.9]
        return float(values.std() / values.mean())

    rows.append(f"| N4 bias field (inside the brain) | one sequence under a known field | {seconds:.1f} | "
                f"white-matter CV {cv(biased):.3f} -> {cv(corrected):.3f} (without field {cv(_image(tissue, args.voxel)):.3f}) |")
    started = time.perf_counter()
    try:
        found_mask = brain_mask(fixed)
        seconds = time.perf_counter() - started
        total += seconds
        found = np.transpose(sitk.GetArrayFromImage(found_mask), (2, 1, 0)) > 0
        dice = 2 * (found & brain).sum() / (found.sum() + brain.sum())
        rows.append(f"| brain mask (deepbet) | T1c of the synthetic head with scalp | {seconds:.1f} | "
                    f"Dice {dice:.3f} against the MNI152 brain mask it was built from |")
    except Exception as exc:
        rows.append(f"| brain mask (deepbet) | not run | | {type(exc).__name__}: {exc} |")
    rows.append(f"| per patient (4 sequences) | 3 registrations, 4 N4, 1 brain mask | {total:.0f} | |")
    if TCGA.exists():
        real = read_image(TCGA)
        moving, truth = known_motion(real, (0.0, 0.0, 8.0), (6.0, -5.0, 0.0), (1.0, 1.0, 6.5))
        started = time.perf_counter()
        _, found, result = register(real, moving, "rigid")
        seconds = time.perf_counter() - started
        head_points = np.transpose(sitk.GetArrayFromImage(head_mask(real)), (2, 1, 0)) > 0
        rows.append(f"| register (rigid), real scan | TCGA-02-0003 T1c (0.78 x 0.78 x 6.5 mm) moved 8 deg, 7.8 mm "
                    f"| {seconds:.1f} | mean displacement {mean_displacement(real, head_points, found, truth, every=97):.2f} mm over the head |")
    rows += ["", "SimpleITK runs single-threaded here (a worker process per patient: `--workers` and `--backend ray` "
             "spread patients over cores and nodes)."]
    write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
