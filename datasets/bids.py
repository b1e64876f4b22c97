"""Exports in BIDS (the Brain Imaging Data Structure, https://bids-specification.readthedocs.io):

    ROOT/participants.tsv                       the clinical table (participant_id, ...)
    ROOT/sub-01/anat/sub-01_T1w.nii.gz          or sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz
    ROOT/sub-01/anat/sub-01_ce-gadolinium_T1w.nii.gz

A patient is a ``sub-*`` folder (other folders of a BIDS root, ``derivatives``, ``code``,
``sourcedata``, are not patients); its images are those of its ``anat`` folder, or of its one
session's (a patient with several sessions is refused naming them: the study wants the
preoperative scan, which only the site knows). A file's sequence is read from its BIDS suffix and
entities, not guessed from words: ``T1w`` with a ``ce-`` entity (contrast agent) is the
contrast-enhanced T1, ``T1w`` without is the native T1, ``T2w`` the T2, ``FLAIR`` the FLAIR;
other suffixes (``T2starw``, ``PDw``, ...) are not the study's sequences.
"""

from __future__ import annotations

import re
from pathlib import Path

# sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>.nii[.gz]
_BIDS_NAME = re.compile(r"sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*_(?P<suffix>[A-Za-z0-9]+)\.nii(?:\.gz)?",
                        re.IGNORECASE)
_SUFFIXES = {"t1w": "t1", "t2w": "t2", "flair": "flair"}


def is_bids_root(root: Path) -> bool:
    """A BIDS dataset: ``dataset_description.json`` or ``participants.tsv`` beside ``sub-*`` folders."""
    if not ((root / "dataset_description.json").is_file() or (root / "participants.tsv").is_file()):
        return False
    return any(p.is_dir() and p.name.startswith("sub-") for p in root.iterdir())


def is_subject_folder(folder: Path) -> bool:
    """A BIDS subject folder: images under ``anat/`` or ``ses-*/anat/``."""
    try:
        return (folder / "anat").is_dir() or any(p.is_dir() and p.name.startswith("ses-") for p in folder.iterdir())
    except OSError:
        return False


def anat_folder(folder: Path) -> tuple[Path | None, str | None]:
    """The folder holding a subject's images, or (None, why not)."""
    if (folder / "anat").is_dir():
        return folder / "anat", None
    sessions = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("ses-"))
    with_anat = [s for s in sessions if (s / "anat").is_dir()]
    if not with_anat:
        return None, f"BIDS subject {folder.name} has no anat folder"
    if len(with_anat) > 1:
        return None, (f"BIDS subject {folder.name} has several sessions with images ({', '.join(s.name for s in with_anat)}): "
                      "the study reads one preoperative scan per patient; keep that session only (move the others "
                      "out of the export)")
    return with_anat[0] / "anat", None


def sequence_of(name: str) -> str | None:
    """The sequence key of a BIDS file name (``t1``, ``t1c``, ``t2``, ``flair``), None if the name is
    not a BIDS image name or not one of these sequences."""
    match = _BIDS_NAME.fullmatch(name)
    if not match:
        return None
    key = _SUFFIXES.get(match.group("suffix").lower())
    if key == "t1" and re.search(r"_ce-[A-Za-z0-9]+", name, re.IGNORECASE):
        return "t1c"
    return key


def is_bids_name(name: str) -> bool:
    return _BIDS_NAME.fullmatch(name) is not None
