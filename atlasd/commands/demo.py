"""`atlasd demo`: the whole loop on this machine (throw-away Postgres, MLflow on sqlite, offline
models); see atlasd.demo.run and the README's "The demo"."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop on this machine: throw-away Postgres, MLflow on sqlite, "
                                    "small offline models, the real daemon")
    p.add_argument("--state-dir", type=Path, default=Path(".atlasd-demo"),
                   help="models (cached), MLflow store, run folders, daemon log, summary.json (default ./.atlasd-demo)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="where the built models are cached (default STATE_DIR/models)")
    p.add_argument("--fast", action="store_true",
                   help="reduced mode for the test suite: small models, fewer traces and steps, same code path")
    p.add_argument("--keep-db", action="store_true",
                   help="leave the throw-away Postgres running at the end (prints its URL and how to stop it)")
    p.set_defaults(func=cmd_demo)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    from atlasd.cli import CommandError
    from psycopg import Error as PsycopgError

    from atlasd.db import safe_error
    from atlasd.demo.embedded_pg import EmbeddedPostgresError
    from atlasd.demo.run import DemoError, run_demo

    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM cleans up exactly as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    db_url = os.environ.get("ATLASD_DB_URL") or None
    if db_url and args.keep_db:
        raise CommandError("--keep-db applies to the throw-away cluster only; ATLASD_DB_URL is set")
    try:
        return run_demo(args.state_dir, models_dir=args.models_dir, fast=args.fast, db_url=db_url,
                        keep_db=args.keep_db)
    except (DemoError, EmbeddedPostgresError) as exc:
        raise CommandError(str(exc)) from None
    except PsycopgError as exc:
        raise CommandError(f"database: {safe_error(exc)}") from None
