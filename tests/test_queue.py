"""The run queue against real Postgres: coalescing, priority, one running at most under races,
transitions, cancel, follow-ups."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from atlasd import queue


async def aconn(db_url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(db_url, autocommit=True)


async def add(conn, gear: str = "fast", trigger: str = "batch", lo: int = 0, hi: int = 5, priority: int = 0, **kw):
    return await queue.enqueue(
        conn, policy=kw.pop("policy", "p"), gear=gear, trigger=trigger, window_lo=lo, window_hi=hi,
        n_traces=hi - lo, priority=priority, coalesce=trigger == "batch", **kw
    )


async def test_batch_fires_coalesce_while_queued_and_cron_runs_never_merge(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        first = await add(conn, lo=0, hi=5)
        second = await add(conn, lo=5, hi=12)
        assert (first.coalesced, second.coalesced, second.run.id) == (False, True, first.run.id)
        assert (second.run.window_lo, second.run.window_hi, second.run.n_traces, second.run.coalesced) == (0, 12, 12, 1)
        crons = [await add(conn, gear="hq", trigger="cron", lo=0, hi=12, priority=10) for _ in range(2)]
        assert [c.coalesced for c in crons] == [False, False] and crons[0].run.id != crons[1].run.id
        # once the queued batch run is running, the next fire queues a new run
        assert (await queue.claim_next(conn)).id == crons[0].run.id  # cron first
        await queue.mark_succeeded(conn, crons[0].run.id)
        assert (await queue.claim_next(conn)).id == crons[1].run.id
        await queue.mark_succeeded(conn, crons[1].run.id)
        claimed = await queue.claim_next(conn)
        assert claimed.id == first.run.id and claimed.state == "running"
        third = await add(conn, lo=12, hi=20)
        assert not third.coalesced and third.run.window_lo == 12


async def test_coalescing_never_widens_a_run_that_was_claimed_concurrently(db_url: str) -> None:
    async with await aconn(db_url) as a, await aconn(db_url) as b:
        await add(a, lo=0, hi=5)
        for i in range(20):
            lo = 5 + 5 * i
            claimed, widened = await asyncio.gather(queue.claim_next(a), add(b, lo=lo, hi=lo + 5))
            if claimed is not None:
                # whatever the order, the claimed run's window is what it held when claimed
                after = await queue.get_run(a, claimed.id)
                assert after.window_hi == claimed.window_hi
                await queue.mark_succeeded(a, claimed.id)
        all_runs = sorted(await queue.list_runs(a, limit=100), key=lambda r: r.window_lo)
        assert all(x.window_hi == y.window_lo for x, y in zip(all_runs, all_runs[1:], strict=False))
        assert all_runs[-1].window_hi == 105 and sum(r.n_traces for r in all_runs) == 105


async def test_priority_cron_before_fast_then_oldest_first(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        fast = await add(conn, lo=0, hi=5)
        manual = await add(conn, gear="other", trigger="manual", lo=0, hi=3)
        hq1 = await add(conn, gear="hq", trigger="cron", priority=10)
        hq2 = await add(conn, gear="hq", trigger="catch-up", priority=10)
        order = []
        while (run := await queue.claim_next(conn)) is not None:
            order.append(run.id)
            await queue.mark_succeeded(conn, run.id)
        assert order == [hq1.run.id, hq2.run.id, fast.run.id, manual.run.id]


async def test_at_most_one_running_under_racing_claimers(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        for i in range(12):
            await add(conn, gear=f"g{i}", trigger="manual")
    conns = [await aconn(db_url) for _ in range(6)]
    try:
        for _round in range(12):
            claimed = [r for r in await asyncio.gather(*(queue.claim_next(c) for c in conns)) if r is not None]
            assert len(claimed) == 1
            counts = await queue.counts_by_state(conns[0])
            assert counts["running"] == 1
            await queue.mark_succeeded(conns[0], claimed[0].id)
        assert (await queue.counts_by_state(conns[0]))["succeeded"] == 12
    finally:
        for c in conns:
            await c.close()


async def test_the_database_refuses_a_second_running_run(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        a, b = await add(conn, gear="a", trigger="manual"), await add(conn, gear="b", trigger="manual")
        await conn.execute("UPDATE atlasd.runs SET state = 'running', started_at = now() WHERE id = %s", [a.run.id])
        with pytest.raises(psycopg.errors.UniqueViolation):
            await conn.execute("UPDATE atlasd.runs SET state = 'running', started_at = now() WHERE id = %s", [b.run.id])
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute("UPDATE atlasd.runs SET state = 'done' WHERE id = %s", [b.run.id])


async def test_transitions_and_what_they_record(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        run = (await add(conn, trigger="manual")).run
        with pytest.raises(queue.QueueError, match=r"cannot mark succeeded run 1: it is queued \(needs running\)"):
            await queue.mark_succeeded(conn, run.id)
        with pytest.raises(queue.QueueError, match="no run 999"):
            await queue.heartbeat(conn, 999)
        claimed = await queue.claim_next(conn)
        assert claimed.started_at is not None and claimed.heartbeat_at is not None
        await queue.record_process(
            conn, run.id, pid=123, pgid=123, host="gpu1", output_dir="/runs/1",
            spec={"run_id": 1}, champion_version="3",
        )
        beat = await queue.heartbeat(conn, run.id, {"step": 4, "loss": 0.5})
        assert (beat.pid, beat.spec, beat.champion_version, beat.metrics) == (123, {"run_id": 1}, "3", {"step": 4, "loss": 0.5})
        failed = await queue.mark_failed(conn, run.id, "exited with status 1: CUDA OOM", exit_code=1)
        assert (failed.state, failed.error, failed.exit_code, failed.finished_at is not None) == (
            "failed", "exited with status 1: CUDA OOM", 1, True)
        retry = await queue.enqueue_followup(conn, run.id, "retry")
        assert (retry.trigger, retry.attempt, retry.parent_run_id, retry.window_hi) == ("retry", 1, run.id, 5)
        await queue.claim_next(conn)
        interrupted = await queue.mark_interrupted(conn, retry.id, "daemon stopped (SIGTERM)", exit_code=75)
        resumed = await queue.enqueue_followup(conn, interrupted.id, "resume")
        assert (resumed.trigger, resumed.attempt) == ("resume", 2)
        with pytest.raises(queue.QueueError, match="it is queued"):
            await queue.enqueue_followup(conn, resumed.id, "retry")
        await queue.claim_next(conn)
        done = await queue.mark_succeeded(conn, resumed.id, result={"status": "succeeded", "steps": 3})
        assert (done.state, done.result, done.error) == ("succeeded", {"status": "succeeded", "steps": 3}, None)


async def test_cancel_queued_running_and_finished(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        queued = (await add(conn, gear="a", trigger="manual")).run
        running_id = (await add(conn, gear="b", trigger="manual", priority=5)).run.id
        assert (await queue.claim_next(conn)).id == running_id
        cancelled = await queue.cancel(conn, queued.id)
        assert (cancelled.state, cancelled.error) == ("cancelled", "cancelled by the operator")
        requested = await queue.cancel(conn, running_id)
        assert requested.state == "running" and requested.cancel_requested_at is not None
        assert (await queue.heartbeat(conn, running_id)).cancel_requested_at == requested.cancel_requested_at
        stopped = await queue.mark_cancelled(conn, running_id, "cancelled by the operator (SIGTERM sent)")
        assert stopped.state == "cancelled" and stopped.finished_at is not None
        with pytest.raises(queue.QueueError, match="already cancelled"):
            await queue.cancel(conn, running_id)
        with pytest.raises(queue.QueueError, match="no run 42"):
            await queue.cancel(conn, 42)


async def test_list_and_counts(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        await add(conn, policy="a", trigger="manual")
        await add(conn, policy="b", trigger="manual")
        assert [r.policy for r in await queue.list_runs(conn)] == ["b", "a"]
        assert [r.policy for r in await queue.list_runs(conn, policy="a")] == ["a"]
        assert await queue.list_runs(conn, states=["running"]) == []
        assert await queue.counts_by_state(conn) == {
            "queued": 2, "running": 0, "succeeded": 0, "failed": 0, "interrupted": 0, "cancelled": 0}


async def test_an_empty_window_is_refused_and_nothing_is_written(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        for trigger in ("cron", "manual", "batch"):
            with pytest.raises(queue.EmptyWindow, match=r"no new traces for p/fast in window \(7, 7\]"):
                await add(conn, trigger=trigger, lo=7, hi=7)
        queued = await add(conn, lo=0, hi=5)
        with pytest.raises(queue.EmptyWindow):  # nor widened by nothing
            await add(conn, lo=5, hi=5)
        assert [(r.id, r.window_hi, r.coalesced) for r in await queue.list_runs(conn)] == [(queued.run.id, 5, 0)]


async def test_a_deferred_start_goes_back_to_the_queue_without_spending_an_attempt(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        first = (await add(conn, gear="a", trigger="manual")).run
        other = (await add(conn, gear="b", trigger="manual")).run
        assert (await queue.claim_next(conn)).id == first.id
        back = await queue.defer(conn, first.id, "registry unavailable", 30)
        assert (back.id, back.state, back.attempt, back.deferrals, back.error) == (
            first.id, "queued", 0, 1, "registry unavailable")
        assert back.started_at is None and back.not_before is not None
        assert (await queue.claim_next(conn)).id == other.id  # the deferred run waits its turn
        await queue.mark_succeeded(conn, other.id)
        assert await queue.claim_next(conn) is None
        await conn.execute("UPDATE atlasd.runs SET not_before = now() - interval '1 s' WHERE id = %s", [first.id])
        claimed = await queue.claim_next(conn)
        assert (claimed.id, claimed.not_before, claimed.deferrals) == (first.id, None, 1)


async def test_a_deferred_batch_run_merges_into_the_batch_run_queued_meanwhile(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        first = (await add(conn, lo=0, hi=5)).run
        assert (await queue.claim_next(conn)).id == first.id
        later = (await add(conn, lo=5, hi=9)).run  # the gear fired while the first run was starting
        merged = await queue.defer(conn, first.id, "registry unavailable", 30)
        assert (merged.id, merged.window_lo, merged.window_hi, merged.n_traces, merged.coalesced, merged.deferrals) == (
            later.id, 0, 9, 9, 1, 1)
        assert merged.not_before is not None
        gone = await queue.get_run(conn, first.id)
        assert gone.state == "cancelled" and f"merged into queued run {later.id}" in gone.error


async def test_follow_ups_are_decided_with_the_outcome_or_later_and_reconcile_queries(db_url: str) -> None:
    async with await aconn(db_url) as conn:
        ids = [(await add(conn, gear=g, trigger="manual")).run.id for g in ("a", "b", "c")]
        for run_id, follow_up in zip(ids, ("retry", None, "none"), strict=True):
            await queue.claim_next(conn)
            beat = await queue.heartbeat(conn, run_id, {"step": 3}, progress_age_s=90)
            assert 85 < (beat.heartbeat_at - beat.progress_at).total_seconds() < 95
            assert (await queue.heartbeat(conn, run_id)).progress_at == beat.progress_at  # no age: unchanged
            await queue.mark_failed(conn, run_id, "boom", follow_up=follow_up)
        assert [r.id for r in await queue.undecided_runs(conn)] == [ids[1]]
        retry = await queue.decide_follow_up(conn, ids[1], "retry")
        assert (retry.parent_run_id, retry.trigger, retry.attempt) == (ids[1], "retry", 1)
        assert await queue.undecided_runs(conn) == []
        with pytest.raises(queue.QueueError, match=f"follow-up of run {ids[1]} is already decided: retry"):
            await queue.decide_follow_up(conn, ids[1], "none")
        with pytest.raises(queue.QueueError, match=r"it is queued \(needs failed or interrupted\)"):
            await queue.decide_follow_up(conn, retry.id, "none")
    async with await aconn(db_url) as conn:
        claimed = await queue.claim_next(conn)
        await queue.mark_succeeded(conn, claimed.id)
        assert [r.id for r in await queue.unregistered_runs(conn)] == [claimed.id]
        await conn.execute("""INSERT INTO atlasd.registrations (run_id, spec_path, result_path)
                              VALUES (%s, 's', 'r')""", [claimed.id])
        assert await queue.unregistered_runs(conn) == []
        await queue.record_reconcile(conn, 2)
        await queue.record_reconcile(conn, 0)
        cur = await conn.execute("SELECT repaired, last_repaired_at <= reconciled_at FROM atlasd.runner_state")
        assert await cur.fetchall() == [(2, True)]


async def test_status_shows_progress_deferrals_registrations_and_the_runner_reconcile(db_url: str) -> None:
    """Each fault the runner handles is visible in `atlasd status --json`: the running run's progress
    age, deferred starts, pending and failed registrations (with the command that re-queues), the last
    reconcile and undecided follow-ups."""
    from atlasd import promotions
    from atlasd.settings import Settings
    from atlasd.status import collect_status

    async with await aconn(db_url) as conn:
        deferred = (await add(conn, gear="hq", trigger="cron")).run
        await queue.claim_next(conn)
        await queue.defer(conn, deferred.id, "MLflow store unavailable", 600)
        done = (await add(conn, lo=5, hi=9)).run
        await queue.claim_next(conn)
        await queue.mark_succeeded(conn, done.id)
        await promotions.queue_registration(conn, done.id, "/x/spec.json", "/x/result.json", None)
        await conn.execute("UPDATE atlasd.registrations SET state = 'failed', attempts = 10, last_error = 'gone' "
                           "WHERE run_id = %s", (done.id,))
        running = (await add(conn, lo=9, hi=12)).run
        assert (await queue.claim_next(conn)).id == running.id
        await queue.heartbeat(conn, running.id, {"step": 3}, progress_age_s=42.0)
        await conn.execute("INSERT INTO atlasd.runner_state (reconciled_at) VALUES (now() - interval '7 seconds')")
    with psycopg.connect(db_url) as sync:
        status = collect_status(sync, Settings(db_url=db_url))
    assert status["training"]["running"]["run_id"] == running.id
    assert 41 <= status["training"]["running"]["progress_age_s"] < 60
    [d] = status["training"]["deferred"]
    assert (d["run_id"], d["deferrals"], d["error"]) == (deferred.id, 1, "MLflow store unavailable")
    regs = status["registrations"]
    assert (regs["pending"], regs["failed"]) == (0, 1) and regs["failed_runs"][0]["run_id"] == done.id
    assert any(f"atlasd register {done.id}" in p for p in status["problems"])
    assert 6 <= status["runner"]["reconcile_age_s"] < 60 and status["runner"]["undecided_follow_ups"] == 0
