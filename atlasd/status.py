"""What `atlasd status` reports, as a dict. Later parts add their own keys (policies, runs,
champion) by extending :func:`collect_status`; each section is one small query."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from atlasd.cadence import status_sections
from atlasd.listener import CHANNEL
from atlasd.lock import DAEMON_LOCK_KEY, HEARTBEAT_STALE_S
from atlasd.promotions import champions
from atlasd.settings import Settings


def collect_status(conn: psycopg.Connection, settings: Settings) -> dict[str, Any]:
    daemon = _daemon(conn)
    return {
        "database": settings.dsn_redacted,
        "intake": _intake(conn),
        "listener": {"connected": daemon.pop("listener_connected"), "channel": CHANNEL},
        "daemon": daemon,
        "champion": champions(conn),  # per policy, from atlasd.promotions (MLflow itself: `atlasd models`)
        **status_sections(conn, settings),
    }


def _intake(conn: psycopg.Connection) -> dict[str, Any]:
    total, malformed, revoked, last_seq, last_at = conn.execute(
        """SELECT count(*), count(*) FILTER (WHERE malformed IS NOT NULL),
                  count(*) FILTER (WHERE revoked_at IS NOT NULL), max(seq), max(approved_at)
             FROM atlasd.intake"""
    ).fetchone()
    by_key = conn.execute(
        """SELECT learning_key, count(*) FROM atlasd.intake WHERE malformed IS NULL
            GROUP BY learning_key ORDER BY learning_key"""
    ).fetchall()
    reasons = conn.execute(
        "SELECT malformed, count(*) FROM atlasd.intake WHERE malformed IS NOT NULL GROUP BY 1 ORDER BY 1"
    ).fetchall()
    backlog = conn.execute(
        """SELECT count(*) FROM public.sessions s
            WHERE s.review_status = 'approved' AND s.status = 'succeeded'
              AND NOT EXISTS (SELECT 1 FROM atlasd.intake i WHERE i.session_id = s.id)"""
    ).fetchone()[0]
    conn.rollback()  # end the read transaction: the SDK locks `sessions` on connect
    return {
        "total": total,
        "usable": total - malformed,
        "by_learning_key": dict(by_key),
        "malformed": malformed,
        "malformed_reasons": dict(reasons),
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
                  listener_connected, last_reconcile_at, stopped_at
             FROM atlasd.daemon_state"""
    ).fetchone()
    conn.rollback()
    if row is None:
        return {"running": lock_held, "listener_connected": False}
    pid, host, version, started_at, heartbeat_at, age, listener_connected, last_reconcile_at, stopped_at = row
    alive = lock_held and stopped_at is None and float(age) <= HEARTBEAT_STALE_S
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
        "stopped_at": _iso(stopped_at),
        "listener_connected": bool(alive and listener_connected),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
