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


class FaultyLink:
    """A TCP proxy on loopback between a client and a real server that the test can cut: `down()`
    closes every connection and refuses new ones (the server is unreachable); `lose_next_response()`
    lets the next request reach the server and drops its answer, then goes down or, with
    ``then="up"``, stays up for the client to send it again (the server did the work, the client
    never heard: the moment a record is most easily lost or duplicated)."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self._state = "up"  # up | lose | down
        self._after_loss = "down"
        self._lock = threading.Lock()
        self._sockets: set = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def state(self) -> str:
        return self._state

    def up(self) -> None:
        self._state = "up"

    def down(self) -> None:
        with self._lock:
            self._state = "down"
            for sock in list(self._sockets):
                self._close(sock)

    def lose_next_response(self, then: str = "down") -> None:
        self._after_loss = then
        self._state = "lose"

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listener.close()

    def _close(self, sock) -> None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        self._sockets.discard(sock)

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._state == "down":
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, server):  # no Nagle delay on forwarded requests and answers
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source, sink, answers: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if answers and self._state == "lose":  # the server answered: drop it
                    if self._after_loss == "down":
                        self.down()
                        return
                    self._state = "up"
                    break
                if self._state == "down":
                    break
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._close(source)
            self._close(sink)
