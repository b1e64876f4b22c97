"""Repeated K-fold cross-validation (``python -m study.run --repeats R``): how much a cell's headline
owes to the one partition of its patients into folds, at R times the cost of a study.

The whole study (every cell's search, its K-fold CV, its selection and its headline) runs R times,
each time on another random partition of the same patients into the same number of folds
(`StudyConfig.fold_seed`; repeat 0 is the partition a plain study uses), as ordinary studies named
``NAME-repeat<r>of<R>``. The summary gives, per cell, the mean of the R headlines (BBC-CV) and
their between-repeat SD, the same for the selected configuration's own out-of-fold C and for the
reference recipe, and how often the search selected the same configuration. A between-repeat SD
comparable to the differences between cells says that the cells' ranking is the partition's.
It goes to ``STORAGE/NAME-repeats<R>/`` and to a study run in the MLflow experiment
``NAME-repeats<R>``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pandas as pd

from evaluation import metric_names as names
from study.config import StudyConfig
from study.driver import run_study
from study.nested import track_summary
from study.results import write_tables
from study.study_folder import open_folder
from study.tuning import experiment_dir


def run_repeated(config: StudyConfig) -> pd.DataFrame:
    """Run the R studies, then summarise each cell over them; returns the summary table."""
    folder = open_folder(config.storage_path, f"{config.name}-repeats{config.repeats}")
    folder.acquire()  # one driver per repeated study (each repeat holds its own folder too)
    try:
        return _run_repeats(config, folder)
    finally:
        folder.release()


def _run_repeats(config: StudyConfig, folder) -> pd.DataFrame:
    r_total = config.repeats
    per_cell: dict[str, list[dict]] = defaultdict(list)
    for r in range(r_total):
        print(f"\n== Repeated CV, repeat {r + 1} of {r_total}: the whole study on partition {r} of the patients ==",
              flush=True)
        inner = replace(config, name=f"{config.name}-repeat{r}of{r_total}", repeat=r)
        if inner.resume and (experiment := experiment_dir(inner)) is not None and not experiment.is_dir():
            inner = replace(inner, resume=False)  # --resume of a repeated study that stopped before this repeat
        outcome = run_study(inner)
        for cell in outcome.cells:
            per_cell[cell.cell].append({
                "headline": cell.bbc.value if cell.bbc is not None else math.nan,
                "selected": cell.best.get(names.OOF_CINDEX.name, math.nan),
                "reference": cell.reference.get(names.OOF_CINDEX.name, math.nan),
                "configuration": json.dumps(cell.best_config, sort_keys=True, default=str) if cell.best_config else ""})
    table, metrics = summarise(per_cell, r_total)
    directory = folder.local
    files = write_tables(table, directory)
    pd.DataFrame([{"cell": cell, "repeat": r, **row} for cell, rows in per_cell.items() for r, row in enumerate(rows)]
                 ).to_csv(directory / "repeats.csv", index=False)
    name = f"{config.name}-repeats{r_total}"
    try:
        track_summary(replace(config, name=name), metrics, files, folder, {"repeats": str(r_total)})
    finally:
        folder.push(force=True)
    print(f"\nRepeated cross-validation of study {config.name} ({r_total} partitions of the patients; each a whole "
          "study):")
    print(table.T.to_string())
    print(f"\nWritten to {folder.where(files['markdown'])} (MLflow experiment {name}); the {r_total} studies are the "
          f"experiments {config.name}-repeat0of{r_total} .. {config.name}-repeat{r_total - 1}of{r_total}.")
    return table


def summarise(per_cell: dict[str, list[dict]], repeats: int) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The summary table (a column per cell) and its metrics per cell (`names.REPEATS_*`)."""
    rows, metrics = {}, {}
    for cell, results in per_cell.items():
        values = {key: np.array([r[key] for r in results], dtype=float) for key in ("headline", "selected", "reference")}
        configurations = [r["configuration"] for r in results if r["configuration"]]
        modal = max((configurations.count(c) for c in set(configurations)), default=0)

        def mean_sd(key: str) -> str:
            finite = values[key][np.isfinite(values[key])]
            if not len(finite):
                return "-"
            return f"{finite.mean():.3f} +- {finite.std(ddof=1):.3f}" if len(finite) > 1 else f"{finite[0]:.3f}"

        rows[cell.replace("__", " / ")] = {
            "C-index, BBC-CV, mean +- SD over repeats": mean_sd("headline"),
            "C-index, selected configuration, mean +- SD": mean_sd("selected"),
            "C-index, reference recipe, mean +- SD": mean_sd("reference"),
            "per repeat (BBC-CV)": " / ".join(f"{v:.3f}" for v in values["headline"]),
            "repeats selecting the most frequent configuration": f"{modal}/{len(results)}",
            "repeats": f"{len(results)}/{repeats}"}
        headline = values["headline"][np.isfinite(values["headline"])]
        if len(headline):
            metrics[cell] = {names.REPEATS_CINDEX_MEAN.name: float(headline.mean()),
                             names.REPEATS_CINDEX_SD.name: float(headline.std(ddof=1)) if len(headline) > 1 else 0.0}
    return pd.DataFrame(rows), metrics
