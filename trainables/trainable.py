"""The Ray Tune trainable: one trial = one configuration evaluated by K-fold CV on one task.

The only Ray calls below `study` live here: `tune.report` (with checkpoints), `tune.get_checkpoint`
and `ray.get` of the shared volumes. The trial's configuration is its task (``task``) plus the
training parameters of `TrainConfig`. It reports after every epoch the mean of the folds'
validation C-index at that epoch (`evaluation.metric_names.EPOCH_CINDEX`, what ASHA prunes on),
the per-fold values and the fold-epochs spent; the last report carries ``final: True``, the
pooled out-of-fold metrics with their 95% CI (`FINAL_METRICS`), and a checkpoint holding
``oof_predictions.csv`` and ``learning_curve.png``. A restarted trial
resumes every fold from the last reported checkpoint. A trial whose loss diverges (NaN/inf)
reports ``failed`` with the reason and ends, so Tune does not retry it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from evaluation import metric_names as names
from datasets.cohort import Cohort, CohortSpec
from datasets.errors import InputError
from datasets.remote import stage_store
from trainables.config import TrainConfig
from trainables.cross_validation import CohortArrays, CrossValidation, cv_metrics
from trainables.devices import node_problem
from trainables.fold import TrainingDivergedError
from trainables.fold_model import model_file
from trainables.resource_use import ResourceSampler


# The final report, kept in the final checkpoint so that a restored finished trial repeats it.
FINAL_FILE = "final_metrics.json"


@dataclass(frozen=True)
class TrialSetup:
    """Infrastructure of a trial (never part of the search space).

    Attributes
    ----------
    store
        Absolute path or URI of the cohort store (Tune runs trials in other directories; a
        remote store is staged once per node).
    tasks
        (name, filter, endpoint) of every task a trial may be given.
    exclude
        Patient ids no trial may see (the outer test fold of nested CV).
    folds, fold_seed
        K and the seed of the folds: identical for every trial of a task.
    cpus
        Torch threads of the trial.
    checkpoint_every
        Epochs between checkpoints (the final epoch is always checkpointed).
    bootstrap
        Bootstrap resamples of the final CI.
    volumes
        Optional Ray object reference to float16 volumes of `volume_slots` (one copy per node).
    volume_slots
        Store slots of the rows of `volumes` (sorted).
    cpu_fallback
        Train on the CPU when the GPUs Ray assigned cannot be used (else the trial fails at once).
    rungs
        The scheduler's rungs (epochs); the report of each carries every patient's validation
        scores (`evaluation.metric_names.RUNG_SCORES`), so the headline can replay the search.
    """

    store: str
    tasks: tuple[tuple[str, str, str], ...]
    folds: int
    exclude: tuple[str, ...] = ()
    fold_seed: int = 0
    cpus: int = 1
    checkpoint_every: int = 1
    bootstrap: int = 1000
    volumes: Any = None
    volume_slots: tuple[int, ...] | None = None
    cpu_fallback: bool = False
    rungs: tuple[int, ...] = ()

    def cohort_spec(self, task: str) -> CohortSpec:
        for name, filter_, endpoint in self.tasks:
            if name == task:
                return CohortSpec(filter_, endpoint, self.exclude)
        raise KeyError(f"task {task!r} is not one of this study's {[t[0] for t in self.tasks]}")


def _shared_volumes(setup: TrialSetup, cohort: Cohort) -> tuple[np.ndarray | None, np.ndarray | None]:
    if setup.volumes is None:
        return cohort.store.images(cohort.slots), None
    import ray

    volumes = ray.get(setup.volumes)  # zero-copy from the node's object store
    rows = np.searchsorted(np.asarray(setup.volume_slots), cohort.slots)
    return volumes, rows


def _usable_device(train_config: TrainConfig, setup: TrialSetup) -> TrainConfig | None:
    """The trial's configuration if it can train on what Ray gave it; None after reporting the
    trial failed (GPUs it cannot use, `trainables.devices`), or on the CPU with ``cpu_fallback``."""
    import ray

    assigned = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if not assigned or train_config.device == "cpu":
        return train_config
    where, problem = node_problem(len(assigned))
    if problem is None:
        return train_config
    message = f"node {where} was given GPU {', '.join(map(str, assigned))} but cannot train on it: {problem}"
    if setup.cpu_fallback:
        print(f"warning: {message}; training on the CPU (--cpu-fallback)", flush=True)
        return replace(train_config, device="cpu")
    _report_failure(message)
    return None


def _report_failure(reason: str, epoch: int = 0, **progress) -> None:
    """End the trial as failed with its reason, instead of raising (which would make Tune retry a
    configuration that fails the same way every time)."""
    from ray import tune

    tune.report({"epoch": epoch, **progress, names.EPOCH_CINDEX.name: float("nan"), names.FAILED: reason})


def cv_trainable(config: dict, setup: TrialSetup) -> None:
    """Ray Tune function trainable (see the module docstring)."""
    from ray import tune

    import ray

    torch.set_num_threads(max(1, setup.cpus))
    task = config["task"]
    try:
        train_config = TrainConfig.from_dict({k: v for k, v in config.items() if k != "task"})
    except InputError as exc:  # study.config refuses such spaces at load; this is the last guard
        _report_failure(f"configuration: {exc}")
        return
    train_config = _usable_device(train_config, setup)
    if train_config is None:
        return
    cohort = Cohort(stage_store(setup.store), setup.cohort_spec(task))
    folds = cohort.folds(setup.folds, setup.fold_seed)
    volumes, rows = _shared_volumes(setup, cohort)
    workdir = Path(tempfile.mkdtemp(prefix="cv-trial-"))
    resources = ResourceSampler()
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(workdir))
        if (workdir / FINAL_FILE).exists():
            # Restored from its final checkpoint (the driver restarted before it recorded the end, or
            # the worker died after the last report): report the result again rather than retrain
            # folds whose optimiser states the final checkpoint no longer holds.
            tune.report(json.loads((workdir / FINAL_FILE).read_text()),
                        checkpoint=tune.Checkpoint.from_directory(str(workdir)))
            return
        # Ray exposes the trial's GPUs (CUDA_VISIBLE_DEVICES); with several, folds run in parallel on them.
        gpus = torch.cuda.device_count() if train_config.device != "cpu" else 0
        devices = [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else None
        # A fractional GPU (several trials on one) bounds how much of it the volumes may take.
        gpu_fraction = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
        try:
            cv = CrossValidation(CohortArrays(cohort, volumes, rows), folds, train_config, workdir, devices,
                                 gpu_fraction=gpu_fraction)
        except InputError as exc:  # e.g. a fold without one usable clinical input: the same on a retry
            _report_failure(str(exc))
            return
        _train(cv, setup, train_config, cohort, workdir, resources)
    finally:
        resources.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _train(cv: CrossValidation, setup: TrialSetup, train_config: TrainConfig, cohort: Cohort, workdir: Path,
           resources: ResourceSampler) -> None:
    """Epochs of every fold until the trial finishes, is stopped (Tune stops reporting back) or diverges."""
    from ray import tune

    import ray

    node = ray.get_runtime_context().get_node_id()  # tracked: which node ran (or re-ran) the trial
    train_seconds = 0.0  # time in training and validation since this (re)start, for the overhead split
    while not cv.finished:
        try:
            started = time.perf_counter()
            metrics = cv.step()
            train_seconds += time.perf_counter() - started
            metrics.update(node_id=node, train_seconds=train_seconds, **resources.take())
            if cv.epoch in setup.rungs:
                metrics[names.RUNG_SCORES] = cv.rung_scores().to_dict(orient="list")
        except TrainingDivergedError as exc:
            _report_failure(str(exc), cv.epoch, **{names.FOLD_EPOCHS.name: cv.fold_epochs})
            return
        if cv.finished:
            metrics.update(_finish(cv, setup, train_config, cohort, workdir))
            (workdir / FINAL_FILE).write_text(json.dumps(metrics))
        if cv.finished or cv.epoch % setup.checkpoint_every == 0:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(workdir)))
        else:
            tune.report(metrics)


def _finish(cv: CrossValidation, setup: TrialSetup, train_config: TrainConfig, cohort: Cohort, workdir: Path) -> dict:
    """The finished trial's records in its final checkpoint and its final metrics. The checkpoint keeps
    what analysis needs (fold models, out-of-fold predictions, learning curve), not the trainers'
    optimizer states: a finished trial is never resumed."""
    results = cv.results()
    oof = pd.concat([r.predictions for r in results], ignore_index=True)
    oof.to_csv(workdir / names.OOF_FILE, index=False)
    cv.write_learning_curve(workdir / names.CURVE_FILE)
    for result in results:
        result.model.save(workdir / model_file(result.fold))
    for trainer in cv.trainers:
        trainer.checkpoint.unlink(missing_ok=True)
    return {**cv_metrics(oof, train_config.eval_times, horizon=cohort.horizon, seed=setup.fold_seed,
                         n_resamples=setup.bootstrap), names.FINAL: True}
