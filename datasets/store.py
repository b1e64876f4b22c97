"""The cohort store: one Zarr v3 group per cohort, the only thing training reads.

Format version 1
----------------
A directory ``NAME.zarr`` holding a Zarr v3 group with these arrays (N patients, C sequences,
spatial axes x, y, z in RAS order: left->right, posterior->anterior, inferior->superior):

==================  =======  ======================  ============================================
array               dtype    shape                   content
==================  =======  ======================  ============================================
``images``          float16  [N, C, X, Y, Z]         normalised intensities, one chunk per patient
``masks``           uint8    [N, X, Y, Z]            1 inside the head (valid-voxel) mask
``labels``          uint8    [N, X, Y, Z]            tumour label where the export had one, else 0
``missing``         bool     [N, C]                  True where a sequence was absent (zero-filled)
``affines``         float64  [N, 4, 4]               RAS affine of each patient's output grid (mm)
``done``            bool     [N]                     True once every array above is written
``clinical/<col>``  float64  [N]                     mapped clinical columns only (NaN = unknown)
==================  =======  ======================  ============================================

Group attributes: ``format`` (= ``"glioma-cohort-store"``), ``format_version``, ``sequences``,
``shape``, ``patient_ids`` (list, slot order), ``clinical_columns``, ``preprocessing``
(parameters), ``created``, ``software``.

Beside the arrays, ``manifest.json`` (replaced atomically, never edited in place) records
provenance: for each patient its status (``ok`` | ``excluded``), the reason for an exclusion,
every source file with its SHA-256, a SHA-256 of the written arrays (for ``--verify``), and
preprocessing details (shapes and spacings before/after, intensity statistics, problems); and
the patients excluded before conversion (no images, no clinical row, invalid clinical values).

A patient is usable only when ``done`` is True *and* its manifest status is ``ok``. ``done`` is
set after the data are written and cleared before they are rewritten, so a conversion killed at
any moment never leaves an incomplete patient marked done. Stores of another format version are
refused with a `StoreError`, as are stores whose patient ids a spreadsheet would run as formulas
(`datasets.patient_ids`; the converter refuses such ids since).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from datasets.errors import StoreError
from datasets.patient_ids import formula_problem
from datasets.plausibility import content_problem

STORE_FORMAT = "glioma-cohort-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ARRAYS = ("images", "masks", "labels", "missing", "affines", "done")
_REQUIRED_ATTRS = ("format", "format_version", "sequences", "shape", "patient_ids", "clinical_columns", "preprocessing")


def _compressor() -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def array_checksum(*arrays: np.ndarray) -> str:
    """SHA-256 over the raw bytes of the arrays written for one patient."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_sha256(path: Path | list[Path]) -> str:
    """SHA-256 of a file, of a folder's files (sorted) or of a list of files (a DICOM series)."""
    digest = hashlib.sha256()
    if isinstance(path, list):
        files = sorted(Path(p) for p in path)
    else:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see either the old or the new file, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_store(
    path: Path,
    patient_ids: Sequence[str],
    sequences: Sequence[str],
    shape: Sequence[int],
    clinical: pd.DataFrame,
    preprocessing: dict,
    software: str,
    created: str,
) -> zarr.Group:
    """Create an empty store with a slot per patient (all ``done`` False)."""
    n, c = len(patient_ids), len(sequences)
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    spatial = tuple(int(s) for s in shape)
    group.create_array("images", shape=(n, c, *spatial), chunks=(1, c, *spatial), dtype="float16",
                       compressors=_compressor(), fill_value=0)
    for name in ("masks", "labels"):
        group.create_array(name, shape=(n, *spatial), chunks=(1, *spatial), dtype="uint8",
                           compressors=_compressor(), fill_value=0)
    group.create_array("missing", shape=(n, c), chunks=(1, c), dtype="bool", fill_value=True)
    group.create_array("affines", shape=(n, 4, 4), chunks=(1, 4, 4), dtype="float64", fill_value=0.0)
    group.create_array("done", shape=(n,), chunks=(1,), dtype="bool", fill_value=False)
    group.attrs.update({
        "format": STORE_FORMAT,
        "format_version": FORMAT_VERSION,
        "sequences": list(sequences),
        "shape": list(spatial),
        "patient_ids": list(patient_ids),
        "preprocessing": preprocessing,
        "created": created,
        "software": software,
    })
    write_clinical(group, patient_ids, clinical)
    write_json_atomic(Path(path) / MANIFEST, {"patients": {}, "excluded": {}})
    return group


def write_clinical(group: zarr.Group, patient_ids: Sequence[str], clinical: pd.DataFrame) -> None:
    """(Re)write the clinical columns in slot order; NaN where a patient has no clinical row."""
    table = clinical.reindex(list(patient_ids))
    sub = group.require_group("clinical")
    for column in table.columns:
        values = table[column].to_numpy(dtype="float64")
        if column in sub:
            del sub[column]
        array = sub.create_array(column, shape=values.shape, chunks=values.shape or (1,), dtype="float64",
                                 fill_value=float("nan"))
        array[:] = values
    group.attrs["clinical_columns"] = list(table.columns)


def grow_store(group: zarr.Group, new_ids: Sequence[str]) -> None:
    """Append empty slots for patients new to an existing store."""
    ids = list(group.attrs["patient_ids"]) + list(new_ids)
    n = len(ids)
    for name in _ARRAYS:
        array = group[name]
        array.resize((n, *array.shape[1:]))
    group.attrs["patient_ids"] = ids


def erase_patient(group: zarr.Group, index: int) -> None:
    """Unmark slot `index` and erase its voxels, mask, label, affine and clinical values (a withdrawn
    patient: chunks at their fill value are deleted by zarr, so nothing of the images stays)."""
    group["done"][index] = False
    for name in ("images", "masks", "labels", "missing", "affines"):
        array = group[name]
        array[index] = array.fill_value
    for column in group.attrs["clinical_columns"]:
        group[f"clinical/{column}"][index] = np.nan


def write_patient(path: Path, index: int, image: np.ndarray, mask: np.ndarray, label: np.ndarray,
                  missing: np.ndarray, affine: np.ndarray) -> str:
    """Write one patient's arrays into its slot (``done`` untouched); returns their checksum.

    Opens the store itself, so it can run in a worker process.
    """
    group = zarr.open_group(store=str(path), mode="r+", zarr_format=3)
    group["images"][index] = image
    group["masks"][index] = mask
    group["labels"][index] = label
    group["missing"][index] = missing
    group["affines"][index] = affine
    return array_checksum(image, mask, label)


class CohortStore:
    """Read access to a cohort store; validates the format on opening.

    Zarr is opened lazily, on first array access in the calling process, so a store object
    can be handed to forked DataLoader workers (zarr v3 opened before a fork can deadlock).

    Parameters
    ----------
    path
        The ``.zarr`` directory.

    Raises
    ------
    StoreError
        The path does not exist, is not a cohort store, or has another format version.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()
        attrs_file = self.path / "zarr.json"
        if not attrs_file.is_file():
            raise StoreError(f"cohort store {self.path} does not exist or is not a Zarr v3 store "
                             "(no zarr.json); create one with python -m datasets.convert")
        try:
            meta = json.loads(attrs_file.read_text())
            attrs = meta.get("attributes", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise StoreError(f"cohort store {self.path}: zarr.json is unreadable ({exc})") from exc
        if not isinstance(attrs, dict) or attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.path} is a Zarr store but not a cohort store (attribute format != {STORE_FORMAT!r})")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"cohort store {self.path} has format version {version!r}; this software reads version "
                f"{FORMAT_VERSION}. Re-create it with python -m datasets.convert"
            )
        missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise StoreError(f"cohort store {self.path}: attributes {missing} are missing")
        _check_attributes(self.path, attrs)
        _check_patient_ids(self.path, attrs["patient_ids"])
        self.attrs = attrs
        self.manifest = self._read_manifest()
        self._group: zarr.Group | None = None
        self._owner_pid: int | None = None

    def _read_manifest(self) -> dict:
        path = self.path / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"cohort store {self.path}: {MANIFEST} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"cohort store {self.path}: {MANIFEST} is unreadable ({exc})") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("patients"), dict):
            raise StoreError(f"cohort store {self.path}: {MANIFEST} has no 'patients' table")
        return manifest

    # -- lazily opened arrays -------------------------------------------------------------
    @property
    def group(self) -> zarr.Group:
        if self._group is None or self._owner_pid != os.getpid():
            try:
                group = zarr.open_group(store=str(self.path), mode="r", zarr_format=3)
                layout = {name: (group[name].dtype, group[name].shape) for name in self.expected_layout()}
                clinical_arrays = sorted(group["clinical"].array_keys())
            except Exception as exc:  # zarr raises KeyError, ValueError, JSON and codec errors here
                raise StoreError(f"cohort store {self.path} cannot be opened ({type(exc).__name__}: {exc})") from exc
            for name, (dtype, shape) in self.expected_layout().items():
                if layout[name] != (np.dtype(dtype), shape):
                    raise StoreError(f"cohort store {self.path}: array '{name}' is {layout[name][0]} "
                                     f"{list(layout[name][1])}, expected {dtype} {list(shape)}")
            if clinical_arrays != sorted(self.attrs["clinical_columns"]):
                raise StoreError(f"cohort store {self.path}: clinical arrays {clinical_arrays} differ from the "
                                 f"attribute clinical_columns {self.attrs['clinical_columns']}")
            self._group, self._owner_pid = group, os.getpid()
        return self._group

    def expected_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Array name -> (dtype, shape) that the attributes imply."""
        n, c, spatial = len(self.patient_ids), len(self.sequences), self.shape
        layout = {"images": ("float16", (n, c, *spatial)), "masks": ("uint8", (n, *spatial)),
                  "labels": ("uint8", (n, *spatial)), "missing": ("bool", (n, c)), "affines": ("float64", (n, 4, 4)),
                  "done": ("bool", (n,))}
        layout.update({f"clinical/{col}": ("float64", (n,)) for col in self.attrs["clinical_columns"]})
        return layout

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_group"] = None
        state["_owner_pid"] = None
        return state

    # -- description ----------------------------------------------------------------------
    @property
    def patient_ids(self) -> list[str]:
        return list(self.attrs["patient_ids"])

    @property
    def sequences(self) -> list[str]:
        return list(self.attrs["sequences"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.attrs["shape"])

    def done(self) -> np.ndarray:
        return np.asarray(self._read("done", slice(None)), dtype=bool)

    def usable(self) -> np.ndarray:
        """Slot indices of patients whose data are complete and not excluded."""
        done = self.done()
        records = self.manifest["patients"]
        return np.array([i for i, pid in enumerate(self.patient_ids)
                         if done[i] and isinstance(records.get(pid), dict) and records[pid].get("status") == "ok"],
                        dtype=int)

    def clinical(self) -> pd.DataFrame:
        """Clinical columns of every slot, index = patient_id (float64, NaN = unknown)."""
        columns = {c: np.asarray(self._read(f"clinical/{c}", slice(None)), dtype="float64")
                   for c in self.attrs["clinical_columns"]}
        frame = pd.DataFrame(columns, index=pd.Index(self.patient_ids, name="patient_id"))
        return frame

    def sha256(self) -> str:
        """A hash of everything a study's result depends on: the attributes, the manifest (with each
        patient's status and the checksum of its written voxels, mask and label), the clinical
        arrays and the ``done`` flags. The voxels enter through their checksums, which a study
        checks as it reads every volume (`study.data.read_volumes`) and ``--verify`` re-checks."""
        digest = hashlib.sha256(json.dumps({"attrs": self.attrs, "manifest": self.manifest}, sort_keys=True).encode())
        for column in sorted(self.attrs["clinical_columns"]):
            digest.update(column.encode())
            digest.update(np.ascontiguousarray(self._read(f"clinical/{column}", slice(None)), dtype="<f8").tobytes())
        digest.update(np.ascontiguousarray(self.done(), dtype=bool).tobytes())
        return digest.hexdigest()

    # -- voxel data -----------------------------------------------------------------------
    def _read(self, name: str, index) -> np.ndarray:
        try:
            return self.group[name][index]
        except StoreError:
            raise
        except Exception as exc:  # codec errors on truncated chunks, missing chunk files, ...
            raise StoreError(f"cohort store {self.path}: array '{name}' at {index} cannot be read ({type(exc).__name__}: {exc})") from exc

    def image(self, index: int) -> np.ndarray:
        """float16 [C, X, Y, Z] of slot `index`."""
        return self._read("images", index)

    def mask(self, index: int) -> np.ndarray:
        return self._read("masks", index)

    def label(self, index: int) -> np.ndarray:
        return self._read("labels", index)

    def missing(self, index: int) -> np.ndarray:
        return self._read("missing", index)

    def affine(self, index: int) -> np.ndarray:
        return self._read("affines", index)

    def images(self, indices: Iterable[int]) -> np.ndarray:
        """float16 [len(indices), C, X, Y, Z], read chunk by chunk."""
        indices = list(indices)
        out = np.empty((len(indices), len(self.sequences), *self.shape), dtype=np.float16)
        for k, i in enumerate(indices):
            out[k] = self.image(int(i))
        return out


def _check_attributes(path: Path, attrs: dict) -> None:
    """Types of the attributes everything else relies on (a hand-edited zarr.json fails here)."""
    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)

    checks = [
        (strings(attrs["sequences"]) and len(attrs["sequences"]) >= 1, "sequences must be a list of names"),
        (isinstance(attrs["shape"], list) and len(attrs["shape"]) == 3
         and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in attrs["shape"]),
         "shape must be three positive whole numbers"),
        (strings(attrs["patient_ids"]) and len(set(attrs["patient_ids"])) == len(attrs["patient_ids"]),
         "patient_ids must be a list of distinct ids"),
        (strings(attrs["clinical_columns"]) and {"time", "event"} <= set(attrs["clinical_columns"]),
         "clinical_columns must list at least time and event"),
        (isinstance(attrs["preprocessing"], dict) and attrs["preprocessing"].get("sequences") == attrs["sequences"]
         and attrs["preprocessing"].get("shape") == attrs["shape"] and "spacing" in attrs["preprocessing"],
         "preprocessing must be the conversion's settings, with the store's sequences and shape"),
    ]
    for ok, message in checks:
        if not ok:
            raise StoreError(f"cohort store {path}: attribute {message} (zarr.json was edited or damaged; "
                             "re-create the store with python -m datasets.convert)")


def _check_patient_ids(path: Path, patient_ids: list[str]) -> None:
    """Ids that a spreadsheet would run as formulas in the CSV files a study writes (CWE-1236),
    made by a converter that did not refuse them: the store is refused, naming the id."""
    for pid in patient_ids:
        problem = formula_problem(pid)
        if problem:
            raise StoreError(f"cohort store {path}: patient id {pid!r} {problem}: a spreadsheet would run it as a "
                             "formula in the CSV files a study writes (CWE-1236). Convert the export again with "
                             "python -m datasets.convert into a new --out: it excludes such ids (rename the patient "
                             "to keep it)")


def truncated_chunks(path: str | Path) -> list[str]:
    """Chunk files shorter or longer than their blosc frame header says (bytes 12-15: the frame's
    compressed size). LZ4 can decode a frame missing its last bytes without an error, so an
    interrupted copy may read back cleanly; the header cannot be fooled."""
    root = Path(path)
    problems = []
    blosc_arrays = [meta.parent for meta in sorted(root.glob("**/zarr.json"))
                    if any(c.get("name") == "blosc" for c in json.loads(meta.read_text()).get("codecs", []))]
    for chunk in (c for array in blosc_arrays for c in sorted((array / "c").rglob("*")) if c.is_file()):
        size = chunk.stat().st_size
        with open(chunk, "rb") as handle:
            header = handle.read(16)
        framed = int.from_bytes(header[12:16], "little") if len(header) == 16 else -1
        if framed != size:
            problems.append(f"chunk {chunk.relative_to(root)} is {size} bytes, its blosc frame says {framed}: "
                            "truncated or altered (copy the store again)")
    return problems


def verify_store(path: str | Path) -> list[str]:
    """Re-read every array and every patient marked done, and check them against the manifest.

    Returns the problems found (empty list: the store is sound). Raises StoreError when the
    store cannot be opened at all.
    """
    store = CohortStore(path)
    problems: list[str] = []
    for name in store.expected_layout():
        if name not in ("images", "masks", "labels"):  # read per patient below
            try:
                values = store._read(name, slice(None))
            except StoreError as exc:
                problems.append(str(exc))
                continue
            if name in ("clinical/time", "clinical/event") and np.isnan(values[store.usable()]).any():
                problems.append(f"array '{name}' has no value for some patients marked usable")
    if problems:
        return problems
    done = store.done()
    records = store.manifest["patients"]
    for i, pid in enumerate(store.patient_ids):
        record = records.get(pid)
        if record is not None and (not isinstance(record, dict) or not isinstance(record.get("status"), str)):
            problems.append(f"patient {pid}: manifest record has no status")
            continue
        if not done[i]:
            if record and record.get("status") == "ok":
                problems.append(f"patient {pid}: manifest says ok but data are not marked done")
            continue
        if not record:
            problems.append(f"patient {pid}: marked done but has no manifest record (rerun the conversion)")
            continue
        try:
            image, mask, label = store.image(i), store.mask(i), store.label(i)
        except StoreError as exc:
            problems.append(f"patient {pid}: {exc}")
            continue
        if array_checksum(image, mask, label) != record.get("checksum"):
            problems.append(f"patient {pid}: data differ from the checksum recorded at conversion")
        elif not np.isfinite(image).all():
            problems.append(f"patient {pid}: image has NaN/inf values")
        else:
            voxel = float(np.linalg.norm(np.asarray(store.affine(i), dtype=float)[:3, 0]))
            problem = content_problem(image, mask, store.missing(i), voxel)
            if problem:
                problems.append(f"patient {pid}: {problem} (marked usable; rerun the conversion to exclude it)")
    # Frames that still decode to the recorded data but are cut short: checked last, as a chunk
    # that cannot be read at all is already named above.
    return problems or truncated_chunks(store.path)
