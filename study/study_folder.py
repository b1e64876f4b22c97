"""A study's own folder, ``STORAGE/NAME/``: everything a later ``--resume``, ``analysis.report`` or
``optuna-dashboard`` needs, and nothing in the working folder (which ``ray job submit`` deletes
after the job).

=============================  ===========================================================
``trials/``                    Tune's experiment (state files, trials, checkpoints): Tune writes it
``optuna.journal``             each cell's search, trial by trial (`study.tuning.StudyMirror`)
``tracking_journal.jsonl``     tracking records waiting for MLflow (`study.tracking.journal`),
``tracking_journal.jsonl.files/``  with copies of their artifacts
``results.md``, ``results.csv``  the results table; ``timings.json``: where the time went;
``cell_comparison.png``          the cells' headlines side by side
=============================  ===========================================================

On a folder storage path (local disk, NFS, Lustre) the driver writes them in place. Object
storage (``s3://``, ``gs://``) can neither append to a file nor lock one, so there the driver
works in a private local folder of its own (fresh for each driver run) that starts as a copy of
the study's files on the storage path, and uploads those that changed: at each step of Tune's
loop at most every `SYNC_S` seconds, and when the study ends. A driver that dies between two
uploads loses from the storage path what it wrote since the last one: tracking records of at
most `SYNC_S` seconds written while the tracking server was down (while it is up, records go
straight to MLflow), and the last ended trials in the Optuna journal (a copy for viewing: the
searcher's own state is Tune's). Files the driver uploaded and later removed (delivered
tracking records' artifacts) are deleted from the storage path too; nothing else is.

One driver per study (`StudyFolder.acquire`): two drivers of one study would share its MLflow run
and Tune folder and corrupt each other's results. On a folder the driver holds an OS lock on
``STORAGE/NAME/.driver.lock`` for its life (the OS releases it when the process dies, however it
dies); on object storage, which has no locks, a lease ``STORAGE/NAME/driver.lease`` names the
driver and is renewed with every upload: another driver refuses while it is younger than
`LEASE_S`, and a crashed driver's lease expires after that.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from ray import tune

from datasets.errors import StudyError
from datasets.remote import is_remote

TRACKING_JOURNAL = "tracking_journal.jsonl"
OPTUNA_JOURNAL = "optuna.journal"
# What a driver copies from the storage path when it starts: the study's records, not Tune's trials.
RECORDS = (OPTUNA_JOURNAL, TRACKING_JOURNAL, f"{TRACKING_JOURNAL}.files", "results.md", "results.csv", "timings.json",
           "cell_comparison.png")
SYNC_S = 30.0
LEASE_S = 600.0  # a remote driver's lease: renewed at every upload (at most every SYNC_S)
LOCK_FILE, LEASE_FILE = ".driver.lock", "driver.lease"

_OPEN: dict[tuple[str, str], StudyFolder] = {}


class StudyFolder:
    """``STORAGE/NAME`` and the local folder the driver writes it through (the same on a folder storage path)."""

    def __init__(self, storage_path: str, name: str):
        self.storage_path, self.name = storage_path, name
        self.uri = f"{storage_path.rstrip('/')}/{name}"
        self.remote = is_remote(storage_path)
        if self.remote:
            self.local = Path(tempfile.mkdtemp(prefix=f"study-{name[:40]}-"))
        else:
            self.local = Path(storage_path).absolute() / name
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (mtime_ns, size) on the storage path
        self._last_push = 0.0
        self._lock = None
        self._lease: dict | None = None

    # -- one driver per study ----------------------------------------------------------------

    def acquire(self) -> None:
        """Hold the study for this driver, or raise StudyError naming the driver that holds it."""
        if self._lock is not None or self._lease is not None:
            return
        if self.remote:
            self._acquire_lease()
            return
        from filelock import FileLock, Timeout

        self.local.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.local / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = (self.local / f"{LOCK_FILE}.holder").read_text().strip() if (
                self.local / f"{LOCK_FILE}.holder").exists() else "another driver"
            raise StudyError(f"study {self.name!r} under {self.storage_path} is running ({holder}): two drivers "
                             "of one study would corrupt each other's results. Wait for it to end, or choose another "
                             "--name") from None
        (self.local / f"{LOCK_FILE}.holder").write_text(_holder() + "\n")
        self._lock = lock

    def _acquire_lease(self) -> None:
        filesystem, root = self._filesystem()
        path = f"{root}/{LEASE_FILE}"
        try:
            with filesystem.open_input_stream(path) as stream:
                held = json.loads(stream.read().decode())
        except (OSError, ValueError):
            held = None
        now = time.time()
        if isinstance(held, dict) and now - float(held.get("renewed", 0)) < LEASE_S:
            raise StudyError(f"study {self.name!r} under {self.storage_path} is running ({held.get('holder', '?')}, "
                             f"lease renewed {now - float(held.get('renewed', 0)):.0f} s ago): two drivers of one study "
                             f"would corrupt each other's results. Wait for it to end; a driver that died releases "
                             f"the study {LEASE_S / 60:.0f} minutes after its last renewal ({self.uri}/{LEASE_FILE})")
        self._lease = {"holder": _holder(), "token": os.urandom(8).hex()}
        self._renew(filesystem, root)
        time.sleep(1.0)  # two drivers that started together: the last write wins, the other one leaves
        with filesystem.open_input_stream(path) as stream:
            if json.loads(stream.read().decode()).get("token") != self._lease["token"]:
                self._lease = None
                raise StudyError(f"study {self.name!r} under {self.storage_path} was started by another driver at "
                                 "the same moment; choose another --name or wait for it to end")

    def _renew(self, filesystem=None, root=None) -> None:
        if self._lease is None:
            return
        if filesystem is None:
            filesystem, root = self._filesystem()
        with filesystem.open_output_stream(f"{root}/{LEASE_FILE}") as out:
            out.write(json.dumps({**self._lease, "renewed": time.time()}).encode())

    def release(self) -> None:
        """Let another driver take the study (at the end of this one)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._lease is not None:
            try:
                filesystem, root = self._filesystem()
                filesystem.delete_file(f"{root}/{LEASE_FILE}")
            except OSError:  # expires by itself
                pass
            self._lease = None

    @property
    def tracking_journal(self) -> Path:
        return self.local / TRACKING_JOURNAL

    @property
    def optuna_journal(self) -> Path:
        return self.local / OPTUNA_JOURNAL

    def where(self, path: Path) -> str:
        """Where a file of the local folder lives on the storage path (for messages)."""
        return f"{self.uri}/{path.relative_to(self.local).as_posix()}" if self.remote else str(path)

    def _filesystem(self):
        import pyarrow.fs as pafs

        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as exc:
            raise StudyError(f"--storage-path {self.storage_path}: cannot open ({type(exc).__name__}: {exc})") from exc

    def _local_files(self) -> dict[str, Path]:
        files = {}
        for name in RECORDS:
            path = self.local / name
            if path.is_file() and not path.is_symlink():
                files[name] = path
            elif path.is_dir() and not path.is_symlink():
                files.update({p.relative_to(self.local).as_posix(): p for p in path.rglob("*")
                              if p.is_file() and not p.is_symlink()})
        return files

    def pull(self) -> None:
        """Copy the study's records from the storage path into the local folder (object storage only)."""
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)
            return
        import pyarrow.fs as pafs

        filesystem, root = self._filesystem()
        try:
            for name in RECORDS:
                info = filesystem.get_file_info(f"{root}/{name}")
                if info.type == pafs.FileType.File:
                    entries = [info]
                elif info.type == pafs.FileType.Directory:
                    entries = [i for i in filesystem.get_file_info(pafs.FileSelector(info.path, recursive=True))
                               if i.type == pafs.FileType.File]
                else:
                    continue
                for entry in entries:
                    relative = entry.path[len(root) + 1:]
                    target = self.local / relative
                    if ".." in Path(relative).parts:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with filesystem.open_input_stream(entry.path) as source, open(target, "wb") as out:
                        for block in iter(lambda: source.read(1 << 20), b""):
                            out.write(block)
                    stat = target.stat()
                    self._pushed[relative] = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            raise StudyError(f"--storage-path {self.uri}: the study's records cannot be read ({exc})") from exc

    def push(self, force: bool = False) -> None:
        """Upload the records that changed since the last upload; delete on the storage path those
        the driver uploaded and has since removed. At most every `SYNC_S` seconds unless `force`."""
        if not self.remote or (not force and time.monotonic() - self._last_push < SYNC_S):
            return
        self._last_push = time.monotonic()
        filesystem, root = self._filesystem()
        files = self._local_files()
        try:
            self._renew(filesystem, root)
            for relative, path in sorted(files.items()):
                stat = path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if self._pushed.get(relative) == stamp:
                    continue
                with open(path, "rb") as source, filesystem.open_output_stream(f"{root}/{relative}") as out:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        out.write(block)
                self._pushed[relative] = stamp
            for relative in sorted(set(self._pushed) - set(files)):
                try:
                    filesystem.delete_file(f"{root}/{relative}")
                except FileNotFoundError:
                    pass
                del self._pushed[relative]
        except OSError as exc:  # the next push retries; the end of the study pushes with force
            print(f"  (the study's records could not be uploaded to {self.uri}: {exc}; retried later)", flush=True)
            self._last_push = 0.0 if force else self._last_push


def _holder() -> str:
    return f"driver pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def open_folder(storage_path: str, name: str) -> StudyFolder:
    """The driver's one `StudyFolder` of a study (pulled from the storage path when first opened)."""
    key = (storage_path, name)
    if key not in _OPEN:
        folder = StudyFolder(storage_path, name)
        folder.pull()
        _OPEN[key] = folder
    return _OPEN[key]


class SyncStudyFolder(tune.Callback):
    """Uploads the study's records as Tune's loop runs (object storage; nothing to do on a folder)."""

    def __init__(self, storage_path: str, name: str):
        self.storage_path, self.name = storage_path, name

    def __reduce__(self):  # pickled into Tune's experiment state: resolves to the driver's open folder
        return SyncStudyFolder, (self.storage_path, self.name)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        open_folder(self.storage_path, self.name).push()

    def on_experiment_end(self, trials: list, **info) -> None:
        open_folder(self.storage_path, self.name).push(force=True)
