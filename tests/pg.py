"""A real PostgreSQL server for tests: one per test session, in a temp dir, on a free port.

Test modules import the fixtures: `from pg import pg_url, postgres  # noqa: F401`. Every test
gets a database of its own (`pg_url`); the server is started on first use and stopped at exit.
The server refuses to run as root, so as root it runs as the `postgres` user.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

USER = "ttt"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("PostgreSQL server binaries not found: apt-get install postgresql (`make test` does it)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl in `root`; `stop()` and `start()` again keep the data and the port."""

    def __init__(self, root: Path, **settings: str):
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self.bin = _bin_dir()
        self.settings = {"max_connections": "300", **settings}
        self.running = False
        as_root = os.geteuid() == 0
        self._prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        if as_root:
            shutil.chown(root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._prefix, str(self.bin / tool), *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}{log[-2000:]}")

    def start(self) -> None:
        options = f"-k {self.root} -p {self.port} -h 127.0.0.1 " + " ".join(
            f"-c {k}={v}" for k, v in self.settings.items()
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = "t" + uuid.uuid4().hex[:12]
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return name

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_server(**settings: str) -> PostgresServer:
    """A new server in a fresh temp dir (the caller destroys it)."""
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="ttt-pg-")), **settings)
    server.start()
    return server


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """The session's server (fsync off: tests need its behaviour, not its durability on power loss)."""
    global _shared
    if _shared is None:
        _shared = start_server(fsync="off", full_page_writes="off")
        atexit.register(_shared.destroy)
    if not _shared.running:  # a test that stopped it failed before starting it again
        _shared.start()
    return _shared


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    return shared_server()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres.url(postgres.create_database())
