"""Pseudonymisation at conversion, and a scan of a finished study for the source ids and names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from datasets import CohortStore, verify_store
from datasets.convert import main as convert_main
from study.run import main as study_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pseudonymised(small_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("psn")
    key = root / "secret" / "site.key"
    argv = ["--images", str(small_export / "images"), "--clinical", str(small_export / "clinical.csv"),
            "--out", str(root / "psn.zarr"), "--shape", "32x32x24", "--spacing", "2", "--no-progress", "--workers", "1"]
    assert convert_main(argv + ["--pseudonymise-key", str(key)]) == 0
    return root, argv, key


def test_store_holds_pseudonyms_only(pseudonymised, small_export):
    root, argv, key = pseudonymised
    store = CohortStore(root / "psn.zarr")
    assert all(re.fullmatch(r"PSN-[0-9a-f]{16}", pid) for pid in store.patient_ids)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert verify_store(store.path) == []
    # The same key maps the same ids: rerunning resumes (nothing reconverted).
    assert convert_main(argv + ["--pseudonymise-key", str(key)]) == 0
    assert CohortStore(root / "psn.zarr").patient_ids == store.patient_ids


def test_resume_with_another_key_or_none_is_refused(pseudonymised, tmp_path, capsys):
    root, argv, _ = pseudonymised
    assert convert_main(argv + ["--pseudonymise-key", str(tmp_path / "other.key")]) == 2
    assert "with another --pseudonymise-key" in capsys.readouterr().err
    assert convert_main(argv) == 2
    assert "made with --pseudonymise-key; resume it the same way" in capsys.readouterr().err


def test_key_inside_the_store_is_refused(small_export, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert convert_main(["--images", str(small_export / "images"), "--clinical", str(small_export / "clinical.csv"),
                         "--out", str(out), "--pseudonymise-key", str(out / "key")]) == 2
    assert "is inside the store" in capsys.readouterr().err
    assert not out.exists()


def _identifiers(export: Path) -> set[str]:
    table = pd.read_csv(export / "clinical.csv", dtype=str)
    names = set(table["patient_name"]) | {part for n in table["patient_name"] for part in n.split("^") if len(part) > 8}
    return set(table["patient_id"]) | names


def test_a_finished_study_leaks_no_source_id_or_name(pseudonymised, small_export, tmp_path):
    root, _, _ = pseudonymised
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert study_main(["--space", "smoke", "--data", str(root / "psn.zarr"), "--tasks", "os_all",
                       "--backbones", "seresnext50", "--num-samples", "1", "--tracking-uri", uri,
                       "--storage-path", str(tmp_path / "rr"), "--name", "psn"]) == 0
    identifiers = _identifiers(small_export)
    assert len(identifiers) >= 24
    scanned = 0
    places = [tmp_path, root / "psn.zarr"]  # MLflow db + artifacts, Tune storage, the store and its QC report
    for place in places:
        for path in place.rglob("*"):
            # A logged model's code folder is a copy of the project's packages (`study.model_logging`):
            # made from no patient, and the word "Synthetic" of the synthetic names is in its source.
            parts = path.relative_to(place).parts
            if not path.is_file() or any(a == "model" and b == "code" for a, b in zip(parts, parts[1:])):
                continue
            data = path.read_bytes()
            scanned += 1
            for identifier in identifiers:
                assert identifier.encode() not in data, f"{identifier} found in {path}"
    assert scanned > 20
    oof = list((tmp_path / "mlartifacts").rglob("oof_predictions.csv"))
    assert oof and pd.read_csv(oof[0])["patient_id"].str.startswith("PSN-").all()
    manifest = json.loads((root / "psn.zarr" / "manifest.json").read_text())
    assert all(k.startswith("PSN-") for k in manifest["patients"])


def test_every_spelling_of_a_source_id_is_scrubbed(export_copy, tmp_path):
    """Files named `syn-0001_t1.nii.gz` in folder `SYN-0001` used to keep the source id in the manifest."""
    images = export_copy / "images"
    spelled = {"SYN-0001": str.lower, "SYN-0002": lambda s: s.replace("-", "_"),
               "SYN-0003": lambda s: s.replace("-", "")}
    for pid, spell in spelled.items():
        for path in (images / pid).iterdir():
            path.rename(path.with_name(path.name.replace(pid, spell(pid))))
    key = tmp_path / "site.key"
    argv = ["--images", str(images), "--clinical", str(export_copy / "clinical.csv"),
            "--out", str(tmp_path / "p.zarr"), "--shape", "32x32x24", "--spacing", "2", "--no-progress",
            "--workers", "1", "--pseudonymise-key", str(key)]
    assert convert_main(argv) == 0
    assert len(CohortStore(tmp_path / "p.zarr").usable()) == 3
    variants = set()
    for pid in spelled:
        letters, digits = pid.split("-")
        for sep in ("-", "_", ".", " ", ""):
            for case in (str.upper, str.lower, str.title):
                variants.add(case(letters) + sep + digits)
    scanned = 0
    for path in (tmp_path / "p.zarr").rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            scanned += 1
            for variant in variants:
                assert variant.lower().encode() not in data, f"{variant} found in {path}"
    assert scanned > 5
