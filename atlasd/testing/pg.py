"""Throw-away PostgreSQL databases for tests, on a real server.

The server is ``ATLASD_TEST_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
One template database per test session gets the SDK schema and every atlasd migration; each
test that asks for ``db_url`` gets its own copy (CREATE DATABASE ... TEMPLATE), dropped after.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg

ADMIN_URL = os.environ.get("ATLASD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def url_for(dbname: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + dbname))


def create_database(prefix: str = "atlasd_test", template: str | None = None) -> str:
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        tmpl = f" TEMPLATE {template}" if template else ""
        conn.execute(f'CREATE DATABASE "{name}"{tmpl}')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sql(url: str, query: str, params: list | None = None) -> list[tuple]:
    """Run one statement in its own autocommit connection; its rows (none for a statement without)."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []
