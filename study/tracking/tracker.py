"""MLflow tracking from the driver only (the single writer; see ARCHITECTURE decision 1).

One MLflow experiment per study holds a parent run (the study: tags, resolved config and
manifest, results table, each cell's selected configuration as ``CELL.METRIC`` metrics) and one
nested run per trial (params = its configuration; the per-epoch metrics of
`analysis.metric_names.EPOCH_METRICS` and each fold's validation C-index as step series; the
final metrics of `FINAL_METRICS` with their CI; ``oof_predictions.csv`` and ``learning_curve.png``).
Trial status: FINISHED, KILLED (pruned by ASHA, tagged ``pruned_at_epoch``) or FAILED (tagged
``failure_reason``); a trial restarted from its checkpoint after losing its worker keeps its run
and is tagged ``restarts``.

Runs are found again by tags (``study_role``, ``trial_key``), so a resumed study reuses its parent
run and never duplicates a trial run. Records go through a journal on the storage path first, so
a tracking server that goes down mid-study loses nothing: the study goes on, and the records are
delivered when it is back (or by ``--resume`` if it stayed down past the end of the study).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

from analysis import metric_names as names
from datasets.errors import StudyError
from search_spaces import Cell
from study.resume_trust import TAG_PREFIX as RESUME_TAG_PREFIX


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TrackingUnavailable(StudyError):
    """The tracking store could not take a record (server down, network, disk)."""


# The driver's live tracker per study: Tune pickles callbacks into its experiment state and
# unpickles them on restore; they must resolve to this one instance (one journal writer).
_LIVE: dict[tuple[str, str], StudyTracker] = {}


class StudyTracker:
    """The study's MLflow experiment and parent run, and a journal that outlives tracking outages.

    Every record about a trial (its run, metrics, tags, artifacts, end) and the parent run's
    end is appended to a JSON-lines journal first and delivered from it in order. If the tracking
    store is unreachable, records wait in the journal (artifacts copied beside it) while the
    study goes on; delivery is retried every `retry_s` seconds and at the end of the study; a
    later run of the study (``--resume``) delivers whatever is left.
    """

    def __init__(self, tracking_uri: str, study_name: str, journal: Path | None = None, retry_s: float = 15.0):
        self.tracking_uri, self.study_name, self.retry_s = tracking_uri, study_name, retry_s
        self.journal = Path(journal) if journal is not None else None
        self._client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._pending: list[dict] = []
        self._down_since: float | None = None
        self._last_try = 0.0
        self.seconds = 0.0  # spent talking to the tracking store (the study's tracking overhead)
        if self.journal is not None and self.journal.exists():
            self._pending = [json.loads(line) for line in self.journal.read_text().splitlines() if line.strip()]
        _LIVE[(tracking_uri, study_name)] = self

    def __reduce__(self):
        return _live_tracker, (self.tracking_uri, self.study_name, str(self.journal) if self.journal else None)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def pending(self) -> int:
        """Records not yet delivered to the tracking store."""
        return len(self._pending)

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
        """Create or reuse the study's parent run, then deliver what an earlier run left in the journal."""
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
        if self._pending:
            print(f"  delivering {len(self._pending)} tracking records left by an earlier run of the study", flush=True)
            self.flush(force=True)
        return self.parent_run_id

    # -- records (journalled, delivered in order) -------------------------------------------

    def record(self, op: str, key: str | None = None, **fields: Any) -> None:
        """Queue one record (``key``: the trial's key; None: the parent run) and try to deliver."""
        entry = {"op": op, "key": key, **fields}
        if op == "artifact":
            entry["path"] = self._keep_artifact(Path(fields["path"]))
        self._pending.append(entry)
        if self.journal is not None:
            with open(self.journal, "a") as out:
                out.write(json.dumps(entry) + "\n")
        self.flush()

    def trial_run(self, key: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        if key not in self._trial_runs:
            self.record("trial", key, run_name=run_name, params={k: str(v) for k, v in params.items()}, tags=tags)

    def log_metrics(self, key: str | None, values: dict[str, Any], step: int = 0) -> None:
        values = {k: float(v) for k, v in values.items() if _finite(v)}
        if values:
            self.record("metrics", key, values=values, step=step, timestamp=int(time.time() * 1000))

    def set_tags(self, key: str | None, tags: dict[str, str]) -> None:
        self.record("tags", key, tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, key: str | None, path: Path) -> None:
        self.record("artifact", key, path=str(path))

    def terminate(self, key: str | None, status: str) -> None:
        self.record("terminate", key, status=status)

    def finish_parent(self, status: str, files: dict[str, Path]) -> None:
        for path in files.values():
            self.log_artifact(None, path)
        self.terminate(None, status)

    def flush(self, force: bool = False) -> bool:
        """Deliver queued records in order; False if the store is unreachable (they stay queued).

        While the store is down, delivery is tried at most every `retry_s` seconds, so an outage
        costs the study's event loop one failed request per interval, not one per record.
        """
        if not self._pending:
            return True
        if self._down_since is not None and not force and time.monotonic() - self._last_try < self.retry_s:
            return False
        self._last_try = time.monotonic()
        delivered = 0
        try:
            while delivered < len(self._pending):
                self._apply(self._pending[delivered])
                delivered += 1
        except TrackingUnavailable as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                print(f"  tracking store {self.tracking_uri} unreachable ({exc}); the study goes on and its records "
                      f"wait in {self.journal or 'memory'}", flush=True)
            return False
        finally:
            if delivered:
                self._drop_delivered(delivered)
        if self._down_since is not None:
            print(f"  tracking store {self.tracking_uri} is back after {time.monotonic() - self._down_since:.0f} s; "
                  "queued records delivered", flush=True)
            self._down_since = None
        return True

    def catch_up(self, timeout_s: float) -> bool:
        """Retry delivery until everything is delivered or `timeout_s` has passed."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.retry_s, max(0.0, deadline - time.monotonic())))
        return True

    def _drop_delivered(self, count: int) -> None:
        for entry in self._pending[:count]:
            if entry["op"] == "artifact" and self.journal is not None:
                shutil.rmtree(Path(entry["path"]).parent, ignore_errors=True)
        self._pending = self._pending[count:]
        if self.journal is not None:
            tmp = self.journal.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self._pending))
            os.replace(tmp, self.journal)

    def _keep_artifact(self, path: Path) -> str:
        """Copy an artifact beside the journal: Tune may delete its checkpoint before delivery."""
        if self.journal is None:
            return str(path)
        folder = self.journal.parent / f"{self.journal.name}.files" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        shutil.copy2(path, folder / path.name)
        return str(folder / path.name)

    def _run_id(self, key: str | None) -> str:
        if key is None:
            return self.parent_run_id
        if key not in self._trial_runs:
            found = self.client.search_runs([self.experiment_id], f"tags.trial_key = '{key}'", max_results=1)
            if not found:
                raise KeyError(f"no trial run {key!r} in study {self.study_name!r}")
            self._trial_runs[key] = found[0].info.run_id
        return self._trial_runs[key]

    def _apply(self, entry: dict) -> None:
        started = time.perf_counter()
        try:
            self._deliver(entry)
        finally:
            self.seconds += time.perf_counter() - started

    def _deliver(self, entry: dict) -> None:
        try:
            op, key = entry["op"], entry["key"]
            if op == "trial":
                if key in self._trial_runs:
                    return
                found = self.client.search_runs([self.experiment_id], f"tags.trial_key = '{key}'", max_results=1)
                if found:
                    self._trial_runs[key] = found[0].info.run_id
                    return
                run = self.client.create_run(self.experiment_id, run_name=entry["run_name"], tags={
                    "mlflow.parentRunId": self.parent_run_id, "study_role": "trial", "trial_key": key, **entry["tags"]})
                self._trial_runs[key] = run.info.run_id
                self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(entry["params"].items())])
            elif op == "metrics":
                self.client.log_batch(self._run_id(key), metrics=[
                    Metric(k, v, entry["timestamp"], entry["step"]) for k, v in entry["values"].items()])
            elif op == "tags":
                # Digests that vouch for Tune's state files come only from the driver, never through the
                # journal, which may sit on the storage path they protect (`study.resume_trust`).
                tags = [RunTag(k, v) for k, v in entry["tags"].items() if not k.startswith(RESUME_TAG_PREFIX)]
                self.client.log_batch(self._run_id(key), tags=tags)
            elif op == "artifact":
                if Path(entry["path"]).exists():
                    self.client.log_artifact(self._run_id(key), entry["path"])
            elif op == "terminate":
                self.client.set_terminated(self._run_id(key), status=entry["status"])
            else:
                raise ValueError(f"unknown tracking record {op!r}")
        except (ConnectionError, OSError, MlflowException) as exc:
            if isinstance(exc, MlflowException) and not _unreachable(exc):
                raise
            raise TrackingUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


# MLflow's error codes of a server that is busy or briefly away: a locked database and HTTP 503
# (TEMPORARILY_UNAVAILABLE), HTTP 504 (DEADLINE_EXCEEDED), HTTP 429 (RESOURCE_EXHAUSTED).
TRANSIENT_ERROR_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})


def _unreachable(exc: MlflowException) -> bool:
    """A lost or busy tracking server (the record waits in the journal) rather than a request the
    server refused (raised). MLflow raises MlflowException for both; they differ in its error code
    and in what it wraps: MLflow re-raises a network error of `requests` as a plain MlflowException
    whose cause or context is the original error."""
    if exc.error_code in TRANSIENT_ERROR_CODES:
        return True
    wrapped, depth = exc.__cause__ or exc.__context__, 0
    while wrapped is not None and depth < 8:
        if isinstance(wrapped, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
            return True
        wrapped, depth = wrapped.__cause__ or wrapped.__context__, depth + 1
    return False


def _live_tracker(tracking_uri: str, study_name: str, journal: str | None) -> StudyTracker:
    return _LIVE.get((tracking_uri, study_name)) or StudyTracker(tracking_uri, study_name, journal)


# How a trial run ended: "finished", "pruned" (stopped by ASHA; status KILLED) or "failed".
OUTCOME_TAG = "outcome"


class MlflowTrialCallback(tune.Callback):
    """Tune callback logging every trial as a nested run of the study run (via the journal)."""

    def __init__(self, tracker: StudyTracker, max_epochs: int):
        self.tracker, self.max_epochs = tracker, max_epochs
        self._nodes: dict[str, str] = {}  # trial key -> Ray node id last reported
        self._logged_epoch: dict[str, int] = {}  # trial key -> last epoch logged

    @staticmethod
    def _cell(trial) -> str:
        return Cell.of(trial.config).name

    @staticmethod
    def _run_name(trial) -> str:
        return f"{Cell.of(trial.config).label}/{trial.trial_id}"

    def _key(self, trial) -> str:
        cell = Cell.of(trial.config)
        key = f"{cell.name}/{trial.trial_id}"
        self.tracker.trial_run(key, self._run_name(trial), trial.config,
                               {"backbone": cell.backbone, "task": cell.task, "inputs": cell.inputs,
                                "trial_id": trial.trial_id})
        return key

    def _outcome(self, key: str, trial, outcome: str, suffix: str = "") -> None:
        """Tag how the trial ended and say it first in the run's name: in the MLflow UI a pruned run
        (status KILLED) and a failed one (FAILED) both show a red cross, and the runs table cuts long
        names at the right."""
        self.tracker.set_tags(key, {OUTCOME_TAG: outcome,
                                    "mlflow.runName": (f"{suffix} " if suffix else "") + self._run_name(trial)})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._key(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = self._key(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        per_epoch = {m.name: result.get(m.name) for m in names.EPOCH_METRICS}
        per_epoch.update({k: v for k, v in result.items() if k.startswith("fold") and k.endswith("_val_cindex")})
        # A trial restarted from its checkpoint may repeat the epoch whose result reached the driver
        # just before its worker died (Tune reports at least once): log each epoch once.
        if epoch > self._logged_epoch.get(key, 0):
            self.tracker.log_metrics(key, per_epoch, step=epoch)
            self._logged_epoch[key] = epoch
        if result.get("node_id") and self._nodes.get(key) != result["node_id"]:
            self._nodes[key] = result["node_id"]
            self.tracker.set_tags(key, {"node_id": result["node_id"]})
        if result.get(names.FINAL):
            self.tracker.log_metrics(key, {m.name: result.get(m.name) for m in names.FINAL_METRICS})

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = self._key(trial)
        last = trial.last_result or {}
        tracker = self.tracker
        if last.get(names.FAILED):
            tracker.set_tags(key, {"failure_reason": str(last[names.FAILED])[-4000:]})
            self._outcome(key, trial, "failed", "FAILED")
            tracker.terminate(key, "FAILED")
            print(f"  {self._cell(trial)}: trial {trial.trial_id} FAILED: {last['failed']}", flush=True)
        elif last.get(names.FINAL):
            checkpoint = trial.checkpoint
            if checkpoint is not None:
                with checkpoint.as_directory() as directory:
                    for name in (names.OOF_FILE, names.CURVE_FILE):
                        if (Path(directory) / name).exists():
                            tracker.log_artifact(key, Path(directory) / name)
            self._outcome(key, trial, "finished")
            tracker.terminate(key, "FINISHED")
            collapsed = int(last.get(names.FOLDS_COLLAPSED.name, 0) or 0)
            print(f"  {self._cell(trial)}: trial {trial.trial_id} finished, out-of-fold C-index "
                  f"{last.get(names.OOF_CINDEX.name, math.nan):.3f} [{last.get(names.OOF_CINDEX_LOW.name, math.nan):.3f}, "
                  f"{last.get(names.OOF_CINDEX_HIGH.name, math.nan):.3f}]"
                  + (f"; {collapsed} fold(s) learned nothing" if collapsed else ""), flush=True)
        else:
            epoch = last.get("epoch", 0)
            tracker.set_tags(key, {"pruned_at_epoch": str(epoch)})
            self._outcome(key, trial, "pruned", f"pruned@{epoch}")
            tracker.terminate(key, "KILLED")
            print(f"  {self._cell(trial)}: trial {trial.trial_id} pruned by ASHA after epoch {epoch} "
                  f"(mean validation C-index of the folds at that epoch {last.get(names.EPOCH_CINDEX.name, math.nan):.3f})", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune restarts the trial from its last checkpoint (FailureConfig): same run, counted.
        key = self._key(trial)
        error = trial.get_error() if hasattr(trial, "get_error") else None
        reason = str(error).strip().splitlines()[-1] if error is not None and str(error).strip() else "worker lost"
        self.tracker.set_tags(key, {"restarts": str(trial.num_failures), "last_restart_reason": reason[-4000:]})
        print(f"  {self._cell(trial)}: trial {trial.trial_id} lost its worker ({reason[:200]}); restarting from its last "
              f"checkpoint (restart {trial.num_failures})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = self._key(trial)
        error = trial.get_error() if hasattr(trial, "get_error") else None
        reason = str(error) if error is not None else "unknown error"
        self.tracker.set_tags(key, {"failure_reason": reason[-4000:]})
        self._outcome(key, trial, "failed", "FAILED")
        self.tracker.terminate(key, "FAILED")
        print(f"  {self._cell(trial)}: trial {trial.trial_id} FAILED: {reason.strip().splitlines()[-1] if reason.strip() else ''}",
              flush=True)

    def on_experiment_end(self, trials, **info):
        self.tracker.flush(force=True)
