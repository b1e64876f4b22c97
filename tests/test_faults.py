"""Faults survived with real process kills: a trial's worker SIGKILLed mid-fold, the tracking
server going down mid-study. (The driver kill is in test_study_e2e, the converter kill in
test_datasets_store.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from evaluation import metric_names as names
from tests.conftest import PROJECT_ROOT
from tests.services import running_study, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EPOCHS = 6
SPACE = f"""
name: faults
summary: for fault tests (no pruning, {EPOCHS} epochs)
backbones: [seresnext50]
tasks: [os_all]
distributions:
  lr: {{loguniform: [1.0e-4, 3.0e-3]}}
  batch_size: {{choice: [4]}}
reference: {{lr: 1.0e-3, batch_size: 4}}
protocols:
  demo: &p {{folds: 2, epochs: {EPOCHS}, num_samples: 2, grace_epochs: {EPOCHS}, width: 0.25, depth: 0.2,
             fixed: {{warmup_epochs: 0, cox_memory: 0, augmentation: 0.0}}}}
  full: *p
"""


def study_command(store: Path, root: Path, name: str, uri: str) -> list[str]:
    space = root / "faults.yaml"
    space.write_text(SPACE)
    return [sys.executable, "-m", "study.run", "--space", str(space), "--data", str(store), "--max-concurrent", "1",
            "--tracking-uri", uri, "--storage-path", str(root / "rr"), "--name", name]


def trial_runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return sorted((r for r in runs if r.data.tags.get("study_role") == "trial"), key=lambda r: r.data.params["lr"])


def reported_epochs(storage: Path, trial_id: str) -> list[int]:
    """Epochs in the order the trial reported them to Tune (its result.json in the storage path)."""
    import json

    (result,) = storage.glob(f"*/cv_trainable_{trial_id}_*/result.json")
    return [json.loads(line)["epoch"] for line in result.read_text().splitlines() if line.strip()]


def assert_resumed_not_restarted(epochs: list[int]) -> None:
    """After a restart from a checkpoint the epochs go on (at most the one in flight repeats);
    a restart from scratch would report epoch 1 again."""
    assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, EPOCHS + 1)), epochs
    assert len(epochs) <= EPOCHS + 1, epochs


def trial_workers(driver_pid: int) -> list[psutil.Process]:
    """Ray's trial actor processes started by this driver (its local Ray instance)."""
    found = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="module")
def undisturbed(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("calm")
    uri = f"sqlite:///{root}/m.db"
    subprocess.run(study_command(small_store, root, "calm", uri), cwd=PROJECT_ROOT, check=True, capture_output=True,
                   timeout=600)
    return trial_runs(uri, "calm")


def test_worker_killed_mid_fold_resumes_from_its_checkpoint(small_store, tmp_path, undisturbed):
    uri = f"sqlite:///{tmp_path}/m.db"
    log = tmp_path / "driver.log"
    with running_study(study_command(small_store, tmp_path, "kill", uri), log) as driver:
        deadline, killed = time.monotonic() + 300, None
        while time.monotonic() < deadline and driver.poll() is None and killed is None:
            # Kill once the first trial has checkpointed epoch 3 and is inside a later epoch.
            checkpoints = sorted((tmp_path / "rr").glob("kill/*/cv_trainable_*/checkpoint_*"))
            if any(c.name == "checkpoint_000002" for c in checkpoints):
                assert not any(c.name == f"checkpoint_{EPOCHS - 1:06d}" for c in checkpoints)
                workers = trial_workers(driver.pid)
                assert len(workers) == 1, workers
                workers[0].send_signal(signal.SIGKILL)
                killed = workers[0].pid
            time.sleep(0.02)
        assert killed, log.read_text()
        assert driver.wait(timeout=400) == 0, log.read_text()
    text = log.read_text()
    assert "lost its worker" in text and "restarting from its last checkpoint" in text, text

    runs = trial_runs(uri, "kill")
    assert len(runs) == len(undisturbed) == 2, "no duplicate or orphaned trial runs"
    assert len({r.data.tags["trial_key"] for r in runs}) == 2
    assert [r.data.tags.get("restarts") for r in runs].count("1") == 1
    client = MlflowClient(uri)
    for run, calm in zip(runs, undisturbed):
        assert run.info.status == calm.info.status == "FINISHED"
        assert run.data.params == calm.data.params, "the same configurations as an undisturbed study"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, names.EPOCH_CINDEX.name)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), "every epoch logged once"
        assert_resumed_not_restarted(reported_epochs(tmp_path / "rr" / "kill", run.data.tags["trial_id"]))
        assert run.data.metrics["fold_epochs"] == 2 * EPOCHS
        # Resuming from a checkpoint restores weights, optimiser, scheduler and RNG states: the
        # result equals the undisturbed run's.
        for metric in (names.OOF_CINDEX.name, names.BRIER_365.name, names.EPOCH_CINDEX.name):
            assert run.data.metrics[metric] == pytest.approx(calm.data.metrics[metric], abs=1e-6), metric


# -- the tracking server goes down mid-study ----------------------------------------------------

def assert_everything_tracked(uri: str, name: str, trials: int) -> None:
    runs = trial_runs(uri, name)
    client = MlflowClient(uri)
    assert len(runs) == trials and len({r.data.tags["trial_key"] for r in runs}) == trials
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, names.EPOCH_CINDEX.name)]
        assert sorted(steps) == list(range(1, EPOCHS + 1))
        assert {names.OOF_CINDEX.name, names.BRIER_365.name} <= set(run.data.metrics)
        assert {"oof_predictions.csv", "learning_curve.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    parents = [r for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])
               if r.data.tags.get("study_role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "results.csv" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def listening_addresses(process: subprocess.Popen) -> set[str]:
    root = psutil.Process(process.pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return found


def test_tracking_server_down_mid_study_then_back(small_store, tmp_path, server):
    assert listening_addresses(server.process) == {"127.0.0.1"}, "the tracking server binds loopback only"
    command = study_command(small_store, tmp_path, "outage", server.uri) + ["--num-samples", "3"]
    log = tmp_path / "driver.log"
    with running_study(command, log) as driver:
        wait_for(log, driver, "finished, out-of-fold C-index", 1)
        server.kill()
        wait_for(log, driver, "finished, out-of-fold C-index", 2)  # a whole trial runs while the server is down
        server.start()
        assert driver.wait(timeout=400) == 0, log.read_text()
    text = log.read_text()
    assert "unreachable" in text and "is back" in text, text
    assert_everything_tracked(server.uri, "outage", 3)
    assert (tmp_path / "rr" / "outage" / "tracking_journal.jsonl").read_text() == ""


def test_tracking_server_down_past_the_end_is_delivered_by_resume(small_store, tmp_path, server):
    command = study_command(small_store, tmp_path, "outage2", server.uri)
    log = tmp_path / "driver.log"
    with running_study(command, log, env={**os.environ, "STUDY_TRACKING_CATCH_UP_S": "2"}) as driver:
        wait_for(log, driver, "finished, out-of-fold C-index", 1)
        server.kill()
        assert driver.wait(timeout=400) == 3, log.read_text()
    text = log.read_text()
    journal = tmp_path / "rr" / "outage2" / "tracking_journal.jsonl"
    assert f"records wait in {journal}" in text and "--resume --trust-storage" in text, text
    assert journal.read_text().count("\n") > 5
    server.start()
    # Without --trust-storage the resume is refused: the last state's digests never reached MLflow.
    refused = subprocess.run(command + ["--resume"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=400)
    assert refused.returncode == 2 and "--trust-storage" in refused.stderr, refused.stdout + refused.stderr
    resumed = subprocess.run(command + ["--resume", "--trust-storage"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "delivering" in resumed.stdout
    assert_everything_tracked(server.uri, "outage2", 2)
    assert journal.read_text() == ""



# -- Ray loses the driver's node ------------------------------------------------------------------

def ray_processes(driver_pid: int, name: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        try:
            if name in process.name() or name in " ".join(process.cmdline()[:1]):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_lost_raylet_ends_the_study_with_exit_3_and_the_resume_command(small_store, tmp_path):
    """Under CPU starvation a local raylet died once, and the driver ended in a SystemExit traceback."""
    uri = f"sqlite:///{tmp_path}/m.db"
    log = tmp_path / "driver.log"
    with running_study(study_command(small_store, tmp_path, "lost", uri), log) as driver:
        wait_for(log, driver, "Training ")
        deadline = time.monotonic() + 120
        while not list((tmp_path / "rr").glob("lost/*/cv_trainable_*/checkpoint_*")):
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        (raylet,) = ray_processes(driver.pid, "raylet")
        raylet.kill()
        code = driver.wait(timeout=180)
    text = log.read_text()
    # Exit 3 with the reason, or, when Ray's core worker ends the process first on finding its raylet
    # gone (a race with the study's own handling), Ray's exit 1; the command to resume was printed at
    # the start in any case.
    assert code in (1, 3), text
    assert "SystemExit" not in text, text
    if code == 3:
        assert any(line.startswith("error: Ray lost this study's node or raylet") for line in text.splitlines()), text
        assert "Resume with: python -m study.run" in text, text
    command = text.split("To resume this study if it stops: ", 1)[1].splitlines()[0]
    assert "--resume" in command
    # The printed command resumes the study: Tune's state files are the driver's own (their digests
    # were recorded in MLflow as they were written), and the study finishes.
    import shlex

    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
