"""No silent CPU training on a GPU node: a Ray node that advertises a GPU it cannot use (here Ray's
own resource override on this CPU machine, whose torch is the CPU build) stops the study before
its first trial; a trial given such a GPU fails at once and is not retried; the CPU is used only
with --cpu-fallback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT
from trainables.devices import _supported, expected_devices, gpu_problem

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks GPUs that cannot be used (a CPU machine)")

FAKE_GPU = {**os.environ, "RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 1})}


def study(store, tmp_path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "study.run", "--space", "smoke", "--data", str(store), "--tasks", "os_all",
            "--backbones", "seresnext50", "--num-samples", "1", "--gpus-per-trial", "1", "--storage-path",
            str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--name", "gpu", *extra]


@pytest.mark.slow
def test_a_gpu_node_that_cannot_train_stops_the_study_before_its_first_trial(small_store, tmp_path):
    started = time.monotonic()
    run = subprocess.run(study(small_store, tmp_path), cwd=PROJECT_ROOT, env=FAKE_GPU, capture_output=True, text=True,
                         timeout=300)
    seconds = time.monotonic() - started
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert seconds < 60, seconds
    (line,) = [l for l in run.stderr.splitlines() if l.startswith("error: GPU node type")]
    assert re.search(r"\(node [0-9.]+ \([0-9a-f]{12}\)\) cannot train", line), line
    assert "CPU-only build" in line and "CUDA" in line and "--cpu-fallback" in line
    assert "Training " not in run.stdout, "no trial started"
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "rr").exists(), "nothing logged or written"


@pytest.mark.slow
def test_a_trial_given_a_gpu_it_cannot_use_fails_at_once_and_is_not_retried(small_store, tmp_path):
    """The trial's own check (for nodes that joined after the probe): Tune on a Ray instance that
    says it has a GPU, a trial asking for it, Tune's retries on."""
    code = f"""
import json, ray
from ray import tune
from trainables.trainable import TrialSetup, cv_trainable
ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, logging_level="ERROR")
setup = TrialSetup(store={str(small_store)!r}, tasks=(("os_all", "all", "os"),), folds=2)
config = {{"task": "os_all", "backbone": "seresnext50", "head": "cox", "width": 0.25, "depth": 0.2, "epochs": 2,
           "batch_size": 4, "lr": 1e-3}}
trainable = tune.with_resources(tune.with_parameters(cv_trainable, setup=setup), {{"cpu": 1, "gpu": 1}})
grid = tune.Tuner(trainable, param_space=config, run_config=tune.RunConfig(
    storage_path={str(tmp_path / "tune")!r}, failure_config=tune.FailureConfig(max_failures=2), verbose=0)).fit()
result = grid[0]
print("RESULT", json.dumps({{"failed": result.metrics.get("failed"), "epochs": result.metrics.get("training_iteration"),
                             "error": str(result.error)}}))
"""
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert re.match(r"node [0-9.]+ \([0-9a-f]{12}\) was given GPU 0 but cannot train on it", result["failed"])
    assert "CPU-only build" in result["failed"]
    assert result["epochs"] == 1 and result["error"] == "None", "reported failed once, never trained, not retried"
    assert time.monotonic() - started < 120


@pytest.mark.slow
@pytest.mark.integration
def test_cpu_training_where_gpus_were_asked_for_only_when_the_user_says_so(small_store, tmp_path):
    run = subprocess.run(study(small_store, tmp_path, "--cpu-fallback"), cwd=PROJECT_ROOT, env=FAKE_GPU,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cannot train" in run.stdout and "(--cpu-fallback)" in run.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gpu").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("study_role") == "trial"] == ["FINISHED"]


def test_a_cpu_build_of_torch_is_named_as_such():
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch")
    assert "CPU-only build" in gpu_problem(1)


@pytest.mark.parametrize("arch, capability, ok", [
    (["sm_80", "sm_86", "sm_90"], (9, 0), True),          # H100/H200: built for it
    (["sm_80", "sm_86", "sm_90"], (8, 9), True),          # L40S (8.9): the sm_86 binary runs on 8.x
    (["sm_50", "sm_60", "sm_70", "sm_75"], (9, 0), False),  # an old build on a new GPU: no kernel image
    (["sm_70", "compute_70"], (9, 0), True),              # PTX that the driver compiles for newer devices
    (["sm_90", "sm_100"], (8, 0), False),                 # a build that dropped A100 (8.0)
])
def test_which_builds_run_on_which_devices(arch, capability, ok):
    assert _supported(arch, *capability) is ok


def test_a_fractional_gpu_needs_one_device():
    assert [expected_devices(g) for g in (0, 0.25, 1, 4)] == [0, 1, 1, 4]
