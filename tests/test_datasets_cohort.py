"""Cohorts (filters, endpoints), folds, sequence matching, synthetic cohorts and the torch Dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines.utils import concordance_index

from datasets import Cohort, CohortSpec, InputError, evaluate_filter, stratified_folds
from datasets.torch_data import CohortDataset
from datasets.sequences import SequenceMatcher
from datasets.synthetic import clinical_variables, linear_predictors, survival, tumour_features
from datasets.torch_data import training_augmentation

TABLE = pd.DataFrame({"grade": [2, 3, 4, 4, np.nan], "idh": [1, 1, 0, 1, 0], "age": [30, 45, 70, 60, 50]})


@pytest.mark.parametrize("expression, expected", [
    ("all", [1, 1, 1, 1, 1]),
    ("grade >= 3", [0, 1, 1, 1, 0]),
    ("grade >= 3 and idh == 0", [0, 0, 1, 0, 0]),
    ("not (grade == 4) or age > 65", [1, 1, 1, 0, 1]),
    ("40 < age <= 60", [0, 1, 0, 1, 1]),
])
def test_filter_expressions(expression, expected):
    assert evaluate_filter(expression, TABLE).astype(int).tolist() == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('x')", "is not a comparison"),
    ("grade >", "not a valid expression"),
    ("weight > 3", "unknown column 'weight'"),
    ("grade in [3, 4]", "operator In is not allowed"),
    ("grade == 'IV'", "is not a column or a number"),
])
def test_filter_expressions_are_parsed_not_evaluated(expression, message):
    with pytest.raises(InputError, match=message):
        evaluate_filter(expression, TABLE)


def test_cohort_filters_and_one_year_endpoint(small_store):
    everyone = Cohort(small_store)
    gbm = Cohort(small_store, CohortSpec("glioblastoma", "os"))
    assert 0 < len(gbm) < len(everyone) == 12
    assert (gbm.clinical["glioblastoma"] == 1).all()
    one_year = Cohort(small_store, CohortSpec("all", "1yr"))
    # Administrative censoring at day 365 with every patient kept (as the reference study did).
    assert one_year.patient_ids == everyone.patient_ids and one_year.horizon == 365 and everyone.horizon is None
    np.testing.assert_array_equal(one_year.time, np.minimum(everyone.time, 365))
    np.testing.assert_array_equal(one_year.event, ((everyone.event == 1) & (everyone.time <= 365)).astype(int))
    gbm_one_year = Cohort(small_store, CohortSpec("glioblastoma", "1yr"))
    assert gbm_one_year.patient_ids == gbm.patient_ids
    with pytest.raises(InputError, match="no patient left after filter 'age > 200'"):
        Cohort(small_store, CohortSpec("age > 200"))


def test_folds_are_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    ids = [f"P{i:04d}" for i in range(1100)]
    strata = rng.integers(0, 4, size=1100)
    folds = stratified_folds(ids, strata, 10, seed=3)
    assert (folds == stratified_folds(ids, strata, 10, seed=3)).all()
    assert not (folds == stratified_folds(ids, strata, 10, seed=4)).all()
    for s in range(4):
        counts = np.bincount(folds[strata == s], minlength=10)
        assert counts.max() - counts.min() <= 1
    # Same folds whatever order the store holds the patients in.
    order = rng.permutation(1100)
    shuffled = stratified_folds([ids[i] for i in order], strata[order], 10, seed=3)
    assert (shuffled == folds[order]).all()


def test_fold_without_event_is_refused(small_store):
    cohort = Cohort(small_store)
    with pytest.raises(InputError, match="20 folds would hold fewer than two patients each"):
        cohort.folds(20)
    few = Cohort(small_store, CohortSpec("event == 1 and time < 300"))
    few.event = np.zeros(len(few), dtype=int)
    with pytest.raises(InputError, match="has no event"):
        few.folds(2)


@pytest.mark.parametrize("name, patient, key", [
    ("BraTS20_Training_001_t1ce.nii.gz", "BraTS20_Training_001", "t1c"),
    ("BraTS20_Training_001_t1.nii.gz", "BraTS20_Training_001", "t1"),
    ("BraTS20_Training_001_flair.nii.gz", "BraTS20_Training_001", "flair"),
    ("BraTS20_Training_001_seg.nii.gz", "BraTS20_Training_001", "label"),
    ("BraTS-GLI-00000-000-t1c.nii.gz", "BraTS-GLI-00000-000", "t1c"),
    ("BraTS-GLI-00000-000-t2f.nii.gz", "BraTS-GLI-00000-000", "flair"),
    ("t1ce.nii.gz", "P1", "t1c"),
    ("T2.nii", "P1", "t2"),
    ("t1c.nrrd", "TCGA-02-0003", "t1c"),
    ("tumor_label.nrrd", "TCGA-02-0003", "label"),
    ("notes.nii.gz", "P1", None),
])
def test_sequence_file_names(name, patient, key):
    assert SequenceMatcher().key_for(name, patient) == key


def test_custom_pattern():
    matcher = SequenceMatcher(patterns={"t1c": r"mprage_gd"})
    assert matcher.key_for("P1_MPRAGE_GD.nii.gz", "P1") == "t1c"


def test_synthetic_survival_model_matches_its_documentation():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2000):
        clinical = clinical_variables(rng, False)
        tumour = tumour_features(rng, clinical["grade"])
        lp_c, lp_i = linear_predictors(clinical, tumour, 1.0)
        time, event = survival(rng, lp_c + lp_i)
        rows.append((time, event, lp_c, lp_i, clinical["glioblastoma"], clinical["idh"], clinical["grade"]))
    time, event, lp_c, lp_i, gbm, idh, grade = map(np.array, zip(*rows))
    assert 0.2 <= 1 - event.mean() <= 0.4
    assert (gbm == ((grade == 4) & (idh == 0))).all()
    oracle = concordance_index(time, -(lp_c + lp_i), event)
    clinical_only = concordance_index(time, -lp_c, event)
    assert oracle > clinical_only + 0.03, "the imaging part carries information beyond the clinical part"
    _, lp_zero = linear_predictors({"age": 55, "grade": 2, "idh": 0, "mgmt": 0}, {"tumour_volume_ml": 100, "necrosis_fraction": 0.5}, 0.0)
    assert lp_zero == 0.0


def test_synthetic_export_is_deterministic(small_export, tmp_path):
    from datasets.synthetic import SyntheticConfig, generate

    generate(tmp_path, SyntheticConfig(n=2, voxel_size=6.0, seed=1))
    again = (tmp_path / "images" / "SYN-0002" / "SYN-0002_t1.nii.gz").read_bytes()
    import gzip

    assert gzip.decompress(again) == gzip.decompress((small_export / "images" / "SYN-0002" / "SYN-0002_t1.nii.gz").read_bytes())
    truth = pd.read_csv(small_export / "truth.csv")
    assert {"lp", "lp_clinical", "lp_imaging"} <= set(truth.columns)
    assert "lp" not in pd.read_csv(small_export / "clinical.csv").columns


def test_dataset_with_two_dataloader_workers(small_store):
    cohort = Cohort(small_store)
    store = cohort.store
    store.image(0)  # zarr opened in the parent before the workers fork: must not deadlock
    dataset = CohortDataset(store, cohort.slots, cohort.time, cohort.event, transform=training_augmentation(1.0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, timeout=60)
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == 12
    assert batches[0]["image"].shape == (4, 4, 32, 32, 24) and batches[0]["image"].dtype == torch.float32
    plain = CohortDataset(store, cohort.slots, cohort.time, cohort.event)
    np.testing.assert_array_equal(plain[3]["image"].numpy(), store.image(int(cohort.slots[3])).astype(np.float32))
    cached = CohortDataset(store, cohort.slots, cohort.time, cohort.event, volumes=store.images(cohort.slots))
    assert torch.equal(cached[3]["image"], plain[3]["image"])
    assert plain[3]["time"].item() == pytest.approx(cohort.time[3])
