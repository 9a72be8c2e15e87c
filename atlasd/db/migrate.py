"""Versioned, idempotent migrations of the atlasd-owned schema.

Migrations are the SQL files ``atlasd/db/migrations/NNNN_name.sql``, applied in order, each in
its own transaction, recorded in ``atlasd.schema_version``. Concurrent ``migrate`` calls are
serialised by a transaction-level advisory lock. A file already applied is never re-run; a file
whose content changed after it was applied is reported (never silently re-applied).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

from atlasd.db import DatabaseError, connect

MIGRATIONS_LOCK_KEY = 0x61746C6173_01  # "atlas" + 1: serialises migrate runs
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
SDK_TABLES = ("sessions", "plans", "step_results", "trajectory_events")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    folder = resources.files("atlasd.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"duplicate migration versions in atlasd/db/migrations: {versions}")
    return found


def sdk_schema_sql() -> str:
    return (resources.files("atlasd.db") / "sdk_schema.sql").read_text()


def missing_sdk_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass('public.' || t) IS NULL", [list(SDK_TABLES)]
    ).fetchall()
    return [r[0] for r in rows]


def applied_versions(conn: psycopg.Connection) -> dict[int, str]:
    if conn.execute("SELECT to_regclass('atlasd.schema_version')").fetchone()[0] is None:
        return {}
    return dict(conn.execute("SELECT version, checksum FROM atlasd.schema_version").fetchall())


def pending_migrations(conn: psycopg.Connection) -> list[Migration]:
    applied = applied_versions(conn)
    return [m for m in available_migrations() if m.version not in applied]


TRIGGERS_FROM = "CREATE OR REPLACE FUNCTION atlasd.notify_sessions_ready()"


def trigger_sql() -> str:
    """The NOTIFY function and its two triggers exactly as the newest migration that defines them
    does (the one definition): that file's tail, idempotent (CREATE OR REPLACE, DROP/CREATE TRIGGER)."""
    sql = next(m.sql for m in reversed(available_migrations()) if TRIGGERS_FROM in m.sql)
    return sql[sql.index(TRIGGERS_FROM):]


def migrate(dsn: str) -> list[Migration]:
    """Apply every pending migration and re-install the NOTIFY triggers (a trigger dropped or
    disabled since comes back); return the migrations applied (empty when up to date)."""
    applied_now: list[Migration] = []
    with connect(dsn, application_name="atlasd-migrate") as conn:
        missing = missing_sdk_tables(conn)
        if missing:
            raise DatabaseError(
                "the Atlas SDK tables are missing from this database: "
                + ", ".join(f"public.{t}" for t in missing)
                + ". Point ATLASD_DB_URL at the database the Atlas SDK writes to (the SDK creates its "
                "tables on first connect), or run `atlasd db init-sdk-schema` for a test database."
            )
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATIONS_LOCK_KEY])
            conn.execute("CREATE SCHEMA IF NOT EXISTS atlasd")
            conn.execute(
                """CREATE TABLE IF NOT EXISTS atlasd.schema_version (
                       version INTEGER PRIMARY KEY,
                       name TEXT NOT NULL,
                       checksum TEXT NOT NULL,
                       applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
            )
            applied = applied_versions(conn)
            for migration in available_migrations():
                if migration.version in applied:
                    if applied[migration.version] != migration.checksum:
                        raise DatabaseError(
                            f"migration {migration.version:04d}_{migration.name}.sql changed after it was "
                            "applied; add a new migration instead of editing an applied one"
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(migration.sql)
                        conn.execute(
                            "INSERT INTO atlasd.schema_version (version, name, checksum) VALUES (%s, %s, %s)",
                            [migration.version, migration.name, migration.checksum],
                        )
                except psycopg.Error as exc:
                    raise DatabaseError(
                        f"migration {migration.version:04d}_{migration.name}.sql failed: {exc}"
                    ) from None
                applied_now.append(migration)
            conn.execute(trigger_sql())
    return applied_now


def init_sdk_schema(dsn: str) -> None:
    """Create the Atlas SDK's tables (stand-in for tests and the demo). Idempotent."""
    with connect(dsn, application_name="atlasd-init-sdk") as conn:
        conn.execute(sdk_schema_sql())
        conn.commit()


def check_schema(conn: psycopg.Connection) -> None:
    """Raise unless every migration is applied (the daemon refuses to run on an old schema)."""
    pending = pending_migrations(conn)
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise DatabaseError(f"database schema is not up to date (pending: {names}); run `atlasd db migrate`")


def migrations_dir() -> Path:
    return Path(str(resources.files("atlasd.db") / "migrations"))
