"""Lineage and taint: which sessions each run trained on, and the runs (so the model versions)
that learned from a session revoked since. Owner of ``atlasd.run_sessions`` and ``atlasd.lineage``
(migration 0010).

- The trainer snapshots its training set to ``data/train.jsonl`` and, beside it, the manifest
  ``data/train.manifest.json`` (``trainers.dataset.save_examples``): every trained-on session
  (window and rehearsal) by intake seq, session id and creation time, and a hash of them.
- The runner, in the transaction that records a run succeeded, calls :func:`record` with the
  manifest (:func:`read_manifest`): one row per session (at most ``filters.max_traces`` plus the
  rehearsal sample, inserted ``CHUNK`` at a time) and the run's lineage row, counting the sessions
  already revoked by then. A run without a manifest (trained before lineage existed) has no
  lineage and is never tainted.
- The intake, in the transaction that revokes rows, calls :func:`on_revoked`: the trained-on rows
  among them are marked (once: a re-approval does not clear it) and each affected run's ``revoked``
  count grows. Both take the lineage lock (a transaction-level advisory lock) before they read what
  the other writes, so a revocation racing a run's recording is counted by one of the two.
- A registration passes :func:`revoked_count` to the gate (check ``untainted``: never promoted).
- The taint tagger (``atlasd.promotions.TaintTagger``) tags each registered version whose count grew
  (:func:`due`, then :func:`tagged`, or :func:`tag_failed`: retried with backoff); when a run is
  first tagged, :func:`tagged` queues a clean retrain of its window if its policy says
  ``on_taint: retrain`` (a manual run of the same gear and window: revoked rows are not eligible).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from atlasd import queue
from atlasd.db import iso
from atlasd.runspec import manifest_path

if TYPE_CHECKING:
    from atlasd.policies import Policy

LOCK_CLASS = 0x61746C6E  # pg_advisory_xact_lock(LOCK_CLASS, 0): recording a run's lineage vs. a revocation
CHUNK = 5_000  # run_sessions rows per statement
TAG_RETRY_FIRST_S = 30  # a failed tag is retried after this, doubling
TAG_RETRY_MAX_S = 3600


@dataclass(frozen=True)
class Manifest:
    hash: str
    sessions: list[tuple[int, int, str | None]]  # (intake seq, session id, session created_at as ISO 8601)


@dataclass(frozen=True)
class Due:
    """A registered version whose ``atlasd.tainted`` tag is behind its run's revoked count."""

    run_id: int
    policy: str
    gear: str
    window_lo: int
    window_hi: int
    registered_model: str
    model_version: str
    revoked: int
    tagged: int
    attempts: int


def read_manifest(run_dir: Path) -> Manifest | None:
    """The training manifest the trainer left in ``run_dir`` (None: none, a run of an older trainer).
    Raises ValueError or OSError when it cannot be read."""
    path = manifest_path(run_dir / "data" / "train.jsonl")
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Manifest(hash=str(data["hash"]), sessions=[(int(s["seq"]), int(s["session_id"]), s["session_created_at"])
                                                      for s in data["sessions"]])


async def _lock(conn: psycopg.AsyncConnection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", [LOCK_CLASS])


async def record(conn: psycopg.AsyncConnection, run_id: int, manifest: Manifest) -> int:
    """In the caller's transaction: the run's trained-on sessions and its lineage row (once; a
    repeated call changes nothing). Returns how many of them are revoked already."""
    await _lock(conn)
    for start in range(0, len(manifest.sessions), CHUNK):
        part = manifest.sessions[start:start + CHUNK]
        seqs = [s[0] for s in part]
        await conn.execute(
            """INSERT INTO atlasd.run_sessions (run_id, seq, session_id, session_created_at)
               SELECT %s, * FROM unnest(%s::bigint[], %s::bigint[], %s::timestamptz[]) ON CONFLICT DO NOTHING""",
            [run_id, seqs, [s[1] for s in part], [s[2] for s in part]])
        await conn.execute(  # revoked before the run was recorded (maybe while it trained)
            """UPDATE atlasd.run_sessions rs SET revoked_at = i.revoked_at FROM atlasd.intake i
                WHERE rs.run_id = %s AND rs.seq = ANY(%s) AND i.seq = ANY(%s) AND i.seq = rs.seq
                  AND i.revoked_at IS NOT NULL AND rs.revoked_at IS NULL""", [run_id, seqs, seqs])
    await conn.execute(
        """INSERT INTO atlasd.lineage (run_id, manifest_hash, sessions, revoked, tainted_at)
           SELECT %(run)s, %(hash)s, count(*), count(revoked_at), CASE WHEN count(revoked_at) > 0 THEN now() END
             FROM atlasd.run_sessions WHERE run_id = %(run)s
           ON CONFLICT (run_id) DO NOTHING""", {"run": run_id, "hash": manifest.hash})
    return await revoked_count(conn, run_id) or 0


async def on_revoked(conn: psycopg.AsyncConnection, seqs: list[int]) -> list[int]:
    """In the intake's transaction that revoked the rows ``seqs``: mark them where runs trained on
    them and count them on those runs (due for tagging now). Returns the runs newly tainted by them."""
    await _lock(conn)
    cur = await conn.execute(
        """WITH hit AS (UPDATE atlasd.run_sessions SET revoked_at = now()
                         WHERE seq = ANY(%s) AND revoked_at IS NULL RETURNING run_id),
                n AS (SELECT run_id, count(*) AS n FROM hit GROUP BY run_id)
           UPDATE atlasd.lineage l SET revoked = l.revoked + n.n, tainted_at = COALESCE(l.tainted_at, now()),
                  next_attempt_at = now(), attempts = 0
             FROM n WHERE l.run_id = n.run_id
           RETURNING l.run_id""", [seqs])
    return sorted(row[0] for row in await cur.fetchall())


async def revoked_count(conn: psycopg.AsyncConnection, run_id: int) -> int | None:
    """How many of the run's trained-on sessions are revoked (None: no lineage recorded)."""
    row = await (await conn.execute("SELECT revoked FROM atlasd.lineage WHERE run_id = %s", [run_id])).fetchone()
    return row[0] if row else None


async def due(conn: psycopg.AsyncConnection) -> list[Due]:
    """Registered versions whose tag is behind their run's revoked count and due for an attempt."""
    cur = await conn.execute(
        """SELECT l.run_id, r.policy, r.gear, r.window_lo, r.window_hi, r.spec -> 'mlflow' ->> 'registered_model',
                  r.model_version, l.revoked, l.tagged, l.attempts
             FROM atlasd.lineage l JOIN atlasd.runs r ON r.id = l.run_id
            WHERE l.revoked > l.tagged AND l.next_attempt_at <= now() AND r.model_version IS NOT NULL
            ORDER BY l.run_id""")
    return [Due(*row) for row in await cur.fetchall()]


async def tagged(conn: psycopg.AsyncConnection, item: Due, policy: Policy | None) -> int | None:
    """The version now carries ``atlasd.tainted`` = ``item.revoked``. On the run's first tag, with
    ``policy.on_taint == "retrain"``: queue a clean retrain of its window (same transaction).
    Returns the retrain's run id, or None (not asked for, or nothing of the window left to train on)."""
    async with conn.transaction():
        cur = await conn.execute("SELECT tagged FROM atlasd.lineage WHERE run_id = %s FOR UPDATE", [item.run_id])
        (before,) = await cur.fetchone()
        await conn.execute(
            """UPDATE atlasd.lineage SET tagged = GREATEST(tagged, %s), attempts = 0, last_error = NULL
                WHERE run_id = %s""", [item.revoked, item.run_id])
        if before or policy is None or policy.on_taint != "retrain" or item.gear not in policy.gears:
            return None
        cur = await conn.execute(  # the window's trained-on sessions still usable
            """SELECT count(*) FROM atlasd.run_sessions
                WHERE run_id = %s AND seq > %s AND seq <= %s AND revoked_at IS NULL""",
            [item.run_id, item.window_lo, item.window_hi])
        try:
            retrain = await queue.enqueue(
                conn, policy=item.policy, gear=item.gear, trigger="manual", window_lo=item.window_lo,
                window_hi=item.window_hi, n_traces=(await cur.fetchone())[0], priority=policy.gears[item.gear].priority)
        except queue.EmptyWindow:
            return None
        await conn.execute("UPDATE atlasd.lineage SET retrain_run_id = %s WHERE run_id = %s",
                           [retrain.run.id, item.run_id])
        return retrain.run.id


async def tag_failed(conn: psycopg.AsyncConnection, run_id: int, attempts: int, error: str) -> float:
    """The tag could not be written: retried after a backoff (returned, seconds), never given up."""
    delay = min(TAG_RETRY_FIRST_S * 2 ** min(attempts - 1, 16), TAG_RETRY_MAX_S)
    await conn.execute(
        """UPDATE atlasd.lineage SET attempts = %s, last_error = %s, next_attempt_at = now() + make_interval(secs => %s)
            WHERE run_id = %s""", [attempts, error[:4000], delay, run_id])
    return delay


# ---------------------------------------------------------------- status (synchronous: `atlasd status`)
def status_section(conn: psycopg.Connection) -> dict[str, Any]:
    """Runs with lineage, and every tainted one: its version, revoked count, what the tag says, the
    retrain queued for it and the tag's last error."""
    recorded, pending = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE revoked > tagged) FROM atlasd.lineage").fetchone()
    rows = conn.execute(
        """SELECT l.run_id, r.policy, r.model_version, l.revoked, l.tagged, l.retrain_run_id, l.tainted_at, l.last_error
             FROM atlasd.lineage l JOIN atlasd.runs r ON r.id = l.run_id
            WHERE l.revoked > 0 ORDER BY l.run_id""").fetchall()
    conn.rollback()
    keys = ("run_id", "policy", "model_version", "revoked", "tagged", "retrain_run_id", "tainted_at", "last_error")
    tainted = [dict(zip(keys, row, strict=True)) for row in rows]
    for t in tainted:
        t["tainted_at"] = iso(t["tainted_at"])
    return {"runs_recorded": recorded, "pending_tags": pending, "tainted": tainted}
