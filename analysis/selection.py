"""The C-index of a configuration chosen among many, without the optimism of choosing it.

Each cell reports its best configuration, selected by its own pooled out-of-fold C-index: with 20
configurations of equal true skill on 1,139 patients the best one's out-of-fold C exceeds the
typical one by about 0.02, as large as the effects the study is meant to measure.

`bbc_cv` is the bootstrap bias-corrected cross-validation of Tsamardinos, Greasidou and
Borboudakis (Machine Learning 107, 2018): the pooled out-of-fold predictions of all finished
configurations are resampled by patient; in each bootstrap sample the configuration with the best
C-index is selected and scored on the patients left out of that sample; the estimate is the mean
of those out-of-bag scores and its 95% interval their percentiles. No model is retrained.
`python -m benchmarks.selection_bias` checks it on simulated cells where the truth is known.

numpy only (the concordance kernel of `analysis.metrics`).
"""

from __future__ import annotations

import numpy as np

from analysis.metrics import Estimate, SurvivalDataError, _Concordance, check_survival


def bbc_cv(time, event, risks, n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """BBC-CV estimate of the selected configuration's Harrell C-index.

    Parameters
    ----------
    time : float [n], days
    event : 0/1 [n]
    risks : float [m, n]
        Pooled out-of-fold risk of each of m configurations for the same n patients (higher =
        worse; comparable across folds).
    n_bootstrap, level, seed
        Bootstrap samples, interval level, seed.

    Returns
    -------
    `Estimate`: the mean out-of-bag C of the configuration selected in each bootstrap sample,
    with the percentile interval of those values.
    """
    risks = np.atleast_2d(np.asarray(risks, dtype=float))
    time, event, _ = check_survival(time, event, risks[0], name="risks")  # also checks the patients' count
    if np.isnan(risks).any():
        raise SurvivalDataError("Input 'risks' contains NaN.")
    if not event.any():
        raise SurvivalDataError("All samples are censored.")
    concordance = [_Concordance(time, event, r) for r in risks]  # sorted once per configuration
    rng = np.random.default_rng(seed)
    n = time.shape[0]
    values = []
    for _ in range(n_bootstrap):
        count = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(float)
        out_of_bag = (count == 0).astype(float)
        if not (event * count).any() or not (event * out_of_bag).any():
            continue
        try:
            in_bag = [c(count) for c in concordance]
            values.append(concordance[int(np.argmax(in_bag))](out_of_bag))
        except SurvivalDataError:  # no comparable pair in this sample
            continue
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise SurvivalDataError("No bootstrap sample allowed computing the C-index.")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return Estimate(float(values.mean()), float(low), float(high), level, int(values.size))
