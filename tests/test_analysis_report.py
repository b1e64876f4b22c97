"""The report on a real (small) tracked study: every table against independent recomputation,
the Kaplan-Meier cut-off discipline, Grad-CAM files, and clear errors."""

from __future__ import annotations

import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.statistics import logrank_test
from mlflow.tracking import MlflowClient

from evaluation import metric_names as names
from analysis.added_value import added_value, calibration, default_covariates
from evaluation.metrics import harrell_c
from analysis.inputs_comparison import CLINICAL_MODEL, clinical_oof
from analysis.report import build_report, main
from analysis.study_reader import ReportError, oof_predictions, read_study
from datasets import CohortStore
from datasets.clinical_features import FUSION_DEFAULT
from search_spaces import Cell
from study.run import main as study_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reported(learnable_store, small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    assert study_main(["--space", "smoke", "--data", str(learnable_store), "--tasks", "os_all", "--backbones",
                       "seresnext50", "resnet50_cbam", "--num-samples", "2", "--inputs", "image", "image+clinical",
                       "--tracking-uri", uri, "--register-models",
                       "--storage-path", str(root / "rr"), "--name", "rep"]) == 0
    # The same external store given twice (and once more through a relative path) appears once.
    index = build_report("rep", uri, root / "report", external=[small_store, small_store], gradcam_patients=1)
    return root, uri, index


def test_report_files(reported):
    root, uri, index = reported
    folder = index.parent
    for name in ("leaderboard.csv", "added_value.csv", "kaplan_meier.csv", "external_validation.csv"):
        assert (folder / name).is_file(), name
    page = index.read_text()
    for heading in ("Leaderboard", "External validation", "Images, clinical factors, or both",
                    "Added prognostic value", "Kaplan-Meier", "Grad-CAM", "Search diagnostics"):
        assert heading in page
    import re

    for source in re.findall(r"src='([^']+)'", page):
        assert (folder / source).is_file(), source
    study = read_study("rep", uri)
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(study.parent_run_id, "report")}
    assert "report/index.html" in artifacts


def test_leaderboard_matches_mlflow(reported):
    _, uri, index = reported
    board = pd.read_csv(index.parent / "leaderboard.csv")
    study = read_study("rep", uri)
    for _, row in board.iterrows():
        trial = study.best_per_cell()[Cell(row["backbone"], row["task"], row["inputs"])]
        assert row["C-index, selected [95% CI]"].startswith(f"{trial.oof_cindex:.3f} [")
        bbc = study.cell_metric(trial.cell, names.BBC_CINDEX)
        assert bbc is not None and row["C-index, BBC-CV [95% CI]"].startswith(f"{bbc:.3f} [")
        assert row["Brier (365 d)"] == pytest.approx(trial.metrics[names.BRIER_365.name], abs=1e-4)
        cell_trials = [t for t in study.finished() if t.cell == trial.cell]
        assert trial.oof_cindex == max(t.oof_cindex for t in cell_trials)


def test_inputs_are_compared_on_the_same_patients_and_folds(reported, learnable_store):
    _, uri, index = reported
    board = pd.read_csv(index.parent / "leaderboard.csv")
    assert set(board["inputs"]) == {"image", "image+clinical"}
    table = pd.read_csv(index.parent / "inputs_comparison.csv")
    dev = table[table["cohort"] == "development (out-of-fold)"]
    assert list(dev["model"])[0] == CLINICAL_MODEL
    expected = {"seresnext50 (image)", "seresnext50 (image+clinical)", "resnet50_cbam (image+clinical)"}
    assert expected <= set(dev["model"])
    # The clinical Cox model is fitted in the networks' folds: recomputed independently here.
    study = read_study("rep", uri)
    trial = study.best_per_cell()[Cell("seresnext50", "os_all", "image")]
    oof = oof_predictions(study, trial)
    clinical = CohortStore(learnable_store).clinical().loc[oof["patient_id"]].reset_index(drop=True)
    frame = pd.concat([oof[["patient_id", "fold", "time", "event"]], clinical.drop(columns=["time", "event"])], axis=1)
    expected, _ = clinical_oof(frame, FUSION_DEFAULT)
    c = harrell_c(expected["time"], expected["event"], expected["risk"])
    assert dev.iloc[0]["C-index [95% CI]"].startswith(f"{c:.3f} [")
    differences = pd.read_csv(index.parent / "inputs_differences.csv")
    assert "seresnext50 (image+clinical) - seresnext50 (image)" in set(differences["comparison"])
    # Every model is applied to the external cohort unchanged, the fusion networks with its clinical rows.
    external = table[table["cohort"] != "development (out-of-fold)"]
    assert {CLINICAL_MODEL, "seresnext50 (image+clinical)"} <= set(external["model"])
    # The added-value analysis is not run on a DPI that already holds the clinical covariates.
    values = pd.read_csv(index.parent / "added_value.csv")
    fused = values[values["backbone"] == "seresnext50"]
    assert fused["note"].fillna("").str.contains("already contains the clinical covariates").any()


def test_added_value_matches_an_independent_lifelines_fit(reported, learnable_store):
    _, uri, index = reported
    values = pd.read_csv(index.parent / "added_value.csv")
    dev = values[values["cohort"] == "development (out-of-fold)"].iloc[0]
    study = read_study("rep", uri)
    trial = study.best_per_cell()[Cell(dev["backbone"], dev["task"])]
    store = CohortStore(learnable_store)
    oof = oof_predictions(study, trial)
    clinical = store.clinical().loc[oof["patient_id"]].reset_index(drop=True)
    data = pd.concat([oof[["time", "event"]], clinical.drop(columns=["time", "event"])], axis=1)
    data["dpi"] = oof["risk"]  # the out-of-fold DPI, comparable across folds as written
    covariates = [c for c in default_covariates(data) if data[c].nunique() > 1]
    assert "glioblastoma" in covariates  # the histology enters the clinical model
    assert dev["clinical covariates"] == ", ".join(covariates)
    data = data[["time", "event", "dpi", *covariates]]  # no missing values in this store
    data["dpi"] = (data["dpi"] - data["dpi"].mean()) / data["dpi"].std(ddof=0)
    full = CoxPHFitter().fit(data, "time", "event")
    reduced = CoxPHFitter().fit(data.drop(columns=["dpi"]), "time", "event")
    chi2 = 2 * (full.log_likelihood_ - reduced.log_likelihood_)
    assert dev["LR chi2"] == pytest.approx(chi2, abs=0.01)
    assert dev["HR per SD of DPI [95% CI]"].startswith(f"{np.exp(full.params_['dpi']):.2f}")
    assert dev["C clinical + DPI"] == pytest.approx(full.concordance_index_, abs=1e-3)
    external = values[values["cohort"] != "development (out-of-fold)"]
    assert len(external) == 2 and "ΔC [95% CI] (development models)" in external.columns


def test_kaplan_meier_cutoff_is_fixed_on_development(reported):
    _, _, index = reported
    km = pd.read_csv(index.parent / "kaplan_meier.csv")
    for _, part in km.groupby(["backbone", "task", "inputs"]):
        dev = part[part["cohort"] == "development"].iloc[0]
        assert (part["cutoff"] == dev["cutoff"]).all(), "external cohorts reuse the development cut-off"
        assert abs(dev["high"] - dev["low"]) <= 1, "the development cut-off is the median"


def test_gradcam_maps_are_on_the_store_grid(reported, learnable_store):
    _, _, index = reported
    maps = sorted(index.parent.glob("gradcam_*.nii.gz"))
    assert maps
    store = CohortStore(learnable_store)
    image = nib.load(maps[0])
    assert image.shape == store.shape
    pid = maps[0].name.split("_")[-1].removesuffix(".nii.gz")
    assert np.allclose(image.affine, store.affine(store.patient_ids.index(pid)))


def test_added_value_statistics_on_known_answers():
    rng = np.random.default_rng(0)
    n = 400
    age = rng.normal(60, 10, n)
    signal = rng.normal(size=n)
    time = rng.exponential(np.exp(-(0.03 * (age - 60) + 0.8 * signal))) * 1000
    event = (rng.random(n) < 0.8).astype(int)
    frame = pd.DataFrame({"time": time, "event": event, "age": age, "sex": rng.integers(0, 2, n)})
    informative, _, _ = added_value(frame.assign(dpi=signal + rng.normal(0, 0.3, n)), n_resamples=100)
    useless, _, _ = added_value(frame.assign(dpi=rng.normal(size=n)), n_resamples=100)
    assert informative.lr_p < 1e-6 and informative.hr_per_sd > 1.5
    assert informative.delta_low > 0 and informative.delta_p < 0.05
    assert useless.lr_p > 0.01 and useless.delta_p > 0.05
    # The correction removes the optimism of fitting one more coefficient on the same patients.
    assert useless.optimism > 0 and useless.delta_corrected < useless.cindex_full - useless.cindex_clinical
    expected = logrank_test(time[signal > 0], time[signal <= 0], event[signal > 0], event[signal <= 0]).p_value
    assert expected < 1e-6
    table = calibration(time, event, np.full(n, 0.5))
    assert len(table) == 5 and table["patients"].sum() == n


def test_unknown_study_and_no_finished_trials(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("empty")
    run = client.create_run(experiment, tags={"study_role": "study"})
    import json

    (tmp_path / "study_config.json").write_text(json.dumps({"data": "x", "storage_path": str(tmp_path), "name": "empty"}))
    client.log_artifact(run.info.run_id, str(tmp_path / "study_config.json"))
    assert main(["--study", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no study called 'nope'" in err and "['empty']" in err
    with pytest.raises(ReportError, match="has no finished trial"):
        read_study("empty", uri)
    assert main(["--study", "empty", "--tracking-uri", uri]) == 2


def test_external_validation_matches_scikit_survival(reported, small_store):
    """The external table recomputed from the written per-patient predictions with scikit-survival."""
    from sksurv.metrics import brier_score as sk_brier
    from sksurv.metrics import concordance_index_censored
    from sksurv.util import Surv

    _, _, index = reported
    table = pd.read_csv(index.parent / "external_validation.csv")
    assert len(table) == 4  # four cells (two backbones x two inputs), one external cohort (given twice, listed once)
    for _, row in table.iterrows():
        cell = Cell(row["backbone"], row["task"], row["inputs"]).name
        pred = pd.read_csv(index.parent / f"external_{cell}_{small_store.stem}.csv")
        assert len(pred) == row["patients"] and pred["patient_id"].is_unique
        c = concordance_index_censored(pred["event"].astype(bool), pred["time"], pred["dpi"])[0]
        assert row["C-index [95% CI]"].startswith(f"{c:.3f}"), (row["C-index [95% CI]"], c)
        survival = Surv.from_arrays(pred["event"].astype(bool), pred["time"])  # an OS task: no horizon
        _, brier = sk_brier(survival, survival, pred["surv_365"].to_numpy()[:, None], [365.0])
        assert row["Brier (365 d)"] == pytest.approx(brier[0], abs=1e-4)


def test_missing_covariates_get_indicators_and_external_cohorts_reuse_the_development_fill():
    from analysis.added_value import external_added_value

    rng = np.random.default_rng(3)
    n = 300
    age, signal = rng.normal(60, 10, n), rng.normal(size=n)
    time = rng.exponential(np.exp(-(0.03 * (age - 60) + 0.6 * signal))) * 1000
    frame = pd.DataFrame({"time": time, "event": (rng.random(n) < 0.8).astype(int), "age": age,
                          "mgmt": rng.integers(0, 2, n).astype(float), "glioblastoma": 1.0,
                          "dpi": signal + rng.normal(0, 0.5, n)})
    frame.loc[:59, "mgmt"] = np.nan
    result, design, models = added_value(frame, n_resamples=20)
    assert result.n == n, "no patient dropped"
    assert result.filled == {"mgmt": 60} and design.indicators == {"mgmt_missing": ["mgmt"]}
    assert "mgmt_missing" in models.full.params_.index
    assert result.not_estimable == {"glioblastoma": "constant in this cohort"}
    external = frame.sample(100, random_state=1).assign(mgmt=np.nan)
    row = external_added_value(external, design, models, n_resamples=50)
    assert row["values filled (missing indicator)"] == "mgmt 100" and row["patients"] == 100
    applied = design.apply(external)
    assert (applied["mgmt"] == design.fill["mgmt"]).all() and (applied["mgmt_missing"] == 1).all()
    # Two covariates missing for the same patients share one indicator; a column the others
    # determine exactly is left out, not fed to lifelines as a collinear design.
    both = frame.assign(idh=rng.integers(0, 2, n).astype(float), grade=rng.choice([3.0, 4.0], n))
    both.loc[:59, "idh"] = np.nan
    both["glioblastoma"] = both["grade"] - 3
    result, design, _ = added_value(both, n_resamples=10)
    assert design.indicators == {"idh+mgmt_missing": ["idh", "mgmt"]}
    assert "glioblastoma" in result.not_estimable and result.n == n
    # The DPI is scaled with the development mean and SD, not the external cohort's own.
    assert applied["dpi"].to_numpy() == pytest.approx(((external["dpi"] - design.dpi_mean) / design.dpi_sd).to_numpy())


def test_each_cells_registered_model_reproduces_the_reports_external_predictions(reported, small_store):
    """The selected fold ensemble as an MLflow pyfunc model, loaded back through the registry."""
    import mlflow

    _, uri, index = reported
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    table = pd.read_csv(index.parent / "external_validation.csv")
    for _, row in table.iterrows():
        cell = Cell(row["backbone"], row["task"], row["inputs"]).name
        (version,) = client.search_model_versions(f"name = 'rep-{cell}'")
        model = mlflow.pyfunc.load_model(f"models:/rep-{cell}/{version.version}")
        assert model.metadata.signature is not None
        predicted = model.predict(pd.DataFrame({"store": [str(small_store)]}))
        report = pd.read_csv(index.parent / f"external_{cell}_{small_store.stem}.csv")
        assert list(predicted["patient_id"]) == list(report["patient_id"].astype(str))
        surv = [c for c in report.columns if c.startswith("surv_")]
        assert set(surv) <= set(predicted.columns)
        for column in ["dpi", *surv]:
            assert predicted[column].to_numpy() == pytest.approx(report[column].to_numpy(), rel=1e-5, abs=1e-5), (cell, column)
        # Two patients by id, and volumes straight from memory, give the same numbers.
        some = report["patient_id"].astype(str).tolist()[:2]
        picked = model.predict(pd.DataFrame({"store": [str(small_store)] * 2, "patient_id": some}))
        assert picked["dpi"].to_numpy() == pytest.approx(report["dpi"].to_numpy()[:2], rel=1e-5, abs=1e-5)
    with pytest.raises(Exception, match="sequences|shape|store"):
        model.predict(pd.DataFrame({"patient": ["x"]}))


def test_new_patients_without_outcomes_are_scored_as_the_report_scores_them(reported, learnable_store, small_export,
                                                                          tmp_path, capsys):
    """`study.predict` with a registered model: a folder of new patients without any outcome (and, for
    the image+clinical cell, a clinical table without survival columns) gets the DPIs the model gives
    the same patients converted with the development store's preprocessing, whether their images are
    NIfTI files or DICOM series."""
    import mlflow

    from study.model_logging import MODEL_CARD
    from datasets.convert import convert
    from datasets.preprocessing_config import PreprocessConfig
    from datasets.synthetic_dicom import write_patient
    from study.predict import main as predict

    _, uri, _ = reported
    mlflow.set_tracking_uri(uri)
    recorded = CohortStore(learnable_store).attrs["preprocessing"]
    same = tmp_path / "same.zarr"  # the external cohort converted as the development store was
    convert(small_export / "images", small_export / "clinical.csv", same,
            PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}),
            progress=False)
    new = tmp_path / "new"
    shutil.copytree(small_export / "images", new / "images")
    # Two of the new patients come as a PACS exports them: DICOM series whose names say nothing.
    for folder, layout in zip(sorted((new / "images").iterdir())[:2], ("flat", "folders")):
        staged = tmp_path / "nifti" / folder.name
        staged.parent.mkdir(exist_ok=True)
        shutil.move(str(folder), staged)
        write_patient(staged, folder / "study", layout, patient_id=folder.name)
    table = pd.read_csv(small_export / "clinical.csv", dtype=str)
    table.drop(columns=[c for c in table.columns if c in ("survival_days", "death", "time", "event")]).to_csv(
        new / "covariates.csv", index=False)
    client = MlflowClient(uri)
    for cell, extra in (("seresnext50__os_all", []), ("resnet50_cbam-clinical__os_all",
                                                       ["--clinical", str(new / "covariates.csv")])):
        (version,) = client.search_model_versions(f"name = 'rep-{cell}'")
        model_uri = f"models:/rep-{cell}/{version.version}"
        out = tmp_path / cell
        assert predict(["--model", model_uri, "--tracking-uri", uri, "--images", str(new / "images"),
                        "--out", str(out), "--no-gradcam", *extra]) == 0, capsys.readouterr().err
        scored = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
        expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"store": [str(same)]}))
        expected = expected.set_index("patient_id").loc[scored["patient_id"]]
        for column in ("dpi", "surv_365"):
            assert scored[column].to_numpy() == pytest.approx(expected[column].to_numpy(), rel=1e-5, abs=1e-5), (cell, column)
        assert len(scored) == len(CohortStore(same).usable())
        # The registered version says what it is: description (the model card) and tags.
        version = client.get_model_version(f"rep-{cell}", version.version)
        assert "Not for" in version.description and cell in version.description
        for key in ("development_store_sha256", "development_patients", "preprocessing", "bbc_cindex", "cell"):
            assert version.tags.get(key), key
        assert MODEL_CARD in {a.path.split("/")[-1] for a in client.list_artifacts(version.run_id, "model")}
    # A fusion model without its clinical table is refused, naming the flag; nothing is written.
    (version,) = client.search_model_versions("name = 'rep-resnet50_cbam-clinical__os_all'")
    assert predict(["--model", f"models:/rep-resnet50_cbam-clinical__os_all/{version.version}", "--tracking-uri", uri,
                    "--images", str(new / "images"), "--out", str(tmp_path / "none")]) == 2
    assert "--clinical" in capsys.readouterr().err and not (tmp_path / "none").exists()


@pytest.mark.integration
def test_a_registered_model_serves_from_a_fresh_environment(reported, small_store, small_export, tmp_path):
    """`mlflow models serve --env-manager virtualenv` builds an environment from the model's own
    requirements and code (nothing of this checkout on its path) and answers REST requests on
    loopback with the numbers the model gives in-process: a cohort store, and a folder of new
    patients without outcomes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow
    import requests

    from tests.services import free_port

    _, uri, _ = reported
    cell = "seresnext50__os_all"
    (version,) = MlflowClient(uri).search_model_versions(f"name = 'rep-{cell}'")
    model_uri = f"models:/rep-{cell}/{version.version}"
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENV_ROOT": str(tmp_path / "envs"), "PYTHONPATH": ""}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "virtualenv", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 1200  # a fresh environment: the project's dependencies installed
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(2)
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model(model_uri)
        new = tmp_path / "new"
        for pid in sorted(p.name for p in (small_export / "images").iterdir())[:3]:
            shutil.copytree(small_export / "images" / pid, new / pid)
        for column, value in (("store", str(small_store)), ("images", str(new))):
            answer = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=300,
                                   json={"dataframe_split": {"columns": [column], "data": [[value]]}})
            assert answer.ok, answer.text
            served = pd.DataFrame(answer.json()["predictions"])
            expected = model.predict(pd.DataFrame({column: [value]}))
            assert list(served["patient_id"].astype(str)) == list(expected["patient_id"].astype(str))
            for name in ("dpi", "surv_365"):
                assert served[name].to_numpy() == pytest.approx(expected[name].to_numpy(), rel=1e-5, abs=1e-5), (column, name)
        environments = list((tmp_path / "envs").iterdir())
        assert environments, "mlflow built no environment of its own"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def test_a_copy_of_the_development_cohort_keeps_the_development_scale(reported, learnable_store, tmp_path):
    """28.4 on a copy of the development cohort scored as an external one: the combined model's
    calibration slope within 0.05 of 1, the development risk groups' proportions within 5 points, the
    DPI's spread on the out-of-fold DPI's scale, and the copy flagged. Its patients are development
    patients: scored by the ensemble of models that trained on them, their slope was 1.02-1.08 (no
    scale removes in-sample fit); they are scored out of fold, as in development."""
    from analysis.added_value import CALIBRATION_SLOPE
    from analysis.sections import SPREAD_RATIO

    _, uri, _ = reported
    copy = tmp_path / "copy.zarr"
    shutil.copytree(learnable_store, copy)
    index = build_report("rep", uri, tmp_path / "report", external=[copy], gradcam_patients=0)
    folder = index.parent
    value = pd.read_csv(folder / "added_value.csv")
    rows = value[(value["cohort"] == "copy.zarr") & value[CALIBRATION_SLOPE].notna()]
    assert len(rows) >= 2  # each image-only cell
    for text in rows[CALIBRATION_SLOPE]:
        slope, low, high = map(float, re.findall(r"-?\d+\.\d+", text))
        assert low < 1.0 < high and abs(slope - 1.0) < 0.05, text
    km = pd.read_csv(folder / "kaplan_meier.csv")
    for (backbone, task, inputs), group in km.groupby(["backbone", "task", "inputs"]):
        share = (group["high"] / (group["high"] + group["low"])).to_numpy()
        dev = share[(group["cohort"] == "development").to_numpy()][0]
        ext = share[(group["cohort"] == "copy.zarr").to_numpy()][0]
        assert abs(ext - dev) <= 0.05, (backbone, inputs, dev, ext)
    external = pd.read_csv(folder / "external_validation.csv")
    assert external[SPREAD_RATIO].between(0.9, 1.25).all(), external[SPREAD_RATIO]
    assert (external["development patients among them"] == len(CohortStore(learnable_store).usable())).all()
    assert (external["scored out of fold"] == external["patients"]).all(), external[["patients", "scored out of fold"]]
    assert "have the images of development patients" in index.read_text() and "never in-sample" in index.read_text()


def test_the_development_scale_calibrates_the_ensemble_on_new_patients():
    """The known answer (benchmarks.development_scale, its results file for 200 repetitions): fold models
    that disagree make the plain mean of their DPIs too flat for the model fitted on the out-of-fold DPI;
    on the development scale the slope comes most of the way back to 1, and all the way when they agree."""
    import numpy as np

    from benchmarks.development_scale import one

    def slopes(sigma):
        rng = np.random.default_rng(0)
        results = [one(rng, 600, 10, sigma, 0.0) for _ in range(8)]
        return {name: float(np.mean([r[name][0] for r in results])) for name in ("plain mean", "development scale")}

    disagree, agree = slopes(1.0), slopes(0.3)
    assert disagree["plain mean"] > 1.15
    assert abs(disagree["development scale"] - 1) < 0.5 * abs(disagree["plain mean"] - 1)
    assert abs(agree["development scale"] - 1) < 0.05


def test_only_development_patients_are_scored_out_of_fold():
    """An external patient with a development patient's images gets that patient's out-of-fold row;
    the others keep the ensemble's, and a development patient outside the cell's cohort changes nothing."""
    import numpy as np

    from analysis.sections import out_of_fold_for_development_patients

    pred = {"risk": np.array([5.0, 6.0, 7.0]), "surv_365": np.array([0.1, 0.2, 0.3]),
            "curves": np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])}
    oof = pd.DataFrame({"patient_id": ["D1", "D2"], "risk": [-1.0, -2.0], "surv_365": [0.9, 0.8],
                        "surv_t365": [0.9, 0.8], "surv_t730": [0.7, 0.6]})
    out, replaced = out_of_fold_for_development_patients(pred, ["E1", "E2", "E3"], {"E2": "D2", "E3": "D9"}, oof,
                                                         (365.0, 730.0))
    assert replaced == 1
    assert out["risk"].tolist() == [5.0, -2.0, 7.0] and out["surv_365"].tolist() == [0.1, 0.8, 0.3]
    assert out["curves"].tolist() == [[0.1, 0.2], [0.8, 0.6], [0.5, 0.6]]
    assert pred["risk"].tolist() == [5.0, 6.0, 7.0], "the ensemble's own predictions are not modified"


def test_importances_use_the_spaces_distributions_not_guesses():
    """The search diagnostics rebuilt an Optuna study with distributions guessed from the values: a
    log-uniform learning rate split on its linear scale, a batch-size choice of four numbers taken for
    a float range. They now come from the recorded space (widened to hold the reference recipe)."""
    import numpy as np
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from analysis.figures import optuna_distribution, parameter_importances
    from search_spaces._space import Choice, LogUniform

    rng = np.random.default_rng(0)
    lr = 10 ** rng.uniform(-6, -2, size=40)
    batch = rng.choice([8, 16, 32, 64], size=40).astype(float)  # as read back from MLflow: floats
    trials = pd.DataFrame({"lr": lr, "batch_size": batch, "stopped_value": np.nan,
                           "value": 0.7 - 0.02 * (np.log10(lr) + 4) ** 2 + rng.normal(0, 0.002, 40)})
    space = {"lr": LogUniform(1e-5, 1e-2), "batch_size": Choice((8, 16, 32, 64))}
    lr_distribution = optuna_distribution(space["lr"], trials["lr"])
    assert isinstance(lr_distribution, FloatDistribution) and lr_distribution.log and lr_distribution.low == lr.min()
    assert isinstance(optuna_distribution(space["batch_size"], trials["batch_size"]), CategoricalDistribution)
    importances = parameter_importances(trials, space)
    assert max(importances, key=importances.get) == "lr" and importances["lr"] > 0.8, importances
