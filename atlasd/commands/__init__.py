"""CLI command groups (see atlasd.cli.COMMAND_MODULES)."""

from __future__ import annotations

import sys

from atlasd.logging import configure_logging
from atlasd.settings import Settings, load_settings


def cli_settings(args=None, *, log_to_stderr: bool = True) -> Settings:
    """Settings for a one-shot command; its logs go to stderr so stdout stays machine-readable."""
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level, stream=sys.stderr if log_to_stderr else sys.stdout)
    return settings
