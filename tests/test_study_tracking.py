"""The tracker tells a tracking server that is away (wait, keep the record) from a request the
server refused (raise), by MLflow's error code and the error it wraps, not by its message."""

from __future__ import annotations

import socket

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from study.tracking.tracker import _unreachable


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket is closed


def test_a_server_that_is_away_waits_and_a_refused_request_is_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException) as away:
        MlflowClient(f"http://127.0.0.1:{_closed_port()}").get_experiment_by_name("x")
    assert _unreachable(away.value)
    with pytest.raises(MlflowException) as refused:  # a real server's answer: no such run
        MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run("0" * 32)
    assert not _unreachable(refused.value)
    assert _unreachable(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))
    assert not _unreachable(MlflowException("Connection refused"))  # words alone decide nothing
