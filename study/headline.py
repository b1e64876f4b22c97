"""Each cell's headline: BBC-CV that replays the cell's whole search (`evaluation.selection.bbc_search`),
computed from the study's records in MLflow.

A cell's trial runs hold what the search saw: each trial's scores at every rung of the scheduler it
reached (``rungs/epoch_NNNN.csv``), when the driver saw them (metric ``rung_seen``), and a
finished trial's pooled out-of-fold predictions (``oof_predictions.csv``). They are read from the
tracking server, which the storage path cannot forge (docs/guides/troubleshooting.md, "The storage path is a trust
boundary"). Without pruning, or for a cell whose trials have no rung records (a study started by an
earlier version), the headline is BBC-CV over the finished configurations, and says so
(`Headline.replayed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.study_reader import search_records
from evaluation.metrics import Estimate, SurvivalDataError
from evaluation.selection import SearchedTrial, bbc_search


@dataclass(frozen=True)
class Headline:
    estimate: Estimate | None
    replayed: bool  # True: the search's pruning is paid for too; False: only the choice among finishers
    why: str = ""  # why it was not replayed


def searched_trials(client, experiment_id: str, cell: str) -> tuple[pd.DataFrame, list[SearchedTrial]] | None:
    """The cell's patients (``patient_id``, ``time``, ``event``, sorted by id) and its trials as the
    search saw them, from MLflow (`analysis.study_reader.search_records`); None if some trial has no
    rung records."""
    records = search_records(client, experiment_id, cell)
    if any(len(r.rungs) != len(r.seen) or (not r.rungs and r.final is None) for r in records):
        return None
    finals = [r.final for r in records if r.final is not None]
    if not finals:
        return None
    patients = finals[0][["patient_id", "time", "event"]].sort_values("patient_id", kind="stable")
    ids = patients["patient_id"]
    out = []
    for record in records:
        risk = None if record.final is None else record.final.set_index("patient_id").loc[ids, "risk"].to_numpy(float)
        scored = {epoch: (frame.loc[ids, "fold"].to_numpy(int), frame.loc[ids, "score"].to_numpy(float))
                  for epoch, frame in record.rungs.items()}
        out.append(SearchedTrial(risk, scored, record.seen))
    return patients.reset_index(drop=True), out


def headline(client, experiment_id: str, cell: str, protocol, pruning: bool, bootstrap: int = 1000,
             seed: int = 0) -> Headline:
    """The cell's headline C-index (see the module docstring)."""
    found = searched_trials(client, experiment_id, cell) if pruning else None
    if found is None:
        return Headline(None, False, "no pruning" if not pruning else "trials without rung records")
    patients, trials = found
    time, event = patients["time"].to_numpy(float), patients["event"].to_numpy(int)
    try:
        estimate = bbc_search(time, event, trials, protocol.grace_epochs, protocol.epochs, protocol.reduction_factor,
                              n_bootstrap=bootstrap, seed=seed)
    except SurvivalDataError as exc:
        return Headline(None, False, str(exc))
    return Headline(estimate, True)
