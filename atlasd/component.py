"""The daemon's component interface: what the cadence, the runner, the registration retrier, the
taint tagger, the metrics endpoint and the gc implement, and how the daemon drives them (:mod:`atlasd.daemon`).

A component overrides the hooks it needs; the others do nothing. ``health`` (an
:class:`atlasd.health.Health`), when a component has one, adds its faults to the daemon's
(STATUS=, ``atlasd status``, the watchdog's stuck check). ``daemon.lock_held`` is clear while the
lock is being re-taken: start no new work then (claims, registrations). ``daemon.superseded`` is
set when the daemon stops because another one holds the lock: leave what is unfinished to it.
Components query the database through ``daemon.pool`` and must not block the event loop. What
a component needs from another (the live policy set, the registration retrier) is handed to it
when the daemon is built (:func:`atlasd.daemon.build_daemon`), never looked up by name.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from atlasd.health import Health
from atlasd.settings import redact_url


class Component:
    name: str = "component"
    health: Health | None = None

    async def start(self, daemon: Any) -> None:
        """After the lock, the schema check and the first full reconcile."""

    async def on_intake(self, recorded: int) -> None:
        """After a reconcile that recorded >= 1 new usable session."""

    async def on_revoked(self, revoked: int) -> None:
        """After a reconcile that revoked >= 1 recorded session."""

    async def reload(self) -> None:
        """SIGHUP."""

    async def stop(self) -> None:
        """On shutdown, in reverse start order."""


class KickedLoop(Component):
    """A component that does one round of its work at once when kicked (:meth:`kick`) and every
    ``interval_s`` otherwise, only while the daemon holds its lock; a failed round (the database or
    a child away) is logged and the next one retries. Stopping cancels a round in flight."""

    failure_event = "round failed"  # the log event of a failed round

    def __init__(self, interval_s: float, log) -> None:
        self.interval_s, self.log = interval_s, log
        self._task: asyncio.Task | None = None
        self._kicked = asyncio.Event()

    async def round(self, daemon: Any) -> None:
        """One round of the work."""
        raise NotImplementedError

    async def start(self, daemon: Any) -> None:
        self._task = asyncio.create_task(self._loop(daemon), name=self.name)

    def kick(self) -> None:
        """Something to do: a round now."""
        self._kicked.set()

    async def _loop(self, daemon: Any) -> None:
        while not daemon.stopping.is_set():
            await daemon.lock_held.wait()
            self._kicked.clear()
            try:
                await self.round(daemon)
            except Exception as exc:  # noqa: BLE001 - the database may be away; the next round retries
                self.log.warning(self.failure_event, error=redact_url(str(exc)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked.wait(), self.interval_s)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
