"""Every bad-input case of the converter: a clear message naming patient, file or column, and the
documented policy (stop, exclude with a reason, or zero-fill a missing sequence)."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pandas as pd
import pytest

from datasets import CohortStore, verify_store
from datasets.convert import convert, main
from datasets.errors import ClinicalTableError
from tests.conftest import TINY


def _nifti(folder, pid, sequence):
    return folder / "images" / pid / f"{pid}_{sequence}.nii.gz"


def _truncate(export):
    path = _nifti(export, "SYN-0001", "t1")
    path.write_bytes(path.read_bytes()[:2000])


def _garbage(export):
    _nifti(export, "SYN-0001", "t1").write_bytes(b"this is not an image" * 100)


def _nan(export):
    path = _nifti(export, "SYN-0001", "t1")
    image = nib.load(path)
    data = image.get_fdata().astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)


def _two_d(export):
    path = _nifti(export, "SYN-0001", "t1")
    image = nib.load(path)
    nib.save(nib.Nifti1Image(image.get_fdata()[:, :, 5].astype(np.int16), image.affine), path)


def _four_d(export):
    path = _nifti(export, "SYN-0001", "t1")
    image = nib.load(path)
    data = image.get_fdata().astype(np.int16)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), path)


def _table_edit(column, value):
    def edit(export):
        table = pd.read_csv(export / "clinical.csv", dtype=str)
        table.loc[0, column] = value
        table.to_csv(export / "clinical.csv", index=False)
    return edit


def _drop_row(export):
    table = pd.read_csv(export / "clinical.csv", dtype=str)
    table.iloc[1:].to_csv(export / "clinical.csv", index=False)


def _drop_folder(export):
    import shutil

    shutil.rmtree(export / "images" / "SYN-0001")


EXCLUDED = [
    # (damage, excluded patient, reason pattern)
    pytest.param(_truncate, "SYN-0001", r"cannot read t1 file .*SYN-0001_t1\.nii\.gz", id="truncated-file"),
    pytest.param(_garbage, "SYN-0001", r"cannot read t1 file .*SYN-0001_t1\.nii\.gz", id="unreadable-file"),
    pytest.param(_nan, "SYN-0001", r"t1 file .*SYN-0001_t1\.nii\.gz has 1 NaN/inf voxels", id="nan-voxels"),
    pytest.param(_two_d, "SYN-0001", r"t1 file .*SYN-0001_t1\.nii\.gz is 2D", id="2d-image"),
    pytest.param(_four_d, "SYN-0001", r"t1 file .*SYN-0001_t1\.nii\.gz is 4D", id="4d-image"),
    pytest.param(_drop_row, "SYN-0001", r"image folder .*SYN-0001 has no row in .*clinical\.csv", id="images-without-row"),
    pytest.param(_table_edit("survival_days", "-3"), "SYN-0001", r"clinical\.csv: time '-3' is not a positive", id="negative-time"),
    pytest.param(_table_edit("survival_days", "0"), "SYN-0001", r"time '0' is not a positive", id="zero-time"),
    pytest.param(_table_edit("survival_days", ""), "SYN-0001", r"time is empty", id="empty-time"),
    pytest.param(_table_edit("survival_days", "1e12"), "SYN-0001", r"time '1e12' days is outside the plausible 1-36525",
                 id="time-1e12-days"),
    pytest.param(_table_edit("survival_days", "1e-300"), "SYN-0001", r"time '1e-300' days is outside", id="time-1e-300-days"),
    pytest.param(_table_edit("survival_days", "1_000"), "SYN-0001", r"time '1_000' is not a number as a clinical export",
                 id="time-with-underscore"),
    pytest.param(_table_edit("survival_days", "\u0663\u0660\u0660"), "SYN-0001", r"is not a number as a clinical export",
                 id="time-in-arabic-indic-digits"),
    pytest.param(_table_edit("age", "infinity"), "SYN-0001", r"age 'infinity' is not a number", id="age-infinity"),
    pytest.param(_table_edit("death", "3"), "SYN-0001", r"event '3' is not 0 or 1", id="event-not-binary"),
    pytest.param(_table_edit("death", "dead"), "SYN-0001", r"event 'dead' is not 0 or 1", id="event-text"),
    pytest.param(_table_edit("age", "fifty"), "SYN-0001", r"age 'fifty' is not a number", id="age-not-numeric"),
    pytest.param(_table_edit("pathology", "ependymoma"), "SYN-0001", r"pathology 'ependymoma' is not a known label", id="unknown-pathology"),
    pytest.param(_table_edit("sex", "x"), "SYN-0001", r"sex 'x' is not one of", id="unknown-sex"),
    pytest.param(_table_edit("grade", "7"), "SYN-0001", r"grade '7' is not a WHO grade", id="bad-grade"),
]


@pytest.mark.parametrize("damage, patient, reason", EXCLUDED)
def test_bad_patient_is_excluded_with_reason(export_copy, tmp_path, damage, patient, reason):
    damage(export_copy)
    out = tmp_path / "s.zarr"
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    assert patient in summary.excluded
    import re

    assert re.search(reason, summary.excluded[patient]), summary.excluded[patient]
    store = CohortStore(out)
    assert patient not in [store.patient_ids[i] for i in store.usable()]
    assert len(store.usable()) == 2, "the other patients are still converted"
    assert verify_store(out) == []
    report = (out / "qc" / "index.html").read_text()
    assert patient in report and "excluded" in report


def test_a_row_without_images_is_counted_not_listed(export_copy, tmp_path):
    """Rows without image folders are summarised (count and first ids), never one record each."""
    _drop_folder(export_copy)
    out = tmp_path / "s.zarr"
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    assert summary.excluded == {} and summary.unmatched == {"count": 1, "first": ["SYN-0001"]}
    assert CohortStore(out).manifest["clinical"]["unmatched_rows"] == {"count": 1, "first": ["SYN-0001"]}
    assert "Clinical rows without an image folder: 1 (not converted); the first: SYN-0001" in (
        out / "qc" / "index.html").read_text()
    assert len(CohortStore(out).usable()) == 2 and verify_store(out) == []


@pytest.mark.parametrize("sequence, how", [("flair", "deleted"), ("t2", "empty")])
def test_missing_or_empty_sequence_is_zero_filled_and_flagged(export_copy, tmp_path, sequence, how):
    path = _nifti(export_copy, "SYN-0002", sequence)
    if how == "deleted":
        path.unlink()
    else:
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine), path)
    out = tmp_path / "s.zarr"
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    assert summary.excluded == {}
    store = CohortStore(out)
    slot = store.patient_ids.index("SYN-0002")
    channel = store.sequences.index(sequence)
    assert store.missing(slot).tolist() == [c == channel for c in range(4)]
    assert not store.image(slot)[channel].any()
    problems = store.manifest["patients"]["SYN-0002"]["info"]["problems"]
    assert any(sequence in p and ("missing" in p or "empty" in p) for p in problems)


@pytest.mark.parametrize("edit, message", [
    (lambda t: pd.concat([t, t.iloc[[0]]]), r"duplicate patient_id\(s\) \['SYN-0001'\]"),
    (lambda t: t.drop(columns=["death"]), r"required column\(s\) \['event'\] not found"),
    (lambda t: t.assign(patient_id=["SYN-0001", "", "SYN-0003"]), r"empty patient_id on line\(s\) \[3\]"),
    (lambda t: t.assign(death=["0", "1", "2"]), r"event column 'death' holds the values '0', '1', '2': the event "
                                                r"coding is ambiguous .* --event-coding 01 .* --event-coding 12"),
], ids=["duplicate-id", "missing-column", "empty-id", "ambiguous-event-coding"])
def test_table_level_fault_stops_before_writing(export_copy, tmp_path, edit, message):
    table = pd.read_csv(export_copy / "clinical.csv", dtype=str)
    edit(table).to_csv(export_copy / "clinical.csv", index=False)
    out = tmp_path / "s.zarr"
    with pytest.raises(ClinicalTableError, match=message):
        convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    assert not out.exists(), "nothing is written for a refused table"
    code = main(["--images", str(export_copy / "images"), "--clinical", str(export_copy / "clinical.csv"),
                 "--out", str(out), "--no-progress"])
    assert code == 2 and not out.exists()


def test_column_mapping(export_copy, tmp_path):
    table = pd.read_csv(export_copy / "clinical.csv").rename(columns={"survival_days": "OS.days", "death": "vital"})
    table.to_csv(export_copy / "clinical.csv", index=False)
    out = tmp_path / "s.zarr"
    assert main(["--images", str(export_copy / "images"), "--clinical", str(export_copy / "clinical.csv"),
                 "--out", str(out), "--no-progress"]) == 2
    assert main(["--images", str(export_copy / "images"), "--clinical", str(export_copy / "clinical.csv"),
                 "--out", str(out), "--no-progress", "--shape", "32x32x24", "--spacing", "2",
                 "--column", "time=OS.days", "--column", "event=vital"]) == 0
    assert len(CohortStore(out).usable()) == 3


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["--images", str(tmp_path / "none"), "--clinical", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--shape", "12x4"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("value", ["abc", "5min", "-1", "inf"])
def test_a_bad_flush_interval_is_named_before_anything_is_written(export_copy, tmp_path, monkeypatch, capsys, value):
    """GLIOMA_CONVERT_MANIFEST_FLUSH_S=abc was parsed at import: a traceback for every command."""
    monkeypatch.setenv("GLIOMA_CONVERT_MANIFEST_FLUSH_S", value)
    out = tmp_path / "s.zarr"
    assert main(["--images", str(export_copy / "images"), "--clinical", str(export_copy / "clinical.csv"),
                 "--out", str(out), "--shape", "32x32x24", "--spacing", "2", "--workers", "1"]) == 2
    assert f"environment variable GLIOMA_CONVERT_MANIFEST_FLUSH_S={value!r}" in capsys.readouterr().err
    assert not out.exists()


def _dangling(export):
    path = _nifti(export, "SYN-0001", "t1")
    path.unlink()
    path.symlink_to(path.with_name("gone.nii.gz"))


def _loop(export):
    path = _nifti(export, "SYN-0001", "t1")
    path.unlink()
    path.symlink_to(path)


def _fifo(export):
    import os

    path = _nifti(export, "SYN-0001", "t1")
    path.unlink()
    os.mkfifo(path)


@pytest.mark.timeout(120)  # a FIFO opened for reading would block forever
@pytest.mark.parametrize("damage, reason", [(_dangling, "dangling symlink"), (_loop, "symlink loop"),
                                            (_fifo, "not a regular file")])
def test_an_unreadable_source_excludes_its_patient_and_the_rest_convert(export_copy, tmp_path, damage, reason):
    damage(export_copy)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert "SYN-0001" in summary.excluded and reason in summary.excluded["SYN-0001"]
    assert "SYN-0001_t1.nii.gz" in summary.excluded["SYN-0001"]
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]
    assert "SYN-0001" not in [CohortStore(tmp_path / "s.zarr").patient_ids[i]
                              for i in CohortStore(tmp_path / "s.zarr").usable()]


def test_folders_that_map_to_one_patient_id_are_refused_naming_both(export_copy, tmp_path):
    import shutil

    images = export_copy / "images"
    shutil.copytree(images / "SYN-0002", images / "SYN-0002 ")  # a trailing space: the same id once stripped
    summary = convert(images, export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    reason = summary.excluded["SYN-0002"]
    assert str(images / "SYN-0002") in reason and str(images / "SYN-0002 ") in reason
    assert sorted(summary.converted) == ["SYN-0001", "SYN-0003"]


def _affine(export, change):
    path = _nifti(export, "SYN-0001", "t1")
    image = nib.load(path)
    affine = image.affine.copy()
    change(affine)
    nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32), affine), path)


def _edit_sform(export, offset: int, value: float):
    """Write one float of the stored sform (nibabel refuses to write a NaN or a degenerate affine)."""
    import gzip
    import struct

    path = _nifti(export, "SYN-0001", "t1")
    image = nib.load(path)
    image.header.set_sform(image.affine, code=1)
    nib.save(image, path)
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[offset:offset + 4] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(data)))


def _nan_affine(export):
    _edit_sform(export, 292, float("nan"))  # srow_x[3], the x offset (MONAI reads it as is)


def _huge_voxels(export):
    _affine(export, lambda a: a.__setitem__((slice(0, 3), slice(0, 3)), a[:3, :3] * 1000))


def _slab(export):
    path = _nifti(export, "SYN-0001", "t1")
    image = nib.load(path)
    nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32)[:, :, 10:12], image.affine), path)


def _stub(export):
    path = _nifti(export, "SYN-0001", "t1")
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), nib.load(path).affine), path)


@pytest.mark.parametrize("damage, reason", [(_nan_affine, "NaN or infinite"), (_huge_voxels, "voxel size"),
                                            (_slab, "slab"), (_stub, "slab")])
def test_impossible_geometry_excludes_the_patient_and_verify_agrees(export_copy, tmp_path, damage, reason):
    """A NaN in an affine gave all-zero volumes with full head masks, marked usable and passing --verify."""
    damage(export_copy)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert "SYN-0001" in summary.excluded and reason in summary.excluded["SYN-0001"], summary.excluded
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]
    assert verify_store(tmp_path / "s.zarr") == []


def test_a_thin_slab_is_not_a_head(export_copy, tmp_path):
    path = _nifti(export_copy, "SYN-0001", "t1")
    image = nib.load(path)
    nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32)[:, :, 10:14], image.affine), path)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert "field of view" in summary.excluded.get("SYN-0001", ""), summary.excluded


@pytest.mark.parametrize("spacing", [float("inf"), float("nan"), 0.0, 50.0])
def test_an_impossible_output_spacing_is_refused(spacing):
    from datasets.errors import ImageError
    from datasets.preprocess import PreprocessConfig

    with pytest.raises(ImageError, match="spacing must be a finite"):
        PreprocessConfig(shape=(32, 32, 24), spacing=spacing)


def test_verify_finds_a_patient_whose_stored_image_is_constant(small_store, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "s.zarr"
    shutil.copytree(small_store, copy)
    store = CohortStore(copy)
    slot = int(store.usable()[0])
    images = zarr.open_group(str(copy), mode="r+")["images"]
    images[slot] = np.zeros_like(images[slot])
    problems = verify_store(copy)
    assert any(store.patient_ids[slot] in p and ("constant" in p or "checksum" in p) for p in problems), problems


def test_geometry_checks_on_known_grids():
    from datasets.plausibility import geometry_problem

    head = np.diag([1.0, 1.0, 1.2, 1.0])
    assert geometry_problem(head, (240, 240, 155)) is None
    assert geometry_problem(np.diag([0.5, 0.5, 5.0, 1.0]), (348, 384, 26)) is None  # a raw clinical scan
    degenerate = head.copy()
    degenerate[:3, 1] = 0
    assert "not invertible" in geometry_problem(degenerate, (240, 240, 155))
    assert "NaN" in geometry_problem(np.full((4, 4), np.nan), (240, 240, 155))
    assert "field of view" in geometry_problem(head, (240, 240, 20))


def test_a_wider_time_range_keeps_a_long_follow_up(export_copy, tmp_path, capsys):
    _table_edit("survival_days", "40000")(export_copy)

    def run(out, *extra):
        return main(["--images", str(export_copy / "images"), "--clinical", str(export_copy / "clinical.csv"),
                     "--out", str(tmp_path / out), "--shape", "32x32x24", "--spacing", "2", "--workers", "1",
                     "--no-progress", *extra])

    assert run("s.zarr") == 0
    assert "outside the plausible 1-36525 days" in capsys.readouterr().out
    assert run("wide.zarr", "--time-range-days", "1", "50000") == 0
    store = CohortStore(tmp_path / "wide.zarr")
    assert store.clinical().loc["SYN-0001", "time"] == 40000
    assert run("bad.zarr", "--time-range-days", "10", "5") == 2
    assert "--time-range-days 10 5" in capsys.readouterr().err
    assert not (tmp_path / "bad.zarr").exists()


def test_an_id_that_is_a_formula_to_matplotlib_converts_and_shows_on_the_qc_page(export_copy, tmp_path):
    """'Pat$x^$1' failed in the QC montage's title (mathtext), and the patient was lost."""
    odd = "Pat$x^$1<b>"
    images = export_copy / "images"
    (images / "SYN-0001").rename(images / odd)
    for path in (images / odd).iterdir():
        path.rename(path.with_name(path.name.replace("SYN-0001", odd)))
    table = pd.read_csv(export_copy / "clinical.csv", dtype=str)
    table.loc[table["patient_id"] == "SYN-0001", "patient_id"] = odd
    table.to_csv(export_copy / "clinical.csv", index=False)
    summary = convert(images, export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert odd in summary.converted, summary.excluded
    page = (tmp_path / "s.zarr" / "qc" / "index.html").read_text()
    assert "Pat$x^$1&lt;b&gt;" in page and "<b>" not in page
