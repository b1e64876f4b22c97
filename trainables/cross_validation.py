"""K-fold cross-validation of one configuration: folds in lock-step, pooled out-of-fold metrics.

Pure training code (no Ray): `CrossValidation.step()` advances every unfinished fold by one
epoch and returns the cross-fold mean of that epoch's validation C-index
(`evaluation.metric_names.EPOCH_CINDEX`), so the caller (the Ray trainable) can report it after
every epoch and ASHA prunes configurations by their CV mean, not by a lucky fold. Lock-step
rather than fold after fold because a per-fold report would let the scheduler judge a
configuration on fold 0 alone. `cv_metrics` computes the final metrics from the pooled
out-of-fold predictions; the names and meanings are in `evaluation.metric_names`.
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

from evaluation import metric_names as names  # noqa: E402
from evaluation.metrics import SurvivalDataError, harrell_c  # noqa: E402
from evaluation.prediction_metrics import Predictions, score_predictions  # noqa: E402
from datasets.cohort import Cohort  # noqa: E402
from trainables.batches import VolumeCache  # noqa: E402
from trainables.config import TrainConfig  # noqa: E402
from trainables.fold import FoldData, FoldResult, FoldTrainer, resolve_device  # noqa: E402




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
            fold_data = FoldData.from_cohort(cohort, folds, fold, data.volumes, data.volume_rows)
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
        # A fold that stopped early counts with the epoch it selected (the one its predictions
        # come from), not with a stale last value; folds_stopped says how many did.
        per_fold = [t.best_cindex if t.stopped_early else t.history[-1]["val_cindex"] for t in self.trainers]
        metrics = {"epoch": self.epoch, names.FOLD_EPOCHS.name: self.fold_epochs,
                   names.EPOCH_CINDEX.name: float(np.nanmean(per_fold)) if np.isfinite(per_fold).any() else float("nan"),
                   names.FOLDS_STOPPED.name: sum(t.stopped_early for t in self.trainers),
                   names.TRAIN_LOSS.name: float(np.nanmean([t.history[-1]["train_loss"] for t in self.trainers]))}
        metrics.update({names.fold_cindex(k): c for k, c in enumerate(per_fold)})
        return metrics

    def rung_scores(self) -> pd.DataFrame:
        """Every patient's validation score of this epoch, by the fold model that did not train on them
        (a fold that stopped early: its selected epoch's), as this epoch's fold C-indices used them:
        columns ``patient_id``, ``fold``, ``score`` (higher = worse; comparable within a fold only).
        What the scheduler judged at a rung, kept so the headline can replay its decisions
        (`evaluation.selection.bbc_search`)."""
        frames = []
        for t in self.trainers:
            outputs = t.best_val_outputs if t.stopped_early else t.last_val_outputs
            frames.append(pd.DataFrame({"patient_id": [t.data.patient_ids[i] for i in t.data.val], "fold": t.data.fold,
                                        "score": t.head.score(outputs)}))
        return pd.concat(frames, ignore_index=True)

    def results(self) -> list[FoldResult]:
        """Every fold's result: out-of-fold predictions and fold model of its selected epoch."""
        return [t.result() for t in self.trainers]

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


def collapsed_folds(fold_cindex: dict[int, float], fold_risk_sd: dict[int, float]) -> list[int]:
    """Folds that learned nothing while the others did (`evaluation.metric_names.FOLDS_COLLAPSED`)."""
    out = []
    for fold, c in fold_cindex.items():
        others = [v for f, v in fold_cindex.items() if f != fold and np.isfinite(v)]
        if others and np.median(others) >= 0.55 and (abs(c - 0.5) <= 0.02 or fold_risk_sd.get(fold, 1.0) < 1e-6):
            out.append(fold)
    return out


def cv_metrics(oof: pd.DataFrame, eval_times, horizon: float | None = None, seed: int = 0,
               n_resamples: int = 1000) -> dict:
    """Cross-validation metrics from out-of-fold predictions (recomputable from the CSV): every
    metric of `evaluation.prediction_metrics.PREDICTION_METRICS` on the pooled table, and the
    per-fold C-indices' mean, SD and collapsed folds.

    `horizon`: the endpoint's administrative censoring [days] (365 for 1-year tasks, None for
    OS). Names and meanings: `evaluation.metric_names`; definitions: docs/concepts.md.
    """
    out = score_predictions(Predictions.from_table(oof, eval_times, horizon, seed, n_resamples),
                            required=(names.SELECTED_BY,))
    per_fold, risk_sd = {}, {}
    for fold, part in oof.groupby("fold"):
        risk_sd[int(fold)] = float(part["risk"].std(ddof=0))
        try:
            per_fold[int(fold)] = harrell_c(part["time"], part["event"], part["risk"])
        except SurvivalDataError:
            pass
    values = list(per_fold.values())
    out[names.FOLD_CINDEX_MEAN.name] = float(np.mean(values)) if values else math.nan
    out[names.FOLD_CINDEX_SD.name] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    out[names.FOLDS_COLLAPSED.name] = len(collapsed_folds(per_fold, risk_sd))
    return out
