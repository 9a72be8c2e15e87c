"""The intake reconciler against real Postgres: readiness, idempotence, batches, malformed rows
(poison values that must never fail a batch included), un-approval; and `atlasd status --json` on
what it recorded."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from atlasd import intake
from atlasd.cli import main
from atlasd.testing.pg import sql
from tests.traces import arithmetic_session

VALID_META = '{"learning_key": "math", "agent": "demo"}'
VALID_REWARD = '{"score": 0.75, "sample_count": 2}'


@pytest.fixture()
async def conn(db_url: str):
    async with await psycopg.AsyncConnection.connect(db_url) as c:
        yield c


def add_sessions(db_url: str, n: int, *, status: str = "succeeded", review: str = "approved",
                 metadata: str | None = VALID_META, reward_stats: str | None = VALID_REWARD) -> list[int]:
    with psycopg.connect(db_url, autocommit=True) as c:
        rows = c.execute(
            """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
               SELECT 't' || g, %s, %s, %s::jsonb, %s::jsonb FROM generate_series(1, %s) g RETURNING id""",
            [status, review, metadata, reward_stats, n],
        ).fetchall()
    return [r[0] for r in rows]


async def test_full_reconcile_records_only_ready_sessions_once(db_url: str, conn) -> None:
    ready = add_sessions(db_url, 40)
    add_sessions(db_url, 5, status="running")  # auto-approved, not finished yet
    add_sessions(db_url, 5, review="pending")
    add_sessions(db_url, 5, review="quarantined")
    add_sessions(db_url, 5, status="failed")

    result = await intake.reconcile(conn, None, batch_size=7)  # several batches
    assert (result.recorded, result.malformed, result.revoked) == (40, 0, 0)
    again = await intake.reconcile(conn, None, batch_size=7)
    assert not again.changed

    rows = sql(db_url, "SELECT session_id, learning_key, reward_score, session_created_at IS NOT NULL FROM atlasd.intake")
    assert sorted(r[0] for r in rows) == ready
    assert {(r[1], r[2], r[3]) for r in rows} == {("math", 0.75, True)}
    # seq is a gap-free recording order
    assert sql(db_url, "SELECT max(seq) - min(seq) + 1, count(*) FROM atlasd.intake") == [(40, 40)]


async def test_targeted_reconcile_follows_readiness_in_either_order(db_url: str, conn) -> None:
    [auto] = add_sessions(db_url, 1, status="running")  # approved first, succeeds later
    [reviewed] = add_sessions(db_url, 1, review="pending")  # succeeded first, approved later
    [other] = add_sessions(db_url, 1)  # ready, but not hinted

    hints = {auto, reviewed, 999_999}  # an unknown id is harmless
    assert not (await intake.reconcile(conn, hints, batch_size=100)).changed
    sql(db_url, "UPDATE sessions SET status = 'succeeded' WHERE id = %s", [auto])
    sql(db_url, "UPDATE sessions SET review_status = 'approved' WHERE id = %s", [reviewed])
    result = await intake.reconcile(conn, hints, batch_size=1)
    assert result.recorded == 2
    assert sorted(r[0] for r in sql(db_url, "SELECT session_id FROM atlasd.intake")) == sorted([auto, reviewed])
    # the full path picks up what no hint named
    assert (await intake.reconcile(conn, None, batch_size=100)).recorded == 1
    assert sql(db_url, "SELECT count(*) FROM atlasd.intake WHERE session_id = %s", [other]) == [(1,)]


MALFORMED = {
    "metadata is not a JSON object": ('["not", "an", "object"]', VALID_REWARD),
    "metadata.learning_key is missing or not a string": ('{"learning_key": 7}', VALID_REWARD),
    "reward_stats is missing or not a JSON object": (VALID_META, None),
    "reward_stats.score is missing or not a JSON number": (VALID_META, '{"score": "0.5"}'),
    "reward_stats.score is outside [0, 1]": (VALID_META, '{"score": 1.5}'),
}


async def test_malformed_rows_are_recorded_once_with_reasons(db_url: str, conn) -> None:
    valid = []
    for reason, (metadata, reward) in MALFORMED.items():
        valid += add_sessions(db_url, 100)
        add_sessions(db_url, 200, metadata=metadata, reward_stats=reward)
    add_sessions(db_url, 1, metadata=None)

    result = await intake.reconcile(conn, None, batch_size=333)
    assert result.recorded == len(valid)
    assert result.malformed == 1001
    assert result.reasons == {
        **{reason: 200 for reason in MALFORMED},
        "metadata is not a JSON object": 201,  # the array ones and the SQL NULL one
    }
    assert all(isinstance(i, int) for i in result.examples.values())
    assert not (await intake.reconcile(conn, None, batch_size=333)).changed  # recorded once, never again

    usable = sql(db_url, "SELECT count(*), count(reward_score) FROM atlasd.intake WHERE malformed IS NULL")
    assert usable == [(len(valid), len(valid))]
    assert sql(db_url, "SELECT count(*) FROM atlasd.intake WHERE malformed IS NOT NULL AND reward_score IS NOT NULL") == [(0,)]


async def test_unapproval_revokes_and_reapproval_restores_without_a_second_record(db_url: str, conn) -> None:
    [sid, keep] = add_sessions(db_url, 2)
    await intake.reconcile(conn, None, batch_size=10)
    [(seq,)] = sql(db_url, "SELECT seq FROM atlasd.intake WHERE session_id = %s", [sid])

    sql(db_url, "UPDATE sessions SET review_status = 'quarantined' WHERE id = %s", [sid])
    assert (await intake.reconcile(conn, {sid}, batch_size=10)).revoked == 1
    assert sql(db_url, "SELECT revoked_at IS NOT NULL FROM atlasd.intake WHERE session_id = %s", [sid]) == [(True,)]
    assert not (await intake.reconcile(conn, None, batch_size=10)).changed  # revoked once

    sql(db_url, "UPDATE sessions SET review_status = 'approved' WHERE id = %s", [sid])
    assert (await intake.reconcile(conn, None, batch_size=10)).restored == 1  # the full path sees it too
    assert sql(db_url, "SELECT seq, revoked_at FROM atlasd.intake WHERE session_id = %s", [sid]) == [(seq, None)]

    sql(db_url, "DELETE FROM sessions WHERE id = %s", [keep])  # the SDK deleted it: no longer ready
    assert (await intake.reconcile(conn, None, batch_size=10)).revoked == 1
    assert sql(db_url, "SELECT count(*) FROM atlasd.intake") == [(2,)]


def test_payload_hints() -> None:
    assert intake.parse_payload("3,1,3") == {1, 3}
    assert intake.parse_payload("*") is None
    assert intake.parse_payload("") is None
    assert intake.parse_payload("1,x") is None  # unreadable hint: look at everything


async def test_wakeup_coalesces_hints() -> None:
    wake = intake.Wakeup(max_ids=3)
    wake.request({1, 2})
    wake.request({2})
    assert await wake.wait(timeout=1) == {1, 2}
    assert await wake.wait(timeout=0.01) == intake.POLL  # nothing asked: the slow poll (a rolling sweep)
    wake.request({1, 2})
    wake.request({3, 4})  # more than max_ids: everything
    assert await wake.wait(timeout=1) is None
    wake.request({5})
    wake.request(None)
    assert wake.take() is None


def test_a_rolling_sweep_covers_the_newest_chunk_every_poll_and_the_rest_in_turn(monkeypatch) -> None:
    monkeypatch.setattr(intake, "ID_CHUNK", 10)
    sweep = intake.RollingSweep(chunks=2)
    seen = []
    for _ in range(4):
        ranges, sweep.next_id = sweep.ranges(sweep.next_id, 0, 55)
        seen.append(ranges)
    assert seen == [[(45, 55), (0, 10), (10, 20)], [(45, 55), (20, 30), (30, 40)], [(45, 55), (40, 45)],
                    [(45, 55), (0, 10), (10, 20)]]
    assert sweep.ranges(0, 0, 8)[0] == [(0, 8)]  # a short history: all of it every time
    assert sweep.ranges(0, 0, 0)[0] == [(0, 0)]


async def test_full_and_polled_reconciles_work_in_short_ranges(db_url: str, conn, monkeypatch) -> None:
    """A full reconcile covers every id range (statements over ID_CHUNK ids each); the slow poll
    covers the newest range and, in turn, the older ones: a session missed long ago is recorded
    within a sweep, and so is a revocation of a deleted session."""
    monkeypatch.setattr(intake, "ID_CHUNK", 10)
    ids = add_sessions(db_url, 95)
    assert (await intake.reconcile(conn, None, batch_size=4)).recorded == 95
    assert sql(db_url, "SELECT count(DISTINCT session_id) FROM atlasd.intake") == [(95,)]
    # old sessions approved without a NOTIFY reaching atlasd, one deleted: the newest range at once,
    # the others as the sweep comes round (1 older chunk per poll here)
    sql(db_url, "DELETE FROM atlasd.intake WHERE session_id = ANY(%s)", [[ids[3], ids[50], ids[94]]])
    sql(db_url, "DELETE FROM sessions WHERE id = %s", [ids[20]])
    sweep = intake.RollingSweep(chunks=1)
    first = await intake.reconcile(conn, None, batch_size=4, sweep=sweep)
    assert first.recorded == 2  # ids[94] in the newest range, ids[3] in the first older one
    total = first
    for _ in range(10):
        total.add(await intake.reconcile(conn, None, batch_size=4, sweep=sweep))
    assert (total.recorded, total.revoked) == (3, 1)
    assert sql(db_url, "SELECT count(*) FROM atlasd.intake WHERE revoked_at IS NULL") == [(94,)]


def test_status_json_counts_the_intake(db_url: str, tmp_path, monkeypatch, capsys) -> None:
    async def reconcile_all() -> None:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            await intake.reconcile(conn, None, batch_size=100)

    add_sessions(db_url, 3)
    add_sessions(db_url, 2, metadata='{"learning_key": "code"}')
    add_sessions(db_url, 1, reward_stats=None)
    [revoked] = add_sessions(db_url, 1)
    asyncio.run(reconcile_all())
    sql(db_url, "UPDATE sessions SET review_status = 'pending' WHERE id = %s", [revoked])
    asyncio.run(reconcile_all())
    add_sessions(db_url, 4)  # ready, not yet recorded

    monkeypatch.setenv("ATLASD_DB_URL", db_url)
    monkeypatch.setenv("ATLASD_POLICIES_DIR", str(tmp_path))
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["intake"] | {"last_recorded_at": None} == {
        "total": 7,
        "usable": 6,
        "by_learning_key": {"math": 4, "code": 2},
        "malformed": 1,
        "malformed_reasons": {"reward_stats is missing or not a JSON object": 1},
        "revoked": 1,
        "backlog": 4,
        "last_seq": 7,
        "last_recorded_at": None,
    }
    assert status["listener"]["connected"] is False  # no daemon
    assert status["daemon"]["running"] is False

    assert main(["status"]) == 0
    table = capsys.readouterr().out
    assert "by_learning_key:" in table and "backlog" in table


# reward_stats / learning keys that once failed the whole batch (and so every later one), as raw JSON
TOO_SMALL = "reward_stats.score is too small for a double (0 < score < 2.2e-308)"
POISON = {
    '{"score": 1e-400}': TOO_SMALL,
    '{"score": 0.' + "0" * 330 + '1}': TOO_SMALL,
    '{"score": 5e-324}': TOO_SMALL,  # a subnormal: Postgres would take it, a reward it is not
    '{"score": -1e-400}': "reward_stats.score is outside [0, 1]",
    '{"score": 1e400}': "reward_stats.score is outside [0, 1]",
    '{"score": ' + "9" * 5000 + "}": "reward_stats.score is outside [0, 1]",
    '{"score": "NaN"}': "reward_stats.score is missing or not a JSON number",
    '{"score": "1e-400"}': "reward_stats.score is missing or not a JSON number",
    '{"score": true}': "reward_stats.score is missing or not a JSON number",
    '{"score": {"value": 0.5}}': "reward_stats.score is missing or not a JSON number",
}


async def test_poison_values_are_malformed_and_never_fail_the_batch(db_url: str, conn) -> None:
    # the stand-in SDK schema indexes the score as float8, which refuses these values at insert;
    # the Atlas SDK's own schema has no such index, so they can reach the sessions table
    sql(db_url, "DROP INDEX sessions_reward_score_idx")
    good, bad = [], {}
    with psycopg.connect(db_url, autocommit=True) as c:
        for n, (reward_stats, reason) in enumerate(POISON.items()):
            good.append(arithmetic_session(c, n, 1, intake=False)[0])
            sid, _ = arithmetic_session(c, n, 2, intake=False)
            c.execute("UPDATE sessions SET reward_stats = %s::jsonb WHERE id = %s", [reward_stats, sid])
            bad[sid] = reason
        # fits the SDK's index on metadata->>'learning_key', not intake's (learning_key, seq) row
        long_key = "".join(f"{i:x}" for i in range(1000))[:2690]
        sid, _ = arithmetic_session(c, 99, 1, intake=False, learning_key=long_key)
        bad[sid] = "metadata.learning_key is over 1000 bytes"
        good.append(arithmetic_session(c, 100, 1, intake=False, reward=0.0)[0])  # 0 is a valid score
        good.append(arithmetic_session(c, 101, 1, intake=False, reward=2.2250738585072014e-308)[0])

    result = await intake.reconcile(conn, None, batch_size=4)  # every batch holds poison
    assert (result.recorded, result.malformed) == (len(good), len(bad))
    recorded = dict(sql(db_url, "SELECT session_id, malformed FROM atlasd.intake"))
    assert recorded == {**{sid: None for sid in good}, **bad}
    assert sql(db_url, "SELECT count(*) FROM atlasd.intake WHERE malformed IS NULL AND reward_score IS NULL") == [(0,)]

    # the targeted path (a NOTIFY naming the ids) classifies the same way, one batch for all
    with psycopg.connect(db_url, autocommit=True) as c:
        later = [arithmetic_session(c, 200, 1, intake=False)[0] for _ in range(2)]
        c.execute("UPDATE sessions SET reward_stats = '{\"score\": 1e-400}' WHERE id = %s", [later[0]])
    result = await intake.reconcile(conn, set(later), batch_size=100)
    assert (result.recorded, result.malformed) == (1, 1)


async def test_sessions_reusing_old_ids_are_recorded_as_new(db_url: str, conn) -> None:
    """The SDK's ids restart (TRUNCATE ... RESTART IDENTITY, a restore): each new session with an
    old id is recorded (identity = id + created_at), by the targeted and the full path, and the
    old rows are revoked (their sessions are gone); the trainer reads the new sessions only."""
    from tests.test_dataset import make_spec
    from trainers.dataset import build_dataset

    first = add_sessions(db_url, 15)
    assert (await intake.reconcile(conn, None, batch_size=100)).recorded == 15
    sql(db_url, "TRUNCATE sessions RESTART IDENTITY CASCADE")
    with psycopg.connect(db_url, autocommit=True) as c:
        again = [arithmetic_session(c, i, 1, intake=False)[0] for i in range(15)]
    assert again == first  # the same ids, other sessions
    targeted = await intake.reconcile(conn, again[:10], batch_size=100)
    assert (targeted.recorded, targeted.revoked) == (10, 10)
    full = await intake.reconcile(conn, None, batch_size=100)
    assert (full.recorded, full.revoked) == (5, 5)
    assert sql(db_url, "SELECT count(*), count(revoked_at), count(DISTINCT session_id) FROM atlasd.intake") == [(30, 15, 15)]
    build = build_dataset(make_spec(db_url, window_lo=0, window_hi=30))
    examples = build.train + build.eval
    assert sorted(e.session_id for e in examples) == again
    assert all(e.prompt[0]["content"].startswith("Task: Tom has") for e in examples), examples[0].prompt
    assert build.skipped["revoked"] == 15


def test_the_sdks_alter_on_connect_never_waits_on_a_full_reconcile_or_a_status_read(db_url: str, tmp_path) -> None:
    """The Atlas SDK runs `ALTER TABLE sessions ADD COLUMN IF NOT EXISTS` on every connect (an ACCESS
    EXCLUSIVE lock). With 200,000 sessions recorded, a full reconcile (the start-up's, a
    reconnect's) and `atlasd status` (every metrics refresh) run while an SDK-like client
    connects every 100 ms with lock_timeout 1 s: none of its ALTERs times out."""
    import threading
    import time as _time

    from atlasd.settings import load_settings
    from atlasd.status import collect_status

    sql(db_url, """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                   SELECT 't' || g, 'succeeded', 'approved', '{"learning_key": "math"}', '{"score": 0.9}'
                     FROM generate_series(1, 200000) g""")

    async def full() -> intake.IntakeResult:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
            return await intake.reconcile(c, None, batch_size=5000)

    assert asyncio.run(full()).recorded == 200_000
    sql(db_url, "UPDATE sessions SET review_status = 'quarantined' WHERE id % 1000 = 0")  # 200 to revoke, unhinted
    stop, failures, alters = threading.Event(), [], []

    def sdk_client() -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(db_url, autocommit=True) as c:
                    t = _time.monotonic()
                    c.execute("SET lock_timeout = '1s'")
                    c.execute("ALTER TABLE sessions ADD COLUMN IF NOT EXISTS sdk_probe INTEGER")
                    alters.append(_time.monotonic() - t)
            except psycopg.errors.LockNotAvailable as exc:
                failures.append(str(exc))
            _time.sleep(0.1)

    client = threading.Thread(target=sdk_client)
    client.start()
    try:
        t0 = _time.monotonic()
        result = asyncio.run(full())
        with psycopg.connect(db_url, autocommit=True) as c:
            status = collect_status(c, load_settings(db_url=db_url, policies_dir=tmp_path, state_dir=tmp_path))
        elapsed = _time.monotonic() - t0
    finally:
        stop.set()
        client.join()
    assert (result.recorded, result.revoked) == (0, 200)
    assert status["intake"]["revoked"] == 200
    assert failures == [] and len(alters) >= min(5, int(elapsed / 0.2)), (failures, len(alters), elapsed)
    assert max(alters) < 1.0
