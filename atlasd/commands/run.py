"""`atlasd run`: the daemon in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import argparse
import asyncio

from atlasd.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground (JSON logs on stdout)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another atlasd holds this database's lock, wait for it instead of exiting (ATLASD_LOCK_WAIT)",
    )
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from atlasd.daemon import build_daemon

    settings = load_settings(**({"lock_wait": True} if args.wait else {}))
    return asyncio.run(build_daemon(settings).run())
