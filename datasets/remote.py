"""Cohort stores and study folders on object storage (``s3://``, ``gs://``) or shared filesystems.

Reading a Zarr store chunk by chunk over the network from every trial would make each epoch wait on
object storage. A remote store is instead *staged*: copied once per node into a local cache
(``$GLIOMA_STUDY_CACHE`` or ``~/.cache/glioma-survival-study/stores``), under a file lock so the
concurrent trials of a node wait for one copy instead of making their own. The cache key is the
hash of the remote store's ``zarr.json`` and ``manifest.json``: a store that changed remotely is
staged again.

URIs go through ``pyarrow.fs`` (shipped with Ray, which uses it for Tune's own storage), so the
credentials and endpoints that work for ``--storage-path`` work here too (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or an instance role, ``AWS_ENDPOINT_URL`` for an
S3-compatible server).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path

from filelock import FileLock

from datasets.errors import StoreError, StudyError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(REMOTE_SCHEMES)


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise StudyError(f"{uri}: cannot open this location ({type(exc).__name__}: {exc})") from exc


def cache_root() -> Path:
    default = Path.home() / ".cache" / "glioma-survival-study" / "stores"
    return Path(os.environ.get("GLIOMA_STUDY_CACHE", default)).expanduser()


def _read_small(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as handle:
        return handle.read()


def stage_store(location: str | os.PathLike, cache: Path | None = None) -> Path:
    """A local path of the cohort store at `location` (copied once per node if remote)."""
    if not is_remote(location):
        return Path(location).expanduser().absolute()
    uri = str(location).rstrip("/")
    fs, root = _filesystem(uri)
    try:
        identity = hashlib.sha256(_read_small(fs, f"{root}/zarr.json") + _read_small(fs, f"{root}/manifest.json"))
    except (OSError, FileNotFoundError) as exc:
        raise StoreError(f"cohort store {uri} cannot be read (no zarr.json/manifest.json there?): {exc}") from exc
    target = (cache or cache_root()) / identity.hexdigest()[:24] / Path(root).name
    marker = target.parent / "staged"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / "lock"):  # the node's other trials wait here for this one copy
        if marker.exists():
            return target
        partial = target.parent / f"partial-{uuid.uuid4().hex}"
        started = time.perf_counter()
        try:
            import pyarrow.fs as pafs

            pafs.copy_files(root, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                            use_threads=True)
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise StoreError(f"cohort store {uri} could not be staged to {target}: {exc}") from exc
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        marker.write_text(f"{uri}\n{time.perf_counter() - started:.1f} s\n")
    return target


def check_writable(location: str) -> None:
    """Write and delete a probe file at `location` (a local folder or a URI); StudyError if that fails."""
    probe = f".write-probe-{uuid.uuid4().hex}"
    if not is_remote(location):
        folder = Path(location)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / probe).write_text("probe")
            (folder / probe).unlink()
        except OSError as exc:
            raise StudyError(f"--storage-path {location} is not writable ({exc})") from exc
        return
    fs, root = _filesystem(location)
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{probe}") as out:
            out.write(b"probe")
        fs.delete_file(f"{root}/{probe}")
    except Exception as exc:
        raise StudyError(f"--storage-path {location} is not writable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]})") from exc


def download_folder(uri: str, destination: Path) -> Path:
    """Copy a remote folder (e.g. a trial's folder in Tune's storage) to `destination`."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise StudyError(f"{uri} does not exist")
    destination.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(root, str(destination), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination


def list_folder(uri: str) -> list[str]:
    """Names of the entries directly under a remote folder."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    return [info.base_name for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
