"""Executors run a training child for a run. The local executor is a child process in its own
process group on this machine; a cluster engine (Ray Jobs, Slurm) would implement the same
interface. The daemon never imports torch: the child is ``python -m trainers run SPEC.json``.

Process-group discipline: the child is a session leader (``start_new_session``), so signals go
to it and to anything it spawned (dataloader workers, vLLM, the ranks of a multi-GPU run: the trainer
launches them in its own group, ``trainers/distributed.py``) and never to the daemon.

Output: ``events`` reads the child's stdout line by line, up to ``LINE_LIMIT_BYTES`` a line; a longer
line is skipped (an ``output_skipped`` event says how long it was), never an error. Every line kept
is appended to ``stdout.jsonl``; a failure to write it (ENOSPC) raises from ``events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from atlasd.settings import Settings

STDERR_TAIL_BYTES = 8192
LINE_LIMIT_BYTES = 8 << 20  # the longest stdout line kept (eval summaries are far shorter)


@dataclass
class RunHandle:
    run_id: int
    pid: int
    pgid: int
    run_dir: Path
    started_at: float = field(default_factory=time.time)
    process: asyncio.subprocess.Process | None = None  # None when re-attached after a daemon restart
    stdout_offset: int = 0  # where ``events`` starts reading the output (re-attached: what was read before)

    @property
    def stdout_log(self) -> Path:
        return self.run_dir / "stdout.jsonl"

    @property
    def stderr_log(self) -> Path:
        return self.run_dir / "stderr.log"


@dataclass(frozen=True)
class ExitInfo:
    returncode: int | None  # None: the process is gone but was not our child (re-attached)
    signal: int | None
    stderr_tail: str

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by signal {signal.Signals(self.signal).name}"
        if self.returncode is None:
            return "exited (status unknown: re-attached after a daemon restart)"
        return f"exited with status {self.returncode}"


class Executor(Protocol):
    async def submit(self, run_id: int, spec_path: Path, run_dir: Path, env: Mapping[str, str]) -> RunHandle: ...

    def events(self, handle: RunHandle) -> AsyncIterator[dict[str, Any]]: ...

    async def wait(self, handle: RunHandle) -> ExitInfo: ...

    async def cancel(self, handle: RunHandle, grace_s: float) -> ExitInfo: ...

    def alive(self, pid: int, pgid: int, run_dir: Path) -> bool: ...

    async def reap(self, pid: int, pgid: int, run_dir: Path, grace_s: float) -> bool: ...

    async def attach(self, run_id: int, run_dir: Path) -> RunHandle | None:
        """After a daemon restart: a handle on the run's trainer still running (its output, wait and
        cancel as if just submitted), or None when it cannot be followed again (then it is reaped)."""
        ...

    def logs(self, run_dir: Path) -> tuple[Path, Path]: ...


def executor_for(settings: Settings) -> Executor:
    """The executor ``ATLASD_EXECUTOR`` names: ``local`` (a child process here) or ``slurm`` (atlasd.slurm)."""
    if settings.executor == "slurm":
        from atlasd.slurm import SlurmExecutor

        return SlurmExecutor(settings)
    return LocalExecutor()


def parse_event(line: str) -> dict[str, Any]:
    """One stdout line of the child: a JSON object, or plain text kept as a log event."""
    line = line.strip()
    if line.startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                return obj
    return {"event": "output", "line": line}


def read_tail(path: Path, limit: int = STDERR_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class LocalExecutor:
    """Runs ``python -m trainers run SPEC`` (or ``command``) as a child in its own process group."""

    def __init__(self, command: list[str] | None = None, python: str = sys.executable) -> None:
        self.command = command or [python, "-m", "trainers", "run"]

    async def submit(self, run_id: int, spec_path: Path, run_dir: Path, env: Mapping[str, str]) -> RunHandle:
        run_dir.mkdir(parents=True, exist_ok=True)
        stderr = (run_dir / "stderr.log").open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                str(spec_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=dict(env),
                cwd=str(run_dir),
                start_new_session=True,
                limit=LINE_LIMIT_BYTES,
            )
        finally:
            stderr.close()
        return RunHandle(run_id=run_id, pid=proc.pid, pgid=proc.pid, run_dir=run_dir, process=proc)

    async def events(self, handle: RunHandle) -> AsyncIterator[dict[str, Any]]:
        assert handle.process is not None and handle.process.stdout is not None
        stdout = handle.process.stdout
        with handle.stdout_log.open("ab") as log:
            while True:
                try:
                    raw = await stdout.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:  # end of output; the last line may lack its newline
                    raw = exc.partial
                    if not raw:
                        return
                except asyncio.LimitOverrunError as exc:
                    skipped = await _skip_line(stdout, exc.consumed)
                    yield {"event": "output_skipped", "bytes": skipped,
                           "reason": f"a stdout line longer than {LINE_LIMIT_BYTES} bytes was skipped"}
                    continue
                log.write(raw if raw.endswith(b"\n") else raw + b"\n")
                log.flush()
                line = raw.decode(errors="replace")
                if line.strip():
                    yield parse_event(line)

    async def wait(self, handle: RunHandle) -> ExitInfo:
        assert handle.process is not None
        rc = await handle.process.wait()
        sig = -rc if rc < 0 else None
        return ExitInfo(returncode=rc, signal=sig, stderr_tail=read_tail(handle.stderr_log))

    async def cancel(self, handle: RunHandle, grace_s: float) -> ExitInfo:
        """SIGTERM to the group (the trainer checkpoints and exits), SIGKILL after ``grace_s``."""
        self._signal_group(handle.pgid, signal.SIGTERM)
        assert handle.process is not None
        try:
            await asyncio.wait_for(handle.process.wait(), timeout=grace_s)
        except TimeoutError:
            self._signal_group(handle.pgid, signal.SIGKILL)
        info = await self.wait(handle)
        self._signal_group(handle.pgid, signal.SIGKILL)  # leftovers of the group, if any
        return info

    def alive(self, pid: int, pgid: int, run_dir: Path) -> bool:
        """Is the group of a run's child still there, and is it really that child (pid reuse)?"""
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return _cwd_is(pid, run_dir) or _group_has_member_in(pgid, run_dir)

    async def reap(self, pid: int, pgid: int, run_dir: Path, grace_s: float) -> bool:
        """Terminate an orphaned child's group (after a daemon crash). True if something was running."""
        if not self.alive(pid, pgid, run_dir):
            return False
        self._signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _group_exists(pgid):
                return True
            await asyncio.sleep(0.1)
        self._signal_group(pgid, signal.SIGKILL)
        while _group_exists(pgid):
            await asyncio.sleep(0.05)
        return True

    async def attach(self, run_id: int, run_dir: Path) -> RunHandle | None:
        """Never: a child's stdout is a pipe to the daemon that started it (gone with it), so an
        orphaned child is reaped and its run resumed instead."""
        return None

    def logs(self, run_dir: Path) -> tuple[Path, Path]:
        return run_dir / "stdout.jsonl", run_dir / "stderr.log"

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


async def _skip_line(stream: asyncio.StreamReader, buffered: int) -> int:
    """Discard the rest of an over-long line whose first ``buffered`` bytes are in the buffer; its length."""
    skipped = 0
    while True:
        skipped += len(await stream.readexactly(buffered))
        try:
            return skipped + len(await stream.readuntil(b"\n"))
        except asyncio.LimitOverrunError as exc:
            buffered = exc.consumed
        except asyncio.IncompleteReadError as exc:
            return skipped + len(exc.partial)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie leader keeps the group "existing" until reaped by its parent; an orphan's parent is init
    return any(_proc_state(pid) not in ("Z", None) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[2]) == pgid:
                    members.append(int(entry.name))
    return members


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def _cwd_is(pid: int, run_dir: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == run_dir.resolve()
    except OSError:
        return False


def _group_has_member_in(pgid: int, run_dir: Path) -> bool:
    return any(_cwd_is(pid, run_dir) for pid in _group_members(pgid))
