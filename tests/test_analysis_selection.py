"""BBC-CV: the selected configuration's C-index without the optimism of selecting it."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.metrics import SurvivalDataError, harrell_c
from analysis.selection import bbc_cv
from benchmarks.selection_bias import cohort, true_cindex


def test_bbc_cv_removes_most_of_the_best_of_n_optimism():
    """Ten configurations of equal true skill on 300 patients, 30 simulated cells: the naive best
    is optimistic, BBC-CV is not (the full check, 300 repetitions: benchmarks.selection_bias)."""
    noise = np.full(10, 0.8)
    truth = true_cindex(0.8, patients=100_000)
    rng = np.random.default_rng(0)
    naive, corrected = [], []
    for rep in range(30):
        x, time, event = cohort(rng, 300)
        risks = x[None, :] + noise[:, None] * rng.normal(size=(10, 300))
        naive.append(max(harrell_c(time, event, r) for r in risks) - truth)
        corrected.append(bbc_cv(time, event, risks, n_bootstrap=200, seed=rep).value - truth)
    assert np.mean(naive) > 0.01, np.mean(naive)
    assert abs(np.mean(corrected)) < 0.01 and np.mean(naive) - np.mean(corrected) > 0.01, (
        np.mean(naive), np.mean(corrected))


def test_bbc_cv_of_one_configuration_is_its_out_of_bag_c_and_interval():
    rng = np.random.default_rng(1)
    x, time, event = cohort(rng, 400)
    estimate = bbc_cv(time, event, x[None, :], n_bootstrap=300)
    assert estimate.low < harrell_c(time, event, x) < estimate.high
    assert estimate.value == pytest.approx(harrell_c(time, event, x), abs=0.01)


@pytest.mark.parametrize("risks, message", [
    (np.zeros((2, 5)), "Input 'risks' has 5 values but 'time' has 4"),
    (np.array([[0.1, np.nan, 0.3, 0.2]]), "contains NaN"),
])
def test_bbc_cv_refuses_bad_input(risks, message):
    with pytest.raises(SurvivalDataError, match=message):
        bbc_cv([1.0, 2.0, 3.0, 4.0], [1, 0, 1, 0], risks)
