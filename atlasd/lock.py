"""One daemon per database: a session-level advisory lock held on a dedicated connection.

The same connection writes the daemon's self-report (``atlasd.daemon_state``): its heartbeat
both tells ``atlasd status`` that a daemon is alive and proves the lock is still held. If that
connection dies, the lock is gone (another instance may take it), so the daemon must stop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import datetime

import psycopg

from atlasd import __version__
from atlasd.db import DatabaseError, aconnect, safe_error
from atlasd.settings import Settings

# "atlas" + 2 (migrate uses + 1). pg_locks shows it as classid = key >> 32, objid = key & 0xffffffff.
DAEMON_LOCK_KEY = 0x61746C6173_02
LOCK_RETRY_S = 1.0
HEARTBEAT_S = 5.0  # daemon_state refresh and lock liveness check
HEARTBEAT_STALE_S = 3 * HEARTBEAT_S  # older than this: no daemon is alive


class LockHeldError(DatabaseError):
    """Another daemon holds the lock on this database."""


class LockLostError(DatabaseError):
    """The lock connection failed: this daemon no longer holds the lock."""


class DaemonLock:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._conn: psycopg.AsyncConnection | None = None

    async def acquire(self, *, wait: bool, stopping: asyncio.Event, log) -> bool:
        """Take the lock and record this daemon. Without ``wait``, raise LockHeldError if taken;
        with it, retry until free. Returns False only if ``stopping`` was set while waiting."""
        self._conn = await aconnect(self.settings.dsn, autocommit=True, application_name="atlasd-lock")
        waiting_logged = False
        while True:
            if (await self._fetchone("SELECT pg_try_advisory_lock(%s)", [DAEMON_LOCK_KEY]))[0]:
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
                   listener_connected = false, last_reconcile_at = NULL, stopped_at = NULL""",
            [self.pid, self.host, __version__],
        )
        return True

    async def heartbeat(self, *, listener_connected: bool, last_reconcile_at: datetime | None) -> None:
        """Refresh the self-report; raises LockLostError if the lock connection is gone."""
        await self._execute(
            """UPDATE atlasd.daemon_state SET heartbeat_at = now(), listener_connected = %s,
                   last_reconcile_at = %s WHERE pid = %s AND host = %s""",
            [listener_connected, last_reconcile_at, self.pid, self.host],
        )

    async def release(self) -> None:
        """Mark the daemon stopped and drop the lock (closing the session releases it anyway)."""
        if self._conn is None:
            return
        try:
            await self._execute(
                """UPDATE atlasd.daemon_state SET stopped_at = now(), listener_connected = false
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

    async def _holder(self) -> str:
        row = await self._fetchone("SELECT pid, host FROM atlasd.daemon_state WHERE stopped_at IS NULL")
        return f"pid {row[0]} on host {row[1]}" if row else "pid unknown"

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
