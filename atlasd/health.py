"""What the daemon is riding out: each part that lost its database connection (or otherwise
cannot do its job) and is retrying, since when, and when it last tried.

A part reports every failed attempt with :meth:`Health.failed` and its first success with
:meth:`Health.recovered`; the first failure and the recovery are logged. The daemon publishes the
faults (``STATUS=``, ``atlasd.daemon_state.degraded``, ``atlasd status``) and keeps feeding the
systemd watchdog while every faulty part is still trying: a part whose last attempt is older
than the daemon's bound is stuck, and only then do the pings stop.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from atlasd.logging import get_logger

FIRST_BACKOFF_S = 0.5


def backoff_s(attempt: int, cap: float) -> float:
    """Delay before retry ``attempt`` (0-based): exponential from FIRST_BACKOFF_S, capped, half-jittered."""
    delay = min(cap, FIRST_BACKOFF_S * 2**attempt)
    return delay * random.uniform(0.5, 1.0)


@dataclass
class Fault:
    part: str  # lock, listener, intake, cadence, notify-trigger, ...
    state: str  # what the part is doing about it: "re-taking the lock", "reconnecting", ...
    error: str  # the latest failure (safe to show)
    since: float  # time.monotonic() of the first failure
    last_attempt: float  # time.monotonic() of the latest failure
    attempts: int

    def down_s(self) -> float:
        return time.monotonic() - self.since

    def to_json(self) -> dict[str, Any]:
        """As stored in ``atlasd.daemon_state.degraded`` (durations, not clock times: the
        database adds its own ``now()``)."""
        return {"part": self.part, "state": self.state, "error": self.error, "attempts": self.attempts,
                "down_s": round(self.down_s(), 1)}


class Health:
    """The faults of one owner (the daemon, or a component exposing ``health``)."""

    def __init__(self, component: str) -> None:
        self.component = component  # the log lines' component
        self._faults: dict[str, Fault] = {}

    def failed(self, part: str, state: str, error: str) -> Fault:
        """One more failed attempt of ``part`` (the first one is logged as ``degraded``)."""
        now = time.monotonic()
        fault = self._faults.get(part)
        if fault is None:
            fault = self._faults[part] = Fault(part, state, error, now, now, 0)
            get_logger(self.component).warning("degraded", part=part, state=state, error=error)
        fault.state, fault.error, fault.last_attempt = state, error, now
        fault.attempts += 1
        return fault

    def recovered(self, part: str) -> None:
        """``part`` works again (logged as ``recovered`` when it was degraded)."""
        fault = self._faults.pop(part, None)
        if fault is not None:
            get_logger(self.component).info("recovered", part=part, down_s=round(fault.down_s(), 2),
                                            attempts=fault.attempts)

    @property
    def faults(self) -> list[Fault]:
        return list(self._faults.values())


def summary(faults: list[Fault]) -> str:
    """``"degraded: lock re-taking the lock 12s, listener reconnecting 12s"`` (the STATUS= prefix)."""
    return "degraded: " + ", ".join(f"{f.part} {f.state} {f.down_s():.0f}s" for f in faults)
