"""A cluster study as the cluster guide's steps run it, with every record on durable storage: a two-node
Ray cluster on loopback (token authentication), an S3-compatible object server (moto) holding the
cohort, the study's storage path and MLflow's artifacts, and a real PostgreSQL as MLflow's
database behind `python -m study.tracking serve`. The study is submitted with
``ray job submit --working-dir .``; its tracking server is killed and started again mid-study;
the job's working folder is deleted afterwards. A resume from another folder, the report, the
registered model and the Optuna journal then read everything back from the bucket and the
database, and nothing is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evaluation import metric_names as names
from tests.conftest import PROJECT_ROOT
from tests.services import PostgresServer, S3Server, TrackingServer, postgres_binaries
from tests.test_cluster import RAY, LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.integration,
              pytest.mark.skipif(postgres_binaries() is None, reason="needs Debian's postgresql (.ci/run installs it)")]

NAME, TRIALS, EPOCHS = "cloud", 4, 2
STORE = "s3://glioma/stores/small.zarr"
STORAGE = "s3://glioma/studies"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The user's laptop (a HOME with the token `ray get-auth-token --generate` made), the bucket,
    the database, the tracking server and the cluster, each stopped afterwards."""
    root = tmp_path_factory.mktemp("site")
    home = root / "home"
    home.mkdir()
    laptop = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(home),
              "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=laptop, check=True, capture_output=True, timeout=60)
    s3, postgres = S3Server(root / "s3"), PostgresServer()
    server = TrackingServer(root, ("--backend-store-uri", postgres.uri, "--artifacts-destination",
                                   "s3://glioma/mlflow-artifacts"), s3.env)
    cluster = LocalCluster(root, token=home / ".ray" / "auth_token", env=s3.env)  # nodes' credentials
    try:
        s3.start()
        postgres.start()
        server.start()
        cluster.start()
        yield {"laptop": {**laptop, "RAY_AUTH_MODE": "token"}, "s3": s3, "postgres": postgres, "server": server,
               "cluster": cluster, "root": root}
    finally:
        cluster.stop()
        server.kill()
        postgres.stop()
        s3.stop()


def job_logs(site, job: str) -> str:
    return subprocess.run([RAY, "job", "logs", "--address", site["cluster"].dashboard, job], env=site["laptop"],
                          capture_output=True, text=True, timeout=120).stdout


def wait_in_logs(site, job: str, text: str, count: int, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = job_logs(site, job)
        if logs.count(text) >= count:
            return logs
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(2)


def job_working_folders(site) -> list[Path]:
    """Ray's unpacked copies of --working-dir on the cluster's nodes."""
    roots = [Path("/tmp/ray"), Path(site["cluster"].worker_temp)]
    return sorted({p.resolve() for root in roots for p in root.glob("session_2*/runtime_resources/working_dir_files/"
                                                                    "_ray_pkg_*") if p.is_dir()})


def test_a_cluster_study_keeps_every_record_on_durable_storage(site, small_store, tmp_path):
    s3, server, cluster = site["s3"], site["server"], site["cluster"]
    s3.upload_folder(small_store, STORE)
    before = set(job_working_folders(site))
    study = ["python", "-m", "study.run", "--space", "smoke", "--data", STORE, "--tasks", "os_all", "--backbones",
             "seresnext50", "--num-samples", str(TRIALS), "--no-pruning", "--storage-path", STORAGE,
             "--tracking-uri", server.uri, "--name", NAME, "--register-models"]
    submitted = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                                "--no-wait", "--", *study], cwd=PROJECT_ROOT, env=site["laptop"], capture_output=True,
                               text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout).group(0)

    # The tracking server goes away after the first trial ended and comes back after another one.
    wait_in_logs(site, job, "finished, out-of-fold C-index", 1)
    server.kill()
    wait_in_logs(site, job, "finished, out-of-fold C-index", 2)
    server.start()
    status = subprocess.run([RAY, "job", "logs", "--address", cluster.dashboard, "--follow", job],
                            env=site["laptop"], capture_output=True, text=True, timeout=600)
    logs = status.stdout
    (tmp_path / "job.log").write_text(logs)
    assert "unreachable" in logs and "is back" in logs, logs[-3000:]
    assert f"Written to {STORAGE}/{NAME}/results.md" in logs, logs[-3000:]
    final = subprocess.run([RAY, "job", "status", "--address", cluster.dashboard, job], env=site["laptop"],
                           capture_output=True, text=True, timeout=120)
    assert f"Job '{job}' succeeded" in final.stdout, final.stdout + logs[-3000:]

    # Ray deletes a job's working folder; nothing the study needs may have lived there.
    for folder in set(job_working_folders(site)) - before:
        shutil.rmtree(folder)

    keys = set(s3.keys(f"studies/{NAME}/"))
    for record in ("optuna.journal", "tracking_journal.jsonl", "results.md", "results.csv", "timings.json"):
        assert f"studies/{NAME}/{record}" in keys, sorted(keys)
    assert s3.read(f"studies/{NAME}/tracking_journal.jsonl") == b"", "every tracking record delivered"
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(s3.read(f"studies/{NAME}/optuna.journal"))
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    searched = optuna.load_study(study_name="seresnext50__os_all", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert len(searched.trials) == TRIALS and {t.state.name for t in searched.trials} == {"COMPLETE"}

    # Nothing lost across the outage: every trial run whole, in PostgreSQL, its artifacts in the bucket.
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("study_role") == "trial"]
    assert len(trials) == TRIALS and len({r.data.tags["trial_key"] for r in trials}) == TRIALS
    for run in trials:
        assert run.info.status == "FINISHED" and {"lr", "batch_size"} <= set(run.data.params)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, names.EPOCH_CINDEX.name))
        assert steps == list(range(1, EPOCHS + 1))
        assert {names.OOF_CINDEX.name, names.BRIER_365.name} <= set(run.data.metrics)
        assert {"oof_predictions.csv", "learning_curve.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(k.startswith("mlflow-artifacts/") and k.endswith("oof_predictions.csv") for k in s3.keys("mlflow-artifacts/"))

    # From another folder on another machine: the resume reads Tune's state and the records from the bucket.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, **s3.env, "GLIOMA_STUDY_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    resumed = subprocess.run([sys.executable, *study[1:], "--resume"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert list(elsewhere.iterdir()) == [], "nothing written to the working folder"
    report = subprocess.run([sys.executable, "-m", "analysis.report", "--study", NAME, "--tracking-uri", server.uri,
                             "--out", str(tmp_path / "report"), "--gradcam-random", "0"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert (tmp_path / "report" / "index.html").exists()

    # The registered model loads from the registry (PostgreSQL) and its artifacts (the bucket, through the server).
    code = (f"import json, mlflow, pandas as pd; mlflow.set_tracking_uri({server.uri!r}); "
            f"model = mlflow.pyfunc.load_model('models:/{NAME}-seresnext50__os_all/1'); "
            f"print(json.dumps(model.predict(pd.DataFrame({{'store': [{str(small_store)!r}]}}))['dpi'].tolist()))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env={**os.environ}, capture_output=True,
                            text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    dpi = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert len(dpi) == 12 and len(set(dpi)) > 1
