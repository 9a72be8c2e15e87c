"""The `atlasd` command line. Each command group lives in its own module and registers itself
in ``COMMAND_MODULES``; this file only builds the parser and handles errors uniformly.

Exit codes: 0 ok, 1 failure the operator must look at (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from atlasd import __version__

# modules exposing ``register(subparsers)``; each subcommand sets ``func(args) -> int``
COMMAND_MODULES = [
    "atlasd.commands.db",
    "atlasd.commands.models",
    "atlasd.commands.run",
    "atlasd.commands.status",
    "atlasd.commands.policies",
    "atlasd.commands.runs",
    "atlasd.commands.gc",
    "atlasd.commands.demo",
]


class CommandError(Exception):
    """An error for the operator: printed as one clear message, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasd", description="Continual-learning daemon for Atlas SDK agents.")
    parser.add_argument("--version", action="version", version=f"atlasd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from atlasd.db import DatabaseError
    from atlasd.settings import SettingsError, redact_url

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CommandError, DatabaseError, SettingsError) as exc:
        print(f"atlasd {args.command}: {redact_url(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
