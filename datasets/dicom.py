"""DICOM exports: series found and told apart by their tags, and read as volumes.

A patient folder exported from a PACS holds DICOM files in any arrangement: one folder per series
(TCIA's ``study/3.000000-T1POST-12345/1-01.dcm``, ``S0001/I0001``), or every series' files side by
side (``DICOM/IM00001``), with or without a ``DICOMDIR``. Neither the folder nor the file names say
which sequence a series holds; its tags do. So every DICOM file under the patient folder (found by
its ``DICM`` marker, not its name) is grouped by ``SeriesInstanceUID``, and each series is told apart:

- **by what the site called it**: ``SeriesDescription``, else ``ProtocolName``, else the name of
  the folder it has to itself, through the same built-in and ``--pattern`` names as file names
  (`datasets.sequences`);
- **by its physics** (`weighting`), from ``RepetitionTime``, ``EchoTime``, ``InversionTime``,
  ``ScanningSequence`` and ``ContrastBolusAgent``: an inversion time >= 1,500 ms nulls fluid
  (FLAIR); TR >= 2,000 ms and TE >= 60 ms without inversion is T2-weighted; TE <= 15 ms with TR <=
  1,000 ms, or an inversion-prepared short-TE readout (MPRAGE), is T1-weighted, and contrast-enhanced
  when ``ContrastBolusAgent`` names an agent. Echo-planar series (diffusion, perfusion, BOLD) and
  the others are no sequence.

When the two agree, or only one speaks, the series takes that sequence; when they disagree (a
"T2 FLAIR" description on a TR 500 ms, TE 10 ms series) it is refused naming both: never guessed.
Among the candidates of one sequence a series named by its description wins over one recognised
by its physics alone (a time-of-flight angiogram is physically T1-weighted), and an original
series over a derived one (a reformat); two left is ambiguous, and the patient is refused naming
them. Localisers, non-MR objects (SR, PR, SEG) and single images are set aside with their reason.

Reading (`read_volume`) sorts the images along the slice normal and builds the RAS affine from
``ImagePositionPatient``, ``ImageOrientationPatient`` and ``PixelSpacing``, with the rescale slope
and intercept applied; missing slices, several images at one position (multi-echo or dynamic
series), mixed orientations or sizes are refused naming the series. A series is referred to by the
folder it has to itself, or by its first file when it shares a folder (`Series.entry`): either
stands for the whole series wherever the converter hashes or reads a source.

Library: pydicom (already MONAI's DICOM reader). Compressed transfer syntaxes need pydicom's pixel
handlers (``pip install pylibjpeg pylibjpeg-libjpeg``); the error says so.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.errors import ImageError

MAX_DEPTH = 5  # patient / study / series / (sub-folders of some viewers' exports) / file
FLAIR_MIN_TI_MS = 1500.0
T2_MIN_TR_MS, T2_MIN_TE_MS = 2000.0, 60.0
T1_MAX_TE_MS, T1_MAX_TR_MS = 15.0, 1000.0
T1_PREP_TI_MS = (300.0, 1500.0)  # MPRAGE / IR-SPGR inversion times
# Descriptions of series that are none of the study's sequences however their physics reads:
# localisers, angiography, diffusion, perfusion, susceptibility, functional, spectroscopy, maps.
_NOT_STRUCTURAL = re.compile(
    r"locali[sz]er|scout|survey|pilot|3[-_ ]?plane|tof|angio|mra\b|\bdwi|diffusion|\bdti|\badc|trace|"
    r"perf|\bdsc\b|\bdce\b|\basl\b|\bswi|susceptib|\bbold|fmri|spectro|\bmrs\b|\bsvs\b|csi|field[-_ ]?map|"
    r"\bb0\b|\bmip\b|\bmpr\b$|t2\*|t2star", re.IGNORECASE)
_HEADER_TAGS = ["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ProtocolName", "Modality", "ImageType",
                "RepetitionTime", "EchoTime", "InversionTime", "ScanningSequence", "ContrastBolusAgent", "PatientID",
                "NumberOfFrames", "DiffusionBValue"]


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (the ``DICM`` marker after the 128-byte preamble), whatever its name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Every DICOM file under `root` (itself, if a file), hidden entries and DICOMDIR indexes left out."""
    root = Path(root)
    if root.is_file():
        return [root] if is_dicom_file(root) and root.name.upper() != "DICOMDIR" else []
    out = []
    base = len(root.parts)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and len(Path(folder).parts) - base < max_depth)
        for name in sorted(files):
            path = Path(folder) / name
            if not name.startswith(".") and name.upper() != "DICOMDIR" and is_dicom_file(path):
                out.append(path)
    return out


def holds_dicom(entry: Path) -> bool:
    """Whether a patient folder's entry is a DICOM file or a folder with DICOM files under it."""
    if entry.is_file():
        return is_dicom_file(entry)
    if not entry.is_dir():
        return False
    for folder, dirs, files in os.walk(entry):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and len(Path(folder).parts) - len(entry.parts) < MAX_DEPTH]
        if any(not f.startswith(".") and f.upper() != "DICOMDIR" and is_dicom_file(Path(folder) / f) for f in files):
            return True
    return False


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class Series:
    """One DICOM series of a patient folder: its files and the tags that say what it is."""

    uid: str
    files: list[Path]
    number: int | None = None
    description: str = ""
    protocol: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    scanning: tuple[str, ...] = ()
    contrast_agent: str = ""
    patient_id: str = ""
    frames: int = 1
    diffusion: bool = False
    entry: Path = field(default=Path("."))  # the folder it has to itself, else its first file

    def label(self) -> str:
        """How messages name it: number, description and size (no patient data)."""
        number = f"series {self.number}" if self.number is not None else "a series"
        described = f" '{self.description or self.protocol}'" if (self.description or self.protocol) else ""
        return f"DICOM {number}{described}, {len(self.files)} file(s)"

    @property
    def derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0].upper() == "DERIVED"


def _series_from(ds, uid: str) -> Series:
    def text(name: str) -> str:
        value = ds.get(name)
        return str(value).strip() if value is not None else ""

    def values(name: str) -> tuple[str, ...]:
        value = ds.get(name)
        if value is None:
            return ()
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        return tuple(str(v).strip().upper() for v in items)

    number = _number(ds.get("SeriesNumber"))
    return Series(uid=uid, files=[], number=int(number) if number is not None else None,
                  description=text("SeriesDescription"), protocol=text("ProtocolName"), modality=text("Modality"),
                  image_type=values("ImageType"), tr=_number(ds.get("RepetitionTime")), te=_number(ds.get("EchoTime")),
                  ti=_number(ds.get("InversionTime")), scanning=values("ScanningSequence"),
                  contrast_agent=text("ContrastBolusAgent"), patient_id=text("PatientID"),
                  frames=int(_number(ds.get("NumberOfFrames")) or 1),
                  diffusion=_number(ds.get("DiffusionBValue")) not in (None, 0.0))


def find_series(entries: list[Path], patient_folder: Path) -> tuple[list[Series], list[tuple[Path, str]]]:
    """The DICOM series under a patient folder's entries, and the files that could not be read
    as DICOM headers (with why). Files are grouped by SeriesInstanceUID."""
    import pydicom

    by_uid: dict[str, Series] = {}
    unreadable: list[tuple[Path, str]] = []
    for entry in entries:
        for path in dicom_files(entry):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            except Exception as exc:  # truncated or foreign files raise many types
                unreadable.append((path, f"cannot be read as DICOM ({type(exc).__name__}: {exc})"))
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid:
                unreadable.append((path, "has no SeriesInstanceUID: not part of a series"))
                continue
            series = by_uid.get(uid) or by_uid.setdefault(uid, _series_from(ds, uid))
            series.files.append(path)
    for series in by_uid.values():
        series.files.sort()
        series.entry = _entry_of(series, by_uid.values(), Path(patient_folder))
    return sorted(by_uid.values(), key=lambda s: (s.number is None, s.number or 0, s.uid)), unreadable


def _entry_of(series: Series, everything, patient_folder: Path) -> Path:
    """The deepest folder holding all of this series and nothing of another, else its first file."""
    folder = Path(os.path.commonpath([str(p.parent) for p in series.files]))
    others = (p for s in everything if s is not series for p in s.files)
    if folder == patient_folder or patient_folder not in folder.parents or any(folder in p.parents for p in others):
        return series.files[0]
    return folder


def set_aside(series: Series) -> str | None:
    """Why a series is none of the study's volumes whatever it is called, or None."""
    if series.modality and series.modality.upper() != "MR":
        return f"is not an MR image series (modality {series.modality})"
    if "LOCALIZER" in series.image_type:
        return "is a localiser"
    if series.frames <= 1 and len(series.files) < 3:
        return f"holds {len(series.files)} image(s): not a volume"
    return None


def weighting(series: Series) -> tuple[str | None, str]:
    """The sequence a series' physics says it is (t1, t1c, t2, flair, or None) and the evidence."""
    tr, te, ti = series.tr, series.te, series.ti
    said = ", ".join(f"{name} {value:g} ms" for name, value in (("TR", tr), ("TE", te), ("TI", ti)) if value is not None)
    if "EP" in series.scanning or series.diffusion or {"DIFFUSION", "ADC", "TRACEW", "FA"} & set(series.image_type):
        return None, f"echo-planar or diffusion ({said or 'no timing'})"
    if tr is None or te is None:
        return None, "no TR/TE in its headers"
    if ti is not None and ti >= FLAIR_MIN_TI_MS and te >= T2_MIN_TE_MS:
        return "flair", said
    t1_like = te <= T1_MAX_TE_MS and (tr <= T1_MAX_TR_MS or (ti is not None and T1_PREP_TI_MS[0] <= ti <= T1_PREP_TI_MS[1]))
    if t1_like:
        agent = series.contrast_agent.strip().lower()
        enhanced = bool(agent) and agent not in {"none", "no", "nein", "-", "n/a", "na", "0"}
        return ("t1c", f"{said}, contrast agent '{series.contrast_agent}'") if enhanced else ("t1", said)
    if tr >= T2_MIN_TR_MS and te >= T2_MIN_TE_MS and (ti is None or ti < 300.0):
        return "t2", said
    return None, said


def classify(series: Series, classify_name: Callable[[str], tuple[str | None, tuple[str, ...]]],
             folder_name: str | None) -> tuple[str | None, str, bool]:
    """(sequence key or None, why, named) for one series. `classify_name` maps a name to
    (key, ambiguous keys) as file names are matched; `named` says whether a name decided (which
    ranks it above series recognised by their physics only)."""
    physics, evidence = weighting(series)
    named, several, source = None, (), ""
    for source, text in (("description", series.description), ("protocol name", series.protocol),
                         ("folder name", folder_name or "")):
        if text:
            named, several = classify_name(text)
            if named or several:
                break
    family = {"t1": "t1", "t1c": "t1", "t2": "t2", "flair": "flair"}
    if named:
        if physics is None or physics == named:
            return named, f"its {source} '{text}'", True
        if family.get(physics) == family.get(named):
            if named == "t1c":  # many sites leave ContrastBolusAgent empty on enhanced series
                return named, f"its {source} '{text}'", True
            return None, (f"its {source} '{text}' says native {named} but ContrastBolusAgent "
                          f"'{series.contrast_agent}' names a contrast agent: ambiguous, never guessed"), True
        if physics is not None and family.get(named) is None:  # the label, or a user's sequence name
            return named, f"its {source} '{text}'", True
        return None, (f"its {source} '{text}' says {named} but its parameters ({evidence}) say {physics}: "
                      "ambiguous, never guessed"), True
    if several:
        if physics in several:
            return physics, f"its {source} '{text}' (one of {', '.join(several)}) and its parameters ({evidence})", True
        return None, f"its {source} '{text}' matches several sequences ({', '.join(several)}); never guessed", True
    if any(_NOT_STRUCTURAL.search(t) for t in (series.description, series.protocol) if t):
        return None, f"'{series.description or series.protocol}' is none of the study's sequences", False
    if physics:
        return physics, (f"its parameters ({evidence}); its description '{series.description}' names no sequence"
                         if series.description else f"its parameters ({evidence})"), False
    described = f"'{series.description}'" if series.description else "no description"
    return None, f"{described} and its parameters ({evidence}) match no sequence", False


# ---- reading -------------------------------------------------------------------------------------

def series_files(source: Path) -> list[Path]:
    """The files of the series a source stands for: a folder holding one series, or one file of a
    series (its folder's files with the same SeriesInstanceUID)."""
    import pydicom

    source = Path(source)
    if source.is_dir():
        files = dicom_files(source)
        if not files:
            raise ImageError(f"{source} holds no DICOM file")
        uids = {}
        for path in files:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                      .get("SeriesInstanceUID", ""))
            uids.setdefault(uid, []).append(path)
        if len(uids) > 1:
            raise ImageError(f"{source} holds {len(uids)} DICOM series; a source must be one series")
        return files
    uid = str(pydicom.dcmread(source, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
              .get("SeriesInstanceUID", ""))
    return [p for p in sorted(source.parent.iterdir())
            if p.is_file() and not p.name.startswith(".") and is_dicom_file(p)
            and str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                    .get("SeriesInstanceUID", "")) == uid]


def is_dicom_source(path: Path) -> bool:
    """A source the converter reads as a DICOM series (a DICOM file, or a folder of them)."""
    path = Path(path)
    return (path.is_file() and is_dicom_file(path)) or (path.is_dir() and holds_dicom(path))


def _geometry(headers: list, where: Path) -> tuple[list[int], np.ndarray, tuple[int, int]]:
    """The slice order and the LPS affine of a series' headers."""
    orientations = {tuple(round(float(v), 4) for v in h.ImageOrientationPatient) for h in headers}
    if len(orientations) > 1:
        raise ImageError(f"DICOM series {where}: its images have {len(orientations)} orientations (a localiser or "
                         "a multi-plane series), not one volume")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise ImageError(f"DICOM series {where}: its images have several sizes {sorted(sizes)}")
    iop = np.array(next(iter(orientations)), dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    depth = positions @ normal
    order = list(np.argsort(depth, kind="stable"))
    gaps = np.diff(depth[order])
    if (gaps < 1e-3).any():
        raise ImageError(f"DICOM series {where}: several images at one slice position (a multi-echo, dynamic or "
                         "repeated series); export one volume per series")
    if gaps.size and (gaps.max() - gaps.min()) > 0.05 * np.median(gaps) + 1e-3:
        raise ImageError(f"DICOM series {where}: uneven slice positions (gaps {gaps.min():.2f}-{gaps.max():.2f} mm): "
                         "slices are missing")
    spacing = [float(v) for v in headers[0].PixelSpacing]  # (between rows, between columns)
    step = (positions[order[-1]] - positions[order[0]]) / max(len(order) - 1, 1)
    affine = np.eye(4)
    affine[:3, 0] = row * spacing[1]  # along a row: column index i
    affine[:3, 1] = col * spacing[0]  # down a column: row index j
    affine[:3, 2] = step if len(order) > 1 else normal * float(getattr(headers[0], "SliceThickness", 1.0) or 1.0)
    affine[:3, 3] = positions[order[0]]
    return order, affine, next(iter(sizes))


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_headers(source: Path):
    """(files, headers) of the series a source stands for; refuses enhanced multi-frame files."""
    import pydicom

    files = series_files(source)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    if any(int(_number(h.get("NumberOfFrames")) or 1) > 1 for h in headers):
        raise ImageError(f"DICOM series {source}: an enhanced (multi-frame) file; convert it to NIfTI first "
                         "(dcm2niix) and give the NIfTI file")
    missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if any(t not in h for h in headers)]
    if missing:
        raise ImageError(f"DICOM series {source}: {', '.join(missing)} missing: its geometry is unknown")
    return files, headers


def read_volume(source: Path, check: Callable[[np.ndarray, tuple[int, int, int]], str | None] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """A series as a float32 array [X, Y, Z] (X along a row, Y down a column, Z along the slice
    normal) and its RAS affine; rescale slope and intercept applied. `check(affine, shape)`, if
    given, judges the geometry the headers declare before any pixel is read (ImageError with its
    reason)."""
    import pydicom

    files, headers = read_headers(source)
    order, affine, (rows, cols) = _geometry(headers, Path(source))
    problem = check(LPS_TO_RAS @ affine, (cols, rows, len(files))) if check else None
    if problem:
        raise ImageError(f"{problem} (its headers, read before the pixels)")
    volume = np.empty((cols, rows, len(files)), dtype=np.float32)
    for k, index in enumerate(order):
        ds = pydicom.dcmread(files[index])
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            raise ImageError(f"DICOM file {files[index]}: its pixels cannot be decoded ({type(exc).__name__}: {exc}); "
                             f"transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}: install pydicom's pixel "
                             "handlers (pip install pylibjpeg pylibjpeg-libjpeg) or decompress it (dcmdjpeg)") from None
        slope = _number(ds.get("RescaleSlope")) or 1.0
        intercept = _number(ds.get("RescaleIntercept")) or 0.0
        volume[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T
    return volume, LPS_TO_RAS @ affine
