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

    def __init__(self, root: Path, args: tuple[str, ...] = (), env: dict | None = None):
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.args, self.env = args, env

    def start(self) -> None:
        import requests

        self.process = subprocess.Popen(
            [sys.executable, "-m", "study.tracking", "serve", "--root", str(self.root / "server"),
             "--port", str(self.port), "--workers", "1", *self.args], cwd=PROJECT_ROOT,
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.process.poll() is None:
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


def postgres_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (initdb, pg_ctl), newest version, or None."""
    import shutil as _shutil

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = _shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throw-away PostgreSQL cluster (Debian's server) on 127.0.0.1 with a database `mlflow`, run
    as the `postgres` user when the tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self):
        import tempfile

        self.bin = postgres_binaries()
        # Its own folder in /tmp, which the postgres user can reach (test folders are private to root).
        self.root, self.port = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp")), free_port()
        self.data = self.root / "pgdata"
        self.uri = f"postgresql://mlflow@127.0.0.1:{self.port}/mlflow"
        self._user = None
        if os.geteuid() == 0:
            import pwd

            self._user = pwd.getpwnam("postgres")

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self._user else []
        return subprocess.run([*prefix, *command], check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        if self._user:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start")
        if "mlflow" not in self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow",
                                     "-d", "postgres", "-Atc", "select datname from pg_database").stdout.split():
            self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow")

    def pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        import shutil as _shutil

        if self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        _shutil.rmtree(self.root, ignore_errors=True)


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 with a bucket; `env` points the AWS SDKs (boto3,
    pyarrow) at it."""

    def __init__(self, root: Path, bucket: str = "glioma"):
        self.root, self.bucket, self.port = root, bucket, free_port()
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}
        self.process = None

    def start(self) -> None:
        import boto3
        import requests

        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=open(self.root / "moto.log", "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, (self.root / "moto.log").read_text()
                time.sleep(0.2)
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def upload_folder(self, folder: Path, uri: str) -> None:
        code = ("import sys, pyarrow.fs as f; fs, root = f.FileSystem.from_uri(sys.argv[2]); "
                "f.copy_files(sys.argv[1], root, destination_filesystem=fs)")
        subprocess.run([sys.executable, "-c", code, str(folder), uri], env={**os.environ, **self.env}, check=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def kill_conversion_workers(out: Path, patient_id: str, stop, killed: list) -> None:
    """Kill (SIGKILL) every conversion worker that takes `patient_id` while converting into the
    store `out`, as a file that crashes its reader would, until `stop` is set (run in a thread;
    `killed` collects the process ids). The converter names a patient's worker in
    ``.converting/<slot>``."""
    import json

    while not stop.is_set():
        try:
            slot = json.loads((out / "zarr.json").read_text())["attributes"]["patient_ids"].index(patient_id)
            worker = int((out / ".converting" / str(slot)).read_text())
        except (OSError, ValueError, KeyError):
            time.sleep(0.01)
            continue
        if worker != os.getpid() and worker not in killed:
            os.kill(worker, signal.SIGKILL)
            killed.append(worker)
