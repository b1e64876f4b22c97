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
(about 35 % censored; 1 to 2 years and about 30 % for the second site). ``--imaging-effect 0``
gives images with no prognostic information beyond what they show of the grade; ``--site-shift``
gives a second site with other intensity scaling, 5 mm slices for T2/FLAIR, LPS-ordered voxels
and an older, more often glioblastoma case mix.

What the images can tell (``lp_image_content`` in ``truth.csv``). ``lp_imaging`` is the imaging
effect term only: it is not the ceiling of an image-only model, because the images also show the
grade. A patient's images are rendered from the tumour's volume v, necrosis fraction n and
enhancement e (`draw_latent`); everything else in them (head size and position, tumour location,
shape and oedema extent, bias field, noise, site gain, slice thickness) is drawn independently of
the clinical variables and the survival time given (v, n, e). Age, sex, IDH and MGMT are not
rendered; the grade is, through the distributions of v, n and e. So S = (v, n, e) is all the
images carry about survival, and, since lp_imaging is a function of S and (age, IDH, MGMT) are
independent of S given the grade g::

    E[lp | S] = lp_imaging(v, n) + sum_g P(g | S) E[lp_clinical | g]
    P(g | S)  ~ P(g) p(v | g) p(n | g) P(e | g)

with log v ~ N(log 30 + 0.3 (g - 3), 0.8) clipped to [log 2, log 150], n ~ N(0.3 if g = 4 else
0.08, 0.12) clipped to [0, 0.6] (a clipped value's likelihood is the mass of the clipped tail),
P(e | g = 4) = 1 and P(e | g < 4) = 0.3. P(g) and E[lp_clinical | g] are sums over the generator's
joint distribution (`clinical_distribution`, `clinical_given_grade`): the exact discrete grade,
IDH, MGMT and sex, and the clipped normal age on 1/100-year bins whose edges hold the rounding and
IDH age thresholds (error below 1e-6). Nothing is fitted. With ``--imaging-effect 0``, E[lp | S]
still varies with the grade the images show. Within a cohort selected on clinical variables F
(a study task's filter, e.g. glioblastoma), the ceiling is E[lp | S, F]: the same formula with
P(g) and E[lp_clinical | g] taken over the patients that pass F (S depends on F only through g);
within glioblastoma the grade is known and E[lp | S, F] ranks as lp_imaging does. An
image-derived predictor is a function of S and of noise independent of survival given S, so it
cannot know more than S; ``python -m benchmarks.image_oracle`` checks on 20,000 patients
(`latent_cohort`: the same draws without rendering) that no predictor fitted to S beats the
C-index of E[lp | S] (within glioblastoma: of E[lp | S, F]) by more than its sampling error.
"""

from __future__ import annotations

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
from scipy.special import log_ndtr, ndtr

from datasets.errors import InputError

WEIBULL_SHAPE = 1.2
WEIBULL_SCALE_DAYS = 900.0
# Fixed standardisation constants of the imaging features (population values of this generator).
LOG_VOLUME_MEAN, LOG_VOLUME_SD = np.log(30.0), 0.8
NECROSIS_MEAN, NECROSIS_SD = 0.2, 0.15

# The generator's joint distribution, shared by the draws and the image-content derivation.
GRADES = (2, 3, 4)
AGE_MEAN = {False: 52, True: 60}  # by site_shift
AGE_SD, AGE_RANGE = 14, (20, 88)
GRADE4_AGE_CENTRE = {False: 50, True: 45}  # P(grade 4 | age) = logistic((age - centre) / 8)
GRADE4_AGE_SCALE = 8
VOLUME_SHIFT_PER_GRADE, VOLUME_SD, VOLUME_RANGE_ML = 0.3, 0.8, (2.0, 150.0)  # log volume ~ N(log 30 + 0.3 (g - 3), 0.8)
NECROSIS_GRADE4, NECROSIS_LOWER_GRADE, NECROSIS_DRAW_SD, NECROSIS_RANGE = 0.3, 0.08, 0.12, (0.0, 0.6)
P_ENHANCING_LOWER_GRADE = 0.3  # grade 4 always enhances

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


def _p_grade4(age, site_shift: bool):
    return 1 / (1 + np.exp(-(age - GRADE4_AGE_CENTRE[site_shift]) / GRADE4_AGE_SCALE))


def _p_idh(grade, age):
    return np.where(grade == 4, 0.1, np.where(age < 50, 0.75, 0.5))


def _p_mgmt(glioblastoma):
    return np.where(glioblastoma, 0.4, 0.75)


def clinical_variables(rng: np.random.Generator, site_shift: bool) -> dict:
    """Age, sex, grade, IDH, MGMT, pathology with realistic dependencies."""
    age = float(np.clip(rng.normal(AGE_MEAN[site_shift], AGE_SD), *AGE_RANGE))
    p_grade4 = _p_grade4(age, site_shift)
    grade = 4 if rng.random() < p_grade4 else int(rng.choice([2, 3]))
    idh = int(rng.random() < _p_idh(grade, age))
    glioblastoma = int(grade == 4 and idh == 0)
    if glioblastoma:
        pathology = "glioblastoma"
    elif idh and grade < 4 and rng.random() < 0.5:
        pathology = "oligodendroglioma"
    else:
        pathology = "astrocytoma"
    mgmt = int(rng.random() < _p_mgmt(glioblastoma))
    sex = "M" if rng.random() < 0.58 else "F"
    return {"age": round(age, 1), "sex": sex, "grade": grade, "idh": idh, "mgmt": mgmt,
            "pathology": pathology, "glioblastoma": glioblastoma}


def _log_volume_mean(grade):
    return LOG_VOLUME_MEAN + VOLUME_SHIFT_PER_GRADE * (grade - 3)


def _necrosis_mean(grade):
    return np.where(grade == 4, NECROSIS_GRADE4, NECROSIS_LOWER_GRADE)


def tumour_features(rng: np.random.Generator, grade: int) -> dict:
    """Tumour volume (ml), necrosis fraction and enhancement, depending on the grade."""
    log_volume = rng.normal(_log_volume_mean(grade), VOLUME_SD)
    volume = float(np.clip(np.exp(log_volume), *VOLUME_RANGE_ML))
    necrosis = float(np.clip(rng.normal(_necrosis_mean(grade), NECROSIS_DRAW_SD), *NECROSIS_RANGE))
    enhancing = bool(grade == 4 or rng.random() < P_ENHANCING_LOWER_GRADE)
    return {"tumour_volume_ml": volume, "necrosis_fraction": necrosis, "enhancing": enhancing}


def _lp_clinical(age, grade, idh, mgmt):
    """The clinical part of the log hazard (scalars or arrays; `age` rounded to 0.1 year as recorded)."""
    return 0.035 * (age - 55) + 0.4 * (grade == 3) + 0.9 * (grade == 4) - 0.7 * idh - 0.45 * mgmt


def linear_predictors(clinical: dict, tumour: dict, imaging_effect: float) -> tuple[float, float]:
    """(lp_clinical, lp_imaging): the clinical part of the log hazard and the imaging effect term."""
    lp_clinical = _lp_clinical(clinical["age"], clinical["grade"], clinical["idh"], clinical["mgmt"])
    z_volume = (np.log(tumour["tumour_volume_ml"]) - LOG_VOLUME_MEAN) / LOG_VOLUME_SD
    z_necrosis = (tumour["necrosis_fraction"] - NECROSIS_MEAN) / NECROSIS_SD
    lp_imaging = imaging_effect * (0.8 * z_volume + 0.5 * z_necrosis)
    return float(lp_clinical), float(lp_imaging)


def clinical_distribution(site_shift: bool) -> pd.DataFrame:
    """The generator's joint distribution of the clinical variables a converted store keeps,
    enumerated: one row per (age bin, grade, IDH, MGMT, sex) with its probability ``weight`` and
    its ``lp_clinical``. Columns are named and coded as the store's clinical table (sex 0 = F,
    1 = M; kps and resection unknown), so a `datasets.cohort` filter evaluates on it as on a store.

    The age is a normal clipped to `AGE_RANGE` (point masses at its ends), integrated with the
    midpoint rule on 1/100-year bins: the rounding of the age to 0.1 year (which the hazard and the
    clinical table use) and the IDH threshold at 50 lie on bin edges, so within a bin only the
    smooth P(grade 4 | age) varies (error below 1e-6). Grade, IDH, MGMT and sex are exact.
    """
    return _clinical_distribution(site_shift).copy()


@lru_cache(maxsize=2)
def _clinical_distribution(site_shift: bool) -> pd.DataFrame:
    low, high = AGE_RANGE
    edges = np.linspace(low, high, (high - low) * 100 + 1)
    cdf = ndtr((edges - AGE_MEAN[site_shift]) / AGE_SD)
    age = np.concatenate(([low], (edges[:-1] + edges[1:]) / 2, [high]))
    weight = np.concatenate(([cdf[0]], np.diff(cdf), [1 - cdf[-1]]))
    p_grade4 = _p_grade4(age, site_shift)
    parts = []
    for grade in GRADES:
        p_grade = p_grade4 if grade == 4 else (1 - p_grade4) / 2
        p_idh = _p_idh(grade, age)
        for idh in (0, 1):
            glioblastoma = int(grade == 4 and idh == 0)
            p_mgmt = _p_mgmt(glioblastoma)
            for mgmt in (0, 1):
                for sex, p_sex in ((0, 0.42), (1, 0.58)):
                    parts.append(pd.DataFrame({
                        "age": np.round(age, 1), "sex": float(sex), "grade": float(grade),
                        "glioblastoma": float(glioblastoma), "idh": float(idh), "mgmt": float(mgmt),
                        "kps": np.nan, "resection": np.nan,
                        "weight": weight * p_grade * (p_idh if idh else 1 - p_idh)
                        * (p_mgmt if mgmt else 1 - p_mgmt) * p_sex,
                        "lp_clinical": _lp_clinical(np.round(age, 1), grade, idh, mgmt)}))
    return pd.concat(parts, ignore_index=True)


def clinical_given_grade(site_shift: bool, cohort_filter: str = "all") -> pd.DataFrame:
    """Index grade (2, 3, 4); columns ``p`` = P(grade, patient passes `cohort_filter`),
    ``lp_clinical`` = E[lp_clinical | grade, filter] and ``exp_lp_clinical`` = E[exp(lp_clinical) |
    grade, filter], from the generator's joint distribution (`clinical_distribution`)."""
    return pd.DataFrame(dict(zip(("p", "lp_clinical", "exp_lp_clinical"), _grade_moments(site_shift, cohort_filter))),
                        index=pd.Index(GRADES, name="grade"))


@lru_cache(maxsize=16)
def _grade_moments(site_shift: bool, cohort_filter: str = "all") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(grade, filter), E[lp_clinical | grade, filter], E[exp(lp_clinical) | grade, filter] for
    grades `GRADES` (the last two 0 where a grade cannot pass the filter). A filter on a column the
    generator does not draw (time, event) raises `InputError`."""
    from datasets.cohort import evaluate_filter  # the store's filter language, evaluated on the distribution

    table = _clinical_distribution(site_shift)
    table = table[evaluate_filter(cohort_filter, table)]
    if table["weight"].sum() <= 0:
        raise InputError(f"cohort filter {cohort_filter!r} selects no patient this generator can draw")
    moments = np.zeros((3, len(GRADES)))
    for column, grade in enumerate(GRADES):
        part = table[table["grade"] == grade]
        mass = float(part["weight"].sum())
        if mass > 0:
            moments[:, column] = (mass, float((part["weight"] * part["lp_clinical"]).sum()) / mass,
                                  float((part["weight"] * np.exp(part["lp_clinical"])).sum()) / mass)
    for row in moments:
        row.flags.writeable = False
    return tuple(moments)


def _log_censored_normal(x, mean, sd, low, high):
    """Log likelihood of an observed `x` = clip(N(mean, sd), low, high): the density inside, the
    mass of the clipped tail at either end."""
    z, z_low, z_high = (x - mean) / sd, (low - mean) / sd, (high - mean) / sd
    inside = -0.5 * z ** 2 - np.log(sd * np.sqrt(2 * np.pi))
    return np.where(x <= low, log_ndtr(z_low), np.where(x >= high, log_ndtr(-z_high), inside))


def grade_posterior(volume_ml, necrosis, enhancing, site_shift: bool = False, cohort_filter: str = "all") -> np.ndarray:
    """P(grade | what the images show, patient passes `cohort_filter`) [n, 3] (columns: `GRADES`)
    for the tumour volume (ml), necrosis fraction and enhancement as the generator drew them (the
    module docstring; the images depend on the clinical variables only through the grade, so the
    filter only changes the prior)."""
    volume_ml, necrosis = np.atleast_1d(np.asarray(volume_ml, float)), np.atleast_1d(np.asarray(necrosis, float))
    enhancing = np.atleast_1d(np.asarray(enhancing)).astype(bool)
    prior = _grade_moments(site_shift, cohort_filter)[0]
    log_low, log_high = np.log(VOLUME_RANGE_ML[0]), np.log(VOLUME_RANGE_ML[1])
    log_volume = np.where(volume_ml <= VOLUME_RANGE_ML[0], log_low,
                          np.where(volume_ml >= VOLUME_RANGE_ML[1], log_high, np.log(volume_ml)))
    columns = []
    for column, grade in enumerate(GRADES):
        p_enhancing = 1.0 if grade == 4 else P_ENHANCING_LOWER_GRADE
        with np.errstate(divide="ignore"):
            log_e = np.log(np.where(enhancing, p_enhancing, 1 - p_enhancing))
        with np.errstate(divide="ignore"):
            log_prior = np.log(prior[column])
        columns.append(log_prior
                       + _log_censored_normal(log_volume, _log_volume_mean(grade), VOLUME_SD, log_low, log_high)
                       + _log_censored_normal(necrosis, float(_necrosis_mean(grade)), NECROSIS_DRAW_SD, *NECROSIS_RANGE)
                       + log_e)
    log_joint = np.stack(columns, axis=1)
    log_joint -= log_joint.max(axis=1, keepdims=True)
    posterior = np.exp(log_joint)
    return posterior / posterior.sum(axis=1, keepdims=True)


def image_content_predictor(volume_ml, necrosis, enhancing, imaging_effect: float, site_shift: bool = False,
                            cohort_filter: str = "all", hazard_scale: bool = False) -> np.ndarray:
    """E[lp | what the images show] per patient: the imaging effect term plus E[lp_clinical | grade]
    averaged over P(grade | volume, necrosis, enhancement) (the module docstring); nothing fitted.

    `cohort_filter` (a `datasets.cohort` filter): E[lp | image, the patient passes the filter],
    what the images can tell within that cohort (e.g. within ``glioblastoma`` the grade is known,
    so only the imaging effect term ranks patients). `hazard_scale`: log E[exp(lp) | image]
    instead (the log of the expected relative hazard; ranks patients almost identically,
    `benchmarks.image_oracle` compares both)."""
    volume_ml, necrosis = np.atleast_1d(np.asarray(volume_ml, float)), np.atleast_1d(np.asarray(necrosis, float))
    posterior = grade_posterior(volume_ml, necrosis, enhancing, site_shift, cohort_filter)
    _, lp_given_grade, exp_lp_given_grade = _grade_moments(site_shift, cohort_filter)
    z_volume = (np.log(volume_ml) - LOG_VOLUME_MEAN) / LOG_VOLUME_SD
    z_necrosis = (necrosis - NECROSIS_MEAN) / NECROSIS_SD
    lp_imaging = imaging_effect * (0.8 * z_volume + 0.5 * z_necrosis)
    if hazard_scale:
        return lp_imaging + np.log(posterior @ exp_lp_given_grade)
    return lp_imaging + posterior @ lp_given_grade


def draw_latent(rng: np.random.Generator, config: "SyntheticConfig") -> tuple[dict, dict]:
    """(clinical, tumour) of one patient: every random quantity that both its images and its hazard
    depend on (the rendering's noise and the survival draw are independent of each other given
    these). The renderer (`synthesise_patient`) and the image-free `latent_cohort` both draw
    through here, from the patient's generator first."""
    clinical = clinical_variables(rng, config.site_shift)
    return clinical, tumour_features(rng, clinical["grade"])


def true_predictors(clinical: dict, tumour: dict, config: "SyntheticConfig") -> dict:
    """The truth columns of one patient: ``lp_clinical``, ``lp_imaging`` (the imaging effect term
    only), ``lp`` (their sum: the hazard's), ``lp_image_content`` (E[lp | what the images show], over
    the whole cohort) and the generator's ``imaging_effect`` and ``site_shift`` (with the tumour
    columns they give E[lp | image] within any cohort filter: `image_content_predictor`)."""
    lp_clinical, lp_imaging = linear_predictors(clinical, tumour, config.imaging_effect)
    content = image_content_predictor(tumour["tumour_volume_ml"], tumour["necrosis_fraction"], tumour["enhancing"],
                                      config.imaging_effect, config.site_shift)
    return {"lp_clinical": lp_clinical, "lp_imaging": lp_imaging, "lp": lp_clinical + lp_imaging,
            "lp_image_content": float(content[0]), "imaging_effect": config.imaging_effect,
            "site_shift": config.site_shift}


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


def _patient_rng(index: int, config: SyntheticConfig) -> np.random.Generator:
    return np.random.default_rng([config.seed, index, int(config.site_shift)])


def _follow_up_years(config: SyntheticConfig) -> float:
    return 2.0 if config.site_shift else 6.0


def latent_cohort(config: SyntheticConfig) -> pd.DataFrame:
    """The cohort's patients without their images: per patient the clinical row, the truth columns
    and a survival time, drawn by the same functions as `generate` (`draw_latent`,
    `true_predictors`, `survival`) in seconds for tens of thousands of patients.

    Clinical variables, tumour and true predictors equal those of `generate` with the same config
    patient by patient; the survival times have the same distribution but are not the same draws
    (the renderer draws its noise from the patient's generator before the survival time).
    """
    rows = []
    for index in range(config.n):
        rng = _patient_rng(index, config)
        clinical, tumour = draw_latent(rng, config)
        predictors = true_predictors(clinical, tumour, config)
        time, event = survival(rng, predictors["lp"], _follow_up_years(config))
        rows.append({"patient_id": f"{config.prefix}-{index + 1:04d}", **clinical, "survival_days": time,
                     "death": event, **predictors, **tumour})
    return pd.DataFrame(rows)


def synthesise_patient(index: int, config: SyntheticConfig) -> dict:
    """Images, tumour label and clinical/truth rows of one patient (deterministic in seed, index)."""
    rng = _patient_rng(index, config)
    template = _template(config.voxel_size)
    clinical, tumour = draw_latent(rng, config)

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

    predictors = true_predictors(clinical, tumour, config)
    time, event = survival(rng, predictors["lp"], _follow_up_years(config))
    pid = f"{config.prefix}-{index + 1:04d}"
    truth = {"patient_id": pid, **predictors, **tumour,
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
    from datasets.cli import new_parser

    parser = new_parser("datasets.synthetic", __doc__.split("\n")[0])
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
