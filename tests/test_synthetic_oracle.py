"""The synthetic cohort's oracle of what the images can tell (issue 28 point 3).

The generator records E[lp | image content] (`datasets.synthetic`, derived from its own model);
these tests check the derivation against simulation and run the known-answer check of
`benchmarks.image_oracle` with fewer patients: no predictor fitted to what the images show beats
it by more than its sampling error, while the imaging effect term alone (the old "imaging
oracle") is beaten, and with imaging effect 0 the images still predict.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.oracle import ROW, ceiling, oracle_from_truth, oracle_text
from benchmarks.image_oracle import FITTED, check
from datasets.synthetic import (GRADES, SyntheticConfig, clinical_given_grade, clinical_variables, generate,
                                grade_posterior, latent_cohort, linear_predictors)

PATIENTS = 6000  # the benchmark uses 20,000


def test_the_image_free_draw_is_the_renderers_and_truth_records_the_image_content(tmp_path):
    for site_shift in (False, True):
        config = SyntheticConfig(n=2, voxel_size=8.0, seed=4, site_shift=site_shift, imaging_effect=0.7)
        generate(tmp_path / str(site_shift), config)
        truth = pd.read_csv(tmp_path / str(site_shift) / "truth.csv").set_index("patient_id")
        clinical = pd.read_csv(tmp_path / str(site_shift) / "clinical.csv").set_index("patient_id")
        latent = latent_cohort(config).set_index("patient_id")
        assert {"lp_clinical", "lp_imaging", "lp", "lp_image_content", "imaging_effect", "site_shift"} <= set(truth)
        assert (truth["imaging_effect"] == 0.7).all() and (truth["site_shift"] == site_shift).all()
        columns = ["lp_clinical", "lp_imaging", "lp", "lp_image_content", "tumour_volume_ml", "necrosis_fraction"]
        np.testing.assert_allclose(truth[columns].to_numpy(float), latent[columns].to_numpy(float), rtol=1e-12)
        assert (truth["enhancing"].to_numpy() == latent["enhancing"].to_numpy()).all()
        for column in ("age", "grade", "idh", "mgmt", "sex", "pathology"):
            assert (clinical[column].to_numpy() == latent[column].to_numpy()).all(), column


@pytest.mark.parametrize("site_shift", [False, True])
def test_the_clinical_part_given_the_grade_is_the_generators(site_shift):
    """P(grade) and E[lp_clinical | grade], summed over the generator's joint distribution, against
    40,000 draws of its clinical variables."""
    rng = np.random.default_rng(11)
    rows = []
    for _ in range(40_000):
        clinical = clinical_variables(rng, site_shift)
        rows.append((clinical["grade"], linear_predictors(clinical, {"tumour_volume_ml": 30.0,
                                                                     "necrosis_fraction": 0.2}, 0.0)[0]))
    frame = pd.DataFrame(rows, columns=["grade", "lp"])
    table = clinical_given_grade(site_shift)
    assert table["p"].sum() == pytest.approx(1.0, abs=1e-9)
    for grade, group in frame.groupby("grade"):
        p = len(group) / len(frame)
        assert abs(table.loc[grade, "p"] - p) < 4 * np.sqrt(p * (1 - p) / len(frame)), grade
        assert abs(table.loc[grade, "lp_clinical"] - group["lp"].mean()) < 4 * group["lp"].std() / np.sqrt(len(group))
        assert abs(table.loc[grade, "exp_lp_clinical"] - np.exp(group["lp"]).mean()) \
            < 4 * np.exp(group["lp"]).std() / np.sqrt(len(group))


def test_the_grade_posterior_given_the_image_is_calibrated():
    cohort = latent_cohort(SyntheticConfig(n=4000, seed=3))
    posterior = grade_posterior(cohort["tumour_volume_ml"], cohort["necrosis_fraction"], cohort["enhancing"])
    np.testing.assert_allclose(posterior.sum(axis=1), 1.0)
    assert (posterior[~cohort["enhancing"].to_numpy(bool), GRADES.index(4)] == 0).all()  # grade 4 always enhances
    for column, grade in enumerate(GRADES):
        observed = (cohort["grade"] == grade).to_numpy()
        p = posterior[:, column]
        for low, high in ((0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.01)):
            inside = (p >= low) & (p < high)
            if inside.sum() < 100:
                continue
            se = np.sqrt((p[inside] * (1 - p[inside])).sum()) / inside.sum()
            assert abs(observed[inside].mean() - p[inside].mean()) < 4 * se + 1e-3, (grade, low, high)
    # E[lp | image] is the conditional mean of the true lp: its residual has mean 0 in every decile.
    content, lp = cohort["lp_image_content"].to_numpy(), cohort["lp"].to_numpy()
    deciles = pd.qcut(content, 10, labels=False)
    residual = pd.Series(lp - content).groupby(deciles)
    assert (residual.mean().abs() < 4 * residual.std() / np.sqrt(residual.size())).all()


def test_no_predictor_fitted_to_what_the_images_show_beats_the_image_content_oracle():
    result = check(1.0, PATIENTS, resamples=100, seed=0)
    table = result["table"]
    se = table.loc["lp_image_content", "SE"]
    assert all(result["verdicts"].values()), result["verdicts"]
    assert (table.loc[list(FITTED), "C - oracle"] <= se).all(), table
    # The old imaging oracle (the imaging effect term alone) is beaten by every fitted predictor.
    assert (table.loc[list(FITTED), "C"] > table.loc["lp_imaging", "C"] + 0.01).all(), table
    assert table.loc["lp_image_content", "C"] > table.loc["lp_imaging", "C"] + 0.015
    assert table.loc["lp_image_content", "C"] < table.loc["lp", "C"] - 0.02  # the images do not tell everything


def test_with_imaging_effect_zero_the_images_still_predict():
    result = check(0.0, PATIENTS, resamples=100, seed=0)
    table = result["table"]
    assert all(result["verdicts"].values()), result["verdicts"]
    assert table.loc["lp_imaging", "C"] == 0.5
    assert table.loc["lp_image_content", "C"] > 0.6
    assert (table.loc[list(FITTED), "C"] > 0.6).all()
    assert (table.loc[list(FITTED), "C - oracle"] <= table.loc["lp_image_content", "SE"]).all(), table


def test_within_glioblastoma_the_oracle_is_what_the_images_tell_there():
    """The grade of a glioblastoma is known: E[lp | image, glioblastoma] ranks as the imaging term
    does, and no predictor fitted on glioblastomas beats it."""
    assert clinical_given_grade(False, "glioblastoma").loc[[2, 3], "p"].eq(0).all()
    result = check(1.0, PATIENTS, resamples=100, seed=0, cohort_filter="glioblastoma")
    table = result["table"]
    assert result["patients"] < PATIENTS * 0.6
    assert next(iter(result["verdicts"].values())), result["verdicts"]
    assert table.loc["lp_image_content", "C"] == pytest.approx(table.loc["lp_imaging", "C"], abs=1e-12)
    assert table.loc["lp_image_content", "C"] >= table.loc["lp_image_content_whole", "C"]
    assert (table.loc[list(FITTED), "C - oracle"] <= table.loc["lp_image_content", "SE"]).all(), table


def test_the_report_oracle_follows_each_tasks_filter():
    cohort = latent_cohort(SyntheticConfig(n=400, seed=5))
    truth = cohort.set_index("patient_id")
    everyone = SimpleNamespace(time=truth["survival_days"].to_numpy(), event=truth["death"].to_numpy(),
                               patient_ids=list(truth.index), spec=SimpleNamespace(filter="all"))
    gbm = truth[truth["glioblastoma"] == 1]
    glioblastoma = SimpleNamespace(time=gbm["survival_days"].to_numpy(), event=gbm["death"].to_numpy(),
                                   patient_ids=list(gbm.index), spec=SimpleNamespace(filter="glioblastoma"))
    on_outcome = SimpleNamespace(**{**vars(everyone), "spec": SimpleNamespace(filter="time > 100")})
    oracle = oracle_from_truth(truth, {"os_all": everyone, "os_gbm": glioblastoma, "odd": on_outcome})
    assert oracle["os_all"]["image_content"] > oracle["os_all"]["imaging_term"]
    assert oracle["os_gbm"]["image_content"] == pytest.approx(oracle["os_gbm"]["imaging_term"], abs=1e-12)
    assert "image_content" not in oracle["odd"]  # a filter on the outcome: no image-content oracle


def test_the_oracle_of_an_older_truth_falls_back_and_says_so():
    rng = np.random.default_rng(0)
    ids = [f"SYN-{i:04d}" for i in range(1, 41)]
    truth = pd.DataFrame({"lp_clinical": rng.normal(size=40), "lp_imaging": rng.normal(size=40)}, index=ids)
    truth["lp"] = truth["lp_clinical"] + truth["lp_imaging"]
    cohort = SimpleNamespace(time=rng.uniform(10, 900, 40), event=rng.random(40) < 0.7, patient_ids=ids)
    old = oracle_from_truth(truth, {"os_all": cohort})["os_all"]
    assert set(old) == {"clinical", "imaging_term", "total"}
    assert "n/a (older truth.csv or outcome filter; imaging effect term only" in oracle_text(old)
    assert ceiling(old, "image") is None and ceiling(old, "image+clinical") == old["total"]
    new = oracle_from_truth(truth.assign(lp_image_content=truth["lp_imaging"] + 0.3 * truth["lp_clinical"]),
                            {"os_all": cohort})["os_all"]
    assert set(new) == {"clinical", "image_content", "imaging_term", "total"}
    assert oracle_text(new) == f"{new['clinical']:.3f} / {new['image_content']:.3f} / {new['total']:.3f}"
    assert ceiling(new, "image") == new["image_content"]
    assert "image content" in ROW
