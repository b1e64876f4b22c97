"""Cross-validation of one configuration: the horizon adjustment, collapsed folds, pooled
out-of-fold metrics on tables with known answers, and folds stepped in lock-step."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from evaluation import metric_names as names
from evaluation.metrics import brier_score
from datasets import Cohort, CohortSpec
from trainables.config import TrainConfig
from evaluation.prediction_metrics import alive_past_horizon
from trainables.cross_validation import CohortArrays, CrossValidation, collapsed_folds, cv_metrics

EVAL_TIMES = TrainConfig().eval_times
# The tiny network of tests/test_trainables_fold.py: a CPU epoch on the 12-patient store in well under a second.
TINY = {"backbone": "seresnext50", "width": 0.25, "depth": 0.34, "batch_size": 8, "warmup_epochs": 1, "lr": 1e-3,
        "weight_decay": 1e-4, "augmentation": 0.5, "cox_memory": 0}
FINAL_NAMES = {m.name for m in names.FINAL_METRICS}


# -- alive_past_horizon -----------------------------------------------------------------------

def test_survivors_censored_at_or_after_the_horizon_move_just_past_it_and_nobody_else_moves():
    time = np.array([100.0, 365.0, 400.0, 365.0, 200.0, 364.0])
    event = np.array([0, 0, 0, 1, 1, 0])
    at = alive_past_horizon(time, event, 365.0)
    just_past = np.nextafter(365.0, np.inf)
    # censored before the horizon: status at the horizon unknown, left alone; censored at or after
    # it: alive after it; deaths keep their time, also a death exactly at the horizon.
    np.testing.assert_array_equal(at, [100.0, just_past, just_past, 365.0, 200.0, 364.0])
    assert at[1] > 365.0 and at[1] - 365.0 < 1e-9  # the smallest step: no censoring time below it changes
    np.testing.assert_array_equal(time, [100.0, 365.0, 400.0, 365.0, 200.0, 364.0])  # input untouched


def test_no_horizon_leaves_the_times_as_they_are():
    time, event = np.array([10.0, 365.0, 900.0]), np.array([0, 0, 1])
    assert alive_past_horizon(time, event, None) is time


def test_alive_past_horizon_makes_ipcw_brier_count_the_one_year_survivors():
    """Why it exists: IPCW metrics at t take a control only when its time exceeds t, so survivors
    censored at exactly day 365 would drop out of the 1-year Brier score. Six deaths, four
    survivors, every prediction 0.5: each patient adds 0.25 once the survivors count (no
    censoring before day 365, so every weight is 1); without the adjustment only the deaths do."""
    time = np.array([30.0, 80.0, 120.0, 200.0, 250.0, 300.0, 365.0, 365.0, 365.0, 365.0])
    event = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    surv = np.full(10, 0.5)
    assert brier_score(alive_past_horizon(time, event, 365.0), event, surv, 365.0)[0] == pytest.approx(0.25)
    assert brier_score(time, event, surv, 365.0)[0] == pytest.approx(0.25 * 6 / 10)


# -- collapsed_folds --------------------------------------------------------------------------

def test_a_fold_at_chance_is_collapsed_only_while_the_others_learned():
    assert collapsed_folds({0: 0.70, 1: 0.505, 2: 0.68}, {}) == [1]
    assert collapsed_folds({0: 0.70, 1: 0.485, 2: 0.68}, {}) == [1]  # within 0.02 below 0.5 too
    assert collapsed_folds({0: 0.70, 1: 0.525, 2: 0.68}, {}) == []  # 0.025 from 0.5: it learned a little
    assert collapsed_folds({0: 0.54, 1: 0.50, 2: 0.53}, {}) == []  # nobody learned: nothing stands out
    # The others' median decides, and 0.55 itself counts as learned.
    assert collapsed_folds({0: 0.55, 1: 0.50, 2: 0.55}, {}) == [1]
    assert collapsed_folds({0: 0.80, 1: 0.50, 2: 0.52, 3: 0.51}, {}) == []  # median of the others of 1: 0.52


def test_a_fold_with_a_constant_dpi_is_collapsed_whatever_its_cindex():
    cindex = {0: 0.70, 1: 0.66, 2: 0.68}
    assert collapsed_folds(cindex, {0: 0.3, 1: 0.0, 2: 0.2}) == [1]
    assert collapsed_folds(cindex, {1: 1e-7}) == [1]  # a missing SD counts as a varying DPI
    assert collapsed_folds(cindex, {1: 1e-5}) == []


def test_collapsed_folds_ignores_folds_without_a_cindex_and_needs_another_fold():
    # fold 0 could not be scored (nan): not collapsed itself and not part of the others' median.
    assert collapsed_folds({0: math.nan, 1: 0.50, 2: 0.70}, {}) == [1]
    assert collapsed_folds({0: math.nan, 1: 0.50}, {}) == []  # no other finite fold to compare with
    assert collapsed_folds({0: 0.50}, {0: 0.0}) == []
    assert collapsed_folds({}, {}) == []
    assert collapsed_folds({3: 0.50, 0: 0.70, 2: 0.69, 1: 0.49}, {}) == [3, 1]  # in the dict's order


# -- cv_metrics -------------------------------------------------------------------------------

def _oof(risk_sign: float = -1.0, folds: int = 3) -> pd.DataFrame:
    """30 patients dying or censored at days 20, 40, ..., 600 (every fourth censored; with 3 folds
    each fold has deaths), patient i in fold i mod `folds`; risk = sign x time (-1: the shorter the
    survival, the higher the risk, a perfect order) and oracle survival curves 1{time > t}."""
    time = np.arange(1, 31) * 20.0
    event = (np.arange(30) % 4 != 3).astype(int)
    oof = pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(30)], "fold": np.arange(30) % folds,
                        "time": time, "event": event, "risk": risk_sign * time,
                        "surv_365": (time > 365).astype(float)})
    for t in EVAL_TIMES:
        oof[f"surv_t{int(t)}"] = (time > t).astype(float)
    return oof


def test_cv_metrics_returns_exactly_the_final_metric_names():
    assert set(cv_metrics(_oof(), EVAL_TIMES, n_resamples=20)) == FINAL_NAMES


def test_a_risk_ordering_survival_perfectly_scores_one_and_its_negative_zero():
    best = cv_metrics(_oof(-1.0), EVAL_TIMES, n_resamples=50)
    worst = cv_metrics(_oof(+1.0), EVAL_TIMES, n_resamples=50)
    for metric in (names.OOF_CINDEX, names.OOF_CINDEX_LOW, names.OOF_CINDEX_HIGH, names.FOLD_CINDEX_MEAN,
                   names.UNO_C, names.AUC_365):
        assert best[metric.name] == pytest.approx(1.0), metric.name
        assert worst[metric.name] == pytest.approx(0.0), metric.name
    assert best[names.FOLD_CINDEX_SD.name] == 0.0
    # Every fold is perfect (or perfectly wrong): nobody stands out as collapsed.
    assert best[names.FOLDS_COLLAPSED.name] == 0 and worst[names.FOLDS_COLLAPSED.name] == 0
    # Oracle curves 1{time > t}: a death by t predicted 0, a survivor past t predicted 1 -> Brier 0.
    assert best[names.BRIER_365.name] == pytest.approx(0.0) and best[names.IBS.name] == pytest.approx(0.0)


def test_cv_metrics_counts_a_fold_with_a_constant_dpi_as_collapsed_and_averages_the_fold_cindices():
    oof = _oof()
    fold2 = oof["fold"] == 2
    oof.loc[fold2, "risk"] = 1.0  # fold 2's model outputs one value: C-index 0.5 on its fold
    metrics = cv_metrics(oof, EVAL_TIMES, n_resamples=20)
    assert metrics[names.FOLDS_COLLAPSED.name] == 1
    assert metrics[names.FOLD_CINDEX_MEAN.name] == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    assert metrics[names.FOLD_CINDEX_SD.name] == pytest.approx(np.std([1.0, 1.0, 0.5], ddof=1))
    # A DPI that varies by rounding noise only (SD < 1e-6) is collapsed too, although it happens
    # to order fold 2 perfectly (C-index 1.0): caught by its SD, not by its C-index.
    oof.loc[fold2, "risk"] = 1.0 - 1e-9 * oof.loc[fold2, "time"]
    metrics = cv_metrics(oof, EVAL_TIMES, n_resamples=20)
    assert metrics[names.FOLD_CINDEX_MEAN.name] == pytest.approx(1.0)
    assert metrics[names.FOLDS_COLLAPSED.name] == 1


def test_a_fold_without_events_is_left_out_of_the_fold_mean_and_one_fold_has_no_sd():
    oof = _oof(folds=2)
    oof.loc[oof["fold"] == 1, "event"] = 0  # fold 1 all censored: no C-index on it
    oof.loc[oof["fold"] == 0, "risk"] *= -1  # fold 0 perfectly wrong: the mean is its 0.0, not 0.5
    metrics = cv_metrics(oof, EVAL_TIMES, n_resamples=20)
    assert metrics[names.FOLD_CINDEX_MEAN.name] == pytest.approx(0.0)
    assert math.isnan(metrics[names.FOLD_CINDEX_SD.name])
    assert math.isfinite(metrics[names.OOF_CINDEX.name])


def test_metrics_without_the_follow_up_to_compute_them_are_nan_not_errors():
    oof = _oof()
    oof["time"] = oof["time"] * 0.3  # everyone dies or is censored by day 180 (the last time)
    metrics = cv_metrics(oof, EVAL_TIMES, n_resamples=20)
    assert set(metrics) == FINAL_NAMES
    assert math.isnan(metrics[names.AUC_365.name])  # nobody is a control past day 365
    # Only day 90 lies inside the follow-up (day 180, the last time itself, does not): no integral.
    assert math.isnan(metrics[names.IBS.name])
    assert metrics[names.OOF_CINDEX.name] == pytest.approx(1.0)


def test_the_one_year_horizon_counts_survivors_censored_at_day_365():
    """The Brier score of the 1-year endpoint is the one of `alive_past_horizon` times: with every
    prediction 0.5 and no censoring before day 365 it is 0.25 with the horizon and lower without."""
    oof = _oof()
    oof["event"] = (oof["time"] <= 360).astype(int)  # 18 deaths by day 360 ...
    oof["time"] = oof["time"].clip(upper=365.0)  # ... the other 12 censored at day 365 (a truncated endpoint)
    oof["surv_365"] = 0.5
    with_horizon = cv_metrics(oof, EVAL_TIMES, horizon=365.0, n_resamples=20)
    without = cv_metrics(oof, EVAL_TIMES, horizon=None, n_resamples=20)
    assert with_horizon[names.BRIER_365.name] == pytest.approx(0.25)
    assert without[names.BRIER_365.name] == pytest.approx(0.25 * 18 / 30)
    assert with_horizon[names.OOF_CINDEX.name] == without[names.OOF_CINDEX.name]  # C-index: raw times


def test_the_bootstrap_interval_is_reproducible_for_a_seed():
    oof = _oof()
    oof["risk"] = oof["risk"] + np.random.default_rng(0).normal(0, 150, len(oof))  # an imperfect order
    a, b, c = (cv_metrics(oof, EVAL_TIMES, seed=s, n_resamples=200) for s in (1, 1, 2))
    interval = (names.OOF_CINDEX_LOW.name, names.OOF_CINDEX_HIGH.name)
    assert [a[k] for k in interval] == [b[k] for k in interval]
    assert [a[k] for k in interval] != [c[k] for k in interval]
    assert a[names.OOF_CINDEX_LOW.name] < a[names.OOF_CINDEX.name] < a[names.OOF_CINDEX_HIGH.name]
    assert a[names.OOF_CINDEX.name] == c[names.OOF_CINDEX.name]  # the point estimate does not resample


# -- CrossValidation --------------------------------------------------------------------------

def test_cross_validation_steps_every_fold_and_reports_the_metric_names(small_store, tmp_path):
    """Three folds on two (CPU) lanes: lane 0 steps folds 0 and 2, lane 1 fold 1; one step of a
    one-epoch configuration finishes all three."""
    cohort = Cohort(small_store, CohortSpec())
    folds = cohort.folds(3, seed=0)
    cv = CrossValidation(CohortArrays(cohort), folds, TrainConfig(epochs=1, **{**TINY, "augmentation": 0.0}),
                         tmp_path, devices=["cpu", "cpu"])
    assert len(cv.trainers) == 3 and [t.data.fold for t in cv.trainers] == [0, 1, 2]
    assert all(t.memory is None for t in cv.trainers)  # no volumes in memory: read from the store
    assert (cv.epoch, cv.fold_epochs, cv.finished) == (0, 0, False)
    metrics = cv.step()
    assert cv.finished and cv.epoch == 1
    assert set(metrics) == {"epoch", names.FOLD_EPOCHS.name, names.EPOCH_CINDEX.name, names.FOLDS_STOPPED.name,
                            names.TRAIN_LOSS.name, *(names.fold_cindex(k) for k in range(3))}
    assert metrics["epoch"] == 1 and metrics[names.FOLD_EPOCHS.name] == 3 and metrics[names.FOLDS_STOPPED.name] == 0
    per_fold = [metrics[names.fold_cindex(k)] for k in range(3)]
    assert per_fold == [t.history[-1]["val_cindex"] for t in cv.trainers]
    assert metrics[names.EPOCH_CINDEX.name] == pytest.approx(np.nanmean(per_fold), nan_ok=True)
    # Every patient is predicted once, by the fold that did not train on it.
    predictions = pd.concat([r.predictions for r in cv.results()])
    assert sorted(predictions["patient_id"]) == sorted(cohort.patient_ids)
    fold_of = dict(zip(cohort.patient_ids, folds))
    assert all(fold_of[p] == f for p, f in zip(predictions["patient_id"], predictions["fold"]))
    cv.write_learning_curve(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folds_on_parallel_devices_equal_sequential_folds(small_store, tmp_path):
    """A multi-GPU trial steps its folds in threads, one lane per device; shown here with two
    CPU lanes: the same predictions as one lane (dropout 0, so no shared RNG is drawn)."""
    cohort = Cohort(small_store, CohortSpec())
    folds = cohort.folds(2, seed=0)
    config = TrainConfig(epochs=2, **{**TINY, "augmentation": 0.0})
    results = []
    for name, devices in (("one", None), ("two", ["cpu", "cpu"])):
        cv = CrossValidation(CohortArrays(cohort), folds, config, tmp_path / name, devices)
        assert [str(t.device) for t in cv.trainers] == ["cpu", "cpu"]
        while not cv.finished:
            cv.step()
        predictions = pd.concat([r.predictions for r in cv.results()])
        results.append(predictions.sort_values("patient_id").reset_index(drop=True))
    pd.testing.assert_frame_equal(results[0], results[1])


def test_folds_on_one_device_share_one_volume_cache(small_store, tmp_path):
    cohort = Cohort(small_store, CohortSpec())
    cv = CrossValidation(CohortArrays(cohort, cohort.store.images(cohort.slots)), cohort.folds(3, seed=0),
                         TrainConfig(epochs=1, **TINY), tmp_path)
    assert len({id(t.memory.cache) for t in cv.trainers}) == 1


def test_a_trial_whose_selection_criterion_cannot_be_computed_fails_while_a_table_shows_n_a():
    """Pooled out-of-fold predictions without a usable DPI fail the trial (as before the registry);
    the same predictions in a report table show n/a and the metrics that can be computed."""
    from evaluation.metrics import SurvivalDataError
    from evaluation.prediction_metrics import Predictions, metric_columns, score_predictions

    oof = _oof()
    oof.loc[3, "risk"] = np.nan
    with pytest.raises(SurvivalDataError):
        cv_metrics(oof, EVAL_TIMES, n_resamples=20)
    columns = metric_columns(score_predictions(Predictions.from_table(oof, EVAL_TIMES, n_resamples=20)))
    assert columns["C-index [95% CI]"] == "n/a" and columns["Brier (365 d)"] == pytest.approx(0.0)


def test_an_epochs_cpu_use_is_its_cpu_time_over_its_wall_time():
    """Epochs shorter than the sampling interval: a busy one reads busy, an idle one idle (a percentage
    sampled by two threads once read 0 for a busy epoch)."""
    import time

    from evaluation import metric_names as names
    from trainables.resource_use import ResourceSampler

    sampler = ResourceSampler(interval_s=0.005)  # the sampler thread busy beside the epochs
    try:
        busy = []
        for _ in range(10):
            end = time.process_time() + 0.05
            while time.process_time() < end:  # 50 ms of this process's CPU time
                pass
            busy.append(sampler.take())
        time.sleep(0.3)
        idle = sampler.take()
    finally:
        sampler.stop()
    assert all(epoch[names.CPU_PERCENT.name] > 25 and epoch[names.RSS_GIB.name] > 0 for epoch in busy), busy
    assert idle[names.CPU_PERCENT.name] < min(epoch[names.CPU_PERCENT.name] for epoch in busy) / 2
