"""A cell's selected configuration as an MLflow model: its K fold models as one ensemble ``pyfunc``.

The study logs one per cell in the cell's run (artifact ``model``, `log_cell_model`) and, with
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
import logging
import os
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from datasets.clinical_features import IMAGE_CLINICAL
from datasets.errors import StudyError

MODEL_PATH = "model"  # the artifact path of a cell's model in its cell run
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


DISTRIBUTION = "glioma-survival-study"
PROJECT_PACKAGES = ("analysis", "datasets", "evaluation", "trainables", "study", "search_spaces")
_NOT_FOR_SERVING = {"ray"}  # the cluster runtime: a served model needs none of it (70 MB and its own dependencies)


def _requirements() -> list[str]:
    """The project's own dependencies, pinned to the versions that trained the model, so that
    ``mlflow models serve`` builds an environment that runs it (the project's code travels in
    the model's ``code`` folder)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        specs = [Requirement(r) for r in requires(DISTRIBUTION) or []]
    except PackageNotFoundError:  # run from a source tree that was never installed
        specs = [Requirement(n) for n in ("torch", "monai", "numpy", "pandas", "zarr", "scipy", "mlflow", "nibabel",
                                          "pydicom", "pynrrd")]
    out = []
    for req in specs:
        if (req.marker is not None and "extra" in str(req.marker)) or req.name in _NOT_FOR_SERVING:
            continue
        try:
            out.append(f"{req.name}=={version(req.name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return out


def _project_code(into: Path) -> list[str]:
    """Copies of the project's packages (no caches) for the model's ``code`` folder."""
    import importlib
    import shutil

    paths = []
    for name in PROJECT_PACKAGES:
        source = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        paths.append(str(into / name))
    return paths


def log_cell_model(tracking_uri: str, run_id: str, checkpoint_dir: Path, meta: dict, example_store: str,
                   example_ids: list[str], register_as: str | None = None) -> str:
    """Save the cell's fold ensemble as a pyfunc model in its cell run (``model``); register it as
    `register_as` if given. Returns the model's URI."""
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
        signature = ModelSignature(Schema([ColSpec("string", "store", required=False),
                                           ColSpec("string", "patient_id", required=False),
                                           ColSpec("string", "images", required=False)]), inferred.outputs)
        path = Path(tmp) / "model"
        quiet = logging.getLogger("mlflow").level
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        try:
            mlflow.pyfunc.save_model(path, python_model=str(Path(__file__).with_name("pyfunc_model_code.py")),
                                     artifacts=artifacts, signature=signature, input_example=example,
                                     pip_requirements=_requirements(),
                                     code_paths=_project_code(Path(tmp) / "code"))
        finally:
            logging.getLogger("mlflow").setLevel(quiet)
        (path / MODEL_CARD).write_text(model_card(meta))
        MlflowClient(tracking_uri).log_artifacts(run_id, str(path), artifact_path=MODEL_PATH)
    uri = f"runs:/{run_id}/{MODEL_PATH}"
    if register_as and not _registered(tracking_uri, register_as, run_id):  # a resumed study logs it again
        mlflow.set_tracking_uri(tracking_uri)
        version = mlflow.register_model(uri, register_as)
        client = MlflowClient(tracking_uri)
        client.update_model_version(register_as, version.version, description=model_card(meta))
        for key, value in version_tags(meta).items():
            client.set_model_version_tag(register_as, version.version, key, value)
    return uri


MODEL_CARD = "model_card.md"  # beside MLmodel in the model's folder; also each registered version's description


def version_tags(meta: dict) -> dict[str, str]:
    """What a reader of a registered version needs at a glance (its tags)."""
    development = meta.get("development", {})
    headline = meta.get("headline", {})
    tags = {"study": meta["study"], "cell": meta["cell"], "task": meta["task"], "inputs": meta["inputs"],
            "development_store_sha256": str(development.get("store_sha256", "")),
            "development_patients": str(development.get("patients", "")),
            "preprocessing": json.dumps(meta.get("preprocessing", {}), sort_keys=True),
            "git_revision": str(meta.get("git_revision", ""))}
    if "value" in headline:
        tags["bbc_cindex"] = f"{headline['value']:.4f} [{headline['low']:.4f}, {headline['high']:.4f}]"
    return tags


def model_card(meta: dict) -> str:
    """The model card: what the model was trained on, how it scores, and what it must not be used for."""
    development = meta.get("development", {})
    headline = meta.get("headline", {})
    estimate = (f"{headline['value']:.3f} (95% CI {headline['low']:.3f}-{headline['high']:.3f}), BBC-CV, which pays "
                "for the search's choices" if "value" in headline else "not available (no headline estimate)")
    config = ", ".join(f"{k}={v}" for k, v in sorted((meta.get("configuration") or {}).items()))
    return f"""# Model card: {meta['study']} / {meta['cell']}

**What it is.** The fold ensemble ({meta['folds']} models of cross-validation) of the configuration selected
in cell `{meta['cell']}` of study `{meta['study']}`: task `{meta['task']}`, inputs `{meta['inputs']}`,
configuration {config or 'the reference recipe'}. It gives a deep prognostic index (DPI, the mean of the
folds' DPI; higher means shorter survival), a risk group (above the development median DPI
{meta.get('dpi_cutoff', float('nan')):+.4f}: high) and a survival curve at {len(meta['eval_times'])} times
(days {meta['eval_times'][0]:g}-{meta['eval_times'][-1]:g}).

**Trained on.** {development.get('patients', '?')} patients ({development.get('events', '?')} events) of the
development store (SHA-256 `{str(development.get('store_sha256', '?'))[:16]}...`), preoperative MRI
{', '.join(meta['sequences'])} preprocessed as `{json.dumps(meta.get('preprocessing', {}), sort_keys=True)}`;
code at commit `{meta.get('git_revision', 'unknown')}`.

**How well.** Concordance on the development patients: {estimate}. External validity is unknown
until the model is tested on another site's patients (`python -m analysis.report --study NAME --external STORE`).

**How to use it.** `python -m study.predict --model URI --images FOLDER --out OUT` preprocesses a folder of
new patients exactly as the development store was and writes the DPI, risk group, survival curve and
Grad-CAM map of each. The input must be preoperative {', '.join(meta['sequences'])} of an adult-type diffuse
glioma, converted with the same preprocessing.

**Not for.** Clinical decisions about an individual patient: it is a research model, not a medical
device, validated on no cohort but its own. Not for other tumours, post-operative or follow-up scans,
children, or sequences other than those above. A risk group is a split at the development median, not a
threshold chosen for any clinical purpose.
"""


def _registered(tracking_uri: str, name: str, run_id: str) -> bool:
    """Whether a version of registered model `name` already comes from the study run `run_id`."""
    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")
    return any(v.run_id == run_id for v in versions)
