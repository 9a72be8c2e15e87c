"""Cadence against real Postgres: batch thresholds, filters, min_interval, cron with an injected
clock (fire, catch-up after downtime, skip when too old), pause/resume, manual triggers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg
import pytest

from atlasd import queue
from atlasd.cadence import due_tick, evaluate_gear, pause, plan_all, resume, trigger_manual
from atlasd.policies import PolicySet
from atlasd.settings import load_settings
from tests.cadence_support import Clock, batch_gear, cron_gear, make_policy, record, utc

DAY = timedelta(days=1)


async def aconn(db_url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(db_url, autocommit=True)


async def runs(conn) -> list[queue.Run]:
    return sorted(await queue.list_runs(conn, limit=1000), key=lambda r: r.id)


async def state(conn, policy: str, gear: str) -> dict:
    cur = await conn.execute(
        "SELECT last_window_hi, last_fire_at, skipped_fire_at, skipped_reason FROM atlasd.policy_state WHERE policy = %s AND gear = %s",
        [policy, gear],
    )
    row = await cur.fetchone()
    return dict(zip(("last_window_hi", "last_fire_at", "skipped_fire_at", "skipped_reason"), row, strict=True))


async def test_batch_fires_exactly_once_per_n_under_concurrent_approvals(db_url: str) -> None:
    policy = make_policy(fast=batch_gear(5))
    now = utc(2026, 1, 1)

    async def evaluate() -> str:
        async with await aconn(db_url) as c:
            return (await evaluate_gear(c, policy, "fast", now=now, catchup_window=DAY)).action

    async with await aconn(db_url) as conn:
        # eight evaluators racing on exactly one batch: one fire
        await record(conn, 5)
        actions = await asyncio.gather(*(evaluate() for _ in range(8)))
        assert sorted(actions) == ["enqueue"] + ["none"] * 7
        [run] = await runs(conn)
        assert (run.window_lo, run.window_hi, run.n_traces, run.trigger) == (0, 5, 5, "batch")

        # 4 writers approve 40 more traces one by one, each followed by an evaluation, while a
        # runner claims and finishes runs: every trace lands in exactly one window, one fire per 5
        async def writer() -> None:
            async with await aconn(db_url) as c:
                for _ in range(10):
                    await record(c, 1)
                    await evaluate_gear(c, policy, "fast", now=now, catchup_window=DAY)

        async def runner(stop: asyncio.Event) -> None:
            async with await aconn(db_url) as c:
                while not stop.is_set():
                    claimed = await queue.claim_next(c)
                    if claimed:
                        await queue.mark_succeeded(c, claimed.id)
                    await asyncio.sleep(0.01)

        stop = asyncio.Event()
        runner_task = asyncio.create_task(runner(stop))
        await asyncio.gather(*(writer() for _ in range(4)))
        stop.set()
        await runner_task
        await asyncio.gather(*(evaluate() for _ in range(4)))

        all_runs = await runs(conn)
        windows = sorted((r.window_lo, r.window_hi) for r in all_runs)
        assert windows[0][0] == 0 and windows[-1][1] == 45
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False)), windows
        assert sum(r.n_traces for r in all_runs) == 45
        assert sum(1 + r.coalesced for r in all_runs) == 9  # fires, whether new runs or widened ones
        assert all(r.n_traces % 5 == 0 for r in all_runs)
        assert (await state(conn, "p", "fast"))["last_window_hi"] == 45


async def test_batch_counts_only_traces_passing_the_filters(db_url: str) -> None:
    now = utc(2026, 3, 1)
    policy = make_policy(learning_key="math", fast=batch_gear(3, min_reward=0.8, max_age_days=7))
    async with await aconn(db_url) as conn:
        await record(conn, 2, key="math", reward=0.9, created_at=now - timedelta(days=1))
        await record(conn, 1, key="math", reward=0.5)  # reward too low
        await record(conn, 1, key="code", reward=1.0)  # other task family
        await record(conn, 1, key="math", reward=0.95, created_at=now - timedelta(days=30))  # too old
        await record(conn, 1, key="math", reward=0.95, malformed="no usable message")
        await record(conn, 1, key="math", reward=0.95, revoked=True)  # quarantined after approval
        await record(conn, 1, key="math", reward=None)  # no reward: never passes
        p = await evaluate_gear(conn, policy, "fast", now=now, catchup_window=DAY)
        assert (p.action, p.pending, p.reason) == ("none", 2, "2/3 new traces")
        [third] = await record(conn, 1, key="math", reward=0.8)
        [fourth] = await record(conn, 1, key="math", reward=0.99)
        p = await evaluate_gear(conn, policy, "fast", now=now, catchup_window=DAY)
        # fires for exactly 3: the window ends at the third passing trace; the fourth stays pending
        assert (p.action, p.window_lo, p.window_hi, p.n_traces) == ("enqueue", 0, third, 3)
        p = await evaluate_gear(conn, policy, "fast", now=now, catchup_window=DAY, apply=False)
        assert (p.pending, p.last_window_hi) == (1, third)
        assert fourth > third

        everything = make_policy(name="all", fast=batch_gear(3, min_reward=0.0))
        p = await evaluate_gear(conn, everything, "fast", now=now, catchup_window=DAY, apply=False)
        assert p.pending == 7  # every usable row (not malformed, not revoked) of every key with a reward


async def test_min_interval_holds_a_batch_until_it_passes(db_url: str) -> None:
    clock = Clock(utc(2026, 1, 1, 12))
    policy = make_policy(fast=batch_gear(2, min_interval="1h"))
    async with await aconn(db_url) as conn:
        await record(conn, 2)
        assert (await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)).action == "enqueue"
        await record(conn, 2)
        clock.advance(minutes=30)
        held = await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)
        assert held.action == "none" and "min_interval" in held.reason
        assert held.next_fire_at == utc(2026, 1, 1, 13)
        clock.advance(minutes=31)
        fired = await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)
        assert (fired.action, fired.window_lo, fired.window_hi) == ("coalesce", 2, 4)  # run 1 still queued
        [run] = await runs(conn)
        assert (run.window_lo, run.window_hi, run.n_traces, run.coalesced) == (0, 4, 4, 1)


async def test_cron_fires_on_its_tick_then_catches_up_after_downtime(db_url: str) -> None:
    # weekly, Sunday 03:00 Paris; 2026-11-22 is a Sunday (02:00 UTC = 03:00 CET)
    policy = make_policy(hq=cron_gear("0 3 * * sun", "Europe/Paris", min_reward=0.9))
    clock = Clock(utc(2026, 11, 21, 12))
    tick = utc(2026, 11, 22, 2)

    async def evaluate():
        return await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY)

    async with await aconn(db_url) as conn:
        armed = await evaluate()
        assert armed.action == "none" and armed.next_fire_at == tick
        await record(conn, 3, reward=0.95)
        await record(conn, 2, reward=0.85)  # below the high-quality gear's min_reward
        clock.now = tick + timedelta(seconds=2)  # the timer wakes us at the tick
        fired = await evaluate()
        assert (fired.action, fired.trigger, fired.n_traces, fired.window_hi) == ("enqueue", "cron", 3, 3)
        assert (await evaluate()).action == "none"  # a second wake-up for the same tick: nothing
        [run] = await runs(conn)
        assert (run.trigger, run.scheduled_for, run.priority) == ("cron", tick, 10)

        # no new trace by the next Sunday: the tick is skipped (an empty-window run could only fail)
        clock.now = tick + timedelta(days=7, seconds=2)
        empty = await evaluate()
        assert empty.action == "skip" and "no new traces" in empty.reason and len(await runs(conn)) == 1

        # the daemon is down over the Sunday after and back 5 hours later: one catch-up run
        await record(conn, 2, reward=0.95)
        clock.now = tick + timedelta(days=14, hours=5)
        caught = await evaluate()
        assert (caught.action, caught.trigger) == ("enqueue", "catch-up")
        assert (await runs(conn))[-1].scheduled_for == tick + timedelta(days=14)
        assert (await evaluate()).action == "none"

        # down for two weeks: the latest missed tick is 2 days old, beyond the 1-day window
        await record(conn, 1, reward=0.95)
        clock.now = tick + timedelta(days=28 + 2)
        planned = await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY, apply=False)
        assert planned.action == "skip" and "older than the catch-up window" in planned.reason
        skipped = await evaluate()
        assert skipped.action == "skip"
        st = await state(conn, "p", "hq")
        assert st["skipped_fire_at"] == tick + timedelta(days=28) and "catch-up window" in st["skipped_reason"]
        assert len(await runs(conn)) == 2
        after = await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY, apply=False)
        assert after.action == "none" and after.skipped_fire_at == tick + timedelta(days=28)  # reported by plan


async def test_several_missed_ticks_coalesce_into_one_catch_up_run(db_url: str) -> None:
    policy = make_policy(nightly=cron_gear("30 1 * * *"))
    clock = Clock(utc(2026, 5, 1, 0))
    async with await aconn(db_url) as conn:
        await evaluate_gear(conn, policy, "nightly", now=clock(), catchup_window=DAY * 3)
        await record(conn, 2)
        clock.now = utc(2026, 5, 3, 9)  # 1st, 2nd and 3rd 01:30 missed
        p = await evaluate_gear(conn, policy, "nightly", now=clock(), catchup_window=DAY * 3)
        assert (p.action, p.trigger) == ("enqueue", "catch-up")
        [run] = await runs(conn)
        assert run.scheduled_for == utc(2026, 5, 3, 1, 30)


async def test_changing_a_cron_expression_rearms_without_catch_up(db_url: str) -> None:
    clock = Clock(utc(2026, 5, 1, 0))
    async with await aconn(db_url) as conn:
        weekly = make_policy(hq=cron_gear("0 3 * * sun"))
        await evaluate_gear(conn, weekly, "hq", now=clock(), catchup_window=DAY * 30)
        clock.now = utc(2026, 5, 1, 12)  # a Friday: the new daily 03:00 would have fired today
        daily = make_policy(hq=cron_gear("0 3 * * *"))
        p = await evaluate_gear(conn, daily, "hq", now=clock(), catchup_window=DAY * 30)
        assert p.action == "none" and p.next_fire_at == utc(2026, 5, 2, 3)


def test_due_tick_is_cheap_after_a_long_downtime() -> None:
    policy = make_policy(every_minute=cron_gear("* * * * *"))
    gear = policy.gears["every_minute"]
    now = utc(2027, 6, 1, 12, 0, 30)
    assert due_tick(gear, utc(2026, 1, 1), now) == utc(2027, 6, 1, 12, 0)
    assert due_tick(gear, now - timedelta(seconds=20), now) is None


async def test_pause_and_resume(db_url: str) -> None:
    clock = Clock(utc(2026, 11, 20))
    policy = make_policy(fast=batch_gear(2), hq=cron_gear("0 3 * * sun"))
    other = make_policy(name="other", fast=batch_gear(2))
    async with await aconn(db_url) as conn:
        await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY)
        await pause(conn, "p", "maintenance")
        await record(conn, 3)
        p = await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)
        assert (p.action, p.paused, p.pending) == ("none", True, 3)
        assert (await evaluate_gear(conn, other, "fast", now=clock(), catchup_window=DAY)).action == "enqueue"
        # a cron tick while paused is skipped, and resuming does not fire it
        clock.now = utc(2026, 11, 22, 3, 0, 1)
        skipped = await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY)
        assert (skipped.action, skipped.skipped_reason) == ("skip", "paused")
        # manual triggers work while paused
        manual = await trigger_manual(conn, policy, "hq", load_settings(), clock())
        assert (manual.action, manual.trigger, manual.n_traces) == ("enqueue", "manual", 3)
        assert await resume(conn, "p") == ["p"]
        assert (await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY)).action == "none"
        # the traces that arrived while paused fire at the first evaluation after resume
        p = await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)
        assert (p.action, p.n_traces, p.window_hi) == ("enqueue", 2, 2)
        # pause everything
        await pause(conn, None)
        await record(conn, 2)
        assert (await evaluate_gear(conn, other, "fast", now=clock(), catchup_window=DAY)).paused
        assert await resume(conn, None) == ["*"]


async def test_manual_trigger_takes_every_pending_trace_and_joins_a_queued_batch_run(db_url: str) -> None:
    policy = make_policy(fast=batch_gear(10), hq=cron_gear("0 3 * * sun"))
    now = utc(2026, 1, 1)
    async with await aconn(db_url) as conn:
        await record(conn, 4)
        m = await trigger_manual(conn, policy, "fast", load_settings(), now)
        assert (m.action, m.trigger, m.window_lo, m.window_hi, m.n_traces) == ("enqueue", "manual", 0, 4, 4)
        [run] = await runs(conn)
        assert (run.trigger, run.priority) == ("manual", 0)
        await record(conn, 10)
        assert (await evaluate_gear(conn, policy, "fast", now=now, catchup_window=DAY)).action == "enqueue"
        await record(conn, 1)
        m2 = await trigger_manual(conn, policy, "fast", load_settings(), now)
        assert m2.action == "coalesce"  # the queued batch run of this gear now covers (4, 15]
        batch = [r for r in await runs(conn) if r.trigger == "batch"]
        assert [(r.window_lo, r.window_hi, r.n_traces) for r in batch] == [(4, 15, 11)]
        # a manual run of the cron gear is its own run, with the cron gear's priority
        m3 = await trigger_manual(conn, policy, "hq", load_settings(), now)
        assert m3.action == "enqueue" and (await queue.get_run(conn, m3.run_id)).priority == 10


async def test_plan_is_a_dry_run(db_url: str, tmp_path) -> None:
    (tmp_path / "p.yaml").write_text(
        "teacher: t\nstudent: s\ngears:\n  fast: {trigger: {batch: {every: 2}}}\n"
        "  hq: {trigger: {cron: {expr: '0 3 * * sun'}}, optim: {max_steps: null, num_train_epochs: 5}}\n"
    )
    policies = PolicySet(tmp_path)
    assert policies.reload().ok
    async with await aconn(db_url) as conn:
        await record(conn, 3)
        plans = await plan_all(conn, policies, load_settings(), utc(2026, 1, 1))
        by_gear = {p.gear: p for p in plans}
        assert (by_gear["fast"].action, by_gear["fast"].n_traces, by_gear["fast"].pending) == ("enqueue", 2, 3)
        assert by_gear["hq"].action == "none" and by_gear["hq"].next_fire_at == utc(2026, 1, 4, 3)
        assert await runs(conn) == []
        cur = await conn.execute("SELECT count(*) FROM atlasd.policy_state")
        assert (await cur.fetchone())[0] == 0


@pytest.mark.parametrize("gear", [batch_gear(1), cron_gear("* * * * *")])
async def test_gear_priority_decides_the_claim_order(db_url: str, gear) -> None:
    policy = make_policy(g=gear)
    assert policy.gears["g"].priority == (10 if "cron" in gear["trigger"] else 0)


async def test_a_corrected_forward_clock_step_does_not_silence_a_cron_gear(db_url: str) -> None:
    """The clock jumped a year ahead, a tick fired and was recorded then; once the clock is back,
    the gear fires at its next tick (and `plan` says so) instead of waiting a year."""
    policy = make_policy(nightly=cron_gear("30 1 * * *"), fast=batch_gear(2, min_interval=timedelta(hours=1)))
    clock = Clock(utc(2026, 5, 1, 0))
    async with await aconn(db_url) as conn:
        await evaluate_gear(conn, policy, "nightly", now=clock(), catchup_window=DAY)
        await record(conn, 2)
        clock.now = utc(2027, 5, 1, 1, 30, 5)  # stepped a year ahead
        ahead = await evaluate_gear(conn, policy, "nightly", now=clock(), catchup_window=DAY)
        assert (ahead.action, ahead.trigger) == ("enqueue", "cron")
        assert (await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)).action == "enqueue"
        await record(conn, 2)
        clock.now = utc(2026, 5, 1, 12)  # corrected
        planned = await evaluate_gear(conn, policy, "nightly", now=clock(), catchup_window=DAY, apply=False)
        assert planned.action == "none" and planned.next_fire_at == utc(2026, 5, 2, 1, 30), planned.reason
        # min_interval counts from the corrected now, not from a fire a year ahead
        assert (await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)).action == "none"
        clock.now = utc(2026, 5, 1, 13, 0, 1)  # fires again (widening its still-queued run)
        assert (await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)).action == "coalesce"
        await record(conn, 1)
        clock.now = utc(2026, 5, 2, 1, 30, 2)
        fired = await evaluate_gear(conn, policy, "nightly", now=clock(), catchup_window=DAY)
        assert (fired.action, fired.trigger) == ("enqueue", "cron")
        assert (await runs(conn))[-1].scheduled_for == utc(2026, 5, 2, 1, 30)


async def test_a_fire_takes_at_most_max_traces_the_newest_and_backfill_takes_all(db_url: str) -> None:
    """A new policy over a long history: its first run gets the newest filters.max_traces, the
    older ones are reported left out; `atlasd trigger --backfill` takes every pending trace."""
    policy = make_policy(fast=batch_gear(2, max_traces=3), hq=cron_gear("30 1 * * *", max_traces=2))
    clock = Clock(utc(2026, 5, 1, 0))
    async with await aconn(db_url) as conn:
        await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY)
        seqs = await record(conn, 7)
        fast = await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY)
        assert (fast.action, fast.window_lo, fast.window_hi, fast.n_traces, fast.skipped_traces) == (
            "enqueue", seqs[2], seqs[5], 3, 3)  # 6 of 7 fire (every 2): the newest 3 of those go in
        assert "the 3 oldest left out (filters.max_traces 3" in fast.reason
        clock.now = utc(2026, 5, 1, 1, 30, 1)
        hq = await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY)
        assert (hq.trigger, hq.window_lo, hq.window_hi, hq.n_traces, hq.skipped_traces) == ("cron", seqs[4], seqs[6], 2, 5)
        more = await record(conn, 4)
        planned = await evaluate_gear(conn, policy, "hq", now=clock(), catchup_window=DAY, apply=False)
        assert planned.action == "none"  # the next tick is tomorrow
        manual = await trigger_manual(conn, policy, "hq", load_settings(), clock())
        assert (manual.window_lo, manual.n_traces, manual.skipped_traces) == (more[1], 2, 2)
        await record(conn, 3)
        backfill = await trigger_manual(conn, policy, "hq", load_settings(), clock(), backfill=True)
        assert (backfill.window_lo, backfill.n_traces, backfill.skipped_traces) == (more[3], 3, 0)
        assert [r.n_traces for r in await runs(conn)] == [3, 2, 2, 3]


def test_a_batch_larger_than_max_traces_is_refused() -> None:
    with pytest.raises(ValueError, match=r"trigger.batch.every \(50\) is larger than filters.max_traces \(10\)"):
        make_policy(fast=batch_gear(50, max_traces=10))


async def test_a_rejected_gear_backs_off_until_a_promotion_and_a_trickle_fires_after_max_wait(db_url: str) -> None:
    policy = make_policy(fast=batch_gear(2, min_interval="1h"),
                         trickle={"trigger": {"batch": {"every": 100, "max_wait": "2h"}}})
    clock = Clock(utc(2026, 5, 1, 0))

    async def fire(gear: str = "fast") -> str:
        return (await evaluate_gear(conn, policy, gear, now=clock(), catchup_window=DAY)).action

    async def gate(run_id: int, action: str) -> None:
        await conn.execute("UPDATE atlasd.runs SET state = 'running', started_at = now() WHERE id = %s", [run_id])
        await conn.execute("UPDATE atlasd.runs SET state = 'succeeded', finished_at = now() WHERE id = %s", [run_id])
        await conn.execute("""INSERT INTO atlasd.promotions (policy, registered_model, to_version, action, actor,
                                                             atlasd_run_id) VALUES ('p', 'm', %s, %s, 'atlasd', %s)""",
                           [str(run_id), action, run_id])

    async with await aconn(db_url) as conn:
        await record(conn, 2)
        assert await fire() == "enqueue"
        await gate((await runs(conn))[-1].id, "reject")
        await record(conn, 2)
        clock.now += timedelta(minutes=61)  # min_interval passed: 1 rejection waits 1 h
        assert await fire() == "enqueue"
        await gate((await runs(conn))[-1].id, "reject")
        await record(conn, 2)
        clock.now += timedelta(minutes=61)  # 2 rejections: 2 h
        held = await evaluate_gear(conn, policy, "fast", now=clock(), catchup_window=DAY, apply=False)
        assert held.action == "none" and "back-off after 2 gate rejections" in held.reason
        clock.now += timedelta(minutes=60)
        assert await fire() == "enqueue"
        await gate((await runs(conn))[-1].id, "promote")  # resets the back-off
        await record(conn, 2)
        clock.now += timedelta(minutes=61)
        assert await fire() == "enqueue"

        # a trickle gear (every 100) with 8 traces pending since 00:00: max_wait fires them 2 h later
        await conn.execute("UPDATE atlasd.intake SET approved_at = %s", [utc(2026, 5, 1, 0)])
        trickle = await evaluate_gear(conn, policy, "trickle", now=clock(), catchup_window=DAY, apply=False)
        assert trickle.action == "enqueue" and trickle.n_traces == 8, trickle.reason
        assert await fire("trickle") == "enqueue"
        seqs = await record(conn, 3)
        await conn.execute("UPDATE atlasd.intake SET approved_at = %s WHERE seq = ANY(%s)", [clock(), seqs])
        waiting = await evaluate_gear(conn, policy, "trickle", now=clock(), catchup_window=DAY, apply=False)
        assert waiting.action == "none" and "max_wait fires them at" in waiting.reason
