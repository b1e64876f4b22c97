"""What ``--resume`` trusts: Tune's state files, checked against digests kept in MLflow.

Tune restores a study by unpickling the files at the top of its experiment folder on the
storage path (``tuner.pkl``, ``experiment_state-*.json`` whose trials are pickled inside,
``searcher-state-*.pkl``, callback states) and a failed trial's ``error.pkl`` in its folder:
whoever can write that bucket or shared folder can run code on the driver at ``--resume``. The
rest of the trial folders is data (the fold models are read with ``torch.load(weights_only=True)``).

So the driver records, while it runs, the SHA-256 of every version of those files that it
wrote, as tags ``resume_state.<file name>`` of the study's MLflow run (a separate trust domain:
the tracking server, not the storage path). ``--resume`` hashes the files on the storage path
before Tune reads any of them and refuses a file whose digest the driver never recorded.
``--trust-storage`` skips the check, for a storage path only you can write (for example after a
tracking server that was down when the driver recorded its last state, or a study started by a
version without this check; the message says so). The check runs right before Tune restores.

Records go straight to MLflow, not through the study's tracking journal: the journal may live
on the storage path itself, and a record injected there must not vouch for a file.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ray import tune

from datasets.errors import StudyError
from datasets.remote import is_remote

TAG_PREFIX = "resume_state."
# Versions of one file kept per tag: the storage copy lags the driver's by at most an upload.
VERSIONS_KEPT = 8
RETRY_AFTER_S = 30.0  # after a failed record, while the tracking store is down


class UntrustedState(StudyError):
    """--resume found state files on the storage path that the driver did not write."""


def is_state_file(name: str) -> bool:
    """A file at the top of a Tune experiment folder that Tune reads when it restores."""
    return name.endswith((".pkl", ".json")) and not name.startswith((".", "tmp-"))


def error_key(trial_folder: str) -> str:
    """The record name of a trial folder's ``error.pkl`` (tag keys cannot hold a folder's '=' and ',')."""
    return "error." + hashlib.sha256(trial_folder.encode()).hexdigest()[:20]


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def storage_digests(experiment_path: str) -> dict[str, str]:
    """file name -> SHA-256 of the state files of a Tune experiment folder (a local path or a URI)."""
    import pyarrow.fs as pafs

    if is_remote(experiment_path):
        filesystem, root = pafs.FileSystem.from_uri(experiment_path)
    else:
        filesystem, root = pafs.LocalFileSystem(), str(Path(experiment_path).absolute())
    out = {}
    for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.File and is_state_file(info.base_name):
            with filesystem.open_input_stream(info.path) as stream:
                out[info.base_name] = _sha256(stream)
        elif info.type == pafs.FileType.Directory:
            error = filesystem.get_file_info(f"{info.path}/error.pkl")
            if error.type == pafs.FileType.File:
                with filesystem.open_input_stream(error.path) as stream:
                    out[error_key(info.base_name)] = _sha256(stream)
    return out


def recorded_digests(tags: dict[str, str]) -> dict[str, list[str]]:
    """file name -> the digests recorded for it, oldest first, from the study run's tags."""
    return {k[len(TAG_PREFIX):]: v.split(",") for k, v in tags.items() if k.startswith(TAG_PREFIX)}


def check_state(experiment_path: str, tags: dict[str, str]) -> None:
    """Raise UntrustedState unless every state file's digest is one the driver recorded."""
    recorded = recorded_digests(tags)
    try:
        found = storage_digests(experiment_path)
    except OSError as exc:
        raise StudyError(f"--resume: the state files in {experiment_path} cannot be read ({exc})") from exc
    if not recorded:
        raise UntrustedState(
            f"--resume: the study's MLflow run records no digests of Tune's state files in {experiment_path} (a "
            "study started by a version of this tool without the check, or tracked in another store): they cannot "
            "be checked before Tune unpickles them. If only you can write the storage path, resume with --resume "
            "--trust-storage.")
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
    from analysis.study_reader import study_run_tags as read_tags

    try:
        return read_tags(tracking_uri, study_name)
    except Exception as exc:
        raise StudyError(f"--resume: the digests of the study's state files cannot be read from {tracking_uri} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc


# The driver's live recorder per study run: Tune pickles callbacks into its experiment state and
# unpickles them on restore; the driver finds the one that runs (`catch_up_states`).
_LIVE: dict[str, StateRecorder] = {}


class StateRecorder(tune.Callback):
    """Records the digest of each version of Tune's state files in the study's MLflow run.

    Tune writes its experiment state to a staging folder on the driver and starts its upload in
    the background; each new version is hashed there at the end of the same Tune step (a stat of
    each file per step; a hash when it changed) and tagged, so the copy on the storage path is a
    recorded version unless the driver dies within that step. ``tuner.pkl`` is written once per
    driver run, straight to the storage path. Digests the tracking store could not take wait and
    are recorded when it is back: at a later step (at most every `RETRY_AFTER_S`), and at the end
    of the study, when the driver waits for the store (`catch_up_states`) as it does for its
    tracking journal: the last state of a study whose server was down at its end is then recorded
    too, and a plain ``--resume`` trusts it.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._versions: dict[str, list[str]] = {}
        self._unrecorded: dict[str, str] = {}  # name -> newest digest the store has not taken yet
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._retry_at = 0.0
        self._tuner_recorded = False
        self._client = None
        _LIVE[run_id] = self

    def __getstate__(self):  # pickled into tuner.pkl: only what identifies the run
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def __setstate__(self, state):
        self.__init__(state["tracking_uri"], state["run_id"])

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if trials:
            self._scan(trials[0].storage)

    def on_experiment_end(self, trials: list, **info) -> None:
        if trials:
            self._scan(trials[0].storage)

    @property
    def waiting(self) -> int:
        """Digests not yet recorded (the tracking store was down)."""
        return len(self._unrecorded)

    def _scan(self, storage) -> None:
        staging = Path(storage.experiment_driver_staging_path)
        if not staging.is_dir():
            return
        changed = self._hash_changed([(p.name, p) for p in staging.iterdir() if p.is_file() and is_state_file(p.name)])
        if changed:  # Tune checkpointed: a trial that failed since wrote its error.pkl before that
            changed.update(self._hash_changed([(error_key(p.parent.name), p) for p in staging.glob("*/error.pkl")]))
        if not self._tuner_recorded:  # written once per driver run, straight to the storage path
            try:
                with storage.storage_filesystem.open_input_stream(f"{storage.experiment_fs_path}/tuner.pkl") as stream:
                    changed["tuner.pkl"] = _sha256(stream)
                self._tuner_recorded = True
            except OSError:  # not written (yet): the resume check will name it
                pass
        self._unrecorded.update(changed)
        if self._unrecorded and time.monotonic() >= self._retry_at:
            self.record()

    def _hash_changed(self, files: list[tuple[str, Path]]) -> dict[str, str]:
        """name -> SHA-256 of the files whose modification time or size changed since the last scan."""
        changed = {}
        for name, path in files:
            stat = path.stat()
            if self._stamps.get(path) != (stat.st_mtime_ns, stat.st_size):
                self._stamps[path] = (stat.st_mtime_ns, stat.st_size)
                with open(path, "rb") as stream:
                    changed[name] = _sha256(stream)
        return changed

    def record(self) -> bool:
        """Record the waiting digests in the study run; False if the tracking store is down (they
        keep waiting, and the next attempt comes after `RETRY_AFTER_S` at the earliest)."""
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        if not self._unrecorded:
            return True
        try:
            if self._client is None:
                client = MlflowClient(self.tracking_uri)
                # A resumed study keeps the versions that its earlier driver runs recorded.
                earlier = recorded_digests(client.get_run(self.run_id).data.tags)
                self._versions = {**earlier, **{n: earlier.get(n, []) + [d for d in v if d not in earlier.get(n, [])]
                                                for n, v in self._versions.items()}}
                self._client = client
            updated = {}
            for name, digest in self._unrecorded.items():
                versions = self._versions.get(name, [])
                if digest not in versions:
                    updated[name] = (versions + [digest])[-VERSIONS_KEPT:]
            if updated:
                self._client.log_batch(self.run_id, tags=[RunTag(TAG_PREFIX + n, ",".join(v))
                                                          for n, v in updated.items()])
                self._versions.update(updated)
            self._unrecorded.clear()
            return True
        except Exception:  # the tracking store is down: the digests wait
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            return False


def catch_up_states(run_id: str, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the tracking store to take the digests that the study run's live
    recorder holds back; True when none wait (or there is no recorder)."""
    recorder = _LIVE.get(run_id)
    if recorder is None:
        return True
    deadline = time.monotonic() + timeout_s
    while not recorder.record():
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    return True
