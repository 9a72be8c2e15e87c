"""The intake reconciler: copies ready sessions into ``atlasd.intake``, each exactly once.

A session is *ready* when a reviewer approved it and its run succeeded (whichever became true
last): the SQL function ``atlasd.session_ready`` (migration 0008) is the rule's one definition. The tables are the truth and NOTIFY only a hint, so there are two paths:

* targeted: the listener's payload named some ids; look up only those, by primary key;
* full (at start, after each listener reconnect, on a ``'*'`` payload): every ready session not
  yet in the intake and every recorded one that stopped being ready, in short statements over
  ranges of ``ID_CHUNK`` session ids (a primary-key range scan each) and intake seqs: atlasd never
  holds ``sessions`` for long (the SDK's ``ALTER TABLE`` on connect would queue behind it, and
  every SDK statement behind that);
* the slow poll (every ``poll_interval_s``): the same, but over a :class:`RollingSweep`: the
  newest ``ID_CHUNK`` ids every time, older ones ``SWEEP_CHUNKS`` chunks per poll, wrapping
  around: its cost per poll stays bounded however long the history grows (a session approved
  while NOTIFY was missed is found within ``total ids / (ID_CHUNK x SWEEP_CHUNKS)`` polls; a
  deleted session is revoked as its range comes round).

There is no id watermark, so a session whose id commits out of order cannot be skipped. A
session is identified by ``(id, created_at)``: after the SDK's ids restart (``TRUNCATE ...
RESTART IDENTITY``, a restore) a new session with an old id is recorded as new, and the old row
is revoked (its session is gone). Every insert is ``ON CONFLICT DO NOTHING`` on that identity, so
duplicates are harmless. The
extraction of learning key and reward, and the classification of malformed rows, happen in SQL
(a 100k burst is a few statements). Transactions are short: the SDK locks ``sessions`` on connect.

Un-approval: a recorded session that stops being ready (quarantined, back to pending, no longer
succeeded, deleted) gets ``revoked_at``; it is cleared if the session becomes ready again. A
revoked row stays counted (cadence counts never go backwards) but training windows exclude it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from atlasd import lineage
from atlasd.db import iso

# The readiness rule over a `sessions s` row: the SQL function of migration 0008 (its one definition).
READY = "atlasd.session_ready(s.review_status, s.status)"

# Why a ready session cannot be trained on; NULL when it is usable. No session may fail the
# insert (that would fail its whole batch, every time): CASE evaluates in order, so the numeric
# cast only ever sees JSON numbers (numeric: any size), and what reaches the float8 column is 0 or
# a normal double in [0, 1] (1e-400 would underflow, 1e400 overflow); the learning key stays far
# below the btree row limit of intake_key_seq_idx (2704 bytes).
_MALFORMED = """CASE
    WHEN s.metadata IS NULL OR jsonb_typeof(s.metadata) <> 'object' THEN 'metadata is not a JSON object'
    WHEN jsonb_typeof(s.metadata -> 'learning_key') IS DISTINCT FROM 'string'
        THEN 'metadata.learning_key is missing or not a string'
    WHEN octet_length(s.metadata ->> 'learning_key') > 1000 THEN 'metadata.learning_key is over 1000 bytes'
    WHEN s.reward_stats IS NULL OR jsonb_typeof(s.reward_stats) <> 'object'
        THEN 'reward_stats is missing or not a JSON object'
    WHEN jsonb_typeof(s.reward_stats -> 'score') IS DISTINCT FROM 'number'
        THEN 'reward_stats.score is missing or not a JSON number'
    WHEN NOT ((s.reward_stats -> 'score')::numeric BETWEEN 0 AND 1) THEN 'reward_stats.score is outside [0, 1]'
    WHEN (s.reward_stats -> 'score')::numeric > 0 AND (s.reward_stats -> 'score')::numeric < 2.2250738585072014e-308
        THEN 'reward_stats.score is too small for a double (0 < score < 2.2e-308)'
END"""

_INSERT = sql.SQL(
    """WITH ready AS (
        SELECT s.id, s.created_at,
               CASE WHEN jsonb_typeof(s.metadata -> 'learning_key') = 'string'
                    THEN s.metadata ->> 'learning_key' END AS learning_key,
               {malformed} AS malformed,
               s.reward_stats, atlasd.task_key(s.task) AS task_key
          FROM public.sessions s
         WHERE {ready} AND {filter}
         LIMIT %(limit)s
    ), ins AS (
        INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at, malformed, task_key)
        SELECT id, learning_key,
               CASE WHEN malformed IS NULL THEN (reward_stats ->> 'score')::double precision END,
               created_at, malformed, task_key
          FROM ready ORDER BY id
        ON CONFLICT (session_id, session_created_at) DO NOTHING
        RETURNING session_id, malformed
    )
    SELECT (SELECT count(*) FROM ready),
           coalesce(sum(n), 0)::bigint,
           coalesce(jsonb_object_agg(malformed, n) FILTER (WHERE malformed IS NOT NULL), '{{}}'),
           coalesce(jsonb_object_agg(malformed, first_id) FILTER (WHERE malformed IS NOT NULL), '{{}}')
      FROM (SELECT malformed, count(*) AS n, min(session_id) AS first_id FROM ins GROUP BY malformed) g"""
)

# Driven from the intake side (a primary-key probe of `sessions` per row, whatever the planner's
# statistics): revoke rows whose session is no longer ready, restore revoked rows whose session is
# ready again.
_STILL_READY = ("EXISTS (SELECT 1 FROM public.sessions s"
                 " WHERE s.id = x.session_id AND s.created_at = x.session_created_at AND {ready})")
_CHANGED = sql.SQL("SELECT x.seq FROM atlasd.intake x WHERE {filter} AND (x.revoked_at IS NULL) <> " + _STILL_READY)
# then only the rows found above, by seq (unique) = ANY(...): the update is never planned as a hash
# join over the whole intake (on 10 M rows that made each 20,000-row range a full scan)
_REVOKE = sql.SQL(
    """WITH changed AS (
        UPDATE atlasd.intake i SET revoked_at = CASE WHEN c.ready THEN NULL ELSE now() END
          FROM (SELECT x.seq, """ + _STILL_READY + """ AS ready
                  FROM atlasd.intake x WHERE x.seq = ANY(%(seqs)s)) c
         WHERE i.seq = c.seq AND (i.revoked_at IS NULL) <> c.ready
        RETURNING c.ready, i.seq
    )
    SELECT count(*) FILTER (WHERE NOT ready), count(*) FILTER (WHERE ready),
           coalesce(array_agg(seq) FILTER (WHERE NOT ready), '{{}}') FROM changed"""
)


# The full path's anti-join (a hash anti-join over the intake); the targeted path instead probes
# the primary key through ON CONFLICT, which stays cheap however large the intake grows.
_UNRECORDED = sql.SQL(
    "s.id > %(lo)s AND s.id <= %(hi)s"
    " AND NOT EXISTS (SELECT 1 FROM atlasd.intake i WHERE i.session_id = s.id AND i.session_created_at = s.created_at)")
_SEQ_RANGE = sql.SQL("x.seq > %(lo)s AND x.seq <= %(hi)s")
_BOUNDS = """SELECT (SELECT COALESCE(min(id) - 1, 0) FROM public.sessions), (SELECT COALESCE(max(id), 0) FROM public.sessions),
                    (SELECT COALESCE(min(seq) - 1, 0) FROM atlasd.intake), (SELECT COALESCE(max(seq), 0) FROM atlasd.intake)"""

ID_CHUNK = 20_000  # session ids (or intake seqs) per statement of a full reconcile
SWEEP_CHUNKS = 2  # older chunks a slow poll covers (besides the newest one)


class RollingSweep:
    """Where the slow poll's sweep over old ids and seqs stands (the daemon keeps one)."""

    def __init__(self, chunks: int = SWEEP_CHUNKS) -> None:
        self.chunks = chunks
        self.next_id = 0  # sessions: the next poll starts above this id
        self.next_seq = 0  # intake: ... and above this seq

    def ranges(self, cursor: int, lo: int, hi: int) -> tuple[list[tuple[int, int]], int]:
        """The chunks of (lo, hi] this poll covers: the newest one, then ``chunks`` from ``cursor``
        on (wrapping to ``lo``); and where the next poll starts."""
        newest = (max(lo, hi - ID_CHUNK), hi)
        out = [newest]
        start = cursor if lo <= cursor < newest[0] else lo
        for _ in range(self.chunks):
            if start >= newest[0]:
                start = lo
                break
            end = min(start + ID_CHUNK, newest[0])
            out.append((start, end))
            start = end
        return out, start


@dataclass
class IntakeResult:
    recorded: int = 0  # usable sessions newly recorded
    malformed: int = 0  # malformed sessions newly recorded
    revoked: int = 0
    restored: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # malformed reason -> count
    examples: dict[str, int] = field(default_factory=dict)  # malformed reason -> one session id

    def add(self, other: IntakeResult) -> None:
        self.recorded += other.recorded
        self.malformed += other.malformed
        self.revoked += other.revoked
        self.restored += other.restored
        for reason, n in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n
            self.examples.setdefault(reason, other.examples[reason])

    @property
    def changed(self) -> bool:
        return bool(self.recorded or self.malformed or self.revoked or self.restored)


def parse_payload(payload: str) -> set[int] | None:
    """A NOTIFY payload as id hints: a set of ids, or None for "look at everything" ('*', empty
    or anything unparsable: a hint we cannot read must not hide work)."""
    try:
        ids = {int(part) for part in payload.split(",")}
    except ValueError:
        return None
    return ids or None


async def reconcile(conn: psycopg.AsyncConnection, ids: Iterable[int] | None, batch_size: int, *,
                    sweep: RollingSweep | None = None) -> IntakeResult:
    """Record ready sessions. ``ids=None``: every ready session not yet recorded and every revoked
    one (full; with ``sweep``, the part of the history this slow poll covers); otherwise only those
    ids (targeted). Each statement is short and its own transaction."""
    result = IntakeResult()
    if ids is None:
        async with conn.transaction():
            lo_id, hi_id, lo_seq, hi_seq = await (await conn.execute(_BOUNDS)).fetchone()
        if sweep is None:
            id_ranges = [(lo, min(lo + ID_CHUNK, hi_id)) for lo in range(lo_id, hi_id, ID_CHUNK)]
            seq_ranges = [(lo, min(lo + ID_CHUNK, hi_seq)) for lo in range(lo_seq, hi_seq, ID_CHUNK)]
        else:
            id_ranges, sweep.next_id = sweep.ranges(sweep.next_id, lo_id, hi_id)
            seq_ranges, sweep.next_seq = sweep.ranges(sweep.next_seq, lo_seq, hi_seq)
        for lo, hi in id_ranges:
            while True:
                batch, selected = await _insert_batch(conn, _UNRECORDED, {"lo": lo, "hi": hi}, batch_size)
                result.add(batch)
                if selected < batch_size:  # fewer unrecorded ready sessions in the range than the limit
                    break
        for lo, hi in seq_ranges:
            result.add(await _revocations(conn, _SEQ_RANGE, {"lo": lo, "hi": hi}))
        return result
    wanted = sorted(set(ids))
    for start in range(0, len(wanted), batch_size):
        chunk = {"ids": wanted[start : start + batch_size]}
        batch, _ = await _insert_batch(conn, sql.SQL("s.id = ANY(%(ids)s)"), chunk, batch_size)
        result.add(batch)
        result.add(await _revocations(conn, sql.SQL("x.session_id = ANY(%(ids)s)"), chunk))
    return result


async def _insert_batch(
    conn: psycopg.AsyncConnection, where: sql.Composable, params: dict, limit: int
) -> tuple[IntakeResult, int]:
    """One transaction: insert up to ``limit`` ready, unrecorded sessions; also return how many were selected."""
    query = _INSERT.format(malformed=sql.SQL(_MALFORMED), ready=sql.SQL(READY), filter=where)
    async with conn.transaction():
        cur = await conn.execute(query, {**params, "limit": limit})
        selected, inserted, reasons, examples = await cur.fetchone()
    malformed = sum(reasons.values())
    batch = IntakeResult(recorded=inserted - malformed, malformed=malformed, reasons=reasons, examples=examples)
    return batch, selected


async def _revocations(conn: psycopg.AsyncConnection, where: sql.Composable, params: dict) -> IntakeResult:
    """Revoke the recorded rows of ``where`` whose session stopped being ready, restore those ready
    again: find them, then update just those, and taint the runs that trained on the revoked ones
    (``atlasd.lineage.on_revoked``), in one short transaction."""
    async with conn.transaction():
        seqs = [row[0] for row in await (await conn.execute(
            _CHANGED.format(filter=where, ready=sql.SQL(READY)), params)).fetchall()]
        if not seqs:
            return IntakeResult()
        cur = await conn.execute(_REVOKE.format(ready=sql.SQL(READY)), {"seqs": seqs})
        revoked, restored, revoked_seqs = await cur.fetchone()
        if revoked_seqs:
            await lineage.on_revoked(conn, revoked_seqs)
    return IntakeResult(revoked=revoked, restored=restored)


POLL = "poll"


class Wakeup:
    """Coalesced reconcile requests: id hints accumulate until the reconciler takes them; a
    request for everything (None) absorbs them. Too many hints become a full reconcile."""

    def __init__(self, max_ids: int) -> None:
        self._max_ids = max_ids
        self._event = asyncio.Event()
        self._full = False
        self._ids: set[int] = set()

    def request(self, ids: Iterable[int] | None = None) -> None:
        if ids is None:
            self._full = True
        else:
            self._ids.update(ids)
            if len(self._ids) > self._max_ids:
                self._full = True
        self._event.set()

    async def wait(self, timeout: float) -> set[int] | None | str:
        """Wait for a request and take it: the ids to look at, or None for everything; after
        ``timeout`` with nothing requested, ``POLL`` (the slow poll: a rolling sweep)."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return POLL
        return self.take()

    def take(self) -> set[int] | None:
        full, ids = self._full, self._ids
        self._full, self._ids = False, set()
        self._event.clear()
        return None if full else ids


# ---------------------------------------------------------------- reads for other modules
# This module owns ``atlasd.intake``: every statement against it is here. Others compose these
# named subqueries into their own statement, or call the functions below.

# Eligibility, on an intake row ``i`` as recorded: the one definition of what a gear counts and
# what its run trains on (the trainer adds only that the session still exists and is still ready).
# Parameters: %(learning_key)s, %(min_reward)s, %(max_age_days)s, %(now)s, %(split_salt)s and
# %(split_threshold)s (atlasd.evalsplit.EvalSplit: key_salt, threshold).
USABLE = "(i.malformed IS NULL AND i.revoked_at IS NULL)"
KEY_OK = "(%(learning_key)s::text IS NULL OR i.learning_key = %(learning_key)s::text)"
REWARD_OK = "(COALESCE(i.reward_score, -1) >= %(min_reward)s)"  # no reward never passes
AGE_OK = ("(%(max_age_days)s::double precision IS NULL OR i.session_created_at >= %(now)s::timestamptz"
          " - make_interval(secs => %(max_age_days)s::double precision * 86400))")
SPLIT_HASH_BITS = 60  # atlasd.in_eval_split compares the first 60 bits of a sha256


def split_threshold(eval_fraction: float) -> int:
    """%(split_threshold)s for a policy's eval_fraction."""
    return int(eval_fraction * 2**SPLIT_HASH_BITS)


IN_EVAL_SPLIT = ("atlasd.in_eval_split(%(split_salt)s, i.learning_key, COALESCE(i.task_key, 'session:' || i.session_id),"
                 " %(split_threshold)s)")  # task_key NULL: a row recorded before 0009 whose session was gone
ELIGIBLE = f"({USABLE} AND {KEY_OK} AND {REWARD_OK} AND {AGE_OK} AND NOT {IN_EVAL_SPLIT})"

# The cadence's pending traces of a gear: eligible rows above its last window (%(lo)s), each with
# its rank in seq order (rn) and their count (n).
PENDING = f"""SELECT seq, approved_at, row_number() OVER (ORDER BY seq) AS rn, count(*) OVER () AS n
          FROM atlasd.intake i WHERE seq > %(lo)s AND {ELIGIBLE}"""

# The trainer's page: rows with seq in (%(after)s, %(upto)s], at most %(page)s of them, in seq order
# (bounded by the page, not by how many rows match), with what eligibility reads.
PAGE = """SELECT seq, session_id, session_created_at, malformed, revoked_at, learning_key, reward_score, task_key
          FROM atlasd.intake WHERE seq > %(after)s AND seq <= %(upto)s ORDER BY seq LIMIT %(page)s"""

BACKLOG_IDS = 100_000  # `backlog` counts ready, unrecorded sessions among the newest this many ids


def status_section(conn: psycopg.Connection) -> dict[str, Any]:
    """`atlasd status`'s intake section: counts per learning key and malformed reason, revoked,
    the backlog of ready sessions not yet recorded, the last record. Ends its read transaction
    (the SDK locks `sessions` on connect)."""
    groups = conn.execute(  # one pass over the intake (every metrics refresh runs this)
        """SELECT learning_key, malformed, revoked_at IS NOT NULL, count(*), max(seq), max(approved_at)
             FROM atlasd.intake GROUP BY 1, 2, 3"""
    ).fetchall()
    total = sum(g[3] for g in groups)
    malformed = sum(g[3] for g in groups if g[1] is not None)
    revoked = sum(g[3] for g in groups if g[2])
    last_seq = max((g[4] for g in groups), default=None)
    last_at = max((g[5] for g in groups), default=None)
    by_key, reasons = {}, {}
    for key, bad, _, n, _, _ in groups:
        if bad is None:
            by_key[key] = by_key.get(key, 0) + n
        else:
            reasons[bad] = reasons.get(bad, 0) + n
    backlog = conn.execute(  # among the newest BACKLOG_IDS sessions: a bounded primary-key range scan
        f"""SELECT count(*) FROM public.sessions s
            WHERE s.id > (SELECT COALESCE(max(id), 0) FROM public.sessions) - %s AND {READY}
              AND NOT EXISTS (SELECT 1 FROM atlasd.intake i
                               WHERE i.session_id = s.id AND i.session_created_at = s.created_at)""", [BACKLOG_IDS]
    ).fetchone()[0]
    conn.rollback()
    return {
        "total": total,
        "usable": total - malformed,
        "by_learning_key": dict(sorted(by_key.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))),
        "malformed": malformed,
        "malformed_reasons": dict(sorted(reasons.items())),
        "revoked": revoked,
        "backlog": backlog,
        "last_seq": last_seq,
        "last_recorded_at": iso(last_at),
    }


def revoked_session_ids(conn: psycopg.Connection) -> set[int]:
    """Ids of the recorded sessions that stopped being ready (their text is purged)."""
    return {row[0] for row in conn.execute(
        "SELECT DISTINCT session_id FROM atlasd.intake WHERE revoked_at IS NOT NULL").fetchall()}


def recorded_counts(conn: psycopg.Connection) -> tuple[int, int, dict[str, int]]:
    """(rows, malformed rows, malformed reason -> count) over the whole intake."""
    rows = conn.execute("SELECT malformed, count(*) FROM atlasd.intake GROUP BY 1").fetchall()
    reasons = {reason: n for reason, n in rows if reason is not None}
    return sum(n for _, n in rows), sum(reasons.values()), dict(sorted(reasons.items()))


async def newest_seq(conn: psycopg.AsyncConnection) -> int:
    """The newest intake seq (0 when nothing is recorded): the upper end of a window over all so far."""
    return (await (await conn.execute("SELECT COALESCE(max(seq), 0) FROM atlasd.intake")).fetchone())[0]


def is_recorded(conn: psycopg.Connection, session_id: int) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM atlasd.intake WHERE session_id = %s)",
                        [session_id]).fetchone()[0]


def unrecorded_ready(conn: psycopg.Connection) -> int:
    """Ready sessions with no intake row of their identity (the whole history: checks, not polls)."""
    return conn.execute(
        f"""SELECT count(*) FROM public.sessions s WHERE {READY}
              AND NOT EXISTS (SELECT 1 FROM atlasd.intake i
                               WHERE i.session_id = s.id AND i.session_created_at = s.created_at)""").fetchone()[0]
