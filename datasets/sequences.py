"""Which file in a patient folder holds which MRI sequence.

Site exports name files in many ways: BraTS (`<id>_t1ce.nii.gz`, `BraTS-GLI-00000-000-t1c.nii.gz`),
plain (`t1ce.nii.gz`). DICOM data (files found by their ``DICM`` marker, in any folder arrangement)
are sorted by their tags instead (`datasets.dicom`: description and physics). A file matches a sequence when its
name, with the extension and a leading patient id removed, matches one of the sequence's patterns
(case-insensitive, whole name or one of its `_`/`-`/`.`-separated endings). Besides BraTS and plain
names, the common vendor and site names are recognised (`DEFAULT_PATTERNS`: ``T1_KM``, ``t1gd``,
``T1+C``, ``T1post``, ``T1_MPRAGE``, ``t1_mprage_sag``, ``T2_TSE``, ``FLAIR_3D``, ...); ``--pattern``
adds others. An image file that matches no sequence, or several, is reported as unrecognised
(never guessed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import bids, dicom
from datasets.errors import InputError

DEFAULT_SEQUENCES = ("t1", "t1c", "t2", "flair")
LABEL_KEY = "label"

# Building blocks of the built-in names (full match on the lower-case name without extension and
# leading patient id). Vendors and sites name sequences by weighting, readout and contrast:
#   contrast-enhanced T1: c, ce, gd (gadolinium), km (German "Kontrastmittel"), post, +c, contrast;
#   T1 readouts: MPRAGE / MP-RAGE / MPR (Siemens), SPGR / FSPGR / BRAVO (GE), TFE / FFE (Philips),
#   FL3D / FLASH / VIBE, SE, TSE;
#   T2 readouts: TSE / FSE / FRFSE, BLADE / PROPELLER, SPACE / CUBE / VISTA;
#   FLAIR: FLAIR, T2F (BraTS 2023), TIRM / dark-fluid / da-fl (Siemens), 3D SPACE / CUBE FLAIR;
#   weighting written T1, T1W or T1WI ("weighted image").
# Decorations that carry no weighting are allowed before, between and after: planes (sag, cor, ax,
# tra), 2D/3D, iso, fs / fat-sat, Siemens protocol suffixes (p2), series numbers and dates.
# T2* (t2star), DWI, ADC, SWI, localisers and T1-FLAIR (t1_flair: a T1 or a FLAIR?) are not matched:
# they are reported as unrecognised (or ambiguous), never guessed.
_S = r"[-_. ]?"
_PLANE = r"(?:sag|sagittal|cor|coronal|ax|axial|tra|trans|transversal|transverse|obl|oblique)"
_LEAD = rf"(?:(?:[23]d|{_PLANE}){_S})*"
_DECO = rf"(?:{_S}(?:{_PLANE}|[23]d|iso|hr|mpr|fs|fatsat|fat{_S}sat|nd|p[0-9]|[0-9]+(?:mm)?))*"
_MID = rf"(?:{_S}(?:{_PLANE}|[23]d))*"  # decorations between weighting and readout (T1W_3D_TFE)
_T1 = r"t1(?:w|wi)?"
_T2 = r"t2(?:w|wi)?"
_T1_BARE = rf"(?:mp{_S}rage|spgr|fspgr|bravo)"  # T1 readouts that name a T1 on their own
_T1_READOUT = rf"(?:{_T1_BARE}|mpr|se|tse|fse|space|cube|flash|fl[23]d|vibe|tfe|ffe|tfl)"
_CONTRAST = (rf"(?:c|ce|gd|gad|km|kontrast|post|postcontrast|post{_S}gd|post{_S}km|post{_S}contrast|contrast|"
             rf"enhanced|\+{_S}(?:c|gd|km)?)")
_T1_ANY = rf"(?:{_T1}(?:{_MID}{_S}{_T1_READOUT})?|{_T1_BARE})"
_T2_READOUT = r"(?:tse|fse|frfse|se|blade|propeller|space|cube|vista|haste|drive)"
_FLAIR_READOUT = r"(?:space|spc|cube|vista|tse|fse|3d|2d|ir)"
_DARK_FLUID = rf"(?:flair|tirm|dark{_S}fluid|da{_S}fl)"

# Regular expressions (full match, lower case) for each sequence key.
DEFAULT_PATTERNS: dict[str, str] = {
    "t1": rf"{_LEAD}(?:{_T1_ANY}(?:{_S}(?:native|nativ|pre|precontrast))?|(?:native|nativ|pre|precontrast){_S}{_T1_ANY}|"
          rf"t1n){_DECO}",
    "t1c": rf"{_LEAD}(?:{_T1_ANY}{_DECO}{_S}{_CONTRAST}|{_CONTRAST}{_S}{_T1_ANY}|"
           rf"{_T1}{_S}{_CONTRAST}{_MID}{_S}{_T1_READOUT})(?:{_S}{_CONTRAST})?{_DECO}",
    "t2": rf"{_LEAD}(?:{_T2}(?:{_MID}{_S}{_T2_READOUT})?|{_T2_READOUT}{_S}{_T2}){_DECO}",
    "flair": rf"{_LEAD}(?:(?:{_T2}{_S})?(?:{_FLAIR_READOUT}{_S})?{_DARK_FLUID}(?:{_S}(?:{_T2}|{_FLAIR_READOUT}))?|t2f)"
             rf"{_DECO}(?:{_S}{_DARK_FLUID})?{_DECO}",
    LABEL_KEY: r"seg|segmentation|label|labels|tumou?r_?label|tumou?r_?mask|tumou?r",
}
# A name whose matched part is preceded by one of these words mentions a contrast agent: a T1 there
# may be a contrast-enhanced one (BIDS "ce-gadolinium_T1w"): reported as ambiguous, never guessed.
_CONTRAST_WORDS = {"ce", "gd", "gad", "gadolinium", "km", "kontrast", "contrast", "post", "postcontrast", "enhanced"}

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Said wherever a file matched no sequence: how to name it.
PATTERN_HINT = ("name such files with --pattern SEQUENCE=REGEX (a full match on the lower-case file name without "
                "the patient id and extension, e.g. --pattern t1c='t1_tra_late'; it adds to the built-in names and "
                "wins over them)")


def _strip_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def image_suffix(name: str) -> str:
    """The image extension of a file name ("" for a DICOM series folder)."""
    lower = name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if lower.endswith(suffix)), "")


def is_image_entry(entry: Path) -> bool:
    """Whether a patient folder's entry is an image the converter considers (an image file, DICOM
    files or a folder with DICOM files under it, or something that is neither file nor folder);
    hidden entries are not."""
    if entry.name.startswith("."):
        return False
    if entry.is_file():
        return _strip_suffix(entry.name) is not None or dicom.is_dicom_file(entry)
    if entry.is_dir():
        return dicom.holds_dicom(entry)
    return True  # a dangling symlink, a loop, a FIFO: matched by its name, refused when it is read


def _is_dicom_entry(entry: Path) -> bool:
    """DICOM data, told apart by its tags (`datasets.dicom`) rather than its name."""
    return _strip_suffix(entry.name) is None and (entry.is_dir() or (entry.is_file() and dicom.is_dicom_file(entry)))


@dataclass
class FolderScan:
    """What one patient folder holds: sequence key -> file, and the image files not used."""

    found: dict[str, Path] = field(default_factory=dict)
    unrecognised: list[tuple[Path, str]] = field(default_factory=list)  # (entry, why: matches no / several)
    entries: list[Path] = field(default_factory=list)  # every entry of the folder (names to withhold)
    duplicates: dict[str, list[Path]] = field(default_factory=dict)  # sequence -> every entry matching it, if >1
    layout_problem: str | None = None  # a BIDS subject whose images cannot be located (several sessions)
    labels: dict[Path, str] = field(default_factory=dict)  # how messages name an entry (DICOM series)
    evidence: dict[Path, str] = field(default_factory=dict)  # why a DICOM series was taken for its sequence

    def recognised(self) -> dict[Path, str]:
        """Every entry that matched a sequence asked for (duplicates too) -> its sequence."""
        out = {path: key for key, path in self.found.items()}
        out.update({path: key for key, paths in self.duplicates.items() for path in paths})
        return out

    def problem(self, patient_id: str) -> str | None:
        """Why the folder cannot be used as it is (two files for one sequence), or None."""
        if self.layout_problem:
            return f"patient {patient_id}: {self.layout_problem}"
        for key, paths in self.duplicates.items():
            first, second = (self.labels.get(p, p.name) for p in paths[:2])
            return (f"patient {patient_id}: both {first} and {second} match sequence '{key}'; "
                    f"rename one, remove it from the export or give a stricter --pattern {key}=REGEX")
        return None


@dataclass(frozen=True)
class SequenceMatcher:
    """Maps file names to sequence keys.

    Parameters
    ----------
    sequences
        The image sequences wanted, in channel order.
    patterns
        Additions to `DEFAULT_PATTERNS` (regular expressions matched against the lower-case name):
        a name matched by a given pattern takes that pattern's sequence, whatever the built-in
        names say; other names are matched by the built-in ones.
    """

    sequences: tuple[str, ...] = DEFAULT_SEQUENCES
    patterns: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        known = set(DEFAULT_PATTERNS) | set(self.patterns or {})
        unknown = [s for s in self.sequences if s not in known]
        if unknown:
            raise InputError(
                f"no file-name pattern for sequence(s) {unknown}; give one with --pattern NAME=REGEX"
            )
        try:
            user = {k: re.compile(v, re.IGNORECASE) for k, v in (self.patterns or {}).items()}
        except re.error as exc:
            raise InputError(f"invalid --pattern regular expression: {exc}") from exc
        defaults = {k: re.compile(v, re.IGNORECASE) for k, v in DEFAULT_PATTERNS.items()}
        object.__setattr__(self, "_tables", (user, defaults))

    def classify(self, name: str, patient_id: str) -> tuple[str | None, tuple[str, ...]]:
        """(sequence key, ()) for a file or folder name; (None, keys) when it matches several
        sequences (ambiguous: never guessed); (None, ()) when it matches none.

        The name, without extension and leading patient id, is matched whole, then by its
        shorter endings (``DOE_JOHN_19600101_t1_km`` -> ``t1_km``); patterns given with
        `patterns` first. A name whose dropped beginning names another sequence
        (``t1_flair``) is ambiguous.
        """
        if self._tables[0]:  # type: ignore[attr-defined]  # the user's --pattern wins over the BIDS names
            key, several = self._classify(name, patient_id, user_only=True)
            if key or several:
                return key, several
        if bids.is_bids_name(name):  # BIDS says what a file is in its suffix and entities
            return bids.sequence_of(name), ()
        return self._classify(name, patient_id)

    def _classify(self, name: str, patient_id: str, user_only: bool = False) -> tuple[str | None, tuple[str, ...]]:
        stem = _strip_suffix(name)
        lowered = (stem if stem is not None else name).lower()
        pid = patient_id.lower()
        if pid and lowered.startswith(pid):
            lowered = lowered[len(pid):].lstrip("_-. ")
        endings = [(lowered, "")] + [(lowered[m.end():], lowered[:m.start()])
                                     for m in re.finditer(r"[-_. ]+", lowered) if m.end() < len(lowered)]
        for table in self._tables[:1] if user_only else self._tables:  # type: ignore[attr-defined]
            for ending, dropped in endings:
                keys = [k for k, pattern in table.items() if pattern.fullmatch(ending)]
                if not keys:
                    continue
                words = [w for w in re.split(r"[-_. ]+", dropped) if w]
                keys += sorted({k for w in words for k, p in table.items() if k not in keys and p.fullmatch(w)})
                defaults = table is self._tables[1]  # type: ignore[attr-defined]
                if keys == ["t1"] and defaults and _CONTRAST_WORDS & set(words):
                    keys.append("t1c")
                return (keys[0], ()) if len(keys) == 1 else (None, tuple(keys))
        return None, ()

    def key_for(self, name: str, patient_id: str) -> str | None:
        """The sequence key a file or folder name stands for, or None (none, or ambiguous)."""
        return self.classify(name, patient_id)[0]

    def scan(self, folder: Path, patient_id: str) -> FolderScan:
        """Sort one patient folder's image entries by sequence (two entries for one sequence are
        listed in `FolderScan.duplicates`). Entries of sequences not asked for are left out silently."""
        scan = FolderScan()
        wanted = (*self.sequences, LABEL_KEY)
        if bids.is_subject_folder(folder):
            anat, scan.layout_problem = bids.anat_folder(folder)
            if anat is None:
                return scan
            folder = anat
        dicom_entries = []
        for entry in sorted(folder.iterdir()):
            scan.entries.append(entry)
            if not is_image_entry(entry):
                continue
            if _is_dicom_entry(entry):
                dicom_entries.append(entry)
                continue
            key, several = self.classify(entry.name, patient_id)
            if several:
                scan.unrecognised.append((entry, f"matches several sequences ({', '.join(several)}); not used, "
                                                 "never guessed"))
                continue
            if key is None:
                scan.unrecognised.append((entry, "matches no sequence"))
                continue
            if key not in wanted:
                continue
            if key in scan.found:
                scan.duplicates.setdefault(key, [scan.found[key]]).append(entry)
                continue
            scan.found[key] = entry
        if dicom_entries:
            self._scan_dicom(dicom_entries, folder, patient_id, scan, wanted)
        return scan

    def _scan_dicom(self, entries: list[Path], folder: Path, patient_id: str, scan: FolderScan,
                    wanted: tuple[str, ...]) -> None:
        """Sort the DICOM series under a patient folder by their tags (`datasets.dicom`)."""
        found, unreadable = dicom.find_series(entries, folder)
        scan.unrecognised.extend(unreadable)
        candidates: dict[str, list[tuple[tuple[bool, bool], dicom.Series, str]]] = {}
        for series in found:
            scan.labels[series.entry] = f"{series.label()} at {series.entry}"
            why = dicom.set_aside(series)
            if why:
                scan.unrecognised.append((series.entry, f"({series.label()}) {why}"))
                continue
            folder_name = series.entry.name if series.entry.is_dir() else None
            key, why, named = dicom.classify(series, lambda text: self.classify(text, patient_id), folder_name)
            if key is None:
                scan.unrecognised.append((series.entry, f"({series.label()}): {why}"))
            elif key in wanted:
                # A series named by the site outranks one recognised by its physics only, an original a reformat.
                candidates.setdefault(key, []).append(((named, not series.derived), series, why))
        for key, ranked in candidates.items():
            best = max(rank for rank, _, _ in ranked)
            top = [(series, why) for rank, series, why in ranked if rank == best]
            for rank, series, _ in ranked:
                if rank != best:
                    reason = "named by its description" if best[0] and not rank[0] else "original"
                    scan.unrecognised.append((series.entry, f"({series.label()}) also looks like {key}, but another "
                                                            f"series ({reason}) is taken"))
            entries_for_key = ([scan.found[key]] if key in scan.found else []) + [series.entry for series, _ in top]
            if len(entries_for_key) > 1:
                scan.duplicates[key] = entries_for_key
                scan.found.setdefault(key, entries_for_key[0])
                continue
            series, why = top[0]
            scan.found[key] = series.entry
            scan.evidence[series.entry] = f"{series.label()} is {key} by {why}"
        patients = {series.patient_id for series in found if series.patient_id}
        if len(patients) > 1 and not scan.layout_problem:
            counts = {pid: sum(s.patient_id == pid for s in found) for pid in patients}
            majority = max(counts, key=counts.get)
            strays = [s.label() for s in found if s.patient_id and s.patient_id != majority]
            scan.layout_problem = (f"its DICOM series carry {len(patients)} different PatientIDs (withheld): "
                                   f"{'; '.join(strays)} may belong to another patient; move it to its own folder")

    def find(self, folder: Path, patient_id: str) -> tuple[dict[str, Path], list[str]]:
        """Files of one patient folder by sequence key, and problems (ambiguous or unmatched files);
        InputError when two files match one sequence."""
        scan = self.scan(folder, patient_id)
        problem = scan.problem(patient_id)
        if problem:
            raise InputError(problem)
        return scan.found, [f"file {entry} {why}; ignored" for entry, why in scan.unrecognised]


def parse_patterns(items: Sequence[str]) -> dict[str, str]:
    """Parse `NAME=REGEX` command-line items."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, regex = item.partition("=")
        if not sep or not name or not regex:
            raise InputError(f"--pattern expects NAME=REGEX, got {item!r}")
        out[name.strip().lower()] = regex
    return out
