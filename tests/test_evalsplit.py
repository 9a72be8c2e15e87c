"""The frozen eval split (atlasd/evalsplit.py, migration 0009) and eligibility, end to end on a real
database: split by task, recorded per policy, refused when changed under a champion, reset by
`atlasd policies reset-eval`; a gear firing on N traces trains on those N."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from atlasd import evalsplit
from atlasd.cadence import evaluate_gear, plan_gear_sync
from atlasd.policies import Policy
from tests.traces import add_session, eval_split_ids
from trainers.dataset import build_dataset

DAY = timedelta(days=1)


def policy(eval_fraction: float = 0.3, every: int = 10, split_salt: str = "") -> Policy:
    return Policy.model_validate({
        "name": "p", "learning_key": "math", "teacher": "t", "student": "s",
        "gears": {"fast": {"trigger": {"batch": {"every": every}},
                           "filters": {"min_reward": 0.5, "rehearsal_fraction": 0.0, "examples": "last_turn"},
                           "eval": {"eval_fraction": eval_fraction, "split_salt": split_salt}}}})


def variants(task: str) -> list[str]:
    """The same task as agents write it twice: other white space, other case."""
    return [task, f"  {task.upper()} ", task.replace(" ", "\n  ")]


def test_a_task_run_several_times_falls_on_one_side_of_the_split(db_url: str, tmp_path) -> None:
    tasks = [f"Tom has {n} apples and buys 2 more. How many apples?" for n in range(40)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        by_task = {t: [add_session(conn, task=v, final_answer="x")[0] for v in variants(t)] for t in tasks}
        split = set(eval_split_ids(conn, "p", 0.3))
    sides = {t: {sid in split for sid in ids} for t, ids in by_task.items()}
    assert all(len(s) == 1 for s in sides.values())  # every run of a task on the same side
    assert {True, False} == {next(iter(s)) for s in sides.values()}  # and both sides hold tasks
    spec = policy().run_spec("fast", run_id=1, trigger="manual", window_lo=0, window_hi=10**9, student=None,
                             champion_version=None, output_dir=tmp_path, split_salt="p")
    spec.traces.db_url = db_url
    build = build_dataset(spec)
    task_of = {sid: t for t, ids in by_task.items() for sid in ids}
    eval_tasks = {task_of[e.session_id] for e in build.eval}
    train_tasks = {task_of[e.session_id] for e in build.train}
    assert eval_tasks and train_tasks and not eval_tasks & train_tasks


async def test_split_parameters_are_recorded_then_refused_while_a_champion_exists(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        first = await evalsplit.current(conn, policy(0.3))
        assert (first.generation, first.key_salt, first.eval_fraction) == (1, "p", 0.3)
        assert await evalsplit.current(conn, policy(0.3)) == first
        # no champion yet: a change is taken, in place
        assert (await evalsplit.current(conn, policy(0.2))).eval_fraction == 0.2
        await conn.execute("""INSERT INTO atlasd.promotions (policy, registered_model, to_version, action, actor)
                              VALUES ('p', 'p', '1', 'promote', 'atlasd')""")
        with pytest.raises(evalsplit.EvalSplitChanged) as refused:
            await evalsplit.current(conn, policy(0.1))
        assert "eval_fraction 0.2 -> 0.1" in str(refused.value) and "atlasd policies reset-eval p" in str(refused.value)
        with pytest.raises(evalsplit.EvalSplitChanged):
            await evalsplit.current(conn, policy(0.2, split_salt="other"))
        assert await evalsplit.current(conn, policy(0.2)) == evalsplit.EvalSplit("p", 1, "p", 0.2)

        # the cadence fires nothing meanwhile and says why (apply and plan alike)
        changed = policy(0.1, every=1)
        add = await conn.execute("""INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                                    VALUES ('t', 'succeeded', 'approved', '{"learning_key": "math"}',
                                            '{"score": 0.9}') RETURNING id""")
        sid = (await add.fetchone())[0]
        await conn.execute("""INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at,
                                                         task_key)
                              SELECT id, 'math', 0.9, created_at, atlasd.task_key(task) FROM sessions WHERE id = %s""",
                           [sid])
        now = datetime.now(UTC)
        plan = await evaluate_gear(conn, changed, "fast", now=now, catchup_window=DAY)
        assert plan.action == "none" and plan.reason.startswith("waits: policy 'p': the eval split changed")
        with psycopg.connect(db_url, autocommit=True) as sync:
            assert plan_gear_sync(sync, changed, "fast", now=now, catchup_window=DAY).reason == plan.reason

        # reset-eval: a new generation with the current parameters, a new salt
        reset = await evalsplit.reset(conn, changed, "alice")
        assert (reset.generation, reset.key_salt, reset.eval_fraction) == (2, "p#g2", 0.1)
        assert await evalsplit.current(conn, changed) == reset
        plan = await evaluate_gear(conn, changed, "fast", now=now, catchup_window=DAY)
        assert plan.action in ("enqueue", "none") and not plan.reason.startswith("waits:")
        rows = await (await conn.execute("SELECT generation, eval_fraction, reset_by FROM atlasd.eval_splits "
                                         "WHERE policy = 'p' ORDER BY generation")).fetchall()
        assert rows == [(1, 0.2, None), (2, 0.1, "alice")]


def test_the_gears_of_a_policy_share_one_split() -> None:
    with pytest.raises(ValueError, match="same eval.eval_fraction and eval.split_salt"):
        Policy.model_validate({"name": "p", "teacher": "t", "student": "s", "gears": {
            "fast": {"trigger": {"batch": {"every": 10}}, "eval": {"eval_fraction": 0.1}},
            "hq": {"trigger": {"batch": {"every": 10}}, "eval": {"eval_fraction": 0.2}}}})


async def test_a_gear_firing_on_n_traces_trains_on_those_n(db_url: str, tmp_path) -> None:
    """One eligibility definition: the cadence's count is the trainer's window, with filters and the
    eval split applied (some sessions below min_reward, some of another learning key, some malformed,
    ~30 % of the tasks in the split)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n in range(60):
            add_session(conn, task=f"Tom has {n} apples and buys 2 more. How many apples?", final_answer=str(n + 2),
                        reward=0.2 if n % 7 == 0 else 0.9, learning_key="code" if n % 11 == 0 else "math",
                        malformed="metadata is not a JSON object" if n % 13 == 0 else None)
    p = policy(0.3, every=5)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        plan = await evaluate_gear(conn, p, "fast", now=datetime.now(UTC), catchup_window=DAY)
        split = await evalsplit.current(conn, p)
    assert plan.action == "enqueue" and plan.n_traces >= 20
    spec = p.run_spec("fast", run_id=1, trigger=plan.trigger, window_lo=plan.window_lo, window_hi=plan.window_hi,
                      student=None, champion_version=None, output_dir=tmp_path, split_salt=split.key_salt)
    spec.traces.db_url = db_url
    build = build_dataset(spec)
    assert build.window_sessions == build.n_window == plan.n_traces  # last_turn: one example per session
    assert build.eval  # the split's sessions are measured, never trained on
