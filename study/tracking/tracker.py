"""MLflow tracking from the driver only (the single writer; docs/architecture.md, decision 1).

One MLflow experiment per study holds a parent run (the study: tags, resolved config and
manifest, results table, the cells' comparison figure), one nested run per cell (tags
``backbone``, ``task``, ``inputs``; params = the selected configuration; the same metric names in
every cell, `evaluation.metric_names.CELL_METRICS`, so MLflow's runs table sorts and groups cells
and its charts compare them), and under each cell one nested run per trial (params = its
configuration; the per-epoch metrics of
`evaluation.metric_names.EPOCH_METRICS` and each fold's validation C-index as step series; the
final metrics of `FINAL_METRICS` with their CI; ``oof_predictions.csv`` and ``learning_curve.png``).
Trial status: FINISHED, KILLED (pruned by ASHA, tagged ``pruned_at_epoch``) or FAILED (tagged
``failure_reason``); a trial restarted from its checkpoint after losing its worker keeps its run
and is tagged ``restarts``.

Runs are found again by tags (``study_role``, ``cell_key``, ``trial_key``), so a resumed study
reuses its parent and cell runs and never duplicates a trial run. Records go through a journal on the storage path first, so
a tracking server that goes down mid-study loses nothing: the study goes on, and the records are
delivered when it is back (or by ``--resume`` if it stayed down past the end of the study).
"""

from __future__ import annotations

import math
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

from evaluation import metric_names as names
from datasets.errors import StudyError
from search_spaces import Cell
from study.resume_trust import TAG_PREFIX as RESUME_TAG_PREFIX
from study.tracking.journal import KEY_TAG, TrackingJournal, UntrustedJournal, sha256_file


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
    end is appended to the journal (`study.tracking.journal`: signed, flushed to disk) first and
    delivered from it in order. If the tracking store is unreachable, records wait in the journal
    while the study goes on; delivery is retried every `retry_s` seconds and at the end of the
    study; a later run of the study (``--resume``) delivers whatever is left.

    Delivery is at least once (a record is removed from the journal only after MLflow took it),
    so every record is idempotent: a trial's run is found by its ``trial_key`` tag before one is
    created (a second run that a retried request created is deleted) and its parameters are logged
    on every delivery of its record; metrics carry their step and the timestamp of their first
    recording (MLflow's SQL stores keep one row per key, value, step and timestamp); tags, artifacts
    (same path) and run ends overwrite themselves.

    `fault_hook`, when set (tests), is called with the name of every MLflow call and its number
    before the call is made.
    """

    def __init__(self, tracking_uri: str, study_name: str, journal: Path | None = None, retry_s: float = 15.0,
                 trust_storage: bool = False):
        self.tracking_uri, self.study_name, self.retry_s = tracking_uri, study_name, retry_s
        self.trust_storage = trust_storage
        self.journal = TrackingJournal(journal) if journal is not None else None
        self._client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}  # cell or trial key -> its run id
        self._announced: set[str] = set()  # trial keys whose run this driver has recorded
        self._pending: list[dict] = []
        self._down_since: float | None = None
        self._last_try = 0.0
        self._calls = 0
        self.fault_hook: Callable[[str, int], None] | None = None
        self.seconds = 0.0  # spent talking to the tracking store (the study's tracking overhead)
        self.models_waiting: list[str] = []  # cells whose model the store could not take (`study.driver.log_models`)
        _LIVE[(tracking_uri, study_name)] = self

    def __reduce__(self):
        return _live_tracker, (self.tracking_uri, self.study_name,
                               str(self.journal.path) if self.journal else None, self.trust_storage)

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
            requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        self.client.search_experiments(max_results=1)

    def start(self, tags: dict[str, str], params: dict[str, Any], files: dict[str, str]) -> str:
        """Create or reuse the study's parent run, then deliver what an earlier run left in the journal.

        A journal whose records the study's key does not vouch for is refused (`UntrustedJournal`)
        before anything changes in MLflow, unless the storage is trusted (``--trust-storage``)."""
        experiment = self.client.get_experiment_by_name(self.study_name)
        if experiment is None:
            # The kind tag makes MLflow 3's UI open the experiment in its model-training view.
            self.experiment_id = self.client.create_experiment(
                self.study_name, self._artifact_location(), tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = experiment.experiment_id
        values = {k: str(v)[:6000] for k, v in params.items()}
        found = self._find_run(names.role_filter(names.STUDY_ROLE))
        if found is not None:
            logged = found.data.params
            changed = {k: (logged[k], v) for k, v in values.items() if k in logged and logged[k] != v}
            if changed:
                details = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items()))
                raise StudyError(f"study {self.study_name!r} already exists with other settings ({details}); "
                                 "resume it with its original settings or choose another --name")
            key = found.data.tags.get(KEY_TAG) or secrets.token_hex(32)
            self._load_journal(key)
            self.parent_run_id = found.info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            tags = {**tags, KEY_TAG: key}
        else:
            key = secrets.token_hex(32)
            self._load_journal(key)
            run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                         tags={names.ROLE_TAG: names.STUDY_ROLE, KEY_TAG: key, **tags})
            self.parent_run_id = run.info.run_id
        # Logged on every start: a start that died between creating the run and this call left none.
        self.client.log_batch(self.parent_run_id, params=[Param(k, v) for k, v in values.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
                self.client.log_artifact(self.parent_run_id, str(Path(tmp) / name))
        if self._pending:
            print(f"  delivering {len(self._pending)} tracking records left by an earlier run of the study", flush=True)
            self.flush(force=True)
        return self.parent_run_id

    def _load_journal(self, key: str) -> None:
        """Take the journal's records that the study's key vouches for (all with --trust-storage)."""
        if self.journal is None:
            return
        self.journal.set_key(key)
        lines = self.journal.read()
        untrusted = [line.number for line in lines if not line.trusted]
        if untrusted and not self.trust_storage:
            shown = ", ".join(map(str, untrusted[:10])) + (" ..." if len(untrusted) > 10 else "")
            raise UntrustedJournal(
                f"the tracking journal {self.journal.path} holds {len(untrusted)} record(s) that this study's driver "
                f"did not write (line {shown}: no valid signature under the key kept in the study's MLflow run). "
                "They are not delivered: someone who can write the storage path could upload files or forge results "
                "through them. Find out who changed it; if only you can write the storage path (a journal left by a "
                "version of this tool without signatures), --resume --trust-storage delivers them, still only "
                "with artifacts from the journal's own folder.")
        records = []
        for line in lines:
            if line.record is None:
                print(f"  (tracking journal {self.journal.path}: line {line.number} is not a record; skipped)", flush=True)
                continue
            record = line.record if line.trusted else self._adopt(line.record)
            if record is not None:
                records.append(record)
        self._pending = records

    def _adopt(self, record: dict) -> dict | None:
        """A record the user vouched for (--trust-storage), signed with the study's key. An artifact
        record of an earlier version (an absolute ``path``) is kept only if it names a copy in the
        journal's own folder; any other is dropped, said."""
        record = {k: v for k, v in record.items() if k != "mac"}
        if record.get("op") == "artifact" and "file" not in record:
            path = Path(str(record.pop("path", "")))
            record["file"] = f"{path.parent.name}/{path.name}"
            kept = self.journal.files / record["file"]
            if path != kept or not kept.is_file() or kept.is_symlink():
                print(f"  (tracking record of artifact {str(path)[:200]!r} dropped: not a copy in {self.journal.files})",
                      flush=True)
                return None
            record["sha256"] = sha256_file(kept)
        return self.journal.sign(record)

    # -- records (journalled, delivered in order) -------------------------------------------

    def record(self, op: str, key: str | None = None, **fields: Any) -> None:
        """Queue one record (``key``: the trial's key; None: the parent run) and try to deliver."""
        entry = {"op": op, "key": key, **fields}
        if self.journal is not None:
            if op == "artifact":
                entry.update(self.journal.keep(Path(entry.pop("path"))))
            entry = self.journal.sign(entry)
            self.journal.append(entry)
        self._pending.append(entry)
        self.flush()

    def cell_run(self, key: str, run_name: str, tags: dict[str, str]) -> None:
        """A cell's run, nested under the study run (its trials' runs are nested under it)."""
        if key not in self._announced:
            self._announced.add(key)
            self.record("cell", key, run_name=run_name, tags=tags)

    def trial_run(self, key: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                  cell: str | None = None) -> None:
        """A trial's run, nested under its cell's run (`cell_run`; None: under the study run)."""
        if key not in self._announced:
            self._announced.add(key)
            self.record("trial", key, run_name=run_name, params={k: str(v) for k, v in params.items()}, tags=tags,
                        cell=cell)

    def cell_params(self, key: str, params: dict[str, Any]) -> None:
        """The cell's selected configuration as its run's params (MLflow's parallel coordinates)."""
        self.record("cell_params", key, params={k: str(v) for k, v in params.items()})

    def log_metrics(self, key: str | None, values: dict[str, Any], step: int = 0) -> None:
        values = {k: float(v) for k, v in values.items() if _finite(v)}
        if values:
            self.record("metrics", key, values=values, step=step, timestamp=int(time.time() * 1000))

    def set_tags(self, key: str | None, tags: dict[str, str]) -> None:
        self.record("tags", key, tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, key: str | None, path: Path, folder: str | None = None) -> None:
        """Upload a file into the run's artifacts (under `folder`, a plain name, if given)."""
        self.record("artifact", key, path=str(path), **({"folder": folder} if folder else {}))

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
                where = self.journal.path if self.journal is not None else "memory"
                print(f"  tracking store {self.tracking_uri} unreachable ({exc}); the study goes on and its records "
                      f"wait in {where}", flush=True)
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
        """Forget delivered records: the journal is rewritten first, then their artifact copies are
        deleted (a crash between the two leaves a copy, never a record without its file)."""
        delivered, self._pending = self._pending[:count], self._pending[count:]
        if self.journal is not None:
            self.journal.rewrite(self._pending)
            for entry in delivered:
                if entry["op"] == "artifact":
                    self.journal.discard(entry)

    # -- delivery ----------------------------------------------------------------------------

    def _call(self, name: str, *args, **kwargs):
        self._calls += 1
        if self.fault_hook is not None:
            self.fault_hook(name, self._calls)
        return getattr(self.client, name)(*args, **kwargs)

    def _find_run(self, query: str):
        """The run of this experiment matching `query`, the oldest if a retried request made two
        (the others are deleted: a create whose answer was lost and was sent again)."""
        runs = self._call("search_runs", [self.experiment_id], query, max_results=50)
        if not runs:
            return None
        runs = sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
        for extra in runs[1:]:
            self._call("delete_run", extra.info.run_id)
        return runs[0]

    def run_id(self, key: str | None) -> str:
        """The MLflow run of a cell or trial key (None: the study run); its records are delivered first."""
        if not self.flush(force=True):
            raise TrackingUnavailable(f"the tracking store {self.tracking_uri} is unreachable")
        return self._run_id(key)

    @staticmethod
    def _query(key: str) -> str:
        """How a cell's or a trial's run is found (a trial's key is ``CELL/TRIAL_ID``)."""
        return f"tags.{names.TRIAL_KEY_TAG if '/' in key else names.CELL_KEY_TAG} = '{key}'"

    def _run_id(self, key: str | None) -> str:
        if key is None:
            return self.parent_run_id
        if key not in self._runs:
            found = self._find_run(self._query(key))
            if found is None:
                raise KeyError(f"no run {key!r} in study {self.study_name!r}")
            self._runs[key] = found.info.run_id
        return self._runs[key]

    def _find_or_create(self, key: str, run_name: str, tags: dict[str, str]) -> str:
        """The run of `key`, created if there is none. Looked up again after creating it: a create
        whose answer was lost and that MLflow's client sent again made two runs; the oldest is kept."""
        if key not in self._runs:
            found = self._find_run(self._query(key))
            if found is None:
                self._call("create_run", self.experiment_id, run_name=run_name, tags=tags)
                found = self._find_run(self._query(key))
            self._runs[key] = found.info.run_id
        return self._runs[key]

    def _select(self, key: str, params: dict[str, str]) -> None:
        """Log a cell's selected configuration. MLflow's params never change: if a resumed study
        selected another configuration (a retried trial finished), the cell gets a new run, its
        trials' runs move under it and the old one is deleted."""
        run_id = self._run_id(key)
        old = self._call("get_run", run_id)
        if any(old.data.params.get(k, v) != v for k, v in params.items()):
            tags = {k: v for k, v in old.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.parentRunId"}
            new = self._call("create_run", self.experiment_id, run_name=old.info.run_name, tags=tags).info.run_id
            for trial in self._call("search_runs", [self.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                    max_results=5000):
                self._call("set_tag", trial.info.run_id, "mlflow.parentRunId", new)
            self._call("delete_run", run_id)
            self._runs[key] = run_id = new
        self._call("log_batch", run_id, params=[Param(k, v) for k, v in sorted(params.items())])

    def _apply(self, entry: dict) -> None:
        started = time.perf_counter()
        try:
            self._deliver(entry)
        finally:
            self.seconds += time.perf_counter() - started

    def _deliver(self, entry: dict) -> None:
        try:
            op, key = entry["op"], entry["key"]
            if op == "cell":
                self._find_or_create(key, entry["run_name"], {
                    "mlflow.parentRunId": self.parent_run_id, names.ROLE_TAG: names.CELL_ROLE, names.CELL_KEY_TAG: key, **entry["tags"]})
            elif op == "trial":
                parent = self._run_id(entry["cell"]) if entry.get("cell") else self.parent_run_id
                run_id = self._find_or_create(key, entry["run_name"], {
                    "mlflow.parentRunId": parent, names.ROLE_TAG: names.TRIAL_ROLE, names.TRIAL_KEY_TAG: key, **entry["tags"]})
                # Every delivery: the run may exist without them (created just before an outage).
                self._call("log_batch", run_id, params=[Param(k, v) for k, v in sorted(entry["params"].items())])
            elif op == "cell_params":
                self._select(key, entry["params"])
            elif op == "metrics":
                self._call("log_batch", self._run_id(key), metrics=[
                    Metric(k, v, entry["timestamp"], entry["step"]) for k, v in entry["values"].items()])
            elif op == "tags":
                # Digests that vouch for Tune's state files and the journal's key come only from the
                # driver, never through the journal, which may sit on the storage path they protect.
                tags = [RunTag(k, v) for k, v in entry["tags"].items()
                        if not k.startswith(RESUME_TAG_PREFIX) and k != KEY_TAG]
                self._call("log_batch", self._run_id(key), tags=tags)
            elif op == "artifact":
                path = self.journal.artifact(entry) if self.journal is not None else Path(entry["path"])
                if path is None:
                    print(f"  (tracking record of artifact {str(entry.get('file'))[:200]!r} skipped: its copy in "
                          f"{self.journal.files} is gone or changed)", flush=True)
                    return
                folder = entry.get("folder")
                if folder is not None and not (isinstance(folder, str) and _PLAIN.fullmatch(folder)):
                    print(f"  (tracking record of artifact {path.name!r} skipped: folder {str(folder)[:80]!r})", flush=True)
                    return
                self._call("log_artifact", self._run_id(key), str(path), folder)
            elif op == "terminate":
                self._call("set_terminated", self._run_id(key), status=entry["status"])
            else:
                raise ValueError(f"unknown tracking record {op!r}")
        except (ConnectionError, OSError, MlflowException) as exc:
            if isinstance(exc, MlflowException) and not _unreachable(exc):
                raise
            raise TrackingUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


_PLAIN = re.compile(r"[a-z][a-z0-9_]{0,40}")  # an artifact folder a record may name


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


def _live_tracker(tracking_uri: str, study_name: str, journal: str | None, trust_storage: bool = False) -> StudyTracker:
    return _LIVE.get((tracking_uri, study_name)) or StudyTracker(tracking_uri, study_name, journal,
                                                                  trust_storage=trust_storage)


def cell_tags(cell: Cell) -> dict[str, str]:
    """The tags that MLflow's runs table groups cells and trials by."""
    return {"backbone": cell.backbone, "task": cell.task, "inputs": cell.inputs}


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
        self.tracker.cell_run(cell.name, cell.label, cell_tags(cell))
        self.tracker.trial_run(key, self._run_name(trial), trial.config,
                               {**cell_tags(cell), "trial_id": trial.trial_id}, cell=cell.name)
        return key

    def _outcome(self, key: str, trial, outcome: str, suffix: str = "") -> None:
        """Tag how the trial ended and say it first in the run's name: in the MLflow UI a pruned run
        (status KILLED) and a failed one (FAILED) both show a red cross, and the runs table cuts long
        names at the right."""
        self.tracker.set_tags(key, {names.OUTCOME_TAG: outcome,
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
            if result.get(names.RUNG_SCORES):
                self._rung(key, epoch, result[names.RUNG_SCORES])
        if result.get("node_id") and self._nodes.get(key) != result["node_id"]:
            self._nodes[key] = result["node_id"]
            self.tracker.set_tags(key, {"node_id": result["node_id"]})
        if names.outcome(result) == names.FINISHED:  # the last report of a finished trial
            self.tracker.log_metrics(key, {m.name: result.get(m.name) for m in names.FINAL_METRICS})

    def _rung(self, key: str, epoch: int, scores: dict) -> None:
        """What the scheduler judged at a rung, and when it saw it: the records the headline replays
        (`study.headline`)."""
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / names.rung_file(epoch)
            pd.DataFrame(scores).to_csv(path, index=False)
            self.tracker.log_artifact(key, path, names.RUNG_FOLDER)  # the journal keeps its own copy
        self.tracker.log_metrics(key, {names.RUNG_SEEN.name: time.time()}, step=epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        key = self._key(trial)
        last = trial.last_result or {}
        tracker = self.tracker
        ended = names.outcome(last)
        if ended == names.FAILED_OUTCOME:
            tracker.set_tags(key, {"failure_reason": str(last[names.FAILED])[-4000:]})
            self._outcome(key, trial, names.FAILED_OUTCOME, "FAILED")
            tracker.terminate(key, "FAILED")
            print(f"  {self._cell(trial)}: trial {trial.trial_id} FAILED: {last['failed']}", flush=True)
        elif ended == names.FINISHED:
            checkpoint = trial.checkpoint
            if checkpoint is not None:
                with checkpoint.as_directory() as directory:
                    for name in (names.OOF_FILE, names.CURVE_FILE):
                        if (Path(directory) / name).exists():
                            tracker.log_artifact(key, Path(directory) / name)
            self._outcome(key, trial, names.FINISHED)
            tracker.terminate(key, "FINISHED")
            collapsed = int(last.get(names.FOLDS_COLLAPSED.name, 0) or 0)
            print(f"  {self._cell(trial)}: trial {trial.trial_id} finished, out-of-fold C-index "
                  f"{last.get(names.OOF_CINDEX.name, math.nan):.3f} [{last.get(names.OOF_CINDEX_LOW.name, math.nan):.3f}, "
                  f"{last.get(names.OOF_CINDEX_HIGH.name, math.nan):.3f}]"
                  + (f"; {collapsed} fold(s) learned nothing" if collapsed else ""), flush=True)
        else:
            epoch = last.get("epoch", 0)
            tracker.set_tags(key, {"pruned_at_epoch": str(epoch)})
            self._outcome(key, trial, names.PRUNED, f"pruned@{epoch}")
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
        self._outcome(key, trial, names.FAILED_OUTCOME, "FAILED")
        self.tracker.terminate(key, "FAILED")
        print(f"  {self._cell(trial)}: trial {trial.trial_id} FAILED: {reason.strip().splitlines()[-1] if reason.strip() else ''}",
              flush=True)

    def on_experiment_end(self, trials, **info):
        self.tracker.flush(force=True)
