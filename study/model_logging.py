"""Logging a cell's selected configuration as an MLflow model (`analysis.pyfunc_model.FoldEnsembleModel`,
the ensemble ``pyfunc`` that `study.predict` and the report load): its fold models and meta as
artifacts, the project's packages as its code, pinned requirements so that ``mlflow models serve``
builds an environment that runs it, a model card, and registration with --register-models. The
driver calls it at the end of a study (`study.driver.log_models`).
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from analysis import pyfunc_model
from analysis.study_reader import attach_folder
from datasets.cli import DISTRIBUTION
from evaluation import metric_names as names

PROJECT_PACKAGES = ("analysis", "datasets", "evaluation", "trainables", "study", "search_spaces")
_NOT_FOR_SERVING = {"ray"}  # the cluster runtime: a served model needs none of it (70 MB and its own dependencies)


def _requirements() -> list[str]:
    """The project's own dependencies, pinned to the versions that trained the model, so that
    ``mlflow models serve`` builds an environment that runs it (the project's code travels in
    the model's ``code`` folder)."""

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
        meta_file = Path(tmp) / names.MODEL_META_FILE
        meta_file.write_text(json.dumps(meta, indent=1))
        artifacts["meta"] = str(meta_file)
        example = pd.DataFrame({"store": [example_store] * len(example_ids), "patient_id": example_ids})
        model = pyfunc_model.FoldEnsembleModel()
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
            mlflow.pyfunc.save_model(path, python_model=str(Path(pyfunc_model.__file__).with_name("pyfunc_model_code.py")),
                                     artifacts=artifacts, signature=signature, input_example=example,
                                     pip_requirements=_requirements(),
                                     code_paths=_project_code(Path(tmp) / "code"))
        finally:
            logging.getLogger("mlflow").setLevel(quiet)
        (path / MODEL_CARD).write_text(model_card(meta))
        attach_folder(tracking_uri, run_id, path, names.MODEL_PATH)
    uri = f"runs:/{run_id}/{names.MODEL_PATH}"
    if register_as and not _registered(tracking_uri, register_as, run_id):  # a resumed study logs it again
        mlflow.set_tracking_uri(tracking_uri)
        registered = mlflow.register_model(uri, register_as)
        client = MlflowClient(tracking_uri)
        client.update_model_version(register_as, registered.version, description=model_card(meta))
        for key, value in version_tags(meta).items():
            client.set_model_version_tag(register_as, registered.version, key, value)
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
