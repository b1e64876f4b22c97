"""Remote storage: a study whose cohort store and Tune storage live on an S3-compatible server
(moto's server mode on loopback); no test touches a real cloud."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT
from tests.services import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with a bucket; yields the environment that points at it."""
    import boto3
    import requests

    port = free_port()
    root = tmp_path_factory.mktemp("s3")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(root / "moto.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(env["AWS_ENDPOINT_URL"], timeout=1)
            break
        except requests.RequestException:
            assert time.monotonic() < deadline, (root / "moto.log").read_text()
            time.sleep(0.2)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="glioma")
    yield env
    server.kill()
    server.wait()


def _upload(folder: Path, uri: str, env: dict) -> None:
    code = ("import sys, pyarrow.fs as f; fs, root = f.FileSystem.from_uri(sys.argv[2]); "
            "f.copy_files(sys.argv[1], root, destination_filesystem=fs)")
    subprocess.run([sys.executable, "-c", code, str(folder), uri], env={**os.environ, **env}, check=True)


def _s3_keys(env: dict, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="glioma", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.mark.integration
def test_study_and_report_with_store_and_storage_on_s3(s3, small_store, tmp_path):
    _upload(small_store, "s3://glioma/stores/small.zarr", s3)
    env = {**os.environ, **s3, "GLIOMA_STUDY_CACHE": str(tmp_path / "node-cache")}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "-m", "study.run", "--space", "smoke", "--data", "s3://glioma/stores/small.zarr",
               "--tasks", "os_all", "--backbones", "seresnext50", "--num-samples", "2", "--max-concurrent", "2",
               "--tracking-uri", uri, "--storage-path", "s3://glioma/studies", "--name", "remote"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    staged = list((tmp_path / "node-cache").glob("*/staged"))
    assert len(staged) == 1, "one staged copy on this node, shared by the driver and both trials"
    keys = _s3_keys(s3, "studies/remote/")
    assert any(k.endswith("experiment_state-" + k.split("experiment_state-")[-1]) for k in keys if "experiment_state" in k)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("remote").experiment_id])
    statuses = [r.info.status for r in runs if r.data.tags.get("study_role") == "trial"]
    assert len(statuses) == 2 and "FINISHED" in statuses and set(statuses) <= {"FINISHED", "KILLED"}  # ASHA may prune
    # Every finished trial's fold models are on S3 (a stopped trial keeps no checkpoint).
    assert sum(k.endswith("fold0_model.pt") for k in keys) == statuses.count("FINISHED")

    # Resuming finds the Tune state on S3; the report downloads the trials' checkpoints from it.
    again = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "analysis.report", "--study", "remote", "--tracking-uri", uri,
                             "--out", str(tmp_path / "report"), "--gradcam-random", "0"],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert (tmp_path / "report" / "index.html").exists()


def test_unwritable_remote_storage_is_refused_before_training(s3, small_store, tmp_path):
    env = {**os.environ, **s3}
    run = subprocess.run([sys.executable, "-m", "study.run", "--space", "smoke", "--data", str(small_store),
                          "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage-path", "s3://no-such-bucket/x",
                          "--name", "nowhere"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--storage-path s3://no-such-bucket/x is not writable" in run.stderr
    assert not (tmp_path / "m.db").exists()
