"""Database faults against the real daemon (`python -m atlasd run`, a child process) on real
Postgres, injected with SQL on the test's own database: `pg_terminate_backend` of the daemon's
connections (selected by application_name: `atlasd` for the pool, `atlasd-lock`,
`atlasd-listener`, `atlasd-status`), `ALTER DATABASE ... ALLOW_CONNECTIONS false`, a second
daemon taking the lock, a hung lock session (SIGSTOP of its server process) and a dropped NOTIFY
trigger. The daemon never stops for them: it reconnects, re-takes its lock and catches up, and
shows what it is riding out (STATUS=, `atlasd status --json`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml

from atlasd import queue
from atlasd.daemon import Daemon
from atlasd.db.migrate import trigger_sql
from atlasd.health import Health
from atlasd.lock import DAEMON_LOCK_KEY
from atlasd.settings import load_settings
from atlasd.status import collect_status
from atlasd.testing import pg
from atlasd.testing.daemon import DaemonProcess, wait_until
from atlasd.testing.sdk import sdk_write_sessions
from atlasd.testing.pg import sql
from tests.test_service import NotifySocket, PgProxy, cli_status, scrape_fresh
from tests.cadence_support import NO_SPLIT

ATLASD_APPS = "application_name LIKE 'atlasd%'"  # every connection of the daemon (and of its CLI)
# reconnect and retry backoff capped at 1 s; a heartbeat (and lock check) every second
FAST = {"ATLASD_RECONNECT_MAX_BACKOFF_S": "1", "WATCHDOG_USEC": "2000000", "ATLASD_METRICS_REFRESH_S": "1"}


@pytest.fixture()
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def terminate(db: str | psycopg.Connection, where: str = ATLASD_APPS) -> list[str]:
    """pg_terminate_backend of the database's sessions matching ``where`` (through a new connection
    to ``db``, or an open one); their application_names."""
    query = f"""SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND {where}"""
    rows = sql(db, query) if isinstance(db, str) else db.execute(query).fetchall()
    return sorted(app for app, _ in rows)


def lock_holder(db_url: str) -> tuple[int, str] | None:
    """(backend pid, application_name) of the session holding the daemon lock."""
    rows = sql(db_url, """SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                             AND l.classid::bigint = %s AND l.objid::bigint = %s AND a.datname = current_database()""",
               [DAEMON_LOCK_KEY >> 32, DAEMON_LOCK_KEY & 0xFFFFFFFF])
    return rows[0] if rows else None


def add_ready(db_url: str, n: int) -> None:
    sql(db_url, """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                   SELECT 't', 'succeeded', 'approved', '{"learning_key": "k"}', '{"score": 1}'
                     FROM generate_series(1, %s)""", [n])


def recorded(db_url: str) -> tuple[int, int]:
    """(intake rows, distinct sessions among them)."""
    return sql(db_url, "SELECT count(*), count(DISTINCT session_id) FROM atlasd.intake")[0]


def backlog(db_url: str) -> int:
    return sql(db_url, """SELECT count(*) FROM sessions s WHERE s.review_status = 'approved' AND s.status = 'succeeded'
                            AND NOT EXISTS (SELECT 1 FROM atlasd.intake i WHERE i.session_id = s.id)""")[0][0]


# ---------------------------------------------------------------- stand-in trainer and registry children
STANDIN_TRAINER = '''
import json, os, pathlib, sys, time
spec = json.loads(pathlib.Path(sys.argv[2]).read_text())
out = pathlib.Path(spec["output_dir"])
with open(out / "pids", "a") as f:
    f.write(f"{os.getpid()}\\n")
steps = int(os.environ["STANDIN_STEPS"])
for step in range(1, steps + 1):
    print(json.dumps({"event": "step", "step": step, "total_steps": steps, "loss": 1 / step}), flush=True)
    time.sleep(0.1)
(out / "result.json").write_text(json.dumps({"run_id": spec["run_id"], "status": "succeeded", "steps": steps}))
'''
STANDIN_REGISTRY = '''
import json, pathlib, sys
args = sys.argv[1:]
if args[0] == "champion":
    print(json.dumps({"champion": None, "path": None}))
elif args[0] == "finalize":
    spec = json.loads(pathlib.Path(args[args.index("--spec") + 1]).read_text())
    print(json.dumps({"decision": "reject", "model_version": str(spec["run_id"]), "policy": spec["policy"],
                      "registered_model": "atlasd-" + spec["policy"], "previous_champion": None, "champion": None,
                      "reason": "stand-in", "checks": [], "mlflow_run_id": "stand-in"}))
else:
    sys.exit(2)
'''
REGISTRY_INIT = "EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 75\n"


def standins(folder: Path) -> Path:
    """Packages ``trainers`` and ``registry`` that shadow the real ones on PYTHONPATH: a trainer that
    reports STANDIN_STEPS steps (0.1 s each), a registry that rejects every run."""
    for package, main, init in (("trainers", STANDIN_TRAINER, ""), ("registry", STANDIN_REGISTRY, REGISTRY_INIT)):
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text(init)
        (folder / package / "__main__.py").write_text(main)
    return folder


class StandInDaemon(DaemonProcess):
    """The daemon run from its state folder (not the checkout), so that the stand-ins first on
    PYTHONPATH are what ``python -m trainers`` and ``python -m registry`` start."""

    def __init__(self, db_url: str, state_dir: Path, **env: str) -> None:
        super().__init__(db_url, state_dir, cwd=state_dir, PYTHONPATH=str(standins(state_dir / "standins")), **env)


def enqueue_run(db_url: str, policy: str) -> int:
    """A manual run over every recorded trace."""
    async def go() -> int:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            hi, n = await (await conn.execute("SELECT max(seq), count(*) FROM atlasd.intake")).fetchone()
            done = await queue.enqueue(conn, policy=policy, gear="fast", trigger="manual", window_lo=0,
                                       window_hi=hi, n_traces=n, priority=0)
            return done.run.id

    return asyncio.run(go())


# ---------------------------------------------------------------- the tests
def test_every_connection_terminated_mid_burst_and_mid_run_loses_nothing(db_url: str, tmp_path: Path) -> None:
    """3,000 sessions approved while every atlasd connection is terminated twice, a stand-in
    trainer running meanwhile: each session recorded once without a restart, the lock held
    again, the same trainer process finishes the same run, one registration."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump({
        "teacher": "t", "student": "s", "retry": {"max_retries": 0},
        "gears": {"fast": {"trigger": {"batch": {"every": 20000}}, "eval": NO_SPLIT}}}))
    kills: list[list[str]] = []
    killed_at: list[float] = []

    async def burst_and_terminate() -> dict:
        writing = asyncio.create_task(sdk_write_sessions(db_url, 3_000, writers=4))
        for kill in (1, 2):
            written = lambda: sql(db_url, "SELECT count(*) FROM sessions")[0][0] >= kill * 1_000  # noqa: E731
            await asyncio.to_thread(wait_until, written, 30, "burst progress", 0.01)
            kills.append(await asyncio.to_thread(terminate, db_url))
            killed_at.append(time.monotonic())
            await asyncio.to_thread(daemon.wait_for, "lock re-taken", 20, kill)
            await asyncio.to_thread(daemon.wait_for, "listening", 20, kill + 1, "listener")  # back before the next
            assert sql(db_url, "SELECT state FROM atlasd.runs WHERE id = %s", [run_id]) == [("running",)]
        return await writing

    add_ready(db_url, 10)  # the run's traces, recorded at start
    with StandInDaemon(db_url, tmp_path, STANDIN_STEPS="150", **FAST) as daemon:
        daemon.wait_for("ready")
        run_id = enqueue_run(db_url, "p")
        wait_until(lambda: sql(db_url, "SELECT pid FROM atlasd.runs WHERE id = %s AND state = 'running'",
                               [run_id]), 20, "the stand-in trainer running")
        t0 = time.monotonic()
        assert asyncio.run(burst_and_terminate())["distinct"] == 3_000
        for apps in kills:  # the lock, the listener and the pool's connections each time
            assert {"atlasd", "atlasd-listener", "atlasd-lock"} <= set(apps), apps
        wait_until(lambda: recorded(db_url) == (3_010, 3_010) or None, 30, "3,000 sessions in the intake")
        catch_up_s = time.monotonic() - t0
        assert backlog(db_url) == 0
        assert daemon.proc.poll() is None and not daemon.find("stopped")
        assert lock_holder(db_url)[1] == "atlasd-lock"
        assert sql(db_url, "SELECT pid, stopped_at FROM atlasd.daemon_state") == [(daemon.pid, None)]

        run = wait_until(lambda: sql(db_url, "SELECT state, pid FROM atlasd.runs WHERE id = %s AND state <> 'running'",
                                     [run_id]), 30, "the run's outcome")[0]
        assert run[0] == "succeeded"
        assert (tmp_path / "runs" / f"run-{run_id}" / "pids").read_text().split() == [str(run[1])]  # never restarted
        wait_until(lambda: sql(db_url, "SELECT state FROM atlasd.registrations WHERE run_id = %s", [run_id]) == [("done",)]
                   or None, 20, "the registration")
        assert sql(db_url, "SELECT count(*) FROM atlasd.runs") == [(1,)]
        assert sql(db_url, "SELECT count(*) FROM atlasd.promotions WHERE atlasd_run_id = %s", [run_id]) == [(1,)]

        # a heartbeat after the catch-up: nothing degraded, a reconcile since the faults
        status = wait_until(lambda: (s := cli_status(db_url, tmp_path / "policies"))["daemon"]["degraded"] == []
                            and s["daemon"]["last_reconcile_age_s"] < time.monotonic() - killed_at[-1] and s, 15,
                            "no degraded part left")
        assert status["daemon"]["running"] and status["listener"]["connected"] and status["problems"] == []
        assert daemon.stop() == 0
    print(f"catch-up after the burst: {catch_up_s:.1f} s")


def test_terminated_lock_connection_is_retaken_and_the_daemon_keeps_running(db_url: str, tmp_path: Path) -> None:
    with DaemonProcess(db_url, tmp_path, **FAST) as daemon:
        daemon.wait_for("ready")
        [(started_at,)] = sql(db_url, "SELECT started_at FROM atlasd.daemon_state")
        old = lock_holder(db_url)
        assert old[1] == "atlasd-lock"
        for n in (1, 2):
            assert terminate(db_url, "application_name = 'atlasd-lock'") == ["atlasd-lock"]
            lost = daemon.wait_for("lock connection lost; re-taking the lock", count=n, component="daemon")
            back = daemon.wait_for("lock re-taken", count=n, component="daemon")
            assert back["_t"] - lost["_t"] < 5
        new = lock_holder(db_url)
        assert new[1] == "atlasd-lock" and new[0] != old[0]
        # the same daemon, its start time kept, its heartbeat fresh; it still records sessions
        assert sql(db_url, "SELECT pid, started_at, stopped_at FROM atlasd.daemon_state") == [(daemon.pid, started_at, None)]
        add_ready(db_url, 5)
        wait_until(lambda: recorded(db_url) == (5, 5) or None, 10, "5 sessions recorded")
        status = wait_until(lambda: (s := cli_status(db_url, tmp_path / "policies"))["daemon"]["degraded"] == []
                            and s["daemon"]["running"] and s, 10, "a healthy, running daemon")
        assert status["daemon"]["lock_held"] and status["daemon"]["pid"] == daemon.pid
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0


def test_another_daemon_holding_the_lock_when_the_first_comes_back_stops_the_first(db_url: str, tmp_path: Path) -> None:
    proxy = PgProxy(db_url)  # the first daemon's connections go through it, so its lock re-take can be held back
    second = None
    try:
        with DaemonProcess(proxy.url, tmp_path / "a", **FAST) as first:
            first.wait_for("ready")
            second = DaemonProcess(db_url, tmp_path / "b", "--wait").start()
            second.wait_for("waiting for the database lock")
            proxy.refuse("atlasd-lock")
            holder = lock_holder(db_url)[0]
            sql(db_url, "SELECT pg_terminate_backend(%s)", [holder])
            first.wait_for("cannot re-take the database lock yet", component="daemon")
            second.wait_for("ready", timeout=15)  # took the lock the first one lost
            assert first.proc.poll() is None  # still trying, and intake waits for the lock
            proxy.allow("atlasd-lock")
            assert first.proc.wait(20) == 1
            message = "".join(first.stderr)
            expected = f"another atlasd (pid {second.pid} on host {socket.gethostname()}) took the lock on"
            assert expected in message and urlsplit(db_url).path in message, message
            assert "while this daemon was reconnecting its lock connection" in message
            assert first.find("another daemon holds the database lock; stopping", component="daemon")
            assert first.find("stopped")[-1]["exit_code"] == 1
            # the second daemon is the one now, and records
            assert sql(db_url, "SELECT pid, stopped_at FROM atlasd.daemon_state") == [(second.pid, None)]
            add_ready(db_url, 3)
            wait_until(lambda: recorded(db_url) == (3, 3) or None, 10, "the second daemon recording")
            assert second.stop() == 0
    finally:
        if second is not None:
            second.__exit__()
        proxy.close()


def test_database_refusing_connections_is_ridden_out_and_shown_degraded(
    db_url: str, tmp_path: Path, notify: NotifySocket
) -> None:
    dbname = urlsplit(db_url).path.lstrip("/")
    settings = load_settings(db_url=db_url, policies_dir=tmp_path / "policies")

    def allow(on: bool) -> None:
        sql(pg.ADMIN_URL, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS {str(on).lower()}')

    env = {"NOTIFY_SOCKET": notify.path, **FAST}
    with DaemonProcess(db_url, tmp_path, **env) as daemon, psycopg.connect(db_url, autocommit=True) as monitor:
        daemon.wait_for("ready")
        notify.wait_for("STATUS")
        try:
            allow(False)
            # the pool's, the listener's and the status line's connections go; the lock connection stays
            t_cut = time.monotonic()
            assert set(terminate(monitor, f"{ATLASD_APPS} AND application_name <> 'atlasd-lock'")) >= {
                "atlasd", "atlasd-listener"}
            monitor.execute("""INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                               SELECT 't', 'succeeded', 'approved', '{"learning_key": "k"}', '{"score": 1}'
                                 FROM generate_series(1, 50)""")
            # the lock connection's heartbeat reports what is degraded, and `atlasd status` shows it
            status = wait_until(lambda: (s := collect_status(monitor, settings))["daemon"]["degraded"]
                                and "not currently accepting connections" in s["daemon"]["degraded"][0]["error"]
                                and s, 10, "the listener reported degraded, its reconnects refused")
            assert [d["part"] for d in status["daemon"]["degraded"]] == ["listener"]
            assert status["daemon"]["degraded"][0]["state"] == "reconnecting"
            assert status["daemon"]["running"] and not status["listener"]["connected"]
            assert any(p.startswith("daemon degraded: listener reconnecting") for p in status["problems"])
            notify.wait_for("STATUS", after=t_cut)
            wait_until(lambda: any(m["STATUS"].startswith("degraded: listener reconnecting")
                                   for _, m in notify.having("STATUS", after=t_cut)), 10, "STATUS=degraded: listener")

            # now the lock connection too: no connection left, none possible
            t_all = time.monotonic()
            assert terminate(monitor, "application_name = 'atlasd-lock'") == ["atlasd-lock"]
            daemon.wait_for("lock connection lost; re-taking the lock", component="daemon")
            wait_until(lambda: any("lock re-taking the lock" in m["STATUS"] and "listener reconnecting" in m["STATUS"]
                                   for _, m in notify.having("STATUS", after=t_all)), 10, "STATUS=degraded: lock, listener")
            time.sleep(3)
            assert daemon.proc.poll() is None
            pings = notify.having("WATCHDOG", after=t_all, before=time.monotonic())
            assert len(pings) >= 0.5 * (time.monotonic() - t_all), "the watchdog pings stopped during a bounded reconnect"
            assert monitor.execute("SELECT count(*) FROM atlasd.intake").fetchone() == (0,)
        finally:
            allow(True)
        t_back = time.monotonic()
        daemon.wait_for("lock re-taken", component="daemon")
        wait_until(lambda: recorded(db_url) == (50, 50) or None, 30, "the 50 sessions approved meanwhile")
        status = wait_until(lambda: (s := cli_status(db_url, tmp_path / "policies"))["daemon"]["degraded"] == []
                            and s["daemon"]["last_reconcile_age_s"] < time.monotonic() - t_back and s, 20,
                            "a heartbeat after the catch-up reconcile, nothing degraded any more")
        assert status["daemon"]["running"] and status["listener"]["connected"] and status["problems"] == []
        wait_until(lambda: any(not m["STATUS"].startswith("degraded") for _, m in notify.having("STATUS", after=t_back)),
                   15, "STATUS= without degraded")
        assert daemon.find("recovered", component="daemon")
        assert daemon.stop() == 0


def test_a_hung_lock_session_is_ended_and_the_lock_retaken(db_url: str, tmp_path: Path) -> None:
    """The lock session's server process stops answering (SIGSTOP, as behind a dead network path
    the server has not noticed): the heartbeat times out, the re-take finds this daemon's own old
    session still holding the lock, ends it, and takes the lock again."""
    with DaemonProcess(db_url, tmp_path, **FAST) as daemon:
        daemon.wait_for("ready")
        backend = lock_holder(db_url)[0]
        try:
            os.kill(backend, signal.SIGSTOP)
        except PermissionError:
            pytest.skip("needs permission to signal the PostgreSQL server's processes")
        try:
            daemon.wait_for("lock connection lost; re-taking the lock", timeout=25, component="daemon")
            retry = daemon.wait_for("cannot re-take the database lock yet", timeout=10, component="daemon")
            assert f"previous lock session (backend pid {backend}) still held the lock; ended it" in retry["error"]
        finally:
            os.kill(backend, signal.SIGCONT)  # the pending SIGTERM from pg_terminate_backend ends it
        daemon.wait_for("lock re-taken", timeout=15, component="daemon")
        assert lock_holder(db_url)[0] != backend
        assert daemon.proc.poll() is None
        add_ready(db_url, 2)
        wait_until(lambda: recorded(db_url) == (2, 2) or None, 10, "2 sessions recorded")
        assert daemon.stop() == 0


def test_a_missing_or_disabled_notify_trigger_shows_in_status(db_url: str, tmp_path: Path) -> None:
    with DaemonProcess(db_url, tmp_path, **FAST) as daemon:
        daemon.wait_for("ready")
        sql(db_url, """DROP TRIGGER atlasd_sessions_ready_upd ON public.sessions;
                       ALTER TABLE public.sessions DISABLE TRIGGER atlasd_sessions_ready_ins""")  # one transaction
        status = wait_until(lambda: (s := cli_status(db_url, tmp_path / "policies"))["daemon"]["degraded"] and s, 15,
                            "the daemon reporting the triggers")
        assert status["listener"]["notify_trigger"] == {"atlasd_sessions_ready_ins": "disabled",
                                                       "atlasd_sessions_ready_upd": "missing"}
        assert status["listener"]["notify_trigger_ok"] is False
        [degraded] = status["daemon"]["degraded"]
        assert degraded["part"] == "notify-trigger"
        assert degraded["state"] == "atlasd_sessions_ready_ins disabled, atlasd_sessions_ready_upd missing"
        assert [p.split(" is ")[0] for p in status["problems"]] == [
            "NOTIFY trigger atlasd_sessions_ready_ins", "NOTIFY trigger atlasd_sessions_ready_upd"]
        assert "slow poll" in status["problems"][0]
        metrics = scrape_fresh(daemon.find("metrics endpoint", component="metrics")[0]["port"], time.time())
        assert metrics[("atlasd_notify_trigger_enabled", frozenset({"trigger": "atlasd_sessions_ready_upd"}.items()))] == 0
        assert metrics[("atlasd_degraded_seconds", frozenset({"part": "notify-trigger"}.items()))] >= 0
        text = subprocess.run([sys.executable, "-m", "atlasd", "status"], env={
            **os.environ, "ATLASD_DB_URL": db_url, "ATLASD_POLICIES_DIR": str(tmp_path / "policies")},
            capture_output=True, text=True, check=True).stdout
        assert text.splitlines()[1].startswith("problems:")
        assert "  - NOTIFY trigger atlasd_sessions_ready_upd is missing on public.sessions" in text

        # re-created as the migration creates it: healthy again
        sql(db_url, trigger_sql())
        status = wait_until(lambda: (s := cli_status(db_url, tmp_path / "policies"))["daemon"]["degraded"] == []
                            and s, 15, "the trigger back")
        assert status["listener"]["notify_trigger_ok"] and status["problems"] == []
        assert daemon.find("recovered", component="daemon")[-1]["part"] == "notify-trigger"
        assert daemon.stop() == 0


@pytest.mark.usefixtures("log_to_stdout")  # the daemon logs in this process
def test_watchdog_is_withheld_only_for_a_part_that_stopped_retrying(monkeypatch, notify: NotifySocket) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    daemon = Daemon(load_settings(reconnect_max_backoff_s=1))
    bound = 1 + 15  # reconnect_max_backoff_s + STUCK_SLACK_S

    def pinged() -> bool:
        before = len(notify.having("WATCHDOG"))
        daemon._feed_watchdog()
        time.sleep(0.2)
        return len(notify.having("WATCHDOG")) > before

    daemon.lock_held.set()
    assert pinged()  # healthy
    listener = daemon.health.failed("listener", "reconnecting", "refused")
    assert pinged()  # retrying
    listener.last_attempt -= bound + 1
    assert not pinged()  # its retry loop stopped trying: stuck
    daemon.health.failed("listener", "reconnecting", "refused")
    assert pinged()

    cadence = Health("cadence")  # a component's faults count too
    daemon._started.append(type("C", (), {"name": "cadence", "health": cadence})())
    cadence.failed("cadence", "retrying evaluations", "x").last_attempt -= bound + 1
    assert not pinged()
    # while the lock is being re-taken, only the lock's own attempts count (the rest wait for it)
    daemon.lock_held.clear()
    daemon.health.failed("lock", "re-taking the lock", "refused")
    assert pinged()
    assert [f.part for f in daemon.faults()] == ["listener", "lock", "cadence"]
    assert json.loads(json.dumps([f.to_json() for f in daemon.faults()]))[1]["state"] == "re-taking the lock"
