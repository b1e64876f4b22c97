"""Reading a tracked study back: MLflow runs, the study config, and the trials' files in Tune's
storage (fold checkpoints, exact configurations)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from evaluation import metric_names as names
from datasets.clinical_features import IMAGE
from datasets.errors import InputError, StudyError
from datasets.remote import cache_root, download_folder, is_remote, list_folder
from search_spaces import Cell, cell_name


class ReportError(StudyError):
    """The study cannot be reported on (unknown name, no finished trials, missing files)."""


@dataclass
class Trial:
    run_id: str
    backbone: str
    task: str
    trial_id: str
    status: str
    params: dict
    metrics: dict
    start_time: int = 0
    inputs: str = IMAGE

    def ranks_above(self, other: "Trial") -> bool:
        """Higher pooled out-of-fold C-index; a tie goes to the lower trial id, as in the driver's
        selection (`study.results.summarise`), whatever order the runs are read in."""
        return names.ranks_above(self.oof_cindex, self.trial_id, other.oof_cindex, other.trial_id)

    @property
    def cell(self) -> str:
        return cell_name(self.backbone, self.task, self.inputs)

    @property
    def oof_cindex(self) -> float:
        return self.metrics[names.OOF_CINDEX.name]


@dataclass
class Study:
    name: str
    tracking_uri: str
    parent_run_id: str
    config: dict
    trials: list[Trial] = field(default_factory=list)
    study_metrics: dict = field(default_factory=dict)  # the study run's metrics (older studies: per cell)
    cell_runs: dict = field(default_factory=dict)  # cell name -> the metrics of its cell run
    cell_run_ids: dict = field(default_factory=dict)  # cell name -> its cell run's id

    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status == "FINISHED" and names.OOF_CINDEX.name in t.metrics]

    def best_per_cell(self) -> dict[Cell, Trial]:
        """The finished trial with the highest pooled out-of-fold C-index in each cell, in the study's
        order (task, inputs, backbone)."""
        best: dict[Cell, Trial] = {}
        for trial in self.finished():
            key = Cell(trial.backbone, trial.task, trial.inputs)
            if key not in best or trial.ranks_above(best[key]):
                best[key] = trial
        return dict(sorted(best.items(), key=lambda kv: (kv[0].task, kv[0].inputs, kv[0].backbone)))

    def cell_metric(self, cell: str, metric: names.MetricName) -> float | None:
        """A cell's metric (e.g. its BBC-CV C-index) from its cell run, or, for a study made before
        cells had runs, from the study run's ``CELL.METRIC``; None if absent."""
        if cell in self.cell_runs:
            return self.cell_runs[cell].get(metric.name)
        return self.study_metrics.get(names.cell_metric(cell, metric))

    def trial_dir(self, trial: Trial) -> Path:
        """The trial's folder in Tune's storage (downloaded once if the storage is remote)."""
        storage = self.config["storage_path"]
        if is_remote(storage):
            experiment_uri = f"{storage.rstrip('/')}/{self.config['name']}/{names.EXPERIMENT}"
            found = [n for n in list_folder(experiment_uri) if trial.trial_id in n]
            if not found:
                raise ReportError(f"no folder for trial {trial.trial_id} under {experiment_uri}")
            local = cache_root().parent / "trials" / self.name / found[0]
            if not (local / "params.json").exists():
                download_folder(f"{experiment_uri}/{found[0]}", local)
            return local
        experiment = Path(storage) / self.config["name"] / names.EXPERIMENT
        matches = sorted(experiment.glob(f"*{trial.trial_id}*"))
        if not matches:
            raise ReportError(f"no folder for trial {trial.trial_id} under {experiment}")
        return matches[0]

    def checkpoint_dir(self, trial: Trial) -> Path:
        checkpoints = sorted(self.trial_dir(trial).glob("checkpoint_*"))
        if not checkpoints:
            raise ReportError(f"trial {trial.trial_id} has no checkpoint in {self.trial_dir(trial)}")
        return checkpoints[-1]

    def trial_config(self, trial: Trial) -> dict:
        """The trial's configuration with its types (Tune's params.json)."""
        return json.loads((self.trial_dir(trial) / "params.json").read_text())


def read_study(name: str, tracking_uri: str) -> Study:
    """Load a study's parent run, config and trial runs from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise InputError(f"no study called {name!r} in {tracking_uri}; studies there: {known}")
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get(names.ROLE_TAG) == names.STUDY_ROLE]
    if not parents:
        raise ReportError(f"experiment {name!r} has no study run (was it made by python -m study.run?)")
    parent = parents[0]
    config = json.loads(_artifact_text(client, parent.info.run_id, names.CONFIG_FILE))
    trials = [Trial(r.info.run_id, r.data.tags.get("backbone", ""), r.data.tags.get("task", ""),
                    r.data.tags.get("trial_id", ""), r.info.status, dict(r.data.params), dict(r.data.metrics),
                    r.info.start_time or 0, r.data.tags.get("inputs", IMAGE))
              for r in runs if r.data.tags.get(names.ROLE_TAG) == names.TRIAL_ROLE]
    trials.sort(key=lambda t: t.start_time)
    cells = {r.data.tags[names.CELL_KEY_TAG]: dict(r.data.metrics) for r in runs
             if r.data.tags.get(names.ROLE_TAG) == names.CELL_ROLE and r.data.tags.get(names.CELL_KEY_TAG)}
    cell_ids = {r.data.tags[names.CELL_KEY_TAG]: r.info.run_id for r in runs
                if r.data.tags.get(names.ROLE_TAG) == names.CELL_ROLE and r.data.tags.get(names.CELL_KEY_TAG)}
    study = Study(name, tracking_uri, parent.info.run_id, config, trials, dict(parent.data.metrics), cells, cell_ids)
    if not study.finished():
        raise ReportError(f"study {name!r} has no finished trial yet ({len(trials)} trial runs); "
                          "run or resume it with python -m study.run --name " + name)
    return study


def _artifact_text(client, run_id: str, name: str) -> str:
    """An artifact's text, downloaded into a temporary folder that is removed afterwards."""
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file otherwise

    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, name, dst_path=tmp)).read_text()


def oof_predictions(study: Study, trial: Trial) -> pd.DataFrame:
    """The trial's out-of-fold predictions (the CSV logged to its MLflow run)."""
    import io

    from mlflow.tracking import MlflowClient

    return pd.read_csv(io.StringIO(_artifact_text(MlflowClient(study.tracking_uri), trial.run_id, "oof_predictions.csv")))


def logged_model_meta(study: Study, cell: str) -> dict | None:
    """The record (``meta.json``) of the model the study logged for a cell, or None (not logged, or a
    study made before cells had runs)."""
    from mlflow.tracking import MlflowClient

    run_id = study.cell_run_ids.get(cell)
    if run_id is None:
        return None
    try:
        return json.loads(_artifact_text(MlflowClient(study.tracking_uri), run_id, "model/artifacts/meta.json"))
    except Exception:  # no model logged (the tracking store was down at the end of the study), or another layout
        return None

