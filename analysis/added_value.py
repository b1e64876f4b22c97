"""Does the deep prognostic index (DPI) add prognostic value over clinical factors?

Two Cox models (lifelines `CoxPHFitter`, Efron ties) on the same complete cases: clinical
covariates alone, and clinical + DPI (standardised). Reported: the likelihood-ratio test of the
DPI (chi-square, 1 df, p), both models' Harrell C-index with a paired bootstrap 95% CI of their
difference, the DPI's hazard ratio per SD with its 95% CI, and 1-year calibration of the full
model (predicted vs Kaplan-Meier observed survival by risk quintile).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from scipy import stats

from analysis.metrics import harrell_c

CLINICAL = ("age", "sex", "grade", "idh", "mgmt")


@dataclass
class AddedValue:
    n: int
    events: int
    covariates: list[str]
    lr_chi2: float
    lr_p: float
    cindex_clinical: float
    cindex_full: float
    cindex_diff_low: float
    cindex_diff_high: float
    hr_per_sd: float
    hr_low: float
    hr_high: float
    calibration: pd.DataFrame

    def row(self) -> dict:
        return {"patients": self.n, "events": self.events, "clinical covariates": ", ".join(self.covariates),
                "LR chi2": round(self.lr_chi2, 2), "LR p": float(f"{self.lr_p:.3g}"),
                "C clinical": round(self.cindex_clinical, 3), "C clinical + DPI": round(self.cindex_full, 3),
                "C difference [95% CI]": f"{self.cindex_full - self.cindex_clinical:+.3f} "
                                         f"[{self.cindex_diff_low:+.3f}, {self.cindex_diff_high:+.3f}]",
                "HR per SD of DPI [95% CI]": f"{self.hr_per_sd:.2f} [{self.hr_low:.2f}, {self.hr_high:.2f}]"}


def usable_covariates(frame: pd.DataFrame, candidates=CLINICAL) -> list[str]:
    """Clinical columns present with at least two values and not mostly missing."""
    out = []
    for column in candidates:
        if column in frame and frame[column].notna().mean() >= 0.8 and frame[column].nunique(dropna=True) >= 2:
            out.append(column)
    return out


def added_value(frame: pd.DataFrame, dpi: str = "dpi", covariates: list[str] | None = None,
                n_resamples: int = 1000, seed: int = 0, horizon: float = 365.0) -> AddedValue:
    """Compare clinical vs clinical + DPI Cox models on `frame` (columns time, event, DPI, clinical).

    The DPI is standardised on `frame` so its hazard ratio is per standard deviation.
    """
    covariates = usable_covariates(frame) if covariates is None else covariates
    data = frame[["time", "event", dpi, *covariates]].dropna().copy()
    data[dpi] = (data[dpi] - data[dpi].mean()) / data[dpi].std(ddof=0)
    clinical = CoxPHFitter().fit(data[["time", "event", *covariates]], "time", "event") if covariates else None
    full = CoxPHFitter().fit(data, "time", "event")
    if clinical is not None:
        ll_clinical = clinical.log_likelihood_
        lp_clinical = clinical.predict_log_partial_hazard(data[covariates]).to_numpy()
    else:  # no clinical covariate: the null model
        ll_clinical = CoxPHFitter().fit(data[["time", "event"]], "time", "event").log_likelihood_
        lp_clinical = np.zeros(len(data))
    lp_full = full.predict_log_partial_hazard(data).to_numpy()
    chi2 = float(2 * (full.log_likelihood_ - ll_clinical))
    time, event = data["time"].to_numpy(float), data["event"].to_numpy(int)
    c_clinical = harrell_c(time, event, lp_clinical) if clinical is not None else 0.5
    c_full = harrell_c(time, event, lp_full)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(data), len(data))
        if event[idx].sum() == 0:
            continue
        base = harrell_c(time[idx], event[idx], lp_clinical[idx]) if clinical is not None else 0.5
        diffs.append(harrell_c(time[idx], event[idx], lp_full[idx]) - base)
    low, high = np.quantile(diffs, [0.025, 0.975])
    summary = full.summary.loc[dpi]
    surv = full.predict_survival_function(data, times=[horizon]).to_numpy()[0]
    return AddedValue(len(data), int(event.sum()), covariates, chi2, float(stats.chi2.sf(chi2, 1)), c_clinical,
                      c_full, float(low), float(high), float(summary["exp(coef)"]),
                      float(summary["exp(coef) lower 95%"]), float(summary["exp(coef) upper 95%"]),
                      calibration(time, event, surv, horizon))


def calibration(time: np.ndarray, event: np.ndarray, predicted: np.ndarray, horizon: float = 365.0,
                groups: int = 5) -> pd.DataFrame:
    """Mean predicted vs Kaplan-Meier observed survival at `horizon` per predicted-risk group."""
    order = np.argsort(predicted)
    rows = []
    for k, part in enumerate(np.array_split(order, groups)):
        km = KaplanMeierFitter().fit(time[part], event[part])
        observed = float(km.survival_function_at_times(horizon).iloc[0])
        ci = km.confidence_interval_survival_function_
        at = ci.index[ci.index <= horizon]
        low, high = (ci.loc[at[-1]].to_numpy() if len(at) else (1.0, 1.0))
        rows.append({"group": k + 1, "patients": len(part), "predicted": float(predicted[part].mean()),
                     "observed": observed, "observed_low": float(low), "observed_high": float(high)})
    return pd.DataFrame(rows)


def added_value_row(frame: pd.DataFrame, **kwargs) -> tuple[dict, AddedValue | None]:
    """`added_value` as a table row; a cohort where the models cannot be fitted (too few patients
    or events, separation) gives a row saying why instead of stopping the report."""
    from lifelines.exceptions import ConvergenceError

    try:
        result = added_value(frame, **kwargs)
    except (ConvergenceError, ValueError, np.linalg.LinAlgError) as exc:
        return {"patients": int(len(frame)), "note": f"not estimable: {str(exc).splitlines()[0][:200]}"}, None
    return result.row(), result
