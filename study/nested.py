"""Nested cross-validation (``python -m study.run --outer-folds K``): the honest estimate, at K
times the cost of a study.

The usable patients are split into K outer folds (stratified by death and the glioblastoma flag,
drawn independently of the inner folds). For each outer fold the *whole* study (every cell's
search, its inner K-fold CV and its selection) runs on the other patients as an ordinary study
named ``NAME-outer<k>of<K>``; the configuration each cell selected then predicts the held-out outer fold
with its inner fold ensemble (`trainables.ensemble`), unchanged. The outer predictions of all K
folds, pooled (the DPI is comparable across models, `trainables.heads`), give each cell's
nested C-index with its patient-bootstrap CI: no patient's prediction was involved in choosing
the configuration that made it. The summary goes to ``STORAGE/NAME-nested<K>/`` and to a study
run in the MLflow experiment ``NAME-nested<K>``. K is in every name, so a rerun with another K
never reuses inner studies whose search saw its new test patients.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import metric_names as names
from trainables.ensemble import load_fold_models, predict_ensemble
from datasets.cohort import Cohort, CohortSpec
from datasets.cohort import HORIZONS
from search_spaces import TASKS
from study.config import StudyConfig
from study.results import write_tables
from study.data import open_data, outer_assignment
from study.driver import TrackingIncomplete, run_study
from study.study_folder import open_folder
from study.tuning import experiment_dir
from trainables.config import TrainConfig
from trainables.cross_validation import cv_metrics


def outer_predictions(cell, store, test_ids: list[str], folds: int) -> pd.DataFrame:
    """The selected configuration's fold ensemble on the outer test patients of its task."""
    spec = TASKS[cell.task]
    everyone = Cohort(store, CohortSpec(spec.filter, spec.endpoint))
    held_out = set(test_ids)
    cohort = Cohort(store, CohortSpec(spec.filter, spec.endpoint,
                                      tuple(p for p in everyone.patient_ids if p not in held_out)))
    times = TrainConfig().eval_times
    with cell.best_checkpoint.as_directory() as directory:
        predicted = predict_ensemble(load_fold_models(Path(directory), folds), store.images(cohort.slots), times,
                                     cohort.clinical)
    frame = pd.DataFrame({"patient_id": cohort.patient_ids, "time": cohort.time, "event": cohort.event,
                          "risk": predicted["risk"], "surv_365": predicted["surv_365"]})
    for k, t in enumerate(times):
        frame[f"surv_t{int(t)}"] = predicted["curves"][:, k]
    return frame


def run_nested(config: StudyConfig) -> pd.DataFrame:
    """Run the K outer studies, then score each cell's outer predictions; returns the nested table."""
    config, store = open_data(config)
    k = config.outer_folds
    summary = open_folder(config.storage_path, f"{config.name}-nested{k}")
    summary.acquire()  # one driver per nested study (each inner study holds its own folder too)
    try:
        return _run_outer_folds(config, store, summary)
    finally:
        summary.release()


def _run_outer_folds(config: StudyConfig, store, folder) -> pd.DataFrame:
    k = config.outer_folds
    assignment = outer_assignment(store, k, config.seed)
    predictions: dict[str, list[pd.DataFrame]] = defaultdict(list)
    selected: dict[str, list[dict]] = defaultdict(list)
    tasks: dict[str, str] = {}
    for fold in range(k):
        test_ids = sorted(p for p, f in assignment.items() if f == fold)
        print(f"\n== Nested CV, outer fold {fold + 1} of {k}: the whole search without its {len(test_ids)} patients ==",
              flush=True)
        inner = replace(config, name=f"{config.name}-outer{fold}of{k}", outer_fold=fold)
        if inner.resume and (experiment := experiment_dir(inner)) is not None and not experiment.is_dir():
            inner = replace(inner, resume=False)  # --resume of a nested study that stopped before this fold
        outcome = run_study(inner)
        for cell in outcome.cells:
            if cell.best_checkpoint is None:
                continue
            frame = outer_predictions(cell, store, test_ids, config.protocol.folds).assign(fold=fold)
            predictions[cell.cell].append(frame)
            tasks[cell.cell] = cell.task
            selected[cell.cell].append({"selected": cell.best.get(names.OOF_CINDEX.name, math.nan),
                                        "bbc": cell.bbc.value if cell.bbc is not None else math.nan})
    rows, metrics = {}, {}
    for cell, frames in predictions.items():
        pooled = pd.concat(frames, ignore_index=True)
        horizon = HORIZONS[TASKS[tasks[cell]].endpoint]
        scores = cv_metrics(pooled, TrainConfig().eval_times, horizon=horizon, seed=config.seed)
        naive = np.nanmean([r["selected"] for r in selected[cell]])
        bbc = np.nanmean([r["bbc"] for r in selected[cell]])
        rows[cell.replace("__", " / ")] = {
            "C-index, nested CV [95% CI]": f"{scores[names.OOF_CINDEX.name]:.3f} [{scores[names.OOF_CINDEX_LOW.name]:.3f}, "
                                           f"{scores[names.OOF_CINDEX_HIGH.name]:.3f}]",
            "per-outer-fold C, mean +- SD": f"{scores[names.FOLD_CINDEX_MEAN.name]:.3f} +- "
                                            f"{scores[names.FOLD_CINDEX_SD.name]:.3f}",
            "inner selected C (mean over outer folds)": f"{naive:.3f}",
            "inner BBC-CV C (mean over outer folds)": f"{bbc:.3f}",
            "outer folds with a selected configuration": f"{len(frames)}/{k}",
            "Brier score (365 d)": f"{scores[names.BRIER_365.name]:.3f}"}
        for metric, key in ((names.NESTED_CINDEX, names.OOF_CINDEX), (names.NESTED_CINDEX_LOW, names.OOF_CINDEX_LOW),
                            (names.NESTED_CINDEX_HIGH, names.OOF_CINDEX_HIGH)):
            metrics.setdefault(cell, {})[metric.name] = scores[key.name]
    table = pd.DataFrame(rows)
    name = f"{config.name}-nested{k}"
    directory = folder.local
    files = write_tables(table, directory)
    for cell, frames in predictions.items():
        pd.concat(frames, ignore_index=True).to_csv(directory / f"outer_predictions_{cell}.csv", index=False)
    try:
        track_summary(replace(config, name=name), metrics, files, folder, {"nested_outer_folds": str(k)})
    finally:
        folder.push(force=True)
    print(f"\nNested cross-validation of study {config.name} ({k} outer folds; each cell's selected configuration "
          "tested on patients its search never saw):")
    print(table.T.to_string())
    print(f"\nWritten to {folder.where(files['markdown'])} (MLflow experiment {name}); the {k} inner studies are the experiments "
          f"{config.name}-outer0of{k} .. {config.name}-outer{k - 1}of{k}.")
    return table


def track_summary(config: StudyConfig, metrics: dict[str, dict], files: dict, folder, tags: dict[str, str]) -> None:
    """A study run in the experiment NAME (tagged with `tags`), and under it one run per cell carrying
    the estimates of a study of studies, nested or repeated (`metrics`: cell name -> metric name ->
    value)."""
    from study.tracking import StudyTracker
    from study.tracking.tracker import cell_tags

    tracker = StudyTracker(config.tracking_uri, config.name, folder.tracking_journal, trust_storage=config.trust_storage)
    tracker.start({"space": config.space, "budget": config.budget, **tags},
                  {"space": config.space, "budget": config.budget, **tags,
                   "tasks": ",".join(config.tasks), "backbones": ",".join(config.backbones)},
                  {names.CONFIG_FILE: json.dumps(config.to_dict(), indent=1)})
    for cell in config.cells():
        if cell.name in metrics:
            tracker.cell_run(cell.name, cell.label, cell_tags(cell))
            tracker.log_metrics(cell.name, metrics[cell.name])
            tracker.terminate(cell.name, "FINISHED")
    tracker.finish_parent("FINISHED", files)
    if not tracker.catch_up(300.0):
        raise TrackingIncomplete(f"the estimates are written to {folder.uri}, but {tracker.pending} tracking "
                                 f"records wait in {folder.where(folder.tracking_journal)}; rerun with --resume to "
                                 "deliver them")
