"""Does the deep prognostic index (DPI) add prognostic value over clinical factors?

Two Cox models (lifelines `CoxPHFitter`, Efron ties) on the same patients: clinical covariates
alone, and clinical + DPI (standardised by its development mean and SD).

- **Covariates**: by default every mapped clinical column with at least two values among the
  patients (`CLINICAL`: age, sex, WHO grade, the glioblastoma flag from the histology, IDH, MGMT,
  and KPS and extent of resection when a site has them); a column that is constant here (the
  glioblastoma flag in a glioblastoma-only cohort) is listed as not estimable, never dropped
  silently. ``--clinical`` on the report chooses them.
- **Missing values**: missing-indicator coding. A missing value is replaced by the development
  mean of its covariate and a 0/1 column ``<covariate>_missing`` is added, so no patient is
  dropped; the report states how many values were filled. Chosen over multiple imputation
  because the models here *predict* (the question is the DPI's gain in discrimination, not an
  unbiased coefficient of a covariate), and because the same fill and indicator apply unchanged
  to an external cohort, which chained-equation imputation of the external outcomes would not
  allow (van Smeden et al., Diagn Progn Res 2020; Sperrin et al., Stat Med 2020).
- **Development**: likelihood-ratio test of the DPI (chi-square, 1 df); both models' Harrell
  C-index; their difference ΔC corrected for optimism by the bootstrap (Harrell 2015, section
  5.3): both models are refitted in every resample and evaluated on the resample and on the
  original patients; the mean difference of the two ΔCs (the optimism) is subtracted from the
  apparent ΔC (the refits by `efron_coefficients`: lifelines' maximum at a tenth of its cost, and
  where a covariate separates a resample's deaths, a large coefficient as lifelines gives). The 95%
  interval is the percentile interval of the resamples' apparent ΔC shifted by the optimism, and
  the two-sided p-value the share of that shifted distribution on the other side of 0 (doubled).
  `python -m benchmarks.added_value_optimism` checks it on simulated cohorts
  with and without added value. Also the DPI's hazard ratio per SD and 1-year calibration.
- **External cohorts**: both models are fitted on the development patients only and applied
  unchanged (same fill values, same DPI scaling): C-indices, ΔC with its paired bootstrap CI; and
  the likelihood-ratio test refitted on the external patients.
- **Which test is primary**: the DPI tested is the selected configuration's, chosen among the cell's
  configurations by its C-index on the development patients; under the null that choice makes the
  development LR test too liberal (19 % at 0.05 for the best of 20 independent configurations;
  `python -m benchmarks.added_value_selection`). So the primary test is the LR test on an external
  cohort, which no choice saw, where there is one; on development data the LR p-value multiplied by
  the number of configurations the cell tried (Bonferroni: at most 5 % under the null whatever
  their correlation); the unadjusted p-value is shown as exploratory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from scipy import stats

from evaluation.metrics import SurvivalDataError, harrell_c
from datasets.clinical import COVARIATES as CLINICAL
from datasets.clinical_features import usable_columns


@dataclass
class Design:
    """How clinical covariates become model columns: fill values and missing indicators
    (learned on the development patients, applied unchanged elsewhere) and the DPI's scaling.

    Covariates missing for the same patients share one indicator (``idh+mgmt_missing`` when a
    site tested neither); a column that the others determine exactly on the development patients
    (the glioblastoma flag when every grade-4 tumour is IDH-wildtype and no grade 2 is present, an
    indicator equal to another) is left out and listed as not estimable: lifelines cannot invert
    a collinear design."""

    covariates: list[str]
    fill: dict[str, float]
    indicators: dict[str, list[str]]  # indicator column -> the covariates whose missingness it flags
    dpi_mean: float
    dpi_sd: float
    not_estimable: dict[str, str]

    @classmethod
    def learn(cls, frame: pd.DataFrame, covariates: list[str], dpi: str = "dpi") -> Design:
        usable, skipped = usable_columns(frame, covariates, "in this cohort")
        patterns: dict[bytes, list[str]] = {}
        for column in usable:
            missing = frame[column].isna().to_numpy()
            if missing.any():
                patterns.setdefault(missing.tobytes(), []).append(column)
        indicators = {"+".join(group) + "_missing": group for group in patterns.values()}
        sd = float(frame[dpi].std(ddof=0)) or 1.0
        design = cls(usable, {c: float(frame[c].mean()) for c in usable}, indicators, float(frame[dpi].mean()), sd,
                     skipped)
        design._drop_collinear(frame)
        return design

    def _drop_collinear(self, frame: pd.DataFrame) -> None:
        """Leave out columns that the intercept and the columns before them determine exactly."""
        data = self.apply(frame.assign(dpi=0.0))
        kept = [np.ones(len(data))]
        for column in self.columns():
            candidate = np.column_stack([*kept, data[column].to_numpy(float)])
            if np.linalg.matrix_rank(candidate) > len(kept):
                kept.append(data[column].to_numpy(float))
                continue
            self.not_estimable[column] = "determined by the covariates before it in this cohort"
            if column in self.indicators:
                del self.indicators[column]
            else:
                self.covariates.remove(column)

    def columns(self) -> list[str]:
        return [*self.covariates, *self.indicators]

    def apply(self, frame: pd.DataFrame, dpi: str = "dpi") -> pd.DataFrame:
        """time, event, the covariate columns (filled) with their indicators, and ``dpi`` scaled."""
        out = frame[["time", "event"]].astype(float).copy()
        for c in self.covariates:
            out[c] = frame[c].fillna(self.fill[c]) if c in frame else self.fill[c]
        for name, group in self.indicators.items():
            present = [c for c in group if c in frame]
            out[name] = frame[present].isna().any(axis=1).astype(float) if present else 1.0
        out["dpi"] = (frame[dpi] - self.dpi_mean) / self.dpi_sd
        return out.reset_index(drop=True)

    def filled(self, frame: pd.DataFrame) -> dict[str, int]:
        """Values filled per covariate in `frame`."""
        return {c: int(frame[c].isna().sum()) if c in frame else len(frame) for c in self.covariates
                if c not in frame or frame[c].isna().any()}


def efron_coefficients(x: np.ndarray, time: np.ndarray, event: np.ndarray, max_iter: int = 100,
                       tol: float = 1e-9) -> np.ndarray:
    """The coefficients of a Cox model (Efron's ties) of `x`: Newton-Raphson with step halving on
    standardised columns, to the maximum of the partial likelihood that lifelines' `CoxPHFitter`
    reaches (within its tolerance; `tests/test_analysis_metrics.py` compares them), at a small part
    of its cost per fit. For the bootstrap refits, which need only the linear predictor: lifelines'
    fit also computes summaries, a baseline hazard and data descriptions, three quarters of its
    time. Raises `SurvivalDataError` where no step increases the likelihood (a singular model)."""
    order = np.argsort(-np.asarray(time, float), kind="stable")
    x, time, event = np.asarray(x, float)[order], np.asarray(time, float)[order], np.asarray(event, float)[order]
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0
    z = (x - x.mean(axis=0)) / sd
    _, start = np.unique(-time, return_index=True)  # the rows of each distinct time, latest first
    last = np.r_[start[1:], len(time)] - 1  # a time's risk set: the rows up to its last one
    deaths = np.add.reduceat(event, start).astype(int)
    zz = z[:, :, None] * z[:, None, :]

    def partial_likelihood(beta):
        eta = z @ beta
        w = np.exp(eta - eta.max())
        s0, s1, s2 = (np.cumsum(a, axis=0)[last] for a in (w, w[:, None] * z, w[:, None, None] * zz))
        dw = event * w
        d0, d1, d2 = (np.add.reduceat(a, start, axis=0) for a in (dw, dw[:, None] * z, dw[:, None, None] * zz))
        ll, grad, hess = float(event @ eta), event @ z, np.zeros((z.shape[1],) * 2)
        for tied in range(deaths.max(initial=0)):  # Efron: the l-th of d tied deaths removes l/d of them
            at = deaths > tied
            f = tied / deaths[at]
            phi = s0[at] - f * d0[at]
            mean1 = (s1[at] - f[:, None] * d1[at]) / phi[:, None]
            ll -= float(np.sum(np.log(phi) + eta.max()))
            grad = grad - mean1.sum(axis=0)
            hess -= ((s2[at] - f[:, None, None] * d2[at]) / phi[:, None, None]).sum(axis=0) - mean1.T @ mean1
        return ll, grad, hess

    beta = np.zeros(z.shape[1])
    ll, grad, hess = partial_likelihood(beta)
    for _ in range(max_iter):
        try:
            step = np.linalg.solve(-hess, grad)
        except np.linalg.LinAlgError as exc:
            raise SurvivalDataError("the Cox model's information matrix is singular") from exc
        if np.max(np.abs(step), initial=0.0) < tol or float(grad @ step) / 2 < 1e-16:
            # At the maximum; or, where a covariate separates the deaths (a rare missing indicator
            # without a death in a resample), where the likelihood has levelled off on its way to
            # infinity: lifelines stops there too (its Newton decrement), with a large coefficient.
            return beta / sd
        for _ in range(30):  # halve the step until the partial likelihood does not decrease
            new = partial_likelihood(beta + step)
            if np.isfinite(new[0]) and new[0] >= ll - 1e-12:
                break
            step = step / 2
        else:
            raise SurvivalDataError("the Cox model's partial likelihood cannot be increased")
        beta, (ll, grad, hess) = beta + step, new
    raise SurvivalDataError("the Cox model did not converge")


@dataclass
class Models:
    """The clinical and clinical + DPI Cox models (None: no clinical covariate, the null model)."""

    clinical: CoxPHFitter | None
    full: CoxPHFitter
    columns: list[str]

    @classmethod
    def fit(cls, data: pd.DataFrame, columns: list[str]) -> Models:
        clinical = CoxPHFitter().fit(data[["time", "event", *columns]], "time", "event") if columns else None
        full = CoxPHFitter().fit(data[["time", "event", *columns, "dpi"]], "time", "event")
        return cls(clinical, full, columns)

    def linear_predictors(self, data: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray]:
        """(clinical, clinical + DPI) linear predictors of `data`'s patients (None: the null model)."""
        full = data[[*self.columns, "dpi"]].to_numpy(float) @ self.full.params_.to_numpy(float)
        if self.clinical is None:
            return None, full
        return data[self.columns].to_numpy(float) @ self.clinical.params_.to_numpy(float), full

    def cindices(self, data: pd.DataFrame) -> tuple[float, float]:
        """(C clinical, C clinical + DPI) on `data`; the null model's C is 0.5."""
        return _cindices(data["time"].to_numpy(float), data["event"].to_numpy(int), *self.linear_predictors(data))


def _cindices(time, event, clinical, full) -> tuple[float, float]:
    return (0.5 if clinical is None else harrell_c(time, event, clinical)), harrell_c(time, event, full)


def _refit_gain(sample: pd.DataFrame, data: pd.DataFrame, columns: list[str]) -> tuple[float, float]:
    """The bootstrap step of the optimism correction: both models refitted on `sample`; their ΔC
    (C clinical + DPI - C clinical) on the sample and on the original patients `data`."""
    kept = [c for c in columns if sample[c].nunique() > 1]
    time, event = sample["time"].to_numpy(float), sample["event"].to_numpy(int)
    beta_full = efron_coefficients(sample[[*kept, "dpi"]].to_numpy(float), time, event)
    beta_clinical = efron_coefficients(sample[kept].to_numpy(float), time, event) if kept else None
    gains = []
    for frame in (sample, data):
        clinical = None if beta_clinical is None else frame[kept].to_numpy(float) @ beta_clinical
        c_clinical, c_full = _cindices(frame["time"].to_numpy(float), frame["event"].to_numpy(int), clinical,
                                       frame[[*kept, "dpi"]].to_numpy(float) @ beta_full)
        gains.append(c_full - c_clinical)
    return gains[0], gains[1]


@dataclass
class AddedValue:
    n: int
    events: int
    covariates: list[str]
    filled: dict[str, int]
    not_estimable: dict[str, str]
    lr_chi2: float
    lr_p: float
    cindex_clinical: float
    cindex_full: float
    delta_corrected: float
    delta_low: float
    delta_high: float
    delta_p: float
    optimism: float
    hr_per_sd: float
    hr_low: float
    hr_high: float
    calibration: pd.DataFrame
    resamples: int = 0  # bootstrap resamples behind delta_p
    configurations: int = 1  # configurations the cell tried: the DPI was chosen among them

    def row(self) -> dict:
        return {"patients": self.n, "events": self.events, "clinical covariates": ", ".join(self.covariates),
                "values filled (missing indicator)": ", ".join(f"{k} {v}" for k, v in self.filled.items()) or "none",
                "not estimable": ", ".join(f"{k} ({v})" for k, v in self.not_estimable.items()) or "",
                "LR chi2": round(self.lr_chi2, 2),
                f"LR p x {self.configurations} configurations (primary on development)":
                    float(f"{selection_adjusted(self.lr_p, self.configurations):.3g}"),
                "LR p (exploratory: ignores the choice of the DPI)": float(f"{self.lr_p:.3g}"),
                "C clinical": round(self.cindex_clinical, 3), "C clinical + DPI": round(self.cindex_full, 3),
                "apparent ΔC": round(self.cindex_full - self.cindex_clinical, 3),
                "ΔC optimism-corrected [95% CI]": f"{self.delta_corrected:+.3f} [{self.delta_low:+.3f}, "
                                                  f"{self.delta_high:+.3f}]",
                "ΔC p": bootstrap_p(self.delta_p, self.resamples),
                "HR per SD of DPI [95% CI]": f"{self.hr_per_sd:.2f} [{self.hr_low:.2f}, {self.hr_high:.2f}]"}


def bootstrap_p(p: float, resamples: int) -> str:
    """A bootstrap p-value as text: 0 among B resamples is below 1/B, not 0."""
    if resamples and p < 1.0 / resamples:
        return f"< {1.0 / resamples:.2g}"
    return f"{p:.3g}"


def default_covariates(frame: pd.DataFrame, candidates=CLINICAL) -> list[str]:
    """Every candidate clinical column with at least one known value."""
    return [c for c in candidates if c in frame and frame[c].notna().any()]


def added_value(frame: pd.DataFrame, covariates: list[str] | None = None, n_resamples: int = 200, seed: int = 0,
                horizon: float = 365.0, configurations: int = 1) -> tuple[AddedValue, Design, Models]:
    """Compare clinical vs clinical + DPI on development patients (columns time, event, dpi, clinical);
    `configurations`: how many the DPI's configuration was chosen among (`selection_adjusted`)."""
    covariates = default_covariates(frame) if covariates is None else list(covariates)
    design = Design.learn(frame, covariates)
    data = design.apply(frame)
    columns = design.columns()
    models = Models.fit(data, columns)
    ll_clinical = (models.clinical.log_likelihood_ if models.clinical is not None
                   else CoxPHFitter().fit(data[["time", "event"]], "time", "event").log_likelihood_)
    chi2 = float(2 * (models.full.log_likelihood_ - ll_clinical))
    c_clinical, c_full = models.cindices(data)
    apparent = c_full - c_clinical
    rng = np.random.default_rng(seed)
    boot, optimism = [], []
    for _ in range(n_resamples):
        sample = data.iloc[rng.integers(0, len(data), len(data))].reset_index(drop=True)
        if sample["event"].sum() < 2:
            continue
        try:
            on_sample, on_original = _refit_gain(sample, data, columns)
        except SurvivalDataError:  # a singular model on an unlucky resample: skip it, as lifelines' errors were
            continue
        boot.append(on_sample)
        optimism.append(on_sample - on_original)
    if not boot:
        raise SurvivalDataError("no bootstrap resample could refit the Cox models")
    mean_optimism = float(np.mean(optimism))
    shifted = np.asarray(boot) - mean_optimism
    low, high = np.quantile(shifted, [0.025, 0.975])
    p = min(1.0, 2 * min(float(np.mean(shifted <= 0)), float(np.mean(shifted >= 0))))
    summary = models.full.summary.loc["dpi"]
    surv = models.full.predict_survival_function(data[[*columns, "dpi"]], times=[horizon]).to_numpy()[0]
    result = AddedValue(len(data), int(data["event"].sum()), design.covariates, design.filled(frame),
                        design.not_estimable, chi2, float(stats.chi2.sf(chi2, 1)), c_clinical, c_full,
                        apparent - mean_optimism, float(low), float(high), p, mean_optimism,
                        float(summary["exp(coef)"]), float(summary["exp(coef) lower 95%"]),
                        float(summary["exp(coef) upper 95%"]),
                        calibration(data["time"].to_numpy(float), data["event"].to_numpy(int), surv, horizon),
                        len(boot), configurations)
    return result, design, models


def external_added_value(frame: pd.DataFrame, design: Design, models: Models, n_resamples: int = 1000,
                         seed: int = 0) -> dict:
    """Development models applied unchanged to an external cohort: C-indices and the paired
    bootstrap CI of their difference."""
    data = design.apply(frame)
    time, event = data["time"].to_numpy(float), data["event"].to_numpy(int)
    clinical, full = models.linear_predictors(data)
    c_clinical, c_full = _cindices(time, event, clinical, full)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(data), len(data))
        try:
            clin, both = _cindices(time[rows], event[rows], None if clinical is None else clinical[rows], full[rows])
        except SurvivalDataError:
            continue
        diffs.append(both - clin)
    low, high = np.quantile(diffs, [0.025, 0.975]) if diffs else (np.nan, np.nan)
    slope, slope_low, slope_high = calibration_slope(data["time"], data["event"],
                                                     models.full.predict_log_partial_hazard(data[[*models.columns, "dpi"]]))
    try:  # refitted on this cohort, which no choice of the study saw: the primary test where there is one
        external_p = f"{lr_test(data['time'], data['event'], data[models.columns], data['dpi']):.3g}"
    except Exception as exc:  # lifelines on a small or separated cohort
        external_p = f"not estimable ({type(exc).__name__})"
    return {"patients": len(data), "events": int(data["event"].sum()),
            "LR p, refitted on this cohort (primary)": external_p,
            "clinical covariates": ", ".join(design.covariates),
            "values filled (missing indicator)": ", ".join(f"{k} {v}" for k, v in design.filled(frame).items())
                                                 or "none",
            "C clinical": round(c_clinical, 3), "C clinical + DPI": round(c_full, 3),
            "ΔC [95% CI] (development models)": f"{c_full - c_clinical:+.3f} [{low:+.3f}, {high:+.3f}]",
            CALIBRATION_SLOPE: f"{slope:.2f} [{slope_low:.2f}, {slope_high:.2f}]"}


CALIBRATION_SLOPE = "calibration slope of clinical + DPI [95% CI] (1 = calibrated)"


def calibration_slope(time, event, linear_predictor) -> tuple[float, float, float]:
    """The calibration slope of a development Cox model on another cohort (Cox 1958; van Houwelingen
    2000): the coefficient of its linear predictor in a Cox model refitted there. 1: the predictor's
    spread is right; > 1: too flat (the cohort's risks differ more than predicted); < 1: too steep."""
    data = pd.DataFrame({"time": np.asarray(time, float), "event": np.asarray(event, int),
                         "lp": np.asarray(linear_predictor, float)})
    try:
        fit = CoxPHFitter().fit(data, "time", "event")
    except Exception:  # lifelines on a tiny or separated cohort
        return float("nan"), float("nan"), float("nan")
    low, high = fit.confidence_intervals_.loc["lp"].to_numpy(float)
    return float(fit.params_["lp"]), float(low), float(high)


def lr_test(time, event, clinical: pd.DataFrame, dpi) -> float:
    """p-value of the likelihood-ratio test (1 df) of `dpi` added to a Cox model of the `clinical`
    columns (complete, numeric) on these patients."""
    data = clinical.assign(time=np.asarray(time, dtype=float), event=np.asarray(event, dtype=int),
                           dpi=np.asarray(dpi, dtype=float))
    columns = list(clinical.columns)
    base = CoxPHFitter().fit(data[["time", "event", *columns]], "time", "event").log_likelihood_
    full = CoxPHFitter().fit(data[["time", "event", *columns, "dpi"]], "time", "event").log_likelihood_
    return float(stats.chi2.sf(max(0.0, 2 * (full - base)), 1))


def selection_adjusted(p: float, configurations: int) -> float:
    """The LR p-value of a DPI chosen among `configurations` on the same patients, adjusted for that
    choice (Bonferroni): the test keeps its size under the null whatever the configurations'
    correlation, at the price of power (`python -m benchmarks.added_value_selection`)."""
    return float(min(1.0, p * max(1, int(configurations))))


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


def added_value_row(frame: pd.DataFrame, **kwargs) -> tuple[dict, tuple[AddedValue, Design, Models] | None]:
    """`added_value` as a table row; a cohort where the models cannot be fitted (too few patients
    or events, separation) gives a row saying why instead of stopping the report."""
    from lifelines.exceptions import ConvergenceError

    try:
        result = added_value(frame, **kwargs)
    except (ConvergenceError, ValueError, np.linalg.LinAlgError) as exc:
        return {"patients": int(len(frame)), "note": f"not estimable: {str(exc).splitlines()[0][:200]}"}, None
    return result[0].row(), result
