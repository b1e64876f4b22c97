"""End-to-end smoke studies on a tiny store: every backbone family, two tasks; MLflow contents
checked through MlflowClient; resume after killing the driver; ASHA pruning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from evaluation import metric_names as names
from evaluation.metrics import brier_score, harrell_c
from study.results import ROWS
from study.run import main
from evaluation.prediction_metrics import alive_past_horizon
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _runs(uri: str, name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("study_role") == "study"]
    trials = [r for r in runs if r.data.tags.get("study_role") == "trial"]
    return client, parents, trials


@pytest.fixture(scope="module")
def smoke_study(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{root}/mlflow.db"
    code = main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "1yr_all", "--num-samples", "2",
                 "--tracking-uri", uri, "--storage-path", str(root / "rr"), "--name", "smoke"])
    assert code == 0
    return root, uri


def test_parent_and_trial_runs(smoke_study):
    root, uri = smoke_study
    client, parents, trials = _runs(uri, "smoke")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {"space", "data_store_sha256", "git_revision", "version.torch"} <= set(parent.data.tags)
    assert len(trials) == 3 * 2 * 2
    assert {t.data.tags["backbone"] for t in trials} == {"seresnext50", "resnet50_cbam", "densenet121"}
    assert {t.data.tags["task"] for t in trials} == {"os_all", "1yr_all"}
    assert all(t.info.status in ("FINISHED", "KILLED") for t in trials)
    assert parent.data.metrics[f"trials.{names.CPU_PERCENT.name}_mean"] > 0
    assert parent.data.metrics[f"trials.{names.RSS_GIB.name}_max"] > 0.1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study_config.json", "manifest.json", "results.csv", "results.md"} <= artifacts
    table = pd.read_csv(root / "rr" / "smoke" / "results.csv", index_col=0)
    assert list(table.index[:3]) == list(ROWS[:3])  # BBC-CV first: the headline
    # A synthetic store knows its truth.
    assert "oracle C-index (true clinical / image content / total predictor)" in table.index
    assert len(table.columns) == 6
    # One run per cell under the study run, the same metric names in each (MLflow's columns and charts
    # compare cells), its selected configuration as params; the trials nested under their cell.
    cells = [r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
             if r.data.tags.get("study_role") == "cell"]
    assert len(cells) == 6 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in cells)
    for run in cells:
        assert {m.name for m in names.CELL_METRICS} - {names.REFERENCE_CINDEX.name} <= set(run.data.metrics)
        assert {"backbone", "task", "inputs"} <= set(run.data.tags) and {"lr", "batch_size"} == set(run.data.params)
        assert sum(run.data.metrics[m.name] for m in (names.TRIALS_FINISHED, names.TRIALS_PRUNED,
                                                      names.TRIALS_FAILED)) == 2
        assert run.info.status == "FINISHED"
        own = [t for t in trials if (t.data.tags["backbone"], t.data.tags["task"], t.data.tags["inputs"])
               == (run.data.tags["backbone"], run.data.tags["task"], run.data.tags["inputs"])]
        assert len(own) == 2 and {t.data.tags["mlflow.parentRunId"] for t in own} == {run.info.run_id}
    assert not any("." in k and k.split(".")[0] in {c.data.tags["cell_key"] for c in cells}
                   for k in parent.data.metrics), "no per-cell metrics left on the study run"
    assert "cell_comparison.png" in artifacts


def test_metrics_are_recomputable_from_oof_predictions(smoke_study):
    _, uri = smoke_study
    client, _, trials = _runs(uri, "smoke")
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert finished
    for run in finished:
        gpu_only = {names.GPU_UTIL.name, names.GPU_MEMORY_GIB.name}  # this machine has no GPU
        assert {m.name for m in (*names.EPOCH_METRICS, *names.FINAL_METRICS)} - gpu_only | {names.fold_cindex(0)} <= set(
            run.data.metrics)
        assert run.data.params["backbone"] == run.data.tags["backbone"]
        history = client.get_metric_history(run.info.run_id, names.EPOCH_CINDEX.name)
        assert [m.step for m in history] == [1, 2]
        path = client.download_artifacts(run.info.run_id, "oof_predictions.csv")
        oof = pd.read_csv(path)
        assert list(oof.columns[:6]) == ["patient_id", "fold", "time", "event", "risk", "surv_365"]
        assert harrell_c(oof["time"], oof["event"], oof["risk"]) == pytest.approx(
            run.data.metrics[names.OOF_CINDEX.name], abs=1e-9)
        horizon = 365.0 if run.data.tags["task"] == "1yr_all" else None
        if horizon:
            assert oof["time"].max() <= 365
        at = alive_past_horizon(oof["time"].to_numpy(), oof["event"].to_numpy(), horizon)
        assert brier_score(at, oof["event"], oof["surv_365"], 365.0)[0] == pytest.approx(
            run.data.metrics[names.BRIER_365.name], abs=1e-9)
        assert "learning_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        # How busy the trial kept the machine, per epoch (no GPU here: CPU and memory only).
        cpu = client.get_metric_history(run.info.run_id, names.CPU_PERCENT.name)
        assert len(cpu) >= 1 and all(m.value > 0 for m in cpu)
        assert 0.1 < run.data.metrics[names.RSS_GIB.name] < 64


def test_rerun_with_same_name_reuses_everything(smoke_study, small_store):
    root, uri = smoke_study
    _, _, before = _runs(uri, "smoke")
    assert main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "1yr_all", "--num-samples", "2",
                 "--tracking-uri", uri, "--storage-path", str(root / "rr"), "--name", "smoke", "--resume"]) == 0
    _, parents, after = _runs(uri, "smoke")
    assert len(parents) == 1
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)


def test_resume_refuses_state_files_the_driver_did_not_write(smoke_study, small_store, tmp_path, capsys):
    """Tune unpickles its state files at --resume: a planted pickle must be refused before it runs."""
    import pickle
    import shutil

    root, _ = smoke_study
    shutil.copytree(root / "rr", tmp_path / "rr")
    shutil.copy(root / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, parents, _ = _runs(uri, "smoke")
    recorded = {k for k in parents[0].data.tags if k.startswith("resume_state.")}
    state = tmp_path / "rr" / "smoke" / "trials"
    assert {f"resume_state.{p.name}" for p in state.iterdir() if p.suffix in (".pkl", ".json")} <= recorded
    marker = tmp_path / "planted-code-ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    searcher_state = sorted(state.glob("searcher-state-*.pkl"))[-1]  # the newest session's
    searcher_state.write_bytes(pickle.dumps(Planted()))
    command = ["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "1yr_all", "--num-samples", "2",
               "--tracking-uri", uri, "--storage-path", str(tmp_path / "rr"), "--name", "smoke", "--resume"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert searcher_state.name in err and "--trust-storage" in err
    assert not marker.exists(), "the planted pickle ran"
    _, after, _ = _runs(uri, "smoke")
    assert after[0].info.status == "FINISHED", "the refused resume touched nothing in MLflow"


def test_pruning_stops_bad_configurations_early(small_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUDY_PROGRESS_S", "1")
    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--backbones", "seresnext50",
                 "--num-samples", "6", "--max-concurrent", "1", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "rr"), "--name", "prune"]) == 0
    out = capsys.readouterr().out
    assert "progress " in out and " of 6 trials ended" in out and "1 running" in out, out
    table = out.split("Results of study")[1].split("\nWritten to ")[0]
    assert max(len(line) for line in table.splitlines()[1:]) <= 120
    client, _, trials = _runs(uri, "prune")
    pruned = [t for t in trials if t.info.status == "KILLED"]
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert pruned and finished
    assert {t.data.tags["outcome"] for t in finished} == {"finished"}
    epoch = names.EPOCH_CINDEX.name
    for run in pruned:
        assert run.data.tags["pruned_at_epoch"] == "1" and run.data.tags["outcome"] == "pruned"
        assert run.info.run_name.startswith("pruned@1 seresnext50/os_all/")
        assert run.data.metrics["fold_epochs"] == 2  # 2 folds x 1 epoch, not 2 x 2
        assert run.data.metrics[epoch] <= max(f.data.metrics[epoch] for f in finished) + 1e-9
    # The cell's Optuna study (saved with Tune's experiment state) holds the stopped trials as PRUNED
    # and the finished ones as COMPLETE with their pooled out-of-fold C-index.
    import pickle

    import optuna
    from optuna.trial import TrialState

    (state,) = (tmp_path / "rr" / "prune" / "trials").glob("searcher-state-*.pkl")
    study = pickle.loads(state.read_bytes())["_searches"]["seresnext50__os_all"].study()
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == len(pruned) and states.count(TrialState.COMPLETE) == len(finished)
    assert sorted(t.value for t in study.trials if t.state == TrialState.COMPLETE) == sorted(
        f.data.metrics[names.OOF_CINDEX.name] for f in finished)
    # The same search, persisted for Optuna's own tools (optuna-dashboard, optuna.visualization).
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "rr" / "prune" / "optuna.journal")))
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["seresnext50__os_all"]
    persisted = optuna.load_study(study_name="seresnext50__os_all", storage=storage)
    def described(trials):
        return sorted((t.state, t.value or 0.0, tuple(sorted(t.params.items())),
                       tuple(sorted(t.intermediate_values.items()))) for t in trials)

    assert described(persisted.trials) == described(study.trials)
    # What ASHA judged at its rung (epoch 1), every trial's scores and when the driver saw them, is in
    # MLflow; the headline replays the search from it (no '*' in the table: ASHA's stops paid for too).
    for run in trials:
        assert [a.path for a in client.list_artifacts(run.info.run_id, names.RUNG_FOLDER)] == [
            f"{names.RUNG_FOLDER}/{names.rung_file(1)}"]
        (seen,) = client.get_metric_history(run.info.run_id, names.RUNG_SEEN.name)
        assert seen.step == 1 and seen.value > 1.7e9
        rung = pd.read_csv(client.download_artifacts(run.info.run_id, f"{names.RUNG_FOLDER}/{names.rung_file(1)}",
                                                     str(tmp_path)))
        assert list(rung.columns) == ["patient_id", "fold", "score"] and rung["patient_id"].is_unique
    (cell,) = client.search_runs([client.get_experiment_by_name("prune").experiment_id], "tags.study_role = 'cell'")
    assert cell.data.tags["headline"] == "the search: ASHA's stops and the final choice"
    table = pd.read_csv(tmp_path / "rr" / "prune" / "results.csv", index_col=0)
    assert "final choice only" not in table.loc["C-index, BBC-CV [95% CI]"].iloc[0]
    # A stopped trial never resumes: its checkpoint (weights and optimiser states) is not kept.
    for run in pruned:
        (folder,) = (tmp_path / "rr" / "prune" / "trials").glob(f"cv_trainable_{run.data.tags['trial_id']}_*")
        assert not list(folder.glob("checkpoint_*/*.pt")), folder
    for run in finished:
        (folder,) = (tmp_path / "rr" / "prune" / "trials").glob(f"cv_trainable_{run.data.tags['trial_id']}_*")
        assert sorted(p.name for p in folder.glob("checkpoint_*/*.pt")) == ["fold0_model.pt", "fold1_model.pt"]


@pytest.mark.integration
def test_resume_after_killing_the_driver(small_store, tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    command = [sys.executable, "-m", "study.run", "--space", "smoke", "--data", str(small_store), "--tasks", "os_all",
               "1yr_all", "--backbones", "seresnext50", "--num-samples", "2", "--max-concurrent", "1",
               "--tracking-uri", uri, "--storage-path", str(tmp_path / "rr"), "--name", "killed"]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if (tmp_path / "driver.log").read_text().count("out-of-fold C-index") >= 2:
            break
        time.sleep(0.2)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()
    time.sleep(3)  # into the third trial
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    _, _, before = _runs(uri, "killed")
    first_cell = {r.info.run_id: r.info.end_time for r in before if r.info.end_time}
    assert len(first_cell) >= 2
    assert main(command[3:]) == 0
    _, parents, after = _runs(uri, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    keys = [r.data.tags["trial_key"] for r in after]
    assert len(keys) == len(set(keys)) == 4, "no duplicate trial runs"
    configs = [tuple(sorted(r.data.params.items())) for r in after]
    assert len(set(configs)) == len(configs), "the resumed search repeats no configuration"
    for run in after:
        if run.info.run_id in first_cell:
            assert run.info.end_time == first_cell[run.info.run_id], "finished trials are not rerun"
        assert run.info.status in ("FINISHED", "KILLED")


def test_diverging_trial_fails_with_its_reason_and_the_study_goes_on(small_store, tmp_path, monkeypatch):
    from search_spaces import SPACES, Choice, Protocol, SearchSpace

    protocol = Protocol(folds=2, epochs=2, num_samples=2, grace_epochs=1, width=0.25, depth=0.2,
                        fixed={"warmup_epochs": 0, "cox_memory": 0, "augmentation": 0.0, "optimizer": "sgd",
                               "grad_clip": 0.0})
    space = SearchSpace("diverge", "test: the reference lr diverges", {"lr": Choice((1e6, 1e-3)),
                                                                        "batch_size": Choice((4,))},
                        {"lr": 1e6, "batch_size": 4}, {"demo": protocol, "full": protocol})
    monkeypatch.setitem(SPACES, "diverge", space)
    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["--space", "diverge", "--data", str(small_store), "--tasks", "os_all", "--backbones", "seresnext50",
                 "--num-samples", "3", "--max-concurrent", "1", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "rr"), "--name", "diverge"]) == 0
    _, parents, trials = _runs(uri, "diverge")
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert failed and all("became" in t.data.tags["failure_reason"] for t in failed), [t.data.tags for t in failed]
    assert any(t.data.params["lr"] == "1000000.0" for t in failed)
    assert all(t.data.tags["outcome"] == "failed" and t.info.run_name.startswith("FAILED seresnext50/") for t in failed)
    assert parents[0].info.status == "FINISHED"
    table = pd.read_csv(tmp_path / "rr" / "diverge" / "results.csv", index_col=0)
    assert table.loc["trials (finished/pruned/failed)"].iloc[0].endswith(f"/{len(failed)}")


def test_a_study_in_which_every_trial_failed_exits_non_zero(small_store, tmp_path, monkeypatch, capsys):
    from search_spaces import SPACES, Choice, Protocol, SearchSpace

    protocol = Protocol(folds=2, epochs=2, num_samples=1, grace_epochs=1, width=0.25, depth=0.2,
                        fixed={"warmup_epochs": 0, "cox_memory": 0, "augmentation": 0.0, "optimizer": "sgd",
                               "grad_clip": 0.0})
    space = SearchSpace("all_diverge", "test: every lr diverges", {"lr": Choice((1e6,)), "batch_size": Choice((4,))},
                        {"lr": 1e6, "batch_size": 4}, {"demo": protocol, "full": protocol})
    monkeypatch.setitem(SPACES, "all_diverge", space)
    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["--space", "all_diverge", "--data", str(small_store), "--tasks", "os_all", "--backbones",
                 "seresnext50", "--tracking-uri", uri, "--storage-path", str(tmp_path / "rr"),
                 "--name", "all_diverge"]) == 2
    err = capsys.readouterr().err
    assert "no trial of study all_diverge finished (1 failed" in err and "failure_reason" in err
    assert (tmp_path / "rr" / "all_diverge" / "results.csv").exists(), "the table of what happened is still written"


def test_same_name_with_other_settings_is_refused(smoke_study, small_store, capsys):
    root, uri = smoke_study
    assert main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--num-samples", "2",
                 "--tracking-uri", uri, "--storage-path", str(root / "rr"), "--name", "smoke"]) == 2
    assert "already exists with other settings (tasks: os_all,1yr_all -> os_all)" in capsys.readouterr().err


def test_nested_cross_validation_on_the_demo_cohort(learnable_store, tmp_path):
    """--outer-folds 2 on the demo cohort (`learnable_store` is the demo's generator, size and
    preprocessing): each outer study searches without its test fold, and the nested C-index comes
    from the outer predictions of the configuration that study selected."""
    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["--space", "smoke", "--data", str(learnable_store), "--tasks", "os_all", "--backbones", "seresnext50",
                 "--num-samples", "2", "--outer-folds", "2", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "rr"), "--name", "nested"]) == 0
    predictions = pd.read_csv(tmp_path / "rr" / "nested-nested2" / "outer_predictions_seresnext50__os_all.csv")
    assert predictions["patient_id"].is_unique and len(predictions) == 150 and set(predictions["fold"]) == {0, 1}
    client = MlflowClient(uri)
    for fold in (0, 1):
        _, _, trials = _runs(uri, f"nested-outer{fold}of2")
        finished = [t for t in trials if t.info.status == "FINISHED"]
        seen = set(pd.read_csv(client.download_artifacts(finished[0].info.run_id, "oof_predictions.csv"))["patient_id"])
        tested = set(predictions.loc[predictions["fold"] == fold, "patient_id"])
        assert len(seen) + len(tested) == 150 and not seen & tested, "the outer test fold was never searched on"
    client = MlflowClient(uri)
    (cell_run,) = [r for r in client.search_runs([client.get_experiment_by_name("nested-nested2").experiment_id])
                   if r.data.tags.get("study_role") == "cell"]
    assert cell_run.data.tags["cell_key"] == "seresnext50__os_all"
    assert cell_run.data.metrics[names.NESTED_CINDEX.name] == pytest.approx(
        harrell_c(predictions["time"], predictions["event"], predictions["risk"]), abs=1e-9)
    table = pd.read_csv(tmp_path / "rr" / "nested-nested2" / "results.csv", index_col=0)
    assert table.loc["outer folds with a selected configuration"].iloc[0] == "2/2"


def _store_copy(small_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    return copy


def test_resume_refuses_a_store_that_changed(smoke_study, small_store, tmp_path, capsys):
    """Outcomes edited after the study started: resuming would mix old predictions with new outcomes."""
    import zarr

    root, uri = smoke_study
    changed = _store_copy(small_store, tmp_path)
    survival = zarr.open_array(str(changed / "clinical" / "time"), mode="r+")
    survival[:] = survival[:] * 1.5
    client, parents, _ = _runs(uri, "smoke")
    code = main(["--space", "smoke", "--data", str(changed), "--tasks", "os_all", "1yr_all", "--num-samples", "2",
                 "--tracking-uri", uri, "--storage-path", str(root / "rr"), "--name", "smoke", "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert "changed since study smoke started" in err and "another --name" in err
    _, after, _ = _runs(uri, "smoke")
    assert after[0].info.status == parents[0].info.status == "FINISHED", "nothing changed in MLflow"


def test_a_deleted_chunk_stops_the_study_naming_the_patient(small_store, tmp_path, capsys):
    """A chunk file deleted from a store reads back as zeros; the study names the patient before it writes anything."""
    from datasets.store import CohortStore

    damaged = _store_copy(small_store, tmp_path)
    store = CohortStore(damaged)
    slot = int(store.usable()[3])
    (chunk,) = [c for c in (damaged / "images" / "c").glob(f"{slot}/**/*") if c.is_file()]
    chunk.unlink()
    code = main(["--space", "smoke", "--data", str(damaged), "--tasks", "os_all", "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", "--storage-path", str(tmp_path / "rr"), "--name", "damaged"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"patient {store.patient_ids[slot]}: its voxels differ from the checksum recorded at conversion" in err
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "rr").exists()


def test_the_report_refuses_an_external_store_the_models_cannot_read(smoke_study, small_store, tmp_path, capsys):
    """Other channel order (or shape, or preprocessing): the report used to give numbers or a traceback."""
    import json

    from analysis.report import main as report

    root, uri = smoke_study
    reordered = _store_copy(small_store, tmp_path)
    meta = json.loads((reordered / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["sequences"] = attrs["preprocessing"]["sequences"] = list(reversed(attrs["sequences"]))
    (reordered / "zarr.json").write_text(json.dumps(meta))
    code = report(["--study", "smoke", "--tracking-uri", uri, "--external", str(reordered), "--out",
                   str(tmp_path / "report"), "--no-log"])
    assert code == 2
    assert "another channel order" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_a_second_driver_of_a_running_study_is_refused(small_store, tmp_path, capsys):
    """Two study.run with one --name at once shared a study run and corrupted each other's results.
    The first holds the study until it ends, however it ends (an OS lock: a killed driver frees it)."""
    from study.study_folder import StudyFolder
    from tests.services import running_study, wait_for
    from tests.test_faults import study_command

    uri = f"sqlite:///{tmp_path}/m.db"
    command = study_command(small_store, tmp_path, "busy", uri)
    log = tmp_path / "first.log"
    with running_study(command, log) as first:
        wait_for(log, first, "Training ")
        code = main(command[3:])
        assert code == 2
        err = capsys.readouterr().err
        assert f"study 'busy' under {tmp_path / 'rr'} is running (driver pid {first.pid} on" in err
        first.kill()
        first.wait(timeout=60)
    StudyFolder(str(tmp_path / "rr"), "busy").acquire()  # a killed driver holds nothing


def test_repeated_cross_validation_runs_the_study_on_other_partitions(small_store, tmp_path):
    """--repeats 2: the whole study twice, each on its own partition of the patients into folds
    (repeat 0 is the plain study's partition), summarised per cell as mean +- between-repeat SD."""
    import numpy as np

    from datasets import Cohort

    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--backbones", "seresnext50",
                 "--num-samples", "1", "--repeats", "2", "--tracking-uri", uri,
                 "--storage-path", str(tmp_path / "rr"), "--name", "rep"]) == 0
    client = MlflowClient(uri)
    partitions = []
    for r in (0, 1):
        _, parents, trials = _runs(uri, f"rep-repeat{r}of2")
        assert parents[0].data.params["repeat"] == str(r)
        finished = [t for t in trials if t.info.status == "FINISHED"]
        oof = pd.read_csv(client.download_artifacts(finished[0].info.run_id, "oof_predictions.csv"))
        partitions.append(oof.set_index("patient_id")["fold"].sort_index())
    cohort = Cohort(small_store)
    assert (partitions[0].to_numpy() == cohort.folds(2, 0)[np.argsort(cohort.patient_ids)]).all(), \
        "repeat 0 is the plain study's partition"
    assert not (partitions[0] == partitions[1]).all() and not (partitions[0] != partitions[1]).all(), \
        "repeat 1 is another partition"
    summary = pd.read_csv(tmp_path / "rr" / "rep-repeats2" / "repeats.csv")
    assert list(summary["repeat"]) == [0, 1]
    table = pd.read_csv(tmp_path / "rr" / "rep-repeats2" / "results.csv", index_col=0)
    mean, sd = (float(v) for v in table.loc["C-index, BBC-CV, mean +- SD over repeats"].iloc[0].split(" +- "))
    assert mean == pytest.approx(summary["headline"].mean(), abs=1e-3)
    assert sd == pytest.approx(summary["headline"].std(ddof=1), abs=1e-3)
    (cell_run,) = [r for r in client.search_runs([client.get_experiment_by_name("rep-repeats2").experiment_id])
                   if r.data.tags.get("study_role") == "cell"]
    assert cell_run.data.metrics[names.REPEATS_CINDEX_SD.name] == pytest.approx(summary["headline"].std(ddof=1))


@pytest.mark.parametrize("flags, says", [(["--repeats", "1"], "--repeats must be 0"),
                                         (["--repeats", "-2"], "--repeats must be 0"),
                                         (["--repeats", "2", "--outer-folds", "2"], "cannot be combined")])
def test_repeats_that_cannot_run_exit_2_naming_the_flag(small_store, tmp_path, capsys, flags, says):
    assert main(["--space", "smoke", "--data", str(small_store), "--storage-path", str(tmp_path / "rr"),
                 "--dry-run", *flags]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "rr").exists()
