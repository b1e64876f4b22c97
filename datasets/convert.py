"""Site export -> cohort store: ``python -m datasets.convert``.

Input: ``--images DIR`` with one folder per patient (folder name = patient id) holding one file
(NIfTI, NRRD) or DICOM series folder per sequence, and ``--clinical CSV``. Output: a cohort
store (see `datasets.store`) with a QC report in ``STORE/qc/index.html``.

Policies for bad input (each excluded patient is listed with its reason in the manifest, the
QC report and the summary printed at the end; nothing is dropped silently):

- unreadable or truncated file, 2D or 4D image, NaN/inf voxels: the patient is excluded;
- missing sequence, or an all-zero (empty) one: zero-filled, its ``missing`` flag set;
  a patient with no usable sequence is excluded;
- an image file that matches no sequence name, or several: not used (never guessed), listed as
  "unrecognised" in the summary, the manifest and the QC report with the ``--pattern`` hint;
- images without a clinical row, invalid clinical values (time <= 0, an event outside the
  column's coding, non-numeric age, unknown pathology label): the patient is excluded;
- clinical rows without images: counted, the first few ids shown (never one record each);
- a patient id that a spreadsheet runs as a formula (``=``, ``+``, ``-``, ``@`` first; CSV
  injection, CWE-1236), in a clinical row or a folder name: the patient is excluded;
- one patient named twice: folders whose names differ only in spaces, letter case or Unicode
  normalisation, or a row and a folder spelled apart so: excluded, naming every spelling;
- a sequence file named with another patient's id (a misfiled scan), or the same source file
  (SHA-256) under two patients: the patient(s) excluded, naming the file and the other patient;
- duplicate patient ids (also spelled apart only by case or Unicode normalisation), a missing
  required column, an ambiguous event coding (0, 1 and 2), an unreadable CSV: the conversion
  stops before writing anything (exit status 2).

Rerunning with the same ``--out`` resumes: patients already converted whose source files are
unchanged (SHA-256) are skipped; new patients are appended.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import shutil
import stat
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from datasets import bids, dicom, qc
from datasets import clinical as clinical_mod
from datasets.errors import ImageError, InputError, StudyError
from datasets.patient_ids import formula_problem, formula_reason, identity, name_key, name_parts, normalise
from datasets.preprocessing_config import PreprocessConfig
from datasets.pseudonyms import Pseudonymiser, Redactor, load_or_create_key, spellings
from datasets.raw_steps import REGISTRATIONS
from datasets.sequences import DEFAULT_SEQUENCES, PATTERN_HINT, SequenceMatcher, image_suffix, parse_patterns
from datasets.store import (
    MANIFEST,
    CohortStore,
    create_store,
    file_sha256,
    grow_store,
    verify_store,
    write_clinical,
    write_json_atomic,
    write_patient,
)


def software_version() -> str:
    try:
        return f"glioma-survival-study {version('glioma-survival-study')}"
    except PackageNotFoundError:
        return "glioma-survival-study (not installed)"


# The manifest (every patient's record) is rewritten at most this often during a conversion: once
# per patient would rewrite megabytes a thousand times. A kill loses at most this much bookkeeping,
# never data (the rerun redoes patients whose record is not "ok").
MANIFEST_FLUSH_ENV, MANIFEST_FLUSH_S = "GLIOMA_CONVERT_MANIFEST_FLUSH_S", 2.0  # read when used (`manifest_flush_s`)


def manifest_flush_s() -> float:
    """Seconds between manifest flushes: patients converted since the last flush are redone after a kill."""
    from datasets.environment import seconds

    return seconds(MANIFEST_FLUSH_ENV, MANIFEST_FLUSH_S)


@dataclass(frozen=True)
class PatientTask:
    """Everything a worker needs to convert one patient (plain data: picklable)."""

    index: int
    patient_id: str
    files: dict[str, str]
    store: str
    config: PreprocessConfig
    source_id: str | None = None  # the id in the export, when `patient_id` is its pseudonym
    redactor: Redactor | None = None  # under pseudonymisation: the export's names out of the record


def convert_patient(task: PatientTask) -> dict:
    """Preprocess one patient, write its slot and QC montage; return its manifest record.

    Runs in a worker process; never raises for bad input (the record says ``excluded``). Under
    pseudonymisation every string of the record (reasons, problems) has the export's paths,
    names and ids replaced (`Redactor`).
    """
    marker = in_flight_marker(task)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(str(os.getpid()))  # which worker holds this patient, if the worker dies (`_map_tasks`)
    try:
        import torch

        from datasets.preprocess import preprocess_patient  # MONAI: loaded by the workers, not the CLI

        torch.set_num_threads(1)
        started = time.perf_counter()
        result = preprocess_patient({k: Path(v) for k, v in task.files.items()}, task.patient_id, task.config)
        result.info["seconds"] = round(time.perf_counter() - started, 3)
        checksum = write_patient(Path(task.store), task.index, result.image, result.mask, result.label,
                                 result.missing, result.affine)
        montage = f"{qc.QC_DIR}/{task.index:05d}.png"
        qc.montage(Path(task.store) / montage, task.patient_id, result.image, task.config.sequences,
                   result.mask, result.label if result.has_label else None, result.missing)
        registered = result.info.get("raw_steps", {}).get("registration", {})
        extra = {}
        if registered:
            extra["registration_board"] = f"{qc.QC_DIR}/{task.index:05d}_registration.png"
            qc.registration_board(Path(task.store) / extra["registration_board"], task.patient_id, result.image,
                                  task.config.sequences, result.info["raw_steps"]["reference"], registered)
        record = {"status": "ok", "checksum": checksum, "info": result.info, "montage": montage, **extra,
                  "missing": [k for k, m in zip(task.config.sequences, result.missing) if m],
                  "has_label": result.has_label}
    except ImageError as exc:
        record = {"status": "excluded", "reason": str(exc)}
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            record = {"status": "excluded", "reason": f"patient {task.patient_id}: {type(exc).__name__}: {exc}"}
        else:  # the store's disk, not the patient: the run stops (`run_tasks`), the patient is not blamed
            record = {"status": "fault", "reason": f"{os.strerror(exc.errno)} ({exc})"}
    except Exception as exc:  # a bug or an unforeseen file: keep converting the others, say why
        record = {"status": "excluded", "reason": f"patient {task.patient_id}: unexpected {type(exc).__name__}: {exc}"}
    marker.unlink(missing_ok=True)
    return _scrub(record, task)


# Errors of the machine, not of a patient's files: writing the store failed. They stop the run.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class EnvironmentFault(StudyError):
    """The store cannot be written (disk full, quota, read-only, I/O error): exit 3, no patient blamed."""


IN_FLIGHT_DIR = ".converting"  # in the store while a run goes: one file per patient a worker holds


def in_flight_marker(task: PatientTask) -> Path:
    return Path(task.store) / IN_FLIGHT_DIR / str(task.index)


WORKER_DIED = ("the conversion worker process died while converting this patient, also when it was converted alone "
               "(killed: out of memory, or a crash in a reader of its files); the other patients were converted")


def _scrub(record: dict, task: PatientTask) -> dict:
    """Messages name files, whose paths hold the source id (and, under pseudonymisation, whatever
    else the export's names hold): replaced by the pseudonym and sequence."""
    if task.redactor is not None:
        return task.redactor.record(record)
    if task.source_id:
        return Redactor(task.source_id, task.patient_id).record(record)
    return record


@dataclass
class ConversionSummary:
    store: Path
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    seconds: float = 0.0
    patient_seconds: list[float] = field(default_factory=list)  # per converted patient
    step_seconds: dict[str, list[float]] = field(default_factory=dict)  # raw-export step -> per patient
    notes: list[str] = field(default_factory=list)  # what was read how (the event coding)
    unmatched: dict = field(default_factory=lambda: {"count": 0, "first": []})  # clinical rows without images
    unrecognised: dict[str, list[str]] = field(default_factory=dict)  # patient -> image files not used, why
    withdrawn: list[str] = field(default_factory=list)  # in the store, no longer in the export: erased

    def cost(self) -> str:
        """Per-patient cost of this run, with the raw-export steps' share ("" if nothing converted)."""
        if not self.patient_seconds:
            return ""
        steps = ", ".join(f"{step} {sum(v) / len(v):.1f} s" for step, v in self.step_seconds.items())
        return (f"per patient {sum(self.patient_seconds) / len(self.patient_seconds):.1f} s in a worker"
                + (f" (of which {steps})" if steps else ""))


def discover_patients(images: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Patient folders under the export root, by patient id (the folder name stripped of
    surrounding spaces, NFC-normalised), and the ids that several folders name: folders whose
    names differ only in surrounding spaces, letter case or Unicode normalisation are one patient
    named several ways (`datasets.patient_ids`). Such a patient is excluded, never converted from
    whichever folder came last: id -> every folder naming it."""
    if not images.is_dir():
        raise InputError(f"--images {images} is not a directory")
    by_identity: dict[str, list[Path]] = {}
    only_subjects = bids.is_bids_root(images)  # derivatives/, code/, sourcedata/ are not patients
    for path in sorted(images.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and (not only_subjects or path.name.startswith("sub-")):
            by_identity.setdefault(identity(path.name), []).append(path)
    if not by_identity:
        raise InputError(f"--images {images} holds no patient folders (expected one folder per patient)")
    folders = {normalise(paths[0].name): paths[0] for paths in by_identity.values() if len(paths) == 1}
    clashes = {normalise(path.name): paths for paths in by_identity.values() if len(paths) > 1 for path in paths}
    return folders, clashes


def _spelled(name: str) -> str:
    """A name as messages show it: its repr, and its ASCII escapes where it has other characters
    (NFC and NFD spellings of "Müller" look alike)."""
    return repr(name) if name.isascii() else f"{name!r} (spelled {ascii(name)})"


def source_hashes(files: Mapping[str, Path]) -> dict[str, str]:
    """SHA-256 of each of a patient's source files (or DICOM folders); InputError naming the file
    when it is not something to read: a dangling symlink, a symlink loop, a FIFO, socket or device
    (opening a FIFO would block the conversion forever)."""
    out = {}
    for key, path in files.items():
        try:
            mode = Path(path).stat().st_mode  # follows symlinks: a dangling one or a loop raises here
        except OSError as exc:
            raise InputError(f"{key} source {path} cannot be read ({exc.strerror or type(exc).__name__}; a dangling "
                             "symlink or a symlink loop?)") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputError(f"{key} source {path} is not a regular file or folder (a FIFO, socket or device); "
                             "not read")
        try:
            # A DICOM file stands for its whole series (`datasets.dicom`): all of its files are hashed.
            out[key] = (file_sha256(dicom.series_files(path)) if Path(path).is_file() and dicom.is_dicom_file(path)
                        else file_sha256(path))
        except OSError as exc:
            raise InputError(f"{key} source {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    return out


def _open_or_create(out: Path, ids: list[str], config: PreprocessConfig, table, created: str,
                    fingerprint: str | None):
    if (out / "zarr.json").exists():
        store = CohortStore(out)
        if store.attrs.get("pseudonymisation_key") != fingerprint:
            raise InputError(
                f"{out} was made " + ("without pseudonymisation" if not store.attrs.get("pseudonymisation_key")
                                      else "with another --pseudonymise-key" if fingerprint
                                      else "with --pseudonymise-key") + "; resume it the same way")
        if store.attrs["preprocessing"] != config.to_dict():
            raise InputError(
                f"{out} was made with other preprocessing ({store.attrs['preprocessing']}); "
                "choose another --out, or delete the store to rebuild it"
            )
        import zarr

        group = zarr.open_group(store=str(out), mode="r+", zarr_format=3)
        known = set(store.patient_ids)
        new = [pid for pid in ids if pid not in known]
        if new:
            grow_store(group, new)
        write_clinical(group, list(group.attrs["patient_ids"]), table)
        return group, store.manifest
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} exists and is not a cohort store; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Made aside and renamed into place: a kill or a full disk while it is made leaves no half-made
    # store at --out (which a rerun would refuse), only this folder, which the rerun replaces.
    making = out.with_name(f".{out.name}.making")
    shutil.rmtree(making, ignore_errors=True)
    try:
        create_store(making, ids, config.sequences, config.shape, table, config.to_dict(), software_version(),
                     created)
        if fingerprint is not None:
            import zarr

            zarr.open_group(store=str(making), mode="r+", zarr_format=3).attrs["pseudonymisation_key"] = fingerprint
        write_json_atomic(making / MANIFEST, {"patients": {}, "excluded": {}})
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(making, out)
    except OSError as exc:
        shutil.rmtree(making, ignore_errors=True)
        if exc.errno in ENVIRONMENT_ERRNOS:
            raise EnvironmentFault(f"the store {out} cannot be created ({exc}); nothing was left at --out: free "
                                   "space and rerun") from exc
        raise
    import zarr

    return zarr.open_group(store=str(out), mode="r+", zarr_format=3), {"patients": {}, "excluded": {}}


def _map_tasks(tasks: Sequence[PatientTask], workers: int, backend: str):
    """Yield (task, record) as patients finish, in any order."""
    if backend == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1)(convert_patient)
        pending = {remote.remote(t): t for t in tasks}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                yield pending.pop(ref), ray.get(ref)
        return
    if workers <= 1:
        for task in tasks:
            yield task, convert_patient(task)
        return
    # A worker that dies (the kernel's OOM killer, a crash in a native reader) breaks the whole pool:
    # the patients it held (their in-flight markers) are converted again alone, each in its own
    # process, and one that kills that process too is excluded naming it; the rest go on in a new pool.
    queue = list(tasks)
    while queue:
        interrupted: list[PatientTask] = []
        finished = 0
        for task, record in _pool_run(queue, workers, interrupted):
            finished += 1
            yield task, record
        held = [t for t in interrupted if in_flight_marker(t).exists()]
        if interrupted and not held and not finished:
            raise StudyError("the conversion's worker processes die before they convert any patient (out of memory? "
                             "try fewer --workers)")
        for task in held:
            in_flight_marker(task).unlink(missing_ok=True)
            alone: list[PatientTask] = []
            for done_task, record in _pool_run([task], 1, alone):
                yield done_task, record
            if alone:
                in_flight_marker(task).unlink(missing_ok=True)
                yield task, _scrub({"status": "excluded", "reason": f"patient {task.patient_id}: {WORKER_DIED}"}, task)
        queue = [t for t in interrupted if t not in held]


def _pool_run(tasks: Sequence[PatientTask], workers: int, interrupted: list[PatientTask]):
    """Yield (task, record) from a pool of `workers` processes; the tasks a dead worker's broken
    pool left unfinished are appended to `interrupted`."""
    # spawn, not fork: the parent has zarr (and its event-loop thread) open.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(convert_patient, t): t for t in tasks}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                task = pending.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool:
                    interrupted.append(task)
                    continue
                yield task, record


@dataclass
class StoreIds:
    """How a source patient id appears in everything the store writes: as it is, or as its
    pseudonym, with the source id (in every spelling) scrubbed from recorded messages and paths,
    and under pseudonymisation every path and name of the export replaced (`redactors`)."""

    pseudonymiser: Pseudonymiser | None = None
    redactors: dict[str, Redactor] = field(default_factory=dict)  # source id -> its patient's redactor

    def __call__(self, pid: str) -> str:
        return self.pseudonymiser(pid) if self.pseudonymiser is not None else pid

    @property
    def withheld(self) -> bool:
        """Whether the export's names are withheld (pseudonymisation)."""
        return self.pseudonymiser is not None

    def scrub(self, text: str, pid: str) -> str:
        """`text` as recorded for patient `pid`."""
        if self.pseudonymiser is None:
            return text
        if pid in self.redactors:
            return self.redactors[pid](text)
        return self.pseudonymiser.scrub(text, pid)

    @property
    def fingerprint(self) -> str | None:
        return self.pseudonymiser.fingerprint if self.pseudonymiser is not None else None

    def source_id(self, pid: str) -> str | None:
        """The id in the export, kept beside a pseudonym (for the worker's own scrubbing)."""
        return pid if self.pseudonymiser is not None else None

    def add_redactor(self, pid: str, folder: Path, entries: Sequence[Path], found: Mapping[str, Path]) -> None:
        """Under pseudonymisation: `pid`'s folder, its entries' paths and names, as labels (the
        pseudonym, and the sequence where one was found), and the words of those names withheld."""
        if self.pseudonymiser is None:
            return
        store_id = self(pid)
        keys = {Path(path): key for key, path in found.items()}
        literals: dict[str, str] = {}
        words: set[str] = set()
        for number, entry in enumerate(entries, 1):
            suffix = image_suffix(entry.name)
            label = f"{store_id}/{keys[entry]}{suffix}" if entry in keys else f"{store_id}/file-{number}{suffix}"
            for path in {str(entry), os.path.realpath(entry)}:
                literals[path] = label
            if len(entry.name) >= 5:  # a bare name (a short one would rewrite unrelated words: words cover it)
                literals.setdefault(entry.name, label.split("/", 1)[1])
            words.update(w for w in name_parts(entry.name) + name_parts(Path(os.path.realpath(entry)).name)
                         if _withheld_word(w))
        for path in {str(folder), os.path.realpath(folder)}:
            literals[path] = store_id
        if folder.name != pid:  # spelled otherwise than the id (spaces, Unicode form): the spellings miss it
            literals.setdefault(folder.name, store_id)
            words.update(w for w in name_parts(folder.name) if _withheld_word(w))
        ordered = tuple(sorted(((k, v) for k, v in literals.items() if k), key=lambda kv: len(kv[0]), reverse=True))
        self.redactors[pid] = Redactor(pid, store_id, ordered, tuple(sorted(words)))

    def label(self, pid: str, path: Path, key: str) -> str:
        """How a source is named in the manifest: its path, or under pseudonymisation the pseudonym
        and sequence."""
        return str(path) if self.pseudonymiser is None else f"{self(pid)}/{key}{image_suffix(Path(path).name)}"


# Words of a source's name that are not withheld (they name sequences, formats, planes: no person).
_NAME_VOCABULARY = {
    "nii", "gz", "nrrd", "nhdr", "mha", "mhd", "dcm", "raw", "img", "image", "images", "scan", "series", "mri",
    "seg", "label", "labels", "tumor", "tumour", "mask", "brain", "flair", "native", "pre", "post", "contrast",
    "mprage", "spgr", "fspgr", "bravo", "tse", "fse", "frfse", "space", "cube", "vista", "tirm", "dark", "fluid",
    "blade", "propeller", "haste", "flash", "vibe", "tfe", "ffe", "tfl", "sag", "cor", "tra", "axial", "coronal",
    "sagittal", "iso", "fatsat", "gad", "kontrast", "enhanced", "postcontrast", "precontrast", "t1c", "t1ce",
    "t1gd", "t1w", "t2w", "t1n", "t2f", "copy", "psn",
    # words of the converter's own messages: a file named so must not garble them
    "file", "files", "folder", "patient", "sequence", "missing", "empty", "the", "and", "not", "zero", "read",
    "cannot", "with", "head", "shape", "voxel", "voxels", "unexpected", "error", "matches", "several", "used",
}


def _withheld_word(word: str) -> bool:
    """Whether a word of a source's name is withheld under pseudonymisation: a name (3+ letters) or a
    date or number (4+ digits), unless it only names a sequence, format or plane."""
    if word in _NAME_VOCABULARY:
        return False
    if word.isdigit():
        return len(word) >= 4
    return len(word) >= 3


@dataclass
class MatchedExport:
    """The export's patients that have a clinical row, an image folder and readable sequence files."""

    ids: list[str]  # convertible, in the clinical table's order
    files: dict[str, dict[str, Path]]  # id -> sequence -> file
    notes: dict[str, list[str]]
    hashes: dict[str, dict[str, str]]  # id -> sequence -> SHA-256 of the source
    excluded: dict[str, str]
    unrecognised: dict[str, list[str]] = field(default_factory=dict)  # id -> image files not used, and why
    unmatched: list[str] = field(default_factory=list)  # clinical rows with no image folder, table order
    event_note: str = ""
    rows: object = None  # the validated clinical rows (a DataFrame indexed by source id)


# Unmatched clinical rows are summarised (their count and this many ids), never listed one by one:
# a table of millions of rows for another cohort must not make a manifest of hundreds of megabytes.
UNMATCHED_SHOWN = 10


def _spelling_clashes(table_ids, folders: Mapping[str, Path], has_row: set[str]) -> dict[str, str]:
    """Clinical rows and image folders that name one patient spelled apart (letter case, Unicode
    normalisation): row id -> folder id. Only folders without an exact row are looked at."""
    lonely = {identity(fid): fid for fid in folders if fid not in has_row}
    if not lonely:
        return {}
    ascii_only = table_ids.map(str.isascii).astype(bool)
    keys = table_ids.str.lower()
    if not ascii_only.all():
        keys[~ascii_only] = table_ids[~ascii_only].map(identity)
    hits = keys.isin(set(lonely))
    return {rid: lonely[key] for rid, key in zip(table_ids[hits], keys[hits]) if rid != lonely[key]}


def _misfiled(scans: Mapping[str, Collection[Path]], table_ids,
              folder_ids: Sequence[str]) -> dict[str, tuple[Path, str]]:
    """Patients whose sequence files carry another patient's id in their name (a misfiled scan):
    id -> (file, the other id). The other id is any id of the export (a clinical row or an image
    folder), looked for as `name_key` spells it, outside the patient's own id in the name."""
    wanted: dict[str, list[tuple[str, Path]]] = {}
    for pid, paths in scans.items():
        own = name_key(pid)
        for path in paths:
            stem = path.name[: len(path.name) - len(image_suffix(path.name))] if image_suffix(path.name) else path.name
            parts = name_parts(spellings(pid).sub(" ", stem))
            for i in range(len(parts)):
                for j in range(i + 1, min(len(parts), i + 6) + 1):
                    key = "".join(parts[i:j])
                    if key != own and (len(key) >= 4 or (len(key) >= 3 and not key.isdigit())):
                        wanted.setdefault(key, []).append((pid, path))
    if not wanted:
        return {}
    import pandas as pd

    ids = pd.concat([pd.Series(table_ids, dtype=object), pd.Series(list(folder_ids), dtype=object)],
                    ignore_index=True).drop_duplicates()
    ascii_only = ids.map(str.isascii).astype(bool)
    keys = ids.str.lower().str.replace(r"[\W_]+", "", regex=True)
    if not ascii_only.all():
        keys[~ascii_only] = ids[~ascii_only].map(name_key)
    hits = keys.isin(set(wanted))
    out: dict[str, tuple[Path, str]] = {}
    for other, key in zip(ids[hits], keys[hits]):
        for pid, path in wanted[key]:
            if other != pid and name_key(pid) != key and pid not in out:
                out[pid] = (path, other)
    return out


def _entry_digest(entry: Path) -> str:
    """Size and SHA-256 of a file not used (named so under pseudonymisation, where its name is
    withheld: `sha256sum` in the patient's folder finds it)."""
    try:
        mode = entry.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "not a regular file or folder"
        size = entry.stat().st_size if stat.S_ISREG(mode) else sum(p.stat().st_size for p in entry.rglob("*")
                                                                     if p.is_file())
        return f"{size} bytes, SHA-256 {file_sha256(entry)[:16]}"
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"


def match_export(images: Path, table, config: PreprocessConfig, patterns: Mapping[str, str] | None,
                 store_ids: StoreIds | None = None, stored_ids: Collection[str] = ()) -> MatchedExport:
    """Pair clinical rows with image folders, find each patient's sequence files and hash them;
    every patient that cannot be used is excluded with the reason. `table` is a
    `clinical.ClinicalSource` (only rows with an image folder are validated) or a validated
    `clinical.ClinicalTable`. Clinical rows without an image folder are listed in `unmatched`
    (those of patients already in the store, `stored_ids`, are validated too: their values stay).

    Excluded besides the clinical table's own exclusions: an id that several folders name (spaces,
    case, Unicode normalisation), a row and a folder spelled apart, a folder named like a formula,
    a folder without a row, a folder with two files for one sequence or none, a sequence file
    named with another patient's id (misfiled), the same source file under two patients, an
    unreadable source.
    """
    store_ids = store_ids if store_ids is not None else StoreIds()
    folders, clashes = discover_patients(images)
    table, all_ids = _validated_rows(table, folders, store_ids, stored_ids)
    excluded = _naming_exclusions(images, table, all_ids, folders, clashes, store_ids)
    unmatched = [pid for pid in table.unvalidated if pid not in clashes and pid not in excluded]
    unmatched += [pid for pid in [*table.rows.index, *table.excluded]
                  if pid not in folders and pid not in clashes and pid not in excluded]
    candidates = [pid for pid in table.rows.index if pid in folders and pid not in excluded]
    scans = _scan_folders(candidates, folders, SequenceMatcher(tuple(config.sequences), patterns), store_ids, excluded)
    found = {pid: dict(scan.found) for pid, scan in scans.items()}
    recognised = {pid: scan.recognised() for pid, scan in scans.items()}
    # A misfiled scan first: it explains two files for one sequence, and its owner is not to blame.
    for pid, (path, other) in _misfiled(recognised, all_ids, [*folders, *clashes]).items():
        key = recognised[pid][path]
        excluded[pid] = (f"{key} file {path} carries the id of another patient of the export, "
                         f"{store_ids(other)!r}: a misfiled scan is not used as this patient's {key}; move it to "
                         "its own patient's folder (or rename it, if the id in its name is a coincidence)")
        del found[pid]
    for pid in list(found):
        problem = scans[pid].problem(pid)
        if problem:
            excluded[pid] = problem
            del found[pid]
        elif not any(k in found[pid] for k in config.sequences):
            excluded[pid] = f"folder {folders[pid]} holds no file matching sequences {list(config.sequences)}"
            del found[pid]
    unused = {pid: scan.unrecognised for pid, scan in scans.items()}
    hashes, unused_digests = _hash_sources([pid for pid in candidates if pid in found], found, unused,
                                           store_ids.withheld, excluded)
    _exclude_shared_files(hashes, found, store_ids, excluded)
    # Which DICOM series was taken for which sequence, and why; then the files nothing matched.
    notes = {pid: list(scan.evidence.values()) for pid, scan in scans.items()}
    unrecognised: dict[str, list[str]] = {}
    for pid, entries in unused.items():
        if entries:
            unrecognised[pid] = [f"unrecognised {entry}: {why}"
                                 + (f" ({unused_digests[pid][n]}; name withheld under --pseudonymise-key)"
                                    if store_ids.withheld else "") + "; --pattern SEQUENCE=REGEX maps it"
                                 for n, (entry, why) in enumerate(entries)]
        for entry, why in entries:
            notes.setdefault(pid, []).append(f"file {entry} {why}; ignored")
    ids = [pid for pid in candidates if pid in hashes and pid not in excluded]
    return MatchedExport(ids, {pid: found[pid] for pid in ids}, {pid: notes.get(pid, []) for pid in ids},
                         {pid: hashes[pid] for pid in ids}, excluded, unrecognised, unmatched, table.event_note,
                         table.rows)


def _validated_rows(table, folders: dict, store_ids: StoreIds, stored_ids: Collection[str]):
    """(the validated clinical table, every id of the table): a `ClinicalSource` is validated for
    the patients with a folder and those of the store whose folder is gone (their values are kept)."""
    if isinstance(table, clinical_mod.ClinicalSource):
        all_ids = table.ids
        keep = set(folders)
        missing = set(stored_ids) - {store_ids(fid) for fid in folders}
        if missing:
            keep |= missing if not store_ids.withheld else {pid for pid in all_ids if store_ids(pid) in missing}
        return table.validate(only=keep), all_ids
    import pandas as pd

    return table, pd.Series(list(table.rows.index) + list(table.excluded), dtype=object)


def _naming_exclusions(images: Path, table, all_ids, folders: dict, clashes: dict, store_ids: StoreIds) -> dict[str, str]:
    """Patients excluded for their names: several folders for one id, a row and a folder spelled
    apart, the table's own exclusions of patients with a folder, formula-like folder names, and
    folders without a row."""
    source, withheld = table.source, store_ids.withheld
    has_row = set(all_ids[all_ids.isin(set(folders))])
    excluded: dict[str, str] = {}
    for pid, paths in clashes.items():
        if withheld:
            excluded[pid] = (f"{len(paths)} image folders name this patient (their names differ only in surrounding "
                             "spaces, letter case or Unicode normalisation; names withheld under --pseudonymise-key); "
                             "rename or remove all but one")
        else:
            excluded[pid] = ("folders " + " and ".join(_spelled(str(p)) for p in paths) + f" all map to patient id "
                             f"{pid!r} (their names differ only in surrounding spaces, letter case or Unicode "
                             "normalisation); rename or remove all but one")
    for rid, fid in _spelling_clashes(all_ids, folders, has_row).items():
        if withheld:
            reason = (f"the clinical row and the image folder of this patient are spelled apart (letter case or "
                      f"Unicode normalisation; names withheld under --pseudonymise-key; the folder's pseudonym is "
                      f"{store_ids(fid)}, the row's {store_ids(rid)}); rename one so that both match exactly")
        else:
            reason = (f"clinical row {_spelled(rid)} in {source} and image folder {_spelled(str(folders[fid]))} name "
                      "one patient spelled apart (letter case or Unicode normalisation); rename one so that both "
                      "match exactly")
        excluded[rid] = excluded[fid] = reason
    for pid, reason in table.excluded.items():
        if pid in folders or pid in clashes or formula_problem(pid):
            if withheld and formula_problem(pid):
                reason = f"{source.name}: {formula_reason(pid, withheld=True)}"
            excluded.setdefault(pid, reason)
    for fid, folder in folders.items():
        if fid not in excluded and formula_problem(fid):
            excluded[fid] = (f"image folder {images}/{store_ids(fid) if withheld else folder.name}: "
                             + formula_reason(fid, withheld=withheld))
    for fid in sorted(set(folders) - has_row - set(excluded)):
        folder = f"{images}/{store_ids(fid)}" if withheld else folders[fid]
        excluded[fid] = f"image folder {folder} has no row in {source}"
    return excluded


def _scan_folders(candidates: list[str], folders: dict, matcher: SequenceMatcher, store_ids: StoreIds,
                  excluded: dict[str, str]) -> dict:
    """Each readable candidate's folder scan (`SequenceMatcher.scan`); an unreadable folder or entry
    excludes its patient. Every scanned name is registered for redaction under pseudonymisation."""
    scans = {}
    for pid in candidates:
        folder = folders[pid]
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            store_ids.add_redactor(pid, folder, [], {})
            excluded[pid] = f"folder {folder} cannot be read ({exc.strerror or type(exc).__name__})"
            continue
        try:
            scan = matcher.scan(folder, pid)
        except OSError as exc:
            store_ids.add_redactor(pid, folder, entries, {})
            excluded[pid] = f"folder {folder}: an entry cannot be read ({exc.strerror or type(exc).__name__})"
            continue
        store_ids.add_redactor(pid, folder, scan.entries, scan.found)
        scans[pid] = scan
    return scans


def _hash_sources(patients: list[str], found: dict, unused: dict, withheld: bool, excluded: dict[str, str]):
    """(SHA-256 of each patient's source files, a size-and-digest description of each unrecognised
    entry under pseudonymisation); a patient whose sources cannot be hashed is excluded."""
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashing releases the GIL
        pending = {pid: pool.submit(source_hashes, found[pid]) for pid in patients}
        described = ({pid: [pool.submit(_entry_digest, entry) for entry, _ in unused[pid]] for pid in unused}
                     if withheld else {})
    hashes: dict[str, dict[str, str]] = {}
    for pid, result in pending.items():
        try:
            hashes[pid] = result.result()
        except InputError as exc:  # this patient only: the others convert
            excluded[pid] = f"patient {pid}: {exc}"
    return hashes, {pid: [f.result() for f in futures] for pid, futures in described.items()}


def _exclude_shared_files(hashes: dict, found: dict, store_ids: StoreIds, excluded: dict[str, str]) -> None:
    """The same source file (SHA-256) under two patients excludes both, each naming the other."""
    owners: dict[str, list[tuple[str, str]]] = {}
    for pid, by_key in hashes.items():
        for key, digest in by_key.items():
            owners.setdefault(digest, []).append((pid, key))
    for digest, uses in owners.items():
        if len({pid for pid, _ in uses}) < 2:
            continue
        for pid, key in uses:
            others = ", ".join(f"patient {store_ids(o)!r}'s {k} file" for o, k in uses if o != pid)
            excluded[pid] = (f"{key} file {found[pid][key]} is the same file (SHA-256 {digest[:16]}...) as {others}: "
                             "one scan filed under two patients; remove it from the wrong patient's folder")

WITHDRAWN = ("no longer in the export (its clinical row or image folder was removed, e.g. withdrawn consent, or it "
             "is excluded now): its images, mask, label and QC pictures were erased from the store")


def withdraw_absent(group, manifest: dict, converting: set[str], out: Path, summary: ConversionSummary) -> None:
    """A rerun makes the store match its inputs: a patient of the store who is not converted from
    this run's export (row or folder removed, or excluded now) is unmarked and its data erased,
    never left usable with its old images (its clinical values are already NaN: `write_clinical`
    rewrites them from this run's table)."""
    from datasets.store import erase_patient

    for slot, store_id in enumerate(group.attrs["patient_ids"]):
        if store_id in converting:
            continue
        record = manifest["patients"].get(store_id)
        if not isinstance(record, dict) or record.get("status") == "withdrawn":
            continue
        erase_patient(group, slot)
        for key in ("montage", "registration_board"):
            if record.get(key):
                (out / record[key]).unlink(missing_ok=True)
        excluded_now = manifest.get("excluded", {}).get(store_id)
        manifest["patients"][store_id] = {"status": "withdrawn", "reason": (
            f"{excluded_now}; its earlier images were erased from the store" if excluded_now else WITHDRAWN)}
        summary.withdrawn.append(store_id)


def plan_tasks(matched: MatchedExport, store_ids: StoreIds, group, records: dict, out: Path, config: PreprocessConfig,
               summary: ConversionSummary) -> list[PatientTask]:
    """A task per patient to (re)convert; a patient whose sources are unchanged and who is done is
    skipped. A patient to redo is unmarked first: a kill can't leave stale data marked done.

    Under pseudonymisation a source is recorded by its label (pseudonym and sequence), SHA-256,
    size and a keyed hash of its path (a moved source is converted again, as without
    pseudonymisation), never by its path."""
    positions = {store_id: i for i, store_id in enumerate(group.attrs["patient_ids"])}
    done = group["done"]
    done_now = done[:]
    tasks = []
    for pid in matched.ids:
        store_id, slot = store_ids(pid), positions[store_ids(pid)]
        if store_ids.pseudonymiser is None:
            sources = {k: {"path": str(v), "sha256": matched.hashes[pid][k]} for k, v in matched.files[pid].items()}
        else:
            sources = {k: {"label": store_ids.label(pid, v, k), "sha256": matched.hashes[pid][k],
                           "size": _source_size(v), "path_hmac": store_ids.pseudonymiser.keyed(os.path.abspath(v))}
                       for k, v in matched.files[pid].items()}
        old = records.get(store_id, {})
        if done_now[slot] and old.get("status") == "ok" and old.get("sources") == sources:
            summary.skipped.append(store_id)
            continue
        done[slot] = False
        records[store_id] = {"status": "pending", "sources": sources,
                             "notes": [store_ids.scrub(n, pid) for n in matched.notes[pid]]}
        tasks.append(PatientTask(slot, store_id, {k: str(v) for k, v in matched.files[pid].items()}, str(out), config,
                                 source_id=store_ids.source_id(pid), redactor=store_ids.redactors.get(pid)))
    return tasks


def _source_size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def run_tasks(tasks: list[PatientTask], group, manifest: dict, out: Path, workers: int, backend: str,
              progress: bool, summary: ConversionSummary) -> None:
    """Convert the patients (in worker processes), marking each done once its data is written; the
    manifest is flushed every `manifest_flush_s()` seconds and at the end, whatever happens."""
    records, done = manifest["patients"], group["done"]
    flush_s = manifest_flush_s()
    last_flush = time.monotonic()
    bar = tqdm(total=len(tasks), desc="converting", unit="patient", disable=not progress or not tasks)
    try:
        for task, record in _map_tasks(tasks, workers, backend):
            if record["status"] == "fault":
                raise EnvironmentFault(f"the store {out} cannot be written ({record['reason']}) while converting "
                                       f"patient {task.patient_id}: free space (or fix the disk) and rerun the same "
                                       f"command; the {len(summary.converted)} patient(s) converted are kept, and no "
                                       "patient was excluded for it")
            records[task.patient_id].update(record)
            if record["status"] == "ok":
                done[task.index] = True
                summary.converted.append(task.patient_id)
                summary.patient_seconds.append(float(record["info"].get("seconds", 0.0)))
                for step, seconds in record["info"].get("raw_steps", {}).get("seconds", {}).items():
                    summary.step_seconds.setdefault(step, []).append(float(seconds))
            else:
                summary.excluded[task.patient_id] = record["reason"]
            bar.update()
            if time.monotonic() - last_flush > flush_s:
                write_json_atomic(out / MANIFEST, manifest)
                last_flush = time.monotonic()
    finally:
        bar.close()
        write_json_atomic(out / MANIFEST, manifest)
        try:
            (out / IN_FLIGHT_DIR).rmdir()  # empty once every worker is done
        except OSError:
            pass


def convert(
    images: str | Path,
    clinical: str | Path,
    out: str | Path,
    config: PreprocessConfig = PreprocessConfig(),
    column_map: Mapping[str, str] | None = None,
    patterns: Mapping[str, str] | None = None,
    workers: int = 1,
    backend: str = "processes",
    progress: bool = True,
    pseudonymiser: Pseudonymiser | None = None,
    time_range: Sequence[float] = clinical_mod.TIME_RANGE_DAYS,
    event_coding: str | None = None,
) -> ConversionSummary:
    """Convert a site export into a cohort store (resumable). See the module docstring.

    With a `pseudonymiser`, the store, its manifest and QC report only ever see pseudonyms:
    ids in recorded messages are replaced, source paths, file and folder names of the export
    never recorded (a source is its pseudonym and sequence, SHA-256, size and a keyed hash of its
    path), and the key's fingerprint is stored so that resuming with another key (or none) is
    refused. `event_coding` ("01", "12" or None: decided from the values) is the event column's.
    """
    start = time.perf_counter()
    images, out = Path(images).expanduser().absolute(), Path(out).expanduser().absolute()
    source = clinical_mod.load_clinical(clinical, column_map, time_range, event_coding)
    store_ids = StoreIds(pseudonymiser)  # everything written below uses store ids
    stored = CohortStore(out).patient_ids if (out / "zarr.json").exists() else []
    matched = match_export(images, source, config, patterns, store_ids, stored)
    excluded = {store_ids(pid): store_ids.scrub(reason, pid) for pid, reason in matched.excluded.items()}
    unmatched = {"count": len(matched.unmatched),
                 "first": [store_ids(pid) for pid in matched.unmatched[:UNMATCHED_SHOWN]]}
    if not matched.ids:
        raise InputError(f"no patient can be converted: {len(excluded)} excluded"
                         + (", e.g. " + "; ".join(f"{k}: {v}" for k, v in list(excluded.items())[:3])
                            if excluded else "")
                         + (f"; clinical rows without an image folder under {images}: {unmatched['count']}"
                            if unmatched["count"] else ""))
    unrecognised = {store_ids(pid): [store_ids.scrub(text, pid) for text in texts]
                    for pid, texts in matched.unrecognised.items()}
    rows = matched.rows.copy()
    rows.index = [store_ids(pid) for pid in rows.index]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    group, manifest = _open_or_create(out, [store_ids(pid) for pid in matched.ids], config, rows, created,
                                      store_ids.fingerprint)
    manifest.setdefault("patients", {})
    manifest["excluded"] = excluded
    manifest["clinical"] = {"event_coding": source.event_coding, "event_note": matched.event_note,
                            "unmatched_rows": unmatched}
    manifest["unrecognised"] = unrecognised
    summary = ConversionSummary(store=out, excluded=dict(excluded), notes=[matched.event_note], unmatched=unmatched,
                                unrecognised=unrecognised)
    withdraw_absent(group, manifest, {store_ids(pid) for pid in matched.ids}, out, summary)
    tasks = plan_tasks(matched, store_ids, group, manifest["patients"], out, config, summary)
    (out / qc.QC_DIR).mkdir(exist_ok=True)
    write_json_atomic(out / MANIFEST, manifest)
    run_tasks(tasks, group, manifest, out, workers, backend, progress, summary)
    summary.report = qc.write_report(out, dict(group.attrs), manifest)
    summary.seconds = time.perf_counter() - start
    return summary


def _shape(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X x Y x Z like 120x120x78, got {text!r}") from None
    if len(values) != 3 or min(values) < 8:
        raise argparse.ArgumentTypeError(f"expected three sizes >= 8 like 120x120x78, got {text!r}")
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    from datasets.cli import new_parser

    parser = new_parser("datasets.convert", "Convert a site export (one folder per patient + clinical CSV) into a "
                                            "cohort store.")
    required = parser.add_argument_group("required (except with --verify)")
    required.add_argument("--images", type=Path,
                          help="folder with one sub-folder per patient (NIfTI/NRRD files, DICOM in any arrangement, "
                               "or a BIDS dataset)")
    required.add_argument("--clinical", type=Path, help="clinical CSV, one row per patient")
    required.add_argument("--out", type=Path, help="cohort store to create or resume (NAME.zarr)")
    preprocessing = parser.add_argument_group("preprocessing")
    names = parser.add_argument_group("file names and clinical columns")
    running = parser.add_argument_group("running")
    preprocessing.add_argument("--sequences", nargs="+", default=list(DEFAULT_SEQUENCES), help="sequences, in channel order")
    preprocessing.add_argument("--shape", type=_shape, default=(120, 120, 78), metavar="XxYxZ",
                               help="output shape in voxels (default: 120x120x78)")
    preprocessing.add_argument("--spacing", type=float, default=1.0, help="isotropic resampling spacing (mm) before cropping")
    preprocessing.add_argument("--clip", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                        help="intensity percentiles clipped to inside the head mask")
    names.add_argument("--column", action="append", default=[], metavar="NAME=CSV_COLUMN",
                        help=f"map a clinical column, NAME one of {' '.join(clinical_mod.CANONICAL)}")
    names.add_argument("--pattern", action="append", default=[], metavar="SEQUENCE=REGEX",
                        help="file-name pattern of a sequence (full match on the lower-case name without id and "
                             "extension); adds to the built-in names and wins over them")
    preprocessing.add_argument("--preset", choices=("brats", "raw"), default="brats",
                        help="brats: inputs already co-registered and skull-stripped (no extra step); raw: a "
                             "scanner export (--register rigid --bias-correct --brain-mask)")
    preprocessing.add_argument("--register", choices=REGISTRATIONS, default=None,
                        help="align every sequence to --reference-sequence (default: none; rigid with --preset raw)")
    preprocessing.add_argument("--bias-correct", action="store_true", help="N4 bias-field correction (on with --preset raw)")
    preprocessing.add_argument("--brain-mask", action="store_true",
                        help="brain extraction with deepbet (pip install -e \".[raw]\"); normalise and store the "
                             "brain, not the head (on with --preset raw)")
    preprocessing.add_argument("--reference-sequence", default="t1c", help="the sequence the others are registered to")
    names.add_argument("--time-range-days", type=float, nargs=2, default=clinical_mod.TIME_RANGE_DAYS,
                        metavar=("MIN", "MAX"), help="plausible survival times (days); rows outside are excluded")
    names.add_argument("--event-coding", choices=sorted(clinical_mod.EVENT_CODINGS), default=None,
                        help="the event column's coding: 01 (1 = death, 0 = censored) or 12 (R's survival / SAS "
                             "status: 2 = death, 1 = censored); default: told from the column's values, an "
                             "ambiguous set (0, 1 and 2) stops the conversion")
    running.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    running.add_argument("--backend", choices=("processes", "ray"), default="processes",
                        help="process pool on this machine, or Ray tasks (RAY_ADDRESS for a cluster)")
    names.add_argument("--pseudonymise-key", metavar="KEY_FILE", type=Path, default=None,
                        help="store keyed-hash pseudonyms instead of patient ids; the key file is created if absent "
                             "and must stay outside the store (keep it to resume or to link results back)")
    running.add_argument("--verify", metavar="STORE", type=Path, help="re-check an existing store and exit")
    running.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_raw_steps(config: PreprocessConfig) -> None:
    """The raw-export steps' own requirements, checked before anything is read (InputError)."""
    if config.raw_steps and importlib.util.find_spec("SimpleITK") is None:
        raise InputError("--register/--bias-correct/--preset raw need SimpleITK: pip install -e \".[raw]\"")
    if config.brain_mask and importlib.util.find_spec("deepbet") is None:
        raise InputError("--brain-mask (and --preset raw) needs deepbet, a brain extraction network whose weights "
                         "come in its wheel (MIT licence): pip install -e \".[raw]\"; or leave out --brain-mask")
    if config.register != "none" and config.reference_sequence not in config.sequences:
        raise InputError(f"--reference-sequence {config.reference_sequence} is not one of --sequences "
                         f"{list(config.sequences)}")


# More worker processes than this only queue for the same cores and memory (and a huge number
# overflows the process pool's semaphore).
MAX_WORKERS = 512


def check_output(out: Path) -> None:
    """--out must be a folder this process can create or write (InputError otherwise), checked
    before anything is read or written."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder (a cohort store is a folder)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {existing} is not a writable folder")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify:
            return _verify(args.verify)
        summary = _convert(parser, args)
    except EnvironmentFault as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {args.out} cannot be written: {exc}. Free space (or fix the disk) and rerun the same command: "
              "what was converted is kept, and no patient was excluded for it", file=sys.stderr)
        return 3
    _print_summary(summary)
    return 0


def _verify(store_path: str) -> int:
    problems = verify_store(store_path)
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{store_path}: {len(CohortStore(store_path).usable())} usable patients, {len(problems)} problems")
    return 1 if problems else 0


def _convert(parser: argparse.ArgumentParser, args) -> ConversionSummary:
    """Every flag checked before anything is written, then the conversion."""
    for flag in ("images", "clinical", "out"):
        if getattr(args, flag) is None:
            parser.error(f"--{flag} is required (or use --verify STORE)")
    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be 1-{MAX_WORKERS}, got {args.workers}")
    check_output(args.out)
    manifest_flush_s()  # a bad GLIOMA_CONVERT_MANIFEST_FLUSH_S is an error before anything is written
    clinical_mod.check_time_range(args.time_range_days)
    raw = args.preset == "raw"
    config = PreprocessConfig(sequences=tuple(s.lower() for s in args.sequences), shape=args.shape,
                              spacing=args.spacing, clip_percentiles=tuple(args.clip),
                              register=args.register or ("rigid" if raw else "none"),
                              bias_correct=args.bias_correct or raw, brain_mask=args.brain_mask or raw,
                              reference_sequence=args.reference_sequence.lower())
    check_raw_steps(config)
    pseudonymiser = None
    if args.pseudonymise_key is not None:
        key, created = load_or_create_key(args.pseudonymise_key, args.out)
        pseudonymiser = Pseudonymiser(key)
        if created:
            print(f"created pseudonymisation key {args.pseudonymise_key} (owner-only); keep it safe and outside "
                  "the store: the same key is needed to resume or extend the store and to link results back")
    return convert(args.images, args.clinical, args.out, config,
                   clinical_mod.parse_column_map(args.column), parse_patterns(args.pattern),
                   workers=args.workers, backend=args.backend, progress=not args.no_progress,
                   pseudonymiser=pseudonymiser, time_range=args.time_range_days,
                   event_coding=args.event_coding)


def _print_summary(summary: ConversionSummary) -> None:
    print(f"{summary.store}: converted {len(summary.converted)}, already done {len(summary.skipped)}, "
          f"excluded {len(summary.excluded)} in {summary.seconds:.1f} s"
          + (f"; {summary.cost()}" if summary.cost() else ""))
    for note in summary.notes:
        if note:
            print(f"  clinical: {note}")
    if summary.unmatched["count"]:
        first = ", ".join(summary.unmatched["first"])
        print(f"  clinical rows without an image folder under --images: {summary.unmatched['count']} (not converted); "
              f"the first: {first}")
    for pid, reason in sorted(summary.excluded.items()):
        print(f"  excluded {pid}: {reason}")
    for pid in summary.withdrawn:
        print(f"  withdrawn {pid}: {WITHDRAWN if pid not in summary.excluded else 'its earlier images were erased'}")
    for pid, files in sorted(summary.unrecognised.items()):
        for text in files:
            print(f"  {pid}: {text}")
    if summary.unrecognised:
        print(f"  unrecognised image files are not converted (the sequence is zero-filled and flagged missing): "
              f"{PATTERN_HINT}")
    print(f"QC report: {summary.report}")

if __name__ == "__main__":
    sys.exit(main())
