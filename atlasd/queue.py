"""The run queue (``atlasd.runs``): one GPU slot, runs claimed in priority order.

States: ``queued -> running -> succeeded | failed | interrupted``; ``queued | running -> cancelled``;
``running -> queued`` when a start is deferred (:func:`defer`).
The database enforces at most one ``running`` row (partial unique index ``runs_one_running``)
and at most one queued batch-triggered run per policy and gear (``runs_one_queued_batch``), so
no race between callers can break either rule. A run is never queued without new traces
(:class:`EmptyWindow`).

A failed or interrupted run records its ``follow_up`` (``retry``, ``resume``, ``none``) in the
transaction that writes its outcome, together with the follow-up run itself; NULL means
undecided (see :func:`undecided_runs`).

Every function takes a ``psycopg.AsyncConnection`` and runs in its own transaction (a savepoint
when the caller already has one open). The daemon's runner calls them from its asyncio loop;
CLI commands call them through ``asyncio.run``. Times are the database's ``now()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from atlasd.db import iso
from atlasd.runspec import TriggerSource
from atlasd.slurm import executor_info

# A run's state (``atlasd.runs.state``; the table's CHECK lists the same, tests/test_structure.py
# keeps them equal).
State = Literal["queued", "running", "succeeded", "failed", "interrupted", "cancelled"]
FollowUp = Literal["retry", "resume", "none"]
STATES: tuple[str, ...] = get_args(State)
FINAL_STATES = frozenset({"succeeded", "failed", "interrupted", "cancelled"})


class Run(BaseModel):
    """One row of ``atlasd.runs``."""

    id: int
    policy: str
    gear: str
    state: State
    trigger: TriggerSource
    priority: int
    window_lo: int
    window_hi: int
    n_traces: int
    coalesced: int
    scheduled_for: datetime | None
    attempt: int
    parent_run_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    pid: int | None
    pgid: int | None
    host: str | None
    output_dir: str | None
    spec: dict[str, Any] | None
    champion_version: str | None
    metrics: dict[str, Any] | None
    result: dict[str, Any] | None
    exit_code: int | None
    error: str | None
    cancel_requested_at: datetime | None
    model_version: str | None
    registered_at: datetime | None
    progress_at: datetime | None
    not_before: datetime | None
    deferrals: int
    follow_up: FollowUp | None


class QueueError(ValueError):
    """A queue operation that does not apply to this run (unknown id, wrong state); safe to show."""


class EmptyWindow(QueueError):
    """Refused: the window holds no new trace that passes the gear's filters (nothing to train on)."""


@dataclass(frozen=True)
class Enqueued:
    run: Run
    coalesced: bool  # True: an existing queued run was widened instead of adding one


_COLUMNS = ", ".join(Run.model_fields)

# A queued batch-triggered run of the same gear absorbs the new window (fast-gear coalescing).
_WIDEN = f"""
UPDATE atlasd.runs
   SET window_hi = GREATEST(window_hi, %(window_hi)s), n_traces = n_traces + %(n_traces)s, coalesced = coalesced + 1
 WHERE policy = %(policy)s AND gear = %(gear)s AND state = 'queued' AND trigger = 'batch'
RETURNING {_COLUMNS}"""

_INSERT = f"""
INSERT INTO atlasd.runs (policy, gear, trigger, priority, window_lo, window_hi, n_traces, scheduled_for)
VALUES (%(policy)s, %(gear)s, %(trigger)s, %(priority)s, %(window_lo)s, %(window_hi)s, %(n_traces)s,
        %(scheduled_for)s)
RETURNING {_COLUMNS}"""

_FOLLOWUP = f"""
INSERT INTO atlasd.runs (policy, gear, trigger, priority, window_lo, window_hi, n_traces, scheduled_for,
                         attempt, parent_run_id)
SELECT policy, gear, %(trigger)s, priority, window_lo, window_hi, n_traces, scheduled_for, attempt + 1, id
  FROM atlasd.runs WHERE id = %(id)s AND state IN ('failed', 'interrupted')
RETURNING {_COLUMNS}"""

# Highest priority first, then oldest, skipping deferred runs; SKIP LOCKED lets concurrent claimers
# pass each other, and the unique index turns a second concurrent claim into a UniqueViolation (caught: None).
_CLAIM = f"""
UPDATE atlasd.runs
   SET state = 'running', started_at = now(), heartbeat_at = now(), progress_at = now(), not_before = NULL
 WHERE state = 'queued' AND id = (
       SELECT id FROM atlasd.runs
        WHERE state = 'queued' AND (not_before IS NULL OR not_before <= now())
          AND NOT EXISTS (SELECT 1 FROM atlasd.runs r WHERE r.state = 'running')
        ORDER BY priority DESC, id
        LIMIT 1
          FOR UPDATE SKIP LOCKED)
RETURNING {_COLUMNS}"""

# Back to the queue, not before now() + delay; the attempt is unchanged (no retry spent).
_DEFER = f"""
UPDATE atlasd.runs
   SET state = 'queued', started_at = NULL, heartbeat_at = NULL, progress_at = NULL, pid = NULL, pgid = NULL,
       host = NULL, not_before = now() + make_interval(secs => %(delay_s)s), deferrals = deferrals + 1,
       error = %(error)s
 WHERE id = %(id)s AND state = 'running'
RETURNING {_COLUMNS}"""

# A deferred batch run whose gear queued a new batch run meanwhile: the queued one takes its window
# (the windows are adjacent: the cadence advanced past this one) and its deferral.
_MERGE_DEFERRED = f"""
UPDATE atlasd.runs q
   SET window_lo = LEAST(q.window_lo, r.window_lo), n_traces = q.n_traces + r.n_traces,
       coalesced = q.coalesced + r.coalesced + 1, deferrals = q.deferrals + 1, error = %(error)s,
       not_before = GREATEST(COALESCE(q.not_before, now()), now() + make_interval(secs => %(delay_s)s))
  FROM atlasd.runs r
 WHERE r.id = %(id)s AND r.state = 'running' AND q.policy = r.policy AND q.gear = r.gear
   AND q.state = 'queued' AND q.trigger = 'batch'
RETURNING {", ".join("q." + c for c in Run.model_fields)}"""

_RECORD_PROCESS = f"""
UPDATE atlasd.runs
   SET pid = %(pid)s, pgid = %(pgid)s, host = %(host)s, output_dir = %(output_dir)s,
       spec = COALESCE(%(spec)s, spec), champion_version = COALESCE(%(champion_version)s, champion_version),
       heartbeat_at = now()
 WHERE id = %(id)s AND state = 'running'
RETURNING {_COLUMNS}"""

_RECORD_SPEC = f"""
UPDATE atlasd.runs SET output_dir = %(output_dir)s, spec = %(spec)s, champion_version = %(champion_version)s
 WHERE id = %(id)s AND state = 'running'
RETURNING {_COLUMNS}"""

_HEARTBEAT = f"""
UPDATE atlasd.runs
   SET heartbeat_at = now(), metrics = COALESCE(%(metrics)s, metrics),
       progress_at = COALESCE(now() - make_interval(secs => %(progress_age_s)s), progress_at)
 WHERE id = %(id)s AND state = 'running'
RETURNING {_COLUMNS}"""

_FINISH = f"""
UPDATE atlasd.runs
   SET state = %(state)s, finished_at = now(), error = %(error)s,
       result = COALESCE(%(result)s, result), exit_code = COALESCE(%(exit_code)s, exit_code),
       follow_up = %(follow_up)s
 WHERE id = %(id)s AND state = ANY(%(from_states)s)
RETURNING {_COLUMNS}"""

_DECIDE = f"""
UPDATE atlasd.runs SET follow_up = %(follow_up)s
 WHERE id = %(id)s AND state IN ('failed', 'interrupted') AND follow_up IS NULL
RETURNING {_COLUMNS}"""

_UNDECIDED = f"""
SELECT {_COLUMNS} FROM atlasd.runs
 WHERE state IN ('failed', 'interrupted') AND follow_up IS NULL ORDER BY id"""

_UNREGISTERED = f"""
SELECT {_COLUMNS} FROM atlasd.runs r
 WHERE state = 'succeeded' AND model_version IS NULL
   AND NOT EXISTS (SELECT 1 FROM atlasd.registrations g WHERE g.run_id = r.id)
 ORDER BY id"""

_RECONCILED = """
INSERT INTO atlasd.runner_state (reconciled_at, repaired, last_repaired_at)
VALUES (now(), %(repaired)s, CASE WHEN %(repaired)s > 0 THEN now() END)
ON CONFLICT (singleton) DO UPDATE
   SET reconciled_at = now(), repaired = runner_state.repaired + EXCLUDED.repaired,
       last_repaired_at = COALESCE(EXCLUDED.last_repaired_at, runner_state.last_repaired_at)"""

_REQUEST_CANCEL = f"""
UPDATE atlasd.runs SET cancel_requested_at = COALESCE(cancel_requested_at, now())
 WHERE id = %(id)s AND state = 'running'
RETURNING {_COLUMNS}"""

_GET = f"SELECT {_COLUMNS} FROM atlasd.runs WHERE id = %(id)s"

_LIST = f"""
SELECT {_COLUMNS} FROM atlasd.runs
 WHERE (%(states)s::text[] IS NULL OR state = ANY(%(states)s))
   AND (%(policy)s::text IS NULL OR policy = %(policy)s)
 ORDER BY id DESC
 LIMIT %(limit)s"""

_COUNTS = "SELECT state, count(*) FROM atlasd.runs GROUP BY state"

# The id of %(policy)s/%(gear)s's queued batch-triggered run (at most one), for the cadence's inputs.
QUEUED_BATCH_RUN = """SELECT id FROM atlasd.runs
         WHERE policy = %(policy)s AND gear = %(gear)s AND state = 'queued' AND trigger = 'batch'"""


async def _one(conn: psycopg.AsyncConnection, sql: str, params: dict[str, Any]) -> Run | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        row = await cur.fetchone()
    return Run(**row) if row else None


def _json(value: Any) -> Jsonb | None:
    if value is None:
        return None
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return Jsonb(value)


async def enqueue(
    conn: psycopg.AsyncConnection,
    *,
    policy: str,
    gear: str,
    trigger: TriggerSource,
    window_lo: int,
    window_hi: int,
    n_traces: int,
    priority: int,
    coalesce: bool = False,
    scheduled_for: datetime | None = None,
) -> Enqueued:
    """Queue a run of ``policy``/``gear`` over the trace window (window_lo, window_hi].

    With ``coalesce`` (batch gears), a queued batch-triggered run of the same gear is widened to
    ``window_hi`` instead (its n_traces grows, ``coalesced`` counts the merge); cron runs are
    queued with ``coalesce=False`` and so are never merged or dropped.

    Raises :class:`EmptyWindow` (nothing written) when ``n_traces`` is 0: such a run could only fail,
    ``max_retries + 1`` times. The caller leaves the window unconsumed and shows the reason.
    """
    if n_traces <= 0:
        raise EmptyWindow(f"no new traces for {policy}/{gear} in window ({window_lo}, {window_hi}] that pass "
                          "its filters: nothing to train on, no run queued")
    params = {
        "policy": policy,
        "gear": gear,
        "trigger": trigger,
        "priority": priority,
        "window_lo": window_lo,
        "window_hi": window_hi,
        "n_traces": n_traces,
        "scheduled_for": scheduled_for,
    }
    async with conn.transaction():
        if coalesce:
            widened = await _one(conn, _WIDEN, params)
            if widened is not None:
                return Enqueued(widened, coalesced=True)
        return Enqueued(await _one(conn, _INSERT, params), coalesced=False)


async def enqueue_followup(conn: psycopg.AsyncConnection, run_id: int, trigger: Literal["retry", "resume"]) -> Run:
    """Queue a retry or a resume (same window) of a failed/interrupted run; the runner continues
    either from the parent's last checkpoint, in its output_dir, when the parent got that far.
    The new run has ``attempt = parent.attempt + 1`` and ``parent_run_id``; the caller checks the
    policy's ``retry.max_retries`` / ``resume_interrupted`` against ``attempt`` first."""
    async with conn.transaction():
        run = await _one(conn, _FOLLOWUP, {"id": run_id, "trigger": trigger})
        if run is None:
            raise QueueError(await _why_not(conn, run_id, f"queue a {trigger} of", ("failed", "interrupted")))
    return run


async def claim_next(conn: psycopg.AsyncConnection) -> Run | None:
    """Take the next queued run and mark it running (started_at, heartbeat_at = now). None when
    nothing is queued or a run is already running (also when another claimer won a race)."""
    try:
        async with conn.transaction():
            return await _one(conn, _CLAIM, {})
    except psycopg.errors.UniqueViolation:
        return None


async def defer(conn: psycopg.AsyncConnection, run_id: int, error: str, delay_s: float) -> Run:
    """A running run that could not start (a store it needs is unavailable) goes back to the queue,
    not claimed for ``delay_s``, without spending an attempt (``deferrals`` counts, ``error`` says
    why). A batch run whose gear queued another batch run meanwhile is merged into that one
    instead (returned; this run becomes cancelled, its error naming the run that took its window)."""
    params = {"id": run_id, "error": error, "delay_s": delay_s}
    async with conn.transaction():
        try:
            async with conn.transaction():
                return await _transition(conn, _DEFER, params, run_id, "defer", ("running",))
        except psycopg.errors.UniqueViolation:
            merged = await _one(conn, _MERGE_DEFERRED, params)
            if merged is None:
                raise
            await mark_cancelled(conn, run_id, f"merged into queued run {merged.id} (its start was deferred: {error})")
            return merged


async def record_spec(
    conn: psycopg.AsyncConnection, run_id: int, *, output_dir: str, spec: Any, champion_version: str | None
) -> Run:
    """The runner is about to start the child of a running run: where it writes and what it runs
    (a retry of the run resumes from there even if the child's process is never recorded)."""
    params = {"id": run_id, "output_dir": str(output_dir), "spec": _json(spec), "champion_version": champion_version}
    return await _transition(conn, _RECORD_SPEC, params, run_id, "record the spec of", ("running",))


async def record_process(
    conn: psycopg.AsyncConnection,
    run_id: int,
    *,
    pid: int,
    pgid: int,
    host: str,
    output_dir: str,
    spec: Any = None,
    champion_version: str | None = None,
) -> Run:
    """The runner started the child of a running run: remember where it is and what it runs."""
    params = {
        "id": run_id,
        "pid": pid,
        "pgid": pgid,
        "host": host,
        "output_dir": str(output_dir),
        "spec": _json(spec),
        "champion_version": champion_version,
    }
    return await _transition(conn, _RECORD_PROCESS, params, run_id, "record the process of", ("running",))


async def heartbeat(
    conn: psycopg.AsyncConnection, run_id: int, metrics: dict[str, Any] | None = None, progress_age_s: float | None = None
) -> Run:
    """Refresh heartbeat_at (and the latest metrics; ``progress_at`` = now - ``progress_age_s``).
    The returned run's ``cancel_requested_at`` tells the runner that `atlasd cancel` asked to stop it."""
    params = {"id": run_id, "metrics": _json(metrics), "progress_age_s": progress_age_s}
    return await _transition(conn, _HEARTBEAT, params, run_id, "heartbeat", ("running",))


async def mark_succeeded(
    conn: psycopg.AsyncConnection, run_id: int, *, result: Any = None, exit_code: int | None = 0
) -> Run:
    return await _finish(conn, run_id, "succeeded", ("running",), error=None, result=result, exit_code=exit_code)


async def mark_failed(
    conn: psycopg.AsyncConnection, run_id: int, error: str, *, result: Any = None, exit_code: int | None = None,
    follow_up: FollowUp | None = None,
) -> Run:
    """``follow_up``: what the caller decided (None: undecided); it queues a retry in the same transaction."""
    return await _finish(conn, run_id, "failed", ("running",), error=error, result=result, exit_code=exit_code,
                         follow_up=follow_up)


async def mark_interrupted(
    conn: psycopg.AsyncConnection, run_id: int, error: str, *, result: Any = None, exit_code: int | None = None,
    follow_up: FollowUp | None = None,
) -> Run:
    """``follow_up``: what the caller decided (None: undecided); it queues a resume in the same transaction."""
    return await _finish(conn, run_id, "interrupted", ("running",), error=error, result=result, exit_code=exit_code,
                         follow_up=follow_up)


async def mark_cancelled(
    conn: psycopg.AsyncConnection, run_id: int, error: str = "cancelled by the operator", *, exit_code: int | None = None
) -> Run:
    """Queued -> cancelled, or running -> cancelled once the runner has stopped the child."""
    return await _finish(conn, run_id, "cancelled", ("queued", "running"), error=error, result=None, exit_code=exit_code)


async def cancel(conn: psycopg.AsyncConnection, run_id: int) -> Run:
    """`atlasd cancel`: a queued run is cancelled at once; a running one gets ``cancel_requested_at``
    and the runner stops its child (SIGTERM to the process group) and marks it cancelled."""
    async with conn.transaction():
        run = await get_run(conn, run_id)
        if run is None:
            raise QueueError(f"no run {run_id}")
        if run.state == "queued":
            return await mark_cancelled(conn, run_id)
        if run.state == "running":
            return await _transition(conn, _REQUEST_CANCEL, {"id": run_id}, run_id, "cancel", ("running",))
        raise QueueError(f"run {run_id} is already {run.state}; nothing to cancel")


async def decide_follow_up(conn: psycopg.AsyncConnection, run_id: int, follow_up: FollowUp) -> Run | None:
    """Record the follow-up of an undecided failed/interrupted run and queue it (retry/resume), in
    one transaction. Returns the queued run (None for ``none``); QueueError if already decided."""
    async with conn.transaction():
        if await _one(conn, _DECIDE, {"id": run_id, "follow_up": follow_up}) is None:
            run = await get_run(conn, run_id)
            if run is not None and run.follow_up is not None:
                raise QueueError(f"the follow-up of run {run_id} is already decided: {run.follow_up}")
            raise QueueError(await _why_not(conn, run_id, "decide the follow-up of", ("failed", "interrupted")))
        return None if follow_up == "none" else await enqueue_followup(conn, run_id, follow_up)


async def undecided_runs(conn: psycopg.AsyncConnection) -> list[Run]:
    """Failed/interrupted runs whose follow-up was left undecided (their policy was not loaded)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_UNDECIDED)
        return [Run(**row) for row in await cur.fetchall()]


async def unregistered_runs(conn: psycopg.AsyncConnection) -> list[Run]:
    """Succeeded runs with neither a model version nor an ``atlasd.registrations`` row."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_UNREGISTERED)
        return [Run(**row) for row in await cur.fetchall()]


async def record_reconcile(conn: psycopg.AsyncConnection, repaired: int) -> None:
    """The runner's reconcile completed (``atlasd.runner_state``), having completed ``repaired`` runs."""
    await conn.execute(_RECONCILED, {"repaired": repaired})


async def record_model_version(conn: psycopg.AsyncConnection, run_id: int, version: str | None) -> None:
    """The run's registration is done: its model version (None: a failed run, logged without one)."""
    await conn.execute("UPDATE atlasd.runs SET model_version = %s, registered_at = now() WHERE id = %s",
                       [version, run_id])


async def get_run(conn: psycopg.AsyncConnection, run_id: int) -> Run | None:
    return await _one(conn, _GET, {"id": run_id})


async def list_runs(
    conn: psycopg.AsyncConnection, *, states: list[str] | None = None, policy: str | None = None, limit: int = 50
) -> list[Run]:
    """Newest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_LIST, {"states": states, "policy": policy, "limit": limit})
        return [Run(**row) for row in await cur.fetchall()]


async def counts_by_state(conn: psycopg.AsyncConnection) -> dict[str, int]:
    """Every state, 0 included."""
    cur = await conn.execute(_COUNTS)
    return {**dict.fromkeys(STATES, 0), **dict(await cur.fetchall())}


def counts_by_state_sync(conn: psycopg.Connection) -> dict[str, int]:
    """:func:`counts_by_state` on a synchronous connection (`atlasd status`)."""
    return {**dict.fromkeys(STATES, 0), **dict(conn.execute(_COUNTS).fetchall())}


async def _finish(
    conn: psycopg.AsyncConnection,
    run_id: int,
    state: str,
    from_states: tuple[str, ...],
    *,
    error: str | None,
    result: Any,
    exit_code: int | None,
    follow_up: FollowUp | None = None,
) -> Run:
    params = {
        "id": run_id,
        "state": state,
        "from_states": list(from_states),
        "error": error,
        "result": _json(result),
        "exit_code": exit_code,
        "follow_up": follow_up,
    }
    return await _transition(conn, _FINISH, params, run_id, f"mark {state}", from_states)


async def _transition(
    conn: psycopg.AsyncConnection, sql: str, params: dict[str, Any], run_id: int, action: str, from_states: tuple[str, ...]
) -> Run:
    async with conn.transaction():
        run = await _one(conn, sql, params)
        if run is None:
            raise QueueError(await _why_not(conn, run_id, action, from_states))
    return run


async def _why_not(conn: psycopg.AsyncConnection, run_id: int, action: str, from_states: tuple[str, ...]) -> str:
    run = await get_run(conn, run_id)
    if run is None:
        return f"no run {run_id}"
    return f"cannot {action} run {run_id}: it is {run.state} (needs {' or '.join(from_states)})"


# ---------------------------------------------------------------- status (synchronous: `atlasd status`)
def training_section(conn: psycopg.Connection) -> dict[str, Any]:
    """The running run (its step and loss from the runner's last heartbeat) and, per policy and
    gear, when a run last succeeded."""
    row = conn.execute(
        """SELECT id, policy, gear, started_at, heartbeat_at, metrics, progress_at,
                  extract(epoch FROM now() - progress_at)::float8, pid, output_dir
             FROM atlasd.runs WHERE state = 'running'"""
    ).fetchone()
    deferred = conn.execute(
        """SELECT id, policy, gear, not_before, deferrals, error FROM atlasd.runs
            WHERE state = 'queued' AND not_before > now() ORDER BY not_before, id"""
    ).fetchall()
    last = conn.execute(
        """SELECT policy, gear, max(finished_at) FROM atlasd.runs WHERE state = 'succeeded'
            GROUP BY policy, gear ORDER BY policy, gear"""
    ).fetchall()
    conn.rollback()
    running = None
    if row is not None:
        run_id, policy, gear, started_at, heartbeat_at, metrics, progress_at, progress_age, pid, output_dir = row
        metrics = metrics or {}
        running = {
            "run_id": run_id,
            "policy": policy,
            "gear": gear,
            "started_at": iso(started_at),
            "heartbeat_at": iso(heartbeat_at),
            "step": metrics.get("step"),
            "total_steps": metrics.get("total_steps"),
            "loss": metrics.get("loss"),
            "progress_at": iso(progress_at),
            "progress_age_s": progress_age,  # no progress for ATLASD_STALE_PROGRESS_S: stopped as hung
            **executor_info(run_id, output_dir, pid),  # executor: local (pid) or slurm (job_id)
        }
    last_success: dict[str, dict[str, str]] = {}
    for policy, gear, finished_at in last:
        last_success.setdefault(policy, {})[gear] = iso(finished_at)
    return {"running": running, "last_success_at": last_success,
            "deferred": [{"run_id": i, "policy": p, "gear": g, "not_before": iso(nb), "deferrals": n, "error": e}
                         for i, p, g, nb, n, e in deferred]}


def runner_section(conn: psycopg.Connection) -> dict[str, Any]:
    """The runner's reconcile (runs left without an outcome, registration or follow-up) and how many
    failed/interrupted runs still wait for their follow-up decision."""
    row = conn.execute(
        """SELECT reconciled_at, extract(epoch FROM now() - reconciled_at)::float8, repaired, last_repaired_at
             FROM atlasd.runner_state"""
    ).fetchone()
    undecided = conn.execute(
        "SELECT count(*) FROM atlasd.runs WHERE state IN ('failed', 'interrupted') AND follow_up IS NULL"
    ).fetchone()[0]
    conn.rollback()
    reconciled_at, age, repaired, last_repaired_at = row or (None, None, 0, None)
    return {"reconciled_at": iso(reconciled_at), "reconcile_age_s": age, "repaired": repaired,
            "last_repaired_at": iso(last_repaired_at), "undecided_follow_ups": undecided}


def runs_for_retention(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every run with what retention decides from: state, follow-up, folder, parent, finish time,
    model version, the spec's registered model and its registration's state."""
    return conn.cursor(row_factory=dict_row).execute(
        """SELECT r.id, r.policy, r.state, r.follow_up, r.output_dir, r.parent_run_id, r.finished_at, r.model_version,
                  r.spec -> 'mlflow' ->> 'registered_model' AS registered_model, g.state AS registration
             FROM atlasd.runs r LEFT JOIN atlasd.registrations g ON g.run_id = r.id""").fetchall()


_REPORT_KEYS = ("id", "gear", "trigger", "state", "n_traces", "window_lo", "window_hi", "started_at", "finished_at",
                "metrics", "result", "spec", "champion_version", "error", "pgid", "output_dir", "registration",
                "model_version", "decision", "registration_error")


def run_report(conn: psycopg.Connection, run_id: int) -> dict[str, Any] | None:
    """A run with its registration's state, model version, decision and last error (the demo's report)."""
    row = conn.execute(
        """SELECT r.id, r.gear, r.trigger, r.state, r.n_traces, r.window_lo, r.window_hi, r.started_at,
                  r.finished_at, r.metrics, r.result, r.spec, r.champion_version, r.error, r.pgid, r.output_dir,
                  g.state, g.model_version, g.decision, g.last_error
             FROM atlasd.runs r LEFT JOIN atlasd.registrations g ON g.run_id = r.id WHERE r.id = %s""", [run_id]
    ).fetchone()
    return dict(zip(_REPORT_KEYS, row, strict=True)) if row else None


def first_run_after(conn: psycopg.Connection, after_id: int, gear: str) -> Run | None:
    """The first run of ``gear`` with an id above ``after_id``."""
    row = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_COLUMNS} FROM atlasd.runs WHERE id > %s AND gear = %s ORDER BY id LIMIT 1", [after_id, gear]
    ).fetchone()
    return Run(**row) if row else None
