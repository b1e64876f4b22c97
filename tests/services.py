"""Real services the slow tests start on loopback and always stop: an MLflow tracking server
(`python -m study.tracking serve`) and study drivers run as separate processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import PROJECT_ROOT


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """`python -m study.tracking serve` (a real mlflow server on loopback) that the test can kill
    and start again on the same port."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import requests

        self.process = subprocess.Popen(
            [sys.executable, "-m", "study.tracking", "serve", "--root", str(self.root / "server"),
             "--port", str(self.port), "--workers", "1"], cwd=PROJECT_ROOT,
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError((self.root / "server.log").read_text()[-3000:])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def running_study(command: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """A study driver writing to `log`; killed on leaving if it is still running."""
    with open(log, "w") as out:
        driver = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()


def wait_for(log: Path, driver: subprocess.Popen, text: str, count: int = 1, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().count(text) < count:
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
