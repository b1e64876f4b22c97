"""Which file in a patient folder holds which MRI sequence.

Site exports name files in many ways: BraTS (`<id>_t1ce.nii.gz`, `BraTS-GLI-00000-000-t1c.nii.gz`),
plain (`t1ce.nii.gz`), TCIA folders of DICOM series (`FLAIR/`). A file matches a sequence when its
name, with the extension and a leading patient id removed, matches one of the sequence's patterns
(case-insensitive, whole name or last `_`/`-`-separated token).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets.errors import InputError

DEFAULT_SEQUENCES = ("t1", "t1c", "t2", "flair")
LABEL_KEY = "label"

# Regular expressions (full match, lower case) for each sequence key.
DEFAULT_PATTERNS: dict[str, str] = {
    "t1": r"t1|t1w|t1n|t1_?native|t1pre|t1_?pre",
    "t1c": r"t1c|t1ce|t1gd|t1_?gd|t1_?post|t1_?contrast|t1[-_]?ce|t1w?_?c",
    "t2": r"t2|t2w",
    "flair": r"flair|t2f|t2_?flair",
    LABEL_KEY: r"seg|label|labels|tumou?r_?label|tumou?r_?mask|tumou?r",
}

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _strip_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in (".dcm", "") and p.is_file() for p in path.iterdir())


@dataclass(frozen=True)
class SequenceMatcher:
    """Maps file names to sequence keys.

    Parameters
    ----------
    sequences
        The image sequences wanted, in channel order.
    patterns
        Overrides of `DEFAULT_PATTERNS` (regular expressions matched against the lower-case name).
    """

    sequences: tuple[str, ...] = DEFAULT_SEQUENCES
    patterns: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        merged = dict(DEFAULT_PATTERNS)
        merged.update(self.patterns or {})
        unknown = [s for s in self.sequences if s not in merged]
        if unknown:
            raise InputError(
                f"no file-name pattern for sequence(s) {unknown}; give one with --pattern NAME=REGEX"
            )
        try:
            compiled = {k: re.compile(v, re.IGNORECASE) for k, v in merged.items()}
        except re.error as exc:
            raise InputError(f"invalid --pattern regular expression: {exc}") from exc
        object.__setattr__(self, "_compiled", compiled)

    def key_for(self, name: str, patient_id: str) -> str | None:
        """The sequence key a file or folder name stands for, or None."""
        stem = _strip_suffix(name)
        if stem is None:
            stem = name  # a DICOM series folder
        lowered = stem.lower()
        pid = patient_id.lower()
        if lowered.startswith(pid):
            lowered = lowered[len(pid):].lstrip("_-.")
        candidates = [lowered, re.split(r"[-_.]", lowered)[-1]]
        wanted = (*self.sequences, LABEL_KEY)
        for candidate in candidates:
            for key in wanted:
                if self._compiled[key].fullmatch(candidate):  # type: ignore[attr-defined]
                    return key
        return None

    def find(self, folder: Path, patient_id: str) -> tuple[dict[str, Path], list[str]]:
        """Files of one patient folder by sequence key, and problems (ambiguous or unmatched files)."""
        found: dict[str, Path] = {}
        problems: list[str] = []
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and _strip_suffix(entry.name) is None:
                continue
            if entry.is_dir() and not _is_dicom_folder(entry):
                continue
            key = self.key_for(entry.name, patient_id)
            if key is None:
                problems.append(f"file {entry} matches no sequence pattern; ignored")
                continue
            if key in found:
                raise InputError(
                    f"patient {patient_id}: both {found[key].name} and {entry.name} match sequence "
                    f"'{key}'; rename one or give a stricter --pattern {key}=REGEX"
                )
            found[key] = entry
        return found, problems


def parse_patterns(items: Sequence[str]) -> dict[str, str]:
    """Parse `NAME=REGEX` command-line items."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, regex = item.partition("=")
        if not sep or not name or not regex:
            raise InputError(f"--pattern expects NAME=REGEX, got {item!r}")
        out[name.strip().lower()] = regex
    return out
