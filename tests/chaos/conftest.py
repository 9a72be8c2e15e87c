"""The ``chaos`` fixture: a :class:`~tests.chaos.harness.Chaos` on this test's own database
(``db_url``: a copy of the session's migrated template). A failed test prints the tail of each
daemon's log; whatever it left running is killed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Chaos


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"chaos_{report.when}", report)


@pytest.fixture()
def chaos(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Chaos]:
    env = Chaos(db_url, tmp_path)
    try:
        yield env
    finally:
        report = getattr(request.node, "chaos_call", None)
        if report is not None and report.failed:
            for n, daemon in enumerate(env.daemons):
                tail = "".join(daemon.raw[-60:])
                print(f"\n----- daemon {n} (pid {daemon.proc and daemon.proc.pid}): last lines -----\n{tail}")
        try:
            env.allow_connections(True)
        finally:
            env.cleanup()
