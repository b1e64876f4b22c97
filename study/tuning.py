"""Ray Tune wiring: one Tuner for the whole study, in which every backbone x task x inputs cell is its own
search (its own Optuna TPE study and its own ASHA brackets).

Per-cell searches (docs/architecture.md, decision 10): every backbone gets exactly the same number of
configurations on every task (a fair comparison table), TPE models each backbone's own response
to the learning rate, the reference recipe is evaluated first in every cell, and ASHA never
compares trials of different tasks. `CellSearch` multiplexes the cells' Optuna searches and
`CellSchedule` their ASHA schedulers inside one Tuner.

One Tuner rather than one per cell: the cells' trials then run at once, so the cluster's GPUs (or
the demo's CPUs) are not left idle at the end of every cell while its last trial finishes. On a
local Ray instance (a workstation, the demo) trial actors are also reused (``reuse_actors``): a
fresh actor imports torch and all of MONAI (about 5 s on 2 cores), once per worker instead of
once per trial. Not on a cluster: there Tune then kept a finished trial's actor waiting for the
next trial, which ran on the same node after a long wait instead of on an idle one (seen with
two 1-CPU nodes: 141 s instead of 12 s, both trials on one node).

Which cell starts the next trial (`CellSearch`): the cells are filled one after another, in
order of their expected cost (the patients of their task: all-patient tasks before the
glioblastoma-only ones), each up to its cap (`per_cell_limit`), and a slot that the first cells
cannot use goes to the next. The cells therefore finish one after another and the study ends on
its cheapest trials. Cells taking turns (round robin, as before) made every cell start its last,
possibly 200-epoch, configurations in the study's final minutes: in the scheduling model of
`benchmarks/schedule_policies.py` (12 cells x 20 configurations on 24 GPUs with ASHA) filling
ends the study at 1.10x its lower bound instead of 1.22x. The price is in the search: a cell's
TPE suggests configurations 11 to 20 having seen about 6 of the cell's trials end instead of
13, and the cap bounds that (see `per_cell_limit` and docs/guides/cluster.md).

What Optuna learns from (`CellOptunaSearch`): a finished trial is COMPLETE with its pooled
out-of-fold C-index (the number the cell is ranked by); a trial that ASHA stopped is PRUNED,
carrying its per-epoch values as intermediate values up to the epoch before the one that stopped
it (Tune does not pass a stopping result to the searcher; Ray's OptunaSearch would tell Optuna it
COMPLETED with its early value, so TPE would model truncated curves as final results); a diverged
or crashed trial is FAIL. A crashed trial that a resumed study retries (``resume_errored``) and
that then ends is added to Optuna again with its new outcome.

Each cell's Optuna study is also written, trial by trial as trials end, to one Optuna journal
file (`optuna_journal_path`: ``STORAGE/NAME/optuna.journal``, one study per cell), so that
``optuna-dashboard`` and ``optuna.visualization`` open the searches during and after the study.
The in-memory study that Tune saves with its experiment state stays the searcher's own: the
journal is a copy (`StudyMirror`) that a resumed study goes on appending to, once per trial.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from evaluation import metric_names as names
from datasets.remote import is_remote
from search_spaces import Cell, Choice, LogUniform, Uniform
from study.config import StudyConfig, fixed_parameters
from study.progress import Progress
from study.resume_trust import StateRecorder, check_state, study_run_tags
from study.study_folder import SyncStudyFolder
from study.tracking import MlflowTrialCallback, StudyTracker
from trainables.trainable import TrialSetup, cv_trainable

METRIC, MODE = names.EPOCH_CINDEX.name, "max"
TPE_STARTUP_TRIALS = 10  # optuna.samplers.TPESampler's n_startup_trials default


def tune_domain(distribution):
    if isinstance(distribution, LogUniform):
        return tune.loguniform(distribution.low, distribution.high)
    if isinstance(distribution, Uniform):
        return tune.uniform(distribution.low, distribution.high)
    if isinstance(distribution, Choice):
        return tune.choice(list(distribution.values))
    raise TypeError(f"no Tune domain for {distribution!r}")


def trial_cell(trial_config: dict) -> str:
    """The cell of a trial, from its configuration."""
    return Cell.of(trial_config).name


class StudyMirror:
    """A cell's ended trials, copied into an Optuna journal file that Optuna's tools can open."""

    def __init__(self, path: str, study_name: str):
        self.path, self.study_name = path, study_name
        self._study: optuna.Study | None = None
        self._copied: set[str] = set()

    def __getstate__(self):  # pickled with the searcher's state: the file is reopened on resume
        return {"path": self.path, "study_name": self.study_name}

    def __setstate__(self, state):
        self.__init__(state["path"], state["study_name"])

    def _open(self) -> optuna.Study:
        if self._study is None:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(self.path))
            self._study = optuna.create_study(storage=storage, study_name=self.study_name, direction="maximize",
                                              load_if_exists=True)
            self._copied = {t.user_attrs.get("tune_trial_id") for t in self._study.get_trials(deepcopy=False)}
        return self._study

    def copy(self, trial_id: str, trial: optuna.trial.FrozenTrial) -> None:
        try:
            study = self._open()
            if trial_id in self._copied:
                return
            study.add_trial(optuna.trial.create_trial(
                params=trial.params, distributions=trial.distributions, value=trial.value, state=trial.state,
                intermediate_values=trial.intermediate_values, user_attrs={"tune_trial_id": trial_id}))
            self._copied.add(trial_id)
        except Exception as exc:  # a copy for viewing: never the reason a study stops
            print(f"  (Optuna journal {self.path}: {type(exc).__name__}: {exc})", flush=True)


class CellOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch with the completion policy of the module docstring."""

    mirror: StudyMirror | None = None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if math.isfinite(result.get(self.metric, math.nan)):  # a diverged trial reports NaN
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        result = result or {}
        value = result.get(names.SELECTED_BY.name)
        ended = names.outcome(result, error)
        if ended == names.FAILED_OUTCOME or (ended == names.FINISHED and not _finite(value)):
            state, value = TrialState.FAIL, None
        elif ended == names.FINISHED:
            state = TrialState.COMPLETE
        else:
            state, value = TrialState.PRUNED, None
        if trial_id in self._completed_trials:  # a retried trial: Optuna's record of it is closed
            params = self._ot_trials[trial_id].params
            self.add_evaluated_point(params, value if value is not None else math.nan, error=state == TrialState.FAIL,
                                     pruned=state == TrialState.PRUNED)
            if self.mirror is not None:
                self.mirror.copy(f"{trial_id}/retried", self._ot_study.trials[-1])
            return
        frozen = self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        self._completed_trials.add(trial_id)
        if self.mirror is not None:
            self.mirror.copy(trial_id, frozen)

    def study(self) -> optuna.Study:
        return self._ot_study


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class CellSearch(Searcher):
    """One `CellOptunaSearch` per cell, each asked until it has suggested its `num_samples`.

    A suggested configuration is the cell's fixed parameters, its task and the searched values.
    The next trial goes to the first cell, in order of `costs` (largest first; ties and no costs:
    the order of `cells`), that has configurations left and fewer than `per_cell` trials running
    (`per_cell_limit`; see the module docstring for why cells are filled rather than take turns).
    At most `max_concurrent` trials run at once (the searcher limits this itself rather than
    through Tune's ConcurrencyLimiter, so that it also controls how its state is saved).
    """

    def __init__(self, cells: dict[str, dict], spaces: dict[str, dict], references: dict[str, dict],
                 num_samples: int | dict[str, int], seed: int = 0, max_concurrent: int = 0, per_cell: int = 0,
                 journal: str | None = None, costs: dict[str, float] | None = None):
        super().__init__(metric=METRIC, mode=MODE)
        self._fixed = cells
        self._searches = {
            cell: CellOptunaSearch(space=CellOptunaSearch.convert_search_space(spaces[cell]), metric=METRIC, mode=MODE,
                                   points_to_evaluate=[references[cell]],
                                   sampler=optuna.samplers.TPESampler(seed=seed * 1000 + index))
            for index, cell in enumerate(cells)}
        if journal is not None:
            for cell, search in self._searches.items():
                search.mirror = StudyMirror(journal, cell)
        self._num_samples = num_samples if isinstance(num_samples, dict) else dict.fromkeys(cells, num_samples)
        self._suggested = {cell: 0 for cell in cells}
        self._trial_cells: dict[str, str] = {}
        self._order = sorted(cells, key=lambda cell: -(costs or {}).get(cell, 0.0))  # stable: ties keep their order
        self._max_concurrent = max_concurrent
        self._per_cell = per_cell
        self._live: set[str] = set()

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # configured per cell at construction

    def suggest(self, trial_id: str):
        if self._max_concurrent and len(self._live) >= self._max_concurrent:
            return None  # asked again when a trial ends
        waiting = False  # a cell with configurations left, held back by its cap: asked again later
        for cell in self._order:
            if self._suggested[cell] >= self._num_samples[cell]:
                continue
            if self._per_cell and sum(self._trial_cells[t] == cell for t in self._live) >= self._per_cell:
                waiting = True
                continue
            suggestion = self._searches[cell].suggest(trial_id)
            if not isinstance(suggestion, dict):  # not now; never a reason to call the study finished
                waiting = True
                continue
            self._suggested[cell] += 1
            self._trial_cells[trial_id] = cell
            self._live.add(trial_id)
            return {**self._fixed[cell], **suggestion}
        return None if waiting else Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._trial_cells:
            self._searches[self._trial_cells[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._live.discard(trial_id)
        if trial_id in self._trial_cells:
            self._searches[self._trial_cells[trial_id]].on_trial_complete(trial_id, result, error)

    def studies(self) -> dict[str, optuna.Study]:
        """Each cell's Optuna study (COMPLETE / PRUNED / FAIL trials as described above)."""
        return {cell: search.study() for cell, search in self._searches.items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__.copy(), out)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        # The temporary file is written beside, not inside, the folder Tune uploads in the
        # background: one that appears and is renamed during an upload fails the copy ("Failed to
        # open local file ... searcher-state").
        final = os.path.join(checkpoint_dir, self.CKPT_FILE_TMPL.format(session_str))
        handle, tmp = tempfile.mkstemp(prefix=".searcher-state-", dir=os.path.dirname(os.path.abspath(checkpoint_dir)))
        os.close(handle)
        self.save(tmp)
        os.replace(tmp, final)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as source:  # Tune's experiment folder: a trust boundary
            self.__dict__.update(pickle.load(source))
        # A study started before cells were filled in order of cost took turns instead (`_turn`):
        # it resumes filling them in their study order.
        self.__dict__.pop("_turn", None)
        self.__dict__.setdefault("_order", list(self._fixed))
        if isinstance(self._num_samples, int):  # saved before cells could have their own number
            self._num_samples = dict.fromkeys(self._fixed, self._num_samples)


class CellSchedule(FIFOScheduler):
    """A scheduler per cell (ASHA), made on the cell's first trial; trials run first come, first served."""

    def __init__(self, make):
        super().__init__()
        self._make = make
        self._cells: dict[str, ASHAScheduler] = {}
        self._metric, self._mode = METRIC, MODE

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _scheduler(self, trial):
        cell = trial_cell(trial.config)
        if cell not in self._cells:
            scheduler = self._make()
            scheduler.set_search_properties(self._metric, self._mode)
            self._cells[cell] = scheduler
        return self._cells[cell]

    def on_trial_add(self, tune_controller, trial):
        self._scheduler(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._scheduler(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._scheduler(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._scheduler(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{cell}: {s.debug_string()}" for cell, s in self._cells.items())


class DropStoppedCheckpoints(tune.Callback):
    """A trial that ASHA stopped never resumes: its last checkpoint (every fold's weights and
    optimiser state, the bulk of a study's storage) is deleted when it ends. Finished trials keep
    theirs (their fold models), failed ones too (for the post-mortem)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if names.outcome(last) != names.PRUNED or trial.checkpoint is None:
            return
        try:
            trial.checkpoint.filesystem.delete_dir(trial.checkpoint.path)
        except OSError:  # already gone, or storage that refuses: only space is lost
            pass


def cell_search(config: StudyConfig, costs: dict[str, float] | None = None) -> CellSearch:
    fixed, spaces, references = {}, {}, {}
    space = config.search_space
    for cell in config.cells():
        fixed[cell.name] = {"task": cell.task, **fixed_parameters(config, cell)}
        spaces[cell.name] = {k: tune_domain(d) for k, d in space.distributions_for(config.budget, cell.inputs).items()}
        references[cell.name] = space.reference_for(config.budget, cell.inputs)
    samples = {cell.name: config.samples(cell) for cell in config.cells()}
    return CellSearch(fixed, spaces, references, samples, config.seed, config.max_concurrent or 0,
                      config.per_cell_concurrent or per_cell_limit(max(samples.values())),
                      journal=str(optuna_journal_path(config)), costs=costs)


def optuna_journal_path(config: StudyConfig) -> Path:
    """The Optuna journal of the study's searches, in the study's folder (`study.study_folder`:
    ``STORAGE/NAME/optuna.journal``; with object storage the driver's local copy, uploaded there)."""
    from study.study_folder import open_folder

    return open_folder(config.storage_path, config.name).optuna_journal


def per_cell_limit(num_samples: int) -> int:
    """Trials of one cell at once: TPE's random start-up trials (Optuna's first 10) learn nothing
    from each other, so they may all run together; past them, at most half of the cell's budget
    runs before its results inform the other half. Cells are filled one after another
    (`CellSearch`), so the cap binds on the first cells and decides how much a cell's TPE has
    seen when it suggests: a lower cap lets TPE see more and leaves GPUs idle at the end
    (`benchmarks/schedule_policies.py`; ``--per-cell-concurrent`` overrides it)."""
    return max(TPE_STARTUP_TRIALS, num_samples // 2)


def cell_schedule(config: StudyConfig) -> CellSchedule | None:
    """ASHA per cell, or None (Tune's FIFO: every configuration to the end) without pruning."""
    if not config.pruning:
        return None
    protocol = config.protocol
    return CellSchedule(lambda: ASHAScheduler(time_attr="training_iteration", max_t=protocol.epochs,
                                              grace_period=protocol.grace_epochs,
                                              reduction_factor=protocol.reduction_factor))


def run_trials(config: StudyConfig, setup: TrialSetup | None, tracker: StudyTracker,
               trial_function=None, cell_costs: dict[str, float] | None = None) -> tune.ResultGrid:
    """Run (or resume) every cell's search in one Tuner; returns Tune's results of all trials.

    `cell_costs` (cell name: expected cost of its trials) orders the cells (`CellSearch`).
    `trial_function` replaces the cross-validation trainable (`benchmarks.cluster_sim` runs the
    study's real driver, searchers, schedulers and tracking with a stand-in that sleeps)."""
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    function = trial_function or tune.with_parameters(cv_trainable, setup=setup)
    trainable = tune.with_resources(function, resources)
    path = tune_path(config)
    if tune.Tuner.can_restore(path):
        if not config.trust_storage:  # the last moment before Tune unpickles them
            check_state(path, study_run_tags(tracker.tracking_uri, config.name))
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True).fit()
    tuner = tune.Tuner(
        trainable,
        param_space={},  # every configuration comes whole from CellSearch
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=cell_search(config, cell_costs),
                                    scheduler=cell_schedule(config),
                                    num_samples=config.trials,
                                    reuse_actors=local_ray(config)),
        run_config=tune.RunConfig(
            name=names.EXPERIMENT, storage_path=path.rsplit("/", 1)[0],
            callbacks=[MlflowTrialCallback(tracker, config.protocol.epochs), DropStoppedCheckpoints(),
                       StateRecorder(tracker.tracking_uri, tracker.parent_run_id),
                       Progress(config.trials, config.protocol.folds * config.protocol.epochs),
                       SyncStudyFolder(config.storage_path, config.name), JsonLoggerCallback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=0),
    )
    return tuner.fit()


def tune_path(config: StudyConfig) -> str:
    """The study's Tune experiment folder (a local path or a URI)."""
    return f"{config.storage_path.rstrip('/')}/{config.name}/{names.EXPERIMENT}"


def local_ray(config: StudyConfig) -> bool:
    """Whether the study runs on a private local Ray instance (no --address, no RAY_ADDRESS)."""
    return config.address is None and not os.environ.get("RAY_ADDRESS")


def experiment_dir(config: StudyConfig) -> Path | None:
    if is_remote(config.storage_path):
        return None
    return Path(config.storage_path) / config.name
