"""Run faults: the runner component in-process with its own connection pool on a real
Postgres, and real trainer children: a stand-in for `python -m trainers run` (the real telemetry,
checkpoints and result.json, in milliseconds) steered per run by ``$STANDIN_PLAN``. Faults are
injected with SQL (pg_terminate_backend, ALLOW_CONNECTIONS false, triggers), /dev/full and
children that crash or hang. Every test ends with the invariants: no trainer left, never two
runs running at once, every succeeded run with a registration row."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from atlasd import promotions, queue
from atlasd.cli import main
from atlasd.db import connect_kwargs
from atlasd.executor import LocalExecutor
from atlasd.logging import configure_logging
from atlasd.promotions import RegistrationRetrier
from atlasd.runner import RunnerComponent
from atlasd.sdnotify import Notifier
from atlasd.settings import load_settings
from atlasd.testing import pg

STANDIN = textwrap.dedent(
    '''
    """Stand-in trainer: `python standin.py SPEC.json`; the plan for this run comes from $STANDIN_PLAN."""
    import json, os, signal, sys, time
    from pathlib import Path
    from trainers.telemetry import Telemetry
    from atlasd.settings import SECRET_ENV

    spec = json.loads(Path(sys.argv[1]).read_text())
    run_id, out = spec["run_id"], Path(spec["output_dir"])
    plans = json.loads(os.environ.get("STANDIN_PLAN", "{}"))
    plan = {"steps": 6, "step_s": 0.05, "save_every": 2, "heartbeat_s": 0.2, **plans.get("*", {}),
            **plans.get(str(run_id), {})}
    tel = Telemetry(run_id, heartbeat_s=plan["heartbeat_s"])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def checkpoints():
        root = out / "checkpoints"
        return sorted(int(p.name[5:]) for p in root.glob("step-*")) if root.is_dir() else []

    def save(step):
        (out / "checkpoints" / f"step-{step}").mkdir(parents=True, exist_ok=True)
        tel.emit("checkpoint", step=step)

    def finish(status, code, step, error=None):
        final = out / "final" if status == "succeeded" else None
        (out / "result.json").write_text(json.dumps({"run_id": run_id, "status": status, "steps": step,
                                                      "error": error, "checkpoint": final and str(final)}))
        with open(os.environ["STANDIN_LOG"], "a") as log:
            log.write(json.dumps({"run_id": run_id, "pid": os.getpid(), "resumed_from": start, "step": step,
                                  "exit_code": code, "exited_at": time.time(), "argv": sys.argv,
                                  "credentials": sorted(k for k in SECRET_ENV if k in os.environ),
                                  }) + "\\n")
        tel.emit("done", status=status, exit_code=code, steps=step)
        tel.close()
        sys.exit(code)

    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    (out / "data" / "train.jsonl").write_text("{}\\n")  # the data snapshot: a retry may resume here
    start = (checkpoints() or [0])[-1] if spec["resume"] else 0
    tel.emit("start", resume=spec["resume"], resumed_from=start, pid=os.getpid())
    tel.start_heartbeat()
    tel.progress(plan["steps"], start)
    step = start
    while step < plan["steps"]:
        if stop:
            save(step)
            finish("interrupted", 75, step)
        time.sleep(plan["step_s"])
        step += 1
        tel.emit("step", step=step, total_steps=plan["steps"], loss=1.0 / step)
        tel.advance(step)
        if step % plan["save_every"] == 0:
            save(step)
        if step == plan.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)
        if step == plan.get("fail_at"):
            tel.emit("error", kind="failed", error="ValueError: a bad batch")
            finish("failed", 1, step, "ValueError: a bad batch")
        if step == plan.get("long_line_at"):
            with tel._lock:
                sys.stdout.write("{" + "x" * plan["long_line_bytes"] + "}\\n")
                sys.stdout.flush()
        if step == plan.get("hang_at"):
            while True:  # the main thread hangs (a CUDA call): SIGTERM's flag is never read; heartbeats go on
                time.sleep(0.1)
        while step == plan.get("wait_at") and not Path(plan["wait_file"]).exists():
            if stop:
                break
            time.sleep(0.05)
    (out / "final").mkdir(exist_ok=True)
    finish("succeeded", 0, step)
    '''
)


class LogCapture(io.StringIO):
    """The runner's JSON log lines, kept for assertions."""

    def events(self, name: str | None = None) -> list[dict]:
        rows = [json.loads(line) for line in self.getvalue().splitlines() if line.startswith("{")]
        return [r for r in rows if name is None or r.get("event") == name]


def write_policy(policies: Path, name: str, *, max_retries: int = 0, resume_interrupted: bool = True,
                 wall_clock_limit: str = "1h") -> None:
    policies.mkdir(exist_ok=True)
    doc = {"name": name, "teacher": "stand-in-teacher", "student": "stand-in-student", "learning_key": "math",
           "retry": {"max_retries": max_retries}, "resume_interrupted": resume_interrupted,
           "gears": {"fast": {"trigger": {"batch": {"every": 20000}}, "wall_clock_limit": wall_clock_limit}}}
    (policies / f"{name}.yaml").write_text(yaml.safe_dump(doc))


class Harness:
    """The runner (and, with ``registrar``, the registration component) on its own pool, as the
    daemon runs them; the stand-in trainer as its child."""

    def __init__(self, db_url: str, tmp_path: Path, monkeypatch, *, registrar: bool = False,
                 real_champion: bool = False, plan: dict | None = None, **settings: Any) -> None:
        self.db_url, self.tmp = db_url, tmp_path
        self.state = tmp_path / "state"
        self.policies = tmp_path / "policies"
        self.policies.mkdir(exist_ok=True)
        self.exits = tmp_path / "exits.jsonl"
        script = tmp_path / "standin.py"
        script.write_text(STANDIN)
        monkeypatch.setenv("STANDIN_PLAN", json.dumps(plan or {}))
        monkeypatch.setenv("STANDIN_LOG", str(self.exits))
        if not real_champion:
            async def no_champion(settings, policy):
                return {"policy": policy, "champion": None, "path": None}
            monkeypatch.setattr(promotions, "champion", no_champion)
        self.settings = load_settings(**{
            "db_url": db_url, "state_dir": self.state, "policies_dir": self.policies, "runner_poll_s": 0.2,
            "child_stop_timeout_s": 5, "poll_interval_s": 3600, "reconnect_max_backoff_s": 1,
            "stale_heartbeat_s": 60, "stale_progress_s": 60, **settings})
        self.log = LogCapture()
        configure_logging("json", "info", stream=self.log)
        self.registrar = RegistrationRetrier(self.settings) if registrar else None
        self.runner = RunnerComponent(self.settings, LocalExecutor(command=[sys.executable, str(script)]),
                                      registrar=self.registrar)

    async def __aenter__(self) -> Harness:
        # the daemon's pool, but a wait for a connection gives up after 2 s (30 s there): outages outlast it
        pool = AsyncConnectionPool(self.db_url, min_size=1, max_size=4, kwargs=connect_kwargs("atlasd"), open=False,
                                   timeout=2)
        await pool.open(wait=True, timeout=10)
        components = [c for c in (self.runner, self.registrar) if c is not None]
        self.daemon = SimpleNamespace(pool=pool, stopping=asyncio.Event(), lock_held=asyncio.Event(),
                                      gpu_slot=asyncio.Lock(), components=components, notifier=Notifier(""))
        self.daemon.lock_held.set()
        for component in components:
            await component.start(self.daemon)
        return self

    async def __aexit__(self, *exc) -> None:
        self.daemon.stopping.set()
        for component in reversed(self.daemon.components):
            await component.stop()
        await self.daemon.pool.close()
        leftovers = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _child_of_test(p, self.tmp)]
        assert leftovers == [], f"children left running: {leftovers}"

    def exited(self) -> list[dict]:
        return [json.loads(line) for line in self.exits.read_text().splitlines()] if self.exits.exists() else []


def _child_of_test(proc: Path, tmp: Path) -> bool:
    try:
        cmd = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return str(tmp).encode() in cmd and (b"standin.py" in cmd or b"registry" in cmd)


async def sql(db_url: str, query: str, params: Any = None) -> list[dict]:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True, application_name="test") as conn:
        cur = await conn.cursor(row_factory=dict_row).execute(query, params)
        return await cur.fetchall() if cur.description else []


async def runs(db_url: str) -> dict[int, dict]:
    return {r["id"]: r for r in await sql(db_url, "SELECT * FROM atlasd.runs ORDER BY id")}


async def registrations(db_url: str) -> dict[int, dict]:
    return {r["run_id"]: r for r in await sql(db_url, "SELECT * FROM atlasd.registrations ORDER BY run_id")}


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.1)


async def wait_state(db_url: str, run_id: int, states: set[str], timeout: float = 20) -> dict:
    async def reached():
        row = (await runs(db_url)).get(run_id)
        return row if row and row["state"] in states else None
    return await until(reached, timeout, f"run {run_id} in {states}")


async def enqueue(db_url: str, policy: str = "math", n: int = 5) -> int:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        return (await queue.enqueue(conn, policy=policy, gear="fast", trigger="manual", window_lo=0, window_hi=n,
                                    n_traces=n, priority=0)).run.id


async def assert_invariants(db_url: str, first_run: int = 1) -> None:
    """Never two runs running at once (from ``first_run``: rows before it were written by the test)
    and every succeeded run with its registration row."""
    rows = list((await runs(db_url)).values())
    spans = sorted((r["started_at"], r["finished_at"]) for r in rows
                   if r["id"] >= first_run and r["started_at"] and r["state"] != "queued")
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end is not None and start >= end, f"two runs at once: {spans}"
    regs = await registrations(db_url)
    assert [r["id"] for r in rows if r["state"] == "succeeded" and r["id"] not in regs] == []


# ---------------------------------------------------------------------------------- 1. one write
async def test_outcome_and_registration_row_are_written_in_one_transaction(db_url, tmp_path, monkeypatch):
    """The connection dies inside the outcome's transaction, after the run was marked succeeded:
    nothing of it is committed, the runner writes it again, and no reader ever sees a succeeded
    run without its registration row."""
    write_policy(tmp_path / "policies", "math")
    await sql(db_url, """
        CREATE SEQUENCE fault_once;
        CREATE FUNCTION die_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('fault_once') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER die_once BEFORE INSERT ON atlasd.registrations FOR EACH ROW EXECUTE FUNCTION die_once();""")
    run_id = await enqueue(db_url)
    seen: list[tuple[str, bool]] = []

    async def look() -> None:
        seen.extend((r["state"], r["registered"]) for r in await sql(db_url, """
            SELECT state, EXISTS (SELECT 1 FROM atlasd.registrations g WHERE g.run_id = r.id) AS registered
              FROM atlasd.runs r"""))

    async def watch() -> None:
        while True:
            await look()
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    async with Harness(db_url, tmp_path, monkeypatch) as h:
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    watcher.cancel()
    await look()  # the watcher may have been cancelled before its first look at the outcome
    assert done["state"] == "succeeded", done["error"]
    assert ("succeeded", False) not in seen and ("succeeded", True) in seen
    reg = (await registrations(db_url))[run_id]
    assert reg["state"] == "pending" and reg["result_path"].endswith(f"result-{run_id}.json")
    assert json.loads(Path(reg["result_path"]).read_text())["run_id"] == run_id
    assert [e for e in h.log.events("database unavailable; retrying") if "outcome" in e["action"]]
    await assert_invariants(db_url)


# ---------------------------------------------------------------------------------- 2. dead connections
async def test_dead_pooled_connections_at_run_end_do_not_freeze_the_queue(db_url, tmp_path, monkeypatch):
    """While the trainer runs every pooled connection is terminated and the database refuses new
    ones; the trainer ends meanwhile. The runner retries its outcome write with backoff, writes it
    once the database is back, and the next queued run starts: no restart needed."""
    write_policy(tmp_path / "policies", "math")
    release = tmp_path / "release"
    first, second = await enqueue(db_url), await enqueue(db_url)
    dbname = db_url.rsplit("/", 1)[1]
    plan = {str(first): {"wait_at": 3, "wait_file": str(release)}}
    async with Harness(db_url, tmp_path, monkeypatch, plan=plan) as h:
        async def at_step_3():
            return ((await runs(db_url))[first]["metrics"] or {}).get("step", 0) >= 3
        await until(at_step_3, 20, "the first run at step 3")
        async with await psycopg.AsyncConnection.connect(pg.ADMIN_URL, autocommit=True) as admin:
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND application_name = 'atlasd'", [dbname])
            release.touch()  # the trainer finishes while the database is away
            await until(lambda: _async(lambda: any(e.get("pid") for e in h.exited())), 20, "the trainer's exit")
            await asyncio.sleep(4)
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        done = await wait_state(db_url, first, {"succeeded", "failed"}, timeout=40)
        nxt = await wait_state(db_url, second, {"succeeded", "failed"}, timeout=40)
    assert done["state"] == "succeeded" and nxt["state"] == "succeeded", (done["error"], nxt["error"])
    assert set(await registrations(db_url)) == {first, second}
    assert any("outcome" in e["action"] for e in h.log.events("database unavailable; retrying"))
    # the daemon showed the runner degraded meanwhile (STATUS=, atlasd status), then recovered
    assert {e["part"] for e in h.log.events("degraded")} == {"runner"} and h.log.events("recovered")
    assert h.runner.health.faults == []
    await assert_invariants(db_url)


async def test_no_run_is_claimed_while_the_daemon_retakes_its_lock(db_url, tmp_path, monkeypatch):
    write_policy(tmp_path / "policies", "math")
    async with Harness(db_url, tmp_path, monkeypatch) as h:
        h.daemon.lock_held.clear()  # the lock connection was lost: another daemon may take the lock
        run_id = await enqueue(db_url)
        await asyncio.sleep(1.5)
        assert (await runs(db_url))[run_id]["state"] == "queued"
        h.daemon.lock_held.set()
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded"


async def _async(fn: Callable[[], Any]) -> Any:
    return fn()


async def test_reconcile_completes_runs_left_without_outcome_registration_or_follow_up(db_url, tmp_path, monkeypatch):
    """Left behind by a daemon that died, a write that failed or a policy that was not loaded:
    at start, and later while idle, the reconcile stops any orphaned trainer and completes each
    run from what its folder holds."""
    policies = tmp_path / "policies"
    write_policy(policies, "math", max_retries=1)
    write_policy(policies, "once", resume_interrupted=False)
    state = tmp_path / "state"
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)

    async def add(run_id: int, run_state: str, policy: str = "math", result: str | None = None) -> Path:
        out = state / "runs" / f"run-{run_id}"
        out.mkdir(parents=True)
        (out / f"run_spec-{run_id}.json").write_text("{}")
        if result:
            (out / "result.json").write_text(json.dumps({"run_id": run_id, "status": result, "steps": 6}))
        await sql(db_url, """
            INSERT INTO atlasd.runs (id, policy, gear, state, trigger, window_lo, window_hi, n_traces, started_at,
                                     finished_at, host, output_dir, spec)
            VALUES (%s, %s, 'fast', %s, 'manual', 0, 5, 5, now(), CASE WHEN %s THEN now() END, %s, %s, %s)""",
                  [run_id, policy, run_state, run_state != "running", socket.gethostname(), str(out),
                   json.dumps({"student": "stand-in-student"})])
        return out

    # run 1: its trainer is alive, the daemon died before the database had its pid (runner-child.json has it)
    orphan_dir = await add(1, "running")
    await add(2, "succeeded", result="succeeded")  # succeeded before outcome and registration were one write
    await add(3, "failed")  # its policy was not loaded when it failed: follow-up undecided
    await add(4, "failed", policy="gone")  # its policy is still not loaded: stays undecided
    await add(6, "cancelled", policy="once")
    spec1 = orphan_dir / "spec.json"
    spec1.write_text(json.dumps({"run_id": 1, "output_dir": str(orphan_dir), "resume": False}))
    env = {**os.environ, "STANDIN_LOG": str(tmp_path / "exits.jsonl"),
           "STANDIN_PLAN": json.dumps({"1": {"steps": 10_000, "step_s": 0.05}})}
    orphan = subprocess.Popen([sys.executable, str(script), str(spec1)], cwd=orphan_dir, env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL)
    (state / "runner-child.json").write_text(json.dumps({"run_id": 1, "pid": orphan.pid, "pgid": orphan.pid,
                                                          "run_dir": str(orphan_dir)}))
    await until(lambda: _async(lambda: (orphan_dir / "checkpoints").is_dir()), 10, "the orphan's first checkpoint")
    await sql(db_url, "SELECT setval('atlasd.runs_id_seq', 10)")

    async with Harness(db_url, tmp_path, monkeypatch, poll_interval_s=1) as h:
        assert orphan.wait(5) == 75  # stopped before anything else ran (SIGTERM: it saved a checkpoint)
        rows = await runs(db_url)
        assert rows[1]["state"] == "interrupted" and rows[1]["follow_up"] == "resume"
        assert "daemon stopped unexpectedly" in rows[1]["error"] and rows[1]["result"]["status"] == "interrupted"
        assert set(await registrations(db_url)) == {2}
        assert (rows[3]["follow_up"], rows[4]["follow_up"]) == ("retry", None)
        children = {r["parent_run_id"]: r for r in rows.values() if r["parent_run_id"]}
        assert set(children) == {1, 3} and children[1]["trigger"] == "resume" and children[3]["trigger"] == "retry"
        [state_row] = await sql(db_url, "SELECT * FROM atlasd.runner_state")
        assert state_row["repaired"] == 3
        resumed = await wait_state(db_url, children[1]["id"], {"succeeded", "failed"})
        assert resumed["state"] == "succeeded" and resumed["output_dir"] == str(orphan_dir)
        await wait_state(db_url, children[3]["id"], {"succeeded", "failed"})
        # later, while idle: a run left running whose trainer had finished (its outcome write never made it)
        Path(rows[4]["output_dir"], "result.json").write_text(json.dumps({"run_id": 4, "status": "succeeded"}))
        await sql(db_url, """UPDATE atlasd.runs SET state = 'running', finished_at = NULL, policy = 'once'
                              WHERE id = 4""")
        row = await wait_state(db_url, 4, {"succeeded"}, timeout=10)
        assert 4 in await registrations(db_url)
        # and one whose trainer failed once its daemon was gone (broken pipe): interrupted, not failed
        Path(rows[6]["output_dir"], "result.json").write_text(json.dumps(
            {"run_id": 6, "status": "failed", "error": "BrokenPipeError: [Errno 32] Broken pipe"}))
        await sql(db_url, "UPDATE atlasd.runs SET state = 'running', finished_at = NULL WHERE id = 6")
        lost = await wait_state(db_url, 6, {"interrupted", "failed"}, timeout=10)
        assert lost["state"] == "interrupted" and lost["follow_up"] == "none"  # policy once: no resume
        assert "without a supervised trainer (the trainer then failed: BrokenPipeError" in lost["error"]
        [state_row] = await sql(db_url, "SELECT * FROM atlasd.runner_state")
        assert state_row["repaired"] == 5 and state_row["reconciled_at"] > row["finished_at"]
    exits = {e["run_id"]: e for e in h.exited()}
    assert exits[1]["exit_code"] == 75 and exits[children[1]["id"]]["resumed_from"] == exits[1]["step"] > 0
    assert [e["run_id"] for e in h.log.events("orphaned run recovered")] == [1, 4, 6]
    await assert_invariants(db_url, first_run=11)


# ---------------------------------------------------------------------------------- 3. supervisor faults
async def test_an_over_long_stdout_line_is_skipped_with_a_warning(db_url, tmp_path, monkeypatch):
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    plan = {"*": {"long_line_at": 2, "long_line_bytes": 9 << 20}}
    async with Harness(db_url, tmp_path, monkeypatch, plan=plan) as h:
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done["error"]
    assert done["metrics"]["step"] == 6
    [skipped] = h.log.events("trainer output line skipped")
    assert skipped["bytes"] == (9 << 20) + 3 and skipped["run_id"] == run_id
    log = Path(done["output_dir"], "stdout.jsonl").read_text()
    assert "xxxx" not in log and '"event": "done"' in log
    await assert_invariants(db_url)


async def test_enospc_on_the_log_stops_the_trainer_before_the_slot_is_freed_then_retries(db_url, tmp_path, monkeypatch):
    """stdout.jsonl on a full disk: the trainer is stopped (SIGTERM: it checkpoints) before its run
    leaves `running`, the run fails as a supervisor fault and its retry resumes in the same folder."""
    write_policy(tmp_path / "policies", "math", max_retries=1)
    run_id = await enqueue(db_url)
    run_dir = tmp_path / "state" / "runs" / f"run-{run_id}"
    run_dir.mkdir(parents=True)
    (run_dir / "stdout.jsonl").symlink_to("/dev/full")
    async with Harness(db_url, tmp_path, monkeypatch, plan={"*": {"steps": 50, "step_s": 0.1}}) as h:
        first = await wait_state(db_url, run_id, {"failed", "succeeded"})
        retry = await until(lambda: _async_rows(db_url, lambda r: r["parent_run_id"] == run_id), 10, "the retry")
        retry = await wait_state(db_url, retry["id"], {"failed", "succeeded"})
    rows = [first, retry]
    assert [r["state"] for r in rows] == ["failed", "failed"]
    assert all("No space left on device" in r["error"] for r in rows)
    assert retry["trigger"] == "retry" and retry["spec"]["resume"] is True and retry["output_dir"] == str(run_dir)
    exits = {e["run_id"]: e for e in h.exited()}
    for row in rows:  # the trainer was gone (SIGTERM, checkpoint, exit 75) before the run left `running`
        assert exits[row["id"]]["exit_code"] == 75 and row["exit_code"] == 75
        assert exits[row["id"]]["exited_at"] <= row["finished_at"].timestamp()
    assert exits[retry["id"]]["resumed_from"] == exits[run_id]["step"]
    assert [e["run_id"] for e in h.log.events("supervisor fault")] == [run_id, retry["id"]]
    await assert_invariants(db_url)


async def _async_rows(db_url: str, predicate: Callable[[dict], bool]) -> dict | None:
    return next((r for r in (await runs(db_url)).values() if predicate(r)), None)


async def test_a_database_error_recording_the_process_stops_the_trainer_then_retries(db_url, tmp_path, monkeypatch):
    write_policy(tmp_path / "policies", "math", max_retries=1)
    await sql(db_url, """
        CREATE SEQUENCE fault_once;
        CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('fault_once') = 1 THEN RAISE EXCEPTION 'injected: pid column refused'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_once BEFORE UPDATE OF pid ON atlasd.runs FOR EACH ROW
            WHEN (NEW.pid IS NOT NULL AND OLD.pid IS NULL) EXECUTE FUNCTION refuse_once();""")
    run_id = await enqueue(db_url)
    async with Harness(db_url, tmp_path, monkeypatch, plan={"*": {"steps": 8, "step_s": 0.1}}) as h:
        first = await wait_state(db_url, run_id, {"failed", "succeeded"})
        retry = await until(lambda: _async_rows(db_url, lambda r: r["parent_run_id"] == run_id), 10, "the retry")
        retry = await wait_state(db_url, retry["id"], {"failed", "succeeded"})
    assert first["state"] == "failed" and "cannot record the trainer's process" in first["error"]
    assert "injected" in first["error"] and first["exit_code"] == 75
    assert retry["state"] == "succeeded" and retry["spec"]["resume"] is True
    exits = {e["run_id"]: e for e in h.exited()}
    assert exits[run_id]["exited_at"] <= first["finished_at"].timestamp()
    assert exits[retry["id"]]["resumed_from"] == exits[run_id]["step"]
    await assert_invariants(db_url)


# ---------------------------------------------------------------------------------- 4. waste
async def test_retries_after_crashes_resume_from_the_last_checkpoint(db_url, tmp_path, monkeypatch):
    """Attempt 0 fails with a result (registered as failed, its own copy of the result kept),
    attempt 1 is SIGKILLed at step 7 of 10: each retry continues from the last checkpoint."""
    write_policy(tmp_path / "policies", "math", max_retries=2)
    assert await enqueue(db_url) == 1
    plan = {"*": {"steps": 10, "save_every": 2}, "1": {"fail_at": 5}, "2": {"kill_at": 7}}
    async with Harness(db_url, tmp_path, monkeypatch, plan=plan) as h:
        async def third():
            rows = await runs(db_url)
            return len(rows) == 3 and rows[3]["state"] in ("succeeded", "failed") and rows
        rows = await until(third, 20, "the second retry to end")
    assert [rows[i]["state"] for i in (1, 2, 3)] == ["failed", "failed", "succeeded"], [r["error"] for r in rows.values()]
    assert "a bad batch" in rows[1]["error"] and "killed by signal SIGKILL" in rows[2]["error"]
    assert [(rows[i]["trigger"], rows[i]["attempt"], rows[i]["follow_up"]) for i in (1, 2, 3)] == [
        ("manual", 0, "retry"), ("retry", 1, "retry"), ("retry", 2, None)]
    assert {rows[i]["output_dir"] for i in (1, 2, 3)} == {rows[1]["output_dir"]}
    exits = {e["run_id"]: e for e in h.exited()}
    assert (exits[1]["resumed_from"], exits[3]["resumed_from"], exits[3]["step"]) == (0, 6, 10)
    assert rows[3]["result"]["steps"] == 10
    regs = await registrations(db_url)
    assert set(regs) == {1, 3}  # the SIGKILLed attempt left no result of its own
    assert json.loads(Path(regs[1]["result_path"]).read_text())["status"] == "failed"
    assert json.loads(Path(regs[3]["result_path"]).read_text())["run_id"] == 3
    await assert_invariants(db_url)


async def test_a_hung_main_thread_is_stale_although_its_heartbeats_go_on(db_url, tmp_path, monkeypatch):
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    started = time.monotonic()
    async with Harness(db_url, tmp_path, monkeypatch, plan={"*": {"hang_at": 2, "heartbeat_s": 0.2}},
                       stale_progress_s=3, child_stop_timeout_s=1) as h:
        async def hung():
            row = (await runs(db_url))[run_id]
            return row["state"] == "running" and row["progress_at"] and \
                (row["heartbeat_at"] - row["progress_at"]).total_seconds() > 1.5 and row
        seen = await until(hung, 20, "heartbeats without progress")
        done = await wait_state(db_url, run_id, {"failed", "succeeded"})
    assert done["state"] == "failed" and "no progress for 3s, heartbeats only" in done["error"]
    assert done["exit_code"] == -signal.SIGKILL  # its SIGTERM flag was never read: SIGKILL after the grace
    assert seen["metrics"]["step"] == 2 and time.monotonic() - started < 20
    [stop] = h.log.events("stopping the trainer")
    assert stop["reason"] == "stale"
    await assert_invariants(db_url)


# ---------------------------------------------------------------------------------- 5. registration, MLflow
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_registry_unavailable_at_start_defers_the_run_without_spending_a_retry(db_url, tmp_path, monkeypatch,
                                                                                    capsys):
    """The tracking server is down: the champion fetch fails fast (seconds, not MLflow's ~4 min of
    retries) and the run goes back to the queue with backoff, its window and attempts intact."""
    write_policy(tmp_path / "policies", "math", max_retries=2)
    run_id = await enqueue(db_url)
    started = time.monotonic()
    async with Harness(db_url, tmp_path, monkeypatch, real_champion=True,
                       mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}") as h:
        deferred = await until(lambda: _async_rows(db_url, lambda r: r["deferrals"] == 1), 40, "the deferral")
        assert time.monotonic() - started < 40
        assert (deferred["state"], deferred["attempt"], deferred["window_hi"]) == ("queued", 0, 5)
        assert "MLflow registry" in deferred["error"] and deferred["started_at"] is None
        wait = (deferred["not_before"] - (await sql(db_url, "SELECT now()"))[0]["now"]).total_seconds()
        assert 20 < wait <= 30
        monkeypatch.setenv("ATLASD_DB_URL", db_url)
        assert await asyncio.to_thread(main, ["runs"]) == 0
        configure_logging("json", "info", stream=h.log)  # the command logged to stderr
        assert f"queued (deferred to {deferred['not_before']:%H:%M:%S})" in capsys.readouterr().out
        # the store is back: the run starts at its next try
        async def no_champion(settings, policy):
            return {"policy": policy, "champion": None, "path": None}
        monkeypatch.setattr(promotions, "champion", no_champion)
        await sql(db_url, "UPDATE atlasd.runs SET not_before = now() WHERE id = %s", [run_id])
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["attempt"] == 0 and len(await runs(db_url)) == 1
    [event] = h.log.events("run start deferred: registry unavailable")
    assert event["retry_in_s"] == 30
    await assert_invariants(db_url)


async def test_registration_runs_off_the_gpu_slot_and_a_stop_kills_its_child(db_url, tmp_path, monkeypatch):
    """A tracking server that accepts connections and never answers: the registration of the
    first run hangs in its child while the next run trains; stopping the daemon kills the child
    and leaves the registration pending (attempts unchanged) for the next start."""
    write_policy(tmp_path / "policies", "math")
    first, second = await enqueue(db_url), await enqueue(db_url)
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        uri = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        async with Harness(db_url, tmp_path, monkeypatch, registrar=True, mlflow_tracking_uri=uri):
            done = await wait_state(db_url, first, {"succeeded", "failed"})
            nxt = await wait_state(db_url, second, {"succeeded", "failed"})
            assert (nxt["started_at"] - done["finished_at"]).total_seconds() < 2
            regs = await registrations(db_url)
            assert regs[first]["state"] == "pending" and regs[first]["attempts"] == 0
            assert any(_child_of_test(p, tmp_path) for p in Path("/proc").iterdir() if p.name.isdigit())
    assert done["state"] == nxt["state"] == "succeeded"
    regs = await registrations(db_url)
    assert [(r["state"], r["attempts"]) for r in regs.values()] == [("pending", 0), ("pending", 0)]
    await assert_invariants(db_url)


@pytest.fixture(autouse=True)
def _reset_logging():
    yield
    configure_logging("json", "info", stream=sys.__stderr__)  # not a test's closed buffer


async def test_no_password_reaches_run_rows_run_files_logs_argv_or_cli_output(db_url, tmp_path, monkeypatch):
    """Passwords with '@' in them (percent-encoded where libpq requires it, raw in an MLflow URL)."""
    db_secret, mlflow_secret = "s3cr%40t-db", "p@ss-mlflow"
    secret_db_url = db_url.replace("postgresql://postgres@", f"postgresql://postgres:{db_secret}@")
    assert secret_db_url != db_url
    mlflow_uri = f"http://atlas:{mlflow_secret}@127.0.0.1:1"
    monkeypatch.setenv("ATLASD_DB_URL", secret_db_url)
    monkeypatch.setenv("ATLASD_MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("PGPASSWORD", "s3cr@t-pg")
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    async with Harness(secret_db_url, tmp_path, monkeypatch, mlflow_tracking_uri=mlflow_uri) as h:
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done["error"]
    secrets = ("s3cr%40t-db", "s3cr@t-db", "p@ss-mlflow", "p%40ss-mlflow", "s3cr@t-pg")

    def clean(text: str, where: str) -> None:
        assert not [x for x in secrets if x in text], f"a password in {where}"

    clean(json.dumps(await sql(db_url, "SELECT * FROM atlasd.runs"), default=str), "atlasd.runs")
    spec = (await sql(db_url, "SELECT spec FROM atlasd.runs WHERE id = %s", [run_id]))[0]["spec"]
    assert spec["mlflow"]["tracking_uri"] == "http://atlas@127.0.0.1:1"  # the store, without its password
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            clean(path.read_text(errors="replace"), str(path))
    clean(h.log.getvalue(), "the daemon's log")
    [exit_] = h.exited()
    clean(json.dumps(exit_["argv"]), "the trainer's argv")
    assert exit_["credentials"] == ["ATLASD_DB_URL"]  # the trainer gets the database URL only
    for argv in (["runs", "--json"], ["runs", "show", str(run_id), "--json"], ["runs", "show", str(run_id)],
                 ["status", "--json"], ["registrations", "--json"]):
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "atlasd", *argv], capture_output=True,
                                      text=True, env={**os.environ, "ATLASD_POLICIES_DIR": str(tmp_path / "policies")})
        assert out.returncode == 0, out.stderr
        clean(out.stdout + out.stderr, f"atlasd {' '.join(argv)}")
