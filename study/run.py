"""``python -m study.run``: the hyperparameter study (Ray Tune trials running K-fold CV, Optuna
TPE search, ASHA pruning, MLflow tracking, resumable).

Without ``--data`` it runs on the built-in demo cohort (synthetic, built once and cached) with
the demo budget, through the same code path as a real study.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from datasets.cli import new_parser
from datasets.errors import StudyError
from search_spaces import SPACES, TASKS
from study.config import StudyConfig, check_trial_configs, resolve
from study.data import open_data, task_cohorts
from study.driver import StudyInterrupted, TrackingIncomplete, describe, join_cluster, run_study


def resume_command(arguments: Sequence[str]) -> str:
    """The command line that resumes a study: the one that started it, plus --resume."""
    return " ".join(["python -m study.run", *map(shlex.quote, arguments),
                     *([] if "--resume" in arguments else ["--resume"])])


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("study.run", __doc__.split("\n\n")[0])
    for add_group in (_data_arguments, _search_arguments, _resource_arguments, _tracking_arguments,
                      _preview_arguments):
        add_group(parser)
    return parser


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and cells")
    data.add_argument("--space", default="literature_priors",
                      help="search space: a built-in name (see --list-spaces) or a .yaml/.json space file")
    data.add_argument("--list-spaces", action="store_true", help="print the search spaces and exit")
    data.add_argument("--data", default=None,
                      help="development cohort store: a path, or s3:// gs:// URI staged once per node "
                           "(default: the demo cohort)")
    data.add_argument("--external", nargs="*", default=[], metavar="STORE",
                      help="external cohort stores (for the report)")
    data.add_argument("--backbones", nargs="+", default=None, help="backbones (default: the space's)")
    data.add_argument("--tasks", nargs="+", default=None, help=f"tasks among {' '.join(TASKS)} (default: the space's)")
    data.add_argument("--inputs", nargs="+", default=None, metavar="INPUTS",
                      help="what the networks see: image and/or image+clinical (the backbone's features joined "
                           "with the clinical vector before the survival head); each is its own cell "
                           "(default: the protocol's)")
    data.add_argument("--clinical-inputs", nargs="+", default=None, metavar="COLUMN",
                      help="stored clinical columns an image+clinical network sees (default: age sex grade "
                           "glioblastoma idh mgmt; kps and resection when the store has them)")


def _search_arguments(parser: argparse.ArgumentParser) -> None:
    search = parser.add_argument_group("search")
    search.add_argument("--num-samples", type=int, default=None,
                        help="configurations per cell (default: the protocol's)")
    search.add_argument("--budget", choices=("demo", "full"), default=None,
                        help="protocol size (default: demo without --data, full with it)")
    search.add_argument("--pruning", action=argparse.BooleanOptionalAction, default=True,
                        help="stop poor configurations early with ASHA (the default); --no-pruning runs every "
                             "configuration for all its epochs")
    search.add_argument("--seed", type=int, default=0, help="seed of folds, samplers and training")
    search.add_argument("--outer-folds", type=int, default=0, metavar="K",
                        help="nested cross-validation: run the whole search K times, each without one outer fold, "
                             "and test each selected configuration on the fold it never saw (K x the cost of a "
                             "study; 0: off)")
    search.add_argument("--repeats", type=int, default=0, metavar="R",
                        help="repeated cross-validation: run the whole study R times, each on another partition of "
                             "the patients into folds, and report each cell's headline as mean +- between-repeat SD "
                             "(R x the cost of a study; 0: one partition)")


def _resource_arguments(parser: argparse.ArgumentParser) -> None:
    resources = parser.add_argument_group("resources")
    resources.add_argument("--address", default=None,
                           help="Ray cluster address (default: RAY_ADDRESS if set, else a local Ray)")
    resources.add_argument("--max-concurrent", type=int, default=None,
                           help="trials at once (default: every trial slot of the cluster or machine: its CPUs / "
                                "--cpus-per-trial, or its GPUs / --gpus-per-trial)")
    resources.add_argument("--per-cell-concurrent", type=int, default=None, metavar="N",
                           help="trials of one cell at once: fewer lets each cell's search learn from more ended "
                                "trials, more keeps GPUs busy (default: 10 or half the cell's configurations, "
                                "whichever is more; set when the study starts: --resume keeps it)")
    resources.add_argument("--gpus-per-trial", type=float, default=0.0,
                           help="GPUs per trial; fractions pack small models")
    resources.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (torch threads) per trial")
    resources.add_argument("--cpu-fallback", action="store_true",
                           help="train on the CPU (slowly) when a trial's GPUs cannot be used; without it such a "
                                "trial fails at once, and a GPU node type that cannot train stops the study before "
                                "its first trial (exit 2)")
    resources.add_argument("--share-volumes", action=argparse.BooleanOptionalAction, default=True,
                           help="keep one in-memory copy of the cohort's volumes per node (Ray's object store) for "
                                "all trials on it (the default); --no-share-volumes: every trial reads its own copy")
    resources.add_argument("--dashboard", action="store_true",
                           help="a local study starts Ray's dashboard on 127.0.0.1 and prints its address (a "
                                "cluster's is the head's, port 8265)")


def _tracking_arguments(parser: argparse.ArgumentParser) -> None:
    tracking = parser.add_argument_group("tracking and storage")
    tracking.add_argument("--tracking-uri", default=None,
                          help="MLflow tracking URI (default: MLFLOW_TRACKING_URI if set, else sqlite:///$PWD/mlflow.db)")
    tracking.add_argument("--storage-path", default="ray_results",
                          help="Tune experiment state and checkpoints: a folder (shared by all nodes on a cluster) "
                               "or an s3:// gs:// URI")
    tracking.add_argument("--name", default=None, help="study name (default: SPACE-BUDGET); reusing it resumes")
    tracking.add_argument("--resume", action="store_true", help="continue the study called --name")
    tracking.add_argument("--register-models", action="store_true",
                          help="register each cell's selected model (its fold ensemble, logged under the study run "
                               "in any case) in MLflow's model registry as STUDY-CELL")
    tracking.add_argument("--trust-storage", action="store_true",
                          help="resume without checking Tune's state files on the storage path against the digests "
                               "the driver recorded in MLflow (they are unpickled: only for storage only you can "
                               "write)")


def _preview_arguments(parser: argparse.ArgumentParser) -> None:
    preview = parser.add_argument_group("preview")
    preview.add_argument("--dry-run", action="store_true",
                         help="print the resolved study and its cost (trials, fold-epochs, GPU-hours with and "
                              "without ASHA, wall time on the cluster of --address) and exit")
    preview.add_argument("--epoch-seconds", type=float, default=None,
                         help="seconds of one fold-epoch on a trial's GPU share, for --dry-run's cost (default: an "
                              "assumed throughput, see study/cost.py)")


def list_spaces() -> str:
    width = max(len(n) for n in SPACES)
    return "\n".join(f"{name:<{width}}  {space.summary}" for name, space in sorted(SPACES.items()))


def dry_run(config: StudyConfig, epoch_seconds: float | None) -> None:
    """Print the resolved study and its cost; on a cluster (--address, RAY_ADDRESS) with its own
    resources and wall time. Trains nothing, writes nothing."""
    from study.cost import estimate
    from study.tuning import local_ray

    config, store = open_data(config)
    cohorts = task_cohorts(config, store)
    gpus = None
    if not local_ray(config):
        config, shapes = join_cluster(config)
        gpus = sum(s.gpus * (s.count if s.count > 0 else 1) for s in shapes)
    print(describe(config, store, cohorts))
    print("\n".join(estimate(config, {task: len(cohort) for task, (cohort, _) in cohorts.items()}, epoch_seconds,
                             gpus)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_spaces:
        print(list_spaces())
        return 0
    registry = dict(SPACES)  # resolve() registers a user's space file: undone when this command ends
    try:
        config = resolve(args)
        check_trial_configs(config)
        if args.dry_run:
            dry_run(config, args.epoch_seconds)
            return 0
        # Said first: Ray's core worker may end this process itself (exit 1) when its raylet dies,
        # before the study can say anything.
        print(f"To resume this study if it stops: {resume_command(sys.argv[1:] if argv is None else argv)}",
              flush=True)
        if config.outer_folds:
            from study.nested import run_nested

            run_nested(config)
        elif config.repeats:
            from study.repeats import run_repeated

            run_repeated(config)
        else:
            run_study(config)
    except StudyError as exc:
        if isinstance(exc, StudyInterrupted):
            exc = StudyInterrupted(f"{exc}. Resume with: {resume_command(sys.argv[1:] if argv is None else argv)}")
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, StudyInterrupted) and argv is None:
            # Ray's shutdown ends a process whose raylet died with exit code 1; the command's is 3.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        return 3 if isinstance(exc, (TrackingIncomplete, StudyInterrupted)) else 2
    finally:
        SPACES.clear()
        SPACES.update(registry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
