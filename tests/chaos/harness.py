"""The chaos suite's environment: the real daemon (``python -m atlasd run``) as a child process
with the stand-in trainer and registry (``tests/chaos/standins``) first on ``PYTHONPATH``, and the
faults, injected from outside as an operator, a DBA or the kernel would: SQL on the test's own
database, signals, flag files of the stand-in registry.

One :class:`Chaos` per test (the ``chaos`` fixture): a fresh database (``db_url``), its own state,
policies and registry folders, the journal the stand-ins append to, and the knobs files. Every
test ends with :func:`tests.chaos.invariants.assert_invariants`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import yaml
from psycopg.rows import dict_row

from atlasd.testing import pg
from atlasd.testing.daemon import DaemonProcess, wait_until
from atlasd.testing.sdk import sdk_write_sessions
from tests.cadence_support import NO_SPLIT

ROOT = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
ATLASD_APPS = "application_name LIKE 'atlasd%'"  # every connection of the daemon (and of its CLI)
TEST_APP = "chaos-test"  # the test's own connections: never matched by ATLASD_APPS

# The daemon's settings in the suite: short backoffs, a heartbeat (and lock check) every second,
# a 3 s slow poll (registration retries, the runner's idle reconcile), a fast runner.
DAEMON_ENV = {
    "ATLASD_POLL_INTERVAL_S": "3",
    "ATLASD_RECONNECT_MAX_BACKOFF_S": "1",
    "WATCHDOG_USEC": "2000000",
    "ATLASD_RUNNER_POLL_S": "0.3",
    "ATLASD_CHILD_STOP_TIMEOUT_S": "10",
    "ATLASD_STALE_HEARTBEAT_S": "60",
    "ATLASD_METRICS_ADDR": "",
    "ATLASD_LOG_FORMAT": "json",
    "PYTHONUNBUFFERED": "1",
}


class ChaosDaemon(DaemonProcess):
    """``python -m atlasd run`` started from the test's folder, not the checkout: ``python -m``
    puts the working directory first on sys.path, and the checkout holds the real ``trainers`` and
    ``registry``; from elsewhere the stand-ins first on PYTHONPATH are what the daemon starts."""

    def __init__(self, chaos: Chaos, **env: str) -> None:
        super().__init__(chaos.db_url, chaos.state, cwd=chaos.tmp, **{**chaos.env(), **DAEMON_ENV, **env})

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc.poll() is None


class Chaos:
    """One scenario's world: its database, folders, daemons, the stand-ins' knobs and journal, and
    the faults (SQL on its database, signals) a test injects."""

    def __init__(self, db_url: str, tmp: Path) -> None:
        self.db_url = db_url
        self.dbname = urlsplit(db_url).path.lstrip("/")
        self.tmp = tmp
        self.state = tmp / "state"
        self.policies = tmp / "policies"
        self.registry = tmp / "registry"
        self.journal_path = tmp / "journal.jsonl"
        self.plan_path = tmp / "plan.json"
        for folder in (self.state, self.policies, self.registry):
            folder.mkdir(parents=True, exist_ok=True)
        self.daemons: list[ChaosDaemon] = []

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        """The environment of the daemon and of the CLI commands the test runs."""
        path = os.pathsep.join(filter(None, [str(STANDINS), str(ROOT), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, "ATLASD_DB_URL": self.db_url,
                "ATLASD_STATE_DIR": str(self.state), "ATLASD_POLICIES_DIR": str(self.policies),
                "CHAOS_JOURNAL": str(self.journal_path), "CHAOS_PLAN": str(self.plan_path),
                "CHAOS_REGISTRY_DIR": str(self.registry)}

    def start_daemon(self, **env: str) -> ChaosDaemon:
        daemon = ChaosDaemon(self, **env).start()
        self.daemons.append(daemon)
        daemon.wait_for("ready", timeout=60)
        return daemon

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``atlasd ARGS`` as an operator runs it (from the test folder: the stand-in registry)."""
        return subprocess.run([sys.executable, "-m", "atlasd", *args], cwd=self.tmp, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        """``atlasd status --json``."""
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def children(self, package: bytes) -> list[int]:
        """Live ``python -m trainers|registry`` processes of this test (their argv names its folder)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if package in argv and any(str(self.tmp).encode() in arg for arg in argv):
                    found.append(int(entry.name))
        return found

    def registry_children(self) -> list[int]:
        return self.children(b"registry")

    def cleanup(self) -> None:
        """Whatever a failed test left running: its daemons, then their trainer and registry children
        (found by argv: a trainer's spec and a registry child's files lie in this test's folder)."""
        for n, daemon in enumerate(self.daemons):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(10)
            with contextlib.suppress(OSError):
                (self.tmp / f"daemon-{n}.log").write_text(daemon.output)
        for pid in self.children(b"trainers") + self.children(b"registry"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ stand-in knobs and journal
    def plan(self, plans: dict[str, dict]) -> None:
        """The stand-in trainer's plan, read by each trainer at start: {"*" | run id: {...}}."""
        _write_json(self.plan_path, plans)

    def knobs(self, **knobs: Any) -> None:
        """The stand-in registry's knobs (down, gate_delay_s, tag_delay_s, delay_runs)."""
        _write_json(self.registry / "knobs.json", knobs)

    def hold_file(self, run_id: int) -> Path:
        return self.tmp / f"release-{run_id}"

    def hold(self, run_id: int, at: int, **more: Any) -> None:
        """Run ``run_id``'s trainer waits after step ``at`` until :meth:`release`."""
        plans = json.loads(self.plan_path.read_text()) if self.plan_path.is_file() else {}
        plans[str(run_id)] = {**plans.get(str(run_id), {}), "hold_at": at,
                              "hold_file": str(self.hold_file(run_id)), **more}
        self.plan(plans)

    def release(self, run_id: int) -> None:
        self.hold_file(run_id).touch()

    def journal(self, kind: str | None = None) -> list[dict]:
        if not self.journal_path.is_file():
            return []
        records = [json.loads(line) for line in self.journal_path.read_text().splitlines() if line.strip()]
        return [r for r in records if kind is None or r["kind"] == kind]

    def wait_journal(self, predicate: Callable[[dict], bool], timeout: float, what: str,
                     interval: float = 0.005) -> dict:
        return wait_until(lambda: next((r for r in self.journal() if predicate(r)), None), timeout, what, interval)

    def registry_store(self) -> dict:
        path = self.registry / "store.json"
        return json.loads(path.read_text()) if path.is_file() else {"models": {}, "runs": {}}

    # ------------------------------------------------------------------ policies
    def write_policy(self, name: str = "p", *, every: int | None = 10, cron: str | None = None,
                     min_reward: float = 0.5, max_retries: int = 2, **extra: Any) -> Path:
        gears: dict[str, Any] = {}
        if every is not None:
            gears["fast"] = {"trigger": {"batch": {"every": every}}, "filters": {"min_reward": min_reward},
                             "eval": NO_SPLIT, "wall_clock_limit": "10m"}
        if cron is not None:
            gears["hq"] = {"trigger": {"cron": {"expr": cron}}, "filters": {"min_reward": min_reward},
                           "eval": NO_SPLIT, "wall_clock_limit": "10m"}
        doc = {"name": name, "teacher": "stand-in-teacher", "student": "stand-in-student",
               "targets": {"baseline_success": 0.0, "min_success_delta": 0.0},
               "retry": {"max_retries": max_retries}, "resume_interrupted": True, "gears": gears, **extra}
        path = self.policies / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    # ------------------------------------------------------------------ SQL
    def sql(self, query: str, params: Any = None, url: str | None = None) -> list[tuple]:
        with psycopg.connect(url or self.db_url, autocommit=True, application_name=TEST_APP) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def one(self, query: str, params: Any = None) -> Any:
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def monitor(self) -> psycopg.Connection:
        """A connection opened now (it stays usable while the database refuses new ones)."""
        return psycopg.connect(self.db_url, autocommit=True, application_name=TEST_APP)

    def approve(self, n: int, *, score: Any = 0.9, key: str = "math", metadata: str | None = None,
                reward_stats: str | None = None) -> list[int]:
        """``n`` ready sessions (approved, succeeded) in one statement, as a reviewer's bulk approval."""
        meta = metadata if metadata is not None else json.dumps({"learning_key": key})
        reward = reward_stats if reward_stats is not None else json.dumps({"score": score})
        rows = self.sql("""INSERT INTO sessions (task, status, review_status, metadata, reward_stats, final_answer)
                           SELECT 'chaos ' || g, 'succeeded', 'approved', %s::jsonb, %s::jsonb, '42'
                             FROM generate_series(1, %s) g RETURNING id""", [meta, reward, n])
        return [r[0] for r in rows]

    def burst(self, count: int, writers: int = 4) -> tuple[threading.Thread, dict]:
        """``count`` sessions written as the SDK does (asyncpg, one statement per write), in a thread."""
        out: dict = {}

        def go() -> None:
            try:
                out.update(asyncio.run(sdk_write_sessions(self.db_url, count, writers=writers)))
            except Exception as exc:  # noqa: BLE001 - reported by the test
                out["error"] = repr(exc)

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        return thread, out

    def runs(self) -> dict[int, dict]:
        with psycopg.connect(self.db_url, autocommit=True, application_name=TEST_APP) as conn:
            cur = conn.cursor(row_factory=dict_row)
            return {r["id"]: r for r in cur.execute("SELECT * FROM atlasd.runs ORDER BY id").fetchall()}

    def wait_run(self, run_id: int, states: set[str], timeout: float = 30) -> dict:
        def reached():
            row = self.runs().get(run_id)
            return row if row and row["state"] in states else None
        return wait_until(reached, timeout, f"run {run_id} in {sorted(states)}", 0.05)

    def wait_step(self, run_id: int, step: int, timeout: float = 30) -> None:
        """Run ``run_id``'s trainer reported ``step`` (its stdout, as the executor logs it in the run folder)."""
        def reached():
            rows = self.sql("SELECT output_dir FROM atlasd.runs WHERE id = %s", [run_id])
            log = Path(rows[0][0]) / "stdout.jsonl" if rows and rows[0][0] else None
            if log is None or not log.is_file():
                return False
            for line in log.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("run_id") == run_id and event.get("event") == "step" and event["step"] >= step:
                        return True
            return False
        wait_until(reached, timeout, f"run {run_id} at step {step}", 0.02)

    def backlog(self) -> int:
        return self.one("""SELECT count(*) FROM sessions s WHERE s.review_status = 'approved' AND s.status = 'succeeded'
                             AND NOT EXISTS (SELECT 1 FROM atlasd.intake i WHERE i.session_id = s.id
                                                AND i.session_created_at IS NOT DISTINCT FROM s.created_at)""")

    def registration(self, run_id: int) -> tuple | None:
        rows = self.sql("SELECT state, attempts, last_error, model_version FROM atlasd.registrations WHERE run_id = %s",
                        [run_id])
        return rows[0] if rows else None

    # ------------------------------------------------------------------ database faults
    def terminate(self, where: str = ATLASD_APPS, conn: psycopg.Connection | None = None) -> list[str]:
        """pg_terminate_backend of this database's sessions matching ``where``; their application_names."""
        query = f"""SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid() AND {where}"""
        rows = conn.execute(query).fetchall() if conn is not None else self.sql(query)
        return sorted(app for app, _ in rows)

    def allow_connections(self, allowed: bool) -> None:
        self.sql(f'ALTER DATABASE "{self.dbname}" ALLOW_CONNECTIONS {str(allowed).lower()}', url=pg.ADMIN_URL)

    @contextlib.contextmanager
    def locked(self, *tables: str, mode: str = "EXCLUSIVE") -> Iterator[psycopg.Connection]:
        """``LOCK TABLE ... IN mode MODE`` held by a transaction of the test until the block ends."""
        with psycopg.connect(self.db_url, application_name=TEST_APP) as conn:
            conn.execute(f"LOCK TABLE {', '.join(tables)} IN {mode} MODE")
            try:
                yield conn
            finally:
                conn.rollback()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
