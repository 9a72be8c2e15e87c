"""What `atlasd status` reports, as a dict. Later parts add their own keys (policies, runs,
champion) by extending :func:`collect_status`; each section is one small query.

``problems`` lists, in words, what needs an operator: a NOTIFY trigger missing or disabled on
``public.sessions`` (the daemon then sees approvals only by its slow poll) and every part the
running daemon reported degraded (``daemon.degraded``: reconnecting, re-taking its lock, retrying).

The same dict feeds the Prometheus endpoint (:mod:`atlasd.metrics`), and :func:`status_line`
is the daemon's one-line ``STATUS=`` for systemd."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import psycopg

from atlasd.cadence import catchup_window, plan_gear_sync, status_sections, utc_now
from atlasd.listener import CHANNEL, TRIGGER_STATES
from atlasd.lock import DAEMON_LOCK_KEY, HEARTBEAT_STALE_S
from atlasd.policies import Policy
from atlasd.promotions import champions
from atlasd.queue import counts_by_state_sync
from atlasd.retention import last_gc
from atlasd.settings import Settings
from atlasd.slurm import executor_info


def collect_status(conn: psycopg.Connection, settings: Settings) -> dict[str, Any]:
    daemon = _daemon(conn)
    triggers = notify_triggers(conn)
    problems = [f"NOTIFY trigger {name} is {state} on public.sessions: the daemon sees approvals only by its "
                f"slow poll; `atlasd db migrate` re-installs it"
                for name, state in triggers.items() if state != "enabled"]
    problems += [f"daemon degraded: {d['part']} {d['state']} for {d['for_s']:.0f}s ({d['error']})"
                 for d in daemon["degraded"] if d["part"] != "notify-trigger"]  # the line above says it
    registrations = _registrations(conn)
    problems += [f"registration of run {r['run_id']} failed after {r['attempts']} attempts ({r['last_error']}): "
                 f"re-queue it with `atlasd register {r['run_id']}`" for r in registrations["failed_runs"]]
    return {
        "database": settings.dsn_redacted,
        "problems": problems,
        "intake": _intake(conn),
        "listener": {
            "connected": daemon.pop("listener_connected"),
            "channel": CHANNEL,
            "notify_queue_usage": conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0],
            "notify_trigger": triggers,
            "notify_trigger_ok": all(state == "enabled" for state in triggers.values()),
        },
        "daemon": daemon,
        "champion": champions(conn),  # per policy, from atlasd.promotions (MLflow itself: `atlasd models`)
        "training": _training(conn),
        "registrations": registrations,
        "runner": {**_runner(conn), "executor": settings.executor},  # configured here; a run's own: training.running
        "promotions": _promotions(conn),
        "disk": last_gc(settings),  # the last gc's figures (`atlasd gc --dry-run` measures now)
        **status_sections(conn, settings),
    }


def status_line(conn: psycopg.Connection, settings: Settings, policies: Iterable[Policy]) -> str:
    """One line for systemd's ``STATUS=``: the running run and its step, queued runs, pending
    traces per policy/gear (batch gears: pending/threshold), the champion per policy. The same
    queries as :func:`collect_status`, for the daemon's live ``policies``."""
    running = _training(conn)["running"]
    if running:
        run = f"run {running['run_id']} {running['policy']}/{running['gear']}"
        if running["step"] is not None:
            run += f" step {running['step']}" + (f"/{running['total_steps']}" if running["total_steps"] else "")
    else:
        run = "idle"
    parts = [run]
    queued = counts_by_state_sync(conn)["queued"]
    if queued:
        parts.append(f"{queued} queued")
    now = utc_now()
    pending = []
    for policy in policies:
        for gear in policy.gears:
            p = plan_gear_sync(conn, policy, gear, now=now, catchup_window=catchup_window(policy, settings))
            pending.append(f"{p.policy}/{p.gear} {p.pending}" + (f"/{p.threshold}" if p.threshold else "")
                           + (" (paused)" if p.paused else ""))
    parts.append("pending " + (", ".join(pending) if pending else "- (no policies)"))
    champ = champions(conn)
    if champ:
        parts.append("champion " + ", ".join(f"{policy} v{c['version']}" for policy, c in champ.items()))
    conn.rollback()  # end the read transaction
    return "; ".join(parts)


def notify_triggers(conn: psycopg.Connection) -> dict[str, str]:
    """{trigger: "enabled" | "disabled" | "missing"} for the triggers that wake the listener."""
    states = conn.execute(TRIGGER_STATES).fetchone()[0]
    conn.rollback()
    return states


def _training(conn: psycopg.Connection) -> dict[str, Any]:
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
            "started_at": _iso(started_at),
            "heartbeat_at": _iso(heartbeat_at),
            "step": metrics.get("step"),
            "total_steps": metrics.get("total_steps"),
            "loss": metrics.get("loss"),
            "progress_at": _iso(progress_at),
            "progress_age_s": progress_age,  # no progress for ATLASD_STALE_PROGRESS_S: stopped as hung
            **executor_info(run_id, output_dir, pid),  # executor: local (pid) or slurm (job_id)
        }
    last_success: dict[str, dict[str, str]] = {}
    for policy, gear, finished_at in last:
        last_success.setdefault(policy, {})[gear] = _iso(finished_at)
    return {"running": running, "last_success_at": last_success,
            "deferred": [{"run_id": i, "policy": p, "gear": g, "not_before": _iso(nb), "deferrals": n, "error": e}
                         for i, p, g, nb, n, e in deferred]}


def _registrations(conn: psycopg.Connection) -> dict[str, Any]:
    """Registrations still to do (pending: retried with backoff) and given up (failed: `atlasd register`)."""
    counts = dict(conn.execute("SELECT state, count(*) FROM atlasd.registrations GROUP BY state").fetchall())
    oldest = conn.execute(
        """SELECT extract(epoch FROM now() - min(created_at))::float8 FROM atlasd.registrations
            WHERE state = 'pending'"""
    ).fetchone()[0]
    failed = conn.execute(
        "SELECT run_id, attempts, last_error FROM atlasd.registrations WHERE state = 'failed' ORDER BY run_id"
    ).fetchall()
    conn.rollback()
    return {"pending": counts.get("pending", 0), "failed": counts.get("failed", 0), "done": counts.get("done", 0),
            "oldest_pending_age_s": oldest,
            "failed_runs": [{"run_id": r, "attempts": a, "last_error": e} for r, a, e in failed]}


def _runner(conn: psycopg.Connection) -> dict[str, Any]:
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
    return {"reconciled_at": _iso(reconciled_at), "reconcile_age_s": age, "repaired": repaired,
            "last_repaired_at": _iso(last_repaired_at), "undecided_follow_ups": undecided}


def _promotions(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """Audit rows per policy and action (promote, reject, force, rollback)."""
    rows = conn.execute(
        "SELECT policy, action, count(*) FROM atlasd.promotions GROUP BY policy, action ORDER BY policy, action"
    ).fetchall()
    conn.rollback()
    out: dict[str, dict[str, int]] = {}
    for policy, action, n in rows:
        out.setdefault(policy, {})[action] = n
    return out


BACKLOG_IDS = 100_000  # `intake.backlog` counts ready, unrecorded sessions among the newest this many ids


def _intake(conn: psycopg.Connection) -> dict[str, Any]:
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
        """SELECT count(*) FROM public.sessions s
            WHERE s.id > (SELECT COALESCE(max(id), 0) FROM public.sessions) - %s
              AND s.review_status = 'approved' AND s.status = 'succeeded'
              AND NOT EXISTS (SELECT 1 FROM atlasd.intake i
                               WHERE i.session_id = s.id AND i.session_created_at = s.created_at)""", [BACKLOG_IDS]
    ).fetchone()[0]
    conn.rollback()  # end the read transaction: the SDK locks `sessions` on connect
    return {
        "total": total,
        "usable": total - malformed,
        "by_learning_key": dict(sorted(by_key.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))),
        "malformed": malformed,
        "malformed_reasons": dict(sorted(reasons.items())),
        "revoked": revoked,
        "backlog": backlog,
        "last_seq": last_seq,
        "last_recorded_at": _iso(last_at),
    }


def _daemon(conn: psycopg.Connection) -> dict[str, Any]:
    lock_held = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                             AND d.datname = current_database()
                             AND l.classid::bigint = %s AND l.objid::bigint = %s)""",
        [DAEMON_LOCK_KEY >> 32, DAEMON_LOCK_KEY & 0xFFFFFFFF],
    ).fetchone()[0]
    row = conn.execute(
        """SELECT pid, host, version, started_at, heartbeat_at, extract(epoch FROM now() - heartbeat_at),
                  listener_connected, last_reconcile_at, extract(epoch FROM now() - last_reconcile_at),
                  stopped_at, degraded
             FROM atlasd.daemon_state"""
    ).fetchone()
    conn.rollback()
    if row is None:
        return {"running": lock_held, "listener_connected": False, "last_reconcile_age_s": None, "degraded": []}
    (pid, host, version, started_at, heartbeat_at, age, listener_connected, last_reconcile_at, reconcile_age,
     stopped_at, degraded) = row
    alive = lock_held and stopped_at is None and float(age) <= HEARTBEAT_STALE_S
    # as of the last heartbeat (heartbeat_age_s ago); a daemon that stopped cleanly left none
    degraded = [] if stopped_at is not None else [
        {**d, "for_s": round(d["down_s"] + float(age), 1),
         "since": _iso(heartbeat_at - timedelta(seconds=d["down_s"]))}
        for d in degraded
    ]
    return {
        "running": alive,
        "lock_held": lock_held,
        "pid": pid,
        "host": host,
        "version": version,
        "started_at": _iso(started_at),
        "heartbeat_at": _iso(heartbeat_at),
        "heartbeat_age_s": round(float(age), 1),
        "last_reconcile_at": _iso(last_reconcile_at),
        "last_reconcile_age_s": None if reconcile_age is None else round(float(reconcile_age), 1),
        "degraded": degraded,
        "stopped_at": _iso(stopped_at),
        "listener_connected": bool(alive and listener_connected),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
