"""The fold trainer: learns the synthetic imaging signal, resumes exactly, refuses bad state."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation.metrics import brier_score, harrell_c
from datasets import Cohort, CohortSpec, InputError
from trainables.config import TrainConfig
from trainables.fold import FoldData, FoldTrainer, TrainingDivergedError, train_fold

TINY = dict(backbone="seresnext50", width=0.25, depth=0.34, batch_size=8, warmup_epochs=1, lr=1e-3,
            weight_decay=1e-4, augmentation=0.5, cox_memory=0)


def _fold_data(store, spec=CohortSpec(), fold=0, k=5, volumes=True) -> FoldData:
    cohort = Cohort(store, spec)
    return FoldData.from_cohort(cohort, cohort.folds(k, seed=0), fold,
                                cohort.store.images(cohort.slots) if volumes else None)


@pytest.mark.slow
def test_fold_learns_the_imaging_signal(learnable_store):
    data = _fold_data(learnable_store)
    result = train_fold(data, TrainConfig(epochs=12, batch_size=16, **{k: v for k, v in TINY.items() if k != "batch_size"}))
    # The network learns the imaging signal (validation C well above 0.5 during training); the
    # predictions are the last epoch's.
    assert max(h["val_cindex"] for h in result.history) > 0.6, result.history
    assert result.best_epoch == 11
    oof = result.predictions
    assert list(oof.columns[:6]) == ["patient_id", "fold", "time", "event", "risk", "surv_365"]
    assert len(oof) == len(data.val)
    # The reported metric is recomputable from the predictions (the DPI orders patients as the raw output).
    assert harrell_c(oof["time"], oof["event"], oof["risk"]) == pytest.approx(result.best_cindex)
    assert oof["surv_365"].between(0, 1).all()
    assert np.isfinite(brier_score(oof["time"], oof["event"], oof["surv_365"], 365.0)).all()


@pytest.mark.parametrize("head, endpoint", [("logistic_hazard", "os"), ("binary", "1yr")])
def test_other_heads_train_and_predict(small_store, head, endpoint):
    data = _fold_data(small_store, CohortSpec("all", endpoint), k=2)
    result = train_fold(data, TrainConfig(head=head, epochs=2, **TINY))
    curves = result.predictions.filter(like="surv_t").to_numpy()
    assert curves.shape == (len(data.val), 6)
    assert (np.diff(curves, axis=1) <= 1e-12).all(), "survival curves do not increase"
    assert result.predictions["surv_365"].between(0, 1).all()


def test_resume_from_checkpoint_equals_uninterrupted_run(small_store, tmp_path):
    config = TrainConfig(epochs=3, **TINY)
    straight = train_fold(_fold_data(small_store, k=2), config, tmp_path / "a.pt")
    first = FoldTrainer(_fold_data(small_store, k=2), config, tmp_path / "b.pt")
    first.step()
    del first  # "killed" after one epoch
    resumed = FoldTrainer(_fold_data(small_store, k=2), config, tmp_path / "b.pt")
    assert resumed.epoch == 1
    while not resumed.finished:
        resumed.step()
    again = resumed.result()
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in straight.history]
    pd.testing.assert_frame_equal(again.predictions, straight.predictions)


def test_training_is_deterministic_on_cpu(small_store):
    config = TrainConfig(epochs=2, **TINY)
    a = train_fold(_fold_data(small_store, k=2, volumes=False), config)
    b = train_fold(_fold_data(small_store, k=2, volumes=False), config)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)


def test_nan_loss_stops_the_fold_with_a_clear_error(small_store):
    data = _fold_data(small_store, k=2)
    data.volumes = data.volumes.copy()
    data.volumes[:, :, 0, 0, 0] = np.inf
    with pytest.raises(TrainingDivergedError, match="fold 0, epoch 0: the loss became nan"):
        train_fold(data, TrainConfig(epochs=1, **{**TINY, "augmentation": 0.0}))


@pytest.mark.parametrize("values, message", [
    ({"backbone": "vgg"}, "unknown backbone 'vgg'"),
    ({"head": "aft"}, "unknown head 'aft'"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"learning_rate": 0.1}, r"unknown training parameter\(s\) \['learning_rate'\]"),
    ({"patience": 5}, "patience 5 needs a selection split"),
    ({"cut_spacing": "log"}, "cut_spacing must be one of"),
])
def test_config_rejects_bad_values(values, message):
    with pytest.raises(InputError, match=message):
        TrainConfig.from_dict(values)


def test_best_epoch_is_chosen_without_the_validation_fold(learnable_store):
    data = _fold_data(learnable_store)
    assert len(FoldTrainer(data, TrainConfig(epochs=1, **TINY)).select) == 0  # default: the last epoch
    trainer = FoldTrainer(data, TrainConfig(epochs=1, selection_fraction=0.15, **TINY))
    assert len(trainer.select) == pytest.approx(0.15 * len(data.train), abs=2)
    assert not set(trainer.select) & set(data.val) and not set(trainer.select) & set(trainer.fit)
    assert sorted([*trainer.fit, *trainer.select]) == sorted(data.train)
    selected_events = data.event[trainer.select].mean()
    assert abs(selected_events - data.event[data.train].mean()) < 0.1, "stratified by event"


def test_early_stopping(learnable_store):
    trainer = FoldTrainer(_fold_data(learnable_store), TrainConfig(epochs=30, patience=2, selection_fraction=0.15,
                                                                   **{**TINY, "lr": 1e-7}))
    while not trainer.finished:
        trainer.step()
    assert trainer.stopped_early and trainer.epoch < 30
    assert trainer.epoch - 1 - trainer.best_epoch == 2


def test_unknown_placement_or_precision_is_refused():
    from trainables.batches import VolumeCache

    with pytest.raises(ValueError, match="placement must be one of"):
        VolumeCache(np.zeros((2, 1, 2, 2, 2), np.float16), "cpu", "gpu")
    with pytest.raises(InputError, match="volume_placement must be one of"):
        TrainConfig(volume_placement="gpu")
    with pytest.raises(InputError, match="precision must be auto, bf16 or fp32"):
        TrainConfig(precision="fp16")


def test_auto_precision_is_bf16_on_a_gpu_and_float32_on_a_cpu():
    import torch

    from trainables.fold import resolve_precision

    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("head, endpoint", [("cox", "os"), ("logistic_hazard", "os"), ("binary", "1yr")])
def test_fold_model_reproduces_the_out_of_fold_predictions_after_a_round_trip(small_store, tmp_path, head, endpoint):
    from trainables.fold_model import FoldModel

    data = _fold_data(small_store, CohortSpec("all", endpoint), k=2)
    result = train_fold(data, TrainConfig(head=head, epochs=1, **TINY))
    result.model.save(tmp_path / "fold0_model.pt")
    loaded = FoldModel.load(tmp_path / "fold0_model.pt")
    predicted = loaded.predict(data.volumes[data.val], TrainConfig().eval_times)
    np.testing.assert_allclose(predicted["risk"], result.predictions["risk"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predicted["surv_365"], result.predictions["surv_365"], rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(Exception, match="cannot be read"):
        FoldModel.load(tmp_path / "bad.pt")
