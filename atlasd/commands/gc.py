"""`atlasd gc [--dry-run] [--json]`: apply the retention policy now; `atlasd purge --revoked
[--dry-run] [--json]`: remove revoked sessions' text from run folders (atlasd/retention.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime

from atlasd.cli import CommandError
from atlasd.commands import cli_settings
from atlasd.db import connect
from atlasd.intake import revoked_session_ids
from atlasd.promotions import RegistryCallError, purge_mlflow
from atlasd.retention import purge_revoked, run_gc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("purge", help="remove revoked sessions' text from run folders (data snapshots, eval samples)")
    p.add_argument("--revoked", action="store_true", required=True,
                   help="required: sessions quarantined, un-approved or deleted after they were recorded")
    p.add_argument("--dry-run", action="store_true", help="count what would be removed; change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("gc", help="remove run folders, periodic checkpoints and cached models the retention "
                                  "policy no longer keeps (the daemon does it every ATLASD_GC_INTERVAL_S)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_gc)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def cmd_purge(args: argparse.Namespace) -> int:
    settings = cli_settings()
    with connect(settings.dsn, autocommit=True, application_name="atlasd-gc") as conn:
        purged, waiting = purge_revoked(conn, settings, datetime.now(UTC), dry_run=args.dry_run)
        ids = revoked_session_ids(conn)
    mlflow = None
    if not args.dry_run:
        try:
            mlflow = asyncio.run(purge_mlflow(settings, ids))
        except RegistryCallError as exc:
            raise CommandError(f"run folders purged; MLflow not ({exc}): run `atlasd purge --revoked` again") from None
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "purged": [{"path": p.path, "lines": p.lines} for p in purged],
                          "waiting": waiting, "mlflow": mlflow}, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for p in purged:
        print(f"{verb} {p.lines} revoked session line(s) from {p.path}")
    for folder, n in waiting.items():
        print(f"left {n} revoked session line(s) in {folder} for now: a run still needs it (purged once it does not)")
    print(f"{verb} {sum(p.lines for p in purged)} line(s) in {len(purged)} file(s)"
          + (f"; MLflow: {mlflow['rows_removed']} row(s) in {mlflow['runs_changed']} of {mlflow['runs_checked']} "
             "run(s)" if mlflow else ""))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    settings = cli_settings()
    with connect(settings.dsn, autocommit=True, application_name="atlasd-gc") as conn:
        report = run_gc(conn, settings, datetime.now(UTC), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for r in report.removals:
        print(f"{verb} {r.what} {r.path} ({_gb(r.bytes)}): {r.why}")
    for path, why in report.kept.items():
        print(f"kept {path}: {why}")
    print(f"{verb} {len(report.removals)} item(s), {_gb(report.freed)}; disk use: "
          + ", ".join(f"{k} {_gb(v)}" for k, v in report.usage.items()))
    return 0
