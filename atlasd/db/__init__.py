"""Database access for the daemon (psycopg 3). Connections get libpq TCP keepalives so a
long-lived connection notices a dead peer; errors are re-raised without the password."""

from __future__ import annotations

from datetime import datetime

import psycopg

from atlasd.settings import redact_url

# libpq keepalives: a silent network failure is noticed in ~idle + interval * count seconds.
KEEPALIVE_KWARGS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def connect_kwargs(application_name: str = "atlasd", connect_timeout: int = 10) -> dict:
    return {**KEEPALIVE_KWARGS, "application_name": application_name, "connect_timeout": connect_timeout}


def iso(value: datetime | None) -> str | None:
    """A timestamp as the status documents print it (ISO 8601; None stays None)."""
    return value.isoformat() if value is not None else None


class DatabaseError(RuntimeError):
    """A database failure whose message is safe to log (no password)."""


def safe_error(exc: BaseException) -> str:
    return redact_url(f"{type(exc).__name__}: {exc}".strip())


def connect(dsn: str, *, autocommit: bool = False, application_name: str = "atlasd") -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **connect_kwargs(application_name))
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to {redact_url(dsn)}: {safe_error(exc)}") from None


async def aconnect(dsn: str, *, autocommit: bool = False, application_name: str = "atlasd") -> psycopg.AsyncConnection:
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit, **connect_kwargs(application_name))
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to {redact_url(dsn)}: {safe_error(exc)}") from None
