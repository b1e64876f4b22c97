"""Reading and validating a site's clinical table.

Only the canonical columns below are ever read from the CSV; every other column (names, dates of
birth, free text) is dropped on reading, so it can never reach a cohort store.

=============  ==========================================  ==================================
column         meaning                                     stored as
=============  ==========================================  ==================================
patient_id     identifier matching the image folder name    string (required)
time           overall survival or follow-up, days          float in `TIME_RANGE_DAYS` (required)
event          1 = death observed, 0 = censored; or R's     0/1 (required)
               coding 2 = death, 1 = censored (see below)
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

The event column's coding is decided from the column's set of values, never row by row: ``0/1``
(or ``true/false``, ``yes/no``) is 1 = death; ``1/2`` is R's ``survival`` / SAS ``status`` coding,
2 = death, 1 = censored (the stored event is then 1 for a 2); a column whose every value is 1 is
read as 1 = death (in R's coding it would hold no event: no survival model could learn from it),
one whose every value is 2 as R's coding. Any other set (``0, 1, 2`` together, ``0, 2``, ...)
is ambiguous and stops the conversion, naming the column and its values: ``--event-coding 01``
or ``12`` says which (`EVENT_CODINGS`). The coding read is stated in the converter's summary,
the manifest and the QC page.

Patient ids are matched as `datasets.patient_ids` describes: NFC-normalised; ids that differ only
in letter case or Unicode normalisation are one patient named twice (a table-level fault, as a
repeated id is); an id that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@`` first)
excludes its row.

Policy: a table-level fault (unreadable file, a required column absent, duplicate patient ids, an
ambiguous event coding) raises `ClinicalTableError`; a row-level fault (time <= 0, an event
outside the column's coding, non-numeric age, an unknown pathology label, a formula as id, ...)
excludes that patient with the reason recorded, so nothing is silently dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from datasets.errors import ClinicalTableError, InputError
from datasets.patient_ids import FORMULA_STARTS, formula_problem, formula_reason, identity, normalise

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

# Codings of the event column (`--event-coding`): what each says.
EVENT_CODINGS: dict[str, str] = {
    "01": "1 = death, 0 = censored",
    "12": "2 = death, 1 = censored (R's survival / SAS status coding)",
}
_EVENT_WORDS = {"true": "1", "yes": "1", "false": "0", "no": "0"}

# Column names recognised without a --column mapping (lower case).
ALIASES: dict[str, tuple[str, ...]] = {
    "patient_id": ("patient_id", "patientid", "patient", "id", "subject", "subject_id", "case_id",
                   "participant_id"),  # participant_id: BIDS participants.tsv
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
    event_coding
        ``"01"`` or ``"12"`` (`EVENT_CODINGS`), as read from the event column's values.
    event_note
        One line saying which coding was read and why (for the summary, manifest and QC page).
    unvalidated
        Ids of rows left unvalidated because they were not asked for (`ClinicalSource.validate`'s
        `only`: the converter validates only rows that have an image folder), in table order.
    """

    rows: pd.DataFrame
    excluded: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    columns: dict[str, str] = field(default_factory=dict)
    event_coding: str = "01"
    event_note: str = ""
    unvalidated: list[str] = field(default_factory=list)


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


def _resolve_columns(header: Sequence[str], mapping: Mapping[str, str], path: Path,
                     required: Sequence[str] = REQUIRED) -> dict[str, str]:
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
    missing = [k for k in required if k not in resolved]
    if missing:
        raise ClinicalTableError(
            f"{path}: required column(s) {missing} not found; columns are {list(header)}. "
            f"Map them with --column NAME=CSV_COLUMN (e.g. --column time=OS_days)"
        )
    return resolved


def _separator(path: Path) -> str:
    """Tab for ``.tsv`` files (BIDS ``participants.tsv``), comma otherwise."""
    return "\t" if path.suffix.lower() == ".tsv" else ","


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


def _event_token(value: str) -> str | None:
    """An event cell as one of "0", "1", "2" (numbers as exports write them, true/false, yes/no),
    or None for anything else (excluded row by row)."""
    text = value.strip().lower()
    if text in _EVENT_WORDS:
        return text
    if _NUMBER.fullmatch(text):
        number = float(text)
        if number in (0.0, 1.0, 2.0):
            return str(int(number))
    return None


def _event(value: str, coding: str, column: str) -> float:
    token = _event_token(value)
    if coding == "12":
        if token in ("1", "2"):
            return float(token == "2")
        raise ValueError(f"event {value!r} is not 1 or 2 (the event column {column!r} is read in R's coding: "
                         "2 = death, 1 = censored)")
    if token is not None and token != "2":
        return float(_EVENT_WORDS.get(token, token))
    raise ValueError(f"event {value!r} is not 0 or 1 (1 = death, 0 = censored; true/false and yes/no accepted)")


def check_event_coding(coding: str | None) -> str | None:
    """A `--event-coding` value: None, "01" or "12" (InputError otherwise)."""
    if coding is not None and coding not in EVENT_CODINGS:
        raise InputError(f"--event-coding {coding!r}: expected one of {sorted(EVENT_CODINGS)} "
                         f"(01: {EVENT_CODINGS['01']}; 12: {EVENT_CODINGS['12']})")
    return coding


def decide_event_coding(values: Collection[str], column: str, path: Path, forced: str | None = None) -> tuple[str, str]:
    """(coding, note) of an event column from its set of values (see the module docstring);
    ClinicalTableError when the set is ambiguous and no coding is `forced`."""
    written = sorted({v.strip() for v in values if v.strip()})
    shown = ", ".join(repr(v) for v in written[:12]) + (f" and {len(written) - 12} more" if len(written) > 12 else "")
    if forced is not None:
        return forced, (f"event column {column!r} (values {shown}) read as {EVENT_CODINGS[forced]} "
                        f"(--event-coding {forced})")
    tokens = {_event_token(v) for v in written} - {None}
    numbers = {_EVENT_WORDS.get(t, t) for t in tokens}
    if "2" not in numbers:
        if numbers == {"1"} and tokens == {"1"}:
            return "01", (f"event column {column!r}: every value is 1, read as 1 = death (0/1 coding; in R's 1/2 "
                          "coding the cohort would have no event); if 1 means censored, convert with --event-coding 12")
        return "01", f"event column {column!r} (values {shown}) read as {EVENT_CODINGS['01']}"
    if tokens <= {"1", "2"}:
        return "12", (f"event column {column!r} (values {shown}) read as R's survival coding: 2 = death, "
                      "1 = censored (--event-coding 01 reads them otherwise)")
    raise ClinicalTableError(
        f"{path}: event column {column!r} holds the values {shown}: the event coding is ambiguous (0/1 and "
        "true/false code 1 = death, R's survival / SAS status codes 2 = death and 1 = censored; these values mix "
        "them). Say which with --event-coding 01 (1 = death, 0 = censored) or --event-coding 12 (2 = death, "
        "1 = censored); rows outside the coding are then excluded with the value")


def _validate_row(raw: Mapping[str, str], time_range: tuple[float, float] = TIME_RANGE_DAYS,
                  coding: str = "01", event_column: str = "event") -> dict[str, float]:
    time = _number(raw["time"], "time")
    if math.isnan(time):
        raise ValueError("time is empty")
    if time <= 0:
        raise ValueError(f"time {raw['time']!r} is not a positive number of days")
    if not time_range[0] <= time <= time_range[1]:
        raise ValueError(f"time {raw['time']!r} days is outside the plausible {time_range[0]:g}-{time_range[1]:g} "
                         "days (a unit or export error?); widen with --time-range-days MIN MAX")
    return {"time": time, "event": _event(raw["event"], coding, event_column), **_covariates(raw)}


def _covariates(raw: Mapping[str, str]) -> dict[str, float]:
    """A row's clinical covariates (`COVARIATES`), NaN where blank; ValueError naming a bad value."""
    row = {"age": _number(raw.get("age", ""), "age")}
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


def _check_ids(raw_ids: pd.Series, path: Path) -> pd.Series:
    """The ids as matched (stripped, NFC); ClinicalTableError for an empty id, or for ids that
    name one patient twice: repeated, or differing only in letter case or Unicode normalisation."""
    stripped = raw_ids.str.strip()
    if (stripped == "").any():
        lines = [int(i) + 2 for i in stripped.index[stripped == ""]]
        raise ClinicalTableError(f"{path}: empty patient_id on line(s) {lines}")
    ascii_only = stripped.map(str.isascii, na_action=None).astype(bool)
    ids = stripped.copy()
    keys = stripped.str.lower()
    if not ascii_only.all():
        ids[~ascii_only] = stripped[~ascii_only].map(normalise)
        keys[~ascii_only] = stripped[~ascii_only].map(identity)
    clash = keys.duplicated(keep=False)
    if clash.any():
        groups: dict[str, list[tuple[int, str]]] = {}
        for index, key, spelled in zip(stripped.index[clash], keys[clash], stripped[clash]):
            groups.setdefault(key, []).append((int(index) + 2, spelled))
        repeated = sorted(g[0][1] for g in groups.values() if len({s for _, s in g}) == 1)
        spelled_apart = [g for g in groups.values() if len({s for _, s in g}) > 1]
        problems = []
        if repeated:
            problems.append(f"duplicate patient_id(s) {repeated}; each patient must appear once")
        if spelled_apart:
            named = "; ".join(" and ".join(f"{ascii(s)} (line {line})" for line, s in g) for g in spelled_apart[:10])
            problems.append(f"patient_id(s) {named} are one patient spelled differently (they differ only in letter "
                            "case or in Unicode normalisation, e.g. 'ü' typed as one character or as 'u' and a "
                            "combining diaeresis); each patient must appear once, spelled one way")
        raise ClinicalTableError(f"{path}: " + "; ".join(problems))
    return ids


@dataclass
class ClinicalSource:
    """A clinical table read and checked as a whole (columns, ids, event coding); its rows are
    validated by `validate`, all of them or only those asked for."""

    frame: pd.DataFrame  # canonical columns, patient_id matched form (stripped, NFC)
    source: Path
    columns: dict[str, str]
    time_range: tuple[float, float]
    event_coding: str
    event_note: str
    excluded: dict[str, str]  # rows refused whatever their values (an id a spreadsheet runs)

    @property
    def ids(self) -> pd.Series:
        """Every patient id of the table (the excluded ones too), in table order."""
        return self.frame["patient_id"]

    def validate(self, only: Collection[str] | None = None) -> ClinicalTable:
        """Validate the rows (those whose id is in `only`, when given; the others are listed in
        `ClinicalTable.unvalidated`): each kept, or excluded with the reason."""
        frame = self.frame[~self.frame["patient_id"].isin(self.excluded)]
        unvalidated: list[str] = []
        if only is not None:
            asked = frame["patient_id"].isin(set(only))
            unvalidated = frame.loc[~asked, "patient_id"].tolist()
            frame = frame[asked]
        rows: dict[str, dict[str, float]] = {}
        excluded = dict(self.excluded)
        event_column = self.columns.get("event", "event")
        for record in frame.to_dict("records"):
            pid = record["patient_id"]
            try:
                rows[pid] = _validate_row(record, self.time_range, self.event_coding, event_column)
            except ValueError as exc:
                excluded[pid] = f"{self.source.name}: {exc}"
        table = pd.DataFrame.from_dict(rows, orient="index", columns=list(STORED_COLUMNS), dtype="float64")
        table.index.name = "patient_id"
        return ClinicalTable(rows=table, excluded=excluded, source=self.source, columns=self.columns,
                             event_coding=self.event_coding, event_note=self.event_note, unvalidated=unvalidated)


def _read_table(path: Path) -> pd.DataFrame:
    """A clinical CSV (or BIDS TSV) as text cells; ClinicalTableError if it is absent, unreadable or
    repeats a column name."""
    if not path.is_file():
        raise ClinicalTableError(f"clinical table {path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, sep=_separator(path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ClinicalTableError(f"{path}: cannot be read as CSV ({exc})") from exc
    if frame.columns.duplicated().any():
        raise ClinicalTableError(f"{path}: repeated column names {list(frame.columns[frame.columns.duplicated()])}")
    return frame


def load_clinical(path: str | Path, column_map: Mapping[str, str] | None = None,
                  time_range: Sequence[float] = TIME_RANGE_DAYS, event_coding: str | None = None) -> ClinicalSource:
    """Read a clinical CSV and check it as a whole (see `read_clinical`); rows not yet validated."""
    path = Path(path)
    time_range = check_time_range(time_range)
    check_event_coding(event_coding)
    frame = _read_table(path)
    columns = _resolve_columns(list(frame.columns), column_map or {}, path)
    frame = frame[list(columns.values())].rename(columns={v: k for k, v in columns.items()})
    frame["patient_id"] = _check_ids(frame["patient_id"], path)
    coding, note = decide_event_coding(pd.unique(frame["event"]), columns["event"], path, event_coding)
    ids = frame["patient_id"]
    suspect = ids.str[0].isin(list(FORMULA_STARTS)) | ids.str.contains(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", regex=True)
    excluded = {pid: f"{path.name}: {formula_reason(pid)}" for pid in ids[suspect] if formula_problem(pid)}
    return ClinicalSource(frame=frame, source=path, columns=columns, time_range=time_range, event_coding=coding,
                          event_note=note, excluded=excluded)


def read_clinical(path: str | Path, column_map: Mapping[str, str] | None = None,
                  time_range: Sequence[float] = TIME_RANGE_DAYS, event_coding: str | None = None) -> ClinicalTable:
    """Read and validate a clinical CSV.

    Parameters
    ----------
    path
        CSV file, one row per patient.
    column_map
        canonical name -> CSV column name, for columns not found under their usual names.
    time_range
        plausible survival times, days (rows outside are excluded with the reason).
    event_coding
        ``"01"`` or ``"12"`` (`EVENT_CODINGS`); None decides it from the event column's values.

    Raises
    ------
    ClinicalTableError
        The file cannot be read, a required column is missing, patient ids repeat (also spelled
        apart only by letter case or Unicode normalisation), or the event coding is ambiguous.
    """
    return load_clinical(path, column_map, time_range, event_coding).validate()


def read_covariates(path: str | Path, column_map: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """The clinical covariates of new patients, whose outcome is not known (`study.predict`): only
    ``patient_id`` is required; survival columns, if present, are ignored. Values are parsed as the
    converter parses them (the same codings of sex, IDH, MGMT, pathology; blanks are NaN, which the
    models impute as in training). Returns the rows (index patient_id, `COVARIATES` columns) and
    the excluded rows with their reasons.

    Raises ClinicalTableError as `read_clinical` does (unreadable file, no id column, repeated ids).
    """
    path = Path(path)
    frame = _read_table(path)
    columns = {k: v for k, v in _resolve_columns(list(frame.columns), column_map or {}, path,
                                                 required=("patient_id",)).items() if k not in ("time", "event")}
    frame = frame[list(columns.values())].rename(columns={v: k for k, v in columns.items()})
    frame["patient_id"] = _check_ids(frame["patient_id"], path)
    rows: dict[str, dict[str, float]] = {}
    excluded: dict[str, str] = {}
    for record in frame.to_dict("records"):
        pid = record["patient_id"]
        problem = formula_problem(pid)
        if problem:
            excluded[pid] = f"{path.name}: {formula_reason(pid)}"
            continue
        try:
            rows[pid] = _covariates(record)
        except ValueError as exc:
            excluded[pid] = f"{path.name}: {exc}"
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(COVARIATES), dtype="float64")
    table.index.name = "patient_id"
    return table, excluded
