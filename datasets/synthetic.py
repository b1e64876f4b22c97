"""Synthetic glioma cohorts with a known answer: ``python -m datasets.synthetic``.

Writes a site export that looks like a real one (``OUT/images/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz``
and ``OUT/clinical.csv``), so the converter and everything after it run on it unchanged, plus
``OUT/truth.csv`` with the true linear predictors (kept out of the clinical table).

Anatomy: the MNI152 2009 template with its grey/white-matter maps and brain mask (shipped inside
nilearn, no download), randomly scaled and shifted per patient. Sequences are mixtures of tissue
classes with plausible relative contrasts (T1: WM > GM > CSF; T1c: T1 plus an enhancing tumour
rim; T2: CSF bright; FLAIR: CSF dark, oedema bright), a smooth multiplicative bias field and
Rician noise. Tumours are irregular ellipsoids in white matter with necrotic core, enhancing rim
and oedema, whose size and necrosis depend on the grade.

Survival model (proportional hazards, Weibull baseline, times in days)::

    lp_clinical = 0.035 (age - 55) + 0.4 [grade 3] + 0.9 [grade 4] - 0.7 idh_mutant - 0.45 mgmt_methylated
    lp_imaging  = imaging_effect * (0.8 z(log tumour volume) + 0.5 z(necrosis fraction))
    T = lambda * (-log U / exp(lp_clinical + lp_imaging)) ** (1 / k),   k = 1.2, lambda = 900 days

where z() standardises with fixed population constants, so the imaging part carries information
beyond the clinical variables. Follow-up ends at a uniform random time between 1 and 6 years
(about 35 % censored; 1 to 2 years and about 30 % for the second site). ``--imaging-effect 0`` gives images with no extra prognostic
information; ``--site-shift`` gives a second site with other intensity scaling, 5 mm slices for
T2/FLAIR, LPS-ordered voxels and an older, more often glioblastoma case mix.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from datasets.errors import InputError

WEIBULL_SHAPE = 1.2
WEIBULL_SCALE_DAYS = 900.0
# Fixed standardisation constants of the imaging features (population values of this generator).
LOG_VOLUME_MEAN, LOG_VOLUME_SD = np.log(30.0), 0.8
NECROSIS_MEAN, NECROSIS_SD = 0.2, 0.15

# Tissue -> intensity per sequence (arbitrary units before site scaling).
CONTRASTS = {
    "t1": {"wm": 1.0, "gm": 0.65, "csf": 0.25, "solid": 0.55, "necrosis": 0.3, "oedema": 0.75, "rim": 0.6},
    "t1ce": {"wm": 1.0, "gm": 0.65, "csf": 0.25, "solid": 0.7, "necrosis": 0.3, "oedema": 0.75, "rim": 1.6},
    "t2": {"wm": 0.45, "gm": 0.65, "csf": 1.2, "solid": 0.9, "necrosis": 1.3, "oedema": 1.0, "rim": 0.85},
    "flair": {"wm": 0.5, "gm": 0.65, "csf": 0.15, "solid": 0.95, "necrosis": 0.5, "oedema": 1.1, "rim": 0.9},
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of a synthetic cohort.

    Attributes
    ----------
    n
        Number of patients.
    voxel_size
        Voxel size (mm) of the written images.
    imaging_effect
        Multiplier of the imaging part of the hazard (0: images carry no extra information).
    site_shift
        Write a second site (intensity scaling, thick T2/FLAIR slices, LPS voxel order, case mix).
    misaligned
        Move the T1, T2 and FLAIR of every patient by a random rigid motion (up to 8 degrees and
        8 mm, as patients move between sequences) that their affines do not record, as a raw
        scanner export is: ``datasets.convert --register`` must undo it. The motions are in
        ``truth.csv``.
    seed
        Random seed; the same seed gives the same cohort.
    prefix
        Patient id prefix.
    """

    n: int = 200
    voxel_size: float = 3.0
    imaging_effect: float = 1.0
    site_shift: bool = False
    seed: int = 0
    prefix: str = "SYN"
    misaligned: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise InputError(f"--n must be at least 1, got {self.n}")
        if not 1.0 <= self.voxel_size <= 8.0:
            raise InputError(f"--voxel-size must be between 1 and 8 mm, got {self.voxel_size}")
        if self.imaging_effect < 0:
            raise InputError(f"--imaging-effect must be >= 0, got {self.imaging_effect}")


@lru_cache(maxsize=4)
def _template(voxel_size: float) -> dict[str, np.ndarray]:
    """MNI152 tissue maps resampled to `voxel_size` mm, plus their affine."""
    from nilearn import datasets as nilearn_datasets

    brain = nilearn_datasets.load_mni152_brain_mask(resolution=2)
    maps = {
        "brain": brain.get_fdata(),
        "gm": nilearn_datasets.load_mni152_gm_template(resolution=2).get_fdata(),
        "wm": nilearn_datasets.load_mni152_wm_template(resolution=2).get_fdata(),
    }
    zoom = 2.0 / voxel_size
    out = {k: np.clip(ndimage.zoom(v, zoom, order=1), 0, 1).astype(np.float32) for k, v in maps.items()}
    # Pad so that scaled or shifted heads stay inside the field of view.
    pad = int(np.ceil(12 / voxel_size))
    out = {k: np.pad(v, pad) for k, v in out.items()}
    out["csf"] = np.clip(out["brain"] - out["gm"] - out["wm"], 0, 1)
    affine = brain.affine.copy()
    affine[:3, :3] = np.diag([voxel_size] * 3)
    affine[:3, 3] -= pad * voxel_size
    out["affine"] = affine
    return out


def clinical_variables(rng: np.random.Generator, site_shift: bool) -> dict:
    """Age, sex, grade, IDH, MGMT, pathology with realistic dependencies."""
    age = float(np.clip(rng.normal(60 if site_shift else 52, 14), 20, 88))
    p_grade4 = 1 / (1 + np.exp(-(age - (45 if site_shift else 50)) / 8))
    grade = 4 if rng.random() < p_grade4 else int(rng.choice([2, 3]))
    idh = int(rng.random() < (0.1 if grade == 4 else 0.75 if age < 50 else 0.5))
    glioblastoma = int(grade == 4 and idh == 0)
    if glioblastoma:
        pathology = "glioblastoma"
    elif idh and grade < 4 and rng.random() < 0.5:
        pathology = "oligodendroglioma"
    else:
        pathology = "astrocytoma"
    mgmt = int(rng.random() < (0.4 if glioblastoma else 0.75))
    sex = "M" if rng.random() < 0.58 else "F"
    return {"age": round(age, 1), "sex": sex, "grade": grade, "idh": idh, "mgmt": mgmt,
            "pathology": pathology, "glioblastoma": glioblastoma}


def tumour_features(rng: np.random.Generator, grade: int) -> dict:
    """Tumour volume (ml), necrosis fraction and enhancement, depending on the grade."""
    log_volume = rng.normal(LOG_VOLUME_MEAN + 0.3 * (grade - 3), LOG_VOLUME_SD)
    volume = float(np.clip(np.exp(log_volume), 2.0, 150.0))
    necrosis = float(np.clip(rng.normal(0.3 if grade == 4 else 0.08, 0.12), 0.0, 0.6))
    enhancing = bool(grade == 4 or rng.random() < 0.3)
    return {"tumour_volume_ml": volume, "necrosis_fraction": necrosis, "enhancing": enhancing}


def linear_predictors(clinical: dict, tumour: dict, imaging_effect: float) -> tuple[float, float]:
    lp_clinical = (0.035 * (clinical["age"] - 55) + 0.4 * (clinical["grade"] == 3) + 0.9 * (clinical["grade"] == 4)
                   - 0.7 * clinical["idh"] - 0.45 * clinical["mgmt"])
    z_volume = (np.log(tumour["tumour_volume_ml"]) - LOG_VOLUME_MEAN) / LOG_VOLUME_SD
    z_necrosis = (tumour["necrosis_fraction"] - NECROSIS_MEAN) / NECROSIS_SD
    lp_imaging = imaging_effect * (0.8 * z_volume + 0.5 * z_necrosis)
    return float(lp_clinical), float(lp_imaging)


def survival(rng: np.random.Generator, lp: float, follow_up_years: float = 6.0) -> tuple[float, int]:
    """Weibull proportional-hazards time with follow-up ending uniformly in [1, follow_up_years] years (days)."""
    u = rng.random()
    event_time = WEIBULL_SCALE_DAYS * (-np.log(u) / np.exp(lp)) ** (1 / WEIBULL_SHAPE)
    follow_up = rng.uniform(365, follow_up_years * 365)
    time = max(1.0, min(event_time, follow_up))
    return float(round(time, 1)), int(event_time <= follow_up)


def _smooth_blob(shape, centre, radii, rng, roughness: float = 0.25) -> np.ndarray:
    """Irregular ellipsoid indicator (float in [0, 1]) with soft edges."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(radii) / 2)
    noise /= noise.std() + 1e-8
    return np.clip(1.5 - 1.5 * np.sqrt(dist) * (1 + roughness * noise * 0.5), 0, 1)


def _bias_field(shape, rng, strength: float = 0.2) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    field = sum(rng.normal(0, 1) * g for g in grids) + sum(rng.normal(0, 0.5) * g * g for g in grids)
    return np.exp(strength * field / 3).astype(np.float32)


def synthesise_patient(index: int, config: SyntheticConfig) -> dict:
    """Images, tumour label and clinical/truth rows of one patient (deterministic in seed, index)."""
    rng = np.random.default_rng([config.seed, index, int(config.site_shift)])
    template = _template(config.voxel_size)
    clinical = clinical_variables(rng, config.site_shift)
    tumour = tumour_features(rng, clinical["grade"])

    # Per-patient head size and position: an affine warp of the template maps.
    scale = rng.uniform(0.92, 1.08, size=3)
    shape = template["brain"].shape
    centre = (np.array(shape) - 1) / 2
    offset = centre - scale * centre + rng.normal(0, 1.5 / config.voxel_size * 2, size=3)
    tissues = {k: ndimage.affine_transform(template[k], scale, offset=offset, order=1)
               for k in ("brain", "gm", "wm", "csf")}

    # Tumour: a white-matter location, radius from the volume (ml = 1000 mm^3).
    radius_mm = (3 * tumour["tumour_volume_ml"] * 1000 / (4 * np.pi)) ** (1 / 3)
    radius = radius_mm / config.voxel_size
    candidates = np.argwhere(ndimage.binary_erosion(tissues["wm"] > 0.5, iterations=max(1, int(radius * 0.6))))
    if len(candidates) == 0:
        candidates = np.argwhere(tissues["wm"] > 0.5)
    where = candidates[rng.integers(len(candidates))]
    radii = radius * rng.uniform(0.8, 1.25, size=3)
    whole = _smooth_blob(shape, where, radii, rng) * (tissues["brain"] > 0.3)
    core = _smooth_blob(shape, where, radii * np.sqrt(max(tumour["necrosis_fraction"], 1e-3)), rng, 0.1) * whole
    oedema = _smooth_blob(shape, where, radii * rng.uniform(1.5, 2.1), rng, 0.4) * tissues["brain"] * (1 - whole)
    rim = np.clip(whole - core, 0, 1) * (ndimage.binary_dilation(core > 0.5, iterations=2) | (whole < 0.9))
    rim = rim if tumour["enhancing"] else rim * 0.0
    solid = np.clip(whole - core - rim, 0, 1)

    images = {}
    site_gain = {"t1": 1.0, "t1ce": 1.0, "t2": 1.0, "flair": 1.0}
    if config.site_shift:
        site_gain = {k: float(rng.uniform(0.5, 1.8)) for k in site_gain}
    normal = np.clip(1 - whole - oedema, 0, 1)
    for sequence, c in CONTRASTS.items():
        signal = normal * (c["wm"] * tissues["wm"] + c["gm"] * tissues["gm"] + c["csf"] * tissues["csf"])
        signal += c["solid"] * solid + c["necrosis"] * core + c["rim"] * rim + c["oedema"] * oedema
        signal = signal * _bias_field(shape, rng)
        sigma = 0.03
        noisy = np.sqrt((signal + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
        images[sequence] = (noisy * 1000 * site_gain[sequence]).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[oedema > 0.5] = 2
    seg[solid > 0.5] = 2
    seg[rim > 0.5] = 3
    seg[core > 0.5] = 1

    lp_clinical, lp_imaging = linear_predictors(clinical, tumour, config.imaging_effect)
    time, event = survival(rng, lp_clinical + lp_imaging, 2.0 if config.site_shift else 6.0)
    pid = f"{config.prefix}-{index + 1:04d}"
    truth = {"patient_id": pid, "lp_clinical": lp_clinical, "lp_imaging": lp_imaging,
             "lp": lp_clinical + lp_imaging, **tumour,
             "tumour_centre_voxel": "x".join(str(int(v)) for v in where)}
    row = {"patient_id": pid, "survival_days": time, "death": event, **clinical,
           "patient_name": f"Synthetic^Patient{index + 1:04d}"}
    return {"id": pid, "images": images, "seg": seg, "affine": template["affine"], "clinical": row, "truth": truth}


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def _thick_slices(data: np.ndarray, affine: np.ndarray, thickness: float, voxel: float):
    """Resample along z to `thickness` mm slices (a site with thick T2/FLAIR)."""
    factor = voxel / thickness
    thick = ndimage.zoom(data, (1, 1, factor), order=1)
    new_affine = affine.copy()
    new_affine[:3, 2] = affine[:3, 2] / factor
    return thick, new_affine


def _to_lps_order(data: np.ndarray, affine: np.ndarray):
    """Same physical image with voxels stored right-to-left and anterior-to-posterior."""
    flipped = data[::-1, ::-1, :]
    shape = np.array(data.shape)
    new_affine = affine.copy()
    new_affine[:3, 0] = -affine[:3, 0]
    new_affine[:3, 1] = -affine[:3, 1]
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, 0] * (shape[0] - 1) + affine[:3, 1] * (shape[1] - 1)
    return np.ascontiguousarray(flipped), new_affine


def rigid_motion(data: np.ndarray, voxel: float, rng: np.random.Generator, max_deg: float = 8.0,
                 max_mm: float = 8.0) -> tuple[np.ndarray, float, float]:
    """The volume moved by a random rigid motion about its centre (rotation about a random axis
    up to `max_deg`, shift up to `max_mm`); returns it with the rotation [deg] and shift [mm]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.5, 1.0) * max_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    shift = rng.normal(size=3)
    shift *= rng.uniform(0.5, 1.0) * max_mm / np.linalg.norm(shift)
    centre = (np.array(data.shape) - 1) / 2
    moved = ndimage.affine_transform(data, rotation, offset=centre - rotation @ centre + shift / voxel, order=1)
    return moved, float(np.degrees(angle)), float(np.linalg.norm(shift))


def write_patient(index: int, config: SyntheticConfig, images_dir: str) -> tuple[dict, dict]:
    patient = synthesise_patient(index, config)
    folder = Path(images_dir) / patient["id"]
    folder.mkdir(parents=True, exist_ok=True)
    motion_rng = np.random.default_rng([config.seed, index, 7])
    for name, data in [*patient["images"].items(), ("seg", patient["seg"])]:
        affine = patient["affine"]
        if config.misaligned and name in ("t1", "t2", "flair"):
            data, degrees, millimetres = rigid_motion(data, config.voxel_size, motion_rng)
            patient["truth"].update({f"motion_{name}_deg": degrees, f"motion_{name}_mm": millimetres})
        if config.site_shift:
            data, affine = _to_lps_order(data, affine)
            if name in ("t2", "flair"):
                data, affine = _thick_slices(data, affine, 5.0, config.voxel_size)
        dtype = np.uint8 if name == "seg" else np.int16
        _save(folder / f"{patient['id']}_{name}.nii.gz", np.clip(data, 0, 32767), affine, dtype)
    return patient["clinical"], patient["truth"]


def generate(out: str | Path, config: SyntheticConfig, workers: int = 1, progress: bool = False) -> Path:
    """Write the site export under `out` (a progress bar with `progress`); returns the clinical CSV path."""
    from tqdm import tqdm

    out = Path(out).expanduser().absolute()
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    indices = range(config.n)
    bar = dict(total=config.n, desc="synthesising", unit="patient", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(tqdm(pool.map(write_patient, indices, [config] * config.n, [str(images_dir)] * config.n),
                             **bar))
    else:
        rows = [write_patient(i, config, str(images_dir)) for i in tqdm(indices, **bar)]
    clinical = pd.DataFrame([r[0] for r in rows])
    truth = pd.DataFrame([r[1] for r in rows])
    clinical.to_csv(out / "clinical.csv", index=False)
    truth.to_csv(out / "truth.csv", index=False)
    return out / "clinical.csv"


def build_store(root: str | Path, config: SyntheticConfig, preprocess, name: str = "cohort.zarr",
                workers: int = 1) -> Path:
    """Generate the site export under `root/export` and convert it with the real converter to the
    store `root/name` (`preprocess`: a `PreprocessConfig`); returns the store path. The export's
    `truth.csv` stays beside it for known-answer checks."""
    from datasets.convert import convert  # the converter does not need the generator: import on use

    export = generate(Path(root) / "export", config, workers=workers).parent
    out = Path(root).expanduser().absolute() / name
    convert(export / "images", export / "clinical.csv", out, preprocess, workers=workers, progress=False)
    return out


def find_truth(store) -> pd.DataFrame | None:
    """The true linear predictors of a store converted from a synthetic export, or None.

    The export's ``truth.csv`` is found beside the images its manifest lists as sources
    (``EXPORT/images/<id>/<file>``). None for any other store, and for a pseudonymised one (its
    ids are not the export's). Index: patient id; columns as written by `generate`.
    """
    for record in store.manifest.get("patients", {}).values():
        for source in (record.get("sources") or {}).values():
            path = Path(str(source.get("path", "")))
            truth = path.parents[2] / "truth.csv" if len(path.parents) > 2 else None
            if truth is None or not truth.exists():
                return None
            table = pd.read_csv(truth).set_index("patient_id")
            return table if set(store.patient_ids) <= set(table.index) else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the site export into")
    parser.add_argument("--n", type=int, default=200, help="number of patients")
    parser.add_argument("--voxel-size", type=float, default=3.0, help="voxel size of the written images (mm)")
    parser.add_argument("--imaging-effect", type=float, default=1.0, help="weight of the imaging part of the hazard")
    parser.add_argument("--site-shift", action="store_true", help="make a second site for external validation")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--prefix", default=None, help="patient id prefix (default SYN, or EXT with --site-shift)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--misaligned", action="store_true",
                        help="move T1, T2 and FLAIR by a random rigid motion their affines do not record (a raw export)")
    args = parser.parse_args(argv)
    try:
        config = SyntheticConfig(n=args.n, voxel_size=args.voxel_size, imaging_effect=args.imaging_effect,
                                 site_shift=args.site_shift, seed=args.seed, misaligned=args.misaligned,
                                 prefix=args.prefix or ("EXT" if args.site_shift else "SYN"))
        clinical = generate(args.out, config, workers=args.workers, progress=True)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frame = pd.read_csv(clinical)
    print(f"wrote {len(frame)} patients to {args.out}: {clinical}, images/, truth.csv "
          f"({100 * (1 - frame['death'].mean()):.0f}% censored, {int(frame['glioblastoma'].sum())} glioblastoma)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
