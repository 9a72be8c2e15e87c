"""structlog configuration: JSON lines on stdout (journald) by default, a human console
renderer when stdout is a terminal. Every line carries ``component``; run-scoped lines carry
``run_id`` (bind it with ``get_logger(...).bind(run_id=...)``)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from atlasd.settings import redact_url

_configured = False


def _redact_secrets(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Last line of defence: no URL password reaches a log line, whatever a caller passed."""
    for key, value in list(event_dict.items()):
        if isinstance(value, str) and ("://" in value or "password" in value.lower()):
            event_dict[key] = redact_url(value)
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    global _configured
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(component: str, **bound: Any) -> Any:
    if not _configured:
        configure_logging()
    return structlog.get_logger().bind(component=component, **bound)
