"""Final models: the fold ensemble of a cell's best configuration.

Chosen over refitting on all development data: the K fold models already exist (no extra
training, no epoch count to guess without a validation set), and each was selected on held-out
data. The DPI of a patient is the mean over folds of the fold's risk standardised by that fold's
out-of-fold (development) mean and SD; survival probabilities are averaged over folds, each fold's
baseline hazard fitted on its own development training patients. Nothing is estimated on
external data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.cohort import Cohort, CohortSpec
from datasets.store import CohortStore
from search_spaces import TASKS
from trainables.config import TrainConfig
from trainables.fold import FoldData, FoldTrainer


@dataclass
class FoldModel:
    fold: int
    trainer: FoldTrainer
    risk_mean: float
    risk_sd: float


def load_fold_models(checkpoint_dir: Path, config: dict, store: CohortStore, task: str, folds: int,
                     seed: int, volumes: np.ndarray | None = None) -> list[FoldModel]:
    """Rebuild each fold's best model (weights_only checkpoints) with its development statistics.

    `volumes`: the task cohort's volumes if already in memory (they are read otherwise).
    """
    spec = TASKS[task]
    cohort = Cohort(store, CohortSpec(spec.filter, spec.endpoint))
    assignment = cohort.folds(folds, seed)
    train_config = TrainConfig.from_dict({**config, "device": "cpu", "num_workers": 0})
    if volumes is None:
        volumes = store.images(cohort.slots)
    models = []
    for fold in range(folds):
        data = FoldData(store, cohort.patient_ids, cohort.slots, cohort.time, cohort.event, cohort.label,
                        np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold), fold, volumes)
        trainer = FoldTrainer(data, train_config, Path(checkpoint_dir) / f"fold{fold}.pt")
        trainer.model.load_state_dict(trainer.best_state)
        train_outputs = trainer.predict(trainer.fit)
        trainer.head.fit(train_outputs, data.time[trainer.fit], data.event[trainer.fit])
        val_risk = trainer.head.risk(trainer.best_val_outputs)
        models.append(FoldModel(fold, trainer, float(val_risk.mean()), float(val_risk.std() or 1.0)))
    return models


def standardised_oof(models: list[FoldModel], oof) -> np.ndarray:
    """Development DPI: each out-of-fold risk standardised by its fold's statistics."""
    stats = {m.fold: (m.risk_mean, m.risk_sd) for m in models}
    return np.array([(r - stats[f][0]) / stats[f][1] for r, f in zip(oof["risk"], oof["fold"])])


@torch.no_grad()
def predict_external(models: list[FoldModel], store: CohortStore, slots: np.ndarray, times) -> dict[str, np.ndarray]:
    """Ensemble DPI, surv_365 and survival at `times` for `slots` of another store."""
    images = torch.from_numpy(store.images(slots).astype(np.float32))
    dpi, surv_365, curves = [], [], []
    for m in models:
        model = m.trainer.model.eval()
        outputs = torch.cat([model(images[i:i + 16]) for i in range(0, len(images), 16)]).double().numpy()
        dpi.append((m.trainer.head.risk(outputs) - m.risk_mean) / m.risk_sd)
        surv_365.append(m.trainer.head.surv_365(outputs))
        curves.append(m.trainer.head.survival(outputs, np.asarray(times, dtype=float)))
    return {"dpi": np.mean(dpi, axis=0), "surv_365": np.mean(surv_365, axis=0), "curves": np.mean(curves, axis=0)}

