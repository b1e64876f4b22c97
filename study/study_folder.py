"""A study's own folder, ``STORAGE/NAME/``: everything a later ``--resume``, ``analysis.report`` or
``optuna-dashboard`` needs, and nothing in the working folder (which ``ray job submit`` deletes
after the job).

=============================  ===========================================================
``trials/``                    Tune's experiment (state files, trials, checkpoints): Tune writes it
``optuna.journal``             each cell's search, trial by trial (`study.tuning.StudyMirror`)
``tracking_journal.jsonl``     tracking records waiting for MLflow (`study.tracking.journal`),
``tracking_journal.jsonl.files/``  with copies of their artifacts
``results.md``, ``results.csv``  the results table; ``timings.json``: where the time went
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
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ray import tune

from datasets.errors import StudyError
from datasets.remote import is_remote

TRACKING_JOURNAL = "tracking_journal.jsonl"
OPTUNA_JOURNAL = "optuna.journal"
# What a driver copies from the storage path when it starts: the study's records, not Tune's trials.
RECORDS = (OPTUNA_JOURNAL, TRACKING_JOURNAL, f"{TRACKING_JOURNAL}.files", "results.md", "results.csv", "timings.json")
SYNC_S = float(os.environ.get("STUDY_SYNC_S", "30"))

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
