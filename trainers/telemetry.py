"""JSON lines on stdout for the daemon, heartbeats from a background thread, and a progress bar
on stderr when a person runs the trainer in a terminal.

Every line is one JSON object with at least ``event``, ``run_id`` and ``ts`` (unix seconds).
Events: ``start``, ``dataset``, ``phase``, ``step``, ``heartbeat``, ``eval``, ``checkpoint``,
``error``, ``done`` (see README "Training" for the fields). Nothing else is written to stdout.

Progress: ``progress_at`` (unix seconds) is when the main thread last did something: any event but
a heartbeat, or a step (``advance``). Heartbeats carry it, so the daemon tells a hung main thread
(heartbeats keep coming, ``progress_at`` stands still) from a slow one.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Any, TextIO

HEARTBEAT_S = 5.0  # the daemon treats a run as stale after tens of seconds without a line


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class Telemetry:
    def __init__(self, run_id: int | None, stream: TextIO | None = None, heartbeat_s: float = HEARTBEAT_S):
        self.run_id = run_id
        self.stream = stream or sys.stdout
        self.heartbeat_s = heartbeat_s
        self.phase = "starting"
        self.step = 0
        self.total_steps: int | None = None
        self.progress_at = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def emit(self, event: str, **fields: Any) -> None:
        now = time.time()
        if event != "heartbeat":
            self.progress_at = now
        line = json.dumps(_clean({"event": event, "run_id": self.run_id, "ts": round(now, 3), **fields}))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def set_phase(self, phase: str, **fields: Any) -> None:
        self.phase = phase
        self.emit("phase", phase=phase, step=self.step, **fields)

    # heartbeats ---------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.emit("heartbeat", phase=self.phase, step=self.step, total_steps=self.total_steps,
                      progress_at=round(self.progress_at, 3))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.close_progress()

    # progress bar (stderr, terminals only) ------------------------------------------------
    def progress(self, total: int, initial: int = 0) -> None:
        self.total_steps = total
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=f"run {self.run_id}", unit="step", file=sys.stderr)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def advance(self, step: int, **postfix: Any) -> None:
        self.step = step
        self.progress_at = time.time()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})
