"""Hostile site exports (issue 33): ids a spreadsheet runs, names that carry a patient's identity
under pseudonymisation, event codings, one patient under two spellings or two patients sharing a
file, misfiled scans, vendor sequence names, and clinical tables of millions of foreign rows.

Each case: the documented outcome (an exclusion whose reason names the file, id or column and
what was expected, or exit 2 before anything is written), never a silent relabelling."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from datasets import CohortStore, StoreError, verify_store
from datasets.clinical import read_clinical
from datasets.convert import convert, main
from datasets.errors import ClinicalTableError
from tests.conftest import TINY


def _table(export: Path) -> pd.DataFrame:
    return pd.read_csv(export / "clinical.csv", dtype=str, keep_default_na=False)


def _write_table(export: Path, table: pd.DataFrame) -> None:
    table.to_csv(export / "clinical.csv", index=False, quoting=csv.QUOTE_ALL)  # an id may hold a line break


def _rename_patient(export: Path, old: str, new: str, *, row: bool = True, folder: bool = True,
                    files: str | None = None) -> None:
    """Give patient `old` the id `new` in its clinical row and/or folder name; its files are
    renamed `files` + sequence (default: the new id)."""
    images = export / "images"
    if folder:
        (images / old).rename(images / new)
        for path in sorted((images / new).iterdir()):
            prefix = files if files is not None else new
            path.rename(path.with_name(path.name.replace(old, prefix)))
    if row:
        table = _table(export)
        table.loc[table["patient_id"] == old, "patient_id"] = new
        _write_table(export, table)


def _argv(export: Path, out: Path, *extra: str) -> list[str]:
    return ["--images", str(export / "images"), "--clinical", str(export / "clinical.csv"), "--out", str(out),
            "--shape", "32x32x24", "--spacing", "2", "--workers", "1", "--no-progress", *extra]


def _usable_ids(out: Path) -> list[str]:
    store = CohortStore(out)
    return [store.patient_ids[i] for i in store.usable()]


# -- 3. formula injection (CWE-1236) ----------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x","y")', '=HYPERLINK("x","y")', "@SUM(1)", "+1", "-2+3", "=1+1\t", "\t=cmd", "\r+1",
            "SYN\r0001",
            "＝1+1"]


@pytest.mark.parametrize("where", ["row and folder", "row", "folder"])
@pytest.mark.parametrize("odd", FORMULAS, ids=[ascii(f) for f in FORMULAS])
def test_an_id_a_spreadsheet_would_run_is_excluded_naming_it(export_copy, tmp_path, odd, where):
    """`=HYPERLINK(...)` reached the first cell of every CSV the study writes, verbatim."""
    if "/" in odd and where != "row":
        pytest.skip("a folder name cannot hold a slash")
    _rename_patient(export_copy, "SYN-0001", odd, row=where != "folder", folder=where != "row", files="")
    matched_id = odd.strip()
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert matched_id in summary.excluded, summary.excluded
    reason = summary.excluded[matched_id]
    assert repr(matched_id) in reason and "a spreadsheet would run it as a formula" in reason, reason
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]
    assert not any(pid[:1] in "=+-@\t\r＝" for pid in CohortStore(tmp_path / "s.zarr").patient_ids)
    assert verify_store(tmp_path / "s.zarr") == []


def test_a_formula_id_is_excluded_under_pseudonymisation_too(export_copy, tmp_path, capsys):
    """Pseudonyms (PSN-...) are safe in a CSV, but the source id is refused all the same: a store's
    patients must not depend on the key, and the key holder links results back by the source ids."""
    _rename_patient(export_copy, "SYN-0001", '=HYPERLINK("x","y")', files="")
    assert main(_argv(export_copy, tmp_path / "p.zarr", "--pseudonymise-key", str(tmp_path / "k.key"))) == 0
    out = capsys.readouterr().out
    assert "HYPERLINK" not in out and "a spreadsheet would run it as a formula" in out
    manifest = json.loads((tmp_path / "p.zarr" / "manifest.json").read_text())
    [reason] = [r for r in manifest["excluded"].values() if "formula" in r]
    assert "withheld under --pseudonymise-key" in reason
    assert len(_usable_ids(tmp_path / "p.zarr")) == 2
    assert b"HYPERLINK" not in (tmp_path / "p.zarr" / "manifest.json").read_bytes()


@pytest.mark.parametrize("odd", ['=HYPERLINK("http://x","y")', "@SUM(1)", "-2+3"])
def test_a_store_holding_a_formula_id_is_refused_on_opening(small_store, tmp_path, odd, capsys):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    old = meta["attributes"]["patient_ids"][0]
    meta["attributes"]["patient_ids"][0] = odd
    (copy / "zarr.json").write_text(json.dumps(meta))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["patients"][odd] = manifest["patients"].pop(old)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=re.escape(repr(odd)) + ".*formula.*Convert the export again"):
        CohortStore(copy)
    assert main(["--verify", str(copy)]) == 2
    assert repr(odd) in capsys.readouterr().err


# -- 4. no name of the export under pseudonymisation -------------------------------------------

def test_pseudonymised_store_keeps_no_file_name_birth_date_or_other_patients_id(export_copy, tmp_path, capsys):
    """dcm2niix -f %n_%b_%t names (DOE_JOHN_19600101_...) stayed in manifest.json's source paths,
    with another patient's id for a misfiled scan."""
    images = export_copy / "images"
    for path in sorted((images / "SYN-0001").iterdir()):  # the patient's own name, birth date and id
        path.rename(path.with_name("DOE_JOHN_19600101_" + path.name))
    t2 = images / "SYN-0001" / "DOE_JOHN_19600101_SYN-0001_t2.nii.gz"
    image = nib.load(t2)  # an empty sequence: its problem message names the file
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine), t2)
    shutil.copy(images / "SYN-0001" / "DOE_JOHN_19600101_SYN-0001_t1.nii.gz",
                images / "SYN-0001" / "DOE_JOHN_19600101_SYN-0001_dwi.nii.gz")  # an unrecognised file
    misfiled = images / "SYN-0002" / "ROE_JANE_19700202_SYN-0003_t1ce.nii.gz"  # another patient's id
    (images / "SYN-0002" / "SYN-0002_t1ce.nii.gz").rename(misfiled)
    key = tmp_path / "site.key"
    argv = _argv(export_copy, tmp_path / "p.zarr", "--pseudonymise-key", str(key))
    assert main(argv) == 0
    printed = capsys.readouterr()
    withheld = ["doe", "john", "19600101", "roe", "jane", "19700202", "syn-000", "syn_000", "syn000",
                str(images / "SYN").lower()]
    scanned = 0
    for path in (tmp_path / "p.zarr").rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            scanned += 1
            for word in withheld:
                assert word.encode() not in data, f"{word} found in {path}"
    assert scanned > 5
    for word in withheld:
        assert word not in (printed.out + printed.err).lower(), f"{word} printed: {printed.out}"
    assert len(CohortStore(tmp_path / "p.zarr").usable()) == 2, "SYN-0002 is excluded: its t1c names another patient"
    manifest = json.loads((tmp_path / "p.zarr" / "manifest.json").read_text())
    for record in manifest["patients"].values():
        for sequence, source in record["sources"].items():
            assert set(source) == {"label", "sha256", "size", "path_hmac"}
            assert re.fullmatch(rf"PSN-[0-9a-f]{{16}}/{sequence}(\.nii\.gz)?", source["label"]), source
    reasons = " ".join(manifest["excluded"].values())
    assert "carries the id of another patient" in reasons and "PSN-" in reasons
    assert any("empty (all zero)" in p for r in manifest["patients"].values() for p in r["info"]["problems"])
    assert any("matches no sequence" in t for texts in manifest["unrecognised"].values() for t in texts)
    # Resuming matches the sources by SHA-256 and the keyed hash of their paths: nothing redone.
    assert main(argv) == 0
    assert "converted 0, already done 2" in capsys.readouterr().out


# -- 5. event coding --------------------------------------------------------------------------

def _recode(export: Path, mapping: dict[str, str]) -> list[str]:
    table = _table(export)
    original = list(table["death"])
    table["death"] = [mapping[v] for v in original]
    _write_table(export, table)
    return original


@pytest.mark.parametrize("column", ["death", "status"])
def test_r_survival_coding_1_2_is_read_as_1_censored_2_dead(export_copy, tmp_path, capsys, column):
    """1 = censored, 2 = dead: the 2s were excluded and the 1s stored as deaths."""
    original = _recode(export_copy, {"0": "1", "1": "2"})
    table = _table(export_copy).rename(columns={"death": column})
    _write_table(export_copy, table)
    assert set(table[column]) == {"1", "2"}
    assert main(_argv(export_copy, tmp_path / "s.zarr")) == 0
    out = capsys.readouterr().out
    assert re.search(rf"event column '{column}' .* read as R's survival coding: 2 = death, 1 = censored", out), out
    store = CohortStore(tmp_path / "s.zarr")
    stored = store.clinical()["event"]
    assert [stored[pid] for pid in table["patient_id"]] == [float(v) for v in original]
    assert store.manifest["clinical"]["event_coding"] == "12"
    assert "survival coding: 2 = death, 1 = censored" in (tmp_path / "s.zarr" / "qc" / "index.html").read_text()


@pytest.mark.parametrize("values", [["0", "1", "2"], ["0", "2", "2"], ["2", "1", "yes"]])
def test_an_ambiguous_event_coding_stops_before_writing_and_names_the_flag(export_copy, tmp_path, capsys, values):
    table = _table(export_copy)
    table["death"] = values
    _write_table(export_copy, table)
    out = tmp_path / "s.zarr"
    assert main(_argv(export_copy, out)) == 2
    err = capsys.readouterr().err
    assert "event column 'death' holds the values" in err and "--event-coding 01" in err and "12" in err, err
    assert all(repr(v) in err for v in values)
    assert not out.exists()


def test_the_event_coding_flag_says_which_and_rows_outside_it_are_excluded(export_copy, tmp_path, capsys):
    table = _table(export_copy)
    table["death"] = ["0", "1", "2"]
    _write_table(export_copy, table)
    assert main(_argv(export_copy, tmp_path / "a.zarr", "--event-coding", "01")) == 0
    assert "excluded SYN-0003: clinical.csv: event '2' is not 0 or 1" in capsys.readouterr().out
    assert main(_argv(export_copy, tmp_path / "b.zarr", "--event-coding", "12")) == 0
    assert "excluded SYN-0001: clinical.csv: event '0' is not 1 or 2" in capsys.readouterr().out
    assert CohortStore(tmp_path / "b.zarr").clinical().loc[["SYN-0002", "SYN-0003"], "event"].tolist() == [0.0, 1.0]
    with pytest.raises(SystemExit):
        main(_argv(export_copy, tmp_path / "c.zarr", "--event-coding", "21"))


@pytest.mark.parametrize("values, stored", [(["true", "false", "TRUE"], [1.0, 0.0, 1.0]),
                                            (["yes", "no", "no"], [1.0, 0.0, 0.0]),
                                            (["1", "1", "1"], [1.0, 1.0, 1.0]),
                                            (["2", "2", "2"], [1.0, 1.0, 1.0])])
def test_unambiguous_codings_are_read_and_said(export_copy, tmp_path, values, stored):
    table = _table(export_copy)
    table["death"] = values
    _write_table(export_copy, table)
    result = read_clinical(export_copy / "clinical.csv")
    assert result.rows.loc[list(table["patient_id"]), "event"].tolist() == stored
    assert result.event_note and not result.excluded


# -- 6. one patient under two spellings; two patients sharing a file ----------------------------

NFC, NFD = unicodedata.normalize("NFC", "Müller-01"), unicodedata.normalize("NFD", "Müller-01")


@pytest.mark.parametrize("first, second", [(NFC, NFD), ("SYN-0001", "syn-0001"), ("Straße-7", "STRASSE-7")])
def test_clinical_rows_naming_one_patient_twice_stop_the_conversion(export_copy, tmp_path, capsys, first, second):
    table = _table(export_copy)
    table.loc[0, "patient_id"], table.loc[1, "patient_id"] = first, second
    _write_table(export_copy, table)
    with pytest.raises(ClinicalTableError, match="one patient spelled differently") as error:
        read_clinical(export_copy / "clinical.csv")
    assert ascii(first) in str(error.value) and ascii(second) in str(error.value)
    assert main(_argv(export_copy, tmp_path / "s.zarr")) == 2
    assert ascii(second) in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_folders_naming_one_patient_twice_exclude_it_naming_both(export_copy, tmp_path):
    """An NFD copy of the folder 'Müller-01' was converted as a second patient (or not at all)."""
    _rename_patient(export_copy, "SYN-0001", NFC)
    images = export_copy / "images"
    shutil.copytree(images / NFC, images / NFD)
    shutil.copytree(images / "SYN-0002", images / "syn-0002")
    summary = convert(images, export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert sorted(summary.converted) == ["SYN-0003"]
    for pid, spelled in ((NFC, (NFC, NFD)), ("SYN-0002", ("SYN-0002", "syn-0002"))):
        reason = summary.excluded[pid]
        assert all(ascii(s) in reason or repr(str(images / s)) in reason for s in spelled), reason


def test_a_row_and_a_folder_in_other_unicode_forms_are_one_patient(export_copy, tmp_path):
    _rename_patient(export_copy, "SYN-0001", NFD, folder=False)
    _rename_patient(export_copy, "SYN-0001", NFC, row=False)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert NFC in summary.converted and not summary.excluded, summary.excluded


def test_a_row_and_a_folder_spelled_apart_by_case_exclude_the_patient_naming_both(export_copy, tmp_path):
    _rename_patient(export_copy, "SYN-0001", "syn-0001", folder=False)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    reason = summary.excluded["syn-0001"]
    assert "'syn-0001'" in reason and "SYN-0001" in reason and "spelled apart" in reason, reason
    assert summary.excluded["SYN-0001"] == reason
    assert summary.unmatched["count"] == 0
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]


@pytest.mark.parametrize("sequence, other_sequence", [("t2", "t2"), ("flair", "t1")])
def test_the_same_source_file_under_two_patients_excludes_both_naming_the_other(export_copy, tmp_path, sequence,
                                                                                 other_sequence):
    images = export_copy / "images"
    shutil.copy(images / "SYN-0003" / f"SYN-0003_{other_sequence}.nii.gz",
                images / "SYN-0002" / f"SYN-0002_{sequence}.nii.gz")
    summary = convert(images, export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert summary.converted == ["SYN-0001"]
    assert "patient 'SYN-0003'" in summary.excluded["SYN-0002"] and "same file" in summary.excluded["SYN-0002"]
    assert "patient 'SYN-0002'" in summary.excluded["SYN-0003"]


# -- 7. misfiled scans --------------------------------------------------------------------------

@pytest.mark.parametrize("name, other", [("SYN-0002_t1ce.nii.gz", "SYN-0002"), ("syn_0003-T1CE.nii.gz", "SYN-0003"),
                                         ("DOE_JOHN_SYN0002_flair.nii.gz", "SYN-0002"),
                                         ("SYN-0001_SYN-0003_t2.nii.gz", "SYN-0003")])
def test_a_file_named_for_another_patient_is_not_used_as_this_ones(export_copy, tmp_path, name, other):
    """images/SYN-0001/SYN-0002_t1c.nii.gz was converted as SYN-0001's T1c."""
    folder = export_copy / "images" / "SYN-0001"
    sequence = re.search(r"(t1ce|flair|t2)\.nii", name.lower()).group(1)
    (folder / f"SYN-0001_{sequence}.nii.gz").rename(folder / name)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    reason = summary.excluded["SYN-0001"]
    assert name in reason and repr(other) in reason and "misfiled" in reason, reason
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]


def test_a_copy_of_another_patients_scan_beside_the_own_one_blames_the_folder_holding_it(export_copy, tmp_path):
    """Two files for one sequence, one named for another patient: the misfiled copy is named, and the
    patient it belongs to converts (its file is not 'the same file under two patients')."""
    images = export_copy / "images"
    shutil.copy(images / "SYN-0002" / "SYN-0002_t1ce.nii.gz", images / "SYN-0001" / "SYN-0002_t1c.nii.gz")
    summary = convert(images, export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    reason = summary.excluded["SYN-0001"]
    assert "SYN-0002_t1c.nii.gz" in reason and "'SYN-0002'" in reason and "misfiled" in reason, reason
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]


def test_a_misfiled_scan_of_a_patient_with_a_row_but_no_folder_is_found(export_copy, tmp_path):
    images = export_copy / "images"
    shutil.rmtree(images / "SYN-0003")
    (images / "SYN-0001" / "SYN-0001_t2.nii.gz").rename(images / "SYN-0001" / "SYN0003_t2.nii.gz")
    summary = convert(images, export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert "'SYN-0003'" in summary.excluded["SYN-0001"]
    assert summary.converted == ["SYN-0002"]


def test_an_id_that_contains_another_is_not_taken_for_it(export_copy, tmp_path):
    """SYN-0002-B's files hold 'SYN-0002' inside their own id: not a misfiled scan."""
    _rename_patient(export_copy, "SYN-0001", "SYN-0002-B")
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0002-B", "SYN-0003"], summary.excluded


# -- 8. vendor and site sequence names --------------------------------------------------------

VENDOR_NAMES = [
    {"t1": "T1_MPRAGE", "t1ce": "T1_KM", "t2": "T2_TSE", "flair": "FLAIR_3D"},
    {"t1": "t1_mprage_sag", "t1ce": "T1+C", "t2": "t2_tse_tra_p2", "flair": "3D_FLAIR"},
    {"t1": "T1_SPGR", "t1ce": "t1gd", "t2": "T2_FSE", "flair": "t2_flair_tra"},
    {"t1": "t1_se_tra", "t1ce": "T1post", "t2": "ax_t2", "flair": "t2_tirm_tra_dark-fluid"},
]


@pytest.mark.parametrize("names", VENDOR_NAMES, ids=[n["t1ce"] for n in VENDOR_NAMES])
def test_vendor_sequence_names_are_recognised(export_copy, tmp_path, names):
    """T1_KM, t1gd, T2_TSE, FLAIR_3D, T1_MPRAGE, T1+C, T1post were zero-filled and shown as missing."""
    folder = export_copy / "images" / "SYN-0001"
    for sequence, name in names.items():
        (folder / f"SYN-0001_{sequence}.nii.gz").rename(folder / f"{name}.nii.gz")
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    assert "SYN-0001" in summary.converted, summary.excluded
    store = CohortStore(tmp_path / "s.zarr")
    assert not store.missing(store.patient_ids.index("SYN-0001")).any(), "a sequence was zero-filled as missing"
    assert not summary.unrecognised


def test_unrecognised_and_ambiguous_files_are_reported_everywhere_with_the_pattern_hint(export_copy, tmp_path,
                                                                                         capsys):
    folder = export_copy / "images" / "SYN-0001"
    (folder / "SYN-0001_t1.nii.gz").rename(folder / "T1_WEIRD_SITE.nii.gz")
    shutil.copy(folder / "SYN-0001_t2.nii.gz", folder / "SYN-0001_t1_flair.nii.gz")  # T1 FLAIR: t1 or flair?
    out = tmp_path / "s.zarr"
    assert main(_argv(export_copy, out)) == 0
    printed = capsys.readouterr().out
    for text in (printed, (out / "qc" / "index.html").read_text(), (out / "manifest.json").read_text()):
        assert "T1_WEIRD_SITE.nii.gz" in text and "matches no sequence" in text
        assert "SYN-0001_t1_flair.nii.gz" in text and "matches several sequences (flair, t1)" in text
        assert "--pattern" in text or text is not printed
    assert "--pattern SEQUENCE=REGEX" in printed
    assert "--pattern SEQUENCE=REGEX" in (out / "qc" / "index.html").read_text()
    store = CohortStore(out)
    assert store.missing(store.patient_ids.index("SYN-0001")).tolist() == [True, False, False, False]
    # The hint works: --pattern names the site's own spelling (and the built-in names still apply).
    assert main(_argv(export_copy, tmp_path / "p.zarr", "--pattern", "t1=t1_weird_site")) == 0
    store = CohortStore(tmp_path / "p.zarr")
    assert not store.missing(store.patient_ids.index("SYN-0001")).any()
    assert "T1_WEIRD_SITE" not in json.dumps(store.manifest["unrecognised"])


# -- 10. withdrawn patients -----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["clinical row", "image folder"])
def test_a_withdrawn_patient_is_erased_on_the_rerun_never_kept_usable(export_copy, tmp_path, capsys, how):
    """A rerun after a clinical row or an image folder was removed (consent withdrawn) printed
    'excluded' and kept the patient usable with its old images and outcome."""
    out = tmp_path / "s.zarr"
    assert main(_argv(export_copy, out)) == 0
    store = CohortStore(out)
    slot = store.patient_ids.index("SYN-0002")
    montage = out / store.manifest["patients"]["SYN-0002"]["montage"]
    assert montage.is_file() and store.image(slot).any()
    if how == "clinical row":
        table = _table(export_copy)
        _write_table(export_copy, table[table["patient_id"] != "SYN-0002"])
    else:
        shutil.rmtree(export_copy / "images" / "SYN-0002")
    capsys.readouterr()
    assert main(_argv(export_copy, out)) == 0
    assert "withdrawn SYN-0002" in capsys.readouterr().out
    store = CohortStore(out)
    assert _usable_ids(out) == ["SYN-0001", "SYN-0003"]
    assert not store.image(slot).any() and not store.mask(slot).any(), "the withdrawn patient's voxels stay"
    assert not [c for c in (out / "images" / "c").glob(f"{slot}/**/*") if c.is_file()], "its chunk files stay"
    assert not montage.exists(), "its QC montage stays"
    assert np.isnan(store.clinical().loc["SYN-0002", "time"])
    assert store.manifest["patients"]["SYN-0002"]["status"] == "withdrawn"
    assert verify_store(out) == []
    # The others were not redone, and a third run changes nothing.
    capsys.readouterr()
    assert main(_argv(export_copy, out)) == 0
    assert "converted 0, already done 2" in capsys.readouterr().out


# -- 21. clinical tables of foreign rows -------------------------------------------------------

def test_two_hundred_thousand_unmatched_rows_are_summarised_not_listed(export_copy, tmp_path, capsys):
    """3.5 million rows without image folders made a 370 MB manifest and a 465 MB QC page."""
    table = _table(export_copy)
    n = 200_000
    foreign = pd.DataFrame({column: table[column].iloc[0] for column in table.columns}, index=range(n))
    foreign["patient_id"] = [f"OTHER-{i:07d}" for i in range(n)]
    foreign.loc[::7, "survival_days"] = "not a number"  # invalid rows without images are only counted too
    pd.concat([table, foreign]).to_csv(export_copy / "clinical.csv", index=False)
    out = tmp_path / "s.zarr"
    started = time.perf_counter()
    assert main(_argv(export_copy, out)) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert (out / "manifest.json").stat().st_size < 1_000_000
    assert (out / "qc" / "index.html").stat().st_size < 1_000_000
    assert len(printed) < 10_000
    assert seconds < 300, f"{seconds:.0f} s: summarising should be linear in the rows"
    manifest = json.loads((out / "manifest.json").read_text())
    unmatched = manifest["clinical"]["unmatched_rows"]
    assert unmatched["count"] == n and unmatched["first"][:2] == ["OTHER-0000000", "OTHER-0000001"]
    assert manifest["excluded"] == {}
    assert "clinical rows without an image folder under --images: 200000 (not converted); the first: OTHER-0000000, " \
           "OTHER-0000001" in printed
    assert "Clinical rows without an image folder: 200000" in (out / "qc" / "index.html").read_text()
    assert len(CohortStore(out).usable()) == 3


# -- 15. a worker that dies ----------------------------------------------------------------------

def test_a_patient_whose_worker_dies_is_excluded_naming_it_and_the_rest_convert(export_copy, tmp_path):
    """A killed conversion worker (the OOM killer, a crash in a reader) gave BrokenProcessPool and a
    traceback naming no patient, and a rerun died at the same patient. Here every process that
    takes SYN-0002 is killed, as a file that crashes its reader would."""
    import threading

    from tests.services import kill_conversion_workers

    out = tmp_path / "s.zarr"
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=kill_conversion_workers, args=(out, "SYN-0002", stop, killed), daemon=True)
    watcher.start()
    try:
        summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, workers=2, progress=False)
    finally:
        stop.set()
        watcher.join()
    assert len(killed) == 2, "killed in the pool, then alone"
    assert sorted(summary.converted) == ["SYN-0001", "SYN-0003"]
    assert "SYN-0002" in summary.excluded and "worker process died" in summary.excluded["SYN-0002"]
    assert _usable_ids(out) == ["SYN-0001", "SYN-0003"]
    assert not (out / ".converting").exists() and verify_store(out) == []
    # Without the fault, a rerun converts it.
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, workers=2, progress=False)
    assert summary.converted == ["SYN-0002"] and _usable_ids(out) == ["SYN-0001", "SYN-0002", "SYN-0003"]


# -- 9. geometry that disagrees, volumes that declare gigabytes ---------------------------------

def test_a_volume_declaring_a_gigabyte_is_refused_from_its_header(export_copy, tmp_path):
    """A 1.8 MB .nii.gz declaring 1 GiB took 5.9 GB of memory, became the reference grid, and a white
    box passed as a usable patient. Here the header declares 1024^3 voxels over a few bytes of data:
    refused before any voxel is decompressed."""
    import gzip

    target = export_copy / "images" / "SYN-0001" / "SYN-0001_t1.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((1024, 1024, 1024))
    header.set_zooms((0.2, 0.2, 0.2))  # a plausible field of view: 205 mm
    fine = np.diag([0.2, 0.2, 0.2, 1.0])
    header.set_qform(fine, code=1)
    header.set_sform(fine, code=1)
    with gzip.open(target, "wb") as out:
        out.write(header.binaryblock + b"\0" * 4 + b"\xff" * 4096)  # the voxels: a few bytes, not a gigabyte
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    reason = summary.excluded["SYN-0001"]
    assert "1,073,741,824 voxels" in reason and "header" in reason, reason
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]


def test_a_sequence_whose_affine_puts_it_elsewhere_excludes_the_patient(export_copy, tmp_path):
    """A FLAIR whose affine is shifted 100 mm was resampled into the others' grid and used."""
    target = export_copy / "images" / "SYN-0001" / "SYN-0001_flair.nii.gz"
    image = nib.load(target)
    affine = image.affine.copy()
    affine[:3, 3] += (100.0, 0.0, 0.0)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), target)
    summary = convert(export_copy / "images", export_copy / "clinical.csv", tmp_path / "s.zarr", TINY, progress=False)
    reason = summary.excluded.get("SYN-0001", "")
    assert "the head of flair overlaps that of" in reason and "Dice" in reason, (reason, summary.converted)
    assert sorted(summary.converted) == ["SYN-0002", "SYN-0003"]



@pytest.fixture(scope="module")
def fine_export(tmp_path_factory) -> Path:
    """Two synthetic patients at 2 mm (the left-right check needs a head at least 64 voxels wide)."""
    from datasets.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("fine")
    generate(out, SyntheticConfig(n=2, voxel_size=2.0, seed=11))
    return out


def test_a_sequence_mirrored_in_its_voxels_with_its_header_kept_excludes_the_patient(fine_export, tmp_path):
    """A T2 flipped left-right in its voxels (affine kept) overlaps the others' head perfectly and
    was used: the tumour on the wrong side in one channel. Known scores of this patient
    (benchmarks/results/mirror_detection.csv): aligned +0.58 to +0.79 (FLAIR +0.25), T2 mirrored -0.62."""
    from benchmarks.mirror_detection import mirror_file
    from datasets.laterality import MIRRORED_BELOW
    from datasets.preprocessing_config import PreprocessConfig

    export = tmp_path / "export"
    shutil.copytree(fine_export, export)
    t2 = export / "images" / "SYN-0001" / "SYN-0001_t2.nii.gz"
    mirror_file(t2, t2.with_name("flipped.nii.gz"))
    t2.with_name("flipped.nii.gz").replace(t2)
    summary = convert(export / "images", export / "clinical.csv", tmp_path / "s.zarr", PreprocessConfig(),
                      progress=False)
    reason = summary.excluded.get("SYN-0001", "")
    assert "t2 is mirrored left-right against the other sequences" in reason and f"{MIRRORED_BELOW:g}" in reason, (
        reason, summary.converted)
    assert summary.converted == ["SYN-0002"]
    manifest = json.loads((tmp_path / "s.zarr" / "manifest.json").read_text())
    scores = manifest["patients"]["SYN-0002"]["info"]["laterality"]
    assert set(scores) == {"t1", "t1c", "t2", "flair"} and min(scores.values()) > 0, scores



def test_a_sequence_without_asymmetry_is_left_out_of_the_left_right_check():
    """A flat asymmetry map (no edges) made a NaN score that passed as neither mirrored nor doubtful,
    and was written to the manifest as NaN; it is left out, and with two sequences left the message
    says that they disagree, not which one is mirrored."""
    from datasets.laterality import laterality_scores, mirrored

    mask = np.zeros((80, 40, 30), dtype=bool)
    mask[8:72, 5:35, 5:25] = True
    head = np.random.default_rng(0).random(mask.shape).astype(np.float32) + 1.0
    assert laterality_scores({"t1": head, "t2": np.ones_like(head)}, mask) == {}
    scores = laterality_scores({"t1": head, "t2": np.ones_like(head), "flair": head[::-1].copy()}, mask)
    assert set(scores) == {"t1", "flair"} and all(np.isfinite(v) for v in scores.values()), scores
    assert "flair and t1 disagree left-right" in mirrored(scores)


# -- 14. a full disk ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (a real file system that fills up), unmounted after; skipped where mounting is not allowed."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_conversion_blaming_no_patient_and_a_rerun_finishes(export_copy, small_disk, capsys):
    """Disk full mid-conversion excluded every patient with 'No space left on device' and exited 0;
    disk full while the store was made left a half-made store that no rerun could finish."""
    out = small_disk / "s.zarr"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 * 2**20 - 8192))  # no room even for the store's arrays
    argv = _argv(export_copy, out)
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "cannot be created" in err and "No space left on device" in err, err
    assert not out.exists() and not list(small_disk.glob(".s.zarr*")), "a half-made store was left"
    # Room for the store and one patient, not three.
    filler.unlink()
    assert main(argv) == 0
    capsys.readouterr()
    shutil.rmtree(out / "images" / "c", ignore_errors=True)
    (out / "manifest.json").write_text(json.dumps({"patients": {}, "excluded": {}}))
    import zarr

    zarr.open_array(str(out / "done"), mode="r+")[:] = False
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * max(0, free - 120_000))
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "cannot be written" in err and "No space left on device" in err and "no patient was excluded" in err, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["excluded"] and all(r.get("status") != "excluded" for r in manifest["patients"].values())
    filler.unlink()
    assert main(argv) == 0
    assert _usable_ids(out) == ["SYN-0001", "SYN-0002", "SYN-0003"] and verify_store(out) == []
