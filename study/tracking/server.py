"""``python -m study.tracking serve``: an MLflow tracking server for studies on a cluster.

It runs ``mlflow server`` with a database backend (SQLite in ``--root`` by default, for one
person on a persistent disk; PostgreSQL or MySQL as teams run them: ``--backend-store-uri
postgresql://USER:PASSWORD@HOST/DB``) and an artifact destination that the server itself serves
(``ROOT/artifacts`` by default; ``--artifacts-destination s3://BUCKET/mlflow`` or ``gs://...``
on a cluster, so that nothing is lost with the head node; clients never need the artifact store's
credentials, the server does). The database URI may also come from ``MLFLOW_BACKEND_STORE_URI``
(keeps a password off the command line). It binds to 127.0.0.1: on a Ray cluster the study's driver runs on the head node
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


def server_command(root: Path, host: str, port: int, backend_store_uri: str | None, workers: int,
                   artifacts_destination: str | None = None) -> list[str]:
    """The ``mlflow server`` command line. The database URI is not on it: it goes to the server in
    ``MLFLOW_BACKEND_STORE_URI`` (`server_environment`), so a password never shows in ``ps``."""
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--artifacts-destination", artifacts_destination or str(root.absolute() / "artifacts"),
            "--workers", str(workers)]


def server_environment(root: Path, backend_store_uri: str | None) -> dict[str, str]:
    return {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store_uri or f"sqlite:///{root.absolute() / 'mlflow.db'}"}


DATABASES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://", "mysql://",
             "mysql+pymysql://")


def backend_problem(uri: str) -> str | None:
    """Why MLflow could not keep its runs in `uri`, or None: an unknown scheme, a missing driver, or
    a database that does not answer (checked before the server starts: MLflow's own server retries
    and then logs a traceback per worker)."""
    if not uri.startswith(DATABASES):
        return (f"--backend-store-uri {uri.split('@')[-1]}: not a database URI; use sqlite:////ABSOLUTE/PATH/mlflow.db, "
                "postgresql://USER:PASSWORD@HOST/DB or mysql://...")
    if uri.startswith("sqlite:///"):
        return None
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, pool_pre_ping=True)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as exc:
        return (f"--backend-store-uri: the database driver {exc.name!r} is not installed (pip install "
                "'glioma-survival-study[cluster]' installs psycopg for PostgreSQL)")
    except Exception as exc:  # the database's own reason: refused, unknown host, authentication
        shown = str(exc).strip().splitlines()[0][:300]
        return f"--backend-store-uri {uri.split('@')[-1]}: cannot connect ({shown})"
    return None


def artifacts_problem(destination: str) -> str | None:
    """Why the server could not keep artifacts at an object-store `destination`, or None."""
    from datasets.remote import is_remote

    if not is_remote(destination):
        return None
    try:
        from datasets.remote import check_writable

        check_writable(destination)
    except Exception as exc:
        return f"--artifacts-destination {destination}: {str(exc).split(': ', 1)[-1][:300]}"
    return None


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
    from datasets.cli import HelpFormatter, new_parser

    parser = new_parser("study.tracking", __doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the tracking server", formatter_class=HelpFormatter)
    serve.add_argument("--root", type=Path, default=Path("mlflow-server"), help="folder of the SQLite database and artifacts")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (loopback: reach it through an SSH tunnel)")
    serve.add_argument("--port", type=int, default=5000, help="port")
    serve.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI"),
                       help="database URI instead of ROOT/mlflow.db, e.g. postgresql://USER:PASSWORD@HOST/mlflow "
                            "(default: $MLFLOW_BACKEND_STORE_URI, else ROOT/mlflow.db)")
    serve.add_argument("--artifacts-destination", default=os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"),
                       help="where the server keeps artifacts: a folder or s3:// gs:// URI (default: "
                            "$MLFLOW_ARTIFACTS_DESTINATION, else ROOT/artifacts)")
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
    if problem is None and args.backend_store_uri:
        problem = backend_problem(args.backend_store_uri)
    if problem is None and args.artifacts_destination:
        problem = artifacts_problem(args.artifacts_destination)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    command = server_command(args.root, args.host, args.port, args.backend_store_uri, args.workers,
                             args.artifacts_destination)
    backend = (args.backend_store_uri or "").split("@")[-1] or str(args.root.absolute() / "mlflow.db")
    print(f"MLflow tracking server on http://{args.host}:{args.port} (runs in {backend}, artifacts in "
          f"{args.artifacts_destination or args.root.absolute() / 'artifacts'}); studies log to it with "
          f"--tracking-uri http://{args.host}:{args.port}", flush=True)
    # The server replaces this process: signals reach it directly.
    os.execve(sys.executable, command, server_environment(args.root, args.backend_store_uri))
    return 0  # not reached
