"""The runner inside the real daemon (`python -m atlasd run`), with real trainer children
(`python -m trainers run`, tiny offline models) and a real Postgres: end to end, crashes,
kill -9 and SIGTERM of the daemon, cancel, and the wall-clock limit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from atlasd import queue
from atlasd.executor import _group_exists
from atlasd.testing.daemon import DaemonProcess, wait_until
from tests.traces import arithmetic_session

RUN_TIMEOUT = 240  # generous: a loaded 2-core machine runs several torch children at once


def write_policy(policies: Path, name: str, tiny_models: tuple[str, str], *, teacher: str | None = None,
                 max_steps: int = 4, wall_clock_limit: str = "1h", max_retries: int = 0,
                 learning_key: str | None = "math", save_steps: int = 100) -> None:
    t, s = tiny_models
    policies.mkdir(exist_ok=True)
    doc = {
        "name": name,
        "learning_key": learning_key,
        "teacher": teacher or t,
        "student": s,
        "retry": {"max_retries": max_retries},
        # met by any checkpoint (no champion yet: promoted; afterwards it must beat the champion)
        "targets": {"baseline_success": 0.0, "min_success_delta": 0.0},
        "gears": {
            "fast": {
                "trigger": {"batch": {"every": 20000}},  # runs come from the tests, not the cadence
                "filters": {"min_reward": 0.5, "rehearsal_fraction": 0.0},
                "gkd": {"max_new_tokens": 6, "lmbda": 0.5},
                "optim": {"learning_rate": 5e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                          "max_steps": max_steps, "save_steps": save_steps, "max_length": 96},
                "eval": {"eval_fraction": 0.2, "max_samples": 2, "max_new_tokens": 6},
                "wall_clock_limit": wall_clock_limit,
            }
        },
    }
    (policies / f"{name}.yaml").write_text(yaml.safe_dump(doc))


def seed(db_url: str, n: int = 20) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(n):
            arithmetic_session(conn, i, 2)
        return conn.execute("SELECT max(seq) FROM atlasd.intake").fetchone()[0]


def enqueue(db_url: str, policy: str, window_hi: int) -> int:
    async def go() -> int:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            queued = await queue.enqueue(conn, policy=policy, gear="fast", trigger="manual", window_lo=0,
                                         window_hi=window_hi, n_traces=window_hi, priority=0)
            return queued.run.id

    return asyncio.run(go())


def runs(db_url: str) -> dict[int, dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return {r["id"]: r for r in conn.execute("SELECT * FROM atlasd.runs ORDER BY id").fetchall()}


def wait_state(db_url: str, run_id: int, states: set[str], timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    return wait_until(lambda: (r := runs(db_url).get(run_id)) and r["state"] in states and r,
                      timeout, f"run {run_id} in {states}", interval=0.3)


def wait_step(db_url: str, run_id: int, at_least: int = 1) -> dict[str, Any]:
    def stepped():
        r = runs(db_url).get(run_id)
        if r and r["state"] not in ("queued", "running"):
            raise AssertionError(f"run {run_id} ended before step {at_least}: {r['state']} {r['error']}")
        return r and (r["metrics"] or {}).get("step", 0) >= at_least and r
    return wait_until(stepped, RUN_TIMEOUT, f"run {run_id} at step {at_least}", interval=0.2)


def daemon(db_url: str, policies: Path, state: Path, **env: str) -> DaemonProcess:
    return DaemonProcess(db_url, state, ATLASD_POLICIES_DIR=str(policies), ATLASD_RUNNER_POLL_S="0.3", ATLASD_CHILD_STOP_TIMEOUT_S="60", OMP_NUM_THREADS="1", **env)


def assert_never_overlapping(rows: list[dict[str, Any]]) -> None:
    spans = sorted((r["started_at"], r["finished_at"]) for r in rows if r["started_at"])
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end is not None and start >= end, spans


def test_runs_end_to_end_and_a_crash_does_not_stop_the_next(db_url, tiny_models, tmp_path):
    policies = tmp_path / "policies"
    write_policy(policies, "math", tiny_models)
    write_policy(policies, "broken", tiny_models, teacher=str(tmp_path / "no-such-teacher"))
    hi = seed(db_url)
    bad = enqueue(db_url, "broken", hi)
    good = enqueue(db_url, "math", hi)
    with daemon(db_url, policies, tmp_path / "state") as d:
        failed = wait_state(db_url, bad, {"failed", "succeeded"})
        done = wait_state(db_url, good, {"succeeded", "failed"})
        assert done["state"] == "succeeded", done["error"]
        # registration runs beside the next run (not in the GPU slot): queue the next one once it is done
        wait_until(lambda: runs(db_url)[good]["model_version"], 120, "the first run's registration")
        after = enqueue(db_url, "math", hi)
        second = wait_state(db_url, after, {"succeeded", "failed"})
        wait_until(lambda: runs(db_url)[after]["model_version"], 120, "the second run's registration")
        assert d.stop() == 0
    done = runs(db_url)[good]
    # the crash: failed, exit status and the trainer's error visible, no retry (max_retries 0)
    assert failed["state"] == "failed" and failed["exit_code"] not in (0, None)
    assert "no-such-teacher" in failed["error"]
    # the success: metrics and result stored on the row, checkpoint on disk
    assert done["metrics"]["step"] == 4 and isinstance(done["metrics"]["loss"], float)
    assert done["result"]["status"] == "succeeded" and done["result"]["steps"] == 4
    assert Path(done["result"]["checkpoint"], "config.json").is_file()
    assert done["spec"]["student"] == tiny_models[1] and done["spec"]["traces"]["window_hi"] == hi
    assert "db_url" not in json.dumps(done["spec"]) or done["spec"]["traces"]["db_url"] is None
    assert_never_overlapping(list(runs(db_url).values()))
    assert len(runs(db_url)) == 3
    # every trainer line was logged with its run id
    trainer_lines = [e for e in d.events if e.get("event") == "trainer"]
    assert {e["run_id"] for e in trainer_lines} == {bad, good, after}
    # registry step: the first good run became version 1 and champion; the next run started from it
    assert done["model_version"] == "1" and done["registered_at"] is not None
    with psycopg.connect(db_url) as conn:
        audit = conn.execute("SELECT action, to_version FROM atlasd.promotions ORDER BY id").fetchall()
        registrations = conn.execute("SELECT run_id, state FROM atlasd.registrations ORDER BY run_id").fetchall()
    assert audit[0] == ("promote", "1")
    assert registrations == [(good, "done"), (after, "done")]  # the failed run left no result.json to log
    assert second["spec"]["champion_version"] == "1" and second["champion_version"] == "1"
    assert second["spec"]["student"] != tiny_models[1] and Path(second["spec"]["student"], "config.json").is_file()


def test_killed_child_fails_and_is_retried_within_the_limit(db_url, tiny_models, tmp_path):
    policies = tmp_path / "policies"
    write_policy(policies, "math", tiny_models, max_steps=400, max_retries=1)
    hi = seed(db_url)
    first = enqueue(db_url, "math", hi)
    with daemon(db_url, policies, tmp_path / "state") as d:
        row = wait_step(db_url, first)
        os.kill(row["pid"], signal.SIGKILL)
        failed = wait_state(db_url, first, {"failed"})
        assert "killed by signal SIGKILL" in failed["error"]
        retry = wait_until(lambda: [r for r in runs(db_url).values() if r["parent_run_id"] == first],
                           30, "the retry run")[0]
        assert retry["trigger"] == "retry" and retry["attempt"] == 1
        row = wait_step(db_url, retry["id"])
        # it continues the first attempt's folder (its data snapshot; from its last checkpoint, if any)
        assert row["spec"]["resume"] is True and row["output_dir"] == failed["output_dir"]
        os.kill(row["pid"], signal.SIGKILL)
        wait_state(db_url, retry["id"], {"failed"})
        assert d.stop() == 0
    # max_retries 1: the retry's failure is final, and left visible
    assert len(runs(db_url)) == 2
    assert any(e.get("event") == "run failed; no automatic retry left" for e in d.events)


def test_sigterm_of_the_daemon_checkpoints_and_the_run_resumes(db_url, tiny_models, tmp_path):
    policies = tmp_path / "policies"
    write_policy(policies, "math", tiny_models, max_steps=300)
    hi = seed(db_url)
    run_id = enqueue(db_url, "math", hi)
    state = tmp_path / "state"
    with daemon(db_url, policies, state) as d:
        child = wait_step(db_url, run_id, 2)["pid"]
        assert d.stop(timeout=120) == 0
    assert not _group_exists(child)
    row = runs(db_url)[run_id]
    assert row["state"] == "interrupted" and row["exit_code"] == 75
    assert "the daemon is stopping" in row["error"] and "checkpoint saved at step" in row["error"]
    saved = row["result"]["steps"]
    assert (Path(row["output_dir"]) / "checkpoints" / f"step-{saved}" / "config.json").is_file()
    resume = [r for r in runs(db_url).values() if r["parent_run_id"] == run_id]
    assert len(resume) == 1 and resume[0]["state"] == "queued" and resume[0]["trigger"] == "resume"

    with daemon(db_url, policies, state) as d:
        done = wait_state(db_url, resume[0]["id"], {"succeeded", "failed"})
        d.stop()
    assert done["state"] == "succeeded", done["error"]
    assert done["spec"]["resume"] is True and done["output_dir"] == row["output_dir"]
    assert done["result"]["steps"] == 300  # the same final step count as an uninterrupted run


def test_kill_9_of_the_daemon_then_restart_reaps_the_orphan_and_resumes(db_url, tiny_models, tmp_path):
    policies = tmp_path / "policies"
    write_policy(policies, "math", tiny_models, max_steps=300, save_steps=10)
    hi = seed(db_url)
    run_id = enqueue(db_url, "math", hi)
    second = enqueue(db_url, "math", hi)  # queued behind: must not start beside the orphan
    state = tmp_path / "state"
    with daemon(db_url, policies, state) as d:
        orphan = wait_step(db_url, run_id, 3)["pid"]
        d.proc.kill()
        d.proc.wait(10)
    with daemon(db_url, policies, state) as d:
        d.wait_for("orphaned run recovered", timeout=120)
        assert not _group_exists(orphan)  # reaped before anything else was started
        row = wait_state(db_url, run_id, {"interrupted"})
        assert "daemon stopped unexpectedly" in row["error"]
        resumed = wait_until(lambda: [r for r in runs(db_url).values() if r["parent_run_id"] == run_id],
                             30, "the resume run")[0]
        done = wait_state(db_url, resumed["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded", done["error"]
        wait_state(db_url, second, {"succeeded", "failed"})
        d.stop()
    assert done["result"]["steps"] == 300
    assert_never_overlapping(list(runs(db_url).values()))


def test_cancel_and_wall_clock_limit_stop_the_child(db_url, tiny_models, tmp_path):
    policies = tmp_path / "policies"
    write_policy(policies, "math", tiny_models, max_steps=400)
    write_policy(policies, "slow", tiny_models, max_steps=400, wall_clock_limit="8s", max_retries=2)
    hi = seed(db_url)
    cancelled = enqueue(db_url, "math", hi)
    limited = enqueue(db_url, "slow", hi)
    with daemon(db_url, policies, tmp_path / "state") as d:
        child = wait_step(db_url, cancelled)["pid"]
        asyncio.run(_cancel(db_url, cancelled))
        row = wait_state(db_url, cancelled, {"cancelled"})
        assert not _group_exists(child)
        assert "cancelled by the operator" in row["error"] and row["exit_code"] == 75
        row = wait_state(db_url, limited, {"failed"})
        d.stop()
    assert "wall-clock limit" in row["error"]
    assert [r for r in runs(db_url).values() if r["parent_run_id"] is not None] == []  # neither is re-queued


async def _cancel(db_url: str, run_id: int) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await queue.cancel(conn, run_id)


@pytest.fixture(autouse=True)
def _no_stray_trainers(tmp_path):
    yield
    # every trainer this test started (its spec lies under the test's tmp_path) has been stopped
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_trainer_of(p, tmp_path)]
    assert leftovers == [], leftovers


def _is_trainer_of(proc: Path, tmp_path: Path) -> bool:
    try:
        cmd = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    mine = str(tmp_path).encode()
    return b"trainers" in cmd and any(b"run_spec-" in c and c.startswith(mine) for c in cmd)


def test_a_resume_only_trusts_run_folders_under_the_state_dir(tmp_path: Path) -> None:
    from atlasd.runner import confined_run_dir, run_dir_for
    from atlasd.settings import load_settings

    settings = load_settings(state_dir=tmp_path / "state")
    own = run_dir_for(settings, 7)
    assert confined_run_dir(settings, str(own)) == own
    assert confined_run_dir(settings, str(settings.state_dir / "runs" / "run-7")) == own
    for elsewhere in ("/tmp/attacker", str(own / ".." / ".." / "x"), str(settings.state_dir / "runs"),
                      str(own / "checkpoints"), str(settings.state_dir / "runs" / "other"), None, ""):
        assert confined_run_dir(settings, elsewhere) is None, elsewhere
