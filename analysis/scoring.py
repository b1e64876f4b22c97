"""New patients scored by a cell's model: no outcome needed.

A patient folder (a site export's layout, as `datasets.convert` reads it) is preprocessed with the
very function and parameters that made the development store (`datasets.preprocess.preprocess_patient`
with the model's recorded ``preprocessing``), held as float16 as a store holds it, and given to the
fold ensemble (`analysis.pyfunc_model.FoldEnsembleModel.predict_volumes`). So a patient scored here
gets the DPI the report's external validation gives it after conversion, to float rounding.

What a score means, from the model's record (``meta.json``, written by `study.driver.log_models`):
- ``dpi``: the mean of the K fold models' deep prognostic index put on the development scale
  (`trainables.ensemble.DevelopmentScale`, as the report's external validation gives it: the scale of
  the development out-of-fold DPI, whose median is the cut-off below);
- ``risk_group``: ``high`` above the development cut-off (the median of the selected
  configuration's out-of-fold DPI on the development cohort, the report's Kaplan-Meier split),
  ``low`` otherwise;
- ``surv_365`` and ``surv_<t>``: the survival curve at the trial's evaluation times (days).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datasets.clinical_features import IMAGE_CLINICAL
from datasets.errors import StudyError

# What a model must record to score a patient folder (older models lack the last two).
NEEDED = ("sequences", "shape", "eval_times", "preprocessing", "dpi_cutoff")


class ScoringError(StudyError):
    """A model or a folder of new patients that cannot be scored (exit 2 in `study.predict`)."""


@dataclass
class NewPatients:
    """New patients read from a folder, ready for the model."""

    ids: list[str]
    images: np.ndarray  # float16 [n, C, X, Y, Z], as a store holds them
    masks: np.ndarray  # uint8 [n, X, Y, Z]
    affines: np.ndarray  # [n, 4, 4]
    missing: np.ndarray  # bool [n, C]
    problems: dict[str, list[str]] = field(default_factory=dict)  # noted, not disqualifying
    excluded: dict[str, str] = field(default_factory=dict)  # patient -> why it was not scored


def check_model(meta: dict, where: str) -> None:
    """Refuse a model whose preprocessing cannot be reproduced (logged before it was recorded)."""
    lacking = [key for key in NEEDED if key not in meta]
    if lacking:
        raise ScoringError(f"{where}: the model does not record {lacking} (it was logged by an older version of "
                           "the study); its preprocessing cannot be reproduced for new patients. Score converted "
                           "stores with it instead, or log the cell's model again with this version (--resume)")


def preprocess_config(meta: dict):
    """The development store's preprocessing as a `PreprocessConfig`."""
    from datasets.preprocessing_config import PreprocessConfig

    values = dict(meta["preprocessing"])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        config = PreprocessConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ScoringError(f"the model's recorded preprocessing {meta['preprocessing']} cannot be reproduced by this "
                           f"version of the converter ({exc})") from exc
    if list(config.sequences) != list(meta["sequences"]) or list(config.shape) != list(meta["shape"]):
        raise ScoringError(f"the model's preprocessing {config.to_dict()} disagrees with its input "
                           f"{meta['sequences']} {meta['shape']}")
    return config


def read_new_patients(images: Path, meta: dict, patterns: dict[str, str] | None = None,
                      only: list[str] | None = None) -> NewPatients:
    """Preprocess every patient folder under `images` as the development store was preprocessed.
    A folder that cannot be read, lacks every sequence or fails the converter's plausibility checks
    is excluded with the reason; the others are scored."""
    from datasets.convert import discover_patients
    from datasets.errors import ImageError, InputError
    from datasets.patient_ids import formula_problem, formula_reason
    from datasets.preprocess import preprocess_patient
    from datasets.sequences import SequenceMatcher

    config = preprocess_config(meta)
    try:
        folders, clashes = discover_patients(Path(images))
        matcher = SequenceMatcher(tuple(config.sequences), patterns)
    except InputError as exc:
        raise ScoringError(str(exc)) from exc
    out = NewPatients([], np.empty((0, len(config.sequences), *config.shape), np.float16),
                      np.empty((0, *config.shape), np.uint8), np.empty((0, 4, 4)), np.empty((0, len(config.sequences)), bool))
    out.excluded.update({pid: "several folders name this patient: " + ", ".join(p.name for p in paths)
                         for pid, paths in clashes.items()})
    images_, masks, affines, missing = [], [], [], []
    for pid, folder in folders.items():
        if only is not None and pid not in only:
            continue
        if formula_problem(pid):
            out.excluded[pid] = formula_reason(pid)
            continue
        try:
            files, notes = matcher.find(folder, pid)
            if not any(key in files for key in config.sequences):
                raise ImageError(f"no file of the model's sequences {list(config.sequences)} in {folder}"
                                 + (f" ({'; '.join(notes)})" if notes else ""))
            patient = preprocess_patient(files, pid, config)
        except (ImageError, InputError, OSError) as exc:
            out.excluded[pid] = str(exc)
            continue
        out.ids.append(pid)
        images_.append(np.asarray(patient.image, dtype=np.float16))
        masks.append(patient.mask)
        affines.append(patient.affine)
        missing.append(np.asarray(patient.missing, dtype=bool))
        out.problems[pid] = list(notes) + list(patient.info.get("problems", []))
    if images_:
        out.images, out.masks = np.stack(images_), np.stack(masks)
        out.affines, out.missing = np.stack(affines), np.stack(missing)
    return out


def score(model, patients: NewPatients, clinical: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per scored patient: ``patient_id``, ``dpi``, ``risk_group``, ``surv_365``, ``surv_<t>``.
    `model`: a loaded `FoldEnsembleModel`; `clinical`: covariates by patient id, for a cell that
    reads them (blanks and absent patients are NaN, imputed as in training)."""
    meta = model.meta
    rows = None
    if meta["inputs"] == IMAGE_CLINICAL:
        if clinical is None:
            raise ScoringError(f"the model of cell {meta['cell']} also reads clinical values: pass --clinical CSV "
                               "(patient_id and the covariates; no outcome needed)")
        rows = clinical.reindex(patients.ids).reset_index(drop=True)
    predicted = model.predict_volumes(patients.images, rows)
    cutoff = float(meta["dpi_cutoff"])
    groups = np.where(predicted["dpi"].to_numpy() > cutoff, "high", "low")
    frame = pd.concat([pd.DataFrame({"patient_id": patients.ids}), predicted[["dpi"]],
                       pd.DataFrame({"risk_group": groups}), predicted.drop(columns=["dpi"])], axis=1)
    return frame


def gradcam_maps(model, image: np.ndarray) -> np.ndarray:
    """The mean of the fold models' Grad-CAM maps [X, Y, Z] of one new patient (no fold trained on
    it), rescaled to [0, 1]; for an image+clinical model, its image branch's map."""
    from analysis.gradcam import gradcam_map

    maps = [gradcam_map(fold.image_network, np.asarray(image, dtype=np.float32), fold.head) for fold in model.models]
    mean = np.mean(maps, axis=0)
    low, high = float(mean.min()), float(mean.max())
    return (mean - low) / (high - low) if high > low and math.isfinite(high) else np.zeros_like(mean)
