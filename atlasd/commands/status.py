"""`atlasd status [--json]`: problems first, then intake counts, listener and daemon health (from
the database)."""

from __future__ import annotations

import argparse
import json

from atlasd.commands import cli_settings
from atlasd.db import connect
from atlasd.db.migrate import check_schema
from atlasd.status import collect_status


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="intake counts, listener and daemon health")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    settings = cli_settings()
    with connect(settings.dsn, application_name="atlasd-status") as conn:
        check_schema(conn)
        status = collect_status(conn, settings)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render(status))
    return 0


def render(status: dict) -> str:
    """A readable table: one section per top-level key, nested dicts indented, list items one per line."""
    lines = []
    for section, value in status.items():
        if isinstance(value, dict):
            lines.append(f"{section}:")
            lines.extend(_rows(value, indent=2))
        elif isinstance(value, list):
            lines.append(f"{section}:" + ("" if value else " -"))
            lines.extend(_items(value, indent=2))
        else:
            lines.append(f"{section}: {value}")
    return "\n".join(lines)


def _rows(data: dict, indent: int) -> list[str]:
    width = max((len(str(k)) for k in data), default=0)
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.append(f"{' ' * indent}{key}:" + ("" if value else " -"))
            rows.extend(_rows(value, indent + 2))
        elif isinstance(value, list):
            rows.append(f"{' ' * indent}{key}:" + ("" if value else " -"))
            rows.extend(_items(value, indent + 2))
        else:
            rows.append(f"{' ' * indent}{str(key).ljust(width)}  {'-' if value is None else value}")
    return rows


def _items(items: list, indent: int) -> list[str]:
    """One line per item; a dict item as ``key=value`` pairs."""
    def text(item) -> str:
        return ", ".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict) else str(item)

    return [f"{' ' * indent}- {text(item)}" for item in items]
