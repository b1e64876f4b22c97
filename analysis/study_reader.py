"""Reading a tracked study back, the one reader of its records: MLflow's runs (study, cells, trials:
`evaluation.metric_names` names their tags, metrics and files), the study config, the cells' models,
what the search saw (the headline's replay), and the trials' files in Tune's storage (fold
checkpoints, exact configurations). The driver, the report, nested CV and prediction read through
it; `study.tracking.tracker` is the one writer."""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from datasets.clinical_features import IMAGE
from datasets.errors import InputError, StudyError
from datasets.remote import cache_root, download_folder, is_remote, list_folder
from evaluation import metric_names as names
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
        """By the study's criterion (`evaluation.metric_names.SELECTED_BY`), as the driver's selection
        (`study.results.summarise`), whatever order the runs are read in."""
        return names.ranks_above(self.metrics, self.trial_id, other.metrics, other.trial_id)

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
        return [t for t in self.trials if t.status == "FINISHED" and names.SELECTED_BY.name in t.metrics]

    def best_per_cell(self) -> dict[Cell, Trial]:
        """The finished trial that ranks first by the study's criterion in each cell, in the study's
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


# -- the MLflow layout (`study.tracking.tracker` writes it) ------------------------------------------
MAX_RUNS = 50000  # MLflow's largest page of runs


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def experiment_id(client, name: str) -> str | None:
    """The id of the study `name`'s MLflow experiment, or None if there is none."""
    experiment = client.get_experiment_by_name(name)
    return None if experiment is None else experiment.experiment_id


def runs_of(client, experiment: str, role: str, key: str | None = None) -> list:
    """The runs of one role (`names.STUDY_ROLE`, `CELL_ROLE`, `TRIAL_ROLE`) in an experiment; with
    `key`, only the cell run of that cell (`CELL_KEY_TAG`) or the trial runs whose key starts with
    ``KEY/`` (a cell's trials)."""
    query = names.role_filter(role)
    if key is not None and role == names.CELL_ROLE:
        query += f" and tags.{names.CELL_KEY_TAG} = '{key.replace(chr(39), '')}'"
    found = client.search_runs([experiment], query, max_results=MAX_RUNS)
    if key is not None and role == names.TRIAL_ROLE:
        found = [r for r in found if r.data.tags.get(names.TRIAL_KEY_TAG, "").startswith(f"{key}/")]
    return found


def run_outcome(run) -> str:
    """How a trial run ended (`names.outcome`'s words), from its tag, else from its MLflow status."""
    tagged = run.data.tags.get(names.OUTCOME_TAG)
    if tagged in (names.FINISHED, names.PRUNED, names.FAILED_OUTCOME):
        return tagged
    return {"FINISHED": names.FINISHED, "FAILED": names.FAILED_OUTCOME}.get(run.info.status, names.PRUNED)


def study_run_tags(tracking_uri: str, study_name: str) -> dict[str, str]:
    """The tags of a study's MLflow run, read without changing anything ({} if there is none)."""
    client = _client(tracking_uri)
    experiment = experiment_id(client, study_name)
    if experiment is None:
        return {}
    found = runs_of(client, experiment, names.STUDY_ROLE)
    return dict(found[0].data.tags) if found else {}


def cell_model_uri(tracking_uri: str, study_name: str, cell: str) -> str:
    """The MLflow URI of the model the study logged for `cell` (its cell run's `names.MODEL_PATH`)."""
    client = _client(tracking_uri)
    experiment = experiment_id(client, study_name)
    if experiment is None:
        raise InputError(f"--study {study_name}: no such study in {tracking_uri}")
    found = runs_of(client, experiment, names.CELL_ROLE, cell)
    if not found:
        cells = sorted(r.data.tags.get(names.CELL_KEY_TAG, "") for r in runs_of(client, experiment, names.CELL_ROLE))
        raise InputError(f"--cell {cell}: no such cell in study {study_name}; its cells: {cells}")
    return f"runs:/{found[0].info.run_id}/{names.MODEL_PATH}"


@dataclass
class SearchRecord:
    """What the search saw of one trial (`study.headline`): its scores at every rung it reached
    (epoch -> patient_id-indexed ``fold``, ``score``), when the driver saw each (epoch -> seconds),
    and, for a finished trial, its pooled out-of-fold predictions."""

    rungs: dict
    seen: dict
    final: pd.DataFrame | None


def search_records(client, experiment: str, cell: str) -> list[SearchRecord]:
    """The cell's trials that did not fail, in the order of their keys, as the search saw them."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in sorted(runs_of(client, experiment, names.TRIAL_ROLE, cell),
                          key=lambda r: r.data.tags.get(names.TRIAL_KEY_TAG, "")):
            ended = run_outcome(run)
            if ended == names.FAILED_OUTCOME:
                continue
            run_id = run.info.run_id
            rungs = {int(Path(a.path).stem.split("_")[-1]):
                     pd.read_csv(client.download_artifacts(run_id, a.path, tmp)).set_index("patient_id")
                     for a in client.list_artifacts(run_id, names.RUNG_FOLDER)}
            seen = {int(m.step): m.value for m in client.get_metric_history(run_id, names.RUNG_SEEN.name)}
            final = pd.read_csv(client.download_artifacts(run_id, names.OOF_FILE, tmp)) \
                if ended == names.FINISHED else None
            out.append(SearchRecord(rungs, seen, final))
    return out


def read_study(name: str, tracking_uri: str) -> Study:
    """Load a study's parent run, config and trial runs from MLflow."""
    client = _client(tracking_uri)
    experiment = experiment_id(client, name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise InputError(f"no study called {name!r} in {tracking_uri}; studies there: {known}")
    parents = runs_of(client, experiment, names.STUDY_ROLE)
    if not parents:
        raise ReportError(f"experiment {name!r} has no study run (was it made by python -m study.run?)")
    parent = parents[0]
    config = json.loads(_artifact_text(client, parent.info.run_id, names.CONFIG_FILE))
    trials = [Trial(r.info.run_id, r.data.tags.get("backbone", ""), r.data.tags.get("task", ""),
                    r.data.tags.get("trial_id", ""), r.info.status, dict(r.data.params), dict(r.data.metrics),
                    r.info.start_time or 0, r.data.tags.get("inputs", IMAGE))
              for r in runs_of(client, experiment, names.TRIAL_ROLE)]
    trials.sort(key=lambda t: t.start_time)
    cell_runs = [r for r in runs_of(client, experiment, names.CELL_ROLE) if r.data.tags.get(names.CELL_KEY_TAG)]
    cells = {r.data.tags[names.CELL_KEY_TAG]: dict(r.data.metrics) for r in cell_runs}
    cell_ids = {r.data.tags[names.CELL_KEY_TAG]: r.info.run_id for r in cell_runs}
    study = Study(name, tracking_uri, parent.info.run_id, config, trials, dict(parent.data.metrics), cells, cell_ids)
    if not study.finished():
        raise ReportError(f"study {name!r} has no finished trial yet ({len(trials)} trial runs); "
                          "run or resume it with python -m study.run --name " + name)
    return study


def _artifact_text(client, run_id: str, name: str) -> str:
    """An artifact's text, downloaded into a temporary folder that is removed afterwards."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file otherwise

    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, name, dst_path=tmp)).read_text()


def oof_predictions(study: Study, trial: Trial) -> pd.DataFrame:
    """The trial's out-of-fold predictions (the CSV logged to its MLflow run)."""
    return pd.read_csv(io.StringIO(_artifact_text(_client(study.tracking_uri), trial.run_id, names.OOF_FILE)))


def logged_model_meta(study: Study, cell: str) -> dict | None:
    """The record (`names.MODEL_META`) of the model the study logged for a cell, or None (not logged,
    or a study made before cells had runs)."""
    run_id = study.cell_run_ids.get(cell)
    if run_id is None:
        return None
    try:
        return json.loads(_artifact_text(_client(study.tracking_uri), run_id, names.MODEL_META))
    except Exception:  # no model logged (the tracking store was down at the end of the study), or another layout
        return None


def attach_folder(tracking_uri: str, run_id: str, folder: Path, artifact_path: str) -> None:
    """Copy a finished folder (a cell's model, the study's report) into a run's artifacts: the one
    write outside the driver's journalled tracker (`study.tracking.tracker`), for files made after
    the run's records were delivered."""
    _client(tracking_uri).log_artifacts(run_id, str(folder), artifact_path=artifact_path)
