"""A cell's selected configuration as an MLflow model: its K fold models as one ensemble ``pyfunc``.

The study logs one per cell in the cell's run (artifact ``model``, `study.model_logging.log_cell_model`) and, with
``--register-models``, registers it in MLflow's model registry as ``<study>-<cell>``. Loaded with
``mlflow.pyfunc.load_model``, it predicts as the report's external validation does
(`trainables.ensemble.predict_ensemble`: DPI = mean of the folds' DPI put on the development scale,
survival averaged over the folds, nothing estimated on the new data):

- input: a DataFrame with a column ``store`` (a cohort store made by ``datasets.convert``, with
  the development store's sequences and shape) and optionally ``patient_id`` (rows restrict the
  patients; without, every patient of the store that the cell's task takes); or a column
  ``images``: folders of new patients as a site exports them, no outcome needed, preprocessed as
  the development store was (`analysis.scoring`; image-only cells; `study.predict` does more);
- output: one row per patient: ``patient_id``, ``dpi``, ``surv_365`` and ``surv_<t>`` at the
  trial's evaluation times (days).

Volumes already in memory go through the wrapped model: ``model.unwrap_python_model()
.predict_volumes(volumes[n, C, X, Y, Z], clinical_rows)``.

The fold weights travel as the model's artifacts, the project's packages (its source, a few
hundred kB) in the model's ``code`` folder, and its requirements pin the project's dependencies
(Ray left out) to the versions that trained it: ``mlflow models serve -m models:/NAME/VERSION
--env-manager virtualenv`` builds a fresh environment that runs it. Where the project is already
imported (``study.predict``, the report) its modules are used as they are. It is saved as "models
from code" (`analysis.pyfunc_model_code`): loading it runs that file, it unpickles no Python object.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from datasets.clinical_features import IMAGE_CLINICAL
from datasets.errors import StudyError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fold file otherwise


class ModelInputError(StudyError):
    """Input the cell's model cannot predict on (a store of another shape, an unknown patient)."""


class FoldEnsembleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from trainables.fold_model import FoldModel

        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.models = [FoldModel.load(Path(context.artifacts[f"fold{k}"])) for k in range(self.meta["folds"])]

    def predict_volumes(self, volumes: np.ndarray, clinical: pd.DataFrame | None = None) -> pd.DataFrame:
        """Predictions for volumes [n, C, X, Y, Z] (and their clinical rows for image+clinical cells)."""
        from trainables.ensemble import DevelopmentScale, predict_ensemble

        expected = (len(self.meta["sequences"]), *self.meta["shape"])
        if volumes.ndim != 5 or tuple(volumes.shape[1:]) != expected:
            raise ModelInputError(f"volumes of shape {tuple(volumes.shape)}; the model takes [n, {expected}]")
        if self.meta["inputs"] == IMAGE_CLINICAL and clinical is None:
            raise ModelInputError(f"cell {self.meta['cell']} also reads clinical values: pass their rows")
        times = tuple(self.meta["eval_times"])
        scale = DevelopmentScale.from_dict(self.meta["dpi_scale"]) if "dpi_scale" in self.meta else None
        predicted = predict_ensemble(self.models, volumes, times, clinical, scale)
        return pd.DataFrame({"dpi": predicted["risk"], "surv_365": predicted["surv_365"],
                             **{f"surv_{t:g}": predicted["curves"][:, k] for k, t in enumerate(times)}})

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from datasets import CohortStore
        from datasets.cohort import Cohort, CohortSpec
        from search_spaces import TASKS

        frames = []
        rows = pd.DataFrame(model_input)
        if "images" in rows.columns and rows["images"].notna().any():
            return self.predict_folders(rows)
        if "store" not in rows.columns:
            raise ModelInputError("input needs a column 'store' (a cohort store) or 'images' (a folder of new "
                                  f"patients); got {list(rows.columns)}")
        from datasets.remote import stage_store

        for store_path, group in rows.groupby("store", sort=False):
            store = CohortStore(stage_store(store_path))  # a URI (s3://, gs://) is copied once to a local cache
            if list(store.sequences) != list(self.meta["sequences"]) or list(store.shape) != list(self.meta["shape"]):
                raise ModelInputError(f"{store_path}: sequences {store.sequences}, shape {list(store.shape)}; the "
                                      f"model was trained on {self.meta['sequences']}, {self.meta['shape']}")
            task = TASKS[self.meta["task"]]
            cohort = Cohort(store, CohortSpec(task.filter, task.endpoint))
            ids = list(cohort.patient_ids)
            wanted = [p for p in group.get("patient_id", pd.Series(dtype=str)).dropna().astype(str) if p]
            unknown = sorted(set(wanted) - set(ids))
            if unknown:
                raise ModelInputError(f"{store_path}: patient(s) {unknown[:5]} are not usable patients of task "
                                      f"{self.meta['task']} in this store")
            keep = [ids.index(p) for p in wanted] if wanted else list(range(len(ids)))
            slots = np.asarray(cohort.slots)[keep]
            clinical = cohort.clinical.iloc[keep].reset_index(drop=True)
            predicted = self.predict_volumes(store.images(slots), clinical)
            frames.append(pd.concat([pd.DataFrame({"patient_id": [ids[i] for i in keep]}), predicted], axis=1))
        return pd.concat(frames, ignore_index=True)


    def predict_folders(self, rows: pd.DataFrame) -> pd.DataFrame:
        """New patients, no outcome needed: each row's ``images`` folder (one sub-folder per patient),
        preprocessed as the development store was (`analysis.scoring`); image-only cells."""
        from analysis.scoring import check_model, read_new_patients, score

        check_model(self.meta, "this model")
        frames = []
        for folder in rows["images"].dropna().astype(str).unique():
            patients = read_new_patients(Path(folder), self.meta)
            if patients.excluded:
                raise ModelInputError(f"{folder}: patient(s) not scored: "
                                      + "; ".join(f"{k}: {v}" for k, v in list(patients.excluded.items())[:5]))
            frames.append(score(self, patients))
        return pd.concat(frames, ignore_index=True)
