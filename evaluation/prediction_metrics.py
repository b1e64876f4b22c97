"""The metrics of a set of survival predictions, one registry for every place that scores them.

A trial's pooled out-of-fold table (`trainables.cross_validation.cv_metrics`) and a cell's fold
ensemble on an external cohort (the report's external validation) are scored by the same entries
of `PREDICTION_METRICS`, and the report's leaderboard lists them by the same labels; a metric
registered here (its names in `evaluation.metric_names.FINAL_METRICS`) reaches MLflow,
``results.md``, the leaderboard and external validation with nothing else changed
(CONTRIBUTING.md, "A new metric").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation import metric_names as names
from evaluation.metrics import (
    SurvivalDataError,
    bootstrap_ci,
    brier_score,
    cumulative_dynamic_auc,
    harrell_c,
    integrated_brier_score,
    uno_c,
)


def alive_past_horizon(time: np.ndarray, event: np.ndarray, horizon: float | None) -> np.ndarray:
    """Times for metrics at the horizon of an administratively censored endpoint.

    Survivors of a 1-year endpoint are censored *at* day 365, which means alive after it; IPCW
    metrics at t count a control only when its time exceeds t, so they are moved just past the
    horizon (the censoring distribution below the horizon is unchanged)."""
    if horizon is None:
        return time
    return np.where((event == 0) & (time >= horizon), np.nextafter(horizon, np.inf), time)


@dataclass(frozen=True)
class Predictions:
    """One row per patient: outcome, deep prognostic index (`risk`, higher = worse), survival at day
    365 and survival curves at `times` (columns of `curves`). `horizon`: the endpoint's
    administrative censoring [days] (365 for 1-year tasks, None for OS)."""

    time: np.ndarray
    event: np.ndarray
    risk: np.ndarray
    surv_365: np.ndarray
    curves: np.ndarray
    times: tuple[float, ...]
    horizon: float | None = None
    seed: int = 0
    n_resamples: int = 1000
    at: np.ndarray = field(init=False, repr=False)  # `time` with the endpoint's censoring applied

    def __post_init__(self):
        for name in ("time", "risk", "surv_365", "curves"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float))
        object.__setattr__(self, "event", np.asarray(self.event, dtype=int))
        object.__setattr__(self, "at", alive_past_horizon(self.time, self.event, self.horizon))

    @classmethod
    def from_table(cls, table, times: Sequence[float], horizon: float | None = None, seed: int = 0,
                   n_resamples: int = 1000) -> Predictions:
        """From a table with ``time``, ``event``, ``risk``, ``surv_365`` and ``surv_t<t>`` for each of
        `times` (a trial's ``oof_predictions.csv``); a missing curve column is NaN."""
        curves = np.column_stack([table[f"surv_t{int(t)}"].to_numpy(float) if f"surv_t{int(t)}" in table
                                  else np.full(len(table), np.nan) for t in times]) if len(times) else \
            np.empty((len(table), 0))
        return cls(table["time"].to_numpy(float), table["event"].to_numpy(int), table["risk"].to_numpy(float),
                   table["surv_365"].to_numpy(float), curves, tuple(float(t) for t in times), horizon, seed,
                   n_resamples)


@dataclass(frozen=True)
class PredictionMetric:
    """A metric of `Predictions`: the names it is logged under (its value, then the bounds of its 95%
    interval if it has one), how it is computed (NaN where it is not estimable) and its column in
    the report's tables."""

    metric: names.MetricName
    compute: Callable[[Predictions], float | tuple[float, float, float]]
    label: str
    digits: int = 3
    interval: tuple[names.MetricName, names.MetricName] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.metric.name, *(m.name for m in self.interval or ()))

    def scores(self, predictions: Predictions, strict: bool = False) -> dict[str, float]:
        """{name: value} for this metric's names; NaN where the predictions do not allow it (`strict`:
        the `SurvivalDataError` that says why is raised instead)."""
        try:
            value = self.compute(predictions)
        except SurvivalDataError:
            if strict:
                raise
            value = (math.nan,) * len(self.names)
        values = value if isinstance(value, tuple) else (value,)
        return {name: float(v) for name, v in zip(self.names, values)}

    def text(self, values: dict) -> str | float:
        """The table cell: the value rounded, with its interval if it has one (absent or not a number:
        "n/a" for a metric with an interval, NaN for one without)."""
        value = values.get(self.metric.name)
        if value is None or not math.isfinite(value):
            return "n/a" if self.interval else float("nan")
        if self.interval is None:
            return round(float(value), self.digits)
        low, high = (values.get(m.name, math.nan) for m in self.interval)
        return f"{value:.{self.digits}f} [{low:.{self.digits}f}, {high:.{self.digits}f}]"


def _harrell(p: Predictions) -> tuple[float, float, float]:
    estimate = bootstrap_ci(harrell_c, p.time, p.event, p.risk, n_resamples=p.n_resamples, seed=p.seed)
    return estimate.value, estimate.low, estimate.high


def _brier_365(p: Predictions) -> float:
    return float(brier_score(p.at, p.event, p.surv_365, 365.0)[0])


def _ibs(p: Predictions) -> float:
    usable = [k for k, t in enumerate(p.times) if t < p.at.max() and np.isfinite(p.curves[:, k]).all()]
    if len(usable) < 2:
        return math.nan
    return integrated_brier_score(p.at, p.event, p.curves[:, usable], np.asarray(p.times)[usable])


def _uno(p: Predictions) -> float:
    return uno_c(p.time, p.event, p.risk, tau=float(np.quantile(p.time, 0.9)))


def _auc_365(p: Predictions) -> float:
    return float(cumulative_dynamic_auc(p.at, p.event, p.risk, [365.0])[0])


PREDICTION_METRICS: list[PredictionMetric] = [
    PredictionMetric(names.OOF_CINDEX, _harrell, "C-index",
                     interval=(names.OOF_CINDEX_LOW, names.OOF_CINDEX_HIGH)),
    PredictionMetric(names.BRIER_365, _brier_365, "Brier (365 d)", 4),
    PredictionMetric(names.IBS, _ibs, "IBS", 4),
    PredictionMetric(names.UNO_C, _uno, "Uno's C"),
    PredictionMetric(names.AUC_365, _auc_365, "AUC (365 d)"),
]


def score_predictions(predictions: Predictions, required: Sequence[names.MetricName] = (),
                      metrics: Sequence[PredictionMetric] | None = None) -> dict[str, float]:
    """The registered metrics (all, or `metrics`) of `predictions`: {logged name: value}; NaN where one
    is not estimable, except those `required` (raised: a trial whose selection criterion cannot be
    computed fails)."""
    out: dict[str, float] = {}
    for entry in PREDICTION_METRICS if metrics is None else metrics:
        out.update(entry.scores(predictions, strict=entry.metric in required))
    return out


def registered(metric: names.MetricName) -> PredictionMetric:
    """The registry's entry of `metric`."""
    return next(entry for entry in PREDICTION_METRICS if entry.metric == metric)


def metric_columns(values: dict, interval_suffix: str = " [95% CI]",
                   metrics: Sequence[PredictionMetric] | None = None) -> dict[str, str | float]:
    """{column: table cell} of the registered metrics (all, or `metrics`) for the report's tables: a
    metric with an interval is named by its label and `interval_suffix` (the leaderboard's
    ", selected [95% CI]")."""
    return {entry.label + (interval_suffix if entry.interval else ""): entry.text(values)
            for entry in (PREDICTION_METRICS if metrics is None else metrics)}
