"""The runner: one training run at a time on this machine's GPU, supervised from the daemon.

It claims the next queued run (``atlasd.queue.claim_next``: the database allows one running),
writes the run spec, starts ``python -m trainers run SPEC.json`` through an :class:`Executor`,
and supervises the child: every JSON line is logged with the run id, heartbeats and the latest
metrics go to the run row, and the child is stopped (SIGTERM to its process group, SIGKILL
after ``child_stop_timeout_s``) when the operator cancels, the gear's wall-clock limit passes,
the child goes silent for ``stale_heartbeat_s``, or the daemon stops.

Outcomes: exit 0 with a succeeded ``result.json`` -> succeeded, then the registry step
(``atlasd.promotions.finalize_run``: MLflow run, model version, promotion gate; failed runs are
logged in MLflow too, not registered);
exit 75 -> interrupted (checkpoint saved; re-queued to resume if the policy says so);
anything else -> failed with the exit status and the stderr tail, retried from scratch while
``attempt < policy.retry.max_retries``. A wall-clock kill is failed and not retried.

Crash recovery: at start the daemon holds the per-database lock, so a run still marked running
belongs to a daemon that died. Its child, if still alive on this host, is stopped by process
group (so kill -9 of the daemon never leaves two trainers on the GPU), the run is marked
interrupted and, per the policy, resumed from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from atlasd import promotions, queue
from atlasd.db import safe_error
from atlasd.executor import Executor, ExitInfo, LocalExecutor, RunHandle
from atlasd.logging import get_logger
from atlasd.policies import Policy, PolicySet
from atlasd.runspec import EXIT_INTERRUPTED, RunResult, RunSpec
from atlasd.settings import Settings

HEARTBEAT_WRITE_S = 2.0  # at most this often a heartbeat/metrics write to the run row
METRIC_KEYS = ("step", "total_steps", "loss", "grad_norm", "lr", "tokens_per_s", "time_gen_s",
               "time_teacher_s", "time_student_s", "time_optim_s", "peak_memory_gb", "phase", "epoch")
QUIET_EVENTS = frozenset({"heartbeat"})  # logged at debug level only


def run_dir_for(settings: Settings, run_id: int) -> Path:
    return (settings.state_dir / "runs" / f"run-{run_id}").resolve()


class Supervision:
    """What happened while one child ran: the reason it was stopped (if it was) and its last words."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None  # cancel | stopping | wall_clock | stale
        self.stop_detail = ""
        self.stopper: asyncio.Task | None = None  # the executor.cancel() under way, if any
        self.last_error: str | None = None
        self.metrics: dict[str, Any] = {}


class RunnerComponent:
    name = "runner"

    def __init__(self, settings: Settings, executor: Executor | None = None) -> None:
        self.settings = settings
        self.executor: Executor = executor or LocalExecutor()
        self.log = get_logger("runner")
        self.host = socket.gethostname()
        self.daemon = None
        self.policies: PolicySet | None = None
        self.current: RunHandle | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ component interface
    async def start(self, daemon) -> None:
        self.daemon = daemon
        cadence = next((c for c in daemon.components if c.name == "cadence"), None)
        if cadence is not None:
            self.policies = cadence.policy_set  # the live set, reloaded on SIGHUP by the cadence
        else:
            self.policies = PolicySet(self.settings.policies_dir)
            self.policies.reload()
        await self.recover()
        self._task = asyncio.create_task(self._loop(), name="runner")

    async def on_intake(self, recorded: int) -> None:
        self._wake.set()  # the cadence may just have queued a run

    async def reload(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """The daemon is stopping: the supervise loop sees ``daemon.stopping``, stops the child
        (bounded by child_stop_timeout_s) and records the run as interrupted; wait for that."""
        self._wake.set()
        if self._task is not None:
            if self.current is not None:
                self.daemon.notifier.extend_timeout(self.settings.child_stop_timeout_s + 30)
                self.daemon.notifier.status(f"stopping: run {self.current.run_id} is saving a checkpoint")
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ------------------------------------------------------------------ recovery
    async def recover(self) -> None:
        """Reap the child of a run left running by a daemon that died; mark it interrupted; resume it."""
        async with self.daemon.pool.connection() as conn:
            orphans = await queue.list_runs(conn, states=["running"])
        for run in orphans:
            log = self.log.bind(run_id=run.id, policy=run.policy, gear=run.gear)
            reaped = False
            if run.pgid and run.output_dir and run.host == self.host:
                reaped = await self.executor.reap(
                    run.pid or run.pgid, run.pgid, Path(run.output_dir), self.settings.child_stop_timeout_s
                )
            age = None if run.heartbeat_at is None else round(time.time() - run.heartbeat_at.timestamp(), 1)
            why = "the daemon stopped unexpectedly during the run" + (
                "; its orphaned trainer was stopped" if reaped else ""
            )
            log.warning("orphaned run recovered", reaped_child=reaped, heartbeat_age_s=age, host=run.host)
            async with self.daemon.pool.connection() as conn:
                await queue.mark_interrupted(conn, run.id, why)
            await self._follow_up(run, "interrupted")

    # ------------------------------------------------------------------ main loop
    async def _loop(self) -> None:
        while not self.daemon.stopping.is_set():
            try:
                async with self.daemon.pool.connection() as conn:
                    run = await queue.claim_next(conn)
            except (psycopg.Error, PoolTimeout) as exc:
                self.log.warning("cannot claim a run; retrying", error=safe_error(exc))
                run = None
            if run is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.runner_poll_s)
                continue
            try:
                await self._execute(run)
            except Exception as exc:  # the runner must survive anything one run does
                self.log.exception("run failed in the runner", run_id=run.id)
                with contextlib.suppress(Exception):
                    async with self.daemon.pool.connection() as conn:
                        await queue.mark_failed(conn, run.id, f"runner error: {safe_error(exc)}")
            finally:
                self.current = None

    async def _execute(self, run: queue.Run) -> None:
        log = self.log.bind(run_id=run.id, policy=run.policy, gear=run.gear)
        policy = self.policies.get(run.policy)
        if policy is None or run.gear not in policy.gears:
            why = f"policy {run.policy!r}" + ("" if policy is None else f" has no gear {run.gear!r}")
            async with self.daemon.pool.connection() as conn:
                await queue.mark_failed(conn, run.id, f"{why} is not loaded (removed or invalid); nothing to run")
            log.error("run has no policy to run it", reason=why)
            return

        try:
            spec = await self._build_spec(run, policy)
        except promotions.RegistryCallError as exc:
            async with self.daemon.pool.connection() as conn:
                await queue.mark_failed(conn, run.id, f"cannot resolve the champion of {policy.name!r} to start "
                                                      f"from (MLflow registry): {exc}")
            log.error("run not started: champion unknown", error=str(exc))
            await self._follow_up(run, "failed", policy)
            return
        run_dir = Path(spec.output_dir)
        spec_path = spec.dump(run_dir / f"run_spec-{run.id}.json")
        env = dict(os.environ)
        env["ATLASD_DB_URL"] = self.settings.dsn  # the child's only way to the database: never in argv or files
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.settings.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.cuda_visible_devices

        handle = await self.executor.submit(run.id, spec_path, run_dir, env)
        self.current = handle
        async with self.daemon.pool.connection() as conn:
            await queue.record_process(
                conn, run.id, pid=handle.pid, pgid=handle.pgid, host=self.host, output_dir=str(run_dir),
                spec=spec.model_dump(mode="json"), champion_version=spec.champion_version,
            )
        log.info("run started", pid=handle.pid, trigger=run.trigger, window_lo=run.window_lo,
                 window_hi=run.window_hi, student=spec.student, champion_version=spec.champion_version,
                 resume=spec.resume, attempt=run.attempt)

        sup = await self._supervise(run, policy, handle, log)
        info = await (sup.stopper if sup.stopper is not None else self.executor.wait(handle))
        outcome = await self._finish(run, policy, spec, handle, sup, info, log)
        if outcome in ("succeeded", "failed") and (run_dir / "result.json").is_file():
            # MLflow: every finished run is logged; a succeeded one is registered and gated.
            # A store that is away leaves the registration pending (retried by the daemon).
            await promotions.finalize_run(self.settings, run.id, spec_path, run_dir / "result.json", handle.stdout_log)

    async def _build_spec(self, run: queue.Run, policy: Policy) -> RunSpec:
        """A resume continues its parent's output dir from the same student; any other run starts
        from the policy's current champion (its checkpoint, fetched by the registry child) or, when
        nothing has been promoted yet, the base student."""
        parent = None
        if run.trigger == "resume" and run.parent_run_id is not None:
            async with self.daemon.pool.connection() as conn:
                parent = await queue.get_run(conn, run.parent_run_id)
        resume = parent is not None and bool(parent.output_dir) and bool(parent.spec)
        if resume:
            output_dir = Path(parent.output_dir)
            student, champion_version = parent.spec["student"], parent.spec.get("champion_version")
        else:
            output_dir = run_dir_for(self.settings, run.id)
            current = await promotions.champion(self.settings, policy.name)
            student, champion_version = current.get("path"), current.get("champion")
        return policy.run_spec(
            run.gear,
            run_id=run.id,
            trigger=run.trigger,
            window_lo=run.window_lo,
            window_hi=run.window_hi,
            student=student,
            champion_version=champion_version,
            output_dir=output_dir,
            mlflow=promotions.mlflow_target(self.settings, policy),
            resume=resume,
            device=self.settings.device,
        )

    # ------------------------------------------------------------------ supervision
    async def _supervise(self, run: queue.Run, policy: Policy, handle: RunHandle, log) -> Supervision:
        sup = Supervision()
        events: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for event in self.executor.events(handle):
                    await events.put(event)
            finally:
                await events.put(done)

        reader = asyncio.create_task(pump(), name=f"run-{run.id}-stdout")
        limit: timedelta = policy.gears[run.gear].wall_clock_limit
        started = time.monotonic()
        last_line = started
        last_write = 0.0
        dirty = True
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    event = None
                if event is done:
                    break
                now = time.monotonic()
                if event is not None:
                    last_line = now
                    dirty |= self._absorb(event, sup, log)
                if dirty and now - last_write >= HEARTBEAT_WRITE_S:
                    cancel_requested = await self._heartbeat(run.id, sup.metrics)
                    last_write, dirty = now, False
                    if cancel_requested and sup.stop_reason is None:
                        self._request_stop(sup, "cancel", "cancelled by the operator (atlasd cancel)", handle, log)
                if sup.stop_reason is None:
                    if self.daemon.stopping.is_set():
                        self._request_stop(sup, "stopping", "the daemon is stopping", handle, log)
                    elif now - started > limit.total_seconds():
                        self._request_stop(sup, "wall_clock", f"wall-clock limit of {limit} exceeded", handle, log)
                    elif now - last_line > self.settings.stale_heartbeat_s:
                        self._request_stop(sup, "stale", f"no output for {self.settings.stale_heartbeat_s:.0f}s "
                                                         "(hung trainer)", handle, log)
        finally:
            await reader
        if dirty:
            await self._heartbeat(run.id, sup.metrics)  # the last metrics, whatever the throttle held back
        return sup

    def _absorb(self, event: dict[str, Any], sup: Supervision, log) -> bool:
        kind = str(event.get("event", "output"))
        fields = {k: v for k, v in event.items() if k not in ("event", "run_id", "ts")}
        if kind in QUIET_EVENTS:
            log.debug("trainer", trainer_event=kind, **fields)
        elif kind == "error":
            sup.last_error = str(event.get("error") or event)
            log.error("trainer", trainer_event=kind, **fields)
        else:
            log.info("trainer", trainer_event=kind, **fields)
        if kind == "eval":
            sup.metrics[f"eval_{event.get('which', 'model')}_success_rate"] = event.get("success_rate")
        sup.metrics.update({k: event[k] for k in METRIC_KEYS if event.get(k) is not None})
        return True

    async def _heartbeat(self, run_id: int, metrics: dict[str, Any]) -> bool:
        try:
            async with self.daemon.pool.connection() as conn:
                row = await queue.heartbeat(conn, run_id, dict(metrics))
        except (psycopg.Error, PoolTimeout) as exc:
            self.log.warning("heartbeat write failed", run_id=run_id, error=safe_error(exc))
            return False
        except queue.QueueError:
            return False
        return row.cancel_requested_at is not None

    def _request_stop(self, sup: Supervision, reason: str, detail: str, handle: RunHandle, log) -> None:
        sup.stop_reason, sup.stop_detail = reason, detail
        log.warning("stopping the trainer", reason=reason, detail=detail, grace_s=self.settings.child_stop_timeout_s)
        sup.stopper = asyncio.create_task(self.executor.cancel(handle, self.settings.child_stop_timeout_s))

    # ------------------------------------------------------------------ outcome
    async def _finish(self, run: queue.Run, policy: Policy, spec: RunSpec, handle: RunHandle,
                      sup: Supervision, info: ExitInfo, log) -> str:
        result = self._read_result(Path(spec.output_dir))
        result_json = result.model_dump(mode="json") if result else None
        rc = info.returncode
        checkpoint_note = f"; checkpoint saved at step {result.steps}" if result and rc == EXIT_INTERRUPTED else ""
        async with self.daemon.pool.connection() as conn:
            if sup.stop_reason == "cancel":
                await queue.mark_cancelled(conn, run.id, sup.stop_detail + checkpoint_note, exit_code=rc)
                outcome = "cancelled"
            elif sup.stop_reason == "stopping" or (rc == EXIT_INTERRUPTED and sup.stop_reason is None):
                why = sup.stop_detail or "the trainer was interrupted (SIGTERM)"
                await queue.mark_interrupted(conn, run.id, why + checkpoint_note, result=result_json, exit_code=rc)
                outcome = "interrupted"
            elif rc == 0 and result is not None and result.status == "succeeded":
                await queue.mark_succeeded(conn, run.id, result=result_json, exit_code=rc)
                outcome = "succeeded"
            else:
                if sup.stop_reason:
                    why = sup.stop_detail
                elif rc == 0:
                    why = "the trainer exited 0 without a succeeded result.json"
                else:
                    why = info.describe()
                detail = sup.last_error or (result.error if result else None) or info.stderr_tail.strip()[-2000:]
                error = f"{why}: {detail}" if detail else why
                await queue.mark_failed(conn, run.id, error, result=result_json, exit_code=rc)
                outcome = "failed"
        log.info("run finished", outcome=outcome, exit=info.describe(),
                 steps=result.steps if result else None, wall_s=round(time.time() - handle.started_at, 1))
        if outcome in ("failed", "interrupted") and sup.stop_reason != "wall_clock":
            await self._follow_up(run, outcome, policy)
        return outcome

    @staticmethod
    def _read_result(output_dir: Path) -> RunResult | None:
        path = output_dir / "result.json"
        if not path.exists():
            return None
        try:
            return RunResult.load(path)
        except (ValueError, OSError):
            return None

    async def _follow_up(self, run: queue.Run, outcome: str, policy: Policy | None = None) -> None:
        """Re-queue per the policy: resume an interrupted run, retry a failed one (bounded)."""
        policy = policy or self.policies.get(run.policy)
        if policy is None:
            return
        if outcome == "interrupted" and policy.resume_interrupted:
            trigger = "resume"
        elif outcome == "failed" and run.attempt < policy.retry.max_retries:
            trigger = "retry"
        else:
            if outcome == "failed":
                self.log.warning("run failed; no automatic retry left", run_id=run.id, attempt=run.attempt,
                                 max_retries=policy.retry.max_retries)
            return
        async with self.daemon.pool.connection() as conn:
            follow = await queue.enqueue_followup(conn, run.id, trigger)
        self.log.info("run re-queued", run_id=follow.id, parent_run_id=run.id, trigger=trigger, attempt=follow.attempt)
        self._wake.set()


def create_component(settings: Settings) -> RunnerComponent:
    """Entry for ``atlasd.daemon.COMPONENT_MODULES``."""
    return RunnerComponent(settings)
