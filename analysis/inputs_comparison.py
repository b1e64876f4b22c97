"""Images alone, clinical factors alone, or both: the models compared on the same patients.

- **Clinical-only Cox model** (lifelines `CoxPHFitter`, ridge penalty 0.01 because codes such as
  the glioblastoma flag can be determined by grade and IDH): the columns an ``image+clinical``
  network sees, encoded exactly as it encodes them (`datasets.clinical_features`: statistics of
  the training fold only, one-hot grade, missing indicators), fitted in the same folds as the
  networks (the ``fold`` column of their out-of-fold table), so its out-of-fold predictions
  follow the networks' protocol. Its risk is the fold-calibrated log cumulative hazard at day
  365, like the networks' DPI (`trainables.heads`), so the pooled C does not mix per-fold
  offsets.
- **Each model**: pooled out-of-fold Harrell C [95% CI] and the Brier score at day 365 (the
  1-year task's survivors count as alive at day 365, as in `trainables.cross_validation`).
- **Each pair**: the difference of their C-indices on the same bootstrap resamples of patients
  (paired), with its percentile 95% CI.
- **External cohorts**: every model applied unchanged; the clinical model as the mean risk of
  its K fold fits, like the networks' fold ensembles (`trainables.ensemble`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter

from datasets.clinical_features import ClinicalEncoder
from evaluation import metric_names as names
from evaluation.metrics import Estimate, SurvivalDataError, bootstrap_ci, harrell_c
from evaluation.prediction_metrics import Predictions, metric_columns, registered, score_predictions

CLINICAL_MODEL = "clinical Cox"
HORIZON_DAYS = 365.0


@dataclass
class ClinicalCox:
    """A Cox model of the encoded clinical vector, fitted on one fold's training patients."""

    encoder: ClinicalEncoder
    model: CoxPHFitter

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns) -> ClinicalCox:
        encoder = ClinicalEncoder.learn(frame, columns)
        data = pd.DataFrame(encoder.encode(frame), columns=encoder.feature_names())
        data["time"], data["event"] = frame["time"].to_numpy(float), frame["event"].to_numpy(int)
        return cls(encoder, CoxPHFitter(penalizer=0.01).fit(data, "time", "event"))

    def predict(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """``risk``: log H(365 | x); ``surv_365``: exp(-H(365 | x))."""
        x = pd.DataFrame(self.encoder.encode(frame), columns=self.encoder.feature_names())
        hazard = self.model.predict_cumulative_hazard(x, times=[HORIZON_DAYS]).to_numpy()[0]
        hazard = np.maximum(hazard, 1e-12)
        return {"risk": np.log(hazard), "surv_365": np.exp(-hazard)}


def clinical_oof(frame: pd.DataFrame, columns) -> tuple[pd.DataFrame, list[ClinicalCox]]:
    """Out-of-fold predictions of the clinical Cox model in the folds of `frame` (patient_id,
    fold, time, event and the clinical columns, one row per patient), and its fold fits."""
    parts, fits = [], []
    for fold in sorted(frame["fold"].unique()):
        train, val = frame[frame["fold"] != fold], frame[frame["fold"] == fold]
        fit = ClinicalCox.fit(train, columns)
        fits.append(fit)
        parts.append(val[["patient_id", "fold", "time", "event"]].assign(**fit.predict(val)))
    return pd.concat(parts).set_index("patient_id").loc[frame["patient_id"]].reset_index(), fits


def ensemble_predict(fits: list[ClinicalCox], frame: pd.DataFrame) -> dict[str, np.ndarray]:
    predictions = [f.predict(frame) for f in fits]
    return {k: np.mean([p[k] for p in predictions], axis=0) for k in ("risk", "surv_365")}


def _cindex_difference(time, event, risk_a, risk_b) -> float:
    return harrell_c(time, event, risk_a) - harrell_c(time, event, risk_b)


def paired_difference(time, event, risk_a, risk_b, n_resamples: int = 1000, seed: int = 0) -> Estimate:
    """C(risk_a) - C(risk_b) on the same patients, with the percentile CI of paired resamples (both
    risks scored on each resample of patients)."""
    return bootstrap_ci(_cindex_difference, np.asarray(time, float), np.asarray(event, int),
                        np.asarray(risk_a, float), np.asarray(risk_b, float), n_resamples=n_resamples, seed=seed)


def compare(outcome: pd.DataFrame, models: dict[str, pd.DataFrame], horizon: float | None,
            pairs: list[tuple[str, str]] | None = None, n_resamples: int = 1000,
            seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per model: C [CI], Brier 365; one row per pair (a, b): C(a) - C(b) [CI]) on the
    patients of `outcome` (patient_id, time, event); `models` maps a name to predictions with
    patient_id, ``risk`` and ``surv_365``; `pairs` defaults to every pair."""
    ids = outcome["patient_id"]
    time, event = outcome["time"].to_numpy(float), outcome["event"].to_numpy(int)
    aligned = {name: frame.set_index("patient_id").loc[ids] for name, frame in models.items()}
    rows, differences = [], []
    for name, frame in aligned.items():
        # A clinical model has no survival curves: the metrics of a risk and a 365-day survival.
        predictions = Predictions(time, event, frame["risk"], frame["surv_365"], np.empty((len(ids), 0)), (), horizon,
                                  seed, n_resamples)
        entries = [registered(names.OOF_CINDEX), registered(names.BRIER_365)]
        rows.append({"model": name, "patients": len(ids),
                     **metric_columns(score_predictions(predictions, metrics=entries), metrics=entries)})
    for a, b in pairs if pairs is not None else itertools.combinations(aligned, 2):
        row = {"comparison": f"{a} - {b}", "patients": len(ids)}
        try:
            diff = paired_difference(time, event, aligned[a]["risk"], aligned[b]["risk"], n_resamples, seed)
            row.update({"ΔC [95% CI]": f"{diff.value:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]",
                        "CI excludes 0": bool(diff.low > 0 or diff.high < 0)})
        except SurvivalDataError as exc:
            row.update({"ΔC [95% CI]": f"n/a ({exc})", "CI excludes 0": False})
        differences.append(row)
    return pd.DataFrame(rows), pd.DataFrame(differences)
