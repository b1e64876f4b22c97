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

`bbc_search` goes further: it also replays, in each bootstrap sample, the scheduler's decisions to
stop configurations early (ASHA decided them on the same patients), so the headline pays for the
whole search, not only for the choice among the configurations that finished.

numpy (the concordance kernel of `evaluation.metrics`) and, for `bbc_search`, Ray's own ASHA rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.metrics import Estimate, SurvivalDataError, _Concordance, check_survival


def _bootstrap_samples(event: np.ndarray, n_bootstrap: int, seed: int):
    """(in-bag counts, out-of-bag indicator) of `n_bootstrap` patient resamples, skipping those with
    no event in the bag or none out of it (no C-index there)."""
    rng = np.random.default_rng(seed)
    n = event.shape[0]
    for _ in range(n_bootstrap):
        count = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(float)
        out_of_bag = (count == 0).astype(float)
        if (event * count).any() and (event * out_of_bag).any():
            yield count, out_of_bag


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
    values = []
    for count, out_of_bag in _bootstrap_samples(event, n_bootstrap, seed):
        try:
            in_bag = [c(count) for c in concordance]
            values.append(concordance[int(np.argmax(in_bag))](out_of_bag))
        except SurvivalDataError:  # no comparable pair in this sample
            continue
    return _percentile_estimate(values, level)


# -- the headline that pays for the search's pruning too ----------------------------------------

@dataclass(frozen=True)
class SearchedTrial:
    """One configuration of a cell as its search saw it (`bbc_search`).

    Attributes
    ----------
    final : float [n] or None
        Pooled out-of-fold risk (comparable across folds) of a trial that ran its whole budget;
        None for a trial the scheduler stopped.
    rungs : {epoch: (fold int [n], score float [n])}
        At each rung the trial reached, every patient's validation score of that epoch (by the
        fold model that did not train on them): what the scheduler compared, as the mean over folds
        of each fold's C-index.
    reported : {epoch: float}
        When the scheduler saw each rung's result (any increasing clock): the order ASHA decided in.
    """

    final: np.ndarray | None
    rungs: dict
    reported: dict


class _Rung:
    """A trial's rung scores with each fold's concordance sorted once: the mean of the folds'
    C-indices under bootstrap weights (NaN for a fold without a comparable pair)."""

    def __init__(self, time, event, fold, score):
        self.parts = [(np.flatnonzero(fold == k), _Concordance(time[fold == k], event[fold == k], score[fold == k]))
                      for k in np.unique(fold)]
        self.pooled = _Concordance(time, event, score)

    def value(self, count: np.ndarray) -> float:
        values = []
        for rows, concordance in self.parts:
            try:
                values.append(concordance(count[rows]))
            except SurvivalDataError:
                continue
        return float(np.mean(values)) if values else float("nan")


def bbc_search(time, event, trials: list[SearchedTrial], grace: int, max_t: int, reduction_factor: float,
               n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0, stand_in: bool = False) -> Estimate:
    """BBC-CV that replays the whole search inside each bootstrap sample: ASHA's decisions as well as
    the final choice among the configurations that finished.

    `bbc_cv` over the finished configurations alone leaves the scheduler's choices unpaid: ASHA
    kept the configurations that finished because their validation C on these same patients was
    high, so with few finishers the estimate is their own optimistic out-of-fold C. Here, in each
    bootstrap sample, Ray's own ASHA rule (`ray.tune.schedulers.async_hyperband._Bracket`, the
    study's scheduler) decides again, in the order the rung results reached it, on the mean of the
    folds' C-indices over the in-bag patients only; among the configurations that survive it, the one
    with the best in-bag pooled C is selected and scored on the out-of-bag patients. A configuration
    the replay keeps past the rung where the real search stopped it has no later predictions: it goes
    on with its last ones for the replay's later rungs (it can still stop others there), but it is
    not a final candidate: its last predictions are not the model it would have become. With
    ``stand_in=True`` they are one (their pooled C), which pays more for ASHA where configurations
    are equally good but overshoots where they differ: on cells of 20 configurations and 1,139
    patients with 3 or fewer finishers, stand-ins -0.0016 (equal) and -0.0080 (unequal) against
    +0.0025 and -0.0061 without, paired on the same 80 and 68 cells; the benchmark's 200 cells per
    scenario give the default +0.0035 and -0.0043 (stand-ins, an earlier run: -0.0001 and -0.0055).
    Where every configuration that finished is stopped in a bootstrap sample, the search's own
    finishers are the candidates.
    `python -m benchmarks.selection_bias` measures it against the selected configuration's true C.

    Parameters
    ----------
    time : float [n], days; event : 0/1 [n]
    trials : the cell's configurations (`SearchedTrial`), finished or stopped
    grace, max_t, reduction_factor : the scheduler's settings (its first rung, the epochs of a
        finished trial, its halving rate)
    """
    from ray.tune.schedulers.async_hyperband import _Bracket

    time, event, _ = check_survival(time, event, np.zeros(len(time)), name="time")
    if not any(t.final is not None for t in trials):
        raise SurvivalDataError("No configuration of the search finished.")
    if not event.any():
        raise SurvivalDataError("All samples are censored.")
    rung_epochs = sorted(milestone for milestone, _ in _Bracket(grace, max_t, reduction_factor, 0)._rungs)
    rungs, finals = _sorted_scores(time, event, trials, stand_in)
    events = _rung_events(trials, rungs, rung_epochs)
    finished = {i for i, t in enumerate(trials) if t.final is not None}
    values = []
    for count, out_of_bag in _bootstrap_samples(event, n_bootstrap, seed):
        stopped = _replay_asha(events, rungs, count, grace, max_t, reduction_factor)
        # Where every finisher is stopped in this sample, the search's own finishers are the candidates.
        in_bag = _in_bag(finals, set(range(len(trials))) - stopped, count) or _in_bag(finals, finished, count)
        if not in_bag:
            continue
        best_c = max(in_bag.values())
        try:  # configurations tied in the bag count alike (whatever order the trials are listed in)
            values.append(float(np.mean([finals[i](out_of_bag) for i, c in in_bag.items() if c == best_c])))
        except SurvivalDataError:  # no comparable pair out of the bag
            continue
    return _percentile_estimate(values, level)


def _sorted_scores(time, event, trials: list[SearchedTrial], stand_in: bool) -> tuple[list[dict], list]:
    """Each trial's rungs (`_Rung`) and its final predictions' concordance, sorted once for every
    bootstrap sample; a stopped trial's last rung scores stand in for the predictions it never made
    with `stand_in`, else it has none (None)."""
    rungs = [{epoch: _Rung(time, event, np.asarray(f), np.asarray(s, dtype=float))
              for epoch, (f, s) in t.rungs.items()} for t in trials]
    finals = [_Concordance(time, event, np.asarray(t.final, dtype=float)) if t.final is not None
              else (own[max(own)].pooled if own and stand_in else None) for t, own in zip(trials, rungs)]
    return rungs, finals


def _rung_events(trials: list[SearchedTrial], rungs: list[dict], rung_epochs: list[int]) -> list[tuple]:
    """(when reported, trial index, rung epoch, epoch of the scores used) in the order the scheduler saw
    them; a trial the replay keeps past its real stop meets its later rungs right after its last real
    result, with its last scores."""
    events = []
    for index, (t, own) in enumerate(zip(trials, rungs)):
        if not own:
            continue
        last = max(own)
        events += [(t.reported[epoch], index, epoch, epoch) for epoch in own]
        if t.final is None:
            events += [(t.reported[last], index, epoch, last) for epoch in rung_epochs if epoch > last]
    return sorted(events, key=lambda e: (e[0], e[2], e[1]))


def _percentile_estimate(values: list[float], level: float) -> Estimate:
    """Mean and percentile interval of the finite bootstrap values."""
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise SurvivalDataError("No bootstrap sample allowed computing the C-index.")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return Estimate(float(values.mean()), float(low), float(high), level, int(values.size))


class _TrialId:
    """What Ray's `_Bracket` reads of a trial."""

    def __init__(self, index: int):
        self.trial_id = str(index)


def _replay_asha(events: list[tuple], rungs: list[dict], count: np.ndarray, grace: int, max_t: int,
                 reduction_factor: float) -> set[int]:
    """The trials Ray's ASHA rule stops when it sees the rung scores of the in-bag patients (`count`)."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    bracket, stopped = _Bracket(grace, max_t, reduction_factor, 0), set()
    for _, index, epoch, source in events:
        if index in stopped:
            continue
        if bracket.on_result(_TrialId(index), epoch, rungs[index][source].value(count)) == TrialScheduler.STOP:
            stopped.add(index)
    return stopped


def _in_bag(finals: list, candidates: set[int], count: np.ndarray) -> dict[int, float]:
    """The in-bag pooled C of each candidate that has final predictions (and a comparable pair)."""
    out = {}
    for index in sorted(candidates):
        if finals[index] is None:
            continue
        try:
            out[index] = finals[index](count)
        except SurvivalDataError:
            continue
    return out
