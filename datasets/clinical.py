"""Reading and validating a site's clinical table.

Only the canonical columns below are ever read from the CSV; every other column (names, dates of
birth, free text) is dropped on reading, so it can never reach a cohort store.

=============  ==========================================  ==================================
column         meaning                                     stored as
=============  ==========================================  ==================================
patient_id     identifier matching the image folder name    string (required)
time           overall survival or follow-up, days          float in `TIME_RANGE_DAYS` (required)
event          1 = death observed, 0 = censored             0/1 (required)
age            age at diagnosis, years                      float, NaN if empty
sex            F / M (female, male, w accepted)             0 = F, 1 = M, NaN if empty
grade          WHO grade 2-4 (II-IV, "grade 4" accepted)    float, NaN if empty
pathology      histology label (see `PATHOLOGY_LABELS`)     glioblastoma flag derived from it
glioblastoma   1 = glioblastoma                             0/1, NaN if unknown
idh            1 = mutant, 0 = wildtype                     0/1, NaN if empty
mgmt           1 = methylated, 0 = unmethylated             0/1, NaN if empty
kps            Karnofsky performance status, 0-100          float, NaN if empty
resection      extent of resection: gross total /           2 / 1 / 0, NaN if empty
               subtotal (partial) / biopsy
=============  ==========================================  ==================================

Numbers are written as a clinical export writes them: ASCII digits with an optional sign,
decimal point and exponent (``412``, ``412.5``, ``4.1E+02``). Spellings that Python's ``float``
accepts but no export contains (``1_000``, ``inf``, ``nan``, Arabic-Indic or full-width digits)
are refused with the value, as is a time outside `TIME_RANGE_DAYS` (1 day to 100 years by
default: a time of 1e12 or 1e-300 days is a unit or export error, not a follow-up; the converter's
``--time-range-days MIN MAX`` widens it).

Policy: a table-level fault (unreadable file, a required column absent, duplicate patient ids)
raises `ClinicalTableError`; a row-level fault (time <= 0, event not 0/1, non-numeric age, an
unknown pathology label, ...) excludes that patient with the reason recorded, so nothing is
silently dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from datasets.errors import ClinicalTableError, InputError

REQUIRED = ("patient_id", "time", "event")
OPTIONAL = ("age", "sex", "grade", "pathology", "glioblastoma", "idh", "mgmt", "kps", "resection")
CANONICAL = REQUIRED + OPTIONAL
# Numeric covariates kept in the store (pathology is folded into the glioblastoma flag).
STORED_COLUMNS = ("time", "event", "age", "sex", "grade", "glioblastoma", "idh", "mgmt", "kps", "resection")
# The stored clinical covariates (every stored column but the outcome), e.g. of the added-value models.
COVARIATES = STORED_COLUMNS[2:]
# Plausible survival or follow-up times, days: one day to 100 years.
TIME_RANGE_DAYS = (1.0, 36525.0)
# How an export writes a number (ASCII only: `float` also reads "1_000", "inf" and non-Latin digits).
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

# Column names recognised without a --column mapping (lower case).
ALIASES: dict[str, tuple[str, ...]] = {
    "patient_id": ("patient_id", "patientid", "patient", "id", "subject", "subject_id", "case_id"),
    "time": ("time", "survival_days", "os_days", "os_time", "overall_survival_days", "survival"),
    "event": ("event", "death", "os_event", "dead", "deceased", "status"),
    "age": ("age", "age_at_diagnosis", "age_years"),
    "sex": ("sex", "gender"),
    "grade": ("grade", "who_grade", "tumor_grade", "tumour_grade"),
    "pathology": ("pathology", "histology", "diagnosis", "histological_type"),
    "glioblastoma": ("glioblastoma", "gbm", "is_gbm"),
    "idh": ("idh", "idh_status", "idh1", "idh_mutation"),
    "mgmt": ("mgmt", "mgmt_status", "mgmt_methylation"),
    "kps": ("kps", "karnofsky", "karnofsky_performance_status", "kps_score"),
    "resection": ("resection", "extent_of_resection", "eor", "surgery_extent", "resection_extent"),
}

PATHOLOGY_LABELS: dict[str, int] = {
    "glioblastoma": 1, "gbm": 1, "glioblastoma, idh-wildtype": 1, "glioblastoma multiforme": 1,
    "astrocytoma": 0, "astrocytoma, idh-mutant": 0, "diffuse astrocytoma": 0,
    "anaplastic astrocytoma": 0, "oligodendroglioma": 0, "anaplastic oligodendroglioma": 0,
    "oligodendroglioma, idh-mutant and 1p/19q-codeleted": 0, "oligoastrocytoma": 0,
    "lower grade glioma": 0, "lgg": 0, "diffuse glioma": 0,
}
_SEX = {"f": 0, "female": 0, "w": 0, "woman": 0, "m": 1, "male": 1, "man": 1}
_IDH = {"mutant": 1, "mutated": 1, "mut": 1, "1": 1, "wildtype": 0, "wild-type": 0, "wt": 0, "0": 0}
_MGMT = {"methylated": 1, "meth": 1, "1": 1, "unmethylated": 0, "unmeth": 0, "0": 0}
_GRADE = {"2": 2, "ii": 2, "3": 3, "iii": 3, "4": 4, "iv": 4}
_RESECTION = {"gross total": 2, "gross total resection": 2, "gtr": 2, "complete": 2, "total": 2, "2": 2,
              "subtotal": 1, "subtotal resection": 1, "str": 1, "partial": 1, "partial resection": 1, "1": 1,
              "biopsy": 0, "bx": 0, "biopsy only": 0, "0": 0}


@dataclass
class ClinicalTable:
    """Validated clinical rows of the patients that can be used, and the rows that cannot.

    Attributes
    ----------
    rows
        One row per usable patient, index = patient_id, columns = `STORED_COLUMNS` (float64).
    excluded
        patient_id -> reason, for every row that failed validation.
    source
        The CSV path.
    columns
        canonical name -> column name found in the CSV.
    """

    rows: pd.DataFrame
    excluded: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    columns: dict[str, str] = field(default_factory=dict)


def parse_column_map(items: Sequence[str]) -> dict[str, str]:
    """Parse `CANONICAL=CSV_COLUMN` command-line items."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not value:
            raise InputError(f"--column expects NAME=CSV_COLUMN, got {item!r}")
        if key not in CANONICAL:
            raise InputError(f"--column {item!r}: unknown name {key!r}; expected one of {list(CANONICAL)}")
        out[key] = value.strip()
    return out


def _resolve_columns(header: Sequence[str], mapping: Mapping[str, str], path: Path) -> dict[str, str]:
    lower = {h.strip().lower(): h for h in header}
    resolved: dict[str, str] = {}
    for key in CANONICAL:
        if key in mapping:
            if mapping[key] not in header:
                raise ClinicalTableError(
                    f"{path}: column {mapping[key]!r} (mapped to '{key}' by --column) not found; "
                    f"columns are {list(header)}"
                )
            resolved[key] = mapping[key]
            continue
        for alias in ALIASES[key]:
            if alias in lower:
                resolved[key] = lower[alias]
                break
    missing = [k for k in REQUIRED if k not in resolved]
    if missing:
        raise ClinicalTableError(
            f"{path}: required column(s) {missing} not found; columns are {list(header)}. "
            f"Map them with --column NAME=CSV_COLUMN (e.g. --column time=OS_days)"
        )
    return resolved


def _blank(value: str) -> bool:
    return value.strip() == "" or value.strip().lower() in ("na", "nan", "n/a", "none", "unknown", "?")


def _number(value: str, column: str) -> float:
    if _blank(value):
        return math.nan
    if not _NUMBER.fullmatch(value.strip()):
        raise ValueError(f"{column} {value!r} is not a number as a clinical export writes one "
                         "(digits, optional sign, decimal point and exponent)")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{column} {value!r} is not a finite number")
    return number


def _category(value: str, table: Mapping[str, int], column: str) -> float:
    if _blank(value):
        return math.nan
    key = value.strip().lower()
    if key.endswith(".0"):
        key = key[:-2]
    if key not in table:
        raise ValueError(f"{column} {value!r} is not one of {sorted(set(table))}")
    return float(table[key])


def _grade(value: str) -> float:
    if _blank(value):
        return math.nan
    key = re.sub(r"^(who\s*)?(grade\s*)?", "", value.strip().lower()).strip()
    if key.endswith(".0"):
        key = key[:-2]
    if key not in _GRADE:
        raise ValueError(f"grade {value!r} is not a WHO grade 2-4 (2/3/4 or II/III/IV)")
    return float(_GRADE[key])


def _validate_row(raw: Mapping[str, str], time_range: tuple[float, float] = TIME_RANGE_DAYS) -> dict[str, float]:
    time = _number(raw["time"], "time")
    if math.isnan(time):
        raise ValueError("time is empty")
    if time <= 0:
        raise ValueError(f"time {raw['time']!r} is not a positive number of days")
    if not time_range[0] <= time <= time_range[1]:
        raise ValueError(f"time {raw['time']!r} days is outside the plausible {time_range[0]:g}-{time_range[1]:g} "
                         "days (a unit or export error?); widen with --time-range-days MIN MAX")
    event_text = raw["event"].strip()
    if event_text not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"event {raw['event']!r} is not 0 or 1")
    row = {"time": time, "event": float(event_text[0])}
    row["age"] = _number(raw.get("age", ""), "age")
    if not math.isnan(row["age"]) and not 0 <= row["age"] <= 120:
        raise ValueError(f"age {raw['age']!r} is outside 0-120 years")
    row["sex"] = _category(raw.get("sex", ""), _SEX, "sex")
    row["grade"] = _grade(raw.get("grade", ""))
    row["idh"] = _category(raw.get("idh", ""), _IDH, "idh")
    row["mgmt"] = _category(raw.get("mgmt", ""), _MGMT, "mgmt")
    row["kps"] = _number(raw.get("kps", ""), "kps")
    if not math.isnan(row["kps"]) and not 0 <= row["kps"] <= 100:
        raise ValueError(f"kps {raw['kps']!r} is outside 0-100")
    row["resection"] = _category(raw.get("resection", ""), _RESECTION, "resection")
    gbm = _category(raw.get("glioblastoma", ""), {"0": 0, "1": 1, "yes": 1, "no": 0}, "glioblastoma")
    pathology = raw.get("pathology", "")
    if not _blank(pathology):
        label = pathology.strip().lower()
        if label not in PATHOLOGY_LABELS:
            raise ValueError(
                f"pathology {pathology!r} is not a known label; known: {sorted(PATHOLOGY_LABELS)}"
            )
        from_label = float(PATHOLOGY_LABELS[label])
        if not math.isnan(gbm) and gbm != from_label:
            raise ValueError(f"pathology {pathology!r} contradicts glioblastoma flag {raw['glioblastoma']!r}")
        gbm = from_label
    row["glioblastoma"] = gbm
    return row


def check_time_range(time_range: Sequence[float]) -> tuple[float, float]:
    """A `--time-range-days` value: 0 < MIN < MAX, finite (InputError otherwise)."""
    low, high = (float(v) for v in time_range)
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        raise InputError(f"--time-range-days {low:g} {high:g}: expected 0 < MIN < MAX, both finite")
    return low, high


def read_clinical(path: str | Path, column_map: Mapping[str, str] | None = None,
                  time_range: Sequence[float] = TIME_RANGE_DAYS) -> ClinicalTable:
    """Read and validate a clinical CSV.

    Parameters
    ----------
    path
        CSV file, one row per patient.
    column_map
        canonical name -> CSV column name, for columns not found under their usual names.
    time_range
        plausible survival times, days (rows outside are excluded with the reason).

    Raises
    ------
    ClinicalTableError
        The file cannot be read, a required column is missing, or patient ids repeat.
    """
    path = Path(path)
    time_range = check_time_range(time_range)
    if not path.is_file():
        raise ClinicalTableError(f"clinical table {path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ClinicalTableError(f"{path}: cannot be read as CSV ({exc})") from exc
    if frame.columns.duplicated().any():
        raise ClinicalTableError(f"{path}: repeated column names {list(frame.columns[frame.columns.duplicated()])}")
    columns = _resolve_columns(list(frame.columns), column_map or {}, path)
    frame = frame[list(columns.values())].rename(columns={v: k for k, v in columns.items()})
    ids = frame["patient_id"].str.strip()
    if (ids == "").any():
        lines = [int(i) + 2 for i in ids.index[ids == ""]]
        raise ClinicalTableError(f"{path}: empty patient_id on line(s) {lines}")
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise ClinicalTableError(f"{path}: duplicate patient_id(s) {duplicated}; each patient must appear once")
    frame["patient_id"] = ids
    rows: dict[str, dict[str, float]] = {}
    excluded: dict[str, str] = {}
    for record in frame.to_dict("records"):
        pid = record["patient_id"]
        try:
            rows[pid] = _validate_row(record, time_range)
        except ValueError as exc:
            excluded[pid] = f"{path.name}: {exc}"
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(STORED_COLUMNS), dtype="float64")
    table.index.name = "patient_id"
    return ClinicalTable(rows=table, excluded=excluded, source=path, columns=columns)
