"""Helpers for the cadence and queue tests: policies from dicts, intake rows written the way the
daemon's intake writes them (one writer at a time), and an injectable clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from atlasd.policies import Policy

# the intake is written by the one daemon holding the database lock: seq order is commit order.
# Concurrent test writers take this lock around each insert to keep that guarantee.
INTAKE_WRITER_LOCK = 0x7465737401


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# A frozen eval split too small to hold any test row: counts are exact (the split's own tests set one).
NO_SPLIT = {"eval_fraction": 1e-12}


def make_policy(name: str = "p", learning_key: str | None = None, **gears: dict[str, Any]) -> Policy:
    gears = {g: {"eval": NO_SPLIT, **spec} for g, spec in gears.items()}
    return Policy.model_validate(
        {"name": name, "learning_key": learning_key, "teacher": "t", "student": "s", "gears": gears}
    )


def batch_gear(every: int, **filters: Any) -> dict[str, Any]:
    min_interval = filters.pop("min_interval", None)
    return {"trigger": {"batch": {"every": every, "min_interval": min_interval}}, "filters": filters}


def cron_gear(expr: str, timezone: str = "UTC", **filters: Any) -> dict[str, Any]:
    return {
        "trigger": {"cron": {"expr": expr, "timezone": timezone}},
        "filters": filters,
        "optim": {"max_steps": None, "num_train_epochs": 5},
    }


async def record(
    conn: psycopg.AsyncConnection,
    n: int = 1,
    *,
    key: str | None = "k",
    reward: float | None = 0.9,
    created_at: datetime | None = None,
    malformed: str | None = None,
    revoked: bool = False,
    task_key: str | None = None,
) -> list[int]:
    """Record ``n`` intake rows (one transaction); returns their seqs. Each row is its own task
    unless ``task_key`` names one for all of them."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [INTAKE_WRITER_LOCK])
        cur = await conn.execute(
            """INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at, malformed, revoked_at,
                                          task_key)
               SELECT id, %s, %s, COALESCE(%s, now()), %s, CASE WHEN %s THEN now() END, COALESCE(%s, 'task ' || id)
                 FROM (SELECT (SELECT COALESCE(max(session_id), 0) FROM atlasd.intake) + g AS id
                         FROM generate_series(1, %s) g) t
               RETURNING seq""",
            [key, reward, created_at, malformed, revoked, task_key, n],
        )
        return sorted(r[0] for r in await cur.fetchall())
