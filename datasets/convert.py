"""Site export -> cohort store: ``python -m datasets.convert``.

Input: ``--images DIR`` with one folder per patient (folder name = patient id) holding one file
(NIfTI, NRRD) or DICOM series folder per sequence, and ``--clinical CSV``. Output: a cohort
store (see `datasets.store`) with a QC report in ``STORE/qc/index.html``.

Policies for bad input (each excluded patient is listed with its reason in the manifest, the
QC report and the summary printed at the end; nothing is dropped silently):

- unreadable or truncated file, 2D or 4D image, NaN/inf voxels: the patient is excluded;
- missing sequence, or an all-zero (empty) one: zero-filled, its ``missing`` flag set;
  a patient with no usable sequence is excluded;
- images without a clinical row, clinical rows without images, invalid clinical values
  (time <= 0, event not 0/1, non-numeric age, unknown pathology label): the patient is excluded;
- duplicate patient ids, a missing required column, an unreadable CSV: the conversion stops
  before writing anything (exit status 2).

Rerunning with the same ``--out`` resumes: patients already converted whose source files are
unchanged (SHA-256) are skipped; new patients are appended.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from datasets import clinical as clinical_mod
from datasets import qc
from datasets.errors import ImageError, InputError, StudyError
from datasets.preprocessing_config import PreprocessConfig
from datasets.raw_steps import REGISTRATIONS
from datasets.pseudonyms import Pseudonymiser, load_or_create_key, spellings
from datasets.sequences import DEFAULT_SEQUENCES, SequenceMatcher, parse_patterns
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
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"glioma-survival-study {version('glioma-survival-study')}"
    except PackageNotFoundError:
        return "glioma-survival-study (not installed)"


# The manifest (every patient's record) is rewritten at most this often during a conversion: once
# per patient would rewrite megabytes a thousand times. A kill loses at most this much bookkeeping,
# never data (the rerun redoes patients whose record is not "ok").
MANIFEST_FLUSH_S = float(os.environ.get("GLIOMA_CONVERT_MANIFEST_FLUSH_S", "2.0"))


@dataclass(frozen=True)
class PatientTask:
    """Everything a worker needs to convert one patient (plain data: picklable)."""

    index: int
    patient_id: str
    files: dict[str, str]
    store: str
    config: PreprocessConfig
    source_id: str | None = None  # the id in the export, when `patient_id` is its pseudonym


def convert_patient(task: PatientTask) -> dict:
    """Preprocess one patient, write its slot and QC montage; return its manifest record.

    Runs in a worker process; never raises for bad input (the record says ``excluded``).
    """
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
        return {"status": "ok", "checksum": checksum, "info": result.info, "montage": montage, **extra,
                "missing": [k for k, m in zip(task.config.sequences, result.missing) if m],
                "has_label": result.has_label}
    except ImageError as exc:
        return {"status": "excluded", "reason": _scrub(str(exc), task)}
    except Exception as exc:  # a bug or an unforeseen file: keep converting the others, say why
        return {"status": "excluded",
                "reason": _scrub(f"patient {task.patient_id}: unexpected {type(exc).__name__}: {exc}", task)}


def _scrub(text: str, task: PatientTask) -> str:
    """Error messages name files, whose paths hold the source id: replace it by the pseudonym."""
    return spellings(task.source_id).sub(task.patient_id, text) if task.source_id else text


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

    def cost(self) -> str:
        """Per-patient cost of this run, with the raw-export steps' share ("" if nothing converted)."""
        if not self.patient_seconds:
            return ""
        steps = ", ".join(f"{step} {sum(v) / len(v):.1f} s" for step, v in self.step_seconds.items())
        return (f"per patient {sum(self.patient_seconds) / len(self.patient_seconds):.1f} s in a worker"
                + (f" (of which {steps})" if steps else ""))


def discover_patients(images: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Patient folders under the export root (folder name, stripped of surrounding spaces = patient
    id), and the ids that several folders map to, each with the reason naming them all: such a
    patient is excluded, never converted from whichever folder came last."""
    if not images.is_dir():
        raise InputError(f"--images {images} is not a directory")
    by_id: dict[str, list[Path]] = {}
    for path in sorted(images.iterdir()):
        if path.is_dir() and not path.name.startswith("."):
            by_id.setdefault(path.name.strip(), []).append(path)
    if not by_id:
        raise InputError(f"--images {images} holds no patient folders (expected one folder per patient)")
    folders = {pid: paths[0] for pid, paths in by_id.items() if len(paths) == 1}
    clashes = {pid: "folders " + " and ".join(repr(str(p)) for p in paths) + f" all map to patient id {pid!r} "
               "(their names differ only in surrounding spaces); rename or remove all but one"
               for pid, paths in by_id.items() if len(paths) > 1}
    return folders, clashes


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
            out[key] = file_sha256(path)
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
    group = create_store(out, ids, config.sequences, config.shape, table, config.to_dict(),
                         software_version(), created)
    if fingerprint is not None:
        group.attrs["pseudonymisation_key"] = fingerprint
    return group, {"patients": {}, "excluded": {}}


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
    # spawn, not fork: the parent has zarr (and its event-loop thread) open.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(convert_patient, t): t for t in tasks}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield pending.pop(future), future.result()


@dataclass
class StoreIds:
    """How a source patient id appears in everything the store writes: as it is, or as its
    pseudonym, with the source id (in every spelling) scrubbed from recorded messages and paths."""

    pseudonymiser: Pseudonymiser | None = None

    def __call__(self, pid: str) -> str:
        return self.pseudonymiser(pid) if self.pseudonymiser is not None else pid

    def scrub(self, text: str, pid: str) -> str:
        return self.pseudonymiser.scrub(text, pid) if self.pseudonymiser is not None else text

    @property
    def fingerprint(self) -> str | None:
        return self.pseudonymiser.fingerprint if self.pseudonymiser is not None else None

    def source_id(self, pid: str) -> str | None:
        """The id in the export, kept beside a pseudonym (for the worker's own scrubbing)."""
        return pid if self.pseudonymiser is not None else None


@dataclass
class MatchedExport:
    """The export's patients that have a clinical row, an image folder and readable sequence files."""

    ids: list[str]  # convertible, in the clinical table's order
    files: dict[str, dict[str, Path]]  # id -> sequence -> file
    notes: dict[str, list[str]]
    hashes: dict[str, dict[str, str]]  # id -> sequence -> SHA-256 of the source
    excluded: dict[str, str]


def match_export(images: Path, table, config: PreprocessConfig, patterns: Mapping[str, str] | None) -> MatchedExport:
    """Pair clinical rows with image folders, find each patient's sequence files and hash them;
    every patient that cannot be used is excluded with the reason (InputError if none is left)."""
    matcher = SequenceMatcher(tuple(config.sequences), patterns)
    folders, clashes = discover_patients(images)
    excluded: dict[str, str] = dict(table.excluded)
    excluded.update({pid: reason for pid, reason in clashes.items() if pid not in excluded})
    for pid in sorted(set(folders) - set(table.rows.index) - set(table.excluded) - set(clashes)):
        excluded[pid] = f"image folder {folders[pid]} has no row in {table.source}"
    for pid in sorted(set(table.rows.index) - set(folders) - set(clashes)):
        excluded[pid] = f"clinical row in {table.source} has no image folder under {images}"
    candidates = [pid for pid in table.rows.index if pid in folders]
    found: dict[str, dict[str, Path]] = {}
    notes: dict[str, list[str]] = {}
    for pid in candidates:
        try:
            found[pid], notes[pid] = matcher.find(folders[pid], pid)
        except InputError as exc:
            excluded[pid] = str(exc)
            continue
        if not any(k in found[pid] for k in config.sequences):
            excluded[pid] = f"folder {folders[pid]} holds no file matching sequences {list(config.sequences)}"
            del found[pid]
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashing releases the GIL
        pending = {pid: pool.submit(source_hashes, found[pid]) for pid in candidates if pid in found}
    hashes: dict[str, dict[str, str]] = {}
    for pid, result in pending.items():
        try:
            hashes[pid] = result.result()
        except InputError as exc:  # this patient only: the others convert
            excluded[pid] = f"patient {pid}: {exc}"
    ids = [pid for pid in candidates if pid in hashes]
    if not ids:
        raise InputError(f"no patient can be converted: {len(excluded)} excluded, e.g. "
                         + "; ".join(f"{k}: {v}" for k, v in list(excluded.items())[:3]))
    return MatchedExport(ids, found, notes, hashes, excluded)


def plan_tasks(matched: MatchedExport, store_ids: StoreIds, group, records: dict, out: Path, config: PreprocessConfig,
               summary: ConversionSummary) -> list[PatientTask]:
    """A task per patient to (re)convert; a patient whose sources are unchanged and who is done is
    skipped. A patient to redo is unmarked first: a kill can't leave stale data marked done."""
    positions = {store_id: i for i, store_id in enumerate(group.attrs["patient_ids"])}
    done = group["done"]
    done_now = done[:]
    tasks = []
    for pid in matched.ids:
        store_id, slot = store_ids(pid), positions[store_ids(pid)]
        sources = {k: {"path": store_ids.scrub(str(v), pid), "sha256": matched.hashes[pid][k]}
                   for k, v in matched.files[pid].items()}
        old = records.get(store_id, {})
        if done_now[slot] and old.get("status") == "ok" and old.get("sources") == sources:
            summary.skipped.append(store_id)
            continue
        done[slot] = False
        records[store_id] = {"status": "pending", "sources": sources,
                             "notes": [store_ids.scrub(n, pid) for n in matched.notes[pid]]}
        tasks.append(PatientTask(slot, store_id, {k: str(v) for k, v in matched.files[pid].items()}, str(out), config,
                                 source_id=store_ids.source_id(pid)))
    return tasks


def run_tasks(tasks: list[PatientTask], group, manifest: dict, out: Path, workers: int, backend: str,
              progress: bool, summary: ConversionSummary) -> None:
    """Convert the patients (in worker processes), marking each done once its data is written; the
    manifest is flushed every `MANIFEST_FLUSH_S` seconds and at the end, whatever happens."""
    records, done = manifest["patients"], group["done"]
    last_flush = time.monotonic()
    bar = tqdm(total=len(tasks), desc="converting", unit="patient", disable=not progress or not tasks)
    try:
        for task, record in _map_tasks(tasks, workers, backend):
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
            if time.monotonic() - last_flush > MANIFEST_FLUSH_S:
                write_json_atomic(out / MANIFEST, manifest)
                last_flush = time.monotonic()
    finally:
        bar.close()
        write_json_atomic(out / MANIFEST, manifest)


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
) -> ConversionSummary:
    """Convert a site export into a cohort store (resumable). See the module docstring.

    With a `pseudonymiser`, the store, its manifest and QC report only ever see pseudonyms:
    ids in recorded messages and source paths are replaced, and the key's fingerprint is stored
    so that resuming with another key (or none) is refused.
    """
    start = time.perf_counter()
    images, out = Path(images).expanduser().absolute(), Path(out).expanduser().absolute()
    table = clinical_mod.read_clinical(clinical, column_map, time_range)
    matched = match_export(images, table, config, patterns)
    store_ids = StoreIds(pseudonymiser)  # everything written below uses store ids
    excluded = {store_ids(pid): store_ids.scrub(reason, pid) for pid, reason in matched.excluded.items()}
    rows = table.rows.copy()
    rows.index = [store_ids(pid) for pid in rows.index]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    group, manifest = _open_or_create(out, [store_ids(pid) for pid in matched.ids], config, rows, created,
                                      store_ids.fingerprint)
    manifest.setdefault("patients", {})
    manifest["excluded"] = excluded
    summary = ConversionSummary(store=out, excluded=dict(excluded))
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
    parser = argparse.ArgumentParser(
        prog="python -m datasets.convert",
        description="Convert a site export (one folder per patient + clinical CSV) into a cohort store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=Path, help="folder with one sub-folder per patient")
    parser.add_argument("--clinical", type=Path, help="clinical CSV, one row per patient")
    parser.add_argument("--out", type=Path, help="cohort store to create or resume (NAME.zarr)")
    parser.add_argument("--sequences", nargs="+", default=list(DEFAULT_SEQUENCES), help="sequences, in channel order")
    parser.add_argument("--shape", type=_shape, default=(120, 120, 78), help="output shape X x Y x Z (voxels)")
    parser.add_argument("--spacing", type=float, default=1.0, help="isotropic resampling spacing (mm) before cropping")
    parser.add_argument("--clip", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                        help="intensity percentiles clipped to inside the head mask")
    parser.add_argument("--column", action="append", default=[], metavar="NAME=CSV_COLUMN",
                        help=f"map a clinical column, NAME one of {list(clinical_mod.CANONICAL)}")
    parser.add_argument("--pattern", action="append", default=[], metavar="SEQUENCE=REGEX",
                        help="file-name pattern of a sequence (full match on the lower-case name without id and extension)")
    parser.add_argument("--preset", choices=("brats", "raw"), default="brats",
                        help="brats: inputs already co-registered and skull-stripped (no extra step); raw: a "
                             "scanner export (--register rigid --bias-correct --brain-mask)")
    parser.add_argument("--register", choices=REGISTRATIONS, default=None,
                        help="align every sequence to --reference-sequence (default: none; rigid with --preset raw)")
    parser.add_argument("--bias-correct", action="store_true", help="N4 bias-field correction (on with --preset raw)")
    parser.add_argument("--brain-mask", action="store_true",
                        help="brain extraction with deepbet (pip install -e \".[raw]\"); normalise and store the "
                             "brain, not the head (on with --preset raw)")
    parser.add_argument("--reference-sequence", default="t1c", help="the sequence the others are registered to")
    parser.add_argument("--time-range-days", type=float, nargs=2, default=clinical_mod.TIME_RANGE_DAYS,
                        metavar=("MIN", "MAX"), help="plausible survival times (days); rows outside are excluded")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    parser.add_argument("--backend", choices=("processes", "ray"), default="processes",
                        help="process pool on this machine, or Ray tasks (RAY_ADDRESS for a cluster)")
    parser.add_argument("--pseudonymise-key", metavar="KEY_FILE", type=Path, default=None,
                        help="store keyed-hash pseudonyms instead of patient ids; the key file is created if absent "
                             "and must stay outside the store (keep it to resume or to link results back)")
    parser.add_argument("--verify", metavar="STORE", type=Path, help="re-check an existing store and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_raw_steps(config: PreprocessConfig) -> None:
    """The raw-export steps' own requirements, checked before anything is read (InputError)."""
    import importlib.util

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
            problems = verify_store(args.verify)
            for problem in problems:
                print(f"PROBLEM {problem}")
            store = CohortStore(args.verify)
            print(f"{args.verify}: {len(store.usable())} usable patients, {len(problems)} problems")
            return 1 if problems else 0
        for flag in ("images", "clinical", "out"):
            if getattr(args, flag) is None:
                parser.error(f"--{flag} is required (or use --verify STORE)")
        if not 1 <= args.workers <= MAX_WORKERS:
            parser.error(f"--workers must be 1-{MAX_WORKERS}, got {args.workers}")
        check_output(args.out)
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
        summary = convert(args.images, args.clinical, args.out, config,
                          clinical_mod.parse_column_map(args.column), parse_patterns(args.pattern),
                          workers=args.workers, backend=args.backend, progress=not args.no_progress,
                          pseudonymiser=pseudonymiser, time_range=args.time_range_days)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.store}: converted {len(summary.converted)}, already done {len(summary.skipped)}, "
          f"excluded {len(summary.excluded)} in {summary.seconds:.1f} s"
          + (f"; {summary.cost()}" if summary.cost() else ""))
    for pid, reason in sorted(summary.excluded.items()):
        print(f"  excluded {pid}: {reason}")
    print(f"QC report: {summary.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
