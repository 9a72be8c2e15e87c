"""The real daemon (``python -m atlasd run``) as a child process, its JSON log lines captured as
events: the one harness the tests, the benchmarks and ``atlasd demo`` drive it with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout (python -m atlasd finds the package here)


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

    def __init__(self, db_url: str, state_dir: Path, *args: str, cwd: Path = ROOT, log_path: Path | None = None,
                 new_session: bool = False, base_env: Mapping[str, str] | None = None, **env: str) -> None:
        """``cwd``: where the daemon starts (``python -m`` puts it first on sys.path; a test folder
        lets stand-in ``trainers``/``registry`` packages on PYTHONPATH win over the checkout's).
        ``log_path``: every output line is also appended there. ``new_session``: the daemon leads
        its own session (a terminal's Ctrl-C does not reach it). ``base_env``: the environment the
        settings below are added to (default: this process's)."""
        (state_dir / "policies").mkdir(parents=True, exist_ok=True)  # no policies: intake only
        self.env = {
            **(os.environ if base_env is None else base_env),
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
        self.log_path, self.new_session = log_path, new_session
        self._log = None
        self._log_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> DaemonProcess:
        self.started_at = time.monotonic()
        if self.log_path is not None:
            self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed when the daemon is reaped)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atlasd", "run", *self.args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=self.new_session,
        )
        self._readers = [threading.Thread(target=self._read, args=(stream, is_stdout), daemon=True)
                         for stream, is_stdout in ((self.proc.stdout, True), (self.proc.stderr, False))]
        for reader in self._readers:
            reader.start()
        return self

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            self.raw.append(line)
            with self._log_lock:
                if self._log is not None:
                    self._log.write(line)
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
        """SIGTERM, then its exit status; killed (SIGKILL) when it has not exited after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self._close_log()

    def _close_log(self) -> None:
        if self._log is not None and self.proc.poll() is not None:
            for reader in self._readers:  # what the daemon wrote last reaches the file first
                reader.join(5)
            with self._log_lock:
                self._log.close()
                self._log = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._close_log()
