"""The resolved study: what `python -m study.run` will do, validated before anything starts."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets.clinical_features import FUSION_DEFAULT, FUSION_PARAMS, IMAGE, INPUTS
from datasets.environment import seconds
from datasets.errors import InputError
from datasets.remote import is_remote
from search_spaces import BUILTIN_SPACES, SPACES, TASKS, Cell, Protocol, SearchSpace, SearchSpaceError, get_space
from search_spaces.from_file import is_space_file, load_space

MAX_NAME = 100  # the study name becomes folder and file names (255 bytes at most on most file systems)
MAX_REPEATS = 100  # each repeat is a whole study
REPEAT_SEED_STEP = 104729  # a repeat's partition seed: far from the study seeds users choose (0, 1, 42, ...)


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study needs; infrastructure fields never enter the search space.

    Attributes
    ----------
    space, budget
        Search space name and budget (``demo`` | ``full``) selecting its protocol.
    space_file
        The YAML/JSON file the space was read from (None: a built-in space).
    data, external
        Development cohort store (None: the built-in demo cohort) and external stores: local
        paths, or URIs (``s3://``, ``gs://``) that every node stages once (`datasets.remote`).
    backbones, tasks, inputs
        Cells of the study: every backbone x task x inputs (``image``, ``image+clinical``).
    clinical_inputs
        The stored clinical columns an ``image+clinical`` network sees.
    num_samples, cell_samples
        Configurations per cell, and of particular cells (by label) where the protocol names
        them (`Protocol.cell_samples`; none when ``--num-samples`` is given): `samples` says how
        many a cell gets, `trials` how many the study runs.
    max_concurrent, cpus_per_trial, gpus_per_trial
        Resources; `max_concurrent` None until Ray starts: then every trial slot of the nodes the
        study has or its autoscaler may add (`study.preflight.trial_slots`). A trial is one
        resource bundle, so it always runs on one node; with several GPUs its folds train in
        parallel on them (`trainables.cross_validation`).
    per_cell_concurrent
        Trials of one cell at once (None: `study.tuning.per_cell_limit`, 10 or half the cell's
        configurations); fewer lets each cell's TPE learn from more ended trials, more keeps GPUs
        busy (docs/guides/cluster.md, "Every GPU busy").
    share_volumes
        One in-memory copy of the volumes per node (Ray's object store) instead of one per trial.
    pruning
        ASHA stops poor configurations early (False: every configuration runs all its epochs).
    outer_folds, outer_fold
        Nested cross-validation: with `outer_folds` K >= 2 the whole study runs K times, each time
        without one outer fold's patients (`outer_fold`), which then test the configuration that
        search selected (`study.nested`). 0: no outer loop.
    repeats, repeat
        Repeated cross-validation: with `repeats` R >= 2 the whole study runs R times, each on its own
        partition of the patients into folds (`repeat`: which; `fold_seed`), summarised by
        `study.repeats`. 0: one partition.
    address
        Ray cluster address (None: a local Ray instance).
    tracking_uri, storage_path, name
        MLflow tracking URI, Tune storage (experiment state, checkpoints), study name.
    resume
        Continue the study of that name (rerunning with the same name does the same).
    register_models
        Register each cell's selected fold ensemble in MLflow's model registry (`analysis.pyfunc_model`).
    trust_storage
        Resume without checking Tune's state files against the digests in MLflow (`study.resume_trust`).
    cpu_fallback
        Train on the CPU when a trial's GPUs cannot be used (False: such a trial fails, and a GPU node
        type that cannot train stops the study before its first trial; `trainables.devices`).
    dashboard
        A local Ray starts its dashboard on 127.0.0.1 (a cluster's dashboard is the head's).
    seed
        Seeds folds, samplers and training.
    """

    space: str
    budget: str
    data: Path | str | None
    external: tuple[Path | str, ...]
    backbones: tuple[str, ...]
    tasks: tuple[str, ...]
    num_samples: int
    max_concurrent: int | None
    cpus_per_trial: int
    gpus_per_trial: float
    address: str | None
    tracking_uri: str
    storage_path: str
    name: str
    resume: bool = False
    trust_storage: bool = False
    register_models: bool = False
    seed: int = 0
    space_file: str | None = None
    share_volumes: bool = True
    pruning: bool = True
    outer_folds: int = 0
    outer_fold: int | None = None
    repeats: int = 0
    repeat: int = 0
    inputs: tuple[str, ...] = (IMAGE,)
    clinical_inputs: tuple[str, ...] = FUSION_DEFAULT
    per_cell_concurrent: int | None = None
    cpu_fallback: bool = False
    dashboard: bool = False
    cell_samples: dict[str, int] = field(default_factory=dict)

    @property
    def fold_seed(self) -> int:
        """Seed of the partition into folds: the study's seed, another per repeat (repeat 0 is the
        partition of a study without --repeats)."""
        return self.seed + REPEAT_SEED_STEP * self.repeat

    def samples(self, cell: Cell) -> int:
        """Configurations the search tries in `cell`."""
        return self.cell_samples.get(cell.label, self.num_samples)

    @property
    def trials(self) -> int:
        """Trials of the whole study (every cell's configurations)."""
        return sum(self.samples(cell) for cell in self.cells())

    @property
    def search_space(self) -> SearchSpace:
        return get_space(self.space)

    @property
    def protocol(self) -> Protocol:
        return self.search_space.protocols[self.budget]

    def cells(self) -> list[Cell]:
        """Every backbone x task x inputs, task-major (then inputs, then backbone)."""
        return [Cell(b, t, i) for t in self.tasks for i in self.inputs for b in self.backbones]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = str(self.data) if self.data else None
        out["external"] = [str(p) for p in self.external]
        out["protocol"] = asdict(self.protocol)
        return out


def _location(value: str) -> Path | str:
    return value if is_remote(value) else Path(value).expanduser().absolute()


def check_space(space: SearchSpace, source: str) -> None:
    """A space's names against the trainables' registries: its searched and fixed parameters are
    `TrainConfig` fields, its backbones are networks of `trainables.backbones`, and each budget's
    ``os_head`` is a head of `trainables.heads` that models overall survival. (Spaces are data and
    never import torch, so this check lives where spaces meet the trainables.)"""

    from trainables.backbones import BACKBONES
    from trainables.config import TrainConfig
    from trainables.heads import HEADS

    trainable = {f.name for f in dataclasses.fields(TrainConfig)}
    os_heads = [name for name, head in HEADS.items() if head.endpoint == "os"]
    for budget, protocol in space.protocols.items():
        searched = set(space.distributions) | set(protocol.distributions) | set(protocol.fixed)
        bad = sorted(searched - trainable)
        if bad:
            raise SearchSpaceError(f"{source}: {bad} are not training parameters; known: {sorted(trainable)}")
        if protocol.os_head not in os_heads:
            raise SearchSpaceError(f"{source}: protocols.{budget}.os_head must be one of {os_heads}, "
                                   f"got {protocol.os_head!r}")
    unknown = [b for b in space.backbones if b not in BACKBONES]
    if unknown:
        raise SearchSpaceError(f"{source}: unknown backbones {unknown}; valid backbones are {list(BACKBONES)}")


def resolve(args) -> StudyConfig:
    """Validate parsed CLI arguments into a `StudyConfig` (raises InputError naming the flag)."""
    space, space_file = _resolve_space(args.space)
    budget = args.budget or ("demo" if args.data is None else "full")
    backbones = tuple(args.backbones or space.backbones)
    tasks = tuple(args.tasks or space.tasks)
    inputs = tuple(args.inputs or space.protocols[budget].inputs)
    clinical_inputs = tuple(args.clinical_inputs or FUSION_DEFAULT)
    _check_cell_flags(backbones, tasks, inputs, clinical_inputs)
    protocol = space.protocols[budget]
    num_samples = args.num_samples if args.num_samples is not None else protocol.num_samples
    labels = {Cell(b, t, i).label for b in backbones for t in tasks for i in inputs}
    cell_samples = ({} if args.num_samples is not None
                    else {label: n for label, n in protocol.cell_samples.items() if label in labels})
    repeats = getattr(args, "repeats", 0)
    _check_numbers(args, num_samples, repeats)  # --data and --external in their old place among them
    storage = args.storage_path
    if not is_remote(storage):
        storage = str(Path(storage).expanduser().absolute())
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    check_not_in_job_folder(storage, tracking)
    seconds("STUDY_TRACKING_CATCH_UP_S", 300.0)  # read at the end of the study: a bad value stops it now
    if args.address or os.environ.get("RAY_ADDRESS"):
        check_ray_address(args.address or os.environ["RAY_ADDRESS"], "--address" if args.address else "RAY_ADDRESS")
    if getattr(args, "dashboard", False):
        if importlib.util.find_spec("aiohttp") is None:
            raise InputError("--dashboard needs Ray's dashboard: pip install 'ray[default]'")
    name = _check_name(args.name or f"{space.name}-{budget}")
    return StudyConfig(
        space=space.name, space_file=space_file, budget=budget,
        data=_location(args.data) if args.data else None,
        external=tuple(_location(p) for p in args.external),
        backbones=backbones, tasks=tasks, num_samples=num_samples, cell_samples=cell_samples,
        max_concurrent=args.max_concurrent,  # None: every trial slot of the cluster (study.preflight.trial_slots)
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, address=args.address,
        tracking_uri=tracking, storage_path=storage, name=name, resume=args.resume,
        trust_storage=args.trust_storage, register_models=args.register_models, seed=args.seed,
        share_volumes=args.share_volumes, pruning=args.pruning, outer_folds=args.outer_folds, repeats=repeats,
        inputs=inputs, clinical_inputs=clinical_inputs, per_cell_concurrent=args.per_cell_concurrent,
        cpu_fallback=args.cpu_fallback, dashboard=getattr(args, "dashboard", False))


def _resolve_space(value: str):
    """(the search space --space names, the absolute path of its file or None for a built-in one)."""
    if is_space_file(value):
        space = load_space(value)
        check_space(space, str(value))
        if space.name in BUILTIN_SPACES:
            raise InputError(f"--space {value}: name {space.name!r} is a built-in space; choose another name")
        SPACES[space.name] = space  # the driver looks spaces up by name from here on
        return space, str(Path(value).expanduser().absolute())
    if value not in SPACES:
        raise InputError(f"--space {value!r} is not a known search space or a .yaml/.json space file; valid "
                         f"spaces are {sorted(SPACES)} (see --list-spaces)")
    check_space(SPACES[value], f"--space {value}")
    return SPACES[value], None


def _check_cell_flags(backbones, tasks, inputs, clinical_inputs) -> None:
    from datasets.clinical import COVARIATES
    from trainables.backbones import BACKBONES

    for flag, values, valid in (("--backbones", backbones, BACKBONES), ("--tasks", tasks, tuple(TASKS)),
                                ("--inputs", inputs, INPUTS), ("--clinical-inputs", clinical_inputs, COVARIATES)):
        unknown = [v for v in values if v not in valid]
        if unknown:
            raise InputError(f"{flag}: unknown {unknown}; valid values are {list(valid)}")
        if len(set(values)) != len(values):
            raise InputError(f"{flag}: repeated values in {list(values)}")


def _check_numbers(args, num_samples: int, repeats: int) -> None:
    """The numeric flags, in the order the errors have always come (the stores' between them)."""
    if num_samples < 1:
        raise InputError(f"--num-samples must be at least 1, got {num_samples}")
    if args.cpus_per_trial < 1:
        raise InputError(f"--cpus-per-trial must be at least 1, got {args.cpus_per_trial}")
    if args.seed < 0 or args.seed >= 2**31:
        raise InputError(f"--seed must be a whole number in [0, 2^31), got {args.seed}")
    if (not math.isfinite(args.gpus_per_trial) or args.gpus_per_trial < 0
            or (args.gpus_per_trial > 1 and args.gpus_per_trial != int(args.gpus_per_trial))):
        raise InputError(f"--gpus-per-trial must be a fraction in [0, 1] or a whole number, got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise InputError(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    if args.per_cell_concurrent is not None and args.per_cell_concurrent < 1:
        raise InputError(f"--per-cell-concurrent must be at least 1, got {args.per_cell_concurrent}")
    _check_stores(args)
    if args.outer_folds == 1 or args.outer_folds < 0:
        raise InputError(f"--outer-folds must be 0 (no nested CV) or at least 2, got {args.outer_folds}")
    if repeats == 1 or repeats < 0 or repeats > MAX_REPEATS:
        raise InputError(f"--repeats must be 0 (one partition) or 2 to {MAX_REPEATS}, got {repeats}")
    if repeats and args.outer_folds:
        raise InputError("--repeats and --outer-folds cannot be combined (each runs the whole study several times); "
                         "choose one")


def _check_stores(args) -> None:
    """--data and --external name stores that exist (remote ones are checked when staged)."""
    for flag, path in [("--data", args.data), *(("--external", p) for p in args.external)]:
        if path is None or is_remote(path):
            continue
        try:
            exists = Path(path).exists()
        except OSError as exc:  # a name too long for the file system, say
            raise InputError(f"{flag} {path[:80]}{'...' if len(path) > 80 else ''}: not a usable path "
                             f"({exc.strerror})") from None
        if not exists:
            raise InputError(f"cohort store {path} does not exist (give a store made by python -m datasets.convert)")


def _check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise InputError(f"--name is {len(name)} characters; at most {MAX_NAME} (it names folders and files)")
    if not name.replace("-", "").replace("_", "").isalnum() or not name.isascii():
        raise InputError(f"--name {name!r}: use letters, digits, '-' and '_' only")
    return name


RAY_PROBE_S = 10.0


def check_ray_address(address: str, source: str) -> None:
    """Refuse (InputError, exit 2, within seconds) an address Ray could not join: not host:port, a
    dashboard URL (which `ray job submit` takes, the driver does not), or nothing listening there.
    Ray itself raises on the first and retries an unreachable one for over a minute."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise InputError(f"{source} {address}: a dashboard URL; the study joins a cluster at its GCS address "
                         "host:port (port 6379 by default), or through RAY_ADDRESS as `ray job submit` sets it")
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{source} {address!r}: not a Ray address (host:port, e.g. 10.0.0.5:6379; or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_PROBE_S).close()
    except OSError as exc:
        raise InputError(f"{source} {address}: nothing answers there ({exc.strerror or exc}): is the Ray head "
                         "running, and is this the address `ray start --head` printed?") from None


# Set by Ray's job supervisor in the environment of a job's entrypoint (`ray job submit`).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_not_in_job_folder(storage: str, tracking: str) -> None:
    """Under ``ray job submit`` the working folder is Ray's unpacked copy of ``--working-dir``,
    deleted after the job: a study must not keep its records or its MLflow database there."""
    if RAY_JOB_ENV not in os.environ:
        return
    here = Path.cwd().absolute()
    if not is_remote(storage) and Path(storage).is_relative_to(here):
        raise InputError(f"--storage-path {storage} lies in this Ray job's working folder, which Ray deletes after the "
                         "job: give the cluster's shared folder or an s3:// gs:// URI")
    if tracking.startswith("sqlite:///") and Path(tracking[len("sqlite:///"):]).absolute().is_relative_to(here):
        raise InputError(f"--tracking-uri {tracking} lies in this Ray job's working folder, which Ray deletes after "
                         "the job: give the cluster's tracking server (--tracking-uri http://127.0.0.1:5000 on the "
                         "head) or set MLFLOW_TRACKING_URI")


def head_for(config: StudyConfig, task: str) -> str:
    spec = TASKS[task]
    return config.protocol.os_head if spec.endpoint == "os" else spec.head


def fixed_parameters(config: StudyConfig, cell: Cell) -> dict:
    """Training parameters held constant in a cell (they are params of every trial run)."""
    protocol = config.protocol
    fixed = {"backbone": cell.backbone, "head": head_for(config, cell.task), "width": protocol.width,
             "depth": protocol.depth, "epochs": protocol.epochs, "seed": config.seed, "inputs": cell.inputs}
    fixed.update(protocol.fixed)
    if cell.inputs == IMAGE:  # an image-only network has no clinical branch to configure
        fixed = {k: v for k, v in fixed.items() if k not in FUSION_PARAMS}
    else:
        fixed["clinical_inputs"] = list(config.clinical_inputs)
    overlap = set(fixed) & set(config.search_space.distributions_for(config.budget, cell.inputs))
    if overlap:
        raise InputError(f"space {config.space}: {sorted(overlap)} are both fixed and searched")
    return fixed


def check_trial_configs(config: StudyConfig) -> None:
    """Every configuration the space can suggest must train: in each cell, its fixed parameters with
    the reference recipe, and with each distribution's bounds (each value of a choice). Else the
    trial fails on its first line, Tune retries it as if its worker were lost, and the study ends
    having trained nothing (a space file with batch size 0, say). Raises InputError naming the space,
    the parameter and the value."""
    from search_spaces import Choice
    from trainables.config import TrainConfig

    space, source = config.search_space, config.space_file or f"space {config.space}"
    for cell in config.cells():
        base = {**fixed_parameters(config, cell), **space.reference_for(config.budget, cell.inputs)}
        trials = [("reference", base)]
        for key, distribution in space.distributions_for(config.budget, cell.inputs).items():
            values = distribution.values if isinstance(distribution, Choice) else (distribution.low, distribution.high)
            trials += [(f"{key}={value!r}", {**base, key: value}) for value in values]
        for what, values in trials:
            try:
                TrainConfig.from_dict(values)
            except (InputError, TypeError, ValueError) as exc:
                raise InputError(f"{source} ({config.budget}, cell {cell.name}): {what} cannot train: {exc}") from None
