"""The daemon: one asyncio process per database.

Start-up order: logging, schema check, the per-database lock, the connection pool, the
listener, a first full reconcile, then the components (cadence, runner, ... from later issues),
then, once the listener is connected, READY=1 for systemd. SIGTERM/SIGINT stop it cleanly
(STOPPING=1, components in reverse order); SIGHUP calls ``reload()`` on every component
(RELOADING=1 ... READY=1). STATUS= is refreshed every STATUS_S (:func:`atlasd.status.status_line`).

Losing a database connection never stops the daemon (:mod:`atlasd.health`): the pool checks a
connection before handing it out; the listener reconnects; a failed reconcile is retried with
backoff; a failed heartbeat means the lock connection is gone, so ``lock_held`` is cleared (no
intake, and no new work for components that honour it) and the lock is re-taken with backoff,
while a running trainer keeps running. Only another daemon holding the lock when this one comes
back stops it (exit 1, with the holder named). Meanwhile STATUS= starts with ``degraded: ...``,
the heartbeat records the faults in ``atlasd.daemon_state.degraded`` and WATCHDOG=1 keeps going
out from the heartbeat as long as every degraded part is still retrying (each attempt is
bounded); a part that stopped trying, or a stalled event loop, stops the pings.

The components (:class:`atlasd.component.Component`: cadence, runner, registrations, metrics,
gc) are built and wired by :func:`build_daemon`: one live :class:`~atlasd.policies.PolicySet`
shared by the cadence (which reloads it on SIGHUP), the runner and the STATUS= line. Components
query the database through ``daemon.pool`` (``async with daemon.pool.connection() as conn``:
committed at exit; a PoolTimeout, a psycopg.OperationalError, after POOL_TIMEOUT_S without a
working connection). They must not block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from atlasd import __version__, intake
from atlasd.cadence import CadenceComponent
from atlasd.component import Component
from atlasd.db import DatabaseError, connect, connect_kwargs, safe_error
from atlasd.db.migrate import check_schema
from atlasd.health import Fault, Health, backoff_s, summary
from atlasd.listener import Listener
from atlasd.lock import HEARTBEAT_S, HEARTBEAT_TIMEOUT_S, DaemonLock, LockHeldError, LockLostError
from atlasd.executor import executor_for
from atlasd.logging import configure_logging, get_logger
from atlasd.metrics import MetricsComponent
from atlasd.policies import PolicySet
from atlasd.promotions import RegistrationRetrier, TaintTagger
from atlasd.retention import GcComponent
from atlasd.runner import RunnerComponent
from atlasd.sdnotify import Notifier, watchdog_interval_s
from atlasd.settings import Settings
from atlasd.status import status_line

POOL_MAX_SIZE = 4
POOL_TIMEOUT_S = 10.0  # pool.connection() gives up (PoolTimeout) after this long without a working connection
# A degraded part is stuck (WATCHDOG=1 withheld) when its latest attempt is older than the
# reconnect backoff cap plus this: one attempt's bound (connect timeout 10 s, or a pool wait, or a
# heartbeat) and a heartbeat interval.
STUCK_SLACK_S = max(10.0, POOL_TIMEOUT_S, HEARTBEAT_TIMEOUT_S) + HEARTBEAT_S
STATUS_S = HEARTBEAT_S  # systemd's STATUS= line is refreshed this often (only under systemd)
HEAVY_MODULES = ("torch", "transformers", "trl", "mlflow")  # must never be loaded in the daemon


class Daemon:
    def __init__(self, settings: Settings, policies: PolicySet | None = None) -> None:
        """``policies``: the live set the STATUS= line reports (none: no policies shown)."""
        self.settings = settings
        self.policies = policies
        self.log = get_logger("daemon")
        self.pool: AsyncConnectionPool | None = None  # open while run() is running
        self.components: list[Component] = []
        self.stopping = asyncio.Event()
        self.listener_connected = False
        self.notifier = Notifier()
        self.health = Health("daemon")  # the daemon's own parts: lock, listener, intake, notify-trigger
        self.lock_held = asyncio.Event()  # set while this daemon holds the per-database lock
        # the machine's GPU(s): held by the runner while a trainer runs, by the registration
        # component while it re-measures a champion (one GPU job at a time)
        self.gpu_slot = asyncio.Lock()
        # set (and ``stopping``) when another daemon holds the lock once this one could reconnect:
        # what is left to do belongs to that daemon now (its start-up reconcile)
        self.superseded: LockHeldError | None = None
        self._lock_held_since = 0.0  # time.monotonic() when the lock was last (re-)taken
        self._last_reconcile: float | None = None  # time.monotonic() of the last successful reconcile
        self._wakeup = intake.Wakeup(max_ids=settings.intake_batch_size)
        self._sweep = intake.RollingSweep()  # where the slow poll's sweep over the history stands
        self._lock = DaemonLock(settings)
        self._beat = asyncio.Event()  # write the heartbeat row now (listener state changed)
        self._exit_code = 0
        self._withheld: list[str] = []  # stuck parts for which WATCHDOG=1 is withheld (logged once)
        self._tasks: set[asyncio.Task] = set()
        self._started: list[Component] = []  # components whose start() returned, in order
        self._listener_up = asyncio.Event()
        # STATUS= is computed by atlasd.status on one synchronous connection, used by one worker thread
        self._status_worker = ThreadPoolExecutor(1, "atlasd-status") if self.notifier.enabled else None
        self._status_conn: psycopg.Connection | None = None

    def request_reconcile(self, ids: Iterable[int] | None = None) -> None:
        """Ask the reconciler to look at these session ids soon (None: at every ready session)."""
        self._wakeup.request(ids)

    def faults(self) -> list[Fault]:
        """What is degraded now: the daemon's own parts, then each started component's."""
        components = [f for c in self._started if (h := getattr(c, "health", None)) is not None for f in h.faults]
        return self.health.faults + components

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or ``stopping`` is set). 0 on a clean stop, 1 if a component
        failed to start or a daemon task failed. Raises DatabaseError (safe to print) when the
        schema is old or another daemon holds the lock (at start, or when this one comes back
        from losing its lock connection: LockHeldError, after a clean stop)."""
        started_at = time.monotonic()
        configure_logging(self.settings.log_format, self.settings.log_level)
        # the pool's own reconnect warnings (plain text on stderr) repeat what the health log says
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
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
            self._lock_held_since = time.monotonic()
            self.lock_held.set()
            try:
                await self._run_locked(started_at)
            finally:
                await self._lock.release()
            self.log.info("stopped", exit_code=self._exit_code)
            if self.superseded is not None:
                raise self.superseded
            return self._exit_code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _run_locked(self, started_at: float) -> None:
        self.pool = AsyncConnectionPool(
            self.settings.dsn, min_size=1, max_size=POOL_MAX_SIZE, kwargs=connect_kwargs("atlasd"), open=False,
            check=AsyncConnectionPool.check_connection, timeout=POOL_TIMEOUT_S,
            # a connection slot that cannot reconnect for this long is dropped, and the next request
            # starts a fresh attempt (the pool's own backoff would otherwise grow without a cap)
            reconnect_timeout=self.settings.reconnect_max_backoff_s,
        )
        try:
            await self.pool.open(wait=True, timeout=30)
        except PoolTimeout:
            await self.pool.close()
            raise DatabaseError(f"cannot open a connection pool to {self.settings.dsn_redacted}") from None
        listener = Listener(self.settings, self.request_reconcile, self._set_listener_state, self.health)
        self._spawn(listener.run(self.stopping))
        self._spawn(self._heartbeat_loop())
        try:
            await listener.first_attempt_done.wait()
            self._wakeup.take()
            await self._reconcile(None)
            self._beat.set()  # the self-report shows the start-up reconcile at once
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
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        """A daemon loop ends only when cancelled at stop; an exception that escaped one is a bug
        that would silently stop intake or the heartbeat, so the daemon stops (exit 1)."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("daemon task failed; stopping", task=task.get_coro().__qualname__,
                           error=safe_error(task.exception()))
            self._exit_code = 1
            self.stopping.set()

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
        """Keep systemd's STATUS= line current: ``degraded: ...`` first when some part is (from
        memory, so it is shown with the database away), then the running run and step, queued
        runs, pending traces per policy/gear, the champions (:func:`atlasd.status.status_line`)."""
        loop = asyncio.get_running_loop()
        while True:
            policies = list(self.policies.policies.values()) if self.policies is not None else []
            parts = [summary(faults)] if (faults := self.faults()) else []
            try:
                parts.append(await loop.run_in_executor(self._status_worker, self._status_text, policies))
            except (psycopg.Error, DatabaseError) as exc:
                self.log.warning("status line not refreshed", error=safe_error(exc))
            if parts:  # with the database away and nothing degraded yet, keep the previous line
                self.notifier.status("; ".join(parts))
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
        """Every HEARTBEAT_S (or half of WatchdogSec): the self-report on the lock connection, then
        WATCHDOG=1 unless a degraded part is stuck. A failed heartbeat means the lock connection
        is gone: ``lock_held`` is cleared and :meth:`DaemonLock.retake` is retried with backoff
        until the lock is held again (then a full reconcile) or another daemon holds it (stop)."""
        interval = min(HEARTBEAT_S, watchdog_interval_s() or HEARTBEAT_S)
        cap = self.settings.reconnect_max_backoff_s
        attempt, retake_at = 0, 0.0
        while True:
            if self.lock_held.is_set():
                try:
                    last = None if self._last_reconcile is None else time.monotonic() - self._last_reconcile
                    triggers = await self._lock.heartbeat(
                        listener_connected=self.listener_connected, last_reconcile_s_ago=last,
                        degraded=[f.to_json() for f in self.faults()],
                    )
                    self._check_triggers(triggers)
                except LockLostError as exc:
                    self.lock_held.clear()
                    self.health.failed("lock", "re-taking the lock", str(exc))
                    attempt, retake_at = 0, time.monotonic() + backoff_s(0, cap)
                    self.log.warning("lock connection lost; re-taking the lock", error=str(exc),
                                     retry_in_s=round(retake_at - time.monotonic(), 2))
            elif time.monotonic() >= retake_at:
                try:
                    await self._lock.retake()
                except LockHeldError as exc:
                    self.log.error("another daemon holds the database lock; stopping", error=str(exc))
                    self.superseded, self._exit_code = exc, 1
                    self.stopping.set()
                    return
                except LockLostError as exc:
                    attempt += 1
                    retake_at = time.monotonic() + backoff_s(attempt, cap)
                    self.health.failed("lock", "re-taking the lock", str(exc))
                    self.log.warning("cannot re-take the database lock yet", error=str(exc), attempt=attempt,
                                     retry_in_s=round(retake_at - time.monotonic(), 2))
                else:
                    self._lock_held_since = time.monotonic()
                    self.lock_held.set()
                    self.health.recovered("lock")
                    self.log.info("lock re-taken", attempts=attempt + 1)
                    self.request_reconcile()  # whatever became ready while the lock was away
                    continue  # the heartbeat, at once
            self._feed_watchdog()
            wait = interval if self.lock_held.is_set() else min(interval, max(0.0, retake_at - time.monotonic()))
            try:
                await asyncio.wait_for(self._beat.wait(), wait)
            except TimeoutError:
                pass
            self._beat.clear()

    def _feed_watchdog(self) -> None:
        """WATCHDOG=1 unless some degraded part stopped retrying: its latest attempt is older than
        the backoff cap plus STUCK_SLACK_S. Parts that wait for the lock are not counted while it
        is being re-taken, nor before it has been held for that long again."""
        now = time.monotonic()
        bound = self.settings.reconnect_max_backoff_s + STUCK_SLACK_S
        stuck = [
            f.part for f in self.faults()
            if (f.part == "lock" or self.lock_held.is_set())
            and now - max(f.last_attempt, self._lock_held_since if f.part != "lock" else 0.0) > bound
        ]
        if stuck != self._withheld and stuck:
            self.log.error("degraded parts stopped retrying; WATCHDOG=1 withheld", parts=stuck, bound_s=bound)
        self._withheld = stuck
        if not stuck:
            self.notifier.watchdog()

    def _check_triggers(self, states: dict[str, str]) -> None:
        """The heartbeat's view of the NOTIFY triggers: one missing or disabled is a degraded
        ``notify-trigger`` (intake then relies on the slow poll) until it is back."""
        broken = {name: state for name, state in states.items() if state != "enabled"}
        if not broken:
            self.health.recovered("notify-trigger")
            return
        what = ", ".join(f"{name} {state}" for name, state in sorted(broken.items()))
        self.health.failed("notify-trigger", what, f"approvals reach the daemon only by its slow poll (every "
                                                   f"{self.settings.poll_interval_s:.0f}s)")

    async def _reconcile_loop(self) -> None:
        """A reconcile per wake-up (and per slow poll) while the lock is held; after a failed one,
        the next (full) one waits an exponential, jittered backoff."""
        failures = 0
        while True:
            ids = await self._wakeup.wait(self.settings.poll_interval_s)
            await self.lock_held.wait()  # nothing is recorded while the lock is being re-taken
            if await self._reconcile(ids):
                failures = 0
                continue
            await asyncio.sleep(backoff_s(failures, self.settings.reconnect_max_backoff_s))
            failures += 1

    async def _reconcile(self, ids: set[int] | None | str) -> bool:
        """Record what is ready (``ids``, everything, or ``intake.POLL``: the slow poll's share of
        the history); False if the database failed (then a full reconcile is requested and
        ``intake`` is degraded until one succeeds)."""
        t0 = time.monotonic()
        poll = ids == intake.POLL
        try:
            async with self.pool.connection() as conn:
                result = await intake.reconcile(conn, None if poll else ids, self.settings.intake_batch_size,
                                                sweep=self._sweep if poll else None)
        except psycopg.Error as exc:  # PoolTimeout included
            self.health.failed("intake", "retrying the reconcile", safe_error(exc))
            self.log.warning("reconcile failed; a full reconcile follows", error=safe_error(exc))
            self.request_reconcile()
            return False
        self.health.recovered("intake")
        self._last_reconcile = time.monotonic()
        if result.changed:
            self.log.info(
                "intake",
                full=ids is None,
                poll=poll,
                hinted=None if ids is None or poll else len(ids),
                recorded=result.recorded,
                malformed=result.malformed,
                revoked=result.revoked,
                restored=result.restored,
                duration_ms=round((time.monotonic() - t0) * 1000, 1),
            )
        if result.malformed:
            self.log.warning("malformed sessions recorded", reasons=result.reasons, example_session_ids=result.examples)
        if result.recorded:
            await self._tell(lambda c: c.on_intake(result.recorded), "intake")
        if result.revoked:
            await self._tell(lambda c: c.on_revoked(result.revoked), "a revocation")
        return True

    async def _tell(self, hook, event: str) -> None:
        """``hook(component)`` for every started component; one that fails is logged, the others still run."""
        for component in self._started:
            try:
                await hook(component)
            except Exception:
                self.log.exception(f"component failed on {event}", component_name=component.name)

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
    """The daemon and its components, started in this order: cadence, runner, registrations,
    taints, metrics, gc. One live policy set (loaded and reloaded by the cadence) for all of them."""
    policies = PolicySet(settings.policies_dir)
    registrar = RegistrationRetrier(settings)
    daemon = Daemon(settings, policies)
    daemon.components = [
        CadenceComponent(settings, policies),
        RunnerComponent(settings, executor_for(settings), policies=policies, registrar=registrar),
        registrar,
        TaintTagger(settings, policies),
        MetricsComponent(settings),
        GcComponent(settings),
    ]
    return daemon
