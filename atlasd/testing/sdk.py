"""Writers that act as the Atlas SDK (asyncpg, one autocommit statement per write), for the
tests and the intake benchmark."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg


async def sdk_write_sessions(
    db_url: str,
    count: int,
    *,
    writers: int = 8,
    learning_keys: tuple[str, ...] = ("math", "code"),
    long_tx_every: int = 0,
    long_tx_hold_s: float = 0.3,
) -> dict[str, int]:
    """Write ``count`` ready sessions the way the SDK does, from ``writers`` concurrent
    connections. Half are auto-approved at insert and become ready when they succeed; the other
    half succeed first and are approved by a reviewer afterwards. Every ``long_tx_every``-th
    session of a writer is written inside a transaction held open for ``long_tx_hold_s``, so its
    (lower) id commits after higher ids. Returns the ids written and how many long transactions
    were overtaken by a higher committed id."""
    ids: list[int] = []
    overtaken = 0

    async def one(conn: asyncpg.Connection, n: int) -> int:
        key = learning_keys[n % len(learning_keys)]
        metadata = json.dumps({"learning_key": key, "agent": "demo"})
        reward = json.dumps({"score": (n % 100) / 100, "sample_count": 1})
        if n % 2 == 0:
            sid = await conn.fetchval(
                "INSERT INTO sessions (task, metadata, reward_stats, review_status) "
                "VALUES ($1, $2::jsonb, $3::jsonb, 'approved') RETURNING id",
                f"task {n}",
                metadata,
                reward,
            )
            await conn.execute(
                "UPDATE sessions SET status = 'succeeded', final_answer = '42', completed_at = now() WHERE id = $1", sid
            )
        else:
            sid = await conn.fetchval(
                "INSERT INTO sessions (task, metadata, reward_stats) VALUES ($1, $2::jsonb, $3::jsonb) RETURNING id",
                f"task {n}",
                metadata,
                reward,
            )
            await conn.execute(
                "UPDATE sessions SET status = 'succeeded', final_answer = '42', completed_at = now() WHERE id = $1", sid
            )
            await conn.execute("UPDATE sessions SET review_status = $1 WHERE id = $2", "approved", sid)
        return sid

    async def writer(w: int) -> None:
        nonlocal overtaken
        # synchronous_commit off: the same commit order and visibility, without an fsync per statement
        conn = await asyncpg.connect(db_url, server_settings={"synchronous_commit": "off"})
        try:
            for n in range(w, count, writers):
                if long_tx_every and (n // writers) % long_tx_every == 0:
                    async with conn.transaction():
                        sid = await one(conn, n)
                        await asyncio.sleep(long_tx_hold_s)
                        higher = await conn.fetchval(
                            "SELECT count(*) FROM sessions WHERE id > $1 AND status = 'succeeded'", sid
                        )
                    overtaken += higher > 0
                else:
                    sid = await one(conn, n)
                ids.append(sid)
        finally:
            await conn.close()

    await asyncio.gather(*(writer(w) for w in range(writers)))
    return {"written": len(ids), "distinct": len(set(ids)), "overtaken": overtaken}


async def write_session(conn: asyncpg.Connection, session: dict, *, metadata: Any, reward_stats: Any) -> int:
    """One session (``trainers.demo_models.sdk_session``'s content) the way the SDK stores it: each
    write its own autocommit statement; succeeded, not yet reviewed. Returns its id."""
    sid = await conn.fetchval(
        "INSERT INTO sessions (task, status, metadata) VALUES ($1, 'running', $2::jsonb) RETURNING id",
        session["task"], json.dumps(metadata))
    await conn.execute("INSERT INTO plans (session_id, plan) VALUES ($1, $2::jsonb)", sid, json.dumps(session["plan"]))
    for event in session["events"]:
        await conn.execute("INSERT INTO trajectory_events (session_id, event) VALUES ($1, $2::jsonb)",
                           sid, json.dumps(event))
    await conn.execute(
        "UPDATE sessions SET status = 'succeeded', final_answer = $2, reward = $3::jsonb, reward_stats = $4::jsonb, "
        "completed_at = now() WHERE id = $1",
        sid, session["final_answer"], json.dumps(session["reward"]),
        None if reward_stats is None else json.dumps(reward_stats))
    return sid
