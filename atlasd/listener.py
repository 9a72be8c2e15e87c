"""The NOTIFY listener: a dedicated autocommit connection on channel ``atlasd_traces``.

It never writes the intake; it only wakes the reconciler with the payload's id hints. After
every (re)connect it asks for a full reconcile, since notifications sent while it was away are
lost. A dead connection is noticed by libpq keepalives, by the error ``notifies()`` raises when
the server ends the session, and by a ``SELECT 1`` after each quiet ``notify_timeout_s`` (one not
answered within LIVENESS_TIMEOUT_S, say from a hung backend whose TCP still answers keepalives,
counts as a lost connection; psycopg then gives the cancelled query up to 5 s more, as for the
lock's heartbeat).
Reconnects back off exponentially (capped at ``reconnect_max_backoff_s``) with jitter; while it
reconnects, the part ``listener`` is degraded in the daemon's :class:`~atlasd.health.Health`.

The notifications come from the two triggers ``atlasd db migrate`` installs on ``public.sessions``
(:data:`NOTIFY_TRIGGERS`); :data:`TRIGGER_STATES` tells whether they are there and enabled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import psycopg

from atlasd.db import DatabaseError, aconnect, safe_error
from atlasd.health import Health, backoff_s
from atlasd.intake import parse_payload
from atlasd.logging import get_logger
from atlasd.settings import Settings

CHANNEL = "atlasd_traces"
APPLICATION_NAME = "atlasd-listener"
LIVENESS_TIMEOUT_S = 10.0  # a liveness SELECT 1 not answered this fast: reconnect (as the lock's heartbeat)
NOTIFY_TRIGGERS = ("atlasd_sessions_ready_ins", "atlasd_sessions_ready_upd")  # migration 0001
# One row, one column: {trigger name: "enabled" | "disabled" | "missing"} for NOTIFY_TRIGGERS
# (a trigger disabled, or enabled only for replicas, sends nothing to the daemon).
TRIGGER_STATES = f"""SELECT jsonb_object_agg(t.name, CASE WHEN g.oid IS NULL THEN 'missing'
                                                     WHEN g.tgenabled IN ('O', 'A') THEN 'enabled'
                                                     ELSE 'disabled' END)
  FROM unnest(ARRAY[{", ".join(f"'{name}'" for name in NOTIFY_TRIGGERS)}]) AS t(name)
  LEFT JOIN pg_trigger g ON g.tgname = t.name AND g.tgrelid = to_regclass('public.sessions') AND NOT g.tgisinternal"""


class Listener:
    def __init__(
        self,
        settings: Settings,
        wake: Callable[[Iterable[int] | None], None],
        on_state: Callable[[bool], None],
        health: Health,
    ) -> None:
        self.settings = settings
        self.log = get_logger("listener")
        self._wake = wake  # ids to look at, or None for everything
        self._on_state = on_state  # connected / disconnected
        self._health = health
        self.first_attempt_done = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        attempt = 0
        while not stopping.is_set():
            try:
                conn = await aconnect(self.settings.dsn, autocommit=True, application_name=APPLICATION_NAME)
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.log.info("listening", channel=CHANNEL, attempt=attempt)
                    attempt = 0
                    self._health.recovered("listener")
                    self._on_state(True)
                    self._wake(None)  # whatever was notified while we were away
                    self.first_attempt_done.set()
                    await self._listen(conn, stopping)
                finally:
                    await conn.close()
            except (psycopg.Error, DatabaseError) as exc:
                delay = backoff_s(attempt, self.settings.reconnect_max_backoff_s)
                self.log.warning("listener connection lost", error=safe_error(exc), retry_in_s=round(delay, 2))
                self._health.failed("listener", "reconnecting", safe_error(exc))
                self._on_state(False)
                self.first_attempt_done.set()
                attempt += 1
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                except TimeoutError:
                    pass
        self._on_state(False)

    async def _listen(self, conn: psycopg.AsyncConnection, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            quiet = True
            async for notify in conn.notifies(timeout=self.settings.notify_timeout_s):
                quiet = False
                self._wake(parse_payload(notify.payload))
            if quiet:  # liveness: raises if the session is gone, or does not answer
                try:
                    async with asyncio.timeout(LIVENESS_TIMEOUT_S):
                        await conn.execute("SELECT 1")
                except TimeoutError:
                    raise DatabaseError(f"no answer to a liveness check in {LIVENESS_TIMEOUT_S:g} s") from None
