"""The Slurm executor (``ATLASD_EXECUTOR=slurm``): the trainer runs as a Slurm batch job.

The runner calls it exactly as it calls :class:`atlasd.executor.LocalExecutor`; the job id takes
the place of the child's pid and pgid (run row, ``runner-child.json``). Only the Slurm CLI is used:

- submit: ``sbatch --parsable --job-name=atlasd-run-ID ... SCRIPT``. The batch script
  (``RUN_DIR/slurm-ID.sbatch``) holds no secret: it ``exec``s ``python -m trainers run SPEC`` so
  that the trainer is the batch shell and gets the signals. The database URL reaches the job
  through the environment of the sbatch call (``--export=ALL``, an environment without the
  daemon's other secrets: :data:`atlasd.settings.SECRET_ENV`), never through argv or a file.
  ``--signal=B:TERM@120``: at the time limit the trainer gets SIGTERM two minutes early (it saves a
  checkpoint and exits 75: interrupted, resumed per the policy).
  A job of the same name still in the queue (a submit repeated after a restart) is re-attached
  instead of submitting another; a live job of an earlier run in the same folder (a retry or
  resume whose parent's job outlived its daemon) is stopped first: never two trainers in one folder.
- events: the job's stdout (``RUN_DIR/slurm-ID.out``, on the shared filesystem) is tailed as it
  grows; each line is appended to ``stdout.jsonl`` and yielded like the local executor does
  (over-long lines skipped with an ``output_skipped`` event) until the job has left the queue. How
  far it was read is kept in ``RUN_DIR/slurm-ID.read`` (a byte offset, after each batch of lines).
- attach (a daemon restart while the job runs): the job still in the queue under the run's name in
  the run folder is followed again, its stdout read on from ``slurm-ID.read`` (lines the previous
  daemon consumed are not yielded twice); wait and cancel as for a job just submitted.
- wait: ``squeue -h -j ID -o %T`` until the job has left the queue (or shows a final state), then
  ``sacct -n -P -X -j ID -o State,ExitCode`` (``N:M``: exit status N, signal M). Without accounting
  storage (sacct: "accounting storage is disabled") or when sacct never learns of the job:
  ``scontrol -o show job ID`` (``JobState``, ``ExitCode``: the controller keeps a finished job for
  ``MinJobAge``, 300 s by default), else the trainer's ``result.json``.
- cancel: ``scancel --signal=TERM --batch ID`` (the trainer checkpoints and exits 75), ``scancel ID``
  after the grace period. A job still pending is cancelled at once.
- alive / reap (the runner's reconcile, for a run it does not re-attach): the job id (pgid) counts
  only when the run folder's ``slurm-jobs.jsonl`` names it (the analogue of the local executor's
  working-folder check against pid reuse); live jobs are also found by name
  (``squeue -h -n atlasd-run-ID``), covering a daemon that died between sbatch and recording the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasd.executor import LINE_LIMIT_BYTES, ExitInfo, RunHandle, parse_event, read_tail
from atlasd.logging import get_logger
from atlasd.runspec import EXIT_INTERRUPTED
from atlasd.settings import SECRET_ENV, Settings

JOB_PREFIX = "atlasd-run-"
JOBS_FILE = "slurm-jobs.jsonl"  # in the run folder: one line per job submitted from it (run id, name, job id)
SIGNAL_LEAD_S = 120  # --signal=B:TERM@120
# squeue shows finished jobs for a while (MinJobAge) in these states; anything else is still live
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                          "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})
PENDING_STATES = frozenset({"PENDING", "REQUEUE_HOLD", "REQUEUED"})  # not started: nothing to checkpoint
CLI_TIMEOUT_S = 60.0
SACCT_WAIT_S = 60.0  # accounting may lag the queue: sacct is asked again for this long
NO_ACCOUNTING = "accounting storage is disabled"  # sacct's answer on a cluster without slurmdbd
KILL_WAIT_S = 300.0  # after scancel, how long the job may take to leave the queue before it is given up on
TAIL_SLEEP_S = 0.1
CHUNK = 1 << 20


def job_name(run_id: int) -> str:
    return f"{JOB_PREFIX}{run_id}"


class SlurmError(RuntimeError):
    """A Slurm command failed (its stderr in the message)."""


@dataclass(frozen=True)
class SlurmExitInfo(ExitInfo):
    job_id: int = 0
    state: str | None = None  # sacct State or scontrol JobState (None: neither knew the job)
    exit_code: str | None = None  # ExitCode N:M

    def describe(self) -> str:
        where = f"slurm job {self.job_id}"
        if self.state is None:
            return f"{where} left the queue (exit status unknown: neither sacct nor scontrol knows it)"
        if self.signal is not None:
            return f"{where} {self.state}: killed by signal {_signame(self.signal)}"
        if self.returncode is None:
            return f"{where} {self.state} (exit code {self.exit_code})"
        return f"{where} {self.state}: exited with status {self.returncode}"


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def parse_exit(state: str, exit_code: str) -> tuple[int | None, int | None]:
    """sacct ``State`` and ``ExitCode`` (``N:M``) -> (returncode, signal). A job that ended
    without status or signal in a state other than COMPLETED (cancelled while pending, node
    failure) has no returncode."""
    try:
        code, _, sig = exit_code.partition(":")
        n, m = int(code), int(sig or 0)
    except ValueError:
        return None, None
    if m:
        return -m, m
    if n == 0 and state.split()[0] != "COMPLETED":
        return None, None
    return n, None


def job_records(run_dir: Path) -> list[dict[str, Any]]:
    """The jobs submitted from a run folder (the last record of each run id wins)."""
    try:
        lines = (run_dir / JOBS_FILE).read_text().splitlines()
    except OSError:
        return []
    records: dict[int, dict[str, Any]] = {}
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            record = json.loads(line)
            records[int(record["run_id"])] = record
    return list(records.values())


def executor_info(run_id: int, output_dir: str | Path | None, pid: int | None) -> dict[str, Any]:
    """What ``atlasd status`` / ``atlasd runs show`` say about where a run's trainer runs."""
    if output_dir:
        for record in job_records(Path(output_dir)):
            if record.get("run_id") == run_id:
                return {"executor": "slurm", "job_id": record.get("job_id"), "job_name": record.get("name")}
    return {"executor": "local", "pid": pid}


def sbatch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the sbatch call (exported to the job with ``--export=ALL``): the daemon's
    secrets removed except the database URL; no CUDA_VISIBLE_DEVICES (Slurm assigns the GPUs)."""
    return {k: v for k, v in env.items()
            if (k not in SECRET_ENV or k == "ATLASD_DB_URL") and k != "CUDA_VISIBLE_DEVICES"}


class SlurmExecutor:
    """Runs ``python -m trainers run SPEC`` (or ``command``) as a Slurm batch job."""

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        self.settings = settings
        python = settings.slurm_python or ("python" if settings.slurm_container_image else sys.executable)
        self.command = command or [python, "-m", "trainers", "run"]
        self.shared = (settings.slurm_shared_dir or settings.state_dir).resolve()
        self.poll_s = settings.slurm_poll_s
        self.log = get_logger("slurm")

    # ------------------------------------------------------------------ Slurm CLI
    async def _cli(self, *argv: str, env: Mapping[str, str] | None = None, check: bool = True) -> tuple[int, str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=dict(env) if env is not None else None)
        except OSError as exc:
            raise SlurmError(f"{argv[0]}: {exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise SlurmError(f"{argv[0]} did not answer within {CLI_TIMEOUT_S:.0f}s") from None
        rc, stdout, stderr = proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        if check and rc != 0:
            raise SlurmError(f"{' '.join(argv[:2])} ... exited {rc}: {stderr.strip()[-500:]}")
        return rc, stdout, stderr

    async def job_state(self, job_id: int) -> str | None:
        """The job's squeue state; None once it left the queue or shows a final state. An
        unavailable controller counts as live (asked again later)."""
        try:
            rc, out, err = await self._cli("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        except SlurmError as exc:
            self.log.warning("squeue failed; the job counts as running", job_id=job_id, error=str(exc))
            return "UNKNOWN"
        if rc != 0:
            if "invalid job id" in err.lower():
                return None
            self.log.warning("squeue failed; the job counts as running", job_id=job_id, error=err.strip()[-300:])
            return "UNKNOWN"
        state = out.strip().split()[0] if out.strip() else None
        return None if state is None or state in FINAL_STATES else state

    def _job_state_sync(self, job_id: int) -> str | None:
        try:
            proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                                  timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return "UNKNOWN"
        if proc.returncode != 0:
            return None if "invalid job id" in proc.stderr.lower() else "UNKNOWN"
        state = proc.stdout.strip().split()[0] if proc.stdout.strip() else None
        return None if state is None or state in FINAL_STATES else state

    async def live_jobs_named(self, name: str, run_dir: Path) -> list[int]:
        """Ids of the jobs of this name working in ``run_dir`` (``%Z``: not another deployment's
        job of the same name) still in the queue (not yet in a final state)."""
        _, out, _ = await self._cli("squeue", "-h", "-n", name, "-o", "%i %T %Z")
        ids = []
        for line in out.splitlines():
            parts = line.split(maxsplit=2)
            if (len(parts) == 3 and parts[0].isdigit() and parts[1] not in FINAL_STATES
                    and Path(parts[2].strip()) == run_dir.resolve()):
                ids.append(int(parts[0]))
        return ids

    async def accounting(self, job_id: int) -> tuple[str, str] | None:
        """sacct's (State, ExitCode) of the job allocation, once accounting has it; None at once
        on a cluster without accounting storage."""
        deadline = time.monotonic() + SACCT_WAIT_S
        while True:
            with contextlib.suppress(SlurmError):
                rc, out, err = await self._cli("sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State,ExitCode",
                                               check=False)
                if rc != 0 and NO_ACCOUNTING in err.lower():
                    return None
                for line in out.splitlines() if rc == 0 else []:
                    state, sep, code = line.strip().partition("|")
                    if sep and state and state.split()[0] not in ("PENDING", "RUNNING", "COMPLETING"):
                        return state, code
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(min(self.poll_s, 2.0))

    async def controller_record(self, job_id: int) -> tuple[str, str] | None:
        """(JobState, ExitCode) of an ended job from ``scontrol -o show job``, while the controller
        still holds it (``MinJobAge`` after its end); None once it forgot the job."""
        try:
            rc, out, _ = await self._cli("scontrol", "-o", "show", "job", str(job_id), check=False)
        except SlurmError:
            return None
        state, code = re.search(r"\bJobState=(\S+)", out), re.search(r"\bExitCode=(\d+:\d+)", out)
        if rc != 0 or state is None or code is None or state[1] not in FINAL_STATES:
            return None
        return state[1], code[1]

    # ------------------------------------------------------------------ files
    def _out_file(self, run_dir: Path, run_id: int) -> Path:
        return run_dir / f"slurm-{run_id}.out"

    def _read_file(self, run_dir: Path, run_id: int) -> Path:
        return run_dir / f"slurm-{run_id}.read"

    def _read_offset(self, run_dir: Path, run_id: int) -> int:
        """How far the job's stdout was consumed (0 when unknown: read from the start)."""
        try:
            return max(0, int(self._read_file(run_dir, run_id).read_text()))
        except (OSError, ValueError):
            return 0

    def _record(self, run_dir: Path, **record: Any) -> None:
        with (run_dir / JOBS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _script(self, run_id: int, spec_path: Path, run_dir: Path) -> Path:
        script = run_dir / f"slurm-{run_id}.sbatch"
        command = " ".join(shlex.quote(part) for part in [*self.command, str(spec_path)])
        script.write_text(
            "#!/bin/bash\n"
            f"# atlasd run {run_id}, submitted by atlasd with sbatch (settings ATLASD_SLURM_*).\n"
            "# No secret here: the database URL reaches the job through the environment of the sbatch call.\n"
            f"cd {shlex.quote(str(run_dir))} || exit 1\n"
            f"exec {command}\n"
        )
        return script

    def sbatch_argv(self, run_id: int, run_dir: Path, script: Path) -> list[str]:
        s = self.settings
        argv = ["sbatch", "--parsable", f"--job-name={job_name(run_id)}", f"--chdir={run_dir}",
                f"--output={self._out_file(run_dir, run_id)}", f"--error={run_dir / 'stderr.log'}",
                "--open-mode=append", f"--signal=B:TERM@{SIGNAL_LEAD_S}", "--export=ALL"]
        argv += [f"--partition={s.slurm_partition}"] if s.slurm_partition else []
        argv += [f"--account={s.slurm_account}"] if s.slurm_account else []
        argv += [f"--gpus={s.slurm_gpus}"] if s.slurm_gpus else []
        argv += [f"--time={s.slurm_time}"] if s.slurm_time else []
        argv += [f"--container-image={s.slurm_container_image}"] if s.slurm_container_image else []
        return [*argv, *s.slurm_extra_args, str(script)]

    # ------------------------------------------------------------------ Executor interface
    async def submit(self, run_id: int, spec_path: Path, run_dir: Path, env: Mapping[str, str]) -> RunHandle:
        run_dir = run_dir.resolve()
        if not run_dir.is_relative_to(self.shared):
            raise SlurmError(f"run folder {run_dir} is not under the shared filesystem {self.shared} "
                             "(ATLASD_SLURM_SHARED_DIR): the compute nodes would not see it")
        run_dir.mkdir(parents=True, exist_ok=True)
        name = job_name(run_id)
        # never two trainers in one folder: a parent's job that outlived its daemon is stopped first
        for record in job_records(run_dir):
            if record.get("run_id") != run_id and record.get("name"):
                for job_id in await self.live_jobs_named(record["name"], run_dir):
                    self.log.warning("stopping a live job of an earlier run in the same folder", run_id=run_id,
                                     job_id=job_id, job_name=record["name"])
                    await self._stop(job_id, self.settings.child_stop_timeout_s)
        attached = await self.attach(run_id, run_dir)
        if attached is not None:  # submitted before (a restart): follow that job, never a second one
            return attached
        script = self._script(run_id, spec_path, run_dir)
        self._record(run_dir, run_id=run_id, name=name, job_id=None)  # found by name if we die before the id
        _, out, _ = await self._cli(*self.sbatch_argv(run_id, run_dir, script), env=sbatch_env(env))
        try:
            job_id = int(out.strip().splitlines()[-1].split(";")[0])
        except (ValueError, IndexError):
            raise SlurmError(f"sbatch --parsable printed no job id: {out.strip()[:200]!r}") from None
        self._record(run_dir, run_id=run_id, name=name, job_id=job_id)
        self.log.info("slurm job submitted", run_id=run_id, job_id=job_id, job_name=name)
        return RunHandle(run_id=run_id, pid=job_id, pgid=job_id, run_dir=run_dir)

    async def attach(self, run_id: int, run_dir: Path) -> RunHandle | None:
        """The run's job still in the queue (by its name, working in ``run_dir``), followed again
        from where its stdout was read; None when there is none."""
        run_dir = run_dir.resolve()
        live = await self.live_jobs_named(job_name(run_id), run_dir)
        if not live:
            return None
        job_id = live[0]
        if not self._ours(job_id, run_dir):  # the daemon died between sbatch and recording the id
            self._record(run_dir, run_id=run_id, name=job_name(run_id), job_id=job_id)
        self.log.warning("re-attached to the run's live Slurm job", run_id=run_id, job_id=job_id)
        return RunHandle(run_id=run_id, pid=job_id, pgid=job_id, run_dir=run_dir,
                         stdout_offset=self._read_offset(run_dir, run_id))

    async def events(self, handle: RunHandle) -> AsyncIterator[dict[str, Any]]:
        """The job's stdout lines as they are written, from ``handle.stdout_offset``, until the job
        has left the queue; the offset read so far is kept in ``slurm-ID.read``."""
        path = self._out_file(handle.run_dir, handle.run_id)
        progress = self._read_file(handle.run_dir, handle.run_id)
        consumed = saved = handle.stdout_offset  # the end of the last whole line read (kept or skipped)
        buf = b""
        skipping = 0  # >0: inside an over-long line, this many bytes of it discarded so far
        gone = False
        next_check = 0.0
        fh = None
        try:
            with handle.stdout_log.open("ab") as log:
                while True:
                    if fh is None:
                        with contextlib.suppress(FileNotFoundError):
                            fh = path.open("rb")
                            fh.seek(consumed)
                    chunk = fh.read(CHUNK) if fh is not None else b""
                    if chunk:
                        buf += chunk
                        while True:
                            if skipping:
                                cut = buf.find(b"\n")
                                if cut < 0:
                                    skipping += len(buf)
                                    buf = b""
                                    break
                                skipped, skipping, buf = skipping + cut + 1, 0, buf[cut + 1:]
                                consumed += skipped
                                yield _skipped(skipped)
                                continue
                            cut = buf.find(b"\n")
                            if cut < 0:
                                if len(buf) > LINE_LIMIT_BYTES:
                                    skipping, buf = len(buf), b""
                                break
                            if cut + 1 > LINE_LIMIT_BYTES:
                                skipped, buf = cut + 1, buf[cut + 1:]
                                consumed += skipped
                                yield _skipped(skipped)
                                continue
                            raw, buf = buf[: cut + 1], buf[cut + 1:]
                            consumed += len(raw)
                            event = _keep(raw, log)
                            if event is not None:
                                yield event
                        if consumed != saved:
                            saved = _save_offset(progress, consumed)
                        continue
                    if gone:  # the job has ended and its output is read to the end
                        if skipping or buf:
                            _save_offset(progress, consumed + skipping + len(buf))
                        if skipping:
                            yield _skipped(skipping + len(buf))
                        elif buf:
                            event = _keep(buf, log)
                            if event is not None:
                                yield event
                        return
                    now = time.monotonic()
                    if now >= next_check:
                        gone = await self.job_state(handle.pgid) is None
                        next_check = now + self.poll_s
                        if gone:
                            continue  # one more read: what it wrote before it ended
                    await asyncio.sleep(TAIL_SLEEP_S)
        finally:
            if fh is not None:
                fh.close()

    async def wait(self, handle: RunHandle) -> ExitInfo:
        while await self.job_state(handle.pgid) is not None:
            await asyncio.sleep(self.poll_s)
        return await self._exit_info(handle.pgid, handle.run_dir, handle.run_id)

    async def _exit_info(self, job_id: int, run_dir: Path, run_id: int) -> SlurmExitInfo:
        acct = await self.accounting(job_id) or await self.controller_record(job_id)
        tail = read_tail(run_dir / "stderr.log")
        if acct is None:  # neither accounting nor the controller knows it: what the trainer's result.json says
            rc = _result_exit(run_dir, run_id)
            self.log.warning("neither sacct nor scontrol knows the job; exit inferred from result.json",
                             job_id=job_id, returncode=rc)
            return SlurmExitInfo(returncode=rc, signal=None, stderr_tail=tail, job_id=job_id)
        state, code = acct
        rc, sig = parse_exit(state, code)
        if rc is None or sig is not None or state.split()[0] != "COMPLETED":
            tail = f"{tail.rstrip()}\nslurm job {job_id}: {state} (exit code {code})".lstrip()
        return SlurmExitInfo(returncode=rc, signal=sig, stderr_tail=tail, job_id=job_id, state=state, exit_code=code)

    async def cancel(self, handle: RunHandle, grace_s: float) -> ExitInfo:
        """SIGTERM to the trainer (the batch shell); ``scancel`` after ``grace_s``."""
        await self._stop(handle.pgid, grace_s)
        return await self._exit_info(handle.pgid, handle.run_dir, handle.run_id)

    async def _stop(self, job_id: int, grace_s: float) -> None:
        state = await self.job_state(job_id)
        if state is None:
            return
        if state in PENDING_STATES:  # nothing to checkpoint yet
            await self._scancel(str(job_id))
        else:
            await self._scancel("--signal=TERM", "--batch", str(job_id))
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                await asyncio.sleep(min(self.poll_s, 1.0))
                if await self.job_state(job_id) is None:
                    return
            self.log.warning("slurm job still running after the grace period; scancel", job_id=job_id,
                             grace_s=grace_s)
            await self._scancel(str(job_id))
        deadline = time.monotonic() + KILL_WAIT_S
        while await self.job_state(job_id) is not None:  # Slurm kills it (KillWait)
            if time.monotonic() > deadline:
                self.log.error("slurm job still in the queue after scancel; given up", job_id=job_id)
                return
            await asyncio.sleep(min(self.poll_s, 1.0))

    async def _scancel(self, *argv: str) -> None:
        try:
            await self._cli("scancel", *argv)
        except SlurmError as exc:  # e.g. the job ended meanwhile: the state poll decides
            self.log.warning("scancel failed", argv=list(argv), error=str(exc))

    def _ours(self, job_id: int, run_dir: Path) -> bool:
        return any(record.get("job_id") == job_id for record in job_records(run_dir))

    def alive(self, pid: int, pgid: int, run_dir: Path) -> bool:
        """Is the run's job still in the queue, and is it really a job of that run folder?"""
        return self._ours(pgid, run_dir) and self._job_state_sync(pgid) is not None

    async def reap(self, pid: int, pgid: int, run_dir: Path, grace_s: float) -> bool:
        """Stop the jobs of a run folder left without their daemon: the recorded job id, and any
        live job named after a run of that folder. True if one was still running."""
        jobs = {pgid} if self._ours(pgid, run_dir) and await self.job_state(pgid) is not None else set()
        for record in job_records(run_dir):
            if record.get("name"):
                with contextlib.suppress(SlurmError):
                    jobs.update(await self.live_jobs_named(record["name"], run_dir))
        for job_id in sorted(jobs):
            self.log.warning("stopping an orphaned slurm job", job_id=job_id, run_dir=str(run_dir))
            await self._stop(job_id, grace_s)
        return bool(jobs)

    def logs(self, run_dir: Path) -> tuple[Path, Path]:
        return run_dir / "stdout.jsonl", run_dir / "stderr.log"


def _result_exit(run_dir: Path, run_id: int) -> int | None:
    """The exit status a trainer writing this ``result.json`` has (0 succeeded, 75 interrupted)."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("run_id") != run_id:
        return None
    return {"succeeded": 0, "interrupted": EXIT_INTERRUPTED}.get(result.get("status"))


def _save_offset(path: Path, offset: int) -> int:
    """Record how far the job's stdout was consumed (atomically: a restart reads a whole number)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(offset))
    tmp.replace(path)
    return offset


def _skipped(nbytes: int) -> dict[str, Any]:
    return {"event": "output_skipped", "bytes": nbytes,
            "reason": f"a stdout line longer than {LINE_LIMIT_BYTES} bytes was skipped"}


def _keep(raw: bytes, log) -> dict[str, Any] | None:
    log.write(raw if raw.endswith(b"\n") else raw + b"\n")
    log.flush()
    line = raw.decode(errors="replace")
    return parse_event(line) if line.strip() else None
