"""atlasd.lock: one daemon per database, a session-level advisory lock on a dedicated connection
(``application_name`` ``atlasd-lock``) that also writes the self-report ``atlasd.daemon_state``.

Real PostgreSQL throughout: a second holder is another DaemonLock (in this process or a child
process), or a plain session taking the same advisory lock. Connection loss is a real
``pg_terminate_backend``, or a TCP forwarder that drops the client's side of the connection while
the server's side stays open (a cut the server has not noticed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.types.json import Jsonb

from atlasd import __version__
from atlasd.lock import (
    APPLICATION_NAME,
    DAEMON_LOCK_KEY,
    DaemonLock,
    LockHeldError,
    LockLostError,
    daemon_section,
    live_daemon,
)
from atlasd.settings import load_settings
from atlasd.testing.daemon import ROOT, wait_until
from atlasd.testing.pg import sql

HOST = socket.gethostname()


def lock_holder(db_url: str) -> tuple[int, str] | None:
    """(backend pid, application_name) of the session holding the daemon lock, as pg_locks shows it
    (classid = key >> 32, objid = key & 0xffffffff, as lock.py documents)."""
    rows = sql(db_url, """SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                           WHERE l.locktype = 'advisory' AND l.granted AND l.database =
                                 (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND l.classid = %s AND l.objid = %s""",
               [DAEMON_LOCK_KEY >> 32, DAEMON_LOCK_KEY & 0xFFFFFFFF])
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def lock_connections(db_url: str) -> list[int]:
    return [r[0] for r in sql(db_url, """SELECT pid FROM pg_stat_activity
                                          WHERE datname = current_database() AND application_name = %s""",
                              [APPLICATION_NAME])]


def terminate(db_url: str, backend: int) -> None:
    assert sql(db_url, "SELECT pg_terminate_backend(%s)", [backend]) == [(True,)]
    wait_until(lambda: lock_holder(db_url) is None, 10, f"backend {backend} gone with its lock")


def state(db_url: str) -> dict:
    rows = sql(db_url, """SELECT pid, host, version, started_at, heartbeat_at, listener_connected, last_reconcile_at,
                                 stopped_at, degraded FROM atlasd.daemon_state""")
    keys = ("pid", "host", "version", "started_at", "heartbeat_at", "listener_connected", "last_reconcile_at",
            "stopped_at", "degraded")
    return dict(zip(keys, rows[0], strict=True)) if rows else {}


class Log:
    """The ``log`` acquire() writes to (a structlog-like ``info``)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))


def new_lock(db_url: str) -> DaemonLock:
    return DaemonLock(load_settings(db_url=db_url))


async def take(lock: DaemonLock) -> None:
    assert await lock.acquire(wait=False, stopping=asyncio.Event(), log=Log()) is True


async def poll(predicate, timeout: float, what: str) -> None:
    """Poll a (blocking, quick) predicate from async code, without blocking the event loop long."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


HOLDER_SCRIPT = """
import asyncio, sys
from atlasd.lock import DaemonLock
from atlasd.settings import load_settings

class Log:
    def info(self, *args, **kwargs):
        pass

async def main():
    lock = DaemonLock(load_settings(db_url=sys.argv[1]))
    await lock.acquire(wait=False, stopping=asyncio.Event(), log=Log())
    print("held", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the test closes stdin
    await lock.release()
    print("released", flush=True)

asyncio.run(main())
"""


@contextlib.contextmanager
def other_daemon(db_url: str) -> Iterator[subprocess.Popen]:
    """Another process holding the daemon lock (through DaemonLock) until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, db_url], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


class Forwarder:
    """TCP forwarder to the test's PostgreSQL server (real sockets, bytes passed through unread).

    ``sever()`` drops the client's side of every live connection but keeps the server's side open:
    the client sees the connection die, the server still has the session (and its locks).
    ``cut()`` closes both sides. ``refuse()`` / ``allow()`` new connections."""

    def __init__(self, db_url: str) -> None:
        parts = urlsplit(db_url)
        self.upstream = (parts.hostname, parts.port or 5432)
        self.server = socket.create_server(("127.0.0.1", 0))
        netloc = f"{parts.username}@127.0.0.1:{self.server.getsockname()[1]}"
        self.url = urlunsplit(parts._replace(netloc=netloc))
        self.refusing = False
        self.lock = threading.Lock()
        self.live: list[tuple[socket.socket, socket.socket]] = []
        self.kept: set[socket.socket] = set()  # server sides left open by sever()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.live.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self.lock:
            kept = set(self.kept)
        for s in (src, dst):
            if s not in kept:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def sever(self) -> int:
        with self.lock:
            pairs, self.live = self.live, []
            self.kept.update(upstream for _, upstream in pairs)
        for client, _ in pairs:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        return len(pairs)

    def cut(self) -> int:
        with self.lock:
            pairs, self.live = self.live, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        return len(pairs)

    def refuse(self) -> None:
        self.refusing = True

    def allow(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.server.close()
        self.cut()
        with self.lock:
            kept, self.kept = self.kept, set()
        for s in kept:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture()
def forwarder(db_url: str) -> Iterator[Forwarder]:
    fwd = Forwarder(db_url)
    yield fwd
    fwd.close()


# ---------------------------------------------------------------- acquire
async def test_acquire_takes_the_lock_on_its_own_connection_and_records_the_daemon(db_url: str) -> None:
    # a previous daemon's row (stopped, degraded, another pid) is replaced, not merged
    sql(db_url, """INSERT INTO atlasd.daemon_state (pid, host, version, started_at, heartbeat_at, listener_connected,
                                                    last_reconcile_at, stopped_at, degraded)
                   VALUES (1, 'elsewhere', '0.0.1', now() - interval '1 day', now() - interval '1 day', true,
                           now() - interval '1 day', now() - interval '1 hour', %s)""",
        [Jsonb([{"part": "listener", "state": "reconnecting"}])])
    lock = new_lock(db_url)
    await take(lock)
    try:
        backend, app = lock_holder(db_url)
        assert app == "atlasd-lock"
        assert lock_connections(db_url) == [backend]  # one dedicated connection
        row = state(db_url)
        assert (row["pid"], row["host"], row["version"]) == (os.getpid(), HOST, __version__)
        assert row["stopped_at"] is None and row["last_reconcile_at"] is None
        assert row["listener_connected"] is False and row["degraded"] == []
        assert row["started_at"] == row["heartbeat_at"]  # both now(), the database's clock
        assert sql(db_url, "SELECT %s > now() - interval '1 hour'", [row["started_at"]]) == [(True,)]
    finally:
        await lock.release()


async def test_a_second_daemon_is_refused_while_the_first_holds_it(db_url: str) -> None:
    first, second = new_lock(db_url), new_lock(db_url)
    await take(first)
    try:
        backend = lock_holder(db_url)[0]
        with pytest.raises(LockHeldError) as refused:
            await second.acquire(wait=False, stopping=asyncio.Event(), log=Log())
        # both in this process: daemon_state names this very daemon, so the holding session is named
        message = str(refused.value)
        assert f"database session pid {backend}, application_name 'atlasd-lock'" in message
        assert "postgresql://postgres@127.0.0.1" in message and "--wait" in message
        assert lock_holder(db_url)[0] == backend  # the first keeps it
        # the refused one closed its connection
        await poll(lambda: lock_connections(db_url) == [backend], 10, "the refused lock's connection closed")
        assert state(db_url)["stopped_at"] is None
    finally:
        await first.release()


async def test_another_process_holding_the_lock_is_named_by_pid_and_host(db_url: str) -> None:
    with other_daemon(db_url) as other:
        with pytest.raises(LockHeldError, match=rf"another atlasd \(pid {other.pid} on host {HOST}\) holds the lock"):
            await new_lock(db_url).acquire(wait=False, stopping=asyncio.Event(), log=Log())
        assert state(db_url)["pid"] == other.pid  # the refused daemon wrote nothing


async def test_any_other_session_holding_the_key_is_named_by_its_session(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True, application_name="intruder") as intruder:
        assert intruder.execute("SELECT pg_try_advisory_lock(%s)", [DAEMON_LOCK_KEY]).fetchone() == (True,)
        pid = intruder.info.backend_pid
        with pytest.raises(LockHeldError, match=rf"database session pid {pid}, application_name 'intruder'"):
            await new_lock(db_url).acquire(wait=False, stopping=asyncio.Event(), log=Log())
    assert state(db_url) == {}


async def test_with_wait_it_waits_for_the_holder_to_exit_then_takes_the_lock(db_url: str) -> None:
    log = Log()
    lock = new_lock(db_url)
    with other_daemon(db_url) as other:
        holder_backend = lock_holder(db_url)[0]
        waiting = asyncio.create_task(lock.acquire(wait=True, stopping=asyncio.Event(), log=log))
        await poll(lambda: log.events, 10, "the 'waiting' log line")
        assert log.events == [("waiting for the database lock",
                               {"holder": f"pid {other.pid} on host {HOST}", "db": lock.settings.dsn_redacted})]

        def waiter_query_start():
            rows = sql(db_url, """SELECT query_start FROM pg_stat_activity WHERE application_name = %s AND pid <> %s""",
                       [APPLICATION_NAME, holder_backend])
            return rows[0][0] if rows else None

        first_try = waiter_query_start()
        await poll(lambda: waiter_query_start() != first_try, 10, "the waiting lock trying again")
        assert not waiting.done()
        other.stdin.close()  # the other daemon releases the lock and exits
        assert other.stdout.readline().strip() == "released"
        assert await asyncio.wait_for(waiting, 10) is True
    try:
        assert lock_holder(db_url) == (lock_connections(db_url)[0], "atlasd-lock")
        assert state(db_url)["pid"] == os.getpid() and state(db_url)["stopped_at"] is None
        assert len(log.events) == 1  # logged once, however many tries
    finally:
        await lock.release()


async def test_waiting_ends_without_the_lock_when_stopping(db_url: str) -> None:
    first, second = new_lock(db_url), new_lock(db_url)
    await take(first)
    try:
        backend = lock_holder(db_url)[0]
        stopping, log = asyncio.Event(), Log()
        waiting = asyncio.create_task(second.acquire(wait=True, stopping=stopping, log=log))
        await poll(lambda: log.events, 10, "the 'waiting' log line")
        stopping.set()
        assert await asyncio.wait_for(waiting, 10) is False
        await poll(lambda: lock_connections(db_url) == [backend], 10, "the waiting lock's connection closed")
        assert lock_holder(db_url)[0] == backend
    finally:
        await first.release()


# ---------------------------------------------------------------- release and close
async def test_release_marks_the_daemon_stopped_and_frees_the_lock(db_url: str) -> None:
    first = new_lock(db_url)
    await take(first)
    await first.heartbeat(listener_connected=True, last_reconcile_s_ago=1.0, degraded=[{"part": "listener"}])
    await first.release()
    row = state(db_url)
    assert row["stopped_at"] is not None and row["listener_connected"] is False and row["degraded"] == []
    assert lock_holder(db_url) is None
    await first.release()  # a second release is harmless
    second = new_lock(db_url)
    await take(second)  # at once: no LockHeldError
    try:
        assert state(db_url)["stopped_at"] is None
    finally:
        await second.release()


async def test_closing_the_lock_connection_releases_the_lock(db_url: str) -> None:
    first = new_lock(db_url)
    await take(first)
    await first.close()  # no clean stop: the session's end drops the lock anyway
    await poll(lambda: lock_holder(db_url) is None, 10, "the lock freed by the session's end")
    assert state(db_url)["stopped_at"] is None  # not marked stopped: that is release()'s job
    second = new_lock(db_url)
    await take(second)
    await second.release()


# ---------------------------------------------------------------- heartbeat
async def test_heartbeat_refreshes_the_self_report_and_returns_the_trigger_states(db_url: str) -> None:
    lock = new_lock(db_url)
    await take(lock)
    try:
        sql(db_url, "UPDATE atlasd.daemon_state SET heartbeat_at = heartbeat_at - interval '1 hour'")
        degraded = [{"part": "listener", "state": "reconnecting", "error": "x", "attempts": 2, "down_s": 1.5}]
        triggers = await lock.heartbeat(listener_connected=True, last_reconcile_s_ago=12.5, degraded=degraded)
        assert triggers == {"atlasd_sessions_ready_ins": "enabled", "atlasd_sessions_ready_upd": "enabled"}
        row = state(db_url)
        assert row["listener_connected"] is True and row["degraded"] == degraded
        assert sql(db_url, "SELECT %s > now() - interval '1 minute'", [row["heartbeat_at"]]) == [(True,)]
        assert (row["heartbeat_at"] - row["last_reconcile_at"]).total_seconds() == 12.5  # one now(): exact

        sql(db_url, "ALTER TABLE public.sessions DISABLE TRIGGER atlasd_sessions_ready_upd")
        triggers = await lock.heartbeat(listener_connected=False, last_reconcile_s_ago=None, degraded=[])
        assert triggers == {"atlasd_sessions_ready_ins": "enabled", "atlasd_sessions_ready_upd": "disabled"}
        row = state(db_url)
        assert row["listener_connected"] is False and row["last_reconcile_at"] is None and row["degraded"] == []
    finally:
        await lock.release()


# ---------------------------------------------------------------- connection loss and re-take
async def test_a_terminated_lock_session_is_noticed_and_the_lock_retaken(db_url: str) -> None:
    lock = new_lock(db_url)
    await take(lock)
    try:
        old_backend = lock_holder(db_url)[0]
        started_at = state(db_url)["started_at"]
        sql(db_url, "UPDATE atlasd.daemon_state SET heartbeat_at = heartbeat_at - interval '1 hour'")
        terminate(db_url, old_backend)  # the lock is free now: anyone could take it
        with pytest.raises(LockLostError, match="lost the database lock connection"):
            await lock.heartbeat(listener_connected=True, last_reconcile_s_ago=None, degraded=[])
        await lock.retake()
        new_backend, app = lock_holder(db_url)
        assert new_backend != old_backend and app == "atlasd-lock"
        assert lock_connections(db_url) == [new_backend]
        row = state(db_url)
        assert row["pid"] == os.getpid() and row["stopped_at"] is None
        assert row["started_at"] == started_at  # the same daemon: its start time is kept
        assert sql(db_url, "SELECT %s > now() - interval '1 minute'", [row["heartbeat_at"]]) == [(True,)]
        await lock.heartbeat(listener_connected=True, last_reconcile_s_ago=None, degraded=[])
    finally:
        await lock.release()
    assert lock_holder(db_url) is None


async def test_retake_first_ends_this_daemons_old_session_that_the_server_still_keeps(
    db_url: str, forwarder: Forwarder
) -> None:
    lock = new_lock(forwarder.url)
    await take(lock)
    try:
        old_backend = lock_holder(db_url)[0]
        assert forwarder.sever() == 1  # the client's side is gone; the server still has the session
        with pytest.raises(LockLostError):
            await lock.heartbeat(listener_connected=True, last_reconcile_s_ago=None, degraded=[])
        assert lock_holder(db_url) == (old_backend, "atlasd-lock")  # the server has not noticed
        with pytest.raises(LockLostError, match=rf"previous lock session \(backend pid {old_backend}\) still held the "
                                                "lock; ended it, trying again"):
            await lock.retake()
        await poll(lambda: lock_holder(db_url) is None, 10, "the old session ended")
        await lock.retake()
        new_backend = lock_holder(db_url)[0]
        assert new_backend != old_backend
        assert sql(db_url, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [old_backend]) == [(0,)]
        await lock.heartbeat(listener_connected=True, last_reconcile_s_ago=None, degraded=[])
    finally:
        await lock.release()


async def test_retake_while_the_database_is_unreachable_is_retryable(db_url: str, forwarder: Forwarder) -> None:
    lock = new_lock(forwarder.url)
    await take(lock)
    try:
        forwarder.refuse()
        assert forwarder.cut() == 1  # both sides closed: the server ends the session, the lock is free
        await poll(lambda: lock_holder(db_url) is None, 10, "the cut session ended")
        for _ in range(2):
            with pytest.raises(LockLostError, match="cannot connect"):
                await lock.retake()
        forwarder.allow()
        await lock.retake()
        assert lock_holder(db_url)[1] == "atlasd-lock"
    finally:
        await lock.release()


async def test_a_daemon_whose_lock_was_taken_while_it_reconnected_is_fenced(db_url: str) -> None:
    first, second = new_lock(db_url), new_lock(db_url)
    await take(first)
    terminate(db_url, lock_holder(db_url)[0])
    await take(second)  # another daemon gets in while the first is away
    try:
        backend = lock_holder(db_url)[0]
        with pytest.raises(LockHeldError, match="took the lock on .* while this daemon was reconnecting its lock "
                                                "connection; this daemon stops"):
            await first.retake()
        assert lock_holder(db_url)[0] == backend  # the new holder is left alone (not terminated)
        await poll(lambda: lock_connections(db_url) == [backend], 10, "the fenced daemon's connection closed")
        # fenced: it can no longer write the self-report
        with pytest.raises(LockLostError, match="closed"):
            await first.heartbeat(listener_connected=True, last_reconcile_s_ago=None, degraded=[])
    finally:
        await second.release()


async def test_retake_is_fenced_by_any_other_session_holding_the_key(db_url: str) -> None:
    lock = new_lock(db_url)
    await take(lock)
    terminate(db_url, lock_holder(db_url)[0])
    with psycopg.connect(db_url, autocommit=True, application_name="intruder") as intruder:
        assert intruder.execute("SELECT pg_try_advisory_lock(%s)", [DAEMON_LOCK_KEY]).fetchone() == (True,)
        with pytest.raises(LockHeldError, match="application_name 'intruder'"):
            await lock.retake()
        assert lock_holder(db_url) == (intruder.info.backend_pid, "intruder")


# ---------------------------------------------------------------- the status section (`atlasd status`)
def status_of(db_url: str) -> tuple[dict, tuple[int, str] | None]:
    with psycopg.connect(db_url) as conn:
        return daemon_section(conn), live_daemon(conn)


async def test_the_status_section_says_running_only_with_the_lock_held_and_a_fresh_heartbeat(db_url: str) -> None:
    assert status_of(db_url) == ({"running": False, "listener_connected": False, "last_reconcile_age_s": None,
                                  "degraded": []}, None)  # no daemon ever
    lock = new_lock(db_url)
    await take(lock)
    try:
        degraded = [{"part": "intake", "state": "retrying", "error": "e", "attempts": 1, "down_s": 4.0}]
        await lock.heartbeat(listener_connected=True, last_reconcile_s_ago=2.0, degraded=degraded)
        section, live = status_of(db_url)
        assert section["running"] is section["lock_held"] is section["listener_connected"] is True
        assert (section["pid"], section["host"], section["version"]) == (os.getpid(), HOST, __version__)
        assert live == (os.getpid(), HOST)
        assert section["last_reconcile_age_s"] >= 2.0 and section["stopped_at"] is None
        [fault] = section["degraded"]
        assert (fault["part"], fault["state"], fault["attempts"]) == ("intake", "retrying", 1) and fault["for_s"] >= 4.0

        sql(db_url, "UPDATE atlasd.daemon_state SET heartbeat_at = heartbeat_at - interval '1 hour'")  # stale
        section, live = status_of(db_url)
        assert section["lock_held"] is True and section["running"] is False and section["listener_connected"] is False
        assert live is None

        await lock.heartbeat(listener_connected=True, last_reconcile_s_ago=None, degraded=[])
        assert status_of(db_url)[0]["running"] is True
        terminate(db_url, lock_holder(db_url)[0])  # fresh heartbeat, but the lock is gone
        section, _ = status_of(db_url)
        assert section["lock_held"] is False and section["running"] is False
        await lock.retake()
    finally:
        await lock.release()
    section, live = status_of(db_url)
    assert section["running"] is False and section["lock_held"] is False and section["stopped_at"] is not None
    assert section["degraded"] == [] and live is None
