"""Property-based tests: over a thousand malformed clinical tables and damaged cohort stores.

Every generated input must end in the project's own error (a `StudyError` subclass with a message
naming the file) or, for row-level faults of a clinical table, in the documented exclusion with a
reason; never in a library's traceback, and a damaged store never reads as valid.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from datasets import CohortStore, verify_store
from datasets.clinical import STORED_COLUMNS, read_clinical
from datasets.errors import ClinicalTableError, StoreError
from datasets.preprocess import PreprocessConfig
from datasets.synthetic import SyntheticConfig, build_store

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

# -- clinical tables ------------------------------------------------------------------------

VALID = {"patient_id": st.sampled_from([f"P{i:03d}" for i in range(40)]),
         "time": st.floats(1, 5000).map(lambda v: f"{v:.1f}"),
         "event": st.sampled_from(["0", "1"]),
         "age": st.integers(18, 90).map(str),
         "sex": st.sampled_from(["F", "M", "female", "male", ""]),
         "grade": st.sampled_from(["2", "3", "4", "IV", ""]),
         "pathology": st.sampled_from(["glioblastoma", "astrocytoma", "oligodendroglioma", ""]),
         "idh": st.sampled_from(["0", "1", "wildtype", "mutant", ""]),
         "mgmt": st.sampled_from(["0", "1", "methylated", ""])}
JUNK = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "-5", "0", "1e309", "2.5", "yes", "NA", "None", "=1+1",
                     "1,5", '"', "\n", "\x00", "ÄÖÜ", "💀", "12 months", "-0"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**12, 10**12).map(str),
)
COLUMN_NAMES = list(VALID)


@st.composite
def clinical_tables(draw) -> tuple[bytes, list[str]]:
    """CSV bytes of a table with junk cells, dropped/renamed/duplicated columns or raw garbage."""
    kind = draw(st.sampled_from(["cells", "cells", "cells", "columns", "ids", "bytes", "shape"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400)), []
    columns = list(COLUMN_NAMES)
    if kind == "columns":
        for _ in range(draw(st.integers(1, 3))):
            action = draw(st.sampled_from(["drop", "rename", "duplicate"]))
            index = draw(st.integers(0, len(columns) - 1))
            if action == "drop" and len(columns) > 1:
                columns.pop(index)
            elif action == "rename":
                columns[index] = draw(st.text(min_size=0, max_size=8))
            else:
                columns.append(columns[index])
    n = draw(st.integers(0, 8))
    rows = []
    for _ in range(n):
        row = []
        for name in columns:
            cell = draw(VALID[name]) if name in VALID and draw(st.booleans()) else draw(JUNK)
            row.append(cell)
        rows.append(row)
    if kind == "ids" and rows and "patient_id" in columns:
        pid = columns.index("patient_id")
        rows[-1][pid] = draw(st.sampled_from([rows[0][pid], "", "  "]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    text = buffer.getvalue()
    if kind == "shape":
        text = draw(st.sampled_from([text.replace(",", ";"), text.replace(",", "\t"), "\n".join(text.splitlines()[:1]),
                                     text + draw(st.text(max_size=30)), "\ufeff" + text, ""]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace"), columns


@FUZZ
@given(table=clinical_tables())
def test_malformed_clinical_tables_end_in_the_projects_error_or_a_recorded_exclusion(table, tmp_path):
    data, _ = table
    path = tmp_path / "clinical.csv"
    path.write_bytes(data)
    try:
        result = read_clinical(path)
    except ClinicalTableError as exc:
        assert str(path) in str(exc) or path.name in str(exc), str(exc)
        event("table refused")
        return
    event("rows excluded" if result.excluded else "table accepted")
    # Accepted: every kept row is valid, every other row is excluded with a reason naming the file.
    rows = result.rows
    assert list(rows.columns) == list(STORED_COLUMNS)
    assert np.isfinite(rows["time"]).all() and (rows["time"] > 0).all()
    assert rows["event"].isin([0.0, 1.0]).all()
    ages = rows["age"].dropna()
    assert ((ages >= 0) & (ages <= 120)).all()
    for column in ("sex", "glioblastoma", "idh", "mgmt"):
        assert rows[column].dropna().isin([0.0, 1.0]).all(), column
    assert rows["grade"].dropna().isin([2.0, 3.0, 4.0]).all()
    assert not set(rows.index) & set(result.excluded)
    assert all(reason.startswith(f"{path.name}: ") for reason in result.excluded.values())


# -- damaged cohort stores ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    out = build_store(tmp_path_factory.mktemp("fuzzstore"), SyntheticConfig(n=3, voxel_size=8.0, seed=5),
                      PreprocessConfig(shape=(16, 16, 12), spacing=8.0), name="tiny.zarr")
    assert verify_store(out) == []
    return out


def _chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and "/c/" in p.as_posix().replace(str(store), ""))


def _arrays(store: Path) -> list[Path]:
    return sorted(p.parent for p in store.rglob("zarr.json") if json.loads(p.read_text()).get("node_type") == "array")


@st.composite
def damages(draw):
    kind = draw(st.sampled_from(["truncate", "dtype", "manifest_drop", "manifest_swap", "manifest_type",
                                 "attribute", "attribute_type", "delete_chunk"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)), draw(st.floats(0, 0.99))


def damage(store: Path, kind: str, a: int, b: int, fraction: float) -> str:
    """Apply one damage; returns a description for the failure message."""
    if kind in ("truncate", "delete_chunk"):
        chunks = _chunk_files(store)
        target = chunks[a % len(chunks)]
        if kind == "delete_chunk":
            # A missing chunk reads as the fill value: only damage to data the manifest vouches for
            # (images, masks, labels of done patients, done flags) must be caught.
            vouched = [c for c in chunks if c.relative_to(store).parts[0] in ("images", "masks", "labels", "done")]
            target = vouched[a % len(vouched)]
            target.unlink()
        else:
            content = target.read_bytes()
            target.write_bytes(content[: int(len(content) * fraction)])
        return f"{kind} {target.relative_to(store)}"
    if kind == "dtype":
        array = _arrays(store)[a % len(_arrays(store))]
        meta = json.loads((array / "zarr.json").read_text())
        choices = [t for t in ("int8", "uint16", "float32", "float64", "bool", "int64") if t != meta["data_type"]]
        meta["data_type"] = choices[b % len(choices)]
        meta["fill_value"] = False if meta["data_type"] == "bool" else 0
        (array / "zarr.json").write_text(json.dumps(meta))
        return f"dtype of {array.relative_to(store)} -> {meta['data_type']}"
    manifest = json.loads((store / "manifest.json").read_text())
    patients = list(manifest["patients"])
    if kind == "manifest_drop":
        pid = patients[a % len(patients)]
        keys = ["<record>", *manifest["patients"][pid]]
        key = keys[b % len(keys)]
        if key == "<record>":
            del manifest["patients"][pid]
        elif key in ("checksum", "status"):
            del manifest["patients"][pid][key]
        else:  # other keys are descriptive; dropping "patients" itself is the table-level case
            del manifest["patients"]
        (store / "manifest.json").write_text(json.dumps(manifest))
        return f"manifest drop {pid}/{key}"
    if kind == "manifest_swap":
        first, second = patients[a % len(patients)], patients[(a + 1 + b % (len(patients) - 1)) % len(patients)]
        records = manifest["patients"]
        records[first], records[second] = records[second], records[first]
        (store / "manifest.json").write_text(json.dumps(manifest))
        return f"manifest swap {first} <-> {second}"
    if kind == "manifest_type":
        value = [None, 3, "x", [], {"status": 1}][b % 5]
        manifest["patients"][patients[a % len(patients)]] = value
        (store / "manifest.json").write_text(json.dumps(manifest))
        return f"manifest record -> {value!r}"
    meta = json.loads((store / "zarr.json").read_text())
    attrs = meta["attributes"]
    names = ["format", "format_version", "sequences", "shape", "patient_ids", "clinical_columns", "preprocessing"]
    name = names[a % len(names)]
    if kind == "attribute":
        del attrs[name]
    else:
        attrs[name] = [None, 7, "text", [], [1, 2], {"a": 1}, attrs[name][:-1] if isinstance(attrs[name], list)
                       else None][b % 7]
    (store / "zarr.json").write_text(json.dumps(meta))
    return f"{kind} {name} -> {attrs.get(name, '<deleted>')!r}"


@FUZZ
@given(spec=damages())
def test_damaged_stores_never_read_as_valid(tiny_store, spec):
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store.zarr"
        shutil.copytree(tiny_store, store)
        what = damage(store, *spec)
        try:
            problems = verify_store(store)
        except StoreError as exc:
            assert str(store) in str(exc), str(exc)
            event(f"{spec[0]}: refused on opening")
            return
        event(f"{spec[0]}: found by verify")
        assert problems, f"{what}: the damaged store reads as valid"


def test_reordered_manifest_keys_are_not_damage(tiny_store, tmp_path):
    """JSON key order carries no meaning: a rewritten manifest with shuffled keys stays valid."""
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    manifest = json.loads((store / "manifest.json").read_text())
    shuffled = {"patients": dict(reversed(list(manifest["patients"].items()))),
                **{k: v for k, v in reversed(list(manifest.items())) if k != "patients"}}
    (store / "manifest.json").write_text(json.dumps(shuffled))
    assert verify_store(store) == []
    assert math.isfinite(CohortStore(store).clinical()["time"].sum())
