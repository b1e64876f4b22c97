"""``python -m study.tracking serve``: an MLflow tracking server for studies on a cluster.

It runs ``mlflow server`` with a database backend (SQLite in ``--root`` by default; PostgreSQL
for several writers or a long-lived server: ``--backend-store-uri postgresql://...``) and an
artifact root that the server itself serves (clients never need the artifact store's
credentials). It binds to 127.0.0.1: on a Ray cluster the study's driver runs on the head node
(``ray job submit``) and is MLflow's only writer, so nothing else needs to reach it. To look at
the UI from a laptop, tunnel: ``ssh -L 5000:127.0.0.1:5000 HEAD``. Binding another address is
allowed but warned about: MLflow has no authentication unless you add it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_command(root: Path, host: str, port: int, backend_store_uri: str | None, workers: int) -> list[str]:
    backend = backend_store_uri or f"sqlite:///{root.absolute() / 'mlflow.db'}"
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend, "--artifacts-destination", str(root.absolute() / "artifacts"),
            "--workers", str(workers)]


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None. Checked before exec: MLflow's own
    server logs a bind failure and exits 0, which reads as a server that started."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"--host {host}: cannot be resolved ({exc})"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no clash
        try:
            probe.bind(address)
        except OSError as exc:
            return (f"--port {port} on {host} is not free ({exc.strerror}): another server (an earlier "
                    f"tracking server?) listens there; stop it or choose another --port")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study.tracking", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the tracking server", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--root", type=Path, default=Path("mlflow-server"), help="folder of the SQLite database and artifacts")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (loopback: reach it through an SSH tunnel)")
    serve.add_argument("--port", type=int, default=5000, help="port")
    serve.add_argument("--backend-store-uri", default=None,
                       help="database URI instead of ROOT/mlflow.db, e.g. postgresql://user@db/mlflow")
    serve.add_argument("--workers", type=int, default=2, help="server worker processes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be 1-65535, got {args.port}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        print(f"warning: binding {args.host}: anyone who can reach port {args.port} can read, change and delete "
              "every run (MLflow has no authentication by default). Prefer --host 127.0.0.1 with an SSH tunnel, "
              "or put the server behind an authenticating proxy.", file=sys.stderr)
    problem = port_problem(args.host, args.port)
    if problem is None:  # the artifact store lives in --root with any backend
        try:
            args.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"--root {args.root}: cannot be created ({exc.strerror})"
        else:
            if not os.access(args.root, os.W_OK | os.X_OK):
                problem = f"--root {args.root}: not writable (a read-only file system?)"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    command = server_command(args.root, args.host, args.port, args.backend_store_uri, args.workers)
    print(f"MLflow tracking server on http://{args.host}:{args.port} (data in {args.root.absolute()}); "
          f"studies log to it with --tracking-uri http://{args.host}:{args.port}", flush=True)
    os.execv(sys.executable, command)  # the server replaces this process: signals reach it directly
    return 0  # not reached
