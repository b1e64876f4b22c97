"""MLflow tracking from the driver only (the single writer; see ARCHITECTURE decision 1).

One MLflow experiment per study holds a parent run (the study: tags, resolved config and
manifest, results table) and one nested run per trial (params = its configuration; per-epoch
``cv_cindex``/``train_loss``/per-fold C-index as step series; the final CV metrics with their CI;
``oof_predictions.csv`` and ``learning_curve.png``). Trial status: FINISHED, KILLED (pruned by
ASHA, tagged ``pruned_at_epoch``) or FAILED (tagged ``failure_reason``); a trial restarted from its
checkpoint after losing its worker keeps its run and is tagged ``restarts``.

Runs are found again by tags (``study_role``, ``trial_key``), so a resumed study reuses its parent
run and never duplicates a trial run.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from datasets.errors import StudyError
from trainables.cross_validation import CURVE_FILE, OOF_FILE

# Final metrics of a finished trial (logged once, without a step).
FINAL_METRICS = ("cindex", "cindex_low", "cindex_high", "cindex_fold_mean", "cindex_fold_sd", "brier_365", "ibs",
                 "uno_c", "auc_365")
EPOCH_METRICS = ("cv_cindex", "train_loss", "fold_epochs")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StudyTracker:
    """The study's MLflow experiment and parent run; picklable (the client is made lazily)."""

    def __init__(self, tracking_uri: str, study_name: str):
        self.tracking_uri, self.study_name = tracking_uri, study_name
        self._client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _artifact_location(self) -> str | None:
        if self.tracking_uri.startswith("sqlite:///"):
            return (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").absolute().as_uri()
        return None

    def check(self, timeout_s: float = 10.0) -> None:
        """Reach the tracking store once (raises if it is down or unwritable).

        A server is probed with one short request first: MLflow's client would otherwise retry
        with back-off for minutes before failing.
        """
        if self.tracking_uri.startswith(("http://", "https://")):
            import requests

            requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        self.client.search_experiments(max_results=1)

    def start(self, tags: dict[str, str], params: dict[str, Any], files: dict[str, str]) -> str:
        """Create or reuse the study's parent run; returns its id."""
        experiment = self.client.get_experiment_by_name(self.study_name)
        if experiment is None:
            # The kind tag makes MLflow 3's UI open the experiment in its model-training view.
            self.experiment_id = self.client.create_experiment(
                self.study_name, self._artifact_location(), tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = experiment.experiment_id
        found = self.client.search_runs([self.experiment_id], "tags.study_role = 'study'", max_results=1)
        if found:
            logged = found[0].data.params
            changed = {k: (logged[k], str(v)[:6000]) for k, v in params.items() if k in logged and logged[k] != str(v)[:6000]}
            if changed:
                details = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items()))
                raise StudyError(f"study {self.study_name!r} already exists with other settings ({details}); "
                                 "resume it with its original settings or choose another --name")
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                         tags={"study_role": "study", **tags})
            self.parent_run_id = run.info.run_id
            self.client.log_batch(self.parent_run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
                self.client.log_artifact(self.parent_run_id, str(Path(tmp) / name))
        return self.parent_run_id

    def trial_run(self, key: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The run of a trial, created on first sight and found again after a resume."""
        if key in self._trial_runs:
            return self._trial_runs[key]
        found = self.client.search_runs([self.experiment_id], f"tags.trial_key = '{key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
                "mlflow.parentRunId": self.parent_run_id, "study_role": "trial", "trial_key": key, **tags})
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
        self._trial_runs[key] = run_id
        return run_id

    def log_metrics(self, run_id: str, values: dict[str, Any], step: int = 0) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if _finite(v)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def finish_parent(self, status: str, files: dict[str, Path]) -> None:
        for path in files.values():
            self.client.log_artifact(self.parent_run_id, str(path))
        self.client.set_terminated(self.parent_run_id, status=status)


class MlflowTrialCallback(tune.Callback):
    """Tune callback logging one cell's trials as nested runs of the study run."""

    def __init__(self, tracker: StudyTracker, backbone: str, task: str, max_epochs: int):
        self.tracker, self.backbone, self.task, self.max_epochs = tracker, backbone, task, max_epochs
        self.cell = f"{backbone}__{task}"

    def _run(self, trial) -> str:
        return self.tracker.trial_run(f"{self.cell}/{trial.trial_id}", f"{self.backbone}/{self.task}/{trial.trial_id}",
                                      trial.config, {"backbone": self.backbone, "task": self.task,
                                                     "trial_id": trial.trial_id})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        per_epoch = {k: result.get(k) for k in EPOCH_METRICS}
        per_epoch.update({k: v for k, v in result.items() if k.startswith("fold") and k.endswith("_cindex")})
        self.tracker.log_metrics(run_id, per_epoch, step=epoch)
        if result.get("final"):
            self.tracker.log_metrics(run_id, {k: result.get(k) for k in FINAL_METRICS})

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        last = trial.last_result or {}
        client = self.tracker.client
        if last.get("failed"):
            client.set_tag(run_id, "failure_reason", str(last["failed"])[-4000:])
            client.set_terminated(run_id, status="FAILED")
            print(f"  {self.cell}: trial {trial.trial_id} FAILED: {last['failed']}", flush=True)
        elif last.get("final"):
            checkpoint = trial.checkpoint
            if checkpoint is not None:
                with checkpoint.as_directory() as directory:
                    for name in (OOF_FILE, CURVE_FILE):
                        if (Path(directory) / name).exists():
                            client.log_artifact(run_id, str(Path(directory) / name))
            client.set_terminated(run_id, status="FINISHED")
            print(f"  {self.cell}: trial {trial.trial_id} finished, CV C-index {last.get('cindex', float('nan')):.3f} "
                  f"[{last.get('cindex_low', float('nan')):.3f}, {last.get('cindex_high', float('nan')):.3f}]", flush=True)
        else:
            epoch = last.get("epoch", 0)
            client.set_tag(run_id, "pruned_at_epoch", str(epoch))
            client.set_terminated(run_id, status="KILLED")
            print(f"  {self.cell}: trial {trial.trial_id} pruned by ASHA after epoch {epoch} "
                  f"(CV C-index {last.get('cv_cindex', float('nan')):.3f})", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune restarts the trial from its last checkpoint (FailureConfig): same run, counted.
        run_id = self._run(trial)
        error = trial.get_error() if hasattr(trial, "get_error") else None
        reason = str(error).strip().splitlines()[-1] if error is not None and str(error).strip() else "worker lost"
        self.tracker.client.set_tag(run_id, "restarts", str(trial.num_failures))
        self.tracker.client.set_tag(run_id, "last_restart_reason", reason[-4000:])
        print(f"  {self.cell}: trial {trial.trial_id} lost its worker ({reason[:200]}); restarting from its last "
              f"checkpoint (restart {trial.num_failures})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        error = trial.get_error() if hasattr(trial, "get_error") else None
        reason = str(error) if error is not None else "unknown error"
        self.tracker.client.set_tag(run_id, "failure_reason", reason[-4000:])
        self.tracker.client.set_terminated(run_id, status="FAILED")
        print(f"  {self.cell}: trial {trial.trial_id} FAILED: {reason.strip().splitlines()[-1] if reason.strip() else ''}",
              flush=True)
