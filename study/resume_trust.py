"""What ``--resume`` trusts: Tune's state files, checked against digests kept in MLflow.

Tune restores a study by unpickling the files at the top of its experiment folder on the
storage path (``tuner.pkl``, ``experiment_state-*.json`` whose trials are pickled inside,
``searcher-state-*.pkl``, callback states): whoever can write that bucket or shared folder can
run code on the driver at ``--resume``. The trial folders below it hold data only (the fold
models are read with ``torch.load(weights_only=True)``).

So the driver records, while it runs, the SHA-256 of every version of those files that it
wrote, as tags ``resume_state.<file name>`` of the study's MLflow run (a separate trust domain:
the tracking server, not the storage path). ``--resume`` hashes the files on the storage path
before Tune reads any of them and refuses a file whose digest the driver never recorded.
``--trust-storage`` skips the check, for a storage path only you can write (for example after a
driver that was killed before it could record its last state; the message says so).

Records go straight to MLflow, not through the study's tracking journal: the journal may live
on the storage path itself, and a record injected there must not vouch for a file.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ray import tune

from datasets.errors import StudyError

TAG_PREFIX = "resume_state."
# Versions of one file kept per tag: the storage copy lags the driver's by at most an upload.
VERSIONS_KEPT = 8
SCAN_EVERY_S = 2.0


class UntrustedState(StudyError):
    """--resume found state files on the storage path that the driver did not write."""


def is_state_file(name: str) -> bool:
    """A file at the top of a Tune experiment folder that Tune reads when it restores."""
    return name.endswith((".pkl", ".json")) and not name.startswith((".", "tmp-"))


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def storage_digests(experiment_path: str, filesystem=None) -> dict[str, str]:
    """file name -> SHA-256 of the state files at the top of a Tune experiment folder (a local path
    or a URI; or a path within `filesystem`, a pyarrow file system)."""
    import pyarrow.fs as pafs

    if filesystem is not None:
        root = experiment_path
    elif "://" in experiment_path:
        filesystem, root = pafs.FileSystem.from_uri(experiment_path)
    else:
        filesystem, root = pafs.LocalFileSystem(), str(Path(experiment_path).absolute())
    out = {}
    for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.File and is_state_file(info.base_name):
            with filesystem.open_input_stream(info.path) as stream:
                out[info.base_name] = _sha256(stream)
    return out


def recorded_digests(tags: dict[str, str]) -> dict[str, list[str]]:
    """file name -> the digests recorded for it, oldest first, from the study run's tags."""
    return {k[len(TAG_PREFIX):]: v.split(",") for k, v in tags.items() if k.startswith(TAG_PREFIX)}


def check_state(experiment_path: str, tags: dict[str, str]) -> None:
    """Raise UntrustedState unless every state file's digest is one the driver recorded."""
    recorded = recorded_digests(tags)
    found = storage_digests(experiment_path)
    unknown = sorted(name for name, digest in found.items() if digest not in recorded.get(name, []))
    if unknown:
        raise UntrustedState(
            f"--resume: {len(unknown)} state file(s) in {experiment_path} were not written by this study's driver "
            f"as far as its MLflow run records ({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}). "
            "Tune would unpickle them, which runs whatever code they hold. If someone else can write the storage "
            "path, find out who changed them. If only you can (for example the driver was killed before it "
            "recorded its last state, or the tracking server was down), resume with --resume --trust-storage.")


def study_run_tags(tracking_uri: str, study_name: str) -> dict[str, str]:
    """The tags of a study's MLflow run, read without changing anything ({} if there is none)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        return {}
    found = client.search_runs([experiment.experiment_id], "tags.study_role = 'study'", max_results=1)
    return dict(found[0].data.tags) if found else {}


def verify_before_resume(tune_path: str, tracking_uri: str, study_name: str) -> None:
    """Check the state files of a study about to be resumed (nothing to check for a new one)."""
    if not tune.Tuner.can_restore(tune_path):
        return
    check_state(tune_path, study_run_tags(tracking_uri, study_name))


class StateRecorder(tune.Callback):
    """Records the digest of each version of Tune's state files in the study's MLflow run.

    Tune writes its experiment state to a staging folder on the driver and uploads it in the
    background; each new version is hashed there (at the end of a Tune step, right after Tune's
    checkpoint) and tagged before the next one, so the copy on the storage path is always a
    recorded version. ``tuner.pkl`` is written once, straight to the storage path.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._versions: dict[str, list[str]] = {}
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._last_scan = 0.0
        self._tuner_recorded = False
        self._client = None

    def __getstate__(self):  # pickled into tuner.pkl: only what identifies the run
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def __setstate__(self, state):
        self.__init__(state["tracking_uri"], state["run_id"])

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if trials and time.monotonic() - self._last_scan >= SCAN_EVERY_S:
            self._scan(trials[0].storage)

    def on_experiment_end(self, trials: list, **info) -> None:
        if trials:
            self._scan(trials[0].storage)

    def _scan(self, storage) -> None:
        self._last_scan = time.monotonic()
        staging = Path(storage.experiment_driver_staging_path)
        changed = {}
        for path in sorted(staging.iterdir()) if staging.is_dir() else []:
            if not path.is_file() or not is_state_file(path.name):
                continue
            stat = path.stat()
            if self._stamps.get(path) != (stat.st_mtime_ns, stat.st_size):
                self._stamps[path] = (stat.st_mtime_ns, stat.st_size)
                with open(path, "rb") as stream:
                    changed[path.name] = _sha256(stream)
        if not self._tuner_recorded:  # written once per driver run, straight to the storage path
            self._tuner_recorded = True
            on_storage = storage_digests(storage.experiment_fs_path, storage.storage_filesystem)
            changed.update({k: v for k, v in on_storage.items() if k == "tuner.pkl"})
        self._record(changed)

    def _record(self, digests: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        if not any(d not in self._versions.get(n, []) for n, d in digests.items()):
            return
        try:
            if self._client is None:
                client = MlflowClient(self.tracking_uri)
                # A resumed study keeps the versions that its earlier driver runs recorded.
                earlier = recorded_digests(client.get_run(self.run_id).data.tags)
                self._versions = {**earlier, **{n: earlier.get(n, []) + [d for d in v if d not in earlier.get(n, [])]
                                                for n, v in self._versions.items()}}
                self._client = client
            updated = {}
            for name, digest in digests.items():
                versions = self._versions.get(name, [])
                if digest not in versions:
                    updated[name] = (versions + [digest])[-VERSIONS_KEPT:]
            if updated:
                self._client.log_batch(self.run_id, tags=[RunTag(TAG_PREFIX + n, ",".join(v))
                                                          for n, v in updated.items()])
                self._versions.update(updated)
        except Exception:  # the tracking store is down: the next scan records the newest version
            self._stamps.clear()
            self._tuner_recorded = False
