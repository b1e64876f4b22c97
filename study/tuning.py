"""Ray Tune wiring: one Tuner per backbone x task cell, OptunaSearch (TPE) + ASHA.

One Optuna study per cell rather than one joint study with the backbone as a categorical: every
backbone then gets exactly the same number of configurations on every task (a fair comparison
table), TPE models each backbone's own response to the learning rate, and the reference recipe is
evaluated first in every cell (`points_to_evaluate`, which works with a Tune search space; Ray
ignores it with define-by-run spaces, ray#35319).
"""

from __future__ import annotations

from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces import TASKS, Choice, LogUniform, SearchSpace, Uniform
from study.config import StudyConfig
from study.tracking import MlflowTrialCallback, StudyTracker
from trainables.trainable import TrialSetup, cv_trainable

METRIC, MODE = "cv_cindex", "max"


def tune_domain(distribution):
    if isinstance(distribution, LogUniform):
        return tune.loguniform(distribution.low, distribution.high)
    if isinstance(distribution, Uniform):
        return tune.uniform(distribution.low, distribution.high)
    if isinstance(distribution, Choice):
        return tune.choice(list(distribution.values))
    raise TypeError(f"no Tune domain for {distribution!r}")


def head_for(config: StudyConfig, task: str) -> str:
    spec = TASKS[task]
    return config.protocol.os_head if spec.endpoint == "os" else spec.head


def fixed_parameters(config: StudyConfig, backbone: str, task: str) -> dict:
    """Training parameters held constant in a cell (they are params of every trial run)."""
    protocol = config.protocol
    fixed = {"backbone": backbone, "head": head_for(config, task), "width": protocol.width, "depth": protocol.depth,
             "epochs": protocol.epochs, "seed": config.seed}
    fixed.update(protocol.fixed)
    overlap = set(fixed) & set(config.search_space.distributions_for(config.budget))
    if overlap:
        raise ValueError(f"space {config.space}: {sorted(overlap)} are both fixed and searched")
    return fixed


def param_space(config: StudyConfig, backbone: str, task: str) -> dict:
    space: SearchSpace = config.search_space
    return {**fixed_parameters(config, backbone, task),
            **{k: tune_domain(d) for k, d in space.distributions_for(config.budget).items()}}


def cell_name(backbone: str, task: str) -> str:
    return f"{backbone}__{task}"


def run_cell(config: StudyConfig, backbone: str, task: str, setup: TrialSetup, tracker: StudyTracker,
             cell_index: int) -> tune.ResultGrid:
    """Run (or resume) the search of one cell; returns Tune's results."""
    protocol = config.protocol
    experiment_root = f"{config.storage_path.rstrip('/')}/{config.name}"
    name = cell_name(backbone, task)
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(cv_trainable, setup=setup), resources)
    path = f"{experiment_root}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    searcher = OptunaSearch(
        metric=METRIC, mode=MODE, points_to_evaluate=[config.search_space.reference_for(config.budget)],
        sampler=optuna.samplers.TPESampler(seed=config.seed * 1000 + cell_index))
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=protocol.epochs,
                              grace_period=protocol.grace_epochs, reduction_factor=protocol.reduction_factor
                              ) if config.pruning else None  # None: Tune's FIFO, every configuration to the end
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(config, backbone, task),
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                    num_samples=config.num_samples, max_concurrent_trials=config.max_concurrent),
        run_config=tune.RunConfig(
            name=name, storage_path=experiment_root,
            callbacks=[MlflowTrialCallback(tracker, backbone, task, protocol.epochs)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=0),
    )
    return tuner.fit()


def experiment_dir(config: StudyConfig) -> Path | None:
    if "://" in config.storage_path:
        return None
    return Path(config.storage_path) / config.name
