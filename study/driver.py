"""The study, step by step (`run_study`): data and cluster, where its files go, tracking, trials,
what the cells found, then the results and how the study ended. `study.run` is its command line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import quote

from datasets.clinical_features import IMAGE_CLINICAL
from datasets.environment import seconds
from datasets.errors import StudyError
from datasets.remote import check_writable
from datasets.store import CohortStore
from evaluation import metric_names as names
from search_spaces import TASKS
from study.config import StudyConfig
from study.data import check_external, excluded_patients, open_data, read_volumes, task_cohorts
from study.preflight import check_free_space

# Tune's legacy console output honours verbose=0 (the new engine prints tables regardless); the
# study prints its own one line per trial instead.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Tune's own CSV and TensorBoard logs of every trial duplicate what MLflow holds (and the scores a
# trial reports at its rungs would fill them): only its result.json is kept (`study.tuning`).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# MLflow's HTTP client retries a lost server with exponential back-off for about two minutes per
# call, blocking Tune's event loop; the study's own journal (study.tracking) does the waiting.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# One "View run at" line per trial drowns the study's own progress lines; it prints the UI link.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the headline reads the trials' records back


def catch_up_s() -> float:
    """How long the end of a study waits for a tracking server that went down before leaving its
    records in the journal for --resume (``STUDY_TRACKING_CATCH_UP_S``, default 300; checked by
    `study.config.resolve` at the entry)."""
    return seconds("STUDY_TRACKING_CATCH_UP_S", 300.0)


PACKAGES = ("torch", "monai", "ray", "optuna", "mlflow", "zarr", "numpy", "pandas", "lifelines", "pycox")


class TrackingIncomplete(StudyError):
    """The study ran, but some tracking records are still waiting in the journal (exit code 3)."""


class StudyInterrupted(StudyError):
    """Ray lost the driver's node or raylet mid-study; the study resumes from its last state (exit 3)."""


def run_study(config: StudyConfig) -> "StudyOutcome":  # noqa: F821
    """The study, step by step: data and cluster, where its files go, tracking, trials, what the
    cells found, then the results and how the study ended."""
    from study.results import StudyOutcome
    from study.study_folder import open_folder

    quiet_libraries()
    started = time.perf_counter()
    config, store, cohorts = open_data_and_cluster(config)
    volumes_array, volume_slots = read_volumes(store, cohorts, config.share_volumes)
    timings = {"data_s": time.perf_counter() - started}  # demo cohort build (first run), staging, reading volumes
    results_dir, journal = prepare_storage(config, store)
    folder = open_folder(config.storage_path, config.name)
    try:
        tracker = open_tracking(config, store, journal)
        setup = trial_setup(config, store, volumes_array, volume_slots)
        del volumes_array  # the object store holds the one copy of this node
        timings.update(startup_s=time.perf_counter() - started - timings["data_s"], tune_s=0.0, trial_train_s=0.0,
                       trial_reports=0)
        cells, files, status = [], {}, "FAILED"
        try:
            grid = train(config, setup, tracker, timings, cohorts)
            cells = conclude_cells(config, grid, store, cohorts, tracker)
            status = "FINISHED"
        finally:
            files, delivered = close_tracking(config, tracker, cells, status, results_dir)
            timings.update(tracking_s=tracker.seconds, wall_s=time.perf_counter() - started)
            write_timings(timings, results_dir)
            folder.push(force=True)
    finally:
        folder.release()
    print_results(config, cells, files, timings, tracker.experiment_id)
    check_outcome(config, cells, delivered, tracker, open_folder(config.storage_path, config.name).where(journal))
    return StudyOutcome(files.get("table"), cells, store)


def quiet_libraries() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def open_data_and_cluster(config: StudyConfig) -> tuple[StudyConfig, CohortStore, dict]:
    """The store and its task cohorts, checked (external stores too); Ray joined; the study described."""
    config, store = open_data(config)
    cohorts = task_cohorts(config, store)
    check_external(config, store)
    config, _ = join_cluster(config)
    from study.data import shares_volumes, study_slots, volume_bytes
    from study.preflight import check_object_stores

    size = volume_bytes(store, cohorts)
    check_object_stores(config, size, len(study_slots(cohorts)), shares_volumes(config.share_volumes, size))
    print(describe(config, store, cohorts), flush=True)
    return config, store, cohorts


def join_cluster(config: StudyConfig) -> tuple[StudyConfig, list]:
    """Start or join Ray, say what it has, refuse a trial no node can hold (exit 2), and fill in
    --max-concurrent (every trial slot of the nodes) when it was not given."""
    from study.preflight import check_trial_fits, describe_cluster, node_shapes, probe_gpu_nodes, trial_slots
    from study.tuning import local_ray

    start_ray(config)
    shapes, autoscaler_known = node_shapes()
    print(describe_cluster(shapes), flush=True)
    check_trial_fits(config, shapes, autoscaler_known, local_ray(config))
    probe_gpu_nodes(config)
    if config.max_concurrent is None:
        # Where the autoscaler keeps its node types to itself (the launcher's), the nodes up now are
        # not the cluster: no limit, so that pending trials ask it for more nodes.
        known = local_ray(config) or autoscaler_known
        config = replace(config, max_concurrent=trial_slots(config, shapes) if known
                         else config.trials)
    return config, shapes


def start_ray(config: StudyConfig) -> None:
    """Join the cluster (--address, or RAY_ADDRESS as set by `ray job submit` and KubeRay), else a
    fresh local instance (never one that `ray start` left behind in /tmp/ray)."""
    import ray

    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS") or "local"
        source = "--address" if config.address else "RAY_ADDRESS"
        dashboard = config.dashboard and address == "local"  # a cluster's dashboard is its head's
        try:
            context = ray.init(address=address, include_dashboard=dashboard, log_to_driver=False,
                               configure_logging=True, logging_level="ERROR",
                               **({"dashboard_host": "127.0.0.1"} if dashboard else {}))
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise StudyError(f"{source} {address}: Ray cannot be joined ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300]})") from None
        if dashboard and getattr(context, "dashboard_url", None):
            print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)


def ray_location(config: StudyConfig) -> str:
    address = config.address or os.environ.get("RAY_ADDRESS")
    return f"at {address}" if address else "local"


def describe(config: StudyConfig, store: CohortStore, cohorts) -> str:
    from study.config import fixed_parameters

    protocol = config.protocol
    lines = [f"study {config.name}: space {config.space} ({config.search_space.summary})",
             f"  budget {config.budget}: {protocol.folds} folds, up to {protocol.epochs} epochs, "
             + (f"ASHA grace {protocol.grace_epochs} reduction {protocol.reduction_factor}, " if config.pruning
                else "no pruning, ") +
             f"backbone width {protocol.width} depth {protocol.depth}",
             "  searched: " + ", ".join(f"{k} {d}" for k, d in config.search_space.distributions_for(config.budget).items()),
             f"  reference recipe (first trial of every cell): {config.search_space.reference_for(config.budget)}",
             f"  data: {store.path} ({len(store.usable())} usable patients, sequences {store.sequences}, "
             f"shape {list(store.shape)})",
             f"  resources: {config.cpus_per_trial} CPU and {config.gpus_per_trial:g} GPU per trial, "
             f"at most {config.max_concurrent or 'as many as the nodes hold'} at once, "
             f"Ray {ray_location(config)}",
             f"  tracking: {config.tracking_uri}; storage: {config.storage_path}/{config.name}",
             f"  cells: {len(config.backbones)} backbones x {len(config.tasks)} tasks x {len(config.inputs)} inputs "
             f"({', '.join(config.inputs)}) x {config.num_samples} configurations"
             + "".join(f", {label} {n}" for label, n in config.cell_samples.items())
             + f" = {config.trials} trials"]
    if IMAGE_CLINICAL in config.inputs:
        lines.append(f"  image+clinical networks see: {', '.join(config.clinical_inputs)} (encoded on each training "
                     "fold; missing values get an indicator)")
    gpus = config.gpus_per_trial
    if gpus > 1:
        idle = "" if protocol.folds % int(gpus) == 0 else (
            f" (warning: {protocol.folds} folds do not divide evenly over {int(gpus)} GPUs; some GPUs idle "
            "in the last round)")
        lines.append(f"  each trial trains its folds in parallel on its {int(gpus)} GPUs{idle}")
    lines.append("  volumes: " + ("one in-memory copy per node, shared by its trials" if config.share_volumes
                                  else "each trial reads its own copy"))
    for task, (cohort, folds) in cohorts.items():
        events = [int(cohort.event[folds == k].sum()) for k in range(protocol.folds)]
        sizes = [int((folds == k).sum()) for k in range(protocol.folds)]
        head = fixed_parameters(config, config.cells()[0]._replace(task=task))["head"]
        lines.append(f"  task {task} ({TASKS[task].filter}, {TASKS[task].endpoint}, {head} head): "
                     f"{len(cohort)} patients, {int(cohort.event.sum())} events; fold sizes {sizes}, events {events}")
    return "\n".join(lines)


def prepare_storage(config: StudyConfig, store: CohortStore) -> tuple[Path, Path]:
    """Check the storage path (a study to resume, room for the checkpoints, writable) and open the
    study's folder on it (`study.study_folder`); returns the folder the driver writes the results
    to and the tracking journal (written on every record: driver-local, uploaded with object storage)."""
    from study.study_folder import open_folder
    from study.tuning import experiment_dir

    local_experiments = experiment_dir(config)
    if config.resume and local_experiments is not None and not local_experiments.is_dir():
        raise StudyError(f"--resume: there is no study {config.name!r} under {config.storage_path} to resume")
    needed = check_free_space(config, len(store.sequences))
    check_writable(config.storage_path)
    folder = open_folder(config.storage_path, config.name)
    folder.acquire()  # one driver per study, from here to the end of run_study
    print(f"  checkpoints: about {needed / 2**30:.2f} GiB kept under {config.storage_path}", flush=True)
    return folder.local, folder.tracking_journal


def open_tracking(config: StudyConfig, store: CohortStore, journal: Path):
    """The study's MLflow run, started or resumed. On a resume Tune's state files are checked first
    (a refusal changes nothing in MLflow) and again right before Tune restores them
    (`study.tuning.run_trials`)."""
    from ray import tune

    from study.resume_trust import check_state, study_run_tags
    from study.tuning import tune_path

    tracker = start_tracking(config, store, journal)
    record = manifest(config, store)
    earlier = study_run_tags(config.tracking_uri, config.name)
    check_same_store(config, earlier, record["data_store_sha256"])
    if not config.trust_storage and tune.Tuner.can_restore(tune_path(config)):
        check_state(tune_path(config), earlier)
    tags = {"space": config.space, "budget": config.budget, "data_store_sha256": record["data_store_sha256"],
            "data_store_hash": STORE_HASH, "git_revision": record["git_revision"],
            **{f"version.{k}": v for k, v in record["packages"].items()}}
    tracker.start(tags, {"space": config.space, "budget": config.budget, "backbones": ",".join(config.backbones),
                         "tasks": ",".join(config.tasks), "inputs": ",".join(config.inputs),
                         "clinical_inputs": ",".join(config.clinical_inputs), "num_samples": config.num_samples,
                         **{f"num_samples.{label.replace('+', '-')}": n for label, n in config.cell_samples.items()},
                         "seed": config.seed, **({"repeat": config.repeat, "fold_seed": config.fold_seed}
                                                 if config.repeats else {}),
                         "folds": config.protocol.folds, "max_epochs": config.protocol.epochs},
                  {names.CONFIG_FILE: json.dumps(config.to_dict(), indent=1),
                   "manifest.json": json.dumps(record, indent=1)})
    from study.tracking.tracker import cell_tags

    for cell in config.cells():  # the cells' runs, nested under the study run, before any trial
        tracker.cell_run(cell.name, cell.label, cell_tags(cell))
    return tracker


# What `CohortStore.sha256` covers (tag ``data_store_hash``): 2 = attributes, manifest (each
# patient's checksum of its voxels), clinical arrays and done flags; studies without the tag hashed
# attributes and manifest only.
STORE_HASH = "2"


def check_same_store(config: StudyConfig, earlier: dict, digest: str) -> None:
    """A resumed study must train on the store it started on: otherwise finished trials' predictions
    and new outcomes would be mixed into one result (StudyError, exit 2)."""
    recorded = earlier.get("data_store_sha256")
    if not recorded:
        return
    if earlier.get("data_store_hash") != STORE_HASH:
        print(f"  warning: study {config.name} was started by a version whose store hash covered attributes and "
              "manifest only; a change of the store's clinical values cannot be detected", flush=True)
        return
    if recorded != digest:
        raise StudyError(f"the cohort store {config.data} changed since study {config.name} started (its hash "
                         f"{digest[:12]} is not the recorded {recorded[:12]}: patients, outcomes, clinical values or "
                         "voxels differ). Resuming would mix the finished trials' predictions with the new data: "
                         "restore the store the study started on, or start a new study with another --name")


def start_tracking(config: StudyConfig, store: CohortStore, journal: Path):
    """The study's MLflow experiment and parent run (resumed if it exists)."""
    from study.tracking import StudyTracker

    tracker = StudyTracker(config.tracking_uri, config.name, journal, trust_storage=config.trust_storage)
    try:
        tracker.check()
    except Exception as exc:
        raise StudyError(f"MLflow tracking store {config.tracking_uri} cannot be reached ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]}); start it or pass --tracking-uri") from exc
    return tracker


def git_revision() -> str:
    """The project's commit, or "unknown" outside a git checkout (an installed wheel)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def development_cutoff(checkpoint: Path) -> float:
    """The risk groups' cut-off of a cell's model: the median out-of-fold DPI of its development
    patients (the report's Kaplan-Meier split, `analysis.sections`)."""
    import pandas as pd

    return float(pd.read_csv(checkpoint / names.OOF_FILE)["risk"].median())


def dpi_scale(checkpoint: Path, folds: int, store: CohortStore, cohort) -> dict:
    """The fold ensemble's development scale (`trainables.ensemble.DevelopmentScale`), as the report
    computes it: the model's DPI for a new patient is the report's for the same patient."""
    import pandas as pd

    from trainables.ensemble import development_scale, load_fold_models

    oof = pd.read_csv(checkpoint / names.OOF_FILE)["risk"].to_numpy(float)
    scale = development_scale(load_fold_models(checkpoint, folds), store, cohort.slots, cohort.clinical, oof)
    return scale.to_dict()


def manifest(config: StudyConfig, store: CohortStore) -> dict:
    """Reproducibility record: config, data-store hash, git revision, package versions."""
    revision = git_revision()
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = "not installed"
    return {"config": config.to_dict(), "data_store_sha256": store.sha256(), "git_revision": revision,
            "packages": packages, "python": sys.version.split()[0]}


def trial_setup(config: StudyConfig, store: CohortStore, volumes_array, volume_slots):
    """What every trial needs besides its configuration; the volumes go to Ray's object store."""
    import ray

    from trainables.trainable import TrialSetup

    volumes = ray.put(volumes_array) if volumes_array is not None else None
    return TrialSetup(store=str(config.data), tasks=tuple((t, TASKS[t].filter, TASKS[t].endpoint) for t in config.tasks),
                      folds=config.protocol.folds, exclude=excluded_patients(config, store), fold_seed=config.fold_seed,
                      cpus=config.cpus_per_trial, checkpoint_every=config.protocol.checkpoint_every, volumes=volumes,
                      volume_slots=volume_slots if volumes is not None else None, cpu_fallback=config.cpu_fallback,
                      rungs=asha_rungs(config))


def asha_rungs(config: StudyConfig) -> tuple[int, ...]:
    """The epochs at which the study's ASHA compares a cell's trials (Ray's own rung arithmetic); ()
    without pruning."""
    if not config.pruning:
        return ()
    from ray.tune.schedulers.async_hyperband import _Bracket

    protocol = config.protocol
    return tuple(sorted(int(m) for m, _ in _Bracket(protocol.grace_epochs, protocol.epochs,
                                                      protocol.reduction_factor, 0)._rungs if m < protocol.epochs))


def train(config: StudyConfig, setup, tracker, timings: dict, cohorts: dict):
    """Every cell's search in one Tuner, the cells with most work (patients x configurations) first;
    a lost node or raylet becomes `StudyInterrupted` (exit 3)."""
    from study.tuning import run_trials

    print(f"Training {config.trials} trials ({len(config.cells())} cells, each its own "
          f"search), at most {config.max_concurrent} at once:", flush=True)
    started = time.perf_counter()
    try:
        grid = run_trials(config, setup, tracker,
                          cell_costs={cell.name: float(len(cohorts[cell.task][0]) * config.samples(cell))
                                      for cell in config.cells()})
    except SystemExit as exc:  # a raylet that dies under the driver: a SystemExit inside ray.wait
        if _driver_node_alive():
            raise
        raise _interrupted(config, exc, time.perf_counter() - started) from None
    if any(result.error is not None for result in grid) and not _driver_node_alive():
        raise _interrupted(config, None, time.perf_counter() - started)  # its trials lost their node: resumable
    timings["tune_s"] = time.perf_counter() - started
    for result in grid:
        timings["trial_train_s"] += float((result.metrics or {}).get("train_seconds", 0.0))
        timings["trial_reports"] += int((result.metrics or {}).get("training_iteration", 0))
    return grid


def _driver_node_alive() -> bool:
    """Whether the Ray node the driver runs on (its raylet) still runs tasks. The cluster's view
    of a node lags its death by the health checks' period; a task without resources does not."""
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def probe() -> bool:
        return True

    try:
        own = ray.get_runtime_context().get_node_id()
        if not any(node["NodeID"] == own and node["Alive"] for node in ray.nodes()):
            return False
        return ray.get(probe.remote(), timeout=60)
    except Exception:
        return False


def _interrupted(config: StudyConfig, cause: BaseException | None, seconds: float) -> StudyInterrupted:
    how = f" ({type(cause).__name__} {cause})" if cause is not None else ""
    return StudyInterrupted(f"Ray lost this study's node or raylet{how} after {seconds:.0f} s of trials; finished "
                            f"trials and the running ones' last checkpoints are kept under {config.storage_path}")


def conclude_cells(config: StudyConfig, grid, store: CohortStore, cohorts: dict, tracker) -> list:
    """Per cell, the selected configuration with its BBC-CV estimate and (synthetic stores) the
    oracle C-index; logged to the study run with the trials' resource summary and each cell's model."""
    from analysis.oracle import oracle_cindices
    from study.results import resource_summary, summarise

    cells = order_cells(config, summarise(grid, config.search_space, config.budget, seed=config.seed))
    try:
        oracles = oracle_cindices(store, {task: cohort for task, (cohort, _) in cohorts.items()})
    except Exception as exc:  # an extra for synthetic stores: never the reason a study fails
        print(f"  (no oracle C-index: {type(exc).__name__}: {exc})")
        oracles = {}
    replay_search(config, tracker, cells)
    for cell in cells:
        cell.oracle = oracles.get(cell.task, {})
        log_cell(tracker, cell)
    tracker.log_metrics(None, resource_summary(grid))
    log_comparison(config, tracker, cells)
    log_models(config, tracker, cells, store, cohorts)
    return cells


def replay_search(config: StudyConfig, tracker, cells: list) -> None:
    """Each cell's headline pays for its whole search: BBC-CV replaying ASHA's decisions as well as
    the final choice (`study.headline`), from the trial records in MLflow; where it cannot (no
    pruning, no rung records, the tracking store unreachable) BBC-CV over the finished
    configurations stays, and the results table says which."""
    from study.headline import headline

    if not config.pruning:
        return
    if not tracker.catch_up(catch_up_s()):
        print("  (the headline pays for the final choice only: the tracking store holding the search's records is "
              "unreachable)", flush=True)
        return
    for cell in cells:
        if not cell.finished:
            continue
        found = headline(tracker.client, tracker.experiment_id, cell.cell, config.protocol, config.pruning,
                         seed=config.seed)
        if found.replayed:
            cell.bbc, cell.bbc_replayed = found.estimate, True
        else:
            print(f"  ({cell.label}: the headline pays for the final choice only: {found.why})", flush=True)


def log_cell(tracker, cell) -> None:
    """The cell's run: its numbers under the same names as every cell's, its selected configuration as
    params, and its end (FINISHED, or FAILED when none of its trials finished)."""
    from search_spaces import Cell
    from study.tracking.tracker import cell_tags

    key = Cell(cell.backbone, cell.task, cell.inputs)
    tracker.cell_run(cell.cell, key.label, cell_tags(key))
    tracker.log_metrics(cell.cell, cell.metrics())
    if cell.best_config:
        tracker.cell_params(cell.cell, cell.best_config)
        tracker.set_tags(cell.cell, {"selected_trial": cell.best_trial, "headline": cell.headline_pays_for})
    tracker.terminate(cell.cell, "FINISHED" if cell.finished else "FAILED")


def log_comparison(config: StudyConfig, tracker, cells: list) -> None:
    """The study run's figure comparing the cells: each headline with its interval, and on a
    synthetic cohort the C-index of what its images can tell and of its true total predictor."""

    import pandas as pd

    from analysis.figures import COMPARISON_FILE, cell_forest
    from study.study_folder import open_folder

    rows = pd.DataFrame([{"task": c.task, "label": c.label,
                          **({"value": c.bbc.value, "low": c.bbc.low, "high": c.bbc.high} if c.bbc is not None else
                             {"value": math.nan, "low": math.nan, "high": math.nan})} for c in cells])
    if rows.empty:
        return
    oracles = {c.task: c.oracle for c in cells if c.oracle}
    path = open_folder(config.storage_path, config.name).local / COMPARISON_FILE
    try:
        cell_forest(rows, oracles, f"study {config.name}: each cell's headline C-index", path)
    except Exception as exc:  # a figure: never the reason a study fails
        print(f"  (no comparison figure: {type(exc).__name__}: {exc})", flush=True)
        return
    tracker.log_artifact(None, path)


def order_cells(config: StudyConfig, cells: list) -> list:
    """Cells in the study's order (task-major), whatever order their trials finished in."""
    rank = {cell.name: i for i, cell in enumerate(config.cells())}
    return sorted(cells, key=lambda c: rank.get(c.cell, len(rank)))


def log_models(config: StudyConfig, tracker, cells: list, store: CohortStore, cohorts: dict) -> None:
    """Each cell's selected configuration as an MLflow pyfunc model under the study run (registered
    with --register-models). Models go straight to MLflow, not through the journal (they are
    folders of fold models): a tracking store that is down gets the same wait as the end of the
    study, and models it still cannot take are left to ``--resume`` (exit 3, `check_outcome`). A
    model that cannot be logged for another reason is said, never the reason a study fails."""
    from mlflow.exceptions import MlflowException

    from study.model_logging import log_cell_model
    from study.tracking.tracker import TrackingUnavailable, _unreachable

    if not tracker.catch_up(catch_up_s()):  # the study run and its trials exist in MLflow before its models
        tracker.models_waiting = [cell.label for cell in cells if cell.best_checkpoint is not None]
        print(f"  (models not logged: the tracking store {config.tracking_uri} is unreachable)", flush=True)
        return
    store_hash = store.sha256()
    for cell in cells:
        if cell.best_checkpoint is None:
            continue
        cohort, _ = cohorts[cell.task]
        meta = {"cell": cell.cell, "task": cell.task, "inputs": cell.inputs, "folds": config.protocol.folds,
                "eval_times": list(cell.eval_times), "sequences": list(store.sequences), "shape": list(store.shape),
                "study": config.name, "trial_id": cell.best_trial, "configuration": cell.best_config,
                # what scoring a new patient needs (`analysis.scoring`): the preprocessing to repeat and
                # the development cut-off of the risk groups; and what a reader of the model needs
                "preprocessing": dict(store.attrs["preprocessing"]),
                "development": {"store": str(store.path), "store_sha256": store_hash, "patients": len(cohort),
                                "events": int(cohort.event.sum())},
                "headline": {"metric": "bbc_cindex", **({"value": cell.bbc.value, "low": cell.bbc.low,
                                                          "high": cell.bbc.high} if cell.bbc is not None else {})},
                "git_revision": git_revision()}
        name = f"{config.name}-{cell.cell}" if config.register_models else None
        try:
            with cell.best_checkpoint.as_directory() as directory:
                meta["dpi_cutoff"] = development_cutoff(Path(directory))
                meta["dpi_scale"] = dpi_scale(Path(directory), config.protocol.folds, store, cohort)
                uri = log_cell_model(config.tracking_uri, tracker.run_id(cell.cell), Path(directory), meta,
                                     str(store.path), list(cohort.patient_ids[:2]), name)
            print(f"  model of {cell.label}: {uri}" + (f", registered as {name}" if name else ""), flush=True)
        except Exception as exc:
            if isinstance(exc, (OSError, ConnectionError, TrackingUnavailable)) or (
                    isinstance(exc, MlflowException) and _unreachable(exc)):
                tracker.models_waiting.append(cell.label)
            print(f"  (model of {cell.label} not logged: {type(exc).__name__}: {str(exc)[:300]})", flush=True)


def close_tracking(config: StudyConfig, tracker, cells: list, status: str, results_dir: Path) -> tuple[dict, bool]:
    """Write the results table, end the study run, and wait for the tracking store to take every
    record (5 minutes after a finished study, 10 s after a failed one). Returns the files written
    ("table": the DataFrame) and whether everything was delivered."""
    from study.results import results_table, write_tables

    files: dict = {}
    if cells:
        files["table"] = results_table(cells)
        files.update(write_tables(files["table"], results_dir))
    from study.resume_trust import catch_up_states

    tracker.finish_parent(status if status == "FINISHED" else "KILLED",
                          {k: v for k, v in files.items() if k != "table"})
    wait = catch_up_s() if status == "FINISHED" else 10.0
    started = time.monotonic()
    delivered = tracker.catch_up(wait)
    # The digests of Tune's last state files wait for the store too: recorded, a plain --resume trusts them.
    states = catch_up_states(tracker.parent_run_id, max(1.0, wait - (time.monotonic() - started)))
    return files, delivered and states


def write_timings(timings: dict, directory: Path) -> None:
    """Where the study's wall time went (`benchmarks.demo_study` reads it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "timings.json").write_text(json.dumps(timings, indent=1))


def print_results(config: StudyConfig, cells: list, files: dict, timings: dict, experiment_id) -> None:
    from study.results import terminal_table

    print(f"\nResults of study {config.name} (per cell, the configuration with the best pooled out-of-fold C-index; "
          "headline: its BBC-CV C-index, which pays for the cell's whole search, ASHA's stops and the final choice):")
    print(terminal_table(cells) if cells else "no cells finished")
    from study.study_folder import open_folder

    folder = open_folder(config.storage_path, config.name)
    written = [folder.where(Path(files[k])) for k in ("markdown", "csv") if k in files]
    print(f"\nWritten to {' and '.join(written)}; {timings['wall_s']:.0f} s in all: "
          f"data {timings['data_s']:.0f} s, start-up {timings['startup_s']:.0f} s, trials {timings['tune_s']:.0f} s "
          f"(their training and validation {timings['trial_train_s']:.0f} s of trial time), tracking "
          f"{timings['tracking_s']:.1f} s (timings.json).")
    print(mlflow_ui_hint(config, experiment_id))


def mlflow_ui_pages(experiment_id: str | None) -> dict[str, str]:
    """The pages of the MLflow UI a study points to (paths after the server's address). MLflow 3 opens
    on its GenAI views, where an experiment lands on an empty traces page: the runs pages are linked
    directly, with the filter and order that the runs page reads from its address."""
    runs = f"#/experiments/{experiment_id}/runs"
    only_cells, by_headline = quote(names.role_filter(names.CELL_ROLE)), quote(f"metrics.`{names.BBC_CINDEX.name}`")
    cells = f"{runs}?searchFilter={only_cells}&orderByKey={by_headline}&orderByAsc=false"
    return {"cells": cells, "chart": f"{cells}&compareRunsMode=CHART", "runs": runs}


def mlflow_ui_hint(config: StudyConfig, experiment_id: str | None) -> str:
    """How to open the study's runs in the MLflow UI (`mlflow_ui_pages`)."""
    pages = mlflow_ui_pages(experiment_id)
    if config.tracking_uri.startswith("sqlite:///"):
        server, start = "http://127.0.0.1:5000", (f"Open the MLflow UI: mlflow ui --backend-store-uri {config.tracking_uri} "
                                                 "--host 127.0.0.1 --port 5000\n")
    elif config.tracking_uri.startswith(("http://", "https://")):
        server, start = config.tracking_uri.rstrip("/"), "The study in the MLflow UI:\n"
    else:
        return f"Open the MLflow UI of {config.tracking_uri}: experiment '{config.name}' ({pages['runs']})"
    return (start +
            f"  the cells side by side, best headline first (Columns adds their metrics): {server}/{pages['cells']}\n"
            f"  the same cells, one chart per metric: {server}/{pages['chart']}\n"
            f"  the study run, its cells and their trials nested: {server}/{pages['runs']} (pruned trials are named "
            "'pruned@EPOCH ...', failed ones 'FAILED ...')")


def check_outcome(config: StudyConfig, cells: list, delivered: bool, tracker, journal: str) -> None:
    """Exit 3 if tracking records or models still wait; a study in which no trial finished is an error."""
    waiting = tracker.models_waiting
    if not delivered or waiting:
        models = (f" (and the models of {', '.join(waiting)}, which it could not take)" if waiting else "")
        raise TrackingIncomplete(
            f"the study finished, but the tracking store {config.tracking_uri} stayed unreachable for "
            f"{catch_up_s():.0f} s after it; {tracker.pending} records wait in {journal}{models}. Start the server again and "
            f"run the same command with --resume --trust-storage: it delivers them (no trial is rerun). "
            "--trust-storage because the digests of Tune's last state files could not be recorded in MLflow "
            "either: resume so only if no one else can write the storage path.")
    if not any(cell.finished for cell in cells):
        failed, pruned = sum(c.failed for c in cells), sum(c.pruned for c in cells)
        raise StudyError(f"no trial of study {config.name} finished ({failed} failed, {pruned} stopped by ASHA): "
                         "the reasons are the failure_reason tags of its trial runs in MLflow")

