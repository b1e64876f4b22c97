"""The numbers a study reports, named once, each with what it means.

Trainables produce them, `study` logs them (MLflow, results table) and `analysis` reads them
back; every module imports the names from here. Definitions (which patients, which horizon,
which censoring distribution) are docs/concepts.md's Definitions, one line each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricName:
    """A metric's name (as logged) and its one-line meaning."""

    name: str
    meaning: str

    def __str__(self) -> str:
        return self.name


# -- per epoch of a trial (step = epoch) ----------------------------------------------------
EPOCH_CINDEX = MetricName(
    "epoch_val_cindex_mean",
    "mean over the folds of this epoch's validation C-index (a fold that stopped early counts with "
    "its selected epoch, see folds_stopped); what ASHA prunes on and Optuna's intermediate value; "
    "not the pooled out-of-fold C-index")
FOLDS_STOPPED = MetricName("folds_stopped", "folds that stopped early and report their selected epoch")
TRAIN_LOSS = MetricName("train_loss", "mean training loss over the folds")
FOLD_EPOCHS = MetricName("fold_epochs", "fold-epochs trained so far (the unit of compute)")

# -- resource use of a trial, per epoch (sampled in the background, `trainables.resource_use`) -----
CPU_PERCENT = MetricName("cpu_percent", "mean CPU use of the trial's process over the epoch (100 = one core busy)")
RSS_GIB = MetricName("rss_gib", "largest resident memory of the trial's process over the epoch, GiB")
GPU_UTIL = MetricName("gpu_util_percent", "mean utilisation of the trial's GPUs over the epoch (NVML), percent")
GPU_MEMORY_GIB = MetricName("gpu_memory_gib", "largest GPU memory the trial's process held over the epoch, GiB")

# -- final, once per finished trial -----------------------------------------------------------
OOF_CINDEX = MetricName(
    "oof_cindex",
    "Harrell's C of the pooled out-of-fold DPI (every patient predicted by the fold model that did not "
    "train on it; DPI comparable across folds) on the task's endpoint")
OOF_CINDEX_LOW = MetricName("oof_cindex_low", "lower end of the 95% patient-bootstrap CI of oof_cindex")
OOF_CINDEX_HIGH = MetricName("oof_cindex_high", "upper end of the 95% patient-bootstrap CI of oof_cindex")
FOLD_CINDEX_MEAN = MetricName("fold_cindex_mean", "mean of the K per-fold validation C-indices")
FOLD_CINDEX_SD = MetricName("fold_cindex_sd", "standard deviation of the K per-fold validation C-indices")
FOLDS_COLLAPSED = MetricName(
    "folds_collapsed",
    "folds whose validation C-index is within 0.02 of 0.5 (or whose DPI is constant) while the other "
    "folds' median is at least 0.55: a fold that learned nothing")
BRIER_365 = MetricName(
    "brier_365", "IPCW Brier score of surv_365 at day 365 (censoring: reverse Kaplan-Meier of the pooled patients)")
IBS = MetricName("ibs", "integrated Brier score over the evaluation times inside the follow-up")
UNO_C = MetricName("uno_c", "Uno's IPCW C-index truncated at the 90th percentile of times")
AUC_365 = MetricName("auc_365", "cumulative/dynamic IPCW AUC at day 365")

# -- per cell, on the study run ---------------------------------------------------------------
BBC_CINDEX = MetricName(
    "bbc_cindex",
    "bootstrap bias-corrected C-index of the cell's selected configuration (BBC-CV, Tsamardinos et al. 2018): "
    "select on each bootstrap sample of the pooled out-of-fold predictions, score on its out-of-bag patients")
BBC_CINDEX_LOW = MetricName("bbc_cindex_low", "lower end of the 95% interval of bbc_cindex")
BBC_CINDEX_HIGH = MetricName("bbc_cindex_high", "upper end of the 95% interval of bbc_cindex")
REFERENCE_CINDEX = MetricName("reference_oof_cindex", "oof_cindex of the reference recipe (first trial of the cell)")
TRIALS_FINISHED = MetricName("trials_finished", "the cell's trials that ran their whole budget")
TRIALS_PRUNED = MetricName("trials_pruned", "the cell's trials that ASHA stopped early")
TRIALS_FAILED = MetricName("trials_failed", "the cell's trials that failed (diverged, or could not train)")

NESTED_CINDEX = MetricName(
    "nested_cindex",
    "nested CV: Harrell's C of the outer test folds' DPI, each predicted by the fold ensemble of the configuration "
    "its own inner search selected without seeing it")
NESTED_CINDEX_LOW = MetricName("nested_cindex_low", "lower end of the 95% patient-bootstrap CI of nested_cindex")
NESTED_CINDEX_HIGH = MetricName("nested_cindex_high", "upper end of the 95% patient-bootstrap CI of nested_cindex")
REPEATS_CINDEX_MEAN = MetricName(
    "repeats_bbc_cindex_mean", "repeated CV: mean over the repeats (partitions of the patients into folds) of the "
    "cell's headline, bbc_cindex")
REPEATS_CINDEX_SD = MetricName(
    "repeats_bbc_cindex_sd", "repeated CV: between-repeat SD of the cell's headline (how much of it is the partition)")

# Keys of a trial's reports that are flags, not metrics.
FINAL = "final"  # True on the last report of a finished trial (it carries FINAL_METRICS)
FAILED = "failed"  # the reason, on the last report of a trial that diverged
FINISHED, PRUNED, FAILED_OUTCOME = "finished", "pruned", "failed"  # how a trial ended (`outcome`)


# The study's one criterion for the best of a cell's finished configurations: what the driver's
# results, the report, the logged model, Optuna's objective and BBC-CV's in-sample choice rank by.
# BBC-CV (`evaluation.selection`) recomputes it on bootstrap samples: it is Harrell's C of the pooled
# out-of-fold DPI, so a criterion other than this one needs its statistic there too.
SELECTED_BY = OOF_CINDEX


def criterion(metrics: dict) -> float:
    """A trial's value of `SELECTED_BY`; one that is absent or not a number ranks below every other."""
    value = metrics.get(SELECTED_BY.name) if metrics else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def ranks_above(metrics: dict, trial_id: str, other_metrics: dict, other_trial_id: str) -> bool:
    """Whether a trial (its final metrics and id) ranks above another by `SELECTED_BY`; a tie goes to
    the lower trial id, so the choice does not depend on the order trials are read in (the driver's
    results, the report, a resume)."""
    return (criterion(metrics), other_trial_id) > (criterion(other_metrics), trial_id)


def outcome(last_result: dict | None, errored: bool = False) -> str:
    """How an ended trial ended, from its last report (the one definition every part of the study
    uses): ``failed`` (an error, or a trial that diverged), ``finished`` (it ran its whole budget:
    its last report carries FINAL) or ``pruned`` (the scheduler stopped it)."""
    last = last_result or {}
    if errored or last.get(FAILED):
        return FAILED_OUTCOME
    return FINISHED if last.get(FINAL) else PRUNED


# On a report at a rung of the scheduler: {"patient_id": [...], "fold": [...], "score": [...]}, what it judged.
RUNG_SCORES = "rung_scores"
RUNG_SEEN = MetricName(
    "rung_seen", "when the driver saw the trial's result at a rung of the scheduler (seconds since 1970; step = "
    "the rung's epoch): the order in which ASHA decided, which the headline replays")
RUNG_FOLDER = "rungs"  # a trial run's artifacts: rungs/epoch_NNNN.csv, the scores of each rung it reached


def rung_file(epoch: int) -> str:
    return f"epoch_{int(epoch):04d}.csv"

# MLflow tags that say what a run is: the study, one of its cells, or one of a cell's trials, each
# found again by its key (a resumed study reuses its runs rather than duplicating them).
ROLE_TAG, CELL_KEY_TAG, TRIAL_KEY_TAG = "study_role", "cell_key", "trial_key"
STUDY_ROLE, CELL_ROLE, TRIAL_ROLE = "study", "cell", "trial"
# The study run's copy of its resolved configuration (`study.config.StudyConfig.to_dict`).
CONFIG_FILE = "study_config.json"
# A trial run's tag saying how it ended (`outcome`: finished, pruned, failed).
OUTCOME_TAG = "outcome"
# A cell run's model (`study.model_logging`): an MLflow pyfunc model under MODEL_PATH, whose record
# of what it is (study, cell, trial, inputs, scale) is the artifact MODEL_META.
MODEL_PATH = "model"
MODEL_META_FILE = "meta.json"
MODEL_META = f"{MODEL_PATH}/artifacts/{MODEL_META_FILE}"  # where MLflow keeps the pyfunc artifact "meta"
# The study run's copy of its report (`analysis.report`).
REPORT_PATH = "report"


def role_filter(role: str) -> str:
    """MLflow's search filter for the runs of one role."""
    return f"tags.{ROLE_TAG} = '{role}'"


# Tune's experiment folder under STORAGE/NAME: every trial of a study lives in it.
EXPERIMENT = "trials"

# Files a finished trial writes into its final checkpoint (read by `study.results`, logged by the tracker).
OOF_FILE = "oof_predictions.csv"  # patient_id, fold, time, event, risk (the DPI), surv_365, surv_t<t>: out-of-fold
CURVE_FILE = "learning_curve.png"  # per-fold training loss and validation C-index over epochs

RESOURCE_METRICS = (CPU_PERCENT, RSS_GIB, GPU_UTIL, GPU_MEMORY_GIB)
EPOCH_METRICS = (EPOCH_CINDEX, FOLDS_STOPPED, TRAIN_LOSS, FOLD_EPOCHS, *RESOURCE_METRICS)
FINAL_METRICS = (OOF_CINDEX, OOF_CINDEX_LOW, OOF_CINDEX_HIGH, FOLD_CINDEX_MEAN, FOLD_CINDEX_SD, FOLDS_COLLAPSED,
                 BRIER_365, IBS, UNO_C, AUC_365)
# The metrics of every cell's run (the same names in every cell, so MLflow's runs table sorts cells by
# them and one chart compares them).
CELL_METRICS = (BBC_CINDEX, BBC_CINDEX_LOW, BBC_CINDEX_HIGH, OOF_CINDEX, OOF_CINDEX_LOW, OOF_CINDEX_HIGH,
                REFERENCE_CINDEX, FOLD_CINDEX_MEAN, FOLD_CINDEX_SD, BRIER_365, IBS, TRIALS_FINISHED, TRIALS_PRUNED,
                TRIALS_FAILED)


def fold_cindex(fold: int) -> str:
    """Name of fold `fold`'s validation C-index at an epoch."""
    return f"fold{fold}_val_cindex"


def cell_metric(cell: str, metric: MetricName) -> str:
    """Name of a cell's metric on the study run of studies made before cells had their own runs
    (read back by `analysis.study_reader` for those)."""
    return f"{cell}.{metric.name}"
