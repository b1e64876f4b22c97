"""Search spaces as data: distributions, a fixed protocol per budget, and the reference point.

A space never imports Ray or Optuna: `study` turns its distributions into Tune domains. Each
distribution can also sample itself with numpy, so spaces are tested without Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from datasets.clinical_features import FUSION_PARAMS, IMAGE, IMAGE_CLINICAL, INPUTS
from datasets.errors import InputError

# The reference study's three backbones: the default of a space's `backbones`. The networks are
# registered in `trainables.backbones.BACKBONES` (a space stays data and never imports torch);
# `study.config.check_space` checks a space's names against that registry and the heads'.
REFERENCE_BACKBONES = ("seresnext50", "resnet50_cbam", "densenet121")
# Training parameters a space may neither fix nor search: the cell sets them (backbone, head,
# inputs), the protocol's own fields (epochs, width, depth) or the study (seed, clinical inputs).
# A `fixed:` backbone would train one network while the trial is logged and ranked as another.
OWNED_KEYS = ("backbone", "head", "inputs", "epochs", "width", "depth", "seed", "clinical_inputs")


class SearchSpaceError(InputError):
    """A search space (built in or read from a file) that cannot be used."""


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and 0 < self.low < self.high):
            raise SearchSpaceError(f"LogUniform needs finite 0 < low < high, got {self.low}, {self.high}")

    def __str__(self) -> str:
        return f"log-uniform {self.low:g}..{self.high:g}"

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise SearchSpaceError(f"Uniform needs finite low < high, got {self.low}, {self.high}")

    def __str__(self) -> str:
        return f"uniform {self.low:g}..{self.high:g}"

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high


@dataclass(frozen=True)
class Choice:
    values: tuple

    def __post_init__(self) -> None:
        if not self.values:
            raise SearchSpaceError("Choice needs at least one value")

    def __str__(self) -> str:
        return "one of " + "/".join(str(v) for v in self.values)

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]

    def contains(self, value: Any) -> bool:
        return value in self.values


Distribution = LogUniform | Uniform | Choice


@dataclass(frozen=True)
class Task:
    """An endpoint on a patient subset, trained with one head (loss)."""

    name: str
    filter: str
    endpoint: str
    head: str


TASKS: dict[str, Task] = {
    "os_all": Task("os_all", "all", "os", "cox"),
    "os_gbm": Task("os_gbm", "glioblastoma", "os", "cox"),
    "1yr_all": Task("1yr_all", "all", "1yr", "binary"),
    "1yr_gbm": Task("1yr_gbm", "glioblastoma", "1yr", "binary"),
}


def cell_name(backbone: str, task: str, inputs: str = IMAGE) -> str:
    """The name of a backbone x task x inputs cell (an independent search; folders, MLflow keys,
    files): ``densenet121__os_all``, ``densenet121-clinical__os_all`` for image+clinical inputs
    (MLflow keys allow no '+')."""
    return f"{backbone}__{task}" if inputs == IMAGE else f"{backbone}-clinical__{task}"


class Cell(NamedTuple):
    """One independent search of a study: a backbone on a task, seeing `inputs`."""

    backbone: str
    task: str
    inputs: str = IMAGE

    @property
    def name(self) -> str:
        return cell_name(self.backbone, self.task, self.inputs)

    @property
    def label(self) -> str:
        """How people read the cell: ``backbone/task``, ``backbone+clinical/task`` for fusion."""
        return f"{self.backbone}{'+clinical' if self.inputs == IMAGE_CLINICAL else ''}/{self.task}"

    @classmethod
    def of(cls, trial_config: dict) -> Cell:
        """The cell of a trial, from its configuration (``backbone``, ``task``, ``inputs``)."""
        return cls(trial_config["backbone"], trial_config["task"], trial_config.get("inputs", IMAGE))


@dataclass(frozen=True)
class Protocol:
    """What is fixed during a search (per budget).

    Attributes
    ----------
    folds, epochs
        K-fold cross-validation and maximum epochs per fold.
    num_samples
        Configurations tried per cell (default of ``--num-samples``).
    cell_samples
        Configurations of particular cells instead (cell label: ``backbone/task``; with clinical
        inputs ``backbone+clinical/task``), while ``--num-samples`` is not given: the demo runs
        the reference recipe alone in most cells and searches one, so that it shows a search
        choosing among finished configurations within its time budget.
    grace_epochs, reduction_factor
        ASHA: minimum epochs before a configuration can be stopped, and its halving rate.
    width, depth
        Backbone scaling (1.0 = the published networks).
    os_head
        Head (loss) of the overall-survival tasks: ``cox``, ``logistic_hazard`` or any head of
        `trainables.heads.HEADS` that models the ``os`` endpoint (checked by `study.config`).
    fixed
        Further training parameters held constant (`trainables.config.TrainConfig` names).
    checkpoint_every
        Epochs between trial checkpoints (the last epoch is always checkpointed).
    distributions, reference
        Replace the space's distributions / reference values for this budget only (a CPU demo
        of 100 patients x 4 epochs cannot use the batch sizes and learning rates of a
        1,000-patient GPU study: batch 64 would leave it 2 optimizer steps per epoch).
    inputs
        What the cells' networks see by default (``--inputs``): ``image`` and/or
        ``image+clinical`` (`trainables.fusion`). Distributions of the fusion's own parameters
        (`FUSION_PARAMS`) are searched in image+clinical cells only.
    """

    folds: int
    epochs: int
    num_samples: int
    grace_epochs: int
    reduction_factor: int = 2
    width: float = 1.0
    depth: float = 1.0
    os_head: str = "cox"
    fixed: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 1
    distributions: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = (IMAGE,)
    cell_samples: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [i for i in self.inputs if i not in INPUTS]
        if unknown or not self.inputs:
            raise SearchSpaceError(f"inputs must be among {list(INPUTS)}, got {list(self.inputs)}")
        blocks = (("fixed", self.fixed), ("distributions", self.distributions), ("reference", self.reference))
        for block, keys in blocks:
            owned = sorted(set(keys) & set(OWNED_KEYS))
            if owned:
                raise SearchSpaceError(f"{block} sets {owned}, which the study sets per cell or in the protocol "
                                       "(backbones, tasks and inputs are chosen with --backbones, --tasks, "
                                       "--inputs; epochs, width and depth are protocol fields)")
        if not isinstance(self.cell_samples, dict):
            raise SearchSpaceError(f"cell_samples must map cells (backbone/task) to configurations, got "
                                   f"{self.cell_samples!r}")
        for label, samples in self.cell_samples.items():
            backbone, _, task = str(label).partition("/")
            if not backbone or task not in TASKS or type(samples) is not int or samples < 1:
                raise SearchSpaceError(f"cell_samples: {label!r}: {samples!r} must name a cell as backbone/task (a "
                                       f"task of {list(TASKS)}) and give it at least 1 configuration")
        if self.num_samples < 1:
            raise SearchSpaceError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.folds < 2:
            raise SearchSpaceError(f"folds must be at least 2, got {self.folds}")
        if self.reduction_factor < 2:
            raise SearchSpaceError("reduction_factor must be at least 2 (ASHA keeps 1/factor of the trials at each "
                                   f"rung), got {self.reduction_factor}")
        if not 1 <= self.grace_epochs <= self.epochs:
            raise SearchSpaceError(f"grace_epochs must be in [1, epochs], got {self.grace_epochs}")


@dataclass(frozen=True)
class SearchSpace:
    """A named search space.

    Attributes
    ----------
    name, summary
        Registry key and the one-line description ``--list-spaces`` prints.
    distributions
        Training parameter name -> distribution (names of `trainables.config.TrainConfig`).
    reference
        The first configuration evaluated in every cell (the reference recipe).
    protocols
        Budget name (``demo``, ``full``) -> `Protocol`.
    backbones, tasks
        Defaults of ``--backbones`` and ``--tasks`` (backbone names of `trainables.backbones`).
    """

    name: str
    summary: str
    distributions: dict[str, Distribution]
    reference: dict[str, Any]
    protocols: dict[str, Protocol]
    backbones: tuple[str, ...] = REFERENCE_BACKBONES
    tasks: tuple[str, ...] = tuple(TASKS)

    def __post_init__(self) -> None:
        owned = sorted((set(self.distributions) | set(self.reference)) & set(OWNED_KEYS))
        if owned:
            raise SearchSpaceError(f"space {self.name}: distributions/reference set {owned}, which the study sets "
                                   "per cell or in the protocol")
        if set(self.protocols) != {"demo", "full"}:
            raise SearchSpaceError(f"space {self.name}: protocols must be 'demo' and 'full'")
        for budget in self.protocols:
            distributions, reference = self.distributions_for(budget), self.reference_for(budget)
            missing = set(reference) ^ set(distributions)
            if missing:
                raise SearchSpaceError(f"space {self.name}: reference and distributions differ in {sorted(missing)}")
            for key, value in reference.items():
                if not distributions[key].contains(value):
                    raise SearchSpaceError(f"space {self.name} ({budget}): reference {key}={value!r} is outside its "
                                           "distribution")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise SearchSpaceError(f"space {self.name}: unknown tasks {unknown}; valid tasks are {list(TASKS)}")

    def distributions_for(self, budget: str, inputs: str | None = None) -> dict[str, Distribution]:
        """The budget's distributions (with `inputs` given, only those its cells search)."""
        out = {**self.distributions, **self.protocols[budget].distributions}
        return out if inputs in (None, IMAGE_CLINICAL) else {k: v for k, v in out.items() if k not in FUSION_PARAMS}

    def reference_for(self, budget: str, inputs: str | None = None) -> dict[str, Any]:
        out = {**self.reference, **self.protocols[budget].reference}
        return out if inputs in (None, IMAGE_CLINICAL) else {k: v for k, v in out.items() if k not in FUSION_PARAMS}

    def sample(self, rng: np.random.Generator, budget: str = "full") -> dict[str, Any]:
        return {k: d.sample(rng) for k, d in self.distributions_for(budget).items()}
