"""Stand-in for ``python -m trainers run SPEC.json`` (the chaos suite; no torch, no database).

What the daemon's runner relies on, as the real trainer (``trainers/run.py``, ``trainers/telemetry.py``):
- JSON lines on stdout (``event``, ``run_id``, ``ts``): ``start``, ``dataset``, ``phase``, ``step``,
  ``checkpoint``, ``eval``, ``error``, ``done``, and ``heartbeat`` lines from a thread carrying
  ``progress_at`` (the main thread's last progress);
- ``OUTPUT_DIR/data/train.jsonl`` (the snapshot a retry resumes from), ``checkpoints/step-N/`` (the
  last two kept), ``final/`` and ``result.json`` (:class:`atlasd.runspec.RunResult`, succeeded with a
  checkpoint folder and an eval report);
- SIGTERM/SIGINT: a checkpoint of the last finished step, ``result.json`` interrupted, exit 75;
  ``"resume": true`` in the spec continues from the last checkpoint to the same final step;
- a daemon that is gone (stdout a broken pipe): the run fails (exit 1), as the real one does.

Knobs: ``$CHAOS_PLAN`` names a JSON file read at start, ``{"*": {...}, "<run id>": {...}}`` (the
run's entry wins): ``steps`` (6), ``step_s`` (0.15), ``save_every`` (2), ``heartbeat_s`` (0.3),
``success_rate`` (0.3 + run id / 100: a later run beats an earlier one), ``fail_at`` (step: exit 1),
``hold_at`` + ``hold_file`` (after that step, wait until the file exists; a stop still works).

Journal: ``$CHAOS_JOURNAL`` gets one ``{"kind": "trainer", "event": "start"|"end", ...}`` line per
process start and exit (pid, pgid, run id, wall time), appended with O_APPEND, so the suite can
check that two trainer process groups never overlapped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from atlasd.runspec import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EvalReport, RunResult

EVAL_SET_HASH = "chaos-eval-set"


class Interrupted(Exception):
    pass


class DaemonGone(Exception):
    pass


def journal(record: dict) -> None:
    path = os.environ.get("CHAOS_JOURNAL")
    if not path:
        return
    line = (json.dumps({**record, "t": time.time()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def load_plan(run_id: int) -> dict:
    plan = {"steps": 6, "step_s": 0.15, "save_every": 2, "heartbeat_s": 0.3,
            "success_rate": round(min(0.99, 0.3 + run_id / 100), 4)}
    path = os.environ.get("CHAOS_PLAN")
    if path and Path(path).is_file():
        plans = json.loads(Path(path).read_text() or "{}")
        plan.update(plans.get("*", {}))
        plan.update(plans.get(str(run_id), {}))
    return plan


class Telemetry:
    """The real trainer's line format; a write to a closed pipe marks the daemon as gone."""

    def __init__(self, run_id: int, heartbeat_s: float) -> None:
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self.progress_at = time.time()
        self.step = 0
        self.total_steps: int | None = None
        self.phase = "starting"
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def emit(self, event: str, **fields) -> None:
        now = time.time()
        if event != "heartbeat":
            self.progress_at = now
        line = json.dumps({"event": event, "run_id": self.run_id, "ts": round(now, 3), **fields})
        with self._lock:
            if self.lost:
                return
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError, OSError):
                self.lost = True
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # the rest (and the flush at exit) goes nowhere
                os.close(devnull)

    def advance(self, step: int, **fields) -> None:
        self.step = step
        self.emit("step", step=step, total_steps=self.total_steps, **fields)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.emit("heartbeat", phase=self.phase, step=self.step, total_steps=self.total_steps,
                      progress_at=round(self.progress_at, 3))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit()) if root.is_dir() else []


def save(out: Path, step: int, tel: Telemetry) -> Path:
    folder = out / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    for old in checkpoints(out)[:-2]:  # the last two are kept
        shutil.rmtree(out / "checkpoints" / f"step-{old}", ignore_errors=True)
    tel.emit("checkpoint", step=step, path=str(folder))
    return folder


def run(spec_path: str) -> int:
    try:
        spec = json.loads(Path(spec_path).read_text())
        run_id, out = int(spec["run_id"]), Path(spec["output_dir"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"trainers (stand-in): bad spec {spec_path}: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    plan = load_plan(run_id)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    out.mkdir(parents=True, exist_ok=True)
    tel = Telemetry(run_id, plan["heartbeat_s"])
    resume = bool(spec.get("resume"))
    start = (checkpoints(out) or [0])[-1] if resume else 0
    total = int(plan["steps"])
    tel.total_steps, tel.step = total, start
    window = [spec["traces"]["window_lo"], spec["traces"]["window_hi"]]
    me = {"kind": "trainer", "run_id": run_id, "pid": os.getpid(), "pgid": os.getpgid(0)}
    journal({**me, "event": "start", "resume": resume, "resumed_from": start, "window": window,
             "output_dir": str(out), "student": spec.get("student")})
    t0 = time.time()
    result = RunResult(run_id=run_id, status="failed", n_train=window[1] - window[0])
    code, step = EXIT_FAILED, start
    try:
        tel.emit("start", policy=spec["policy"], gear=spec["gear"], trigger=spec["trigger"], resume=resume,
                 resumed_from=start, pid=os.getpid())
        tel.start_heartbeat()
        snapshot = out / "data" / "train.jsonl"
        if not (resume and snapshot.is_file()):
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            snapshot.write_text(json.dumps({"window": window}) + "\n")
        tel.emit("dataset", source="snapshot" if resume else "database", n_train=result.n_train, n_eval=10)
        tel.phase = "train"
        tel.emit("phase", phase="train", step=step, total_steps=total)
        while step < total:
            if stop.is_set():
                raise Interrupted
            if tel.lost:
                raise DaemonGone
            if stop.wait(plan["step_s"]):
                continue
            step += 1
            tel.advance(step, loss=round(1.0 / step, 4))
            if step % plan["save_every"] == 0:
                save(out, step, tel)
            if step == plan.get("fail_at"):
                raise ValueError("a bad batch (stand-in fail_at)")
            if step == plan.get("hold_at"):
                while not Path(plan["hold_file"]).exists() and not stop.is_set() and not tel.lost:
                    stop.wait(0.05)
        final = out / "final"
        final.mkdir(exist_ok=True)
        (final / "config.json").write_text(json.dumps({"model_type": "stand-in", "run_id": run_id}))
        report = EvalReport(model=str(final), eval_set_hash=EVAL_SET_HASH, n_samples=10,
                            success_rate=float(plan["success_rate"]), avg_tokens=20.0)
        tel.emit("eval", which="final", **report.model_dump(mode="json"))
        result.status, result.checkpoint, result.eval, result.n_eval = "succeeded", str(final), report, 10
        code = EXIT_OK
    except Interrupted:
        if step > 0:
            result.checkpoint = str(save(out, step, tel))
        result.status, result.error = "interrupted", f"stopped at step {step} (SIGTERM)"
        code = EXIT_INTERRUPTED
    except DaemonGone:
        result.error = "BrokenPipeError: [Errno 32] Broken pipe"
        code = EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - reported in result.json, as the real trainer does
        result.error = f"{type(exc).__name__}: {exc}"
        tel.emit("error", kind="failed", error=result.error)
        code = EXIT_FAILED
    finally:
        result.steps, result.wall_time_s = step, round(time.time() - t0, 3)
        path = result.dump(out / "result.json")
        tel.emit("done", status=result.status, exit_code=code, steps=step, result=str(path),
                 checkpoint=result.checkpoint)
        tel.close()
        journal({**me, "event": "end", "exit_code": code, "status": result.status, "step": step})
    return code


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m trainers run SPEC.json (chaos stand-in: only `run`)", file=sys.stderr)
        return EXIT_BAD_SPEC
    return run(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
