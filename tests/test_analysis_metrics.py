"""Survival metrics against scikit-survival on the real data sets it ships, with heavy ties and
heavy censoring; input errors; bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sksurv import metrics as sk
from sksurv.column import encode_categorical
from sksurv.datasets import load_gbsg2, load_veterans_lung_cancer, load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from evaluation.metrics import (
    SurvivalDataError,
    bootstrap_ci,
    brier_score,
    cumulative_dynamic_auc,
    harrell_c,
    integrated_brier_score,
    uno_c,
)

LOADERS = {"gbsg2": load_gbsg2, "whas500": load_whas500, "veterans": load_veterans_lung_cancer}


def _prepare(name: str, variant: str):
    X, y = LOADERS[name]()
    X = encode_categorical(X).astype(float)
    event_field, time_field = y.dtype.names
    event, time = y[event_field].astype(bool), y[time_field].astype(float)
    if variant == "ties":  # heavy ties: times rounded to 90-day bins
        time = np.ceil(time / 90.0) * 90.0
    elif variant == "censored":  # heavy censoring: follow-up stops at the 35th percentile
        cut = np.quantile(time, 0.35)
        event = event & (time < cut)
        time = np.minimum(time, cut)
    y = Surv.from_arrays(event, time)
    model = CoxPHSurvivalAnalysis(alpha=1e-3).fit(X, y)
    risk = model.predict(X)
    return X, y, event, time, risk, model


CASES = [(name, variant) for name in LOADERS for variant in ("plain", "ties", "censored")]


@pytest.fixture(params=CASES, ids=[f"{n}-{v}" for n, v in CASES], scope="module")
def data(request):
    return _prepare(*request.param)


def test_harrell_c(data):
    _, y, event, time, risk, _ = data
    assert harrell_c(time, event, risk) == pytest.approx(sk.concordance_index_censored(event, time, risk)[0], abs=1e-6)
    rounded = np.round(risk, 1)  # many tied risks
    assert harrell_c(time, event, rounded) == pytest.approx(sk.concordance_index_censored(event, time, rounded)[0], abs=1e-6)


def test_uno_c_with_training_censoring_and_truncation(data):
    _, y, event, time, risk, _ = data
    half = len(time) // 2
    tau = float(np.quantile(time[event], 0.6))
    ours = uno_c(time[half:], event[half:], risk[half:], time[:half], event[:half], tau=tau)
    theirs = sk.concordance_index_ipcw(y[:half], y[half:], risk[half:], tau=tau)[0]
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert uno_c(time, event, risk, tau=tau) == pytest.approx(sk.concordance_index_ipcw(y, y, risk, tau=tau)[0], abs=1e-6)


def _times(time, event):
    return np.unique(np.quantile(time[event], [0.2, 0.4, 0.6]).round())


def test_brier_and_integrated_brier(data):
    X, y, event, time, risk, model = data
    times = _times(time, event)
    surv = np.stack([fn(times) for fn in model.predict_survival_function(X)])
    np.testing.assert_allclose(brier_score(time, event, surv, times), sk.brier_score(y, y, surv, times)[1], atol=1e-6)
    assert integrated_brier_score(time, event, surv, times) == pytest.approx(
        sk.integrated_brier_score(y, y, surv, times), abs=1e-6)


def test_time_dependent_auc(data):
    _, y, event, time, risk, _ = data
    times = _times(time, event)
    np.testing.assert_allclose(cumulative_dynamic_auc(time, event, risk, times), sk.cumulative_dynamic_auc(y, y, risk, times)[0],
                               atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (([1.0, 2.0], [0, 0], [0.1, 0.2]), "All samples are censored"),
    (([1.0], [1], [0.1]), "At least 2 samples are needed"),
    (([1.0, 2.0, 3.0], [1, 0, 1], [0.1, 0.2]), "Input 'risk' has 2 values but 'time' has 3"),
    (([1.0, 2.0], [1, 0, 1], [0.1, 0.2]), "Input 'event' has 3 values but 'time' has 2"),
    (([1.0, 2.0], [1, 0], [np.nan, 0.2]), "Input 'risk' contains NaN"),
    (([-1.0, 2.0], [1, 0], [0.1, 0.2]), "Input 'time' must be non-negative"),
    (([1.0, 2.0], [1, 2], [0.1, 0.2]), "Input 'event' must be 0/1"),
    (([2.0, 2.0], [1, 1], [0.1, 0.2]), "no comparable pairs"),
])
def test_input_errors(args, message):
    with pytest.raises(SurvivalDataError, match=message):
        harrell_c(*args)


def test_bootstrap_ci_is_seeded_and_sensible():
    rng = np.random.default_rng(0)
    n = 400
    risk = rng.normal(size=n)
    time = rng.exponential(np.exp(-risk))
    event = rng.random(n) < 0.7
    first = bootstrap_ci(harrell_c, time, event, risk, n_resamples=300, seed=5)
    again = bootstrap_ci(harrell_c, time, event, risk, n_resamples=300, seed=5)
    assert first == again
    assert first.low < first.value < first.high
    assert 0.02 < first.high - first.low < 0.12
    wider = bootstrap_ci(harrell_c, time[:100], event[:100], risk[:100], n_resamples=300, seed=5)
    assert wider.high - wider.low > first.high - first.low
    assert str(first).count("[") == 1


def test_fast_bootstrap_of_harrell_c_equals_resampling():
    rng = np.random.default_rng(1)
    n = 300
    risk = np.round(rng.normal(size=n), 1)  # tied risks
    time = np.ceil(rng.exponential(np.exp(-risk)) * 10)  # tied times
    event = rng.random(n) < 0.6
    fast = bootstrap_ci(harrell_c, time, event, risk, n_resamples=200, seed=3)
    slow = bootstrap_ci(lambda t, e, r: harrell_c(t, e, r), time, event, risk, n_resamples=200, seed=3)
    assert fast.value == slow.value
    assert fast.low == pytest.approx(slow.low, abs=1e-12) and fast.high == pytest.approx(slow.high, abs=1e-12)


@pytest.mark.parametrize("n, ties", [(30, False), (150, True), (400, False)])
def test_the_bootstrap_cox_fit_reaches_lifelines_maximum(n, ties):
    """`efron_coefficients` (the added value's bootstrap refits) against lifelines' CoxPHFitter run to
    a tight tolerance, with Efron's tied deaths and a binary covariate."""
    from lifelines import CoxPHFitter

    from analysis.added_value import efron_coefficients

    rng = np.random.default_rng(n)
    frame = pd.DataFrame(rng.normal(size=(n, 4)), columns=list("abcd"))
    frame["flag"] = rng.integers(0, 2, n).astype(float)
    frame["dpi"] = rng.normal(size=n)
    death = rng.exponential(np.exp(-0.7 * frame["dpi"] - 0.3 * frame["a"])) * 500
    censor = rng.exponential(700, size=n)
    frame["time"] = np.minimum(death, censor)
    if ties:
        frame["time"] = np.round(frame["time"] / 60) * 60 + 1
    frame["event"] = (death <= censor).astype(int)
    expected = CoxPHFitter().fit(frame, "time", "event", fit_options={"precision": 1e-12}).params_.to_numpy()
    found = efron_coefficients(frame.drop(columns=["time", "event"]).to_numpy(), frame["time"].to_numpy(),
                               frame["event"].to_numpy())
    assert found == pytest.approx(expected, abs=1e-8)


def test_the_bootstrap_cox_fit_refuses_a_singular_model():
    from analysis.added_value import efron_coefficients

    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    with pytest.raises(SurvivalDataError, match="singular"):
        efron_coefficients(np.c_[x, x], rng.exponential(size=50) * 100, np.ones(50))  # one column twice


def test_the_bootstrap_cox_fit_ranks_as_lifelines_where_a_rare_indicator_separates_the_deaths():
    """A missing-value indicator on 4 patients, one of whom died: many resamples hold none of its deaths,
    the coefficient has no finite maximum, and lifelines stops where the likelihood levels off, with a
    large coefficient. The bootstrap refit must do the same, not skip the resample (the skip would
    depend on the data and bias the optimism); the C-indices it feeds are lifelines' own."""
    import warnings

    from lifelines import CoxPHFitter

    from analysis.added_value import efron_coefficients

    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(size=(150, 3)), columns=list("abc"))
    frame["indicator"] = 0.0
    frame.loc[:3, "indicator"] = 1.0
    frame["dpi"] = rng.normal(size=150)
    death = rng.exponential(np.exp(-0.7 * frame["dpi"])) * 500
    censor = rng.exponential(700, size=150)
    frame["time"], frame["event"] = np.minimum(death, censor), (death <= censor).astype(int)
    frame.loc[:3, "event"] = [1, 0, 0, 0]
    columns = ["a", "b", "c", "indicator", "dpi"]
    separated = compared = 0
    for _ in range(25):
        sample = frame.iloc[rng.integers(0, 150, 150)].reset_index(drop=True)
        if sample["indicator"].nunique() < 2:
            continue
        separated += int(sample.loc[sample["indicator"] == 1, "event"].sum() == 0)
        found = efron_coefficients(sample[columns].to_numpy(), sample["time"].to_numpy(), sample["event"].to_numpy())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = CoxPHFitter().fit(sample[[*columns, "time", "event"]], "time", "event").params_.to_numpy()
        except Exception:  # lifelines' own failures on some of these resamples
            continue
        for data in (sample, frame):
            assert harrell_c(data["time"], data["event"], data[columns].to_numpy() @ found) == \
                harrell_c(data["time"], data["event"], data[columns].to_numpy() @ expected)
        compared += 1
    assert separated >= 5 and compared >= 15
