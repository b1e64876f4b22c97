"""A cell's selected configuration as an MLflow model: its K fold models as one ensemble ``pyfunc``.

The study logs one per cell under its study run (``models/<cell>``, `log_cell_models`) and, with
``--register-models``, registers it in MLflow's model registry as ``<study>-<cell>``. Loaded with
``mlflow.pyfunc.load_model``, it predicts as the report's external validation does
(`analysis.ensemble.predict_ensemble`: DPI = mean of the folds' DPI, survival averaged over the
folds, nothing estimated on the new data):

- input: a DataFrame with a column ``store`` (a cohort store made by ``datasets.convert``, with
  the development store's sequences and shape) and optionally ``patient_id`` (rows restrict the
  patients; without, every patient of the store that the cell's task takes);
- output: one row per patient: ``patient_id``, ``dpi``, ``surv_365`` and ``surv_<t>`` at the
  trial's evaluation times (days).

Volumes already in memory go through the wrapped model: ``model.unwrap_python_model()
.predict_volumes(volumes[n, C, X, Y, Z], clinical_rows)``.

The fold weights travel as the model's artifacts; the code is the project's, so the model loads
wherever the project is installed (``pip install -e .``; the model's requirements list its
dependencies' versions). It is saved as "models from code" (`analysis.pyfunc_model_code`):
loading it runs that file, it unpickles no Python object. The project's source is not copied into
the model: MLflow's artifact store holds weights and predictions only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from datasets.errors import StudyError

MODELS_DIR = "models"
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
        from analysis.ensemble import predict_ensemble

        expected = (len(self.meta["sequences"]), *self.meta["shape"])
        if volumes.ndim != 5 or tuple(volumes.shape[1:]) != expected:
            raise ModelInputError(f"volumes of shape {tuple(volumes.shape)}; the model takes [n, {expected}]")
        if self.meta["inputs"] == "image+clinical" and clinical is None:
            raise ModelInputError(f"cell {self.meta['cell']} also reads clinical values: pass their rows")
        times = tuple(self.meta["eval_times"])
        predicted = predict_ensemble(self.models, volumes, times, clinical)
        return pd.DataFrame({"dpi": predicted["risk"], "surv_365": predicted["surv_365"],
                             **{f"surv_{t:g}": predicted["curves"][:, k] for k, t in enumerate(times)}})

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from datasets import CohortStore
        from datasets.cohort import Cohort, CohortSpec
        from search_spaces import TASKS

        frames = []
        rows = pd.DataFrame(model_input)
        if "store" not in rows.columns:
            raise ModelInputError(f"input needs a column 'store' (a cohort store); got {list(rows.columns)}")
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


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in
            ("torch", "monai", "numpy", "pandas", "zarr", "scipy", "mlflow")]


def log_cell_model(tracking_uri: str, run_id: str, cell: str, checkpoint_dir: Path, meta: dict, example_store: str,
                   example_ids: list[str], register_as: str | None = None) -> str:
    """Save the cell's fold ensemble as a pyfunc model under the run's ``models/<cell>``; register it
    as `register_as` if given. Returns the model's URI."""
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    artifacts = {f"fold{k}": str(Path(checkpoint_dir) / f"fold{k}_model.pt") for k in range(meta["folds"])}
    with tempfile.TemporaryDirectory() as tmp:
        meta_file = Path(tmp) / "meta.json"
        meta_file.write_text(json.dumps(meta, indent=1))
        artifacts["meta"] = str(meta_file)
        example = pd.DataFrame({"store": [example_store] * len(example_ids), "patient_id": example_ids})
        model = FoldEnsembleModel()
        context = type("Context", (), {"artifacts": artifacts})()
        model.load_context(context)
        inferred = infer_signature(example, model.predict(context, example))
        signature = ModelSignature(Schema([ColSpec("string", "store"), ColSpec("string", "patient_id", required=False)]),
                                   inferred.outputs)
        path = Path(tmp) / "model"
        quiet = logging.getLogger("mlflow").level
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        try:
            mlflow.pyfunc.save_model(path, python_model=str(Path(__file__).with_name("pyfunc_model_code.py")),
                                     artifacts=artifacts, signature=signature, input_example=example,
                                     pip_requirements=_requirements())
        finally:
            logging.getLogger("mlflow").setLevel(quiet)
        MlflowClient(tracking_uri).log_artifacts(run_id, str(path), artifact_path=f"{MODELS_DIR}/{cell}")
    uri = f"runs:/{run_id}/{MODELS_DIR}/{cell}"
    if register_as and not _registered(tracking_uri, register_as, run_id):  # a resumed study logs it again
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.register_model(uri, register_as)
    return uri


def _registered(tracking_uri: str, name: str, run_id: str) -> bool:
    """Whether a version of registered model `name` already comes from the study run `run_id`."""
    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")
    return any(v.run_id == run_id for v in versions)
