"""Final models: the fold ensemble of a cell's selected configuration.

Chosen over refitting on all development data: the K fold models already exist (no extra
training, no epoch count to guess without a validation set). A patient's DPI is the mean over
folds of the fold models' DPI, which is comparable across folds (`trainables.heads`), so the
ensemble DPI is on the same scale as the development out-of-fold DPI and a cut-off fixed on the
development cohort applies unchanged. Survival probabilities are averaged over folds, each fold's
baseline hazard fitted on its own development training patients. Nothing is estimated on
external data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.study_reader import ReportError
from trainables.fold_model import FoldModel, model_file


def load_fold_models(checkpoint_dir: Path, folds: int) -> list[FoldModel]:
    """The K fold models a finished trial left in its final checkpoint."""
    paths = [Path(checkpoint_dir) / model_file(k) for k in range(folds)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise ReportError(f"{checkpoint_dir} lacks the fold models {missing} (a trial of an older version, or "
                          "an unfinished one)")
    return [FoldModel.load(p) for p in paths]


def predict_ensemble(models: list[FoldModel], images: np.ndarray, times, clinical=None) -> dict[str, np.ndarray]:
    """Ensemble ``risk`` (DPI), ``surv_365`` and survival ``curves`` at `times` of volumes [n, C, X, Y, Z]
    (with their clinical rows, a DataFrame, for ``image+clinical`` models)."""
    predictions = [m.predict(images, times, clinical) for m in models]
    return {key: np.mean([p[key] for p in predictions], axis=0) for key in ("risk", "surv_365", "curves")}
