"""K-fold cross-validation of one configuration: folds in lock-step, pooled out-of-fold metrics.

Pure training code (no Ray): `CrossValidation.step()` advances every unfinished fold by one
epoch and returns the cross-fold mean validation C-index, so the caller (the Ray trainable) can
report it after every epoch and ASHA prunes configurations by their CV mean, not by a lucky
fold. Lock-step rather than fold after fold because a per-fold report would let the scheduler
judge a configuration on fold 0 alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.metrics import (  # noqa: E402
    SurvivalDataError,
    bootstrap_ci,
    brier_score,
    cumulative_dynamic_auc,
    harrell_c,
    integrated_brier_score,
    uno_c,
)
from datasets.cohort import Cohort  # noqa: E402
from trainables.batches import VolumeCache  # noqa: E402
from trainables.config import TrainConfig  # noqa: E402
from trainables.fold import FoldData, FoldTrainer, resolve_device  # noqa: E402

OOF_FILE = "oof_predictions.csv"
CURVE_FILE = "learning_curve.png"


@dataclass
class CohortArrays:
    """Per-patient arrays of a task cohort plus, optionally, its volumes already in memory."""

    cohort: Cohort
    volumes: np.ndarray | None = None
    volume_rows: np.ndarray | None = None


class CrossValidation:
    """The K folds of one configuration on one cohort, checkpointed under `directory`.

    With several `devices` (a trial holding several GPUs), fold k trains on device k mod D and
    the devices step their folds in parallel threads (CUDA kernels release the GIL). Folds in
    parallel rather than DDP inside a fold: folds never communicate, so D GPUs give D times the
    throughput with no gradient all-reduce, no change to the effective batch size (which would
    change the recipe being searched) and nothing to configure; the cost is idle GPUs when D
    does not divide K (choose 1, 2, 5 or 10 GPUs per trial for 10 folds). `gpu_fraction` is the
    share of a GPU the trial holds (below 1 when trials share one); it bounds how much GPU memory
    the volumes may take (`trainables.batches.VolumeCache`).
    """

    def __init__(self, data: CohortArrays, folds: np.ndarray, config: TrainConfig, directory: Path,
                 devices: Sequence[str] | None = None, gpu_fraction: float = 1.0):
        cohort = data.cohort
        self.config, self.directory = config, Path(directory)
        self.cohort = cohort
        k = int(folds.max()) + 1
        self.devices = list(devices) if devices else [None]
        # One copy of the volumes per device, read by all of its folds (on a GPU: uploaded once).
        caches = {}
        if data.volumes is not None:
            for device in set(self.devices):
                where = torch.device(device) if device else resolve_device(config.device)
                caches[device] = VolumeCache(data.volumes, where, config.volume_placement, gpu_fraction)
        self.trainers = []
        for fold in range(k):
            fold_data = FoldData(cohort.store, cohort.patient_ids, cohort.slots, cohort.time, cohort.event,
                                 cohort.label, np.flatnonzero(folds != fold), np.flatnonzero(folds == fold), fold,
                                 data.volumes, data.volume_rows)
            device = self.devices[fold % len(self.devices)]
            self.trainers.append(FoldTrainer(fold_data, config, self.directory / f"fold{fold}.pt",
                                             device=device, volume_cache=caches.get(device)))

    @property
    def epoch(self) -> int:
        return min(t.epoch for t in self.trainers)

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.trainers)

    @property
    def fold_epochs(self) -> int:
        """Fold-epochs trained so far (the unit of compute)."""
        return sum(t.epoch for t in self.trainers)

    def step(self) -> dict:
        """One epoch of every unfinished fold; returns the epoch's metrics."""
        if len(self.devices) == 1:
            for trainer in self.trainers:
                if not trainer.finished:
                    trainer.step()
        else:
            lanes = [self.trainers[d::len(self.devices)] for d in range(len(self.devices))]

            def run(lane):
                for trainer in lane:
                    if not trainer.finished:
                        trainer.step()

            with ThreadPoolExecutor(len(lanes)) as pool:
                for done in [pool.submit(run, lane) for lane in lanes]:
                    done.result()  # re-raises a fold's error (e.g. divergence) here
        per_fold = [t.history[-1]["val_cindex"] for t in self.trainers]
        metrics = {"epoch": self.epoch, "fold_epochs": self.fold_epochs,
                   "cv_cindex": float(np.nanmean(per_fold)) if np.isfinite(per_fold).any() else float("nan"),
                   "train_loss": float(np.nanmean([t.history[-1]["train_loss"] for t in self.trainers]))}
        metrics.update({f"fold{k}_cindex": c for k, c in enumerate(per_fold)})
        return metrics

    def predictions(self) -> pd.DataFrame:
        """Out-of-fold predictions of every fold's best epoch, one row per patient."""
        return pd.concat([t.result().predictions for t in self.trainers], ignore_index=True)

    def write_learning_curve(self, path: Path) -> None:
        fig, (ax_loss, ax_c) = plt.subplots(1, 2, figsize=(9, 3.2))
        for t in self.trainers:
            epochs = [h["epoch"] + 1 for h in t.history]
            ax_loss.plot(epochs, [h["train_loss"] for h in t.history], label=f"fold {t.data.fold}", lw=1)
            ax_c.plot(epochs, [h["val_cindex"] for h in t.history], lw=1)
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss per fold")
        ax_c.set(xlabel="epoch", ylabel="validation C-index", title="validation C-index per fold")
        ax_c.axhline(0.5, color="grey", lw=0.5, ls="--")
        if len(self.trainers) <= 10:
            ax_loss.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def cv_metrics(oof: pd.DataFrame, eval_times, seed: int = 0, n_resamples: int = 1000) -> dict:
    """Cross-validation metrics from out-of-fold predictions (recomputable from the CSV).

    ``cindex`` with ``cindex_low``/``cindex_high``: Harrell's C over all out-of-fold predictions
    with a percentile bootstrap 95% CI; ``cindex_fold_mean``/``_sd``: per-fold C-indices;
    ``brier_365``: IPCW Brier score at 365 days; ``ibs``: integrated over `eval_times` inside the
    follow-up; ``uno_c``: truncated at the 90th percentile of times; ``auc_365``.
    """
    time, event, risk = oof["time"].to_numpy(float), oof["event"].to_numpy(int), oof["risk"].to_numpy(float)
    out: dict[str, float] = {}
    estimate = bootstrap_ci(harrell_c, time, event, risk, n_resamples=n_resamples, seed=seed)
    out.update(cindex=estimate.value, cindex_low=estimate.low, cindex_high=estimate.high)
    per_fold = []
    for _, part in oof.groupby("fold"):
        try:
            per_fold.append(harrell_c(part["time"], part["event"], part["risk"]))
        except SurvivalDataError:
            pass
    out["cindex_fold_mean"] = float(np.mean(per_fold)) if per_fold else math.nan
    out["cindex_fold_sd"] = float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else math.nan
    out["brier_365"] = float(brier_score(time, event, oof["surv_365"].to_numpy(float), 365.0)[0])
    times = [t for t in eval_times if t < time.max()]
    if len(times) >= 2:
        columns = [f"surv_t{int(t)}" for t in times]
        out["ibs"] = integrated_brier_score(time, event, oof[columns].to_numpy(float), times)
    else:
        out["ibs"] = math.nan
    for name, fn in (("uno_c", lambda: uno_c(time, event, risk, tau=float(np.quantile(time, 0.9)))),
                     ("auc_365", lambda: float(cumulative_dynamic_auc(time, event, risk, [365.0])[0]))):
        try:
            out[name] = float(fn())
        except SurvivalDataError:
            out[name] = math.nan
    return out
