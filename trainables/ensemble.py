"""Final models: the fold ensemble of a cell's selected configuration.

Chosen over refitting on all development data: the K fold models already exist (no extra
training, no epoch count to guess without a validation set). A patient's DPI is the mean over
folds of the fold models' DPI, which is comparable across folds (`trainables.heads`), so the
ensemble DPI is on the same scale as the development out-of-fold DPI and a cut-off fixed on the
development cohort applies unchanged. Survival probabilities are averaged over folds, each fold's
baseline hazard fitted on its own development training patients. Nothing is estimated on
external data.

**The development scale** (`DevelopmentScale`). The mean of K fold models' DPIs is less noisy than
one model's: its spread shrinks against the out-of-fold DPI on which the development Cox model
(clinical + DPI) and the risk groups' cut-off were fitted, so applied unchanged the combined
model would be miscalibrated (too flat a DPI effect) on new patients. The ensemble DPI is put on
the development scale by regression calibration (Carroll et al., *Measurement Error in Nonlinear
Models*, 2006, ch. 4): a coefficient fitted on a noisy covariate W (the out-of-fold DPI) applies
to a less noisy X (the ensemble DPI) once X is mapped to
``mean_W + var(W) / var(X) * (X - mean_X)``. var(W) is the out-of-fold DPI's variance; mean_X and
var(X) are the ensemble's on the development images, computed once per model with nothing of an
external cohort (so a patient's DPI never depends on who else is scored). The factor is at least 1
(the mean of K predictions never varies more than they do); on development images K - 1 of the K
models saw each patient, so models that fit their training patients much closer than new ones
give an ensemble variance too large and a factor too small: the report shows, per external
cohort, the ratio of spreads and the combined model's calibration slope, which then exceeds 1.
Regression calibration is a first-order correction for a Cox model: in simulation
(`benchmarks/results/development_scale.md`) it removes most of the flattening when the models
disagree much and nearly all of it when they agree. An external cohort that holds development
patients (the same source files) is flagged by the report, and those patients are scored with
their out-of-fold predictions (`analysis.sections.out_of_fold_for_development_patients`): the
ensemble holds K - 1 models that trained on each of them, an in-sample fit no scale removes (on a
copy of the development cohort its calibration slope was 1.02-1.08; out of fold it is 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datasets.errors import StudyError
from trainables.fold_model import FoldModel, model_file


class MissingFoldModels(StudyError):
    """A trial's final checkpoint lacks its fold models (a trial of an older version, or an unfinished one)."""


def load_fold_models(checkpoint_dir: Path, folds: int) -> list[FoldModel]:
    """The K fold models a finished trial left in its final checkpoint."""
    paths = [Path(checkpoint_dir) / model_file(k) for k in range(folds)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise MissingFoldModels(f"{checkpoint_dir} lacks the fold models {missing} (a trial of an older version, or "
                          "an unfinished one)")
    return [FoldModel.load(p) for p in paths]


@dataclass(frozen=True)
class DevelopmentScale:
    """The map of a fold ensemble's mean DPI onto the out-of-fold DPI's scale (module docstring)."""

    oof_mean: float
    oof_var: float
    ensemble_mean: float
    ensemble_var: float

    @property
    def factor(self) -> float:
        return max(1.0, self.oof_var / self.ensemble_var) if self.ensemble_var > 0 else 1.0

    def apply(self, mean_dpi: np.ndarray) -> np.ndarray:
        return self.oof_mean + self.factor * (np.asarray(mean_dpi, dtype=float) - self.ensemble_mean)

    def to_dict(self) -> dict:
        return {**asdict(self), "factor": self.factor}

    @classmethod
    def from_dict(cls, values: dict) -> DevelopmentScale:
        return cls(*(float(values[k]) for k in ("oof_mean", "oof_var", "ensemble_mean", "ensemble_var")))


def development_scale(models: list[FoldModel], store, slots, clinical, oof_dpi: np.ndarray,
                      batch: int = 32) -> DevelopmentScale:
    """The development scale of a cell's fold ensemble: its mean DPI on the development patients
    (`slots` of `store`, their clinical rows for fusion models), read in batches."""
    means = []
    for start in range(0, len(slots), batch):
        part = slots[start:start + batch]
        rows = clinical.iloc[start:start + batch] if clinical is not None else None
        images = store.images(part)
        means.append(np.mean([m.predict(images, (365.0,), rows)["risk"] for m in models], axis=0))
    ensemble = np.concatenate(means)
    oof = np.asarray(oof_dpi, dtype=float)
    return DevelopmentScale(float(oof.mean()), float(oof.var()), float(ensemble.mean()), float(ensemble.var()))


def predict_ensemble(models: list[FoldModel], images: np.ndarray, times, clinical=None,
                     scale: DevelopmentScale | None = None) -> dict[str, np.ndarray]:
    """Ensemble ``risk`` (DPI, on the development scale when `scale` is given), ``surv_365`` and
    survival ``curves`` at `times` of volumes [n, C, X, Y, Z] (with their clinical rows, a DataFrame,
    for ``image+clinical`` models)."""
    predictions = [m.predict(images, times, clinical) for m in models]
    out = {key: np.mean([p[key] for p in predictions], axis=0) for key in ("risk", "surv_365", "curves")}
    if scale is not None:
        out["risk"] = scale.apply(out["risk"])
    return out
