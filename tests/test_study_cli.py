"""The study command's usage errors, help, space listing and dry run."""

from __future__ import annotations


import pytest

from study.run import build_parser, main


@pytest.fixture
def base(small_store, tmp_path):
    return ["--data", str(small_store), "--space", "smoke", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
            "--storage-path", str(tmp_path / "rr")]


def test_help_documents_every_option_with_its_default():
    text = build_parser().format_help()
    for option in ("--space", "--data", "--external", "--backbones", "--tasks", "--num-samples", "--max-concurrent",
                   "--gpus-per-trial", "--cpus-per-trial", "--address", "--tracking-uri", "--storage-path", "--name",
                   "--resume", "--budget", "--seed", "--dry-run", "--list-spaces"):
        assert option in text
    assert text.count("default") >= 15


def test_list_spaces(capsys):
    assert main(["--list-spaces"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["literature_priors", "smoke", "wide"]


def test_dry_run_prints_the_resolved_study(base, capsys, tmp_path):
    assert main(base + ["--dry-run", "--tasks", "os_all", "1yr_gbm"]) == 0
    out = capsys.readouterr().out
    assert "3 backbones x 2 tasks x 1 inputs (image) x 2 configurations = 12 trials" in out
    assert "task os_all (all, os, cox head): 12 patients" in out
    assert "fold sizes [6, 6]" in out
    assert not (tmp_path / "rr").exists()


def test_unreachable_tracking_server_stops_before_training(small_store, tmp_path, capsys):
    code = main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--tracking-uri",
                 "http://127.0.0.1:9", "--storage-path", str(tmp_path / "rr")])
    assert code == 2
    assert "tracking store http://127.0.0.1:9 cannot be reached" in capsys.readouterr().err
    assert not list((tmp_path / "rr").rglob("*.pkl")), "no Tune experiment was started"


def test_unwritable_storage_path_stops_before_tracking(small_store, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", "--storage-path", str(blocker / "rr")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--storage-path" in err and "not writable" in err
    assert not (tmp_path / "m.db").exists(), "nothing written to MLflow for a rejected study"


def test_resume_of_a_study_that_does_not_exist(base, capsys, tmp_path):
    assert main(base + ["--name", "never-ran", "--resume"]) == 2
    assert "no study 'never-ran'" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("request_flags, asked", [(["--gpus-per-trial", "1"], "1 CPU and 1 GPU"),
                                                  (["--cpus-per-trial", "1000"], "1000 CPU and 0 GPU")])
def test_a_trial_no_node_can_hold_exits_2_within_seconds(base, tmp_path, request_flags, asked):
    """It used to wait forever: Ray keeps an infeasible request pending."""
    import subprocess
    import sys
    import time

    from tests.conftest import PROJECT_ROOT

    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "study.run", *base, "--tasks", "os_all", *request_flags],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert f"each trial asks for {asked}" in run.stderr and "the largest has" in run.stderr
    assert not (tmp_path / "rr").exists() and not (tmp_path / "m.db").exists(), "nothing written"


def test_dry_run_prints_what_the_study_will_cost(base, capsys):
    assert main(base + ["--dry-run", "--tasks", "os_all", "--budget", "full", "--epoch-seconds", "36",
                        "--gpus-per-trial", "1"]) == 0
    out = capsys.readouterr().out
    # smoke, full: 3 backbones x 2 configurations x 2 folds x 2 epochs = 24 fold-epochs; ASHA grace 1, factor 2.
    assert "6 trials x 2 folds x up to 2 epochs = 24 fold-epochs" in out
    assert "with ASHA about 2 epochs per trial" in out  # 1 + (2 - 1) / 2 = 1.5
    assert "GPU-hours: 0.2 without ASHA, 0.2 with it" in out  # 24 x 36 s = 0.24 h; 18 x 36 s = 0.18 h


def test_asha_and_slot_arithmetic():
    from types import SimpleNamespace

    from study.cost import asha_epochs
    from study.preflight import NodeShape, trial_slots
    from study.tuning import per_cell_limit

    assert asha_epochs(200, 20, 3) == pytest.approx(20 + 40 / 3 + 120 / 9 + 20 / 27)
    assert asha_epochs(20, 6, 2) == pytest.approx(6 + 6 / 2 + 8 / 4)
    assert asha_epochs(10, 10, 2) == 10
    config = SimpleNamespace(cpus_per_trial=4, gpus_per_trial=1, trials=240)
    # 3 nodes x 8 GPUs hold 24 one-GPU trials; a CPU head holds none; an autoscaler group adds its maximum.
    shapes = [NodeShape(0, 0), NodeShape(96, 8), NodeShape(96, 8), NodeShape(96, 8)]
    assert trial_slots(config, shapes) == 24
    assert trial_slots(config, [*shapes, NodeShape(16, 1, count=4, pending=True)]) == 28
    assert trial_slots(config, [NodeShape(16, 1, count=-1, pending=True)]) == 240  # no limit: every trial
    assert trial_slots(SimpleNamespace(cpus_per_trial=1, gpus_per_trial=0.25, trials=99),
                       [NodeShape(8, 2)]) == 8
    assert per_cell_limit(20) == 10 and per_cell_limit(2) == 10 and per_cell_limit(40) == 20


@pytest.mark.parametrize("flag", ["--data", "--external", "--space"])
def test_a_path_too_long_for_the_file_system_is_named_and_exits_2(flag, capsys):
    """Found by the generated flag values: a 300-character name raised OSError out of main."""
    value = "a" * 300 + (".yaml" if flag == "--space" else "")
    assert main([flag, value, "--dry-run"]) == 2
    assert f"{flag} {'a' * 80}...: not a usable path (File name too long)" in capsys.readouterr().err


def test_a_ray_job_keeps_nothing_in_its_working_folder(small_store, tmp_path, monkeypatch, capsys):
    """Under `ray job submit` the working folder is Ray's copy of --working-dir, deleted after the job."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--dry-run"]
    assert main(args + ["--tracking-uri", "http://127.0.0.1:9"]) == 2  # the default storage: ./ray_results
    assert "--storage-path" in capsys.readouterr().err
    assert main(args + ["--storage-path", "s3://bucket/studies"]) == 2  # the default tracking: ./mlflow.db
    assert "--tracking-uri sqlite:///" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the variable MLflow users set is honoured
    assert main(args + ["--storage-path", str(tmp_path.parent / "elsewhere")]) == 0
    assert "tracking: http://127.0.0.1:9" in capsys.readouterr().out


def test_a_cohort_that_cannot_fit_the_object_stores_is_refused_with_the_numbers(small_store, tmp_path):
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    code = f"""
import ray
from study.config import StudyConfig
from study.preflight import check_object_stores
from datasets.errors import StudyError
ray.init(num_cpus=1, object_store_memory=80 * 2**20, include_dashboard=False, logging_level="ERROR")
config = StudyConfig(space="smoke", budget="demo", data=None, external=(), backbones=("seresnext50",), tasks=("os_all",),
                     num_samples=1, max_concurrent=None, cpus_per_trial=1, gpus_per_trial=0, address=None,
                     tracking_uri="sqlite:///x", storage_path="/tmp/x", name="x")
check_object_stores(config, 60 * 2**20, 100, shared=True)   # fits with headroom
check_object_stores(config, 10 * 2**30, 1000, shared=False)  # not shared: each trial reads the store
try:
    check_object_stores(config, 9 * 2**30, 1000, shared=True)
except StudyError as exc:
    print("REFUSED", exc)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    refused = run.stdout.split("REFUSED ", 1)[1]
    assert "9.00 GiB (1000 patients, float16)" in refused and "needs 11.25 GiB" in refused
    assert "0.1 GiB" in refused and "--no-share-volumes" in refused


@pytest.mark.parametrize("where, value, says", [
    ("--address", "garbage", "not a Ray address"),
    ("--address", "http://127.0.0.1:8265", "a dashboard URL"),
    ("--address", "127.0.0.1:CLOSED", "nothing answers there"),
    ("RAY_ADDRESS", "garbage:", "not a Ray address"),
    ("RAY_ADDRESS", "127.0.0.1:CLOSED", "nothing answers there"),
])
def test_a_ray_address_that_cannot_be_joined_exits_2_within_seconds(base, monkeypatch, capsys, where, value, says):
    """RAY_ADDRESS=garbage gave a traceback, and an unreachable address hung until killed."""
    import time

    from tests.services import free_port

    value = value.replace("CLOSED", str(free_port()))
    args = base + ["--tasks", "os_all", "--dry-run"]
    if where == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", value)
    else:
        args += ["--address", value]
    started = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"{where} " in err and says in err


@pytest.mark.parametrize("value", ["5min", "-1", "inf", "nan"])
def test_a_bad_environment_variable_is_named_not_a_traceback(base, monkeypatch, capsys, value):
    monkeypatch.setenv("STUDY_TRACKING_CATCH_UP_S", value)
    assert main(base + ["--tasks", "os_all", "--dry-run"]) == 2
    assert f"environment variable STUDY_TRACKING_CATCH_UP_S={value!r}" in capsys.readouterr().err


def test_folds_of_one_patient_are_refused_before_anything_trains(small_store, tmp_path, capsys):
    """7 folds of a 12-patient task (each fold still has an event) trained and failed with tracebacks."""
    space = tmp_path / "seven.yaml"
    space.write_text("""
name: seven_folds
summary: more folds than the store has pairs of patients
backbones: [seresnext50]
tasks: [os_all]
distributions: {lr: {loguniform: [1.0e-4, 1.0e-3]}}
reference: {lr: 1.0e-3}
protocols:
  demo: &p {folds: 7, epochs: 2, num_samples: 1, grace_epochs: 2, width: 0.25, depth: 0.2}
  full: *p
""")
    code = main(["--space", str(space), "--data", str(small_store), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--storage-path", str(tmp_path / "rr"), "--dry-run"])
    assert code == 2
    err = capsys.readouterr().err
    assert "7 folds would hold fewer than two patients each" in err and "at most 6" in err
