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

from typing import Any

from atlasd.health import Health


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
