"""Clinical inputs of a fusion network, encoded with statistics of the training fold only.

`ClinicalEncoder.learn` looks at the training patients of one fold and fixes everything the
encoding needs; `encode` then applies it unchanged to that fold's validation patients and to
any external cohort, so no statistic of a patient being predicted reaches the network.

- **Columns**: the stored clinical columns named (`FUSION_DEFAULT`: age, sex, WHO grade, the
  glioblastoma flag from the histology, IDH, MGMT; KPS and extent of resection when a user adds
  them). A column absent from the store, without any value or constant among the training
  patients is skipped and recorded in `skipped` (the glioblastoma flag in a glioblastoma-only
  cohort), never an error: a fold can still learn from the others.
- **Coding**: ordinal columns with a few levels (`CATEGORICAL`: grade, resection) are one-hot
  coded on the levels seen in training, the first level the reference, because their effects are
  not linear in the code (grade 3 vs 4 is not grade 2 vs 3). Every coded feature is then
  standardised by its training mean and SD.
- **Missing values**: never a dropped patient. A missing value becomes 0 after standardisation
  (the training mean) and a 0/1 feature ``<column>_missing`` is added for every column with a
  missing value among the training patients (missing-indicator coding, as the report's Cox
  models use). A level never seen in training counts as missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from datasets.clinical import COVARIATES
from datasets.errors import InputError

# What a network sees: the study's inputs axis (`trainables.fusion` builds the networks).
IMAGE = "image"  # what a network is fed: the volumes alone,
IMAGE_CLINICAL = "image+clinical"  # or with the clinical variables (`trainables.fusion`)
INPUTS = (IMAGE, IMAGE_CLINICAL)
FUSION_DEFAULT = ("age", "sex", "grade", "glioblastoma", "idh", "mgmt")
# Training parameters that only an image+clinical network has.
FUSION_PARAMS = ("clinical_inputs", "clinical_hidden", "clinical_dropout")
CATEGORICAL = ("grade", "resection")


@dataclass
class ClinicalEncoder:
    """The clinical feature vector of a fold (see the module docstring).

    Attributes
    ----------
    columns
        Stored clinical columns that feed features.
    levels
        Categorical column -> its levels seen in training (one-hot, the first is the reference).
    indicators
        Columns that get a missing indicator.
    mean, sd
        Standardisation of each coded feature (the training patients' mean and SD).
    skipped
        Column -> why it gives no feature.
    """

    columns: list[str]
    levels: dict[str, list[float]]
    indicators: list[str]
    mean: list[float]
    sd: list[float]
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def learn(cls, frame: pd.DataFrame, columns: Sequence[str]) -> ClinicalEncoder:
        """Fix the encoding on the training patients in `frame` (one row per patient)."""
        check_known(columns)
        used, skipped = usable_columns(frame, columns, "among the training patients")
        if not used:
            raise InputError(f"no usable clinical input among {list(columns)} ("
                             + "; ".join(f"{c}: {why}" for c, why in skipped.items()) + ")")
        levels = {c: sorted(float(v) for v in frame[c].dropna().unique()) for c in used if c in CATEGORICAL}
        indicators = [c for c in used if frame[c].isna().any()]
        encoder = cls(used, levels, indicators, [], [], skipped)
        raw = encoder._raw(frame)
        encoder.mean = np.nanmean(raw, axis=0).tolist()
        sd = np.nanstd(raw, axis=0)
        encoder.sd = np.where(sd > 0, sd, 1.0).tolist()
        return encoder

    def feature_names(self) -> list[str]:
        names = []
        for column in self.columns:
            if column in self.levels:
                names += [f"{column}={level:g}" for level in self.levels[column][1:]]
            else:
                names.append(column)
        return names + [f"{c}_missing" for c in self.indicators]

    def __len__(self) -> int:
        return len(self.feature_names())

    def _raw(self, frame: pd.DataFrame) -> np.ndarray:
        """Coded features before standardisation, NaN where missing (indicators included)."""
        parts, missing = [], []
        for column in self.columns:
            values = frame[column].to_numpy(dtype=float) if column in frame else np.full(len(frame), np.nan)
            if column in self.levels:
                levels = self.levels[column]
                seen = np.isin(values, levels)
                values = np.where(seen, values, np.nan)
                dummies = np.stack([(values == level).astype(float) for level in levels[1:]], axis=1)
                dummies[~seen] = np.nan
                parts.append(dummies)
            else:
                parts.append(values[:, None])
            if column in self.indicators:
                missing.append(np.isnan(values).astype(float)[:, None])
        return np.concatenate(parts + missing, axis=1) if parts else np.zeros((len(frame), 0))

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 [len(frame), len(self)]: standardised features, missing values at 0."""
        raw = self._raw(frame)
        coded = (raw - np.asarray(self.mean)) / np.asarray(self.sd)
        return np.nan_to_num(coded, nan=0.0).astype(np.float32)

    def state(self) -> dict:
        """Plain lists and numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {"columns": list(self.columns), "levels": {k: list(v) for k, v in self.levels.items()},
                "indicators": list(self.indicators), "mean": list(self.mean), "sd": list(self.sd)}

    @classmethod
    def from_state(cls, state: dict) -> ClinicalEncoder:
        return cls(list(state["columns"]), {k: [float(x) for x in v] for k, v in state["levels"].items()},
                   list(state["indicators"]), [float(x) for x in state["mean"]], [float(x) for x in state["sd"]])


def check_known(columns: Sequence[str]) -> None:
    """InputError unless every column is a stored clinical covariate."""
    unknown = [c for c in columns if c not in COVARIATES]
    if unknown:
        raise InputError(f"clinical inputs {unknown} are not stored clinical columns; valid: {list(COVARIATES)}")


def usable_columns(frame: pd.DataFrame, columns: Sequence[str], among: str) -> tuple[list[str], dict[str, str]]:
    """The columns of `frame` with at least two values, and why each other one is left out
    (`among` says of which patients, e.g. "in this cohort")."""
    used, skipped = [], {}
    for column in columns:
        if column not in frame:
            skipped[column] = "not in the store"
        elif frame[column].notna().sum() == 0:
            skipped[column] = f"no value {among}"
        elif frame[column].nunique(dropna=True) < 2:
            skipped[column] = f"constant {among}"
        else:
            used.append(column)
    return used, skipped


def check_clinical_inputs(table: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    """Refuse (InputError naming `where`) a cohort with no value in any of the fusion's columns."""
    check_known(columns)
    usable = [c for c in columns if c in table and table[c].nunique(dropna=True) >= 2]
    if not usable:
        present = [c for c in table.columns if c not in ("time", "event") and table[c].notna().any()]
        raise InputError(f"{where}: inputs image+clinical need clinical columns with values, but none of "
                         f"{list(columns)} varies among its patients (columns with values beyond time and event: "
                         f"{', '.join(present) or 'none'}); map them when converting (--column) or train "
                         "--inputs image")
