"""The real daemon (`python -m atlasd run`, a child process) against real Postgres, written to the
way the Atlas SDK writes (asyncpg). The slow poll is set to an hour: what records sessions here
is NOTIFY, the start-up reconcile and the reconcile after a listener reconnect."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from atlasd.daemon import Daemon
from atlasd.listener import APPLICATION_NAME
from atlasd.settings import load_settings
from atlasd.testing.daemon import DaemonProcess, wait_until
from atlasd.testing.sdk import sdk_write_sessions
from atlasd.testing.pg import sql


def intake_count(db_url: str) -> int:
    return sql(db_url, "SELECT count(*) FROM atlasd.intake")[0][0]


def recorded(db_url: str, n: int):
    return lambda: intake_count(db_url) == n or None


def add_ready(db_url: str, n: int) -> list[int]:
    rows = sql(
        db_url,
        """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
           SELECT 't', 'succeeded', 'approved', '{"learning_key": "k"}', '{"score": 1}'
             FROM generate_series(1, %s) RETURNING id""",
        [n],
    )
    return [r[0] for r in rows]


def with_password(db_url: str, password: str) -> str:
    """The same database with a password in the URL (trust auth ignores it; logs must not show it)."""
    parts = urlsplit(db_url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


def test_concurrent_writers_committing_out_of_id_order_are_all_recorded_once(db_url: str, tmp_path: Path) -> None:
    with DaemonProcess(db_url, tmp_path) as daemon:
        daemon.wait_for("ready")
        written = asyncio.run(sdk_write_sessions(db_url, 10_000, writers=8, long_tx_every=100, long_tx_hold_s=0.2))
        assert written["written"] == written["distinct"] == 10_000
        assert written["overtaken"] > 0, "no long transaction committed after a higher id: the test proves nothing"
        wait_until(recorded(db_url, 10_000), 60, "10,000 sessions in the intake")
        assert sql(db_url, "SELECT count(DISTINCT session_id), count(*) FILTER (WHERE malformed IS NOT NULL) FROM atlasd.intake") == [(10_000, 0)]
        assert sql(
            db_url,
            """SELECT count(*) FROM sessions s WHERE s.review_status = 'approved' AND s.status = 'succeeded'
                 AND NOT EXISTS (SELECT 1 FROM atlasd.intake i WHERE i.session_id = s.id)""",
        ) == [(0,)]
        assert all(not e["full"] for e in daemon.find("intake"))  # NOTIFY hints did it, no full reconcile
        assert daemon.stop() == 0


def test_listener_killed_mid_burst_loses_nothing(db_url: str, tmp_path: Path) -> None:
    def kill_listener() -> int:
        return sql(
            db_url,
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND application_name = %s""",
            [APPLICATION_NAME],
        )[0][0]

    async def burst_and_kill() -> dict:
        writing = asyncio.create_task(sdk_write_sessions(db_url, 3_000, writers=4))
        for kill in (1, 2):
            written = lambda: sql(db_url, "SELECT count(*) FROM sessions")[0][0] >= kill * 1_000  # noqa: E731
            await asyncio.to_thread(wait_until, written, 30, "burst progress", 0.01)
            assert await asyncio.to_thread(kill_listener) == 1
            await asyncio.to_thread(daemon.wait_for, "listening", 30, kill + 1)  # reconnected
        return await writing

    with DaemonProcess(db_url, tmp_path, ATLASD_RECONNECT_MAX_BACKOFF_S="1") as daemon:
        daemon.wait_for("ready")
        assert asyncio.run(burst_and_kill())["distinct"] == 3_000
        wait_until(recorded(db_url, 3_000), 60, "3,000 sessions in the intake")
        assert len(daemon.find("listener connection lost")) == 2
        listeners = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s"
        assert sql(db_url, listeners, [APPLICATION_NAME]) == [(1,)]
        wait_until(lambda: sql(db_url, "SELECT listener_connected FROM atlasd.daemon_state")[0][0], 10, "heartbeat")
        assert daemon.stop() == 0


def test_sessions_approved_while_stopped_are_recorded_at_start_and_sigterm_is_clean(db_url: str, tmp_path: Path) -> None:
    secret_url = with_password(db_url, "s3cret-pw")
    first = add_ready(db_url, 10)
    with DaemonProcess(secret_url, tmp_path) as daemon:
        daemon.wait_for("ready")
        assert intake_count(db_url) == 10  # the start-up reconcile ran before "ready"
        assert daemon.stop() == 0
        assert daemon.find("stopped")[0]["exit_code"] == 0
    state = sql(db_url, "SELECT stopped_at IS NOT NULL, listener_connected FROM atlasd.daemon_state")
    assert state == [(True, False)]
    assert sql(db_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()") == [(0,)]

    # while the daemon is down: new approvals, and a reviewer quarantines one recorded session
    later = add_ready(db_url, 500)
    sql(db_url, "UPDATE sessions SET review_status = 'quarantined' WHERE id = %s", [first[0]])
    with DaemonProcess(secret_url, tmp_path) as daemon:
        daemon.wait_for("ready")
        assert intake_count(db_url) == 510
        assert sql(db_url, "SELECT session_id FROM atlasd.intake WHERE revoked_at IS NOT NULL") == [(first[0],)]
        assert sql(db_url, "SELECT count(*) FROM atlasd.intake WHERE session_id = ANY(%s)", [later]) == [(500,)]
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(20) == 0
    assert "s3cret-pw" not in daemon.output
    assert "postgres:***@" in daemon.output


def test_duplicate_notifies_and_reapproval_record_once(db_url: str, tmp_path: Path) -> None:
    with DaemonProcess(db_url, tmp_path) as daemon:
        daemon.wait_for("ready")
        [sid] = add_ready(db_url, 1)
        wait_until(recorded(db_url, 1), 10, "the session")
        [(seq,)] = sql(db_url, "SELECT seq FROM atlasd.intake")
        for payload in (f"{sid},{sid},{sid}", str(sid), "*", "not-an-id"):
            sql(db_url, "SELECT pg_notify('atlasd_traces', '*')")
        for review in ("quarantined", "approved", "pending", "approved"):
            sql(db_url, "UPDATE sessions SET review_status = %s WHERE id = %s", [review, sid])
            revoked = review != "approved"
            wait_until(
                lambda: sql(db_url, "SELECT revoked_at IS NOT NULL FROM atlasd.intake")[0][0] == revoked or None,
                10,
                f"revoked={revoked}",
            )
        [marker] = add_ready(db_url, 1)  # processed after everything above
        wait_until(recorded(db_url, 2), 10, "the marker session")
        assert sql(db_url, "SELECT seq, revoked_at FROM atlasd.intake WHERE session_id = %s", [sid]) == [(seq, None)]
        assert sum(e["recorded"] for e in daemon.find("intake")) == 2
        assert daemon.stop() == 0
    assert marker != sid


def test_second_daemon_exits_with_a_clear_message_or_waits_its_turn(db_url: str, tmp_path: Path) -> None:
    with DaemonProcess(db_url, tmp_path) as first:
        first.wait_for("ready")
        with DaemonProcess(db_url, tmp_path) as second:
            assert second.proc.wait(20) == 1
        message = "".join(second.stderr)
        assert f"another atlasd (pid {first.pid} on host {socket.gethostname()}) holds the lock on" in message
        assert urlsplit(db_url).path in message and "--wait" in message
        assert not second.find("ready") and not second.find("intake") and not second.find("listening")

        with DaemonProcess(db_url, tmp_path, "--wait") as waiting:
            waiting.wait_for("waiting for the database lock")
            add_ready(db_url, 5)
            wait_until(recorded(db_url, 5), 10, "the first daemon recording")
            assert first.stop() == 0
            waiting.wait_for("ready")  # takes over once the lock is free
            assert not waiting.find("intake")  # nothing left to do: recorded once, by the first
            add_ready(db_url, 1)
            wait_until(recorded(db_url, 6), 10, "the second daemon recording")
            assert sql(db_url, "SELECT pid FROM atlasd.daemon_state") == [(waiting.pid,)]
            assert waiting.stop() == 0


class Recorder:
    """A real component (the interface later parts implement), logging what the daemon called."""

    def __init__(self, name: str, calls: list[tuple]) -> None:
        self.name = name
        self.calls = calls

    async def start(self, daemon: Daemon) -> None:
        async with daemon.pool.connection() as conn:
            count = (await (await conn.execute("SELECT count(*) FROM atlasd.intake")).fetchone())[0]
        self.calls.append((self.name, "start", count, daemon.listener_connected))

    async def on_intake(self, recorded: int) -> None:
        self.calls.append((self.name, "on_intake", recorded))

    async def reload(self) -> None:
        self.calls.append((self.name, "reload"))

    async def stop(self) -> None:
        self.calls.append((self.name, "stop"))


async def test_components_start_after_the_first_reconcile_get_intake_reload_and_stop(
    db_url: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("ATLASD_DB_URL", db_url)
    monkeypatch.setenv("ATLASD_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("ATLASD_POLL_INTERVAL_S", "3600")
    add_ready(db_url, 3)
    calls: list[tuple] = []
    daemon = Daemon(load_settings())
    daemon.components += [Recorder("a", calls), Recorder("b", calls)]
    running = asyncio.create_task(daemon.run())

    async def until(predicate) -> None:
        async with asyncio.timeout(20):
            while not predicate():
                assert not running.done(), running.result()
                await asyncio.sleep(0.02)

    await until(lambda: len(calls) == 2)
    assert calls == [("a", "start", 3, True), ("b", "start", 3, True)]
    await asyncio.to_thread(add_ready, db_url, 2)
    await until(lambda: sum(c[2] for c in calls if c[:2] == ("a", "on_intake")) == 2)
    os.kill(os.getpid(), signal.SIGHUP)
    await until(lambda: ("b", "reload") in calls)
    assert ("a", "reload") in calls
    daemon.stopping.set()
    assert await running == 0
    assert calls[-2:] == [("b", "stop"), ("a", "stop")]  # reverse order


def test_star_payload_triggers_a_full_reconcile(db_url: str, tmp_path: Path) -> None:
    with DaemonProcess(db_url, tmp_path) as daemon:
        daemon.wait_for("ready")
        # rows inserted with the trigger disabled (no NOTIFY) are found only by a full reconcile
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute("SET session_replication_role = replica")  # triggers off for this session
            c.execute(
                """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                   SELECT 't', 'succeeded', 'approved', '{"learning_key": "k"}', '{"score": 1}' FROM generate_series(1, 25)"""
            )
        sql(db_url, "SELECT pg_notify('atlasd_traces', '*')")
        wait_until(recorded(db_url, 25), 10, "the 25 silent sessions")
        assert daemon.stop() == 0
