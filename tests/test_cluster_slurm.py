"""The Slurm recipe (study/cluster/slurm.sbatch): what can run without Slurm runs here. Its Ray
start functions (`study/cluster/slurm_ray.sh`, which the sbatch script calls inside `srun` steps)
start a head and a worker node on loopback with token authentication, and its `run_study` starts
the tracking server and runs a study whose trials use both nodes. Slurm itself (sbatch, srun,
scontrol) is not installed here: the script's Slurm lines are checked by reading them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT
from tests.services import free_port

LIBRARY = PROJECT_ROOT / "study" / "cluster" / "slurm_ray.sh"
SBATCH = PROJECT_ROOT / "study" / "cluster" / "slurm.sbatch"


def bash(command: str, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", f"source {LIBRARY} && {command}"], cwd=PROJECT_ROOT, env=env,
                            start_new_session=True, **kwargs)


def test_the_scripts_parse_and_wire_ray_as_slurm_runs_it():
    for script in (LIBRARY, SBATCH):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = SBATCH.read_text()
    assert "export RAY_AUTH_MODE=token" in text and "ray get-auth-token --generate" in text
    assert 'srun --nodes=1 --ntasks=1 --overlap -w "$head"' in text and "ray_head $head_ip $port" in text
    assert 'for node in "${nodes[@]:1}"' in text and "ray_worker $head_ip:$port" in text
    assert 'wait_for_nodes "$head_ip:$port" "${#nodes[@]}"' in text and 'run_study "$head_ip:$port"' in text
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=" in text


@pytest.mark.slow
@pytest.mark.integration
def test_the_recipes_ray_and_study_on_a_loopback_two_node_cluster(small_store, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(home),
           "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    port, temps = free_port(), [tempfile.mkdtemp(prefix="rays", dir="/tmp") for _ in range(2)]
    common = "--num-cpus=1 --num-gpus=0 --object-store-memory=300000000"
    nodes = [
        bash(f"ray_head 127.0.0.1 {port} {common} --temp-dir={temps[0]} --dashboard-port={free_port()} "
             f"--dashboard-agent-listen-port={free_port()}", env, stdout=open(tmp_path / "head.log", "w"),
             stderr=subprocess.STDOUT),
    ]
    try:
        time.sleep(5)
        nodes.append(bash(f"ray_worker 127.0.0.1:{port} 127.0.0.1 {common} --temp-dir={temps[1]} "
                          f"--dashboard-agent-listen-port={free_port()}", env,
                          stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT))
        waited = bash(f"wait_for_nodes 127.0.0.1:{port} 2 120", env, stdout=subprocess.PIPE, text=True)
        assert waited.wait(timeout=180) == 0, (tmp_path / "head.log").read_text()[-2000:]
        assert "Ray: 2 node(s) up" in waited.stdout.read()

        study = bash(f"run_study 127.0.0.1:{port} {tmp_path / 'shared'} --space smoke --data {small_store} "
                     "--tasks os_all --backbones seresnext50 --num-samples 2 --no-pruning --name slurm",
                     {**env, "STUDY_TRACKING_PORT": str(free_port())}, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)
        out, _ = study.communicate(timeout=600)
        assert study.returncode == 0, out[-3000:]
        assert "Ray: 2 node(s)" in out and "GPU" in out
        client = MlflowClient(f"sqlite:///{tmp_path / 'shared' / 'mlflow-server' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id])
        trials = [r for r in runs if r.data.tags.get("study_role") == "trial"]
        assert [r.info.status for r in trials] == ["FINISHED", "FINISHED"]
        assert len({r.data.tags["node_id"] for r in trials}) == 2, "one trial on each node"
        assert (tmp_path / "shared" / "studies" / "slurm" / "optuna.journal").exists()
        assert not [p for p in psutil.process_iter(["cmdline"])
                    if "study.tracking" in " ".join(p.info["cmdline"] or []) and str(tmp_path) in
                    " ".join(p.info["cmdline"] or [])], "run_study stopped its tracking server"
    finally:
        for node in nodes:
            try:
                family = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                family = []
            for process in family:
                try:
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            for process in psutil.process_iter(["cmdline"]):  # daemons of the nodes' sessions
                try:
                    if any(t in " ".join(process.info["cmdline"] or []) for t in temps):
                        process.kill()
                except psutil.NoSuchProcess:
                    pass
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
        pointer = Path("/tmp/ray/ray_current_cluster")
        if pointer.exists() and pointer.read_text().strip().endswith(f":{port}"):
            pointer.unlink()
