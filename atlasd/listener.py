"""The NOTIFY listener: a dedicated autocommit connection on channel ``atlasd_traces``.

It never writes the intake; it only wakes the reconciler with the payload's id hints. After
every (re)connect it asks for a full reconcile, since notifications sent while it was away are
lost. A dead connection is noticed by libpq keepalives, by the error ``notifies()`` raises when
the server ends the session, and by a ``SELECT 1`` after each quiet ``notify_timeout_s``.
Reconnects back off exponentially (capped at ``reconnect_max_backoff_s``) with jitter.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable

import psycopg

from atlasd.db import DatabaseError, aconnect, safe_error
from atlasd.intake import parse_payload
from atlasd.logging import get_logger
from atlasd.settings import Settings

CHANNEL = "atlasd_traces"
APPLICATION_NAME = "atlasd-listener"
FIRST_BACKOFF_S = 0.5


def backoff_s(attempt: int, cap: float) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): exponential, capped, half-jittered."""
    delay = min(cap, FIRST_BACKOFF_S * 2**attempt)
    return delay * random.uniform(0.5, 1.0)


class Listener:
    def __init__(
        self,
        settings: Settings,
        wake: Callable[[Iterable[int] | None], None],
        on_state: Callable[[bool], None],
    ) -> None:
        self.settings = settings
        self.log = get_logger("listener")
        self._wake = wake  # ids to look at, or None for everything
        self._on_state = on_state  # connected / disconnected
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
                    self._on_state(True)
                    self._wake(None)  # whatever was notified while we were away
                    self.first_attempt_done.set()
                    await self._listen(conn, stopping)
                finally:
                    await conn.close()
            except (psycopg.Error, DatabaseError) as exc:
                delay = backoff_s(attempt, self.settings.reconnect_max_backoff_s)
                self.log.warning("listener connection lost", error=safe_error(exc), retry_in_s=round(delay, 2))
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
            if quiet:
                await conn.execute("SELECT 1")  # liveness: raises if the session is gone
