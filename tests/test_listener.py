"""atlasd.listener: the NOTIFY listener on channel ``atlasd_traces``, against real PostgreSQL.

The listener only wakes the reconciler: ``wake(ids)`` with the payload's id hints, ``wake(None)``
(a full reconcile) for '*', an unreadable payload and after every (re)connect; ``on_state`` says
connected / disconnected, and ``Health`` shows the part ``listener`` degraded while it reconnects.
Faults are real: ``pg_terminate_backend`` of its session, a database refusing connections."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from atlasd.health import Health
from atlasd.listener import APPLICATION_NAME, CHANNEL, LIVENESS_TIMEOUT_S, NOTIFY_TRIGGERS, TRIGGER_STATES, Listener
from atlasd.settings import load_settings
from atlasd.testing import pg
from atlasd.testing.pg import sql

NOTIFY_TIMEOUT_S = 0.3  # quiet this long: the listener checks its connection (and sees `stopping`)


pytestmark = pytest.mark.usefixtures("log_to_stdout")


def listener_backends(db_url: str) -> list[tuple[int, str]]:
    """(pid, last query) of the listener's sessions in the test database."""
    return sql(db_url, """SELECT pid, query FROM pg_stat_activity
                           WHERE datname = current_database() AND application_name = %s""", [APPLICATION_NAME])


def notify(db_url: str, payload: str, channel: str = CHANNEL) -> None:
    sql(db_url, "SELECT pg_notify(%s, %s)", [channel, payload])


def add_sessions(db_url: str, n: int, review_status: str = "approved") -> list[int]:
    rows = sql(db_url, """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                          SELECT 't', 'succeeded', %s, '{"learning_key": "k"}', '{"score": 1}'
                            FROM generate_series(1, %s) RETURNING id""", [review_status, n])
    return [r[0] for r in rows]


class Calls:
    """What the listener told the daemon, in order: ("wake", ids or None), ("state", connected,
    the health faults' (part, state) at that moment)."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.events: list[tuple] = []

    def wake(self, ids) -> None:
        self.events.append(("wake", None if ids is None else set(ids)))

    def on_state(self, connected: bool) -> None:
        self.events.append(("state", connected, [(f.part, f.state) for f in self.health.faults]))

    async def next(self, seen: int, timeout: float = 10) -> tuple:
        """The event after the first ``seen`` ones (waits for it)."""
        await until(lambda: len(self.events) > seen, timeout, f"listener event #{seen + 1} (have {self.events})")
        return self.events[seen]


async def until(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class Running:
    def __init__(self, listener: Listener, calls: Calls, health: Health, stopping: asyncio.Event,
                 task: asyncio.Task) -> None:
        self.listener, self.calls, self.health, self.stopping, self.task = listener, calls, health, stopping, task

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 10)


async def start(db_url: str, **settings: float) -> Running:
    health = Health("daemon")
    calls = Calls(health)
    settings = {"notify_timeout_s": NOTIFY_TIMEOUT_S, "reconnect_max_backoff_s": 0.5, **settings}
    listener = Listener(load_settings(db_url=db_url, **settings), calls.wake, calls.on_state, health)
    stopping = asyncio.Event()
    task = asyncio.create_task(listener.run(stopping))
    await asyncio.wait_for(listener.first_attempt_done.wait(), 10)
    return Running(listener, calls, health, stopping, task)


@pytest.fixture()
async def running(db_url: str) -> AsyncIterator[Running]:
    run = await start(db_url)
    yield run
    await run.stop()


# ---------------------------------------------------------------- connect
async def test_connecting_reports_connected_and_asks_for_a_full_reconcile(db_url: str) -> None:
    running = await start(db_url, notify_timeout_s=2)  # not quiet long enough for a SELECT 1 yet
    try:
        assert running.calls.events == [("state", True, []), ("wake", None)]
        assert running.health.faults == []
        [(_, query)] = listener_backends(db_url)  # one dedicated connection, listening on the channel
        assert query == f"LISTEN {CHANNEL}"
    finally:
        await running.stop()


# ---------------------------------------------------------------- payloads
async def test_a_notify_on_the_channel_wakes_the_reconciler_with_its_ids(db_url: str, running: Running) -> None:
    cases = [
        ("42", {42}),
        ("3,1,3", {1, 3}),  # duplicates are one hint
        ("*", None),  # look at everything
        ("", None),
        ("1,x", None),  # unreadable: a hint we cannot read must not hide work
    ]
    for payload, ids in cases:
        seen = len(running.calls.events)
        notify(db_url, payload)
        assert await running.calls.next(seen) == ("wake", ids), payload


async def test_other_channels_are_not_listened_to(db_url: str, running: Running) -> None:
    seen = len(running.calls.events)
    notify(db_url, "1", channel="atlasd_promotions")
    notify(db_url, "2")  # delivered after the first, had it been delivered at all
    assert await running.calls.next(seen) == ("wake", {2})
    assert len(running.calls.events) == seen + 1


async def test_the_migrations_triggers_send_the_ids_of_sessions_becoming_or_ceasing_to_be_ready(
    db_url: str, running: Running
) -> None:
    calls = running.calls
    seen = len(calls.events)
    ready = add_sessions(db_url, 3)
    assert await calls.next(seen) == ("wake", set(ready))
    pending = add_sessions(db_url, 2, review_status="pending")  # not ready: no NOTIFY
    sql(db_url, "UPDATE sessions SET review_status = 'approved' WHERE id = %s", [pending[0]])
    assert await calls.next(seen + 1) == ("wake", {pending[0]})
    sql(db_url, "UPDATE sessions SET review_status = 'quarantined' WHERE id = %s", [ready[0]])  # stops being ready
    assert await calls.next(seen + 2) == ("wake", {ready[0]})
    add_sessions(db_url, 501)  # over 500 ids in one statement: '*'
    assert await calls.next(seen + 3) == ("wake", None)
    assert len(calls.events) == seen + 4


# ---------------------------------------------------------------- liveness, reconnect, stop
async def test_a_quiet_listener_checks_its_connection(db_url: str, running: Running) -> None:
    await until(lambda: [q for _, q in listener_backends(db_url)] == ["SELECT 1"], 10,
                f"a SELECT 1 after {NOTIFY_TIMEOUT_S}s without notifications")
    seen = len(running.calls.events)
    notify(db_url, "5")  # still listening
    assert await running.calls.next(seen) == ("wake", {5})


async def test_a_terminated_session_is_reconnected_and_asks_for_a_full_reconcile(db_url: str, running: Running) -> None:
    calls = running.calls
    [(old, _)] = listener_backends(db_url)
    seen = len(calls.events)
    assert sql(db_url, "SELECT pg_terminate_backend(%s)", [old]) == [(True,)]
    # disconnected, with the part shown degraded while it reconnects
    assert await calls.next(seen) == ("state", False, [("listener", "reconnecting")])
    # back: connected (and recovered), then a full reconcile for whatever was notified meanwhile
    assert await calls.next(seen + 1) == ("state", True, [])
    assert await calls.next(seen + 2) == ("wake", None)
    assert running.health.faults == []
    [(new, _)] = listener_backends(db_url)
    assert new != old
    notify(db_url, "9")
    assert await calls.next(seen + 3) == ("wake", {9})


async def test_a_hung_session_is_noticed_and_reconnected(db_url: str, running: Running) -> None:
    """A listener session whose server process stops answering (its TCP still up, so keepalives
    pass) is given up after LIVENESS_TIMEOUT_S (plus psycopg's 5 s for the cancelled query): the
    listener reconnects and asks for a full reconcile."""
    [(backend, _)] = listener_backends(db_url)
    seen = len(running.calls.events)
    try:
        os.kill(backend, signal.SIGSTOP)  # the server process stops answering; its TCP stays up
    except PermissionError:
        pytest.skip("needs permission to signal the PostgreSQL server's processes")
    try:
        await until(lambda: ("state", False, [("listener", "reconnecting")]) in running.calls.events[seen:],
                    LIVENESS_TIMEOUT_S + 10,
                    "the listener noticing its hung session")
    finally:
        os.kill(backend, signal.SIGCONT)
        sql(db_url, "SELECT pg_terminate_backend(%s)", [backend])
    await until(lambda: ("state", True, []) in running.calls.events[seen:], 10, "the listener reconnected")


async def test_a_database_refusing_connections_is_retried_until_it_comes_back(db_url: str) -> None:
    """Started while the database refuses connections: the first attempt fails (and says so, for
    the daemon's start-up), attempts repeat with backoff, the part is degraded with an error that
    shows no password; once connections are allowed it connects and asks for a full reconcile."""
    dbname = urlsplit(db_url).path.lstrip("/")
    parts = urlsplit(db_url)
    url = urlunsplit(parts._replace(netloc=f"{parts.username}:s3cret-pw@{parts.hostname}:{parts.port}"))
    sql(pg.ADMIN_URL, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
    run = None
    try:
        try:
            run = await start(url)  # returns once the first attempt is done
            assert run.calls.events[0] == ("state", False, [("listener", "reconnecting")])
            await until(lambda: run.health.faults[0].attempts >= 3, 10, "three failed attempts")
            [fault] = run.health.faults
            assert fault.part == "listener" and "not currently accepting connections" in fault.error
            assert "s3cret" not in fault.error and "***" in fault.error
            assert all(e == ("state", False, [("listener", "reconnecting")]) for e in run.calls.events)
        finally:
            sql(pg.ADMIN_URL, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        seen = len(run.calls.events)
        await until(lambda: ("state", True, []) in run.calls.events[seen:], 10, "the listener connected")
        assert run.calls.events[-2:] == [("state", True, []), ("wake", None)]  # connected, then a full reconcile
        assert run.health.faults == []
    finally:
        if run is not None:
            await run.stop()


async def test_stopping_ends_the_listener_and_its_connection(db_url: str, running: Running) -> None:
    await running.stop()
    assert running.calls.events[-1] == ("state", False, [])
    await until(lambda: listener_backends(db_url) == [], 10, "the listener's session gone")


# ---------------------------------------------------------------- the triggers' states
async def test_trigger_states(db_url: str, bare_db_url: str) -> None:
    def states(url: str = db_url) -> dict[str, str]:
        return sql(url, TRIGGER_STATES)[0][0]

    ins, upd = NOTIFY_TRIGGERS
    assert states() == {ins: "enabled", upd: "enabled"}
    sql(db_url, f"ALTER TABLE public.sessions DISABLE TRIGGER {ins}")
    assert states() == {ins: "disabled", upd: "enabled"}
    sql(db_url, f"ALTER TABLE public.sessions ENABLE REPLICA TRIGGER {ins}")  # fires only on replicas
    assert states() == {ins: "disabled", upd: "enabled"}
    sql(db_url, f"ALTER TABLE public.sessions ENABLE ALWAYS TRIGGER {ins}")
    assert states() == {ins: "enabled", upd: "enabled"}
    sql(db_url, f"DROP TRIGGER {upd} ON public.sessions")
    assert states() == {ins: "enabled", upd: "missing"}
    assert states(bare_db_url) == {ins: "missing", upd: "missing"}  # no sessions table at all
