"""Survival heads: the out-of-fold DPI is comparable across folds, the 1-year endpoint and its
IPCW weights mean what they say, and the reference study's discretisation is available."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation import metric_names as names
from evaluation.metrics import harrell_c
from datasets.cohort import truncate
from trainables.config import TrainConfig
from trainables.cross_validation import cv_metrics
from trainables.heads import BinaryHead, BreslowBaseline, CoxHead, LogisticHazardHead, logistic_hazard_cuts

EVAL_TIMES = TrainConfig().eval_times  # the study's default evaluation times, defined once


def _cohort(n: int = 600, seed: int = 0):
    """A whas500-sized Cox cohort: log hazard x, exponential times, uniform censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    event_time = rng.exponential(500 * np.exp(-x))
    censor = rng.uniform(100, 2000, size=n)
    return x, np.maximum(1.0, np.minimum(event_time, censor)).round(), (event_time <= censor).astype(int), rng


def _pooled(head_factory, x, time, event, folds, offsets, rng, horizon=None):
    """Out-of-fold table of K fold 'models' whose raw outputs are x + noise + a per-fold offset."""
    noise = rng.normal(0, 0.5, size=len(x))
    frames = []
    for k in range(folds.max() + 1):
        train, val = folds != k, folds == k
        head = head_factory()
        head.prepare(time[train], event[train])
        raw = (x + noise + offsets[k])[:, None]
        head.fit(raw[train], time[train], event[train])
        frame = pd.DataFrame({"patient_id": np.flatnonzero(val), "fold": k, "time": time[val], "event": event[val],
                              "risk": head.risk(raw[val]), "surv_365": head.surv_365(raw[val])})
        curves = head.survival(raw[val], np.asarray(EVAL_TIMES))
        for j, t in enumerate(EVAL_TIMES):
            frame[f"surv_t{int(t)}"] = curves[:, j]
        frame["raw"] = raw[val, 0]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_pooled_cindex_and_brier_ignore_per_fold_offsets_of_the_cox_output():
    """The Cox likelihood ignores a constant shift of the log hazard, so each fold model has its own
    offset; the DPI written out (log cumulative hazard at one year from the fold's own Breslow
    baseline) must not carry it into the pooled metrics."""
    x, time, event, rng = _cohort()
    folds = np.arange(len(x)) % 10
    plain = _pooled(CoxHead, x, time, event, folds, np.zeros(10), np.random.default_rng(1))
    shifted = _pooled(CoxHead, x, time, event, folds, rng.normal(0, 1.0, 10), np.random.default_rng(1))
    np.testing.assert_allclose(shifted["risk"], plain["risk"], atol=1e-9)
    a, b = (cv_metrics(f, EVAL_TIMES, n_resamples=50) for f in (plain, shifted))
    for metric in (names.OOF_CINDEX, names.BRIER_365, names.IBS, names.AUC_365):
        assert b[metric.name] == pytest.approx(a[metric.name], abs=1e-9), metric.name
    # The old pooling of the raw log hazards would have mixed the offsets (whas500: 0.767 -> 0.712).
    raw_plain = harrell_c(plain["time"], plain["event"], plain["raw"])
    raw_shifted = harrell_c(shifted["time"], shifted["event"], shifted["raw"])
    assert raw_plain - raw_shifted > 0.02, (raw_plain, raw_shifted)
    assert abs(a[names.OOF_CINDEX.name] - raw_plain) < 0.005  # without offsets both agree


def test_breslow_baseline_equals_the_textbook_sums():
    x, time, event, _ = _cohort(200, seed=3)
    baseline = BreslowBaseline(x, time, event)
    hz = np.exp(x - x.mean())
    times = np.unique(time[event == 1])
    expected = np.cumsum([((time == t) & (event == 1)).sum() / hz[time >= t].sum() for t in times])
    np.testing.assert_allclose(baseline.cumhaz, expected, rtol=1e-12)
    again = BreslowBaseline.from_state(baseline.state())
    np.testing.assert_allclose(again.survival(x[:5], [365.0]), baseline.survival(x[:5], [365.0]))


def test_one_year_known_answer_is_scored_on_the_one_year_endpoint():
    """Deaths within a year follow the score; deaths after a year are random. The 1-year task's
    C-index must be that of the truncated endpoint (high), not that of overall survival."""
    rng = np.random.default_rng(7)
    n = 800
    score = rng.normal(size=n)
    early = rng.random(n) < 1 / (1 + np.exp(2 - 2.5 * score))  # death within a year (about 23 %), driven by the score
    event_time = np.where(early, rng.uniform(20, 365, n), rng.uniform(366, 3000, n))
    censor = rng.uniform(100, 4000, n)
    os_time, os_event = np.minimum(event_time, censor), (event_time <= censor).astype(int)
    time, event = truncate(os_time, os_event, 365.0)
    assert len(time) == n and (time <= 365).all()
    assert event.sum() == ((os_event == 1) & (os_time <= 365)).sum()
    oof = pd.DataFrame({"patient_id": np.arange(n), "fold": np.arange(n) % 5, "time": time, "event": event,
                        "risk": score, "surv_365": 1 / (1 + np.exp(2.5 * score))})
    for t in EVAL_TIMES:
        oof[f"surv_t{int(t)}"] = np.exp(-t / 365 * np.log(1 + np.exp(2.5 * score)))
    metrics = cv_metrics(oof, EVAL_TIMES, horizon=365.0, n_resamples=20)
    one_year_c, os_c = harrell_c(time, event, score), harrell_c(os_time, os_event, score)
    assert metrics[names.OOF_CINDEX.name] == pytest.approx(one_year_c)
    assert one_year_c > 0.8 and one_year_c - os_c > 0.1, (one_year_c, os_c)
    # Brier at day 365 counts the survivors (censored *at* 365 by the truncation) as survivors.
    assert metrics[names.BRIER_365.name] < 0.2 and np.isfinite(metrics[names.AUC_365.name])


def test_binary_head_weights_patients_censored_before_a_year_out_and_the_others_by_ipcw():
    time = np.array([100.0, 200.0, 300.0, 365.0, 365.0, 150.0, 365.0])  # truncated endpoint
    event = np.array([1, 0, 1, 0, 0, 0, 1])
    head = BinaryHead()
    head.prepare(time, event)
    # Reverse Kaplan-Meier by hand: censorings at 150 (6 at risk) and 200 (5 at risk) give
    # G = 5/6 then 2/3 before day 365; a death at T weighs 1 / G(T-), a survivor 1 / G(365-).
    expected = [1.0, 0.0, 1.5, 1.5, 1.5, 0.0, 1.5]  # censored before day 365 (200, 150): status unknown
    np.testing.assert_allclose(head.weights(time, event), expected)
    outputs = torch.zeros(7, 1, requires_grad=True)
    loss = head.loss(outputs, torch.as_tensor(time), torch.as_tensor(event))
    assert loss.item() == pytest.approx(np.log(2))  # weighted mean of BCE at logit 0
    loss.backward()
    assert outputs.grad[1, 0] == 0 and outputs.grad[5, 0] == 0
    no_censoring = BinaryHead()
    no_censoring.prepare(np.array([100.0, 365.0]), np.array([1, 0]))
    np.testing.assert_allclose(no_censoring.weights(np.array([100.0, 365.0]), np.array([1, 0])), 1.0)


def test_reference_discretisation_of_the_logistic_hazard_head():
    cuts = logistic_hazard_cuts(19, spacing="exponential", half_life_days=730.0)
    assert len(cuts) == 20 and cuts[0] == 0 and cuts[-1] == pytest.approx(3155, abs=1)
    assert (np.diff(cuts) > 0).all() and (np.diff(np.diff(cuts)) > 0).all()  # denser early
    np.testing.assert_allclose(logistic_hazard_cuts(19, 1825.0), np.linspace(0, 1825, 20))
    head = LogisticHazardHead(cuts)
    assert head.out_features == 20
    curve = head.survival(np.zeros((2, 20)), np.array([0.0, 365.0, 3155.0]))
    assert (np.diff(curve, axis=1) <= 0).all()


def test_the_binary_heads_brier_and_ibs_judge_one_survival_prediction():
    """The 1-year head's surv_365 (its logistic probability) is its survival curve at day 365, which
    the IBS integrates; before, the curve came from a Breslow baseline of the logit and disagreed."""
    import numpy as np

    from trainables.heads import BinaryHead

    rng = np.random.default_rng(0)
    head = BinaryHead()
    time, event = rng.exponential(400, 80).round() + 1, rng.integers(0, 2, 80)
    outputs = rng.normal(size=(80, 1))
    head.prepare(time, event)
    head.fit(outputs, time, event)
    new = rng.normal(size=(10, 1))
    curves = head.survival(new, np.array([90.0, 180.0, 365.0]))
    assert np.allclose(curves[:, 2], head.surv_365(new))
    assert (np.diff(curves, axis=1) <= 1e-12).all() and (curves > 0).all() and (curves <= 1).all()
