"""Cadence: turns policies, recorded traces and the clock into queued runs.

Each gear is evaluated by :func:`evaluate_gear`, in ONE transaction that locks the gear's
``atlasd.policy_state`` row, so whatever fires concurrently, a threshold fires exactly once:

* **batch** gear: the eligible intake traces above the gear's ``last_window_hi`` are counted
  (``atlasd.intake.ELIGIBLE``, the trainer's definition too: usable, passing the gear's filters,
  outside the policy's frozen eval split; so a gear firing on N traces trains on those N); with ``k = floor(pending / every) >= 1`` it fires once with the window ending at the
  ``k * every``-th of them (the rest stay pending), unless paused or within ``min_interval`` of
  its last fire. A queued batch run of the same gear absorbs the fire (coalescing). With
  ``max_wait``, fewer than ``every`` (at least ``min_traces``) fire once the oldest of them has
  waited that long (a slow trickle still trains). After the gate rejected the gear's last run(s),
  the next fire waits ``min_interval`` (``BACKOFF_BASE`` if unset) times 2^(rejections-1), at most
  ``BACKOFF_MAX``, counted from the last fire; a promotion of the gear's run resets it.
* any fire takes at most the gear's ``filters.max_traces`` traces, the newest (the window's lower
  bound moves up; the older ones are skipped, said in the reason and the log, and remain
  rehearsal candidates): a new or renamed policy never trains on the whole history at once.
  ``atlasd trigger --backfill`` (mode ``backfill``) lifts the cap.
* **cron** gear: APScheduler 3.11 is only the timer that wakes us at the tick. The latest tick
  in ``(max(last_fire_at, armed_at), now]`` is due: within ``CRON_ON_TIME`` of its time it runs
  as ``cron``; older but within the catch-up window (policy ``catchup_window`` or
  ``ATLASD_CATCHUP_WINDOW_S``) as one coalesced ``catch-up`` run; older still, or while paused,
  it is skipped and recorded in ``skipped_fire_at``/``skipped_reason`` (logged, shown by plan).
  Changing a gear's cron expression re-arms it (ticks of the new expression before the change are
  not caught up).
* **manual** (``atlasd trigger``): the same path, always fires, with every pending trace.
* a policy whose eval split parameters changed while it has a champion fires nothing (the runs
  would be refused): its gears' plans say why (:mod:`atlasd.evalsplit`).

Clock steps: stored times later than ``now`` (written while the clock was ahead) are clamped to
just before ``now`` (``state_from_row``; written back by the next evaluation), for the decision and
for ``atlasd plan`` alike.

The same function with ``apply=False`` is ``atlasd plan`` (nothing written, no lock). The decision
itself is :func:`decide_gear`, a pure function of the gear's state, the counts and the clock
(``tests/test_cadence_decide.py`` needs no database). The clock is injected (``now``) so tests
never sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from psycopg.rows import dict_row

from atlasd import evalsplit, intake, queue
from atlasd.component import Component
from atlasd.db import safe_error
from atlasd.health import Health, backoff_s
from atlasd.logging import get_logger
from atlasd.evalsplit import EvalSplit
from atlasd.policies import Gear, Policy, PolicySet
from atlasd.promotions import REJECTIONS_SINCE_PROMOTION
from atlasd.settings import Settings

CRON_ON_TIME = timedelta(seconds=60)  # a tick evaluated this soon after its time is on time ('cron')
BACKOFF_BASE = timedelta(hours=1)  # a rejected batch gear's wait when it has no min_interval
BACKOFF_MAX = timedelta(days=7)
Mode = Literal["auto", "manual", "backfill"]  # backfill: manual, without filters.max_traces


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class GearPlan:
    """What one evaluation of a gear saw and decided (also the `atlasd plan` row)."""

    policy: str
    gear: str
    kind: Literal["batch", "cron"]
    paused: bool
    pending: int  # new traces passing the filters since last_window_hi
    threshold: int | None  # batch: every N
    last_window_hi: int
    action: Literal["enqueue", "coalesce", "skip", "none"]
    trigger: str | None  # the run's trigger source when action is enqueue/coalesce
    window_lo: int | None
    window_hi: int | None
    n_traces: int
    reason: str
    next_fire_at: datetime | None = None
    last_fire_at: datetime | None = None
    last_run_id: int | None = None
    queued_run_id: int | None = None  # a queued batch run this gear's next fire would widen
    skipped_fire_at: datetime | None = None
    skipped_reason: str | None = None
    run_id: int | None = None  # set when applied
    skipped_traces: int = 0  # pending traces left out of the run by filters.max_traces

    def to_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}


@dataclass
class GearState:
    """A gear's row of ``atlasd.policy_state`` (what :func:`plan_gear` decides from, with the inputs)."""

    last_window_hi: int
    armed_at: datetime
    cron_schedule: str | None
    last_fire_at: datetime | None
    last_run_id: int | None
    skipped_fire_at: datetime | None
    skipped_reason: str | None


_ENSURE_STATE = """
INSERT INTO atlasd.policy_state (policy, gear, armed_at, cron_schedule) VALUES (%(policy)s, %(gear)s, %(now)s, %(cron)s)
ON CONFLICT (policy, gear) DO NOTHING"""

_STATE = """
SELECT last_window_hi, armed_at, cron_schedule, last_fire_at, last_run_id, skipped_fire_at, skipped_reason
  FROM atlasd.policy_state WHERE policy = %(policy)s AND gear = %(gear)s"""

_RESTATE = """
UPDATE atlasd.policy_state SET armed_at = %(armed_at)s, cron_schedule = %(cron)s, last_fire_at = %(last_fire_at)s
 WHERE policy = %(policy)s AND gear = %(gear)s"""

# paused, the gear's queued batch run, the gate's rejections since its last promotion, and
# pending = usable traces above the gear's last window passing its filters; batch_hi = the seq of
# the (floor(pending / every) * every)-th of them (NULL when fewer than `every`). One statement,
# composed of the owners' subqueries (queue: runs, promotions: the audit, intake: the records).
_INPUTS = f"""
SELECT EXISTS (SELECT 1 FROM atlasd.pauses WHERE policy IN (%(policy)s, '*')) AS paused,
       ({queue.QUEUED_BATCH_RUN}) AS queued_run_id,
       ({REJECTIONS_SINCE_PROMOTION}) AS rejections,
       min(approved_at) AS oldest_at,
       count(*) AS pending,
       COALESCE(max(seq), %(lo)s) AS all_hi,
       max(seq) FILTER (WHERE rn <= (n / %(every)s) * %(every)s) AS batch_hi,
       -- the window's lower bound when only the newest max_traces go in (NULL: they all fit)
       max(seq) FILTER (WHERE rn <= n - %(max_traces)s) AS cap_lo_all,
       max(seq) FILTER (WHERE rn <= (n / %(every)s) * %(every)s - %(max_traces)s) AS cap_lo_batch
  FROM ({intake.PENDING}) t"""

_ADVANCE = """
UPDATE atlasd.policy_state
   SET last_window_hi = GREATEST(last_window_hi, %(window_hi)s), last_run_id = %(run_id)s, last_run_at = %(now)s,
       last_fire_at = CASE WHEN %(automatic)s THEN %(fire_at)s ELSE last_fire_at END
 WHERE policy = %(policy)s AND gear = %(gear)s"""

_SKIP = """
UPDATE atlasd.policy_state SET last_fire_at = %(tick)s, skipped_fire_at = %(tick)s, skipped_reason = %(reason)s
 WHERE policy = %(policy)s AND gear = %(gear)s"""


def _cron_key(gear: Gear) -> str | None:
    return f"{gear.trigger.cron.expr} @ {gear.trigger.cron.timezone}" if gear.trigger.cron else None


def due_tick(gear: Gear, after: datetime, now: datetime) -> datetime | None:
    """The latest cron tick in (after, now], or None. Scans forward from ever earlier starts
    (1 h, 1 d, ...) so a minute-cron down for a year costs at most an hour of ticks."""
    trigger = gear.trigger.cron.build()
    for lookback in (timedelta(hours=1), timedelta(days=1), timedelta(days=8), timedelta(days=32),
                     timedelta(days=367), timedelta(days=1500), None):
        start = after if lookback is None else max(after, now - lookback)
        latest = None
        tick = trigger.get_next_fire_time(None, start + timedelta(microseconds=1))
        while tick is not None and tick <= now:
            latest = tick
            tick = trigger.get_next_fire_time(tick, tick + timedelta(microseconds=1))
        if latest is not None or start == after:
            return latest
    return None


def next_tick(gear: Gear, now: datetime) -> datetime | None:
    return gear.trigger.cron.build().get_next_fire_time(None, now + timedelta(microseconds=1))


async def _fetch(conn: psycopg.AsyncConnection, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchone()


async def evaluate_gear(
    conn: psycopg.AsyncConnection,
    policy: Policy,
    gear_name: str,
    *,
    now: datetime,
    catchup_window: timedelta,
    mode: Mode = "auto",
    apply: bool = True,
) -> GearPlan:
    """Decide (and with ``apply``, do) what this gear's trigger says now. See the module doc."""
    gear = policy.gears[gear_name]
    key = {"policy": policy.name, "gear": gear_name}
    cron = _cron_key(gear)
    async with conn.transaction():
        if apply:
            await conn.execute(_ENSURE_STATE, {**key, "now": now, "cron": cron})
            state, changed = state_from_row(await _fetch(conn, _STATE + " FOR UPDATE", key), now, cron)
            if changed:
                await conn.execute(_RESTATE, {**key, "armed_at": state.armed_at, "cron": cron,
                                              "last_fire_at": state.last_fire_at})
        else:
            state, _ = state_from_row(await _fetch(conn, _STATE, key), now, cron)
        try:
            split, blocked = await evalsplit.current(conn, policy, record=apply), None
        except evalsplit.EvalSplitChanged as exc:
            split, blocked = exc.split, str(exc)
        inputs = {**await _fetch(conn, _INPUTS, _inputs_params(policy, gear_name, state, split, now)), "blocked": blocked}
        plan, fire_at = decide_gear(policy, gear_name, state, inputs, now=now, catchup_window=catchup_window, mode=mode)
        if not apply:
            return plan
        if plan.action == "skip":
            await conn.execute(_SKIP, {**key, "tick": plan.skipped_fire_at, "reason": plan.skipped_reason})
        elif plan.action in ("enqueue", "coalesce"):
            done = await queue.enqueue(
                conn,
                policy=policy.name,
                gear=gear_name,
                trigger=plan.trigger,
                window_lo=plan.window_lo,
                window_hi=plan.window_hi,
                n_traces=plan.n_traces,
                priority=gear.priority,
                coalesce=gear.kind == "batch",
                scheduled_for=fire_at if gear.kind == "cron" and mode == "auto" else None,
            )
            plan.run_id = done.run.id
            plan.action = "coalesce" if done.coalesced else "enqueue"
            await conn.execute(
                _ADVANCE,
                {
                    **key,
                    "window_hi": plan.window_hi,
                    "run_id": done.run.id,
                    "now": now,
                    "automatic": mode == "auto",
                    "fire_at": fire_at,
                },
            )
    return plan


def plan_gear_sync(
    conn: psycopg.Connection, policy: Policy, gear_name: str, *, now: datetime, catchup_window: timedelta
) -> GearPlan:
    """:func:`evaluate_gear` with ``apply=False`` on a synchronous connection (`atlasd status`)."""
    key = {"policy": policy.name, "gear": gear_name}
    cur = conn.cursor(row_factory=dict_row)
    state, _ = state_from_row(cur.execute(_STATE, key).fetchone(), now, _cron_key(policy.gears[gear_name]))
    try:
        split, blocked = evalsplit.current_sync(conn, policy), None
    except evalsplit.EvalSplitChanged as exc:
        split, blocked = exc.split, str(exc)
    inputs = {**cur.execute(_INPUTS, _inputs_params(policy, gear_name, state, split, now)).fetchone(), "blocked": blocked}
    return decide_gear(policy, gear_name, state, inputs, now=now, catchup_window=catchup_window, mode="auto")[0]


def state_from_row(row: dict[str, Any] | None, now: datetime, cron: str | None) -> tuple[GearState, bool]:
    """The gear's state (defaults when it has no row), and whether it differs from the stored row
    (to be written back): a new or changed cron schedule is (re-)armed now; a stored time later
    than ``now`` was written while the clock was ahead (a forward step since corrected) and is
    clamped to ``now - CRON_ON_TIME``, so the gear goes on with its next tick (a tick due this
    very minute included) and min_interval counts from now, instead of staying silent until the
    clock catches up."""
    state = GearState(**row) if row else GearState(0, now, cron, None, None, None, None)
    clamped = state.armed_at > now or (state.last_fire_at is not None and state.last_fire_at > now)
    if state.armed_at > now:
        state.armed_at = now - CRON_ON_TIME
    if state.last_fire_at is not None and state.last_fire_at > now:
        state.last_fire_at = now - CRON_ON_TIME
    rearmed = cron is not None and state.cron_schedule != cron
    if rearmed:
        state.armed_at, state.cron_schedule = now, cron
    return state, rearmed or clamped


def _inputs_params(policy: Policy, gear_name: str, state: GearState, split: EvalSplit, now: datetime) -> dict[str, Any]:
    gear = policy.gears[gear_name]
    return {
        "policy": policy.name,
        "gear": gear_name,
        "lo": state.last_window_hi,
        "every": gear.trigger.batch.every if gear.trigger.batch else None,
        "learning_key": policy.learning_key,
        "min_reward": gear.filters.min_reward,
        "max_age_days": gear.filters.max_age_days,
        "split_salt": split.key_salt,
        "split_threshold": split.threshold,
        "max_traces": gear.filters.max_traces,
        "now": now,
    }


def decide_gear(
    policy: Policy,
    gear_name: str,
    state: GearState,
    inputs: dict[str, Any],
    *,
    now: datetime,
    catchup_window: timedelta,
    mode: Mode,
) -> tuple[GearPlan, datetime | None]:
    """The decision, a pure function of the gear's state, the database's counts and the clock
    (no I/O: tested without Postgres). ``inputs`` is the ``_INPUTS`` row: ``paused``,
    ``queued_run_id`` (the gear's queued batch run), ``pending`` (usable traces above
    ``last_window_hi`` passing the filters), ``all_hi`` (the seq of the last of them),
    ``batch_hi`` (the seq of the ``floor(pending / every) * every``-th; None below ``every``),
    ``cap_lo_all`` / ``cap_lo_batch`` (where a window of only the newest ``max_traces`` starts; None
    when they all fit), ``oldest_at`` (when the oldest pending trace was recorded) and
    ``rejections`` (the gate's rejections of the gear's runs since its last promotion). Returns
    the plan and the fire time to record (None: nothing fires)."""
    gear = policy.gears[gear_name]
    plan = GearPlan(
        policy=policy.name,
        gear=gear_name,
        kind=gear.kind,
        paused=inputs["paused"],
        pending=inputs["pending"],
        threshold=gear.trigger.batch.every if gear.trigger.batch else None,
        last_window_hi=state.last_window_hi,
        action="none",
        trigger=None,
        window_lo=None,
        window_hi=None,
        n_traces=0,
        reason="",
        last_fire_at=state.last_fire_at,
        last_run_id=state.last_run_id,
        queued_run_id=inputs["queued_run_id"] if gear.kind == "batch" else None,
        skipped_fire_at=state.skipped_fire_at,
        skipped_reason=state.skipped_reason,
    )
    fire_at = _decide(plan, gear, state, inputs, now=now, catchup_window=catchup_window, mode=mode)
    return plan, fire_at


NO_NEW_TRACES = "no new traces since the last run"


def _decide(
    plan: GearPlan,
    gear: Gear,
    state: GearState,
    counts: dict[str, Any],
    *,
    now: datetime,
    catchup_window: timedelta,
    mode: Mode,
) -> datetime | None:
    """Fill in the plan's action/trigger/window/reason; return the fire time to record."""

    def fire(trigger: str, hi: int, n: int, reason: str) -> None:
        lo, cap = state.last_window_hi, gear.filters.max_traces
        if n > cap and mode != "backfill":  # only the newest `cap` go in
            lo = counts["cap_lo_batch"] if trigger == "batch" else counts["cap_lo_all"]
            plan.skipped_traces, n = n - cap, cap
            reason += (f"; the {plan.skipped_traces} oldest left out (filters.max_traces {cap}; "
                       "`atlasd trigger --backfill` takes them all)")
        plan.action = "coalesce" if gear.kind == "batch" and plan.queued_run_id else "enqueue"
        plan.trigger, plan.window_lo, plan.window_hi, plan.n_traces, plan.reason = trigger, lo, hi, n, reason

    if gear.kind == "cron":
        plan.next_fire_at = next_tick(gear, now)
    if counts.get("blocked"):  # the policy's eval split cannot be used (atlasd/evalsplit.py): no run could start
        plan.reason = f"waits: {counts['blocked']}"
        return None
    if mode != "auto":
        if not counts["pending"]:  # a run with an empty window could only fail (queue.EmptyWindow)
            plan.reason = NO_NEW_TRACES
            return None
        fire("manual", counts["all_hi"], counts["pending"], "manual trigger" + (" (backfill)" if mode == "backfill" else ""))
        return now

    if gear.kind == "batch":
        batch = gear.trigger.batch
        every, wait, why_wait = batch.every, batch.min_interval, "min_interval"
        rejections = counts.get("rejections") or 0
        if batch.backoff_after_reject and rejections:
            wait = min((batch.min_interval or BACKOFF_BASE) * 2 ** (rejections - 1), BACKOFF_MAX)
            why_wait = f"back-off after {rejections} gate rejection{'s' if rejections > 1 else ''}"
        oldest = counts.get("oldest_at")
        partial = (batch.max_wait is not None and counts["batch_hi"] is None and plan.pending >= batch.min_traces
                   and oldest is not None and now - oldest >= batch.max_wait)
        if plan.paused:
            plan.reason = f"paused ({plan.pending}/{every} new traces)"
        elif counts["batch_hi"] is None and not partial:
            plan.reason = f"{plan.pending}/{every} new traces"
            if batch.max_wait is not None and oldest is not None and plan.pending >= batch.min_traces:
                plan.next_fire_at = oldest + batch.max_wait
                plan.reason += f"; max_wait fires them at {plan.next_fire_at.isoformat()}"
        elif wait and state.last_fire_at and now < state.last_fire_at + wait:
            plan.next_fire_at = state.last_fire_at + wait
            plan.reason = f"{plan.pending}/{every} new traces, but {why_wait} holds it until {plan.next_fire_at.isoformat()}"
        elif partial:
            fire("batch", counts["all_hi"], plan.pending, f"{plan.pending} new traces (< {every}), the oldest waiting "
                 f"{_human(now - oldest)}: max_wait {_human(batch.max_wait)} fires a partial batch")
            return now
        else:
            n = plan.pending // every * every
            fire("batch", counts["batch_hi"], n, f"{plan.pending} >= {every} new traces: {n} go into a run")
            return now
        return None

    tick = due_tick(gear, max(filter(None, (state.last_fire_at, state.armed_at))), now)
    if tick is None:
        plan.reason = f"next tick {plan.next_fire_at.isoformat() if plan.next_fire_at else 'never'}"
        return None
    late = now - tick
    if plan.paused:
        why = "paused"
    elif not counts["pending"]:
        why = NO_NEW_TRACES
    elif late <= CRON_ON_TIME:
        fire("cron", counts["all_hi"], counts["pending"], f"cron tick {tick.isoformat()}")
        return tick
    elif late <= catchup_window:
        fire("catch-up", counts["all_hi"], counts["pending"], f"missed cron tick {tick.isoformat()} (catch-up)")
        return tick
    else:
        why = f"missed by {_human(late)}, older than the catch-up window ({_human(catchup_window)})"
    plan.action, plan.skipped_fire_at, plan.skipped_reason = "skip", tick, why
    plan.reason = f"cron tick {tick.isoformat()} skipped: {why}"
    return None


def _human(delta: timedelta) -> str:
    s = int(delta.total_seconds())
    if s >= 86400:
        return f"{s / 86400:.1f}d"
    if s >= 3600:
        return f"{s / 3600:.1f}h"
    return f"{s}s"


def catchup_window(policy: Policy, settings: Settings) -> timedelta:
    return policy.catchup_window or timedelta(seconds=settings.catchup_window_s)


async def plan_all(conn: psycopg.AsyncConnection, policies: PolicySet, settings: Settings, now: datetime) -> list[GearPlan]:
    """`atlasd plan`: every gear's decision, nothing written."""
    return [
        await evaluate_gear(conn, policy, gear, now=now, catchup_window=catchup_window(policy, settings), apply=False)
        for policy in policies.policies.values()
        for gear in policy.gears
    ]


async def trigger_manual(
    conn: psycopg.AsyncConnection, policy: Policy, gear: str, settings: Settings, now: datetime, *,
    backfill: bool = False,
) -> GearPlan:
    """`atlasd trigger POLICY --gear GEAR [--backfill]`: queue a run now with the pending traces
    (the newest ``filters.max_traces``; every one with ``backfill``); ignores pause."""
    return await evaluate_gear(
        conn, policy, gear, now=now, catchup_window=catchup_window(policy, settings),
        mode="backfill" if backfill else "manual",
    )


# ---------------------------------------------------------------- pause / resume


async def pause(conn: psycopg.AsyncConnection, policy: str | None, reason: str | None = None) -> None:
    """Pause one policy (or all, ``None``): automatic triggers stop; manual triggers still work."""
    await conn.execute(
        "INSERT INTO atlasd.pauses (policy, reason) VALUES (%s, %s) ON CONFLICT (policy) DO UPDATE SET reason = EXCLUDED.reason",
        [policy or "*", reason],
    )


async def resume(conn: psycopg.AsyncConnection, policy: str | None) -> list[str]:
    """Resume one policy (its own pause) or, with ``None``, everything. Returns the scopes lifted."""
    if policy is None:
        cur = await conn.execute("DELETE FROM atlasd.pauses RETURNING policy")
    else:
        cur = await conn.execute("DELETE FROM atlasd.pauses WHERE policy = %s RETURNING policy", [policy])
    return sorted(r[0] for r in await cur.fetchall())


async def paused_scopes(conn: psycopg.AsyncConnection) -> list[str]:
    cur = await conn.execute("SELECT policy FROM atlasd.pauses ORDER BY policy")
    return [r[0] for r in await cur.fetchall()]


def status_sections(conn: psycopg.Connection, settings: Settings) -> dict[str, Any]:
    """The `atlasd status` keys `policies` (per policy and gear: pending, threshold, next fire,
    paused, would queue now), `runs` (counts by state) and, when a policy file fails,
    `policy_errors`; from the policy files on disk, on a synchronous connection."""
    policies = PolicySet(settings.policies_dir)
    report = policies.reload()
    now = utc_now()
    out: dict[str, Any] = {"policies": {}, "runs": queue.counts_by_state_sync(conn)}
    for policy in policies.policies.values():
        for gear in policy.gears:
            p = plan_gear_sync(conn, policy, gear, now=now, catchup_window=catchup_window(policy, settings))
            out["policies"].setdefault(p.policy, {})[p.gear] = {
                "kind": p.kind,
                "pending": p.pending,
                "threshold": p.threshold,
                "next_fire_at": p.next_fire_at.isoformat() if p.next_fire_at else None,
                "paused": p.paused,
                "would_queue": p.action in ("enqueue", "coalesce"),
            }
    conn.rollback()  # end the read transaction
    if report.errors:
        out["policy_errors"] = [str(issue) for issues in report.errors.values() for issue in issues]
    return out


# ---------------------------------------------------------------- the daemon component


class CadenceComponent(Component):
    """The daemon component: loads the policies, arms the cron timers, evaluates gears after
    intake, on every timer tick and every ``poll_interval_s`` (min_interval, resume), and reloads
    on SIGHUP. ``policy_set`` is the live set (the daemon hands the same one to the runner and to
    the STATUS= line; this component reloads it).

    A failed evaluation (the database away) is not lost: every gear is evaluated again after an
    exponential, jittered backoff (capped at ``reconnect_max_backoff_s``) until a full evaluation
    succeeds; meanwhile ``health`` has the part ``cadence`` degraded. A cron tick evaluated late
    still fires (on time within CRON_ON_TIME, else as catch-up)."""

    name = "cadence"

    def __init__(self, settings: Settings, policies: PolicySet | None = None, *,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.clock = clock
        self.policy_set = policies if policies is not None else PolicySet(settings.policies_dir)
        self.log = get_logger("cadence")
        self.pool = None
        self.scheduler: AsyncIOScheduler | None = None
        self.health = Health("cadence")
        self._failures = 0  # failed evaluations since the last full success (the retry backoff)
        self._eval_lock = asyncio.Lock()

    async def start(self, daemon) -> None:
        self.pool = daemon.pool
        self._load()
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.scheduler.start()
        self._schedule()
        await self.evaluate()

    async def on_intake(self, recorded: int) -> None:
        await self.evaluate(kind="batch")

    async def reload(self) -> None:
        self._load()
        self._schedule()
        await self.evaluate()

    async def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
            await asyncio.sleep(0)  # AsyncIOScheduler shuts down in a loop callback
        async with self._eval_lock:  # let an evaluation in flight finish before the pool closes
            pass

    def _load(self) -> None:
        report = self.policy_set.reload()
        for file, issues in report.errors.items():
            for issue in issues:
                self.log.error("invalid policy file", file=file, line=issue.line, field=issue.field, reason=issue.reason)
        self.log.info(
            "policies loaded",
            directory=str(self.policy_set.directory),
            policies=sorted(self.policy_set.policies),
            added=report.added,
            changed=report.changed,
            removed=report.removed,
            kept_previous=report.kept_previous,
            failed_files=sorted(report.errors),
        )

    def _schedule(self) -> None:
        """Replace every job: one cron timer per cron gear, one poll job."""
        self.scheduler.remove_all_jobs()
        self.scheduler.add_job(
            self.evaluate,
            IntervalTrigger(seconds=self.settings.poll_interval_s, timezone=UTC),
            id="cadence-poll",
            coalesce=True,
            max_instances=1,
        )
        for policy in self.policy_set.policies.values():
            for gear_name, gear in policy.gears.items():
                if gear.kind == "cron":
                    self.scheduler.add_job(
                        self.evaluate_one,
                        gear.trigger.cron.build(),
                        args=[policy.name, gear_name],
                        id=f"cron:{policy.name}:{gear_name}",
                        coalesce=True,
                        max_instances=1,
                        misfire_grace_time=None,
                    )

    async def evaluate_one(self, policy_name: str, gear_name: str) -> GearPlan | None:
        policy = self.policy_set.get(policy_name)
        if policy is None or gear_name not in policy.gears:
            return None
        async with self._eval_lock:
            plan = await self._evaluate(policy, gear_name)
        if plan is None:
            self._retry_later()
        return plan

    async def evaluate(self, kind: Literal["batch", "cron"] | None = None) -> list[GearPlan]:
        """Evaluate every gear (or every gear of one kind); one failing gear does not stop the others."""
        plans, failed = [], False
        async with self._eval_lock:
            for policy in self.policy_set.policies.values():
                for gear_name, gear in policy.gears.items():
                    if kind is None or gear.kind == kind:
                        plan = await self._evaluate(policy, gear_name)
                        if plan is None:
                            failed = True
                        else:
                            plans.append(plan)
        if failed:
            self._retry_later()
        elif kind is None:
            self._failures = 0
            self.health.recovered("cadence")
            if self.scheduler is not None and self.scheduler.get_job("cadence-retry") is not None:
                self.scheduler.remove_job("cadence-retry")
        return plans

    def _retry_later(self) -> None:
        """Evaluate every gear again after the backoff (one pending retry; a later failure moves it)."""
        if self.scheduler is None or not self.scheduler.running:
            return
        delay = backoff_s(self._failures + 1, self.settings.reconnect_max_backoff_s)  # 0.5-1 s first
        self._failures += 1
        self.scheduler.add_job(self.evaluate, DateTrigger(run_date=utc_now() + timedelta(seconds=delay)),
                               id="cadence-retry", replace_existing=True, misfire_grace_time=None)

    async def _evaluate(self, policy: Policy, gear_name: str) -> GearPlan | None:
        try:
            async with self.pool.connection() as conn:
                plan = await evaluate_gear(
                    conn,
                    policy,
                    gear_name,
                    now=self.clock(),
                    catchup_window=catchup_window(policy, self.settings),
                )
        except (psycopg.Error, OSError) as exc:
            self.health.failed("cadence", "retrying evaluations", safe_error(exc))
            self.log.warning("cadence evaluation failed; retried with backoff", policy=policy.name,
                             gear=gear_name, error=safe_error(exc))
            return None
        if plan.action in ("enqueue", "coalesce"):
            self.log.info(
                "run queued" if plan.action == "enqueue" else "run widened (coalesced)",
                run_id=plan.run_id,
                policy=plan.policy,
                gear=plan.gear,
                trigger=plan.trigger,
                window_lo=plan.window_lo,
                window_hi=plan.window_hi,
                n_traces=plan.n_traces,
                skipped_traces=plan.skipped_traces,
                reason=plan.reason,
            )
        elif plan.action == "skip":
            self.log.warning("cron tick skipped", policy=plan.policy, gear=plan.gear,
                             tick=plan.skipped_fire_at.isoformat(), reason=plan.skipped_reason)
        return plan

