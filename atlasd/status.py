"""What `atlasd status` reports, as a dict, assembled from the sections each table's owner module
reads (intake, lock: the daemon, queue: training and runner, promotions: registrations, champions
and the audit, lineage: tainted runs, cadence: policies and pauses); this module writes no SQL
against atlasd's tables.

A champion whose run trained on a session revoked since is marked ``tainted`` (the count) and
named in ``problems``: it is never rolled back automatically.

``problems`` lists, in words, what needs an operator: a NOTIFY trigger missing or disabled on
``public.sessions`` (the daemon then sees approvals only by its slow poll) and every part the
running daemon reported degraded (``daemon.degraded``: reconnecting, re-taking its lock, retrying).

The same dict feeds the Prometheus endpoint (:mod:`atlasd.metrics`), and :func:`status_line`
is the daemon's one-line ``STATUS=`` for systemd."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from atlasd.cadence import catchup_window, plan_gear_sync, status_sections, utc_now
from atlasd.intake import status_section as intake_section
from atlasd.lineage import status_section as lineage_section
from atlasd.listener import CHANNEL, TRIGGER_STATES
from atlasd.lock import daemon_section
from atlasd.policies import Policy
from atlasd.promotions import audit_counts, champions, registrations_section
from atlasd.queue import counts_by_state_sync, runner_section, training_section
from atlasd.retention import last_gc
from atlasd.settings import Settings


def collect_status(conn: psycopg.Connection, settings: Settings) -> dict[str, Any]:
    daemon = daemon_section(conn)
    triggers = notify_triggers(conn)
    problems = [f"NOTIFY trigger {name} is {state} on public.sessions: the daemon sees approvals only by its "
                f"slow poll; `atlasd db migrate` re-installs it"
                for name, state in triggers.items() if state != "enabled"]
    problems += [f"daemon degraded: {d['part']} {d['state']} for {d['for_s']:.0f}s ({d['error']})"
                 for d in daemon["degraded"] if d["part"] != "notify-trigger"]  # the line above says it
    registrations = registrations_section(conn)
    problems += [f"registration of run {r['run_id']} failed after {r['attempts']} attempts ({r['last_error']}): "
                 f"re-queue it with `atlasd register {r['run_id']}`" for r in registrations["failed_runs"]]
    lineage = lineage_section(conn)
    champion = champions(conn)
    tainted = {(t["policy"], t["model_version"]): t["revoked"] for t in lineage["tainted"]}
    for policy, current in champion.items():
        if (policy, current["version"]) in tainted:
            current["tainted"] = tainted[policy, current["version"]]
            problems.append(f"the champion of {policy} (v{current['version']}) is tainted: it trained on "
                            f"{current['tainted']} session(s) revoked since; it is not rolled back automatically "
                            f"(`atlasd rollback {policy}`)")
    return {
        "database": settings.dsn_redacted,
        "problems": problems,
        "intake": intake_section(conn),
        "listener": {
            "connected": daemon.pop("listener_connected"),
            "channel": CHANNEL,
            "notify_queue_usage": conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0],
            "notify_trigger": triggers,
            "notify_trigger_ok": all(state == "enabled" for state in triggers.values()),
        },
        "daemon": daemon,
        "champion": champion,  # per policy, from atlasd.promotions (MLflow itself: `atlasd models`)
        "lineage": lineage,
        "training": training_section(conn),
        "registrations": registrations,
        "runner": {**runner_section(conn), "executor": settings.executor},  # configured here; a run's own: training.running
        "promotions": audit_counts(conn),
        "disk": last_gc(settings),  # the last gc's figures (`atlasd gc --dry-run` measures now)
        **status_sections(conn, settings),
    }


def status_line(conn: psycopg.Connection, settings: Settings, policies: Iterable[Policy]) -> str:
    """One line for systemd's ``STATUS=``: the running run and its step, queued runs, pending
    traces per policy/gear (batch gears: pending/threshold), the champion per policy. The same
    queries as :func:`collect_status`, for the daemon's live ``policies``."""
    running = training_section(conn)["running"]
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
