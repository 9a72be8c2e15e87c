"""A throw-away PostgreSQL cluster from the local PostgreSQL binaries (initdb + pg_ctl).

Why this and not a Python-packaged server: the distribution's binaries are already on the machines
atlasd targets (the SDK needs a Postgres anyway), nothing is downloaded, and the server is the same
major version the team runs. What it does to the system: a cluster in a fresh temp folder, listening
only on 127.0.0.1 at a free port, no unix socket, trust auth for local connections, fsync off; it is
stopped and its folder deleted on exit. PostgreSQL refuses to run as root, so when atlasd runs as root
the cluster runs as the ``postgres`` system user (else ``nobody``) via ``setpriv``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


class EmbeddedPostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The folder with initdb/pg_ctl/postgres: $ATLASD_PG_BINDIR, pg_config --bindir, Debian's layout, or PATH."""
    candidates: list[Path] = []
    if os.environ.get("ATLASD_PG_BINDIR"):
        candidates.append(Path(os.environ["ATLASD_PG_BINDIR"]))
    if shutil.which("pg_config"):
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
            candidates.append(Path(out.strip()))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates.extend(reversed(debian))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install the postgresql package, "
        "set ATLASD_PG_BINDIR, or set ATLASD_DB_URL to use an existing database"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedPostgres:
    """``with EmbeddedPostgres() as pg: pg.url`` -- a running throw-away cluster."""

    def __init__(self, bindir: Path | None = None, database: str = "atlas") -> None:
        self.bindir = bindir or find_bindir()
        self.database = database
        self.port = _free_port()
        self.root: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if self._user is None:
            return argv
        return ["setpriv", f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}", "--clear-groups", *argv]

    def _run(self, argv: list[str], what: str) -> None:
        proc = subprocess.run(self._as_owner(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise EmbeddedPostgresError(f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")

    def start(self) -> EmbeddedPostgres:
        self.root = Path(tempfile.mkdtemp(prefix="atlasd-demo-pg-"))
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    self._user = pwd.getpwnam(name)
                    break
            if self._user is None:
                raise EmbeddedPostgresError("running as root and no unprivileged user (postgres, nobody) to run the server")
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
            os.chmod(self.root, 0o700)
        data = self.root / "data"
        self._run([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                   "--encoding=UTF8", "--no-sync", "--no-instructions"], "initdb")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off " \
                  "-c synchronous_commit=off -c full_page_writes=off"
        self._run([str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.log_path), "-o", options,
                   "-w", "-t", "60", "start"], "pg_ctl start")
        self._started = True
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f'CREATE DATABASE "{self.database}"')
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        if self._started:
            with contextlib.suppress(EmbeddedPostgresError):
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60",
                           "stop"], "pg_ctl stop")
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> EmbeddedPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
