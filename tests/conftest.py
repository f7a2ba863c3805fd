"""Shared fixtures: a throwaway PostgreSQL cluster and a registry on SQLite or PostgreSQL."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torchops.registry import Registry


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL cluster on a loopback port, trust authentication."""

    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin_dsn(self) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname=postgres"


def _postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if os.environ.get("PG_BINDIR"):
        found.append(os.path.join(os.environ["PG_BINDIR"], "initdb"))
    found = [f for f in found if os.access(f, os.X_OK)]
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start a PostgreSQL cluster for the session, stop it (immediate) at the end."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(
            "!!! PostgreSQL tests SKIPPED: no server binaries under /usr/lib/postgresql/*/bin "
            "(install postgresql, or set PG_BINDIR) !!!"
        )
    as_root = os.geteuid() == 0
    # initdb refuses to run as root: run the cluster as the postgres system user
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="torchops-pg-"))
    if as_root:
        shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    log = base / "server.log"
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    subprocess.run(
        [*run_as, *initdb, "-E", "UTF8", "--locale=C", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = (
        "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        f"-c full_page_writes=off -c max_connections=200 -k {base}"
    )
    port = 0
    for _attempt in range(5):
        port = _free_port()
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60"]
        started = subprocess.run(
            [*run_as, *pg_ctl, "-o", f"-p {port} {options}", "start"],
            capture_output=True,
        )
        if started.returncode == 0:
            break
    else:
        message = log.read_text(errors="replace") if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {message[-2000:]}")
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"]
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {port} never became ready")
            time.sleep(0.1)
        yield PostgresServer("127.0.0.1", port, "postgres")
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty registry database: SQLite in ``tmp_path`` or a new PostgreSQL one."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    """A registry on each back end (fresh database) with its blobs under ``tmp_path``."""
    reg = Registry(tmp_path / "home", url=database_url)
    try:
        yield reg
    finally:
        reg.close()
