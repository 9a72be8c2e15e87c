"""One daemon per database: a session-level advisory lock held on a dedicated connection.

The same connection writes the daemon's self-report (``atlasd.daemon_state``): its heartbeat
both tells ``atlasd status`` that a daemon is alive and proves the lock is still held. If that
connection dies (restart, failover, ``pg_terminate_backend``, a network cut), the lock is gone
and another instance may take it: the daemon calls :meth:`DaemonLock.retake` until it holds the
lock again on a new connection, or learns that another daemon took it (:class:`LockHeldError`).
A session of this daemon's that the server still keeps (a cut the server has not noticed) is
ended first, so it never blocks the re-take.
"""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from atlasd import __version__
from atlasd.db import DatabaseError, aconnect, iso, safe_error
from atlasd.listener import TRIGGER_STATES
from atlasd.settings import Settings

# "atlas" + 2 (migrate uses + 1). pg_locks shows it as classid = key >> 32, objid = key & 0xffffffff.
DAEMON_LOCK_KEY = 0x61746C6173_02
APPLICATION_NAME = "atlasd-lock"
LOCK_RETRY_S = 1.0
HEARTBEAT_S = 5.0  # daemon_state refresh and lock liveness check
HEARTBEAT_STALE_S = 3 * HEARTBEAT_S  # older than this: no daemon is alive
HEARTBEAT_TIMEOUT_S = 10.0  # a heartbeat not answered this fast counts as a lost lock connection

# the backend holding the daemon lock in this database, and when that session started
_HOLDER = """SELECT l.pid, a.backend_start, a.application_name
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid::bigint = %s AND l.objid::bigint = %s"""
_HOLDER_PARAMS = [DAEMON_LOCK_KEY >> 32, DAEMON_LOCK_KEY & 0xFFFFFFFF]


class LockHeldError(DatabaseError):
    """Another daemon holds the lock on this database."""


class LockLostError(DatabaseError):
    """The lock connection failed: this daemon no longer holds the lock (retryable)."""


class DaemonLock:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._conn: psycopg.AsyncConnection | None = None
        self._session: tuple[int, datetime] | None = None  # (backend pid, backend_start) of the lock session

    async def acquire(self, *, wait: bool, stopping: asyncio.Event, log) -> bool:
        """Take the lock and record this daemon. Without ``wait``, raise LockHeldError if taken;
        with it, retry until free. Returns False only if ``stopping`` was set while waiting."""
        self._conn = await aconnect(self.settings.dsn, autocommit=True, application_name=APPLICATION_NAME)
        waiting_logged = False
        while True:
            if await self._try_lock():
                break
            holder = await self._holder()
            if not wait:
                await self.close()
                raise LockHeldError(
                    f"another atlasd ({holder}) holds the lock on {self.settings.dsn_redacted}; "
                    "stop it first, or pass --wait (ATLASD_LOCK_WAIT=1) to take over when it exits"
                )
            if not waiting_logged:
                log.info("waiting for the database lock", holder=holder, db=self.settings.dsn_redacted)
                waiting_logged = True
            try:
                await asyncio.wait_for(stopping.wait(), LOCK_RETRY_S)
                await self.close()
                return False
            except TimeoutError:
                pass
        await self._execute(
            """INSERT INTO atlasd.daemon_state AS d (pid, host, version, started_at, heartbeat_at)
               VALUES (%s, %s, %s, now(), now())
               ON CONFLICT (singleton) DO UPDATE SET pid = excluded.pid, host = excluded.host,
                   version = excluded.version, started_at = now(), heartbeat_at = now(),
                   listener_connected = false, last_reconcile_at = NULL, stopped_at = NULL, degraded = '[]'""",
            [self.pid, self.host, __version__],
        )
        return True

    async def retake(self) -> None:
        """After the lock connection failed: connect again and take the lock again. Raises
        LockLostError (retry later) when the database cannot be reached or this daemon's previous
        session still held the lock (it is ended here), and LockHeldError when another daemon (or
        any other session) now holds it: this daemon must stop."""
        await self.close()
        try:
            self._conn = await aconnect(self.settings.dsn, autocommit=True, application_name=APPLICATION_NAME)
        except DatabaseError as exc:
            raise LockLostError(str(exc)) from None
        if await self._try_lock():
            await self._execute(
                """INSERT INTO atlasd.daemon_state AS d (pid, host, version, started_at, heartbeat_at)
                   VALUES (%s, %s, %s, now(), now())
                   ON CONFLICT (singleton) DO UPDATE SET pid = excluded.pid, host = excluded.host,
                       version = excluded.version, heartbeat_at = now(), stopped_at = NULL,
                       started_at = CASE WHEN d.pid = excluded.pid AND d.host = excluded.host
                                         THEN d.started_at ELSE now() END""",
                [self.pid, self.host, __version__],
            )
            return
        row = await self._fetchone(_HOLDER, _HOLDER_PARAMS)
        if row is None:
            raise LockLostError("the lock was released while re-taking it; trying again")
        # this daemon's previous session: the same backend pid and start (no start: it is exiting)
        if self._session is not None and row[0] == self._session[0] and row[1] in (None, self._session[1]):
            await self._execute("SELECT pg_terminate_backend(%s)", [row[0]])
            raise LockLostError(f"this daemon's previous lock session (backend pid {row[0]}) still held "
                                "the lock; ended it, trying again")
        holder = await self._holder()
        await self.close()
        raise LockHeldError(
            f"another atlasd ({holder}) took the lock on {self.settings.dsn_redacted} while this daemon "
            "was reconnecting its lock connection; this daemon stops so that only one runs"
        )

    async def heartbeat(self, *, listener_connected: bool, last_reconcile_s_ago: float | None,
                        degraded: list[dict]) -> dict[str, str]:
        """Refresh the self-report (times from the database's clock) and return the NOTIFY
        triggers' states (:data:`atlasd.listener.TRIGGER_STATES`). Raises LockLostError if the
        lock connection is gone or does not answer within HEARTBEAT_TIMEOUT_S."""
        try:
            async with asyncio.timeout(HEARTBEAT_TIMEOUT_S):
                row = await self._fetchone(
                    f"""WITH beat AS (
                            UPDATE atlasd.daemon_state SET heartbeat_at = now(), listener_connected = %s,
                                   last_reconcile_at = now() - make_interval(secs => %s), degraded = %s
                             WHERE pid = %s AND host = %s)
                        {TRIGGER_STATES}""",
                    [listener_connected, last_reconcile_s_ago, Jsonb(degraded), self.pid, self.host],
                )
        except TimeoutError:
            raise LockLostError(f"the lock connection did not answer within {HEARTBEAT_TIMEOUT_S:.0f}s") from None
        return row[0]

    async def release(self) -> None:
        """Mark the daemon stopped and drop the lock (closing the session releases it anyway)."""
        if self._conn is None:
            return
        try:
            await self._execute(
                """UPDATE atlasd.daemon_state SET stopped_at = now(), listener_connected = false, degraded = '[]'
                   WHERE pid = %s AND host = %s""",
                [self.pid, self.host],
            )
            await self._execute("SELECT pg_advisory_unlock(%s)", [DAEMON_LOCK_KEY])
        except LockLostError:
            pass
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _try_lock(self) -> bool:
        """pg_try_advisory_lock on the lock connection; when taken, remember that session (the
        same statement, so a later re-take can tell this daemon's old session from another's)."""
        taken, pid, started = await self._fetchone(
            """SELECT pg_try_advisory_lock(%s), pg_backend_pid(),
                      (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())""",
            [DAEMON_LOCK_KEY],
        )
        if taken:
            self._session = (pid, started)
        return taken

    async def _holder(self) -> str:
        """Who holds the lock, for an error message: the daemon named in ``daemon_state``, or the
        holding session when that row names this daemon or no daemon."""
        row = await self._fetchone("SELECT pid, host FROM atlasd.daemon_state WHERE stopped_at IS NULL")
        if row is not None and (row[0], row[1]) != (self.pid, self.host):
            return f"pid {row[0]} on host {row[1]}"
        holder = await self._fetchone(_HOLDER, _HOLDER_PARAMS)
        if holder is None:
            return "pid unknown"
        return f"database session pid {holder[0]}, application_name {holder[2]!r}"

    async def _execute(self, query: str, params: list | None = None) -> None:
        await self._fetchone(query, params, fetch=False)

    async def _fetchone(self, query: str, params: list | None = None, *, fetch: bool = True) -> tuple | None:
        if self._conn is None:
            raise LockLostError("the lock connection is closed")
        try:
            cur = await self._conn.execute(query, params)
            return await cur.fetchone() if fetch else None
        except psycopg.Error as exc:
            raise LockLostError(f"lost the database lock connection: {safe_error(exc)}") from None


# ---------------------------------------------------------------- status (synchronous: `atlasd status`)
def live_daemon(conn: psycopg.Connection) -> tuple[int, str] | None:
    """(pid, host) of the daemon whose heartbeat is fresh and that has not stopped; None otherwise."""
    row = conn.execute(
        """SELECT pid, host, extract(epoch FROM now() - heartbeat_at), stopped_at IS NOT NULL
             FROM atlasd.daemon_state"""
    ).fetchone()
    if row is None or row[3] or float(row[2]) > HEARTBEAT_STALE_S:
        return None
    return row[0], row[1]


def daemon_section(conn: psycopg.Connection) -> dict[str, Any]:
    lock_held = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                             AND d.datname = current_database()
                             AND l.classid::bigint = %s AND l.objid::bigint = %s)""",
        [DAEMON_LOCK_KEY >> 32, DAEMON_LOCK_KEY & 0xFFFFFFFF],
    ).fetchone()[0]
    row = conn.execute(
        """SELECT pid, host, version, started_at, heartbeat_at, extract(epoch FROM now() - heartbeat_at),
                  listener_connected, last_reconcile_at, extract(epoch FROM now() - last_reconcile_at),
                  stopped_at, degraded
             FROM atlasd.daemon_state"""
    ).fetchone()
    conn.rollback()
    if row is None:
        return {"running": lock_held, "listener_connected": False, "last_reconcile_age_s": None, "degraded": []}
    (pid, host, version, started_at, heartbeat_at, age, listener_connected, last_reconcile_at, reconcile_age,
     stopped_at, degraded) = row
    alive = lock_held and stopped_at is None and float(age) <= HEARTBEAT_STALE_S
    # as of the last heartbeat (heartbeat_age_s ago); a daemon that stopped cleanly left none
    degraded = [] if stopped_at is not None else [
        {**d, "for_s": round(d["down_s"] + float(age), 1),
         "since": iso(heartbeat_at - timedelta(seconds=d["down_s"]))}
        for d in degraded
    ]
    return {
        "running": alive,
        "lock_held": lock_held,
        "pid": pid,
        "host": host,
        "version": version,
        "started_at": iso(started_at),
        "heartbeat_at": iso(heartbeat_at),
        "heartbeat_age_s": round(float(age), 1),
        "last_reconcile_at": iso(last_reconcile_at),
        "last_reconcile_age_s": None if reconcile_age is None else round(float(reconcile_age), 1),
        "degraded": degraded,
        "stopped_at": iso(stopped_at),
        "listener_connected": bool(alive and listener_connected),
    }
