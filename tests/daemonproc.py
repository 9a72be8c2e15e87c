"""Support for intake tests and the intake benchmark: the real daemon as a child process, and
writers that act as the Atlas SDK (asyncpg, one autocommit statement per write)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


class DaemonProcess:
    """``python -m atlasd run`` with JSON logs captured line by line."""

    def __init__(self, db_url: str, state_dir: Path, *args: str, cwd: Path = ROOT, **env: str) -> None:
        """``cwd``: where the daemon starts (``python -m`` puts it first on sys.path; a test folder
        lets stand-in ``trainers``/``registry`` packages on PYTHONPATH win over the checkout's)."""
        (state_dir / "policies").mkdir(parents=True, exist_ok=True)  # no policies: intake only
        self.env = {
            **os.environ,
            "ATLASD_DB_URL": db_url,
            "ATLASD_STATE_DIR": str(state_dir),
            "ATLASD_POLICIES_DIR": str(state_dir / "policies"),
            "ATLASD_POLL_INTERVAL_S": "3600",  # NOTIFY (and reconnects) are what is tested, not the poll
            "ATLASD_METRICS_ADDR": "127.0.0.1:0",  # never the fixed default port: tests run side by side
            "ATLASD_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.args = args
        self.cwd = cwd
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> DaemonProcess:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atlasd", "run", *self.args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True).start()
        return self

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            self.raw.append(line)
            if not is_stdout:
                self.stderr.append(line)
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["_t"] = time.monotonic()
            self.events.append(event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self.raw)

    def find(self, event: str, component: str | None = None) -> list[dict]:
        return [
            e for e in list(self.events) if e.get("event") == event and (component is None or e.get("component") == component)
        ]

    def wait_for(self, event: str, timeout: float = 30, count: int = 1, component: str | None = None) -> dict:
        def seen():
            if self.proc.poll() is not None and len(self.find(event, component)) < count:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {event!r}:\n{self.output}")
            found = self.find(event, component)
            return found[count - 1] if len(found) >= count else None

        return wait_until(seen, timeout, f"daemon log event {event!r} x{count}")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def sdk_write_sessions(
    db_url: str,
    count: int,
    *,
    writers: int = 8,
    learning_keys: tuple[str, ...] = ("math", "code"),
    long_tx_every: int = 0,
    long_tx_hold_s: float = 0.3,
) -> dict[str, int]:
    """Write ``count`` ready sessions the way the SDK does, from ``writers`` concurrent
    connections. Half are auto-approved at insert and become ready when they succeed; the other
    half succeed first and are approved by a reviewer afterwards. Every ``long_tx_every``-th
    session of a writer is written inside a transaction held open for ``long_tx_hold_s``, so its
    (lower) id commits after higher ids. Returns the ids written and how many long transactions
    were overtaken by a higher committed id."""
    ids: list[int] = []
    overtaken = 0

    async def one(conn: asyncpg.Connection, n: int) -> int:
        key = learning_keys[n % len(learning_keys)]
        metadata = json.dumps({"learning_key": key, "agent": "demo"})
        reward = json.dumps({"score": (n % 100) / 100, "sample_count": 1})
        if n % 2 == 0:
            sid = await conn.fetchval(
                "INSERT INTO sessions (task, metadata, reward_stats, review_status) "
                "VALUES ($1, $2::jsonb, $3::jsonb, 'approved') RETURNING id",
                f"task {n}",
                metadata,
                reward,
            )
            await conn.execute(
                "UPDATE sessions SET status = 'succeeded', final_answer = '42', completed_at = now() WHERE id = $1", sid
            )
        else:
            sid = await conn.fetchval(
                "INSERT INTO sessions (task, metadata, reward_stats) VALUES ($1, $2::jsonb, $3::jsonb) RETURNING id",
                f"task {n}",
                metadata,
                reward,
            )
            await conn.execute(
                "UPDATE sessions SET status = 'succeeded', final_answer = '42', completed_at = now() WHERE id = $1", sid
            )
            await conn.execute("UPDATE sessions SET review_status = $1 WHERE id = $2", "approved", sid)
        return sid

    async def writer(w: int) -> None:
        nonlocal overtaken
        # synchronous_commit off: the same commit order and visibility, without an fsync per statement
        conn = await asyncpg.connect(db_url, server_settings={"synchronous_commit": "off"})
        try:
            for n in range(w, count, writers):
                if long_tx_every and (n // writers) % long_tx_every == 0:
                    async with conn.transaction():
                        sid = await one(conn, n)
                        await asyncio.sleep(long_tx_hold_s)
                        higher = await conn.fetchval(
                            "SELECT count(*) FROM sessions WHERE id > $1 AND status = 'succeeded'", sid
                        )
                    overtaken += higher > 0
                else:
                    sid = await one(conn, n)
                ids.append(sid)
        finally:
            await conn.close()

    await asyncio.gather(*(writer(w) for w in range(writers)))
    return {"written": len(ids), "distinct": len(set(ids)), "overtaken": overtaken}
