"""DICOM exports read by their tags (`datasets.dicom`): real files pydicom ships (a GE study's
localisers, pilots and angiography projections, a CT of the same patient) beside generated MR series
whose file and folder names say nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets import CohortStore, dicom
from datasets.convert import convert
from datasets.errors import ImageError
from datasets.sequences import SequenceMatcher
from datasets.synthetic_dicom import SEQUENCES, write_patient, write_series
from tests.conftest import TINY

REAL_PATIENT = "98890234"  # the PatientID of pydicom's dicomdirtests/98892001 (CT) and 98892003 (MR) studies


def real_dicom_studies() -> list[Path]:
    import pydicom.data

    base = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
    return [base / "98892003", base / "98892001"]


@pytest.mark.parametrize("layout", ["flat", "folders"])
def test_a_pacs_export_converts_like_the_nifti_files(export_copy, tmp_path, layout):
    """Series told apart by description and physics, not names: the four MR sequences are found among
    real localisers, pilots, angiography projections and a CT, and convert to the very volumes the
    NIfTI files give."""
    reference = tmp_path / "nifti.zarr"
    convert(export_copy / "images", export_copy / "clinical.csv", reference, TINY, progress=False)
    folder = export_copy / "images" / "SYN-0001"
    staged = tmp_path / "nifti"
    shutil.move(str(folder), staged)
    folder.mkdir()
    shutil.copy(staged / "SYN-0001_seg.nii.gz", folder)  # the label stays a NIfTI file beside the DICOM study
    uids = write_patient(staged, folder / "study", layout, patient_id=REAL_PATIENT)
    for study in real_dicom_studies():
        shutil.copytree(study, folder / "study" / study.name)

    out = tmp_path / "dicom.zarr"
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    assert summary.excluded == {}
    a, b = CohortStore(reference), CohortStore(out)
    assert a.sequences == b.sequences
    np.testing.assert_allclose(b.image(0).astype(float), a.image(0).astype(float), atol=2e-3)
    np.testing.assert_array_equal(b.mask(0), a.mask(0))
    record = b.manifest["patients"]["SYN-0001"]
    sources = record["sources"]
    for key, uid in uids.items():
        import pydicom

        first = dicom.series_files(Path(sources[key]["path"]))[0]
        assert pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID == uid, key
        if layout == "folders":
            assert Path(sources[key]["path"]).name.startswith("S0")
    assert any("is t1c by its description 't1_mprage_sag_p2_iso_KM'" in note for note in record["notes"])
    listed = " ".join(summary.unrecognised.get("SYN-0001", []))
    for seen in ("LOCALIZER", "PILOT", "ANGIO", "modality CT"):
        assert seen in listed, seen


def _tiny(value: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    volume = np.full((20, 22, 12), value, dtype=np.int16)
    volume[5:15, 5:17, 3:9] += 50
    return volume, np.diag([6.0, 6.0, 6.0, 1.0]) + np.array([[0, 0, 0, -60], [0, 0, 0, -70], [0, 0, 0, -40], [0, 0, 0, 0]])


def _series(folder: Path, names: str, number: int, **tags) -> None:
    volume, affine = _tiny(number * 10.0)
    files = [folder / names.format(number=number, k=k) for k in range(volume.shape[2])]
    write_series(volume, affine, files, series_number=number, **tags)


def _physics(key: str) -> dict:
    _, tr, te, ti, scanning, agent = SEQUENCES[key]
    return {"tr": tr, "te": te, "ti": ti, "scanning": scanning, "contrast_agent": agent}


def test_without_descriptions_the_physics_decides(tmp_path):
    for number, key in enumerate(("t1", "t1c", "t2", "flair"), start=1):
        _series(tmp_path / "P1", "S{number}/I{k}", number, **_physics(key))
    scan = SequenceMatcher().scan(tmp_path / "P1", "P1")
    assert {k: p.name for k, p in scan.found.items()} == {"t1": "S1", "t1c": "S2", "t2": "S3", "flair": "S4"}
    assert scan.problem("P1") is None and "its parameters (TR 2300 ms, TE 2.32 ms, TI 900 ms" in scan.evidence[
        scan.found["t1"]]


def test_a_description_the_physics_contradicts_is_refused_naming_both(tmp_path):
    _series(tmp_path / "P1", "IM{number}_{k}", 1, description="AX T2 FLAIR", tr=500.0, te=10.0)
    _series(tmp_path / "P1", "IM{number}_{k}", 2, description="AX T2", **_physics("t2"))
    scan = SequenceMatcher().scan(tmp_path / "P1", "P1")
    assert set(scan.found) == {"t2"}
    (why,) = [why for _, why in scan.unrecognised if "series 1" in why]
    assert "'AX T2 FLAIR' says flair but its parameters (TR 500 ms, TE 10 ms) say t1" in why
    assert scan.found["t2"].parent == tmp_path / "P1" and scan.found["t2"].name.startswith("IM2_")  # a flat folder


def test_two_candidates_are_ranked_or_refused(tmp_path):
    flat = "IM{number}_{k}"
    # A named T1c outranks its derived reformat and an angiogram whose physics is T1-like.
    _series(tmp_path / "A", flat, 1, description="T1 MPRAGE POST", **_physics("t1c"))
    _series(tmp_path / "A", flat, 2, description="T1 MPRAGE POST", image_type="DERIVED\\SECONDARY\\MPR",
            **_physics("t1c"))
    _series(tmp_path / "A", flat, 3, description="TOF_3D_multi-slab", tr=22.0, te=3.6, scanning="GR")
    _series(tmp_path / "A", flat, 4, description="ep2d_diff_mddw", tr=6000.0, te=90.0, scanning="EP")
    _series(tmp_path / "A", flat, 5, tr=600.0, te=10.0)  # no description: a T1 by its physics only
    scan = SequenceMatcher().scan(tmp_path / "A", "A")
    assert scan.problem("A") is None
    assert scan.found["t1c"].name.startswith("IM1_") and scan.found["t1"].name.startswith("IM5_")
    reasons = " ".join(why for _, why in scan.unrecognised)
    assert "series 2 'T1 MPRAGE POST'" in reasons and "(original) is taken" in reasons
    assert "'TOF_3D_multi-slab' is none of the study's sequences" in reasons
    assert "echo-planar" in reasons
    # Two originals named alike: the patient is refused naming both series.
    _series(tmp_path / "B", flat, 1, description="T1 POST GAD", **_physics("t1c"))
    _series(tmp_path / "B", flat, 2, description="AX T1 POST", **_physics("t1c"))
    problem = SequenceMatcher().scan(tmp_path / "B", "B").problem("B")
    assert "series 1 'T1 POST GAD'" in problem and "series 2 'AX T1 POST'" in problem and "'t1c'" in problem
    # A native T1 description with a contrast agent named: ambiguous, never guessed.
    _series(tmp_path / "C", flat, 1, description="T1 SE PRE", tr=500.0, te=10.0, contrast_agent="Dotarem")
    scan = SequenceMatcher().scan(tmp_path / "C", "C")
    assert scan.found == {} and "names a contrast agent" in scan.unrecognised[0][1]


def test_a_series_of_another_patient_is_refused(tmp_path):
    _series(tmp_path / "P1", "S{number}/I{k}", 1, description="T1 MPRAGE", patient_id="X1", **_physics("t1"))
    _series(tmp_path / "P1", "S{number}/I{k}", 2, description="T2 TSE", patient_id="X1", **_physics("t2"))
    _series(tmp_path / "P1", "S{number}/I{k}", 3, description="FLAIR", patient_id="X2", **_physics("flair"))
    problem = SequenceMatcher().scan(tmp_path / "P1", "P1").problem("P1")
    assert "2 different PatientIDs" in problem and "series 3 'FLAIR'" in problem
    assert "X1" not in problem and "X2" not in problem  # ids withheld


def test_reading_refuses_broken_series(tmp_path):
    volume, affine = _tiny()
    files = [tmp_path / "ok" / f"{k}" for k in range(volume.shape[2])]
    write_series(volume, affine, files, description="T2")
    data, ras = dicom.read_volume(tmp_path / "ok")
    np.testing.assert_array_equal(data, volume)
    np.testing.assert_allclose(ras, affine, atol=1e-6)
    gap = tmp_path / "gap"
    shutil.copytree(tmp_path / "ok", gap)
    (gap / "5").unlink()
    with pytest.raises(ImageError, match="slices are missing"):
        dicom.read_volume(gap)
    echoes = tmp_path / "echoes"
    shutil.copytree(tmp_path / "ok", echoes)
    shutil.copy(echoes / "3", echoes / "3b")
    with pytest.raises(ImageError, match="several images at one slice position"):
        dicom.read_volume(echoes)


def test_the_raw_steps_read_dicom_as_the_nifti(tmp_path):
    """SimpleITK images of the registration steps: same voxels and physical space from either file."""
    from datasets.raw_steps import read_image

    sitk = pytest.importorskip("SimpleITK")
    volume, affine = _tiny()
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "t2.nii.gz")
    write_series(volume, affine, [tmp_path / "t2" / f"{k}.dcm" for k in range(volume.shape[2])], description="T2")
    a, b = read_image(tmp_path / "t2.nii.gz"), read_image(tmp_path / "t2")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-5)


def test_every_patient_preprocesses_as_from_its_nifti_files(small_export, tmp_path):
    """The whole preprocessing, not only the reading: a DICOM volume is a 3D MetaTensor without a
    channel axis, as MONAI's readers make it (else MONAI counted 2 spatial axes and cropped SYN-0005's
    and SYN-0011's heads one slice off)."""
    from datasets.preprocess import load_volume, preprocess_patient

    for pid in ("SYN-0005", "SYN-0011"):
        nifti = small_export / "images" / pid
        write_patient(nifti, tmp_path / pid, "flat", patient_id=pid)
        matcher = SequenceMatcher()
        from_dicom, _ = matcher.find(tmp_path / pid, pid)
        from_nifti, _ = matcher.find(nifti, pid)
        from_nifti.pop("label")
        assert load_volume(from_dicom["t1"], pid, "t1").peek_pending_rank() == 3
        a, b = preprocess_patient(from_nifti, pid, TINY), preprocess_patient(from_dicom, pid, TINY)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
