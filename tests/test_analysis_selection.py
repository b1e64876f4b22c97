"""BBC-CV: the selected configuration's C-index without the optimism of selecting it."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import SurvivalDataError, harrell_c
from evaluation.selection import bbc_cv
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


# -- the headline that replays the search (bbc_search) ------------------------------------------

def _search_cell(seed: int = 0, n: int = 300):
    from evaluation.selection import SearchedTrial

    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = rng.exponential(500 * np.exp(-x)).round() + 1
    event = (rng.uniform(size=n) < 0.7).astype(int)
    folds = np.arange(n) % 5
    trials = []
    for j in range(6):
        final = x + rng.normal(size=n) if j < 3 else None  # three finished, three stopped at the first rung
        rungs = {20: (folds, x * 0.5 + rng.normal(size=n))}
        reported = {20: float(j)}
        if final is not None:
            rungs[60] = (folds, x * 0.8 + rng.normal(size=n))
            rungs[180] = (folds, x + rng.normal(size=n))
            reported.update({60: 10.0 + j, 180: 20.0 + j})
        trials.append(SearchedTrial(final, rungs, reported))
    return time, event, trials


def test_the_search_replay_of_one_configuration_is_its_out_of_bag_c():
    """One configuration, no choice to pay for: BBC-CV over it and the replay give the same estimate."""
    from evaluation.selection import SearchedTrial, bbc_search

    time, event, trials = _search_cell()
    only = [SearchedTrial(trials[0].final, trials[0].rungs, trials[0].reported)]
    replayed = bbc_search(time, event, only, 20, 200, 3, n_bootstrap=300, seed=4)
    plain = bbc_cv(time, event, [trials[0].final], n_bootstrap=300, seed=4)
    assert replayed == plain


def test_the_search_replay_is_seeded_and_order_free():
    from evaluation.selection import bbc_search

    time, event, trials = _search_cell()
    first = bbc_search(time, event, trials, 20, 200, 3, n_bootstrap=200, seed=1)
    assert first == bbc_search(time, event, trials, 20, 200, 3, n_bootstrap=200, seed=1)
    assert first == bbc_search(time, event, trials[::-1], 20, 200, 3, n_bootstrap=200, seed=1)
    assert 0.5 < first.value < 1 and first.low <= first.value <= first.high


def test_the_search_replay_needs_a_finished_configuration():
    from evaluation.selection import SearchedTrial, bbc_search

    time, event, trials = _search_cell()
    with pytest.raises(SurvivalDataError, match="No configuration of the search finished"):
        bbc_search(time, event, [SearchedTrial(None, t.rungs, t.reported) for t in trials], 20, 200, 3)
