"""CadenceComponent inside an asyncio loop with a real connection pool and the real APScheduler
timer; the clock is injected. (The daemon-level tests run `python -m atlasd run`.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg_pool import AsyncConnectionPool

from atlasd import queue
from atlasd.cadence import CadenceComponent
from atlasd.settings import load_settings
from tests.cadence_support import NO_SPLIT, Clock, record, utc


pytestmark = pytest.mark.usefixtures("log_to_stdout")


class FakeDaemon:
    """What a component gets from atlasd.daemon.Daemon: settings, pool, log, stopping."""

    def __init__(self, settings, pool) -> None:
        self.settings, self.pool, self.stopping = settings, pool, asyncio.Event()


def write_policy(folder: Path, name: str, gears: dict, **extra) -> Path:
    path = folder / f"{name}.yaml"
    gears = {g: {"eval": NO_SPLIT, **spec} for g, spec in gears.items()}
    path.write_text(yaml.safe_dump({"teacher": "t", "student": "s", "gears": gears, **extra}))
    return path


BATCH3 = {"fast": {"trigger": {"batch": {"every": 3}}}}


async def runs(conn) -> list[queue.Run]:
    return sorted(await queue.list_runs(conn, limit=100), key=lambda r: r.id)


async def test_start_intake_reload_and_the_cron_timer(db_url: str, tmp_path: Path) -> None:
    write_policy(tmp_path, "a", BATCH3)
    write_policy(tmp_path, "b", BATCH3)
    settings = load_settings(db_url=db_url, policies_dir=tmp_path, poll_interval_s=3600)
    clock = Clock(datetime.now(UTC))
    component = CadenceComponent(settings, clock=clock)
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False) as pool, \
            await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await record(conn, 3)  # recorded before start: the first evaluation at start fires
        await component.start(FakeDaemon(settings, pool))
        try:
            assert sorted((r.policy, r.window_hi) for r in await runs(conn)) == [("a", 3), ("b", 3)]

            await record(conn, 3)
            await component.on_intake(3)
            assert [(r.policy, r.window_hi, r.coalesced) for r in await runs(conn)] == [("a", 6, 1), ("b", 6, 1)]

            # SIGHUP with one valid change, one broken file and a removed one
            write_policy(tmp_path, "a", {"fast": {"trigger": {"batch": {"every": 2}}}})
            (tmp_path / "b.yaml").unlink()
            write_policy(tmp_path, "c", {"fast": {"trigger": {"batch": {"every": "many"}}}})
            write_policy(tmp_path, "d", {
                "hq": {"trigger": {"cron": {"expr": "0 3 * * sun"}}, "optim": {"max_steps": None, "num_train_epochs": 5}}})
            await component.reload()
            assert sorted(component.policy_set.policies) == ["a", "d"]
            assert list(component.policy_set.errors) == [tmp_path / "c.yaml"]
            jobs = sorted(j.id for j in component.scheduler.get_jobs())
            assert jobs == ["cadence-poll", "cron:d:hq"]
            await record(conn, 2)
            await component.on_intake(2)
            by_policy = {r.policy: r for r in await runs(conn)}
            assert (by_policy["a"].window_hi, by_policy["b"].window_hi) == (8, 6)  # b stopped triggering

            # the real timer: move d's cron job to now; the injected clock says the tick is due
            tick = component.scheduler.get_job("cron:d:hq").next_run_time
            clock.now = tick.astimezone(UTC) + timedelta(seconds=1)
            component.scheduler.modify_job("cron:d:hq", next_run_time=datetime.now(UTC))
            for _ in range(100):
                cron_runs = [r for r in await runs(conn) if r.policy == "d"]
                if cron_runs:
                    break
                await asyncio.sleep(0.05)
            assert [(r.trigger, r.scheduled_for, r.priority) for r in cron_runs] == [("cron", tick, 10)]
        finally:
            await component.stop()
        assert not component.scheduler.running


async def test_a_failing_database_does_not_stop_the_cadence(db_url: str, tmp_path: Path) -> None:
    write_policy(tmp_path, "a", BATCH3)
    settings = load_settings(db_url=db_url, policies_dir=tmp_path, poll_interval_s=3600)
    component = CadenceComponent(settings, clock=lambda: utc(2026, 1, 1))
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False) as pool, \
            await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await component.start(FakeDaemon(settings, pool))
        try:
            await conn.execute("ALTER TABLE atlasd.policy_state RENAME TO policy_state_away")
            await record(conn, 3)
            assert await component.evaluate() == []  # logged, retried on the next poll
            await conn.execute("ALTER TABLE atlasd.policy_state_away RENAME TO policy_state")
            [plan] = await component.evaluate()
            assert plan.action == "enqueue"
        finally:
            await component.stop()
