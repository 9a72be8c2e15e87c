"""The Slurm executor (ATLASD_EXECUTOR=slurm) against a stand-in Slurm CLI (tests/slurm_standin.py:
sbatch, squeue, sacct, scontrol, scancel first on PATH, jobs in a JSON file, each job a background
process group), with the real runner and the chaos suite's stand-in trainer (tests/test_runfault.py).
The runner scenarios (``@ON_BOTH``) run a second time on a real single-node Slurm
(tests/slurm_cluster.py: the session fixture ``slurm_cluster``; skipped where it cannot start)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atlasd.executor import executor_for
from atlasd.settings import load_settings
from atlasd.slurm import SlurmError, SlurmExecutor, executor_info, parse_exit
from tests.chaos.harness import Chaos
from tests.chaos.invariants import assert_invariants as assert_chaos_invariants
from tests.test_runfault import (
    Harness,
    assert_invariants,
    enqueue,
    registrations,
    runs,
    until,
    wait_state,
    write_policy,
)

STANDIN_CLI = Path(__file__).with_name("slurm_standin.py")


SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "scancel")
ON_BOTH = pytest.mark.parametrize("slurm", ["stand-in", "cluster"], indirect=True)


@pytest.fixture()
def slurm(request, tmp_path, monkeypatch) -> Path:
    """The Slurm CLI first on PATH, every call logged to ``calls.jsonl`` in the returned folder: the
    stand-in's commands, or (``@ON_BOTH``'s "cluster") the real ones of the session's cluster."""
    root, bin_dir = tmp_path / "slurm", tmp_path / "slurm-bin"
    root.mkdir()
    bin_dir.mkdir()
    real = getattr(request, "param", "stand-in") == "cluster"
    if real:
        monkeypatch.setenv("SLURM_CONF", str(request.getfixturevalue("slurm_cluster").conf))
    for command in SLURM_COMMANDS:
        exe = bin_dir / command
        target = f"record {shutil.which(command)}" if real else command
        exe.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN_CLI} {target} "$@"\n')
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


async def job_state(job_id: int) -> str | None:
    """The job's state as squeue shows it (stand-in or real); None once it is no longer listed."""
    out = await asyncio.to_thread(subprocess.run, ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                                  capture_output=True, text=True)
    return out.stdout.strip() or None


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
    monkeypatch.setenv("SLURM_STANDIN_FORGET", "1")  # nor the controller (MinJobAge has passed)
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
    assert info.returncode == 75 and info.state is None and "neither sacct nor scontrol" in info.describe()


async def test_without_accounting_the_controller_tells_the_exit(tmp_path, slurm, monkeypatch):
    monkeypatch.setenv("SLURM_STANDIN_NO_ACCOUNTING", "1")
    monkeypatch.setattr("atlasd.slurm.SACCT_WAIT_S", 0.5)
    child = tmp_path / "fail.py"
    child.write_text("import sys\nsys.exit(3)\n")
    executor = SlurmExecutor(load_settings(state_dir=tmp_path, slurm_poll_s=0.2), command=[sys.executable, str(child)])
    handle = await executor.submit(2, tmp_path / "spec.json", tmp_path / "runs" / "run-2", {**os.environ})
    info = await executor.wait(handle)
    assert (info.returncode, info.state, info.exit_code) == (3, "FAILED", "3:0")
    assert calls(slurm, "scontrol")[-1]["argv"] == ["-o", "show", "job", str(handle.pgid)]


# ---------------------------------------------------------------------------------- the real runner
@ON_BOTH
async def test_a_run_succeeds_as_a_slurm_job_and_its_lines_are_streamed(db_url, tmp_path, monkeypatch, slurm):
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    async with slurm_harness(db_url, tmp_path, monkeypatch) as h:
        done = await wait_state(db_url, run_id, {"succeeded", "failed"})
    assert done["state"] == "succeeded", done["error"]
    assert done["metrics"]["step"] == 6 and done["exit_code"] == 0
    [sbatch] = calls(slurm, "sbatch")
    job_id = done["pid"]
    assert done["pgid"] == job_id and job_id > 0
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


@ON_BOTH
async def test_cancel_sends_sigterm_first_and_the_checkpointed_run_is_cancelled(db_url, tmp_path, monkeypatch, slurm):
    write_policy(tmp_path / "policies", "math")
    run_id = await enqueue(db_url)
    plan = {"*": {"steps": 8, "wait_at": 3, "wait_file": str(tmp_path / "never")}}  # holds at 3 until stopped
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan=plan) as h:
        async def at_step_3():
            row = (await runs(db_url))[run_id]
            return (row["metrics"] or {}).get("step", 0) >= 3 and row["pid"] and row
        row = await until(at_step_3, 20, "the job at step 3")
        status = json.loads(await cli("status", "--json", env_db=db_url))
        running = status["training"]["running"]
        assert (running["run_id"], running["executor"], running["job_id"]) == (run_id, "slurm", row["pid"])
        text = await cli("status", env_db=db_url)
        assert re.search(r"executor\s+slurm\n", text) and re.search(rf"job_id\s+{row['pid']}\n", text)
        await cli("cancel", str(run_id), env_db=db_url)
        done = await wait_state(db_url, run_id, {"cancelled", "failed", "succeeded"})
    assert done["state"] == "cancelled" and done["exit_code"] == 75, done["error"]
    assert "cancelled by the operator" in done["error"] and "checkpoint saved at step" in done["error"]
    job = str(done["pid"])
    assert [c["argv"] for c in calls(slurm, "scancel")] == [["--signal=TERM", "--batch", job]]  # it exited in time
    [exit_] = h.exited()
    assert (exit_["exit_code"], exit_["step"]) == (75, 3)
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


@ON_BOTH
async def test_a_daemon_restart_reattaches_to_the_live_job(db_url, tmp_path, monkeypatch, slurm):
    """The daemon dies (no stop) while its job runs on: the job lives on (its output goes to a file,
    no broken pipe). The next start's reconcile finds it by its name in the run folder and follows
    it again: its output from where the dead daemon had read it, its end, its outcome, as for a job
    just submitted. No second sbatch, nothing cancelled, one run, one outcome."""
    run_id, row, plan, gate = await daemon_dies_at_step_3(db_url, tmp_path, monkeypatch)
    assert (tmp_path / "state" / "runner-child.json").exists()
    assert await job_state(row["pid"]) == "RUNNING"  # the job outlived its daemon
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan=plan) as h2:
        await until(lambda: asyncio.sleep(0, h2.log.events("re-attached to the run's live trainer")), 20,
                    "the re-attach")
        assert (await runs(db_url))[run_id]["state"] == "running"
        gate.touch()
        done = await wait_state(db_url, run_id, {"succeeded", "failed", "interrupted"})
    assert done["state"] == "succeeded" and done["exit_code"] == 0, done["error"]
    assert done["metrics"]["step"] == 8 and done["pid"] == row["pid"]
    assert len(calls(slurm, "sbatch")) == 1 and calls(slurm, "scancel") == []
    assert list(await runs(db_url)) == [run_id] and list(await registrations(db_url)) == [run_id]
    [exit_] = h2.exited()
    assert (exit_["run_id"], exit_["exit_code"], exit_["resumed_from"]) == (run_id, 0, 0)
    assert not h2.log.events("orphaned run recovered") and not h2.log.events("orphaned trainer stopped")
    run_dir = Path(done["output_dir"])  # every line of the job's stdout copied once: none lost, none twice
    assert (run_dir / "stdout.jsonl").read_bytes() == (run_dir / f"slurm-{run_id}.out").read_bytes()
    await assert_invariants(db_url)


@ON_BOTH
async def test_a_reattached_job_is_cancelled_with_sigterm_first(db_url, tmp_path, monkeypatch, slurm):
    run_id, row, plan, gate = await daemon_dies_at_step_3(db_url, tmp_path, monkeypatch)
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan=plan) as h2:
        await until(lambda: asyncio.sleep(0, h2.log.events("re-attached to the run's live trainer")), 20,
                    "the re-attach")
        await cli("cancel", str(run_id), env_db=db_url)
        done = await wait_state(db_url, run_id, {"cancelled", "failed", "succeeded"})
    assert done["state"] == "cancelled" and done["exit_code"] == 75, done["error"]
    assert "checkpoint saved at step 3" in done["error"]
    assert [c["argv"] for c in calls(slurm, "scancel")] == [["--signal=TERM", "--batch", str(row["pid"])]]
    assert len(calls(slurm, "sbatch")) == 1 and list(await runs(db_url)) == [run_id]
    assert Path(done["output_dir"], "checkpoints", "step-3").is_dir()
    await assert_invariants(db_url)


@ON_BOTH
async def test_a_failed_job_is_retried_in_a_new_job_that_resumes_in_its_folder(db_url, tmp_path, monkeypatch, slurm):
    write_policy(tmp_path / "policies", "math", max_retries=1)
    run_id = await enqueue(db_url)
    plan = {str(run_id): {"fail_at": 3}}  # the first attempt fails after its checkpoint at step 2
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan=plan) as h:
        failed = await wait_state(db_url, run_id, {"failed", "succeeded"})
        retry = await until(lambda: _row(db_url, lambda r: r["parent_run_id"] == run_id), 10, "the retry run")
        retry = await wait_state(db_url, retry["id"], {"succeeded", "failed"})
    assert failed["state"] == "failed" and failed["exit_code"] == 1 and failed["follow_up"] == "retry"
    assert "exited with status 1" in failed["error"] and "ValueError: a bad batch" in failed["error"]
    assert retry["state"] == "succeeded" and (retry["trigger"], retry["attempt"]) == ("retry", 1), retry["error"]
    assert retry["output_dir"] == failed["output_dir"] and retry["pid"] != failed["pid"]
    names = [next(a for a in c["argv"] if a.startswith("--job-name=")) for c in calls(slurm, "sbatch")]
    assert names == [f"--job-name=atlasd-run-{run_id}", f"--job-name=atlasd-run-{retry['id']}"]
    exits = {e["run_id"]: e for e in h.exited()}
    assert exits[run_id]["exit_code"] == 1 and exits[retry["id"]]["resumed_from"] == 2
    await assert_invariants(db_url)


@ON_BOTH
async def test_a_job_that_finished_while_the_daemon_was_down_is_concluded_from_its_result(db_url, tmp_path,
                                                                                          monkeypatch, slurm):
    run_id, row, plan, gate = await daemon_dies_at_step_3(db_url, tmp_path, monkeypatch)
    gate.touch()  # the job runs to its end meanwhile

    async def finished():
        return await job_state(row["pid"]) in (None, "COMPLETED")
    await until(finished, 20, "the job to complete")
    async with slurm_harness(db_url, tmp_path, monkeypatch, plan=plan):
        done = await wait_state(db_url, run_id, {"succeeded", "failed", "interrupted"})
    assert done["state"] == "succeeded", done["error"]
    assert calls(slurm, "scancel") == [] and len(calls(slurm, "sbatch")) == 1
    await assert_invariants(db_url)


async def _row(db_url, predicate):
    return next((r for r in (await runs(db_url)).values() if predicate(r)), None)


@ON_BOTH
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


@ON_BOTH
def test_kill_9_of_the_daemon_process_while_its_job_runs(db_url, tmp_path, slurm):
    """The real daemon (``python -m atlasd run``, the chaos suite's stand-in trainer package) gets
    SIGKILL while its job holds at step 3. The next daemon re-attaches to the job, which then
    finishes the run: no second job, nothing cancelled, no resume run; the chaos invariants hold."""
    chaos = Chaos(db_url, tmp_path)
    try:
        chaos.write_policy(every=10)
        chaos.hold(1, at=3)
        env = {"ATLASD_EXECUTOR": "slurm", "ATLASD_SLURM_POLL_S": "0.5"}
        daemon = chaos.start_daemon(**env)
        asyncio.run(enqueue(db_url, policy="p"))  # queued directly: the runner and Slurm are under test
        chaos.wait_step(1, 3)
        job = chaos.runs()[1]["pid"]
        daemon.kill9()
        assert asyncio.run(job_state(job)) == "RUNNING"  # the job outlived its daemon
        daemon = chaos.start_daemon(**env)
        daemon.wait_for("re-attached to the run's live trainer")
        chaos.release(1)
        done = chaos.wait_run(1, {"succeeded", "failed", "interrupted", "cancelled"})
        assert done["state"] == "succeeded" and done["pid"] == job, done["error"]
        assert list(chaos.runs()) == [1] and not daemon.find("orphaned run recovered")
        assert len(calls(slurm, "sbatch")) == 1 and calls(slurm, "scancel") == []
        assert [r["event"] for r in chaos.journal("trainer")] == ["start", "end"]
        assert_chaos_invariants(chaos, daemon)
        assert daemon.stop() == 0
    finally:
        chaos.cleanup()


def test_the_real_trainer_runs_as_a_job_on_the_real_cluster(db_url, tiny_models, tmp_path, slurm_cluster):
    """The real daemon, the real trainer (tiny models) and the real Slurm: the run is a batch job,
    its lines reach the run row, it succeeds, is registered and promoted; the row names the job."""
    from atlasd.testing.daemon import wait_until
    from tests.test_runner import daemon, enqueue, runs, seed, wait_state
    from tests.test_runner import write_policy as write_runner_policy

    policies = tmp_path / "policies"
    write_runner_policy(policies, "math", tiny_models)
    run_id = enqueue(db_url, "math", seed(db_url))
    env = {"ATLASD_EXECUTOR": "slurm", "ATLASD_SLURM_SHARED_DIR": str(tmp_path), "ATLASD_SLURM_POLL_S": "0.5",
           "ATLASD_SLURM_PARTITION": "gpu", "SLURM_CONF": str(slurm_cluster.conf)}
    with daemon(db_url, policies, tmp_path / "state", **env) as d:
        done = wait_state(db_url, run_id, {"succeeded", "failed"})
        assert done["state"] == "succeeded", done["error"]
        wait_until(lambda: runs(db_url)[run_id]["model_version"], 120, "the run's registration")
        assert d.stop() == 0
    done = runs(db_url)[run_id]
    assert done["metrics"]["step"] == 4 and done["result"]["steps"] == 4 and done["model_version"] == "1"
    job = done["pid"]  # the Slurm executor records the job id
    assert executor_info(run_id, done["output_dir"], job) == {"executor": "slurm", "job_id": job,
                                                              "job_name": f"atlasd-run-{run_id}"}
    assert any(e.get("event") == "run started" and e.get("pid") == job for e in d.events)
