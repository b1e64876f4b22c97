"""A real two-node Ray cluster on this machine (``ray start --head`` with its dashboard on
127.0.0.1 + ``ray start --address``, on loopback, token authentication on): the study handed the
cluster in RAY_ADDRESS runs trials on both nodes, the cluster guide's ``ray job submit`` recipe does the
same through the jobs API, and a worker node lost mid-study has its trials rescheduled on the
other node."""

from __future__ import annotations

import os
import re
import secrets
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

from evaluation import metric_names as names
from tests.conftest import PROJECT_ROOT
from tests.services import free_port, running_study, wait_for
from tests.test_faults import EPOCHS, assert_resumed_not_restarted, reported_epochs, study_command, trial_runs

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RAY = str(Path(sys.executable).parent / "ray")


class LocalCluster:
    """Two Ray nodes started with the `ray` CLI, each with 1 CPU and a marker resource."""

    def __init__(self, root: Path, token: Path | None = None, env: dict | None = None):
        """`token`: the cluster's token file (as `ray get-auth-token --generate` writes it and the
        launcher syncs it to every node; default: a new one); `env`: more for the nodes' environment
        (credentials that a cloud node has from its instance profile)."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        if token is None:
            token = root / "ray_token"
            token.write_text(secrets.token_hex(32))
        # PATH: a job's `python` is the environment running these tests, activated or not.
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.session: str | None = None

    def _ray(self, *args: str) -> None:
        # Each node's dashboard agent (which runs submitted jobs) listens on its own port: two nodes
        # of one machine on the default 52365 leave one agent unbound, and `ray job submit` then
        # answers "No available agent to submit job".
        subprocess.run([RAY, "start", *args, "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
                        "--object-store-memory", str(300 * 2**20), "--dashboard-agent-listen-port", str(free_port())],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._ray("--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--include-dashboard",
                  "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", self.dashboard.rsplit(":", 1)[1],
                  "--resources", '{"node_a": 1}')
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if "gcs_server" in command and f"--gcs_server_port={self.port}" in command:
                self.session = next(part for part in command.split("/") if part.startswith("session_"))
        assert self.session, "head node did not start"
        # Its own temporary folder, as a second machine would have: two nodes sharing one would share
        # the runtime-environment cache, and one node's clean-up would delete the other's unpacked
        # job working directory (`ray job submit --working-dir`). Short: it holds Unix sockets.
        self.worker_temp = tempfile.mkdtemp(prefix="rayb", dir="/tmp")
        self._ray("--address", self.address, "--node-ip-address", "127.0.0.1", "--resources", '{"node_b": 1}',
                  "--temp-dir", self.worker_temp)

    def raylet(self, marker: str) -> psutil.Process:
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if "raylet/raylet" in command and self.session in command and f"static_resource_list={marker}," in command:
                return process
        raise LookupError(marker)

    def node_ids(self) -> dict[str, str]:
        """marker resource -> Ray node id, read through the cluster's own API."""
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(json.dumps({[k for k in n['Resources'] if k.startswith('node_') and k[5:] in ('a', 'b')][0]: "
                "n['NodeID'] for n in ray.nodes() if n['Alive']}))")
        out = subprocess.run([sys.executable, "-c", code], env={**self.env, "RAY_ADDRESS": self.address},
                             capture_output=True, text=True, check=True, timeout=120)
        import json

        return json.loads(out.stdout.strip().splitlines()[-1])

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster (its session's daemons and the raylets' workers)."""
        found = {}
        for process in psutil.process_iter(["cmdline"]):
            try:
                if self.session and self.session in " ".join(process.info["cmdline"] or []):
                    found[process.pid] = process
                    found.update({c.pid: c for c in process.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def kill_node(self, marker: str) -> None:
        raylet = self.raylet(marker)
        for process in [*raylet.children(recursive=True), raylet]:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        for process in self.processes():
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self.processes(), timeout=20)
        # `ray start --head` records the cluster for later `ray.init()` calls; a killed cluster must
        # not leave that pointer behind.
        if getattr(self, "worker_temp", None):
            shutil.rmtree(self.worker_temp, ignore_errors=True)
        pointer = Path("/tmp/ray/ray_current_cluster")
        if pointer.exists() and pointer.read_text().strip().endswith(f":{self.port}"):
            pointer.unlink()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module (starting one costs ~20 s); the node-loss test, last, kills node_b."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not [p for p in cluster.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], \
            "the cluster is stopped afterwards"


def test_study_on_a_two_node_cluster_uses_both_nodes(cluster, server, small_store, tmp_path):
    nodes = cluster.node_ids()
    assert set(nodes) == {"node_a", "node_b"}
    # No --address: the cluster is handed over in RAY_ADDRESS, as `ray job submit` and KubeRay do.
    command = [sys.executable, "-m", "study.run", "--space", "smoke", "--data",
               str(small_store), "--tasks", "os_all", "--backbones", "seresnext50", "--num-samples", "2",
               "--max-concurrent", "2", "--tracking-uri", server.uri, "--storage-path", str(tmp_path / "shared"),
               "--name", "two_nodes"]
    run = subprocess.run(command, cwd=PROJECT_ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = trial_runs(server.uri, "two_nodes")
    assert len(runs) == 2 and "FINISHED" in {r.info.status for r in runs} <= {"FINISHED", "KILLED"}  # ASHA may prune one
    assert {r.data.tags["node_id"] for r in runs} == set(nodes.values()), "one trial on each node"
    assert all(names.EPOCH_CINDEX.name in r.data.metrics for r in runs), "results reached the server"
    final = {names.OOF_CINDEX.name, names.BRIER_365.name}
    assert all(final <= set(r.data.metrics) for r in runs if r.info.status == "FINISHED")
    storage = tmp_path / "shared" / "two_nodes" / "trials"
    assert list(storage.glob("experiment_state-*.json"))
    finished = sum(r.info.status == "FINISHED" for r in runs)
    assert len(list(storage.glob("cv_trainable_*/checkpoint_*/fold1_model.pt"))) == finished, "fold models kept"


def test_ray_job_submit_as_the_cluster_guide_says(cluster, server, small_store, tmp_path):
    """`ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m study.run ...`, as in
    the cluster guide, docs/guides/cluster.md (its dashboard port here a free one): the job's study uses both nodes and tracks to
    the server."""
    nodes = cluster.node_ids()
    readme = (PROJECT_ROOT / "docs" / "guides" / "cluster.md").read_text()
    assert re.search(r"ray job submit --address http://127\.0\.0\.1:8265 --working-dir \. -- \\\n\s+python -m study\.run",
                     readme)
    # `python` is the user's activated environment: the one running these tests.
    env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    submit = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--",
              "python", "-m", "study.run", "--space", "smoke", "--data", str(small_store), "--tasks", "os_all",
              "--backbones", "seresnext50", "--num-samples", "2", "--tracking-uri", server.uri,
              "--storage-path", str(tmp_path / "shared"), "--name", "submitted"]
    deadline = time.monotonic() + 120
    while True:
        run = subprocess.run(submit, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
        # The head's job agent registers some seconds after `ray start` on a busy machine; the
        # dashboard then answers "No available agent to submit job, please try again later".
        if "No available agent" not in run.stdout + run.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    (tmp_path / "job.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "succeeded" in run.stdout and "Ray: 2 node(s)" in run.stdout, run.stdout[-3000:]
    runs = trial_runs(server.uri, "submitted")
    assert len(runs) == 2 and "FINISHED" in {r.info.status for r in runs}
    # The default --max-concurrent is the cluster's trial slots (one per node here), not the head's CPUs.
    assert {r.data.tags["node_id"] for r in runs} == set(nodes.values()), "one trial on each node"
    assert all(names.EPOCH_CINDEX.name in r.data.metrics for r in runs), "results reached the server"


def test_worker_node_lost_mid_study_trials_finish_on_the_other(cluster, server, small_store, tmp_path):
    nodes = cluster.node_ids()
    command = study_command(small_store, tmp_path, "node_loss", server.uri) + ["--address", cluster.address]
    command[command.index("--max-concurrent") + 1] = "2"
    log = tmp_path / "driver.log"
    with running_study(command, log, env=cluster.env) as driver:
        deadline = time.monotonic() + 300
        while not any(c.name == "checkpoint_000002" for c in (tmp_path / "rr").glob("node_loss/*/cv_trainable_*/checkpoint_*")):
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        cluster.kill_node("node_b")
        wait_for(log, driver, "lost its worker", timeout=240)
        assert driver.wait(timeout=500) == 0, log.read_text()
    runs = trial_runs(server.uri, "node_loss")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    moved = [r for r in runs if r.data.tags.get("restarts") == "1"]
    assert len(moved) == 1, [r.data.tags for r in runs]
    assert moved[0].data.tags["node_id"] == nodes["node_a"], "rescheduled on the remaining node"
    client = MlflowClient(server.uri)
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, names.EPOCH_CINDEX.name))
        assert steps == list(range(1, EPOCHS + 1)), "every epoch logged once"
        assert_resumed_not_restarted(reported_epochs(tmp_path / "rr" / "node_loss", run.data.tags["trial_id"]))
