"""`atlasd db migrate | init-sdk-schema | status`."""

from __future__ import annotations

import argparse

from atlasd.commands import cli_settings
from atlasd.db import connect
from atlasd.db.migrate import applied_versions, available_migrations, init_sdk_schema, migrate, missing_sdk_tables
from atlasd.status import notify_triggers


def register(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="database schema: migrate, init-sdk-schema, status")
    dbsub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    p = dbsub.add_parser("migrate", help="apply atlasd's migrations and install the NOTIFY trigger (idempotent)")
    p.set_defaults(func=cmd_migrate)

    p = dbsub.add_parser(
        "init-sdk-schema",
        help="create the Atlas SDK's tables (for a test or demo database; the real SDK creates its own)",
    )
    p.set_defaults(func=cmd_init_sdk)

    p = dbsub.add_parser("status", help="show applied and pending migrations")
    p.set_defaults(func=cmd_status)


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = cli_settings()
    applied = migrate(settings.dsn)
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("schema is up to date; nothing to do")
    return 0


def cmd_init_sdk(args: argparse.Namespace) -> int:
    settings = cli_settings()
    init_sdk_schema(settings.dsn)
    print(f"Atlas SDK tables present in {settings.dsn_redacted}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = cli_settings()
    with connect(settings.dsn) as conn:
        missing = missing_sdk_tables(conn)
        applied = applied_versions(conn)
        triggers = notify_triggers(conn) if not missing else {}
    print(f"database: {settings.dsn_redacted}")
    print("SDK tables: " + ("present" if not missing else "MISSING " + ", ".join(missing)))
    for m in available_migrations():
        print(f"  {m.version:04d}_{m.name}: {'applied' if m.version in applied else 'pending'}")
    bad = {name: state for name, state in triggers.items() if state != "enabled"}
    if triggers:
        print("NOTIFY triggers: " + ("enabled" if not bad else ", ".join(f"{n} {s}" for n, s in bad.items())
                                     + " (run `atlasd db migrate` to re-install them)"))
    return 0 if not missing and not bad and all(m.version in applied for m in available_migrations()) else 1
