"""The Slurm executor (ATLASD_EXECUTOR=slurm) against a stand-in Slurm CLI (tests/slurm_standin.py:
sbatch, squeue, sacct, scancel first on PATH, jobs in a JSON file, each job a background process
group), with the real runner and the chaos suite's stand-in trainer (tests/test_runfault.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atlasd.executor import executor_for
from atlasd.settings import load_settings
from atlasd.slurm import SlurmError, SlurmExecutor, executor_info, parse_exit
from tests.test_runfault import (
    STANDIN,
    Harness,
    assert_invariants,
    enqueue,
    runs,
    sql,
    until,
    wait_state,
    write_policy,
)

STANDIN_CLI = Path(__file__).with_name("slurm_standin.py")


@pytest.fixture()
def slurm(tmp_path, monkeypatch) -> Path:
    """The stand-in Slurm CLI first on PATH; returns its state folder."""
    root, bin_dir = tmp_path / "slurm", tmp_path / "slurm-bin"
    root.mkdir()
    bin_dir.mkdir()
    for command in ("sbatch", "squeue", "sacct", "scancel"):
        exe = bin_dir / command
        exe.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN_CLI} {command} "$@"\n')
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_STANDIN_DIR", str(root))
    return root


def calls(root: Path, command: str | None = None) -> list[dict]:
    path = root / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if command is None or r["command"] == command]


SLURM_SETTINGS = {"executor": "slurm", "slurm_poll_s": 0.2, "slurm_partition": "gpu", "slurm_account": "ml",
                  "slurm_gpus": "1", "slurm_time": "1:00:00", "slurm_extra_args": ["--qos=high"]}


def slurm_harness(db_url: str, tmp_path: Path, monkeypatch, **kw) -> Harness:
    """The chaos suite's harness with the runner's executor replaced by the Slurm executor."""
    h = Harness(db_url, tmp_path, monkeypatch, **{**SLURM_SETTINGS, "slurm_shared_dir": tmp_path, **kw})
    h.runner.executor = SlurmExecutor(h.settings, command=[sys.executable, str(tmp_path / "standin.py")])
    return h


async def cli(*argv: str, env_db: str) -> str:
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "atlasd", *argv], capture_output=True,
                                  text=True, env={**os.environ, "ATLASD_DB_URL": env_db})
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---------------------------------------------------------------------------------- units
def test_exit_codes_of_sacct():
    assert parse_exit("COMPLETED", "0:0") == (0, None)
    assert parse_exit("FAILED", "75:0") == (75, None)
    assert parse_exit("FAILED", "1:0") == (1, None)
    assert parse_exit("CANCELLED by 1000", "0:15") == (-15, 15)
    assert parse_exit("CANCELLED by 1000", "0:0") == (None, None)  # cancelled while pending
    assert parse_exit("NODE_FAIL", "0:0") == (None, None)
    assert parse_exit("TIMEOUT", "garbage") == (None, None)


def test_settings_select_the_executor_and_shape_the_sbatch_call(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLASD_EXECUTOR", "slurm")
    monkeypatch.setenv("ATLASD_SLURM_EXTRA_ARGS", '["--qos=high", "--container-mounts=/shared:/shared"]')
    monkeypatch.setenv("ATLASD_SLURM_CONTAINER_IMAGE", "nvcr.io#nvidia/pytorch:24.05-py3")
    settings = load_settings(state_dir=tmp_path, slurm_gpus="a100:2", slurm_partition="gpu")
    executor = executor_for(settings)
    assert isinstance(executor, SlurmExecutor) and executor.command == ["python", "-m", "trainers", "run"]
    argv = executor.sbatch_argv(7, tmp_path / "runs" / "run-7", tmp_path / "runs" / "run-7" / "slurm-7.sbatch")
    assert argv[:2] == ["sbatch", "--parsable"] and "--job-name=atlasd-run-7" in argv
    assert {"--signal=B:TERM@120", "--export=ALL", "--gpus=a100:2", "--partition=gpu",
            "--container-image=nvcr.io#nvidia/pytorch:24.05-py3", "--qos=high"} <= set(argv)
    assert f"--output={tmp_path}/runs/run-7/slurm-7.out" in argv and not any(a.startswith("--account") for a in argv)
    assert argv[-1].endswith("slurm-7.sbatch")
    assert type(executor_for(load_settings(state_dir=tmp_path, executor="local"))).__name__ == "LocalExecutor"


async def test_a_run_folder_off_the_shared_filesystem_is_refused(tmp_path, slurm):
    executor = SlurmExecutor(load_settings(state_dir=tmp_path / "state", slurm_shared_dir=tmp_path / "shared"))
    with pytest.raises(SlurmError, match="not under the shared filesystem"):
        await executor.submit(1, tmp_path / "spec.json", tmp_path / "state" / "runs" / "run-1", {})
    assert calls(slurm, "sbatch") == []


async def test_a_second_submit_of_a_live_run_reattaches_to_its_job(tmp_path, slurm, monkeypatch):
    """After a restart, a submit of the same run finds its job by name: no second sbatch; the
    output is streamed from the start and the exit status comes from sacct."""
    run_dir = tmp_path / "runs" / "run-7"
    run_dir.mkdir(parents=True)
    gate = tmp_path / "go"
    child = tmp_path / "child.py"
    child.write_text(f"""
import json, os, sys, time
print(json.dumps({{"event": "start"}}), flush=True)
while not os.path.exists({str(gate)!r}):
    time.sleep(0.05)
print(json.dumps({{"event": "step", "step": 1}}), flush=True)
print("plain text", flush=True)
sys.stdout.write('{{"event": "done"}}')  # no newline at the end
""")
    settings = load_settings(state_dir=tmp_path, slurm_poll_s=0.2)
    first = SlurmExecutor(settings, command=[sys.executable, str(child)])
    handle = await first.submit(7, tmp_path / "spec.json", run_dir, {**os.environ})
    await until(lambda: asyncio.sleep(0, (run_dir / "slurm-7.out").exists()), 10, "the job's output")
    again = SlurmExecutor(settings, command=[sys.executable, str(child)])  # a restarted daemon
    attached = await again.submit(7, tmp_path / "spec.json", run_dir, {**os.environ})
    assert attached.pid == attached.pgid == handle.pgid and len(calls(slurm, "sbatch")) == 1
    assert again.alive(attached.pid, attached.pgid, run_dir) and not again.alive(1, 1, run_dir)
    # another deployment's run 7 (same job name, another folder) is not taken for this one
    elsewhere = await again.submit(7, tmp_path / "spec.json", tmp_path / "other" / "run-7", {**os.environ})
    assert elsewhere.pgid != handle.pgid and len(calls(slurm, "sbatch")) == 2
    gate.touch()
    assert (await again.wait(elsewhere)).returncode == 0
    events = [e async for e in again.events(attached)]
    assert events == [{"event": "start"}, {"event": "step", "step": 1}, {"event": "output", "line": "plain text"},
                      {"event": "done"}]
    info = await again.wait(attached)
    assert (info.returncode, info.signal) == (0, None) and info.state == "COMPLETED"
    assert not again.alive(attached.pid, attached.pgid, run_dir)
    assert executor_info(7, run_dir, None) == {"executor": "slurm", "job_id": handle.pgid,
                                               "job_name": "atlasd-run-7"}
    assert (run_dir / "stdout.jsonl").read_text().endswith('{"event": "done"}\n')


async def test_a_job_that_ignores_sigterm_is_scancelled_after_the_grace(tmp_path, slurm):
    run_dir = tmp_path / "runs" / "run-3"
    child = tmp_path / "stubborn.py"
    child.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
                     "while True: time.sleep(0.1)\n")
    executor = SlurmExecutor(load_settings(state_dir=tmp_path, slurm_poll_s=0.2),
                             command=[sys.executable, str(child)])
    handle = await executor.submit(3, tmp_path / "spec.json", run_dir, {**os.environ})
    await until(lambda: asyncio.sleep(0, "up" in (run_dir / "slurm-3.out").read_text(errors="replace")
                                      if (run_dir / "slurm-3.out").exists() else False), 10, "the job")
    info = await executor.cancel(handle, grace_s=1)
    assert [c["argv"] for c in calls(slurm, "scancel")] == [["--signal=TERM", "--batch", str(handle.pgid)],
                                                           [str(handle.pgid)]]
    assert info.state == "CANCELLED" and info.signal is not None
    assert "slurm job" in info.describe() and "CANCELLED" in info.stderr_tail


async def test_reap_finds_an_unrecorded_job_by_name_and_a_resume_stops_its_parents_job(tmp_path, slurm):
    """The daemon died between sbatch and recording the job id (pgid unknown: 0): reap finds the
    job by its name in that run folder and stops it (SIGTERM first). A submit into a folder whose
    earlier run's job still runs stops that job before submitting: never two trainers in a folder."""
    run_dir = tmp_path / "runs" / "run-5"
    child = tmp_path / "patient.py"
    child.write_text("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(75))\n"
                     "print('up', flush=True)\nwhile True: time.sleep(0.05)\n")
    executor = SlurmExecutor(load_settings(state_dir=tmp_path, slurm_poll_s=0.2, child_stop_timeout_s=5),
                             command=[sys.executable, str(child)])
    first = await executor.submit(5, tmp_path / "spec.json", run_dir, {**os.environ})
    await until(lambda: asyncio.sleep(0, "up" in (run_dir / "slurm-5.out").read_text(errors="replace")
                                      if (run_dir / "slurm-5.out").exists() else False), 10, "the job")
    assert executor.alive(first.pid, first.pgid, run_dir)
    assert await executor.reap(0, 0, run_dir, grace_s=5) is True
    assert [c["argv"] for c in calls(slurm, "scancel")] == [["--signal=TERM", "--batch", str(first.pgid)]]
    assert (await executor.wait(first)).returncode == 75
    assert await executor.reap(first.pid, first.pgid, run_dir, grace_s=5) is False  # nothing left
    parent = await executor.submit(6, tmp_path / "spec.json", run_dir, {**os.environ})
    await until(lambda: asyncio.sleep(0, "up" in (run_dir / "slurm-6.out").read_text(errors="replace")
                                      if (run_dir / "slurm-6.out").exists() else False), 10, "the job")
    resume = await executor.submit(8, tmp_path / "spec.json", run_dir, {**os.environ})
    assert (await executor.wait(parent)).returncode == 75  # stopped before the resume was submitted
    assert calls(slurm, "scancel")[-1]["argv"] == ["--signal=TERM", "--batch", str(parent.pgid)]
    assert calls(slurm, "scancel")[-1]["at"] < calls(slurm, "sbatch")[-1]["at"]
    assert (await executor.cancel(resume, grace_s=5)).returncode in (75, -15, None)  # None: cancelled pending


async def test_over_long_lines_are_skipped_and_without_accounting_result_json_decides(tmp_path, slurm, monkeypatch):
    monkeypatch.setenv("SLURM_STANDIN_NO_ACCOUNTING", "1")  # sacct knows no job (no slurmdbd)
    monkeypatch.setattr("atlasd.slurm.SACCT_WAIT_S", 0.5)
    run_dir = tmp_path / "runs" / "run-4"
    child = tmp_path / "long.py"
    child.write_text("import json, sys\nprint(json.dumps({'event': 'step', 'step': 1}), flush=True)\n"
                     "sys.stdout.write('{' + 'x' * (9 << 20) + '}\\n')\n"
                     "print(json.dumps({'event': 'done'}), flush=True)\n"
                     "open('result.json', 'w').write(json.dumps({'run_id': 4, 'status': 'interrupted'}))\n"
                     "sys.exit(75)\n")
    executor = SlurmExecutor(load_settings(state_dir=tmp_path, slurm_poll_s=0.2), command=[sys.executable, str(child)])
    handle = await executor.submit(4, tmp_path / "spec.json", run_dir, {**os.environ})
    events = [e async for e in executor.events(handle)]
    assert [e["event"] for e in events] == ["step", "output_skipped", "done"]
    assert events[1]["bytes"] == (9 << 20) + 3
    assert "xxxx" not in (run_dir / "stdout.jsonl").read_text()
    info = await executor.wait(handle)
    assert info.returncode == 75 and info.state is None and "sacct has no record" in info.describe()


# ---------------------------------------------------------------------------------- the real runner
async def test_a_run_succeeds_as_a_slurm_job_and_its_lines_are_streamed(db_url, tmp_path, monkeypatch, slurm):
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    async with slurm_harness(db_url, tmp_path, monkeypatch) as h:
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done["error"]
    assert done["metrics"]["step"] == 6 and done["exit_code"] == 0
    [sbatch] = calls(slurm, "sbatch")
    job_id = done["pid"]
    assert done["pgid"] == job_id and job_id == 1001
    argv = sbatch["argv"]
    run_dir = Path(done["output_dir"])
    assert {"--parsable", f"--job-name=atlasd-run-{run_id}", "--signal=B:TERM@120", "--export=ALL",
            "--partition=gpu", "--account=ml", "--gpus=1", "--time=1:00:00", "--qos=high",
            f"--output={run_dir}/slurm-{run_id}.out", f"--chdir={run_dir}"} <= set(argv)
    assert argv[-1] == str(run_dir / f"slurm-{run_id}.sbatch")
    assert sbatch["env"] == ["ATLASD_DB_URL"]  # the database URL through the environment only
    assert any(c["argv"][:3] == ["-h", "-j", str(job_id)] for c in calls(slurm, "squeue"))
    assert any("State,ExitCode" in c["argv"] for c in calls(slurm, "sacct"))
    lines = (run_dir / "stdout.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines if '"step"' in x].count("step") == 6
    assert [e["trainer_event"] for e in h.log.events("trainer")][:1] == ["start"]
    assert any(e.get("trainer_event") == "done" for e in h.log.events("trainer"))
    [started] = h.log.events("run started")
    assert started["pid"] == job_id
    shown = json.loads(await cli("runs", "show", str(run_id), "--json", env_db=db_url))
    assert (shown["executor"], shown["job_id"]) == ("slurm", job_id)
    assert f"job_id: {job_id}" in await cli("runs", "show", str(run_id), env_db=db_url)
    await assert_invariants(db_url)


async def test_cancel_sends_sigterm_first_and_the_checkpointed_run_is_cancelled(db_url, tmp_path, monkeypatch, slurm):
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan={"*": {"steps": 200, "step_s": 0.05}}) as h:
        async def at_step_3():
            row = (await runs(db_url))[run_id]
            return (row["metrics"] or {}).get("step", 0) >= 3 and row["pid"] and row
        row = await until(at_step_3, 20, "the job at step 3")
        status = json.loads(await cli("status", "--json", env_db=db_url))
        running = status["training"]["running"]
        assert (running["run_id"], running["executor"], running["job_id"]) == (run_id, "slurm", row["pid"])
        text = await cli("status", env_db=db_url)
        assert re.search(rf"executor\s+slurm\n", text) and re.search(rf"job_id\s+{row['pid']}\n", text)
        await cli("cancel", str(run_id), env_db=db_url)
        done = await wait_state(db_url, run_id, {"cancelled", "failed", "succeeded"})
    assert done["state"] == "cancelled" and done["exit_code"] == 75, done["error"]
    assert "cancelled by the operator" in done["error"] and "checkpoint saved at step" in done["error"]
    job = str(done["pid"])
    assert [c["argv"] for c in calls(slurm, "scancel")] == [["--signal=TERM", "--batch", job]]  # it exited in time
    [exit_] = h.exited()
    assert exit_["exit_code"] == 75 and 3 <= exit_["step"] < 200
    assert Path(done["output_dir"], "checkpoints", f"step-{exit_['step']}").is_dir()
    await assert_invariants(db_url)


async def daemon_dies_at_step_3(db_url, tmp_path, monkeypatch) -> tuple[int, dict, dict, Path]:
    """A run whose job holds after step 3 (until the gate file exists), then a kill -9 of the daemon:
    its tasks just stop; nothing is sent to the job. Returns the run id, its row, the plan, the gate."""
    write_policy(tmp_path / "policies", "math")
    gate = tmp_path / "gate"
    run_id = await enqueue(db_url)
    plan = {"*": {"steps": 8, "wait_at": 3, "wait_file": str(gate)}}
    h = slurm_harness(db_url, tmp_path, monkeypatch, plan=plan)
    await h.__aenter__()

    async def at_step_3():
        row = (await runs(db_url))[run_id]
        return (row["metrics"] or {}).get("step", 0) >= 3 and row["pid"] and row
    row = await until(at_step_3, 20, "the job at step 3")
    for task in asyncio.all_tasks():
        if task.get_name() in ("runner", f"run-{run_id}-stdout", f"run-{run_id}-record"):
            task.cancel()
    await asyncio.sleep(0.2)
    await h.daemon.pool.close()
    return run_id, row, plan, gate


async def test_a_daemon_restart_stops_the_live_job_as_for_a_local_child_and_resumes(db_url, tmp_path, monkeypatch,
                                                                                     slurm):
    """The daemon dies (no stop) while its job runs on: the job lives on (its output goes to a file,
    no broken pipe). The next start's reconcile finds it (runner-child.json / run row: the job id)
    and stops it like an orphaned local child: SIGTERM, checkpoint, exit 75; the run is interrupted
    and resumed from that checkpoint by one new job. No run gets a second sbatch."""
    run_id, row, plan, gate = await daemon_dies_at_step_3(db_url, tmp_path, monkeypatch)
    assert (tmp_path / "state" / "runner-child.json").exists()
    state = json.loads((slurm / "state.json").read_text())
    assert state["jobs"][str(row["pid"])]["state"] == "RUNNING"  # the job outlived its daemon
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan=plan) as h2:
        first = await wait_state(db_url, run_id, {"interrupted", "failed", "succeeded"})
        assert first["state"] == "interrupted" and first["follow_up"] == "resume", (first["error"], first["follow_up"])
        resumed = await until(lambda: _row(db_url, lambda r: r["parent_run_id"] == run_id), 10, "the resume run")
        resumed = await wait_state(db_url, resumed["id"], {"succeeded", "failed"})
    assert first["state"] == "interrupted" and "its orphaned trainer was stopped" in first["error"]
    assert resumed["state"] == "succeeded" and resumed["trigger"] == "resume", resumed["error"]
    assert [c["argv"][0] for c in calls(slurm, "scancel")] == ["--signal=TERM"]
    names = [next(a for a in c["argv"] if a.startswith("--job-name=")) for c in calls(slurm, "sbatch")]
    assert names == [f"--job-name=atlasd-run-{run_id}", f"--job-name=atlasd-run-{resumed['id']}"]
    exits = {e["run_id"]: e for e in h2.exited()}
    assert exits[run_id]["exit_code"] == 75 and exits[resumed["id"]]["resumed_from"] == exits[run_id]["step"] >= 3
    assert h2.log.events("orphaned trainer stopped")
    await assert_invariants(db_url)


async def test_a_job_that_finished_while_the_daemon_was_down_is_concluded_from_its_result(db_url, tmp_path,
                                                                                          monkeypatch, slurm):
    run_id, row, plan, gate = await daemon_dies_at_step_3(db_url, tmp_path, monkeypatch)
    gate.touch()  # the job runs to its end meanwhile

    async def finished():
        return json.loads((slurm / "state.json").read_text())["jobs"][str(row["pid"])]["state"] == "COMPLETED"
    await until(finished, 20, "the job to complete")
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan=plan):
        done = await wait_state(db_url, run_id, {"succeeded", "failed", "interrupted"})
    assert done["state"] == "succeeded", done["error"]
    assert calls(slurm, "scancel") == [] and len(calls(slurm, "sbatch")) == 1
    await assert_invariants(db_url)


async def _row(db_url, predicate):
    return next((r for r in (await runs(db_url)).values() if predicate(r)), None)


async def test_no_password_in_the_batch_script_sbatch_argv_or_the_run_folder(db_url, tmp_path, monkeypatch, slurm):
    secret_db_url = db_url.replace("postgresql://postgres@", "postgresql://postgres:s3cr%40t-db@")
    monkeypatch.setenv("ATLASD_DB_URL", secret_db_url)
    monkeypatch.setenv("PGPASSWORD", "s3cr@t-pg")
    monkeypatch.setenv("ATLASD_MLFLOW_TRACKING_URI", "http://atlas:p@ss-mlflow@127.0.0.1:1")
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    async with slurm_harness(secret_db_url, tmp_path, monkeypatch,
                             mlflow_tracking_uri="http://atlas:p@ss-mlflow@127.0.0.1:1") as h:
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done["error"]
    secrets = ("s3cr%40t-db", "s3cr@t-db", "s3cr@t-pg", "p@ss-mlflow")
    run_dir = Path(done["output_dir"])
    script = (run_dir / f"slurm-{run_id}.sbatch").read_text()
    assert "exec " in script and "standin.py" in script
    for path in [*(tmp_path / "state").rglob("*"), *slurm.rglob("*")]:
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not [x for x in secrets if x in text], f"a password in {path}"
    [sbatch] = calls(slurm, "sbatch")
    assert not [x for x in secrets if x in json.dumps(sbatch["argv"])]
    assert sbatch["env"] == ["ATLASD_DB_URL"]  # no PGPASSWORD, no MLflow credentials reach sbatch
    assert h.exited()[0]["credentials"] == ["ATLASD_DB_URL"]
    assert not [x for x in secrets if x in h.log.getvalue()]
