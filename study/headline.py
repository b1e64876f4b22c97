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

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from evaluation import metric_names as names
from evaluation.metrics import Estimate, SurvivalDataError
from evaluation.selection import SearchedTrial, bbc_search


@dataclass(frozen=True)
class Headline:
    estimate: Estimate | None
    replayed: bool  # True: the search's pruning is paid for too; False: only the choice among finishers
    why: str = ""  # why it was not replayed


def _csv(client, run_id: str, path: str, tmp: str) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, path, tmp))


def searched_trials(client, experiment_id: str, cell: str) -> tuple[pd.DataFrame, list[SearchedTrial]] | None:
    """The cell's patients (``patient_id``, ``time``, ``event``, sorted by id) and its trials as the
    search saw them, from MLflow; None if some trial has no rung records."""
    runs = [r for r in client.search_runs([experiment_id], names.role_filter(names.TRIAL_ROLE), max_results=50000)
            if r.data.tags.get(names.TRIAL_KEY_TAG, "").startswith(f"{cell}/")]
    patients, trials = None, []
    with tempfile.TemporaryDirectory() as tmp:
        for run in sorted(runs, key=lambda r: r.data.tags.get(names.TRIAL_KEY_TAG, "")):
            outcome = run.data.tags.get("outcome")
            if outcome == "failed" or run.info.status == "FAILED":
                continue
            finished = outcome == "finished" or run.info.status == "FINISHED"
            files = [a.path for a in client.list_artifacts(run.info.run_id, names.RUNG_FOLDER)]
            seen = {int(m.step): m.value for m in client.get_metric_history(run.info.run_id, names.RUNG_SEEN.name)}
            rungs = {}
            for path in files:
                epoch = int(Path(path).stem.split("_")[-1])
                frame = _csv(client, run.info.run_id, path, tmp)
                rungs[epoch] = frame.set_index("patient_id")
            if len(rungs) != len(seen) or (not rungs and not finished):
                return None
            final = _csv(client, run.info.run_id, names.OOF_FILE, tmp) if finished else None
            if final is not None and patients is None:
                patients = final[["patient_id", "time", "event"]].sort_values("patient_id", kind="stable")
            trials.append((final, rungs, seen))
    if patients is None:
        return None
    ids = patients["patient_id"]
    out = []
    for final, rungs, seen in trials:
        risk = None if final is None else final.set_index("patient_id").loc[ids, "risk"].to_numpy(float)
        scored = {epoch: (frame.loc[ids, "fold"].to_numpy(int), frame.loc[ids, "score"].to_numpy(float))
                  for epoch, frame in rungs.items()}
        out.append(SearchedTrial(risk, scored, seen))
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
