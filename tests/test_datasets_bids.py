"""BIDS exports (sub-*/[ses-*/]anat/*_T1w.nii.gz, *_ce-<agent>_T1w, *_T2w, *_FLAIR, participants.tsv):
read by their BIDS names, converted to the same store as the site layout of the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasets import CohortStore
from datasets.bids import sequence_of
from datasets.convert import convert
from tests.conftest import TINY

NAMES = {"t1": "T1w", "t1ce": "ce-gadolinium_T1w", "t2": "T2w", "flair": "FLAIR"}


def _bids(export: Path, root: Path) -> dict[str, str]:
    """The export's patients as a BIDS dataset; returns source id -> BIDS subject."""
    table = pd.read_csv(export / "clinical.csv", dtype=str)
    subjects = {}
    for pid in table["patient_id"]:
        subject = "sub-" + pid.replace("-", "")
        subjects[pid] = subject
        anat = root / subject / "ses-pre" / "anat"
        anat.mkdir(parents=True)
        for sequence, suffix in NAMES.items():
            shutil.copy(export / "images" / pid / f"{pid}_{sequence}.nii.gz", anat / f"{subject}_ses-pre_{suffix}.nii.gz")
        shutil.copy(anat / f"{subject}_ses-pre_T1w.nii.gz", anat / f"{subject}_ses-pre_T2starw.nii.gz")
    (root / "derivatives" / "freesurfer").mkdir(parents=True)  # not a patient
    (root / "dataset_description.json").write_text(json.dumps({"Name": "glioma", "BIDSVersion": "1.9.0"}))
    table.insert(0, "participant_id", table.pop("patient_id").map(subjects))
    table.to_csv(root / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    return subjects


@pytest.mark.parametrize("name, key", [("sub-01_T1w.nii.gz", "t1"), ("sub-01_ses-pre_ce-gd_T1w.nii.gz", "t1c"),
                                       ("sub-01_ce-gadolinium_rec-norm_T1w.nii", "t1c"), ("sub-01_T2w.nii.gz", "t2"),
                                       ("sub-01_acq-3d_FLAIR.nii.gz", "flair"), ("sub-01_T2starw.nii.gz", None),
                                       ("sub-01_T1w.json", None)])
def test_bids_names(name, key):
    assert sequence_of(name) == key


def test_a_bids_export_converts_as_the_same_files_in_the_site_layout(export_copy, tmp_path):
    """`sub-01_ce-gd_T1w` was read as the plain T1 and anat/ folders were skipped."""
    subjects = _bids(export_copy, tmp_path / "bids")
    summary = convert(tmp_path / "bids", tmp_path / "bids" / "participants.tsv", tmp_path / "b.zarr", TINY,
                      progress=False)
    assert sorted(summary.converted) == sorted(subjects.values()), summary.excluded
    assert not summary.excluded
    site = tmp_path / "s.zarr"
    convert(export_copy / "images", export_copy / "clinical.csv", site, TINY, progress=False)
    bids, plain = CohortStore(tmp_path / "b.zarr"), CohortStore(site)
    for pid, subject in subjects.items():
        a, b = bids.patient_ids.index(subject), plain.patient_ids.index(pid)
        assert not bids.missing(a).any()
        assert np.array_equal(bids.image(a), plain.image(b)), "a sequence in the wrong channel"
    assert np.allclose(bids.clinical()["time"].to_numpy(), plain.clinical()["time"].to_numpy())
    assert any("T2starw" in text for texts in summary.unrecognised.values() for text in texts)


def test_a_bids_subject_with_several_sessions_is_refused_naming_them(export_copy, tmp_path):
    subjects = list(_bids(export_copy, tmp_path / "bids").values())
    shutil.copytree(tmp_path / "bids" / subjects[0] / "ses-pre", tmp_path / "bids" / subjects[0] / "ses-post")
    summary = convert(tmp_path / "bids", tmp_path / "bids" / "participants.tsv", tmp_path / "b.zarr", TINY,
                      progress=False)
    assert sorted(summary.converted) == subjects[1:]
    reason = summary.excluded[subjects[0]]
    assert "several sessions" in reason and "ses-post" in reason and "ses-pre" in reason, reason
