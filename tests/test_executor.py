"""The local executor with real child processes: JSON lines (over-long ones skipped), a log that cannot be
written, exit status, SIGTERM/SIGKILL, orphan reaping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atlasd.executor import LocalExecutor, _group_exists, parse_event

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    mode = open(sys.argv[1]).read().strip()
    def out(**kw): print(json.dumps(kw), flush=True)
    if mode == "ok":
        for step in range(3):
            out(event="step", step=step, loss=1.0 / (step + 1))
        print("plain text line", flush=True)
        sys.exit(0)
    if mode == "crash":
        print("Traceback: boom in dataset", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "checkpointing":
        def on_term(*_):
            out(event="checkpoint", step=7)
            sys.exit(75)
        signal.signal(signal.SIGTERM, on_term)
        out(event="step", step=1)
        while True:
            time.sleep(0.05)
    if mode == "long":
        out(event="step", step=1)
        sys.stdout.write("{" + "x" * (9 << 20) + "}\\n")
        sys.stdout.write("y" * (9 << 20))  # the last line, over-long, without its newline
        sys.stdout.flush()
        sys.exit(0)
    if mode == "chatty":
        for step in range(2000):
            out(event="step", step=step, pad="z" * 200)
        sys.exit(0)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        out(event="step", step=1)
        while True:
            time.sleep(0.05)
    """
)


@pytest.fixture()
def child(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


def _executor(child: Path) -> LocalExecutor:
    return LocalExecutor(command=[sys.executable, str(child)])


def _spec(tmp_path: Path, mode: str) -> Path:
    spec = tmp_path / f"{mode}.spec"
    spec.write_text(mode)
    return spec


async def test_events_and_clean_exit(child: Path, tmp_path: Path) -> None:
    ex = _executor(child)
    handle = await ex.submit(1, _spec(tmp_path, "ok"), tmp_path / "run1", os.environ)
    assert handle.pgid == handle.pid and os.getpgid(handle.pid) == handle.pid  # own process group
    events = [e async for e in ex.events(handle)]
    info = await ex.wait(handle)
    assert [e["step"] for e in events if e.get("event") == "step"] == [0, 1, 2]
    assert {"event": "output", "line": "plain text line"} in events
    assert info.returncode == 0 and info.signal is None
    assert handle.stdout_log.read_text().count("\n") == 4


async def test_crash_keeps_stderr_tail(child: Path, tmp_path: Path) -> None:
    ex = _executor(child)
    handle = await ex.submit(2, _spec(tmp_path, "crash"), tmp_path / "run2", os.environ)
    [e async for e in ex.events(handle)]
    info = await ex.wait(handle)
    assert info.returncode == 1 and "boom in dataset" in info.stderr_tail
    assert info.describe() == "exited with status 1"


async def test_cancel_lets_the_child_checkpoint(child: Path, tmp_path: Path) -> None:
    ex = _executor(child)
    handle = await ex.submit(3, _spec(tmp_path, "checkpointing"), tmp_path / "run3", os.environ)
    events = ex.events(handle)
    assert (await anext(events))["step"] == 1
    info = await ex.cancel(handle, grace_s=10)
    rest = [e async for e in events]
    assert info.returncode == 75
    assert {"event": "checkpoint", "step": 7} in rest


async def test_cancel_kills_a_child_that_ignores_sigterm(child: Path, tmp_path: Path) -> None:
    ex = _executor(child)
    handle = await ex.submit(4, _spec(tmp_path, "stubborn"), tmp_path / "run4", os.environ)
    events = ex.events(handle)
    await anext(events)
    started = time.monotonic()
    info = await ex.cancel(handle, grace_s=0.5)
    assert info.signal == signal.SIGKILL and info.describe() == "killed by signal SIGKILL"
    assert time.monotonic() - started < 5


async def test_an_over_long_line_is_skipped_not_an_error(child: Path, tmp_path: Path) -> None:
    ex = _executor(child)
    handle = await ex.submit(6, _spec(tmp_path, "long"), tmp_path / "run6", os.environ)
    events = [e async for e in ex.events(handle)]
    assert (await ex.wait(handle)).returncode == 0
    assert events == [
        {"event": "step", "step": 1},
        {"event": "output_skipped", "bytes": (9 << 20) + 3, "reason": "a stdout line longer than 8388608 bytes was skipped"},
        {"event": "output_skipped", "bytes": 9 << 20, "reason": "a stdout line longer than 8388608 bytes was skipped"},
    ]
    assert handle.stdout_log.read_text() == '{"event": "step", "step": 1}\n'


async def test_a_log_that_cannot_be_written_raises_from_events(child: Path, tmp_path: Path) -> None:
    """ENOSPC on stdout.jsonl is the caller's to handle (the runner stops the child): never silent."""
    run_dir = tmp_path / "run7"
    run_dir.mkdir()
    (run_dir / "stdout.jsonl").symlink_to("/dev/full")
    ex = _executor(child)
    handle = await ex.submit(7, _spec(tmp_path, "chatty"), run_dir, os.environ)
    with pytest.raises(OSError, match="No space left on device"):
        [e async for e in ex.events(handle)]
    info = await ex.cancel(handle, grace_s=5)  # nobody reads its pipe any more: the group is stopped all the same
    assert info.returncode is not None and not _group_exists(handle.pgid)


async def test_reap_an_orphan_by_process_group(child: Path, tmp_path: Path) -> None:
    """A child left behind by a daemon that died (here: started by another process) is found and stopped."""
    run_dir = tmp_path / "run5"
    run_dir.mkdir()
    orphan = subprocess.Popen(
        [sys.executable, str(child), str(_spec(tmp_path, "stubborn"))],
        cwd=run_dir, start_new_session=True, stdout=subprocess.DEVNULL,
    )
    ex = _executor(child)
    try:
        await asyncio.sleep(0.3)
        assert ex.alive(orphan.pid, orphan.pid, run_dir)
        assert not ex.alive(orphan.pid, orphan.pid, tmp_path / "some-other-run")  # pid reuse guard
        assert await ex.reap(orphan.pid, orphan.pid, run_dir, grace_s=0.5)
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert not ex.alive(orphan.pid, orphan.pid, run_dir)
        assert not await ex.reap(orphan.pid, orphan.pid, run_dir, grace_s=0.5)
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_parse_event() -> None:
    assert parse_event('{"event": "step", "step": 3}\n') == {"event": "step", "step": 3}
    assert parse_event("[1, 2]") == {"event": "output", "line": "[1, 2]"}
    assert parse_event("{not json") == {"event": "output", "line": "{not json"}
