"""Cohort store format, conversion, resume and verification."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from datasets import CohortStore, StoreError, verify_store
from datasets.convert import convert, main
from datasets.store import FORMAT_VERSION, MANIFEST, STORE_FORMAT
from tests.conftest import PROJECT_ROOT, TINY


def test_store_layout(small_store, small_export):
    group = zarr.open_group(str(small_store), mode="r")
    n = len(group.attrs["patient_ids"])
    assert n == 12
    assert group["images"].dtype == np.float16
    assert group["images"].shape == (n, 4, 32, 32, 24)
    assert group["images"].chunks == (1, 4, 32, 32, 24)
    assert group["masks"].shape == group["labels"].shape == (n, 32, 32, 24)
    assert group["missing"].shape == (n, 4)
    assert group["done"][:].all()
    assert group.attrs["format"] == STORE_FORMAT and group.attrs["format_version"] == FORMAT_VERSION
    assert group.attrs["sequences"] == ["t1", "t1c", "t2", "flair"]
    manifest = json.loads((small_store / MANIFEST).read_text())
    record = manifest["patients"]["SYN-0001"]
    assert record["status"] == "ok"
    assert set(record["sources"]) == {"t1", "t1c", "t2", "flair", "label"}
    assert all(len(s["sha256"]) == 64 for s in record["sources"].values())
    assert record["info"]["after"]["shape"] == [32, 32, 24]


def test_only_mapped_clinical_columns_are_stored(small_store, small_export):
    store = CohortStore(small_store)
    assert "patient_name" not in store.attrs["clinical_columns"]
    for path in Path(small_store).rglob("*"):
        if path.is_file() and path.suffix in (".json", ".html", ""):
            assert b"Synthetic^" not in path.read_bytes(), path
    source = pd.read_csv(small_export / "clinical.csv").set_index("patient_id")
    stored = store.clinical()
    np.testing.assert_allclose(stored.loc[source.index, "time"], source["survival_days"])
    np.testing.assert_array_equal(stored.loc[source.index, "event"], source["death"])
    np.testing.assert_array_equal(stored.loc[source.index, "glioblastoma"], source["glioblastoma"])


def test_images_are_normalised_inside_the_mask(small_store):
    store = CohortStore(small_store)
    image, mask = store.image(0).astype(np.float32), store.mask(0).astype(bool)
    assert np.isfinite(image).all()
    for channel in image:
        assert abs(channel[mask].mean()) < 0.05
        assert 0.9 < channel[mask].std() < 1.1
        assert (channel[~mask] == 0).all()
    assert store.label(0).any(), "the synthetic tumour label was carried over"


def test_rerun_skips_unchanged_and_redoes_changed(small_export, tmp_path):
    out = tmp_path / "s.zarr"
    first = convert(small_export / "images", small_export / "clinical.csv", out, TINY, progress=False)
    assert len(first.converted) == 12
    again = convert(small_export / "images", small_export / "clinical.csv", out, TINY, progress=False)
    assert again.converted == [] and len(again.skipped) == 12
    # A changed source file is converted again.
    export = tmp_path / "export"
    import shutil

    shutil.copytree(small_export, export)
    out2 = tmp_path / "s2.zarr"
    convert(export / "images", export / "clinical.csv", out2, TINY, progress=False)
    src = export / "images" / "SYN-0002" / "SYN-0002_t2.nii.gz"
    # Another scan of the patient (a copy of another patient's file would exclude both: one file, two patients).
    import nibabel as nib

    image = nib.load(src)
    nib.save(nib.Nifti1Image((np.asarray(image.dataobj) * 1.1).astype(np.int16), image.affine), src)
    changed = convert(export / "images", export / "clinical.csv", out2, TINY, progress=False)
    assert changed.converted == ["SYN-0002"]
    assert verify_store(out2) == []


def test_other_preprocessing_is_refused(small_store, small_export):
    from datasets.errors import InputError
    from datasets.preprocess import PreprocessConfig

    with pytest.raises(InputError, match="other preprocessing"):
        convert(small_export / "images", small_export / "clinical.csv", small_store,
                PreprocessConfig(shape=(40, 40, 24)), progress=False)


def test_new_patients_are_appended(export_copy, small_export, tmp_path):
    out = tmp_path / "grow.zarr"
    convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    import shutil

    shutil.copytree(small_export / "images" / "SYN-0004", export_copy / "images" / "SYN-0004")
    table = pd.read_csv(small_export / "clinical.csv").head(4)
    table.to_csv(export_copy / "clinical.csv", index=False)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    assert summary.converted == ["SYN-0004"]
    store = CohortStore(out)
    assert store.patient_ids == ["SYN-0001", "SYN-0002", "SYN-0003", "SYN-0004"]
    assert len(store.usable()) == 4 and verify_store(out) == []


@pytest.mark.parametrize("damage, message", [
    ("version", "format version 99"),
    ("format", "not a cohort store"),
    ("manifest", "manifest.json is missing"),
])
def test_damaged_store_is_refused(small_store, tmp_path, damage, message):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    if damage == "version":
        meta["attributes"]["format_version"] = 99
    elif damage == "format":
        meta["attributes"]["format"] = "something-else"
    else:
        (copy / MANIFEST).unlink()
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=message):
        CohortStore(copy)


def test_missing_store_is_refused(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        CohortStore(tmp_path / "nope.zarr")


def test_verify_finds_a_truncated_chunk(small_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    chunk = next(p for p in (copy / "images").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    problems = verify_store(copy)
    assert len(problems) == 1 and "cannot be read" in problems[0]
    assert main(["--verify", str(copy)]) == 1
    assert main(["--verify", str(small_store)]) == 0


def _count_ok(store: Path) -> int:
    try:
        manifest = json.loads((store / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(r.get("status") == "ok" for r in manifest["patients"].values())


@pytest.mark.slow
@pytest.mark.integration
def test_conversion_killed_midway_resumes_to_the_same_store(small_export, tmp_path):
    reference = tmp_path / "reference.zarr"
    convert(small_export / "images", small_export / "clinical.csv", reference, TINY, progress=False)
    out = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "datasets.convert", "--images", str(small_export / "images"),
               "--clinical", str(small_export / "clinical.csv"), "--out", str(out), "--shape", "32x32x24",
               "--spacing", "2", "--workers", "1", "--no-progress"]
    # A patient takes about 0.1 s here, less than the manifest's usual flush interval: flush after
    # every patient and poll often, so that the kill lands mid-conversion on any machine.
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, start_new_session=True,
                               env={**os.environ, "GLIOMA_CONVERT_MANIFEST_FLUSH_S": "0"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count_ok(out) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = _count_ok(out)
    assert 3 <= killed_at < 12, "the kill should land mid-conversion"
    # Whatever is usable after the kill is complete and correct.
    store = CohortStore(out)
    ref = CohortStore(reference)
    for slot in store.usable():
        np.testing.assert_array_equal(store.image(slot), ref.image(slot))
    summary = convert(small_export / "images", small_export / "clinical.csv", out, TINY, progress=False)
    assert len(summary.skipped) >= killed_at - 1
    assert len(summary.converted) + len(summary.skipped) == 12
    assert verify_store(out) == []
    store = CohortStore(out)
    assert len(store.usable()) == 12
    for slot in range(12):
        np.testing.assert_array_equal(store.image(slot), ref.image(slot))


def test_performance_status_and_extent_of_resection_are_read_under_their_usual_names(tmp_path):
    from datasets.clinical import read_clinical

    table = tmp_path / "clinical.csv"
    table.write_text("patient_id,OS_days,status,Karnofsky,Extent_of_Resection\n"
                     "A,100,1,80,Gross total\nB,200,0,,biopsy\nC,300,1,70,STR\nD,400,0,120,GTR\nE,500,1,90,lobectomy\n")
    result = read_clinical(table, {"time": "OS_days"})
    assert result.rows.loc["A", ["kps", "resection"]].tolist() == [80.0, 2.0]
    assert np.isnan(result.rows.loc["B", "kps"]) and result.rows.loc["B", "resection"] == 0
    assert result.rows.loc["C", "resection"] == 1
    assert "kps '120' is outside 0-100" in result.excluded["D"]
    assert "resection 'lobectomy' is not one of" in result.excluded["E"]
