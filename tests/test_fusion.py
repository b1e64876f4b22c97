"""Images and clinical factors together: the clinical encoding, the fusion network and its folds,
the inputs axis of a study, and the clinical-only Cox model it is compared with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.inputs_comparison import clinical_oof, compare, paired_difference
from evaluation.metrics import harrell_c
from datasets import Cohort, CohortSpec, InputError
from datasets.clinical_features import ClinicalEncoder
from trainables.config import TrainConfig
from trainables.fold import FoldData, FoldTrainer

TINY = dict(backbone="densenet121", width=0.25, depth=0.2, batch_size=8, warmup_epochs=1, lr=1e-2, epochs=2,
            augmentation=0.5, inputs="image+clinical")


def _frame(n=200, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"age": rng.normal(55, 12, n), "sex": rng.integers(0, 2, n).astype(float),
                          "grade": rng.choice([2.0, 3.0, 4.0], n), "idh": rng.integers(0, 2, n).astype(float),
                          "mgmt": rng.integers(0, 2, n).astype(float)})
    frame["glioblastoma"] = ((frame["grade"] == 4) & (frame["idh"] == 0)).astype(float)
    return frame


def test_encoder_uses_only_training_statistics_and_keeps_missing_values():
    train, other = _frame(100, 0), _frame(50, 1)
    train.loc[3, "idh"] = np.nan
    encoder = ClinicalEncoder.learn(train, ["age", "grade", "idh"])
    assert encoder.feature_names() == ["age", "grade=3", "grade=4", "idh", "idh_missing"]
    coded = encoder.encode(train)
    # Standardised on the training patients: mean 0, SD 1 there (the missing value sits at the mean).
    assert coded[:, 0].mean() == pytest.approx(0, abs=1e-5) and coded[:, 0].std() == pytest.approx(1, abs=1e-4)
    assert coded[3, 3] == 0 and coded[3, 4] > 0 and (np.delete(coded[:, 4], 3) < 0).all()
    # Another cohort's values never change the encoding: encoding it twice, alone or with the
    # training patients, gives the same rows; its statistics are not those of the training set.
    alone = encoder.encode(other)
    together = encoder.encode(pd.concat([train, other], ignore_index=True))[len(train):]
    np.testing.assert_array_equal(alone, together)
    shifted = other.assign(age=other["age"] + 30)
    assert encoder.encode(shifted)[:, 0].mean() > 2  # not re-standardised on the new patients
    # A level never seen in training counts as missing; a patient with a missing IDH is kept.
    odd = other.head(2).assign(grade=[5.0, np.nan], idh=[np.nan, 1.0])
    assert encoder.encode(odd).shape == (2, len(encoder))
    assert (encoder.encode(odd)[:, 1:3] == 0).all()
    restored = ClinicalEncoder.from_state(encoder.state())
    np.testing.assert_array_equal(restored.encode(other), alone)


def test_encoder_skips_constant_columns_and_refuses_none_usable():
    frame = _frame(50).assign(glioblastoma=1.0)
    encoder = ClinicalEncoder.learn(frame, ["age", "glioblastoma"])
    assert encoder.columns == ["age"] and "constant" in encoder.skipped["glioblastoma"]
    with pytest.raises(InputError, match="no usable clinical input"):
        ClinicalEncoder.learn(frame[["glioblastoma"]], ["glioblastoma", "kps"])
    with pytest.raises(InputError, match="not stored clinical columns"):
        ClinicalEncoder.learn(frame, ["age", "shoe_size"])


def _fold(store) -> FoldData:
    cohort = Cohort(store, CohortSpec())
    return FoldData.from_cohort(cohort, cohort.folds(3, seed=0), 0, cohort.store.images(cohort.slots))


def test_fusion_fold_trains_on_training_statistics_keeps_missing_and_reloads(small_store, tmp_path):
    data = _fold(small_store)
    data.clinical = data.clinical.copy()
    val_patient = data.val[0]
    data.clinical.iloc[val_patient, data.clinical.columns.get_loc("idh")] = np.nan
    trainer = FoldTrainer(data, TrainConfig(**TINY))
    # The encoding is learned on the fitting patients only: its means are theirs.
    fit_ages = data.clinical["age"].to_numpy()[trainer.fit]
    assert trainer.encoder.mean[trainer.encoder.columns.index("age")] == pytest.approx(fit_ages.mean())
    while not trainer.finished:
        trainer.step()
    result = trainer.result()
    oof = result.predictions
    assert data.patient_ids[val_patient] in set(oof["patient_id"]) and np.isfinite(oof["risk"]).all()
    assert len(oof) == len(data.val)
    # The clinical branch learned something (it starts at zero).
    assert result.model.network.clinical[-1].weight.abs().sum() > 0
    path = tmp_path / "fold0_model.pt"
    result.model.save(path)
    from trainables.fold_model import FoldModel

    loaded = FoldModel.load(path)
    assert loaded.inputs == "image+clinical"
    rows = data.clinical.iloc[data.val]
    predicted = loaded.predict(data.volumes[data.val], TrainConfig().eval_times, rows)
    np.testing.assert_allclose(predicted["risk"], oof["risk"], rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="clinical inputs"):
        loaded.predict(data.volumes[data.val], TrainConfig().eval_times)
    # Grad-CAM looks at the image branch, the same network an image-only model would have.
    assert loaded.image_network is loaded.network.image


def test_fusion_output_is_the_image_output_plus_a_clinical_term():
    from trainables.backbones import build_backbone
    from trainables.fusion import FusionNetwork

    torch.manual_seed(0)
    image = build_backbone("seresnext50", 2, 1, width=0.25, depth=0.2).eval()
    network = FusionNetwork(image, 3, 1).eval()
    x, c = torch.randn(4, 2, 16, 16, 16), torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(network(x, c), image(x))  # the clinical read-out starts at zero
        network.clinical[-1].weight.fill_(1.0)
        np.testing.assert_allclose(network(x, c) - image(x), c.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_cells_of_a_study_with_both_inputs():
    from datasets.clinical_features import FUSION_PARAMS
    from search_spaces import Cell
    from study.config import resolve
    from study.run import build_parser
    from study.config import fixed_parameters
    from study.tuning import cell_search, per_cell_limit

    config = resolve(build_parser().parse_args(["--space", "literature_priors", "--budget", "full",
                                                "--inputs", "image", "image+clinical", "--tasks", "os_all",
                                                "--backbones", "densenet121", "--clinical-inputs", "age", "idh"]))
    cells = config.cells()
    assert [c.name for c in cells] == ["densenet121__os_all", "densenet121-clinical__os_all"]
    image, fusion = (fixed_parameters(config, c) for c in cells)
    assert image["inputs"] == "image" and not set(FUSION_PARAMS) & set(image)
    assert fusion["inputs"] == "image+clinical" and fusion["clinical_inputs"] == ["age", "idh"]
    search = cell_search(config)
    first = [search.suggest(f"t{i}") for i in range(per_cell_limit(config.num_samples) + 1)]  # the first cell's cap
    by_inputs = {s["inputs"]: s for s in reversed(first)}  # each cell's first (reference) configuration
    assert "clinical_hidden" in by_inputs["image+clinical"] and "clinical_hidden" not in by_inputs["image"]
    assert Cell.of(by_inputs["image+clinical"]).name == "densenet121-clinical__os_all"
    TrainConfig.from_dict({k: v for k, v in by_inputs["image+clinical"].items() if k != "task"})
    with pytest.raises(InputError, match="--inputs"):
        resolve(build_parser().parse_args(["--inputs", "clinical"]))
    with pytest.raises(InputError, match="--clinical-inputs"):
        resolve(build_parser().parse_args(["--clinical-inputs", "height"]))


def test_image_clinical_study_on_a_store_without_clinical_columns_exits_2_naming_it(small_export, small_store, tmp_path,
                                                                                   capsys):
    from datasets.convert import convert
    from study.run import main
    from tests.conftest import TINY as PREPROCESS

    table = pd.read_csv(small_export / "clinical.csv")[["patient_id", "survival_days", "death"]]
    table.to_csv(tmp_path / "outcome_only.csv", index=False)
    store = tmp_path / "outcome_only.zarr"
    convert(small_export / "images", tmp_path / "outcome_only.csv", store, PREPROCESS, progress=False)
    code = main(["--data", str(store), "--inputs", "image+clinical", "--tasks", "os_all", "--storage-path",
                 str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "image+clinical" in err and str(store) in err and "none" in err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    # The same store as an external cohort of a fusion study: its models would see only training means.
    code = main(["--space", "smoke", "--data", str(small_store), "--external", str(store), "--inputs",
                 "image+clinical", "--tasks", "os_all", "--storage-path", str(tmp_path / "ray"), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"--external {store}" in err, err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_clinical_cox_in_the_networks_folds_recovers_the_clinical_signal():
    rng = np.random.default_rng(0)
    frame = _frame(600, 2)
    lp = 0.035 * (frame["age"] - 55) + 0.9 * (frame["grade"] == 4) - 0.7 * frame["idh"]
    time = 900 * (-np.log(rng.uniform(size=len(frame))) / np.exp(lp)) ** (1 / 1.2)
    follow = rng.uniform(365, 6 * 365, len(frame))
    frame = frame.assign(patient_id=[f"P{i}" for i in range(len(frame))], time=np.minimum(time, follow),
                         event=(time <= follow).astype(int), fold=np.arange(len(frame)) % 5)
    frame.loc[::7, "idh"] = np.nan  # missing values: kept, with an indicator
    oof, fits = clinical_oof(frame, ["age", "sex", "grade", "idh", "mgmt"])
    assert len(oof) == len(frame) and len(fits) == 5
    oracle = harrell_c(frame["time"], frame["event"], lp)
    assert harrell_c(oof["time"], oof["event"], oof["risk"]) > oracle - 0.03
    # The risk is calibrated per fold (log H(365)): it matches exp(-H) and does not depend on the fold's centring.
    np.testing.assert_allclose(oof["surv_365"], np.exp(-np.exp(oof["risk"])), rtol=1e-9)
    summary, differences = compare(frame[["patient_id", "time", "event"]],
                                   {"clinical": oof, "noise": oof.assign(risk=rng.normal(size=len(oof)))}, None,
                                   n_resamples=200)
    assert list(summary["model"]) == ["clinical", "noise"]
    assert differences.loc[0, "CI excludes 0"]


def test_paired_difference_is_zero_for_a_model_against_itself_and_covers_a_known_gap():
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(size=n)
    time = rng.exponential(np.exp(-x))
    event = np.ones(n, dtype=int)
    same = paired_difference(time, event, x, x, n_resamples=200)
    assert same.value == 0 and same.low == 0 and same.high == 0
    better = paired_difference(time, event, x, x + rng.normal(scale=2.0, size=n), n_resamples=300)
    assert better.low > 0
