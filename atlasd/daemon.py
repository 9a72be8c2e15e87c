"""The daemon: one asyncio process per database.

Start-up order: logging, schema check, the per-database lock, the connection pool, the
listener, a first full reconcile, then the components (cadence, runner, ... from later issues),
then, once the listener is connected, READY=1 for systemd. SIGTERM/SIGINT stop it cleanly
(STOPPING=1, components in reverse order); SIGHUP calls ``reload()`` on every component
(RELOADING=1 ... READY=1). Under systemd the heartbeat sends WATCHDOG=1 while the lock connection
and the listener are healthy, and STATUS= is refreshed every STATUS_S (:func:`atlasd.status.status_line`).

A component plugs in by implementing :class:`Component` and either being appended to
``Daemon.components`` before ``run()`` or being named in ``COMPONENT_MODULES`` (a module that
exposes ``create_component(settings) -> Component``; ``build_daemon`` loads them in order).
Components query the database through ``daemon.pool`` (``async with daemon.pool.connection()
as conn``: committed at exit). They must not block the event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from atlasd import __version__, intake
from atlasd.db import DatabaseError, connect, connect_kwargs, safe_error
from atlasd.db.migrate import check_schema
from atlasd.listener import Listener
from atlasd.lock import HEARTBEAT_S, DaemonLock, LockLostError
from atlasd.logging import configure_logging, get_logger
from atlasd.sdnotify import Notifier, watchdog_interval_s
from atlasd.settings import Settings
from atlasd.status import status_line

# modules exposing ``create_component(settings) -> Component``, started in this order
COMPONENT_MODULES: list[str] = ["atlasd.cadence", "atlasd.runner", "atlasd.promotions", "atlasd.metrics"]

POOL_MAX_SIZE = 4
RETRY_S = 5.0  # after a failed reconcile, a full one this much later
STATUS_S = HEARTBEAT_S  # systemd's STATUS= line is refreshed this often (only under systemd)
HEAVY_MODULES = ("torch", "transformers", "trl", "mlflow")  # must never be loaded in the daemon


class Component(Protocol):
    name: str

    async def start(self, daemon: Daemon) -> None:
        """After the lock, the schema check and the first full reconcile."""

    async def on_intake(self, recorded: int) -> None:
        """After a reconcile that recorded >= 1 new usable session."""

    async def reload(self) -> None:
        """SIGHUP."""

    async def stop(self) -> None:
        """On shutdown, in reverse start order."""


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger("daemon")
        self.pool: AsyncConnectionPool | None = None  # open while run() is running
        self.components: list[Component] = []
        self.stopping = asyncio.Event()
        self.listener_connected = False
        self.notifier = Notifier()
        self.last_reconcile_at: datetime | None = None
        self._wakeup = intake.Wakeup(max_ids=settings.intake_batch_size)
        self._lock = DaemonLock(settings)
        self._beat = asyncio.Event()  # write the heartbeat row now (listener state changed)
        self._exit_code = 0
        self._tasks: set[asyncio.Task] = set()
        self._started: list[Component] = []  # components whose start() returned, in order
        self._listener_up = asyncio.Event()
        # STATUS= is computed by atlasd.status on one synchronous connection, used by one worker thread
        self._status_worker = ThreadPoolExecutor(1, "atlasd-status") if self.notifier.enabled else None
        self._status_conn: psycopg.Connection | None = None

    def request_reconcile(self, ids: Iterable[int] | None = None) -> None:
        """Ask the reconciler to look at these session ids soon (None: at every ready session)."""
        self._wakeup.request(ids)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or ``stopping`` is set). 0 on a clean stop, 1 if the lock was
        lost or a component failed to start. Raises DatabaseError (safe to print) when the schema
        is old or another daemon holds the lock."""
        started_at = time.monotonic()
        configure_logging(self.settings.log_format, self.settings.log_level)
        self.log = get_logger("daemon")
        self.log.info("starting", version=__version__, db=self.settings.dsn_redacted)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload()))
        try:
            await asyncio.to_thread(self._check_schema)
            if not await self._lock.acquire(wait=self.settings.lock_wait, stopping=self.stopping, log=self.log):
                return 0
            try:
                await self._run_locked(started_at)
            finally:
                await self._lock.release()
            self.log.info("stopped", exit_code=self._exit_code)
            return self._exit_code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _run_locked(self, started_at: float) -> None:
        self.pool = AsyncConnectionPool(
            self.settings.dsn, min_size=1, max_size=POOL_MAX_SIZE, kwargs=connect_kwargs("atlasd"), open=False
        )
        try:
            await self.pool.open(wait=True, timeout=30)
        except PoolTimeout:
            await self.pool.close()
            raise DatabaseError(f"cannot open a connection pool to {self.settings.dsn_redacted}") from None
        listener = Listener(self.settings, self.request_reconcile, self._set_listener_state)
        self._spawn(listener.run(self.stopping))
        self._spawn(self._heartbeat_loop())
        try:
            await listener.first_attempt_done.wait()
            self._wakeup.take()
            await self._reconcile(None)
            for component in self.components:
                self.log.info("starting component", component_name=component.name)
                await component.start(self)
                self._started.append(component)
            if not self.stopping.is_set():
                self._spawn(self._reconcile_loop())
                await self._until_listener_up()
            if not self.stopping.is_set():
                self.notifier.ready(status="ready")
                if self._status_worker is not None:
                    self._spawn(self._status_loop())
                self.log.info(
                    "ready",
                    startup_s=round(time.monotonic() - started_at, 3),
                    listener_connected=self.listener_connected,
                    components=[c.name for c in self.components],
                    heavy_modules=sorted(m for m in HEAVY_MODULES if m in sys.modules),
                )
                await self.stopping.wait()
        except Exception:
            self.log.exception("daemon failed")
            self._exit_code = 1
        finally:
            self.notifier.stopping(status="stopping")
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._status_worker is not None:  # after a refresh still running in the worker
                await asyncio.get_running_loop().run_in_executor(self._status_worker, self._close_status_conn)
                self._status_worker.shutdown(wait=False)
            for component in reversed(self._started):
                try:
                    await component.stop()
                except Exception:
                    self.log.exception("component failed to stop", component_name=component.name)
            await self.pool.close()

    def _check_schema(self) -> None:
        with connect(self.settings.dsn, application_name="atlasd-check") as conn:
            check_schema(conn)

    def _on_stop_signal(self, name: str) -> None:
        self.log.info("stop requested", signal=name)
        self.stopping.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _set_listener_state(self, connected: bool) -> None:
        if connected != self.listener_connected:
            self.listener_connected = connected
            (self._listener_up.set if connected else self._listener_up.clear)()
            self._beat.set()

    async def _until_listener_up(self) -> None:
        """READY=1 promises a listening daemon: if the listener's first attempt failed, wait for
        its reconnect (or a stop); systemd's TimeoutStartSec bounds the wait."""
        if self.listener_connected:
            return
        self.log.warning("listener not connected yet; READY=1 waits for it")
        waits = [asyncio.ensure_future(e.wait()) for e in (self._listener_up, self.stopping)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    async def _status_loop(self) -> None:
        """Keep systemd's STATUS= line current: the running run and step, queued runs, pending
        traces per policy/gear, the champions (:func:`atlasd.status.status_line`)."""
        cadence = next((c for c in self.components if c.name == "cadence"), None)
        loop = asyncio.get_running_loop()
        while True:
            policies = list(cadence.policy_set.policies.values()) if cadence is not None else []
            try:
                self.notifier.status(await loop.run_in_executor(self._status_worker, self._status_text, policies))
            except (psycopg.Error, DatabaseError) as exc:
                self.log.warning("status line not refreshed", error=safe_error(exc))
            await asyncio.sleep(STATUS_S)

    def _status_text(self, policies: list) -> str:
        """In the status worker thread."""
        if self._status_conn is None:
            self._status_conn = connect(self.settings.dsn, autocommit=True, application_name="atlasd-status")
        try:
            return status_line(self._status_conn, self.settings, policies)
        except psycopg.Error:
            self._close_status_conn()
            raise

    def _close_status_conn(self) -> None:
        if self._status_conn is not None:
            self._status_conn.close()
            self._status_conn = None

    async def _heartbeat_loop(self) -> None:
        interval = min(HEARTBEAT_S, watchdog_interval_s() or HEARTBEAT_S)
        while True:
            try:
                await self._lock.heartbeat(
                    listener_connected=self.listener_connected, last_reconcile_at=self.last_reconcile_at
                )
            except LockLostError as exc:
                self.log.error("lost the database lock; stopping", error=str(exc))
                self._exit_code = 1
                self.stopping.set()
                return
            if self.listener_connected:
                self.notifier.watchdog()
            try:
                await asyncio.wait_for(self._beat.wait(), interval)
            except TimeoutError:
                pass
            self._beat.clear()

    async def _reconcile_loop(self) -> None:
        while True:
            ids = await self._wakeup.wait(self.settings.poll_interval_s)
            await self._reconcile(ids)

    async def _reconcile(self, ids: set[int] | None) -> None:
        t0 = time.monotonic()
        try:
            async with self.pool.connection() as conn:
                result = await intake.reconcile(conn, ids, self.settings.intake_batch_size)
        except (psycopg.Error, PoolTimeout) as exc:
            self.log.warning("reconcile failed; full reconcile again soon", error=safe_error(exc), retry_in_s=RETRY_S)
            asyncio.get_running_loop().call_later(RETRY_S, self.request_reconcile)
            return
        self.last_reconcile_at = datetime.now(UTC)
        if result.changed:
            self.log.info(
                "intake",
                full=ids is None,
                hinted=None if ids is None else len(ids),
                recorded=result.recorded,
                malformed=result.malformed,
                revoked=result.revoked,
                restored=result.restored,
                duration_ms=round((time.monotonic() - t0) * 1000, 1),
            )
        if result.malformed:
            self.log.warning("malformed sessions recorded", reasons=result.reasons, example_session_ids=result.examples)
        if result.recorded:
            for component in self._started:
                try:
                    await component.on_intake(result.recorded)
                except Exception:
                    self.log.exception("component failed on intake", component_name=component.name)

    async def _reload(self) -> None:
        self.log.info("reload requested", signal="SIGHUP")
        self.notifier.reloading()
        for component in self._started:
            try:
                await component.reload()
            except Exception:
                self.log.exception("component failed to reload", component_name=component.name)
        self.notifier.ready(status="ready")


def build_daemon(settings: Settings) -> Daemon:
    """A daemon with the components named in COMPONENT_MODULES."""
    daemon = Daemon(settings)
    for name in COMPONENT_MODULES:
        daemon.components.append(importlib.import_module(name).create_component(settings))
    return daemon
