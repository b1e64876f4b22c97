"""Training and evaluating one cross-validation fold of one configuration.

`FoldTrainer` advances one epoch per `step()` so a trial can run its folds in lock-step and
report the cross-fold mean after every epoch.

Which epoch's weights give the out-of-fold predictions: by default the *last* epoch of a fixed
budget (`selection_fraction` 0), the learning rate having decayed to zero on its cosine
schedule. The alternative, choosing the epoch with the best C-index on a *selection* split held
out from the training fold (`selection_fraction` > 0, which also allows early stopping by
`patience`), never looks at the validation fold, but at the sizes users run it chooses by noise:
on the demo cohort the selection split holds 15 patients, its C swung between 0.44 and 0.60 from
epoch to epoch and it picked epochs 0 and 1 of 8, whose outputs were almost constant
(`benchmarks/results/learning.md` compares both). The number of epochs is then part of the
configuration the search chooses, and it is chosen on the folds' pooled out-of-fold C-index like
every other hyperparameter. Choosing the epoch with the best *validation* C-index instead would
leak the validation outcomes into the predictions (on cohorts whose images carry no information
this made the DPI look prognostic in a third of the seeds).

Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, selected weights,
history); a trainer built on an existing checkpoint continues from it. Randomness (shuffling,
augmentation, dropout) is re-seeded from (seed, fold, epoch) at each epoch, so an interrupted
and resumed fold reproduces the uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from evaluation.metrics import SurvivalDataError, harrell_c
from datasets.clinical_features import ClinicalEncoder, IMAGE
from datasets.errors import StudyError
from datasets.store import CohortStore
from datasets.torch_data import CohortDataset, training_augmentation
from trainables.batches import BatchAugmentation, InMemoryBatches, VolumeCache
from trainables.config import TrainConfig
from trainables.fold_model import FoldModel, network_spec, resume_keys
from trainables.fusion import build_network
from trainables.heads import build_head
from trainables.optimizers import build_optimizer

CHECKPOINT_FORMAT = 2


class TrainingDivergedError(StudyError):
    """The loss became NaN or infinite."""


class CheckpointError(StudyError):
    """A checkpoint cannot be used (corrupt, or from another configuration)."""


@dataclass
class FoldData:
    """The patients of one task and one fold's split.

    Attributes
    ----------
    store
        Cohort store the volumes come from.
    patient_ids, slots, time, event
        Per-patient arrays of the whole task cohort (length n): ids, store slots, the endpoint's
        time [days] and event (0/1).
    train, val
        Positions (into the arrays above) of this fold's training and validation patients.
    fold
        Fold number.
    volumes, volume_rows
        Optional float16 [m, C, X, Y, Z] already in memory (e.g. shared by all trials on a node)
        and the row of each cohort patient in it (default: row i for patient i).
    clinical
        The cohort's clinical table (one row per patient, in order); needed by ``image+clinical``.
    """

    store: CohortStore
    patient_ids: list[str]
    slots: np.ndarray
    time: np.ndarray
    event: np.ndarray
    train: np.ndarray
    val: np.ndarray
    fold: int = 0
    volumes: np.ndarray | None = None
    volume_rows: np.ndarray | None = None
    clinical: pd.DataFrame | None = None

    @classmethod
    def from_cohort(cls, cohort, folds: np.ndarray, fold: int, volumes: np.ndarray | None = None,
                    volume_rows: np.ndarray | None = None) -> FoldData:
        """Fold `fold` of a `datasets.Cohort` given its fold assignment (int [n])."""
        return cls(cohort.store, cohort.patient_ids, cohort.slots, cohort.time, cohort.event,
                   np.flatnonzero(folds != fold), np.flatnonzero(folds == fold), fold, volumes, volume_rows,
                   cohort.clinical)

    def dataset(self, positions: np.ndarray, transform=None) -> CohortDataset:
        volumes = None
        if self.volumes is not None:
            rows = positions if self.volume_rows is None else self.volume_rows[positions]
            volumes = _Rows(self.volumes, rows)
        return CohortDataset(self.store, self.slots[positions], self.time[positions], self.event[positions],
                             transform=transform, volumes=volumes)


class _Rows:
    """A view of selected rows of a big array without copying it."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> np.ndarray:
        return self.array[self.rows[item]]


@dataclass
class FoldResult:
    """A finished fold: its history, the selected epoch, its out-of-fold predictions and model."""

    fold: int
    history: list[dict]
    best_epoch: int
    best_cindex: float
    predictions: pd.DataFrame = field(repr=False)
    model: FoldModel | None = field(default=None, repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StudyError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of training and prediction; ``auto``: bfloat16 on a GPU, float32 on a CPU.

    Not bf16 on CPUs, even those with bf16 instructions where it doubled the training throughput:
    with PyTorch 2.13's CPU kernels the DenseNet-121 and ResNet50-CBAM losses became NaN within a
    few epochs (non-finite bf16 weight gradients; `benchmarks/results/precision.md`)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def _schedule(config: TrainConfig):
    warmup, total = config.warmup_epochs, config.epochs

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / span))

    return factor


def _save_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class FoldTrainer:
    """Trains one fold epoch by epoch; see the module docstring."""

    def __init__(self, data: FoldData, config: TrainConfig, checkpoint: Path | None = None,
                 device: str | None = None, volume_cache: VolumeCache | None = None):
        self.data, self.config = data, config
        self.checkpoint = Path(checkpoint) if checkpoint else None
        # `device` (e.g. "cuda:3") overrides config.device: a multi-GPU trial places its folds.
        self.device = torch.device(device) if device else resolve_device(config.device)
        self.head = build_head(config.head, **config.to_dict())
        self.fit, self.select = self._selection_split()
        self.encoder, self.clinical = self._clinical_inputs()
        torch.manual_seed(self._seed(-1))
        spec = network_spec(config, len(data.store.sequences), self.head.out_features, self.encoder)
        self.model = build_network(spec).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        params = [{"params": [p for n, p in self.model.named_parameters() if p.ndim > 1], "weight_decay": config.weight_decay},
                  {"params": [p for n, p in self.model.named_parameters() if p.ndim <= 1], "weight_decay": 0.0}]
        self.optimizer = build_optimizer(params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        self.head.prepare(data.time[self.fit], data.event[self.fit])
        if data.volumes is not None and volume_cache is None:
            volume_cache = VolumeCache(data.volumes, self.device, config.volume_placement)
        # `volume_cache` (data.volumes on this device) is passed in when several folds share it.
        self.memory = InMemoryBatches(volume_cache, data.volume_rows) if data.volumes is not None else None
        self.augment = BatchAugmentation(config.augmentation)
        self.epoch = 0
        self.history: list[dict] = []
        self.best_cindex = -math.inf
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_state: dict | None = None
        self.best_val_outputs: np.ndarray | None = None
        self.last_val_outputs: np.ndarray | None = None  # this epoch's (not checkpointed: set by `step`)
        self.stopped_early = False
        if self.checkpoint and self.checkpoint.exists():
            self._load()

    # -- bookkeeping ------------------------------------------------------------------------
    def _selection_split(self) -> tuple[np.ndarray, np.ndarray]:
        """Training positions split into (fit, select), seeded and stratified by event."""
        train = np.asarray(self.data.train)
        fraction = self.config.selection_fraction
        events = self.data.event[train] == 1
        n_select = int(round(fraction * len(train)))
        if fraction == 0 or n_select < 4 or events.sum() < 4:
            return train, train[:0]
        rng = np.random.default_rng(self._seed(-2))
        picked = []
        for group in (train[events], train[~events]):
            k = int(round(fraction * len(group)))
            picked.extend(rng.choice(group, size=k, replace=False).tolist())
        select = np.sort(np.asarray(picked, dtype=int))
        return np.setdiff1d(train, select), select

    def _clinical_inputs(self) -> tuple[ClinicalEncoder | None, torch.Tensor | None]:
        """The clinical encoding learned on the fitting patients, and every patient's features."""
        if self.config.inputs == IMAGE:
            return None, None
        if self.data.clinical is None:
            raise StudyError(f"fold {self.data.fold}: inputs image+clinical need the cohort's clinical table")
        encoder = ClinicalEncoder.learn(self.data.clinical.iloc[self.fit], self.config.clinical_inputs)
        return encoder, torch.as_tensor(encoder.encode(self.data.clinical), device=self.device)

    def _seed(self, epoch: int) -> int:
        return (self.config.seed * 1_000_003 + self.data.fold * 10_007 + epoch + 1) % (2**31)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.config.epochs or self.stopped_early

    def _state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "architecture": self._architecture(),
            "fold": self.data.fold,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_cindex": self.best_cindex,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            # Without a selection split the selected weights are the current ones: not stored twice.
            "best_model": self.best_state if len(self.select) else None,
            "best_val_outputs": None if self.best_val_outputs is None else torch.from_numpy(self.best_val_outputs),
            "stopped_early": self.stopped_early,
        }

    def _architecture(self, config: TrainConfig | None = None) -> dict:
        config = config or self.config
        return {k: list(v) if isinstance(v, tuple) else v for k, v in
                ((k, getattr(config, k)) for k in resume_keys(self.config))}

    def _load(self) -> None:
        try:
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {self.checkpoint} cannot be read ({type(exc).__name__}: {exc}); "
                                  "delete it to restart this fold") from exc
        expected = self._architecture()
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {self.checkpoint} is not a fold checkpoint of format {CHECKPOINT_FORMAT}")
        # Checkpoints written before a key was recorded were trained with its default (e.g. inputs "image").
        saved = {**self._architecture(TrainConfig()), **state.get("architecture", {})}
        if saved != expected or state.get("fold") != self.data.fold:
            raise CheckpointError(f"checkpoint {self.checkpoint} was written for {state.get('architecture')} fold "
                                  f"{state.get('fold')}, not {expected} fold {self.data.fold}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_cindex = float(state["best_cindex"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state["best_model"] if state["best_model"] is not None else {
            k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        outputs = state["best_val_outputs"]
        self.best_val_outputs = None if outputs is None else outputs.cpu().numpy()
        self.stopped_early = bool(state["stopped_early"])

    # -- training -----------------------------------------------------------------------------
    def _autocast(self):
        dtype = resolve_precision(self.config.precision, self.device)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last_3d)
        return images

    def _features(self, positions) -> torch.Tensor | None:
        """Clinical features of the patients at `positions` (None for an image-only network)."""
        if self.clinical is None:
            return None
        return self.clinical[torch.as_tensor(np.asarray(positions), device=self.device)]

    def _forward(self, images: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
        return self.model(images) if clinical is None else self.model(images, clinical)

    def _training_batches(self, seed: int):
        """(images on the device, clinical features or None, time, event) of one shuffled, augmented epoch."""
        config = self.config
        generator = torch.Generator().manual_seed(seed)
        batch = min(config.batch_size, len(self.fit))
        drop_last = len(self.fit) > batch
        if self.memory is not None:  # in-memory volumes: gather + augment whole batches on the device
            augment_generator = torch.Generator(device=self.device).manual_seed(seed)
            for order in InMemoryBatches.order(len(self.fit), batch, generator, drop_last):
                positions = self.fit[order]
                images = self.augment(self.memory.images(positions), augment_generator)
                outcome = (torch.as_tensor(a[positions], dtype=torch.float32, device=self.device)
                           for a in (self.data.time, self.data.event))
                yield (self._to_device(images), self._features(positions), *outcome)
            return
        dataset = self.data.dataset(self.fit, training_augmentation(config.augmentation, seed=seed))
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=generator, drop_last=drop_last,
                            num_workers=config.num_workers, persistent_workers=False,
                            pin_memory=self.device.type == "cuda")
        for items in loader:
            yield (self._to_device(items["image"]), self._features(self.fit[items["index"].numpy()]),
                   items["time"].to(self.device), items["event"].to(self.device))

    def _train_epoch(self) -> float:
        config, seed = self.config, self._seed(self.epoch)
        torch.manual_seed(seed)
        self.model.train()
        self.head.reset()
        losses = []
        for images, clinical, time, event in self._training_batches(seed):
            with self._autocast():
                outputs = self._forward(images, clinical)
            loss = self.head.loss(outputs.float(), time, event)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"fold {self.data.fold}, epoch {self.epoch}: the loss became {loss.item()} "
                    f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); training stopped")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            losses.append(loss.item())
        self.scheduler.step()
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def predict(self, positions: np.ndarray) -> np.ndarray:
        """Network outputs [len(positions), out_features] (float64) without augmentation."""
        self.model.eval()
        size = max(2, self.config.batch_size)
        starts = range(0, len(positions), size)
        if self.memory is not None:
            batches = (self.memory.images(positions[i:i + size]) for i in starts)
        else:
            loader = DataLoader(self.data.dataset(positions), batch_size=size, shuffle=False,
                                num_workers=self.config.num_workers)
            batches = (items["image"] for items in loader)
        chunks = []
        for start, images in zip(starts, batches):
            with self._autocast():
                outputs = self._forward(self._to_device(images), self._features(positions[start:start + size]))
            chunks.append(outputs.float().cpu())
        return torch.cat(chunks).double().numpy()

    def _cindex(self, outputs: np.ndarray, positions: np.ndarray) -> float:
        try:
            return harrell_c(self.data.time[positions], self.data.event[positions], self.head.score(outputs))
        except SurvivalDataError:
            return float("nan")

    def step(self) -> dict:
        """Train one epoch, validate, checkpoint; returns the epoch's record."""
        if self.finished:
            raise StudyError(f"fold {self.data.fold} has already finished")
        train_loss = self._train_epoch()
        outputs = self.predict(self.data.val)
        if not np.isfinite(outputs).all():
            raise TrainingDivergedError(f"fold {self.data.fold}, epoch {self.epoch}: the validation predictions "
                                        f"became NaN/inf (lr {self.optimizer.param_groups[0]['lr']:.3g}); training stopped")
        cindex = self._cindex(outputs, self.data.val)
        self.last_val_outputs = outputs
        select_cindex = self._cindex(self.predict(self.select), self.select) if len(self.select) else float("nan")
        record = {"epoch": self.epoch, "train_loss": train_loss, "val_cindex": cindex,
                  "select_cindex": select_cindex, "lr": self.optimizer.param_groups[0]["lr"]}
        self.history.append(record)
        score = select_cindex if np.isfinite(select_cindex) else -math.inf
        # Without a usable selection split (or before its C-index is defined) the latest epoch wins.
        if score > self.best_score or self.best_score == -math.inf:
            self.best_score, self.best_cindex, self.best_epoch = score, cindex, self.epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best_val_outputs = outputs
        self.epoch += 1
        patience = self.config.patience
        if patience and self.epoch - 1 - self.best_epoch >= patience:
            self.stopped_early = True
        if self.checkpoint:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(self._state(), self.checkpoint)
        return record

    def result(self) -> FoldResult:
        """Out-of-fold predictions and the fold model of the selected epoch (call when `finished`)."""
        if self.best_state is None:
            raise StudyError(f"fold {self.data.fold}: no epoch was trained")
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.best_state)
        train_outputs = self.predict(self.fit)
        self.model.load_state_dict(current)
        data = self.data
        # The head's baseline (and so the DPI's zero point) comes from this fold's training patients only.
        self.head.fit(train_outputs, data.time[self.fit], data.event[self.fit])
        model = FoldModel.from_training(data.fold, self.config, len(data.store.sequences),
                                        {k: v.cpu() for k, v in self.best_state.items()}, self.head, self.encoder)
        outputs = self.best_val_outputs
        val = data.val
        frame = pd.DataFrame({
            "patient_id": [data.patient_ids[i] for i in val],
            "fold": data.fold,
            "time": data.time[val],
            "event": data.event[val].astype(int),
            "risk": self.head.risk(outputs),
            "surv_365": self.head.surv_365(outputs),
        })
        curves = self.head.survival(outputs, np.asarray(self.config.eval_times))
        for k, t in enumerate(self.config.eval_times):
            frame[f"surv_t{int(t)}"] = curves[:, k]
        return FoldResult(data.fold, list(self.history), self.best_epoch, self.best_cindex, frame, model)


def train_fold(data: FoldData, config: TrainConfig, checkpoint: Path | None = None) -> FoldResult:
    """Train a fold to the end (resuming from `checkpoint` if it exists) and return its result."""
    trainer = FoldTrainer(data, config, checkpoint)
    while not trainer.finished:
        trainer.step()
    return trainer.result()
