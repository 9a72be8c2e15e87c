"""The runner: one training run at a time on this machine's GPU, supervised from the daemon.

It claims the next queued run (``atlasd.queue.claim_next``: the database allows one running),
writes the run spec, starts ``python -m trainers run SPEC.json`` through an :class:`Executor`,
and supervises the child: every JSON line is logged with the run id, heartbeats, progress and the
latest metrics go to the run row, and the child is stopped (SIGTERM to its process group, SIGKILL
after ``child_stop_timeout_s``) when the operator cancels, the gear's wall-clock limit passes,
the child goes silent for ``stale_heartbeat_s`` or makes no progress for ``stale_progress_s``
(heartbeats alone are not progress: a hung main thread), the daemon stops, or supervision itself
fails (its output cannot be read or logged, its process cannot be recorded): a supervisor fault.

Outcomes: exit 0 with a succeeded ``result.json`` -> succeeded, handed to registration;
exit 75 -> interrupted (checkpoint saved; re-queued to resume if the policy says so);
anything else -> failed with the exit status and the stderr tail, retried while
``attempt < policy.retry.max_retries``. A wall-clock kill is failed and not retried. A retry or
resume continues from the parent's last checkpoint, in its output folder, when the parent got
that far (its data snapshot exists) and that folder is a run folder under ``STATE_DIR/runs``
(a row pointing elsewhere is never trusted); else it starts over from the current champion.

One transaction writes the outcome, the follow-up decision with the retry/resume run it calls
for, the pending ``atlasd.registrations`` row of a run to register (succeeded, or failed with
a result) and a succeeded run's lineage (``atlasd.lineage``: the sessions of its training
manifest, whose hash the runner adds to its copy of the result). The registration itself runs in the registration component
(``atlasd.promotions.RegistrationRetrier``), so the GPU slot is free as soon as the trainer is
gone. Database writes of this path are retried with backoff while the database refuses or drops
connections (given up only once the daemon stops: the next start's reconcile completes them);
meanwhile ``health`` reports the runner degraded (``atlasd.health``). No run is claimed while the
daemon re-takes its lock (``daemon.lock_held`` clear); a run under way goes on.
The child is always stopped before its run leaves ``running``: never two trainers on the GPU.
A run is claimed and executed holding ``daemon.gpu_slot``, which the registration component
also takes to re-measure a champion: one GPU job at a time.

Starting: the champion is fetched from the MLflow registry (``promotions.champion``); a
retryable registry error puts the run back in the queue with backoff (``queue.defer``), no
attempt spent.

Reconcile, at start and every ``poll_interval_s`` while idle: a run ``running`` without a
supervised child (a daemon that died, a write that could not be made) whose trainer the executor
can follow again (``Executor.attach``: a Slurm job still in the queue) is re-attached: supervised
and concluded like a run just started, before anything is claimed, never started twice. Else its
child is stopped if it is still alive on this host, and the run is concluded as succeeded when
its ``result.json`` says so, else as interrupted (resumed per the policy; a trainer that lost its
daemon fails on its own);
a succeeded run without a registration row gets one; a failed/interrupted run whose follow-up
was left undecided (its policy was not loaded) gets it once the policy is.
The child of the run under way is also remembered in ``STATE_DIR/runner-child.json`` so that a
daemon killed before the database knew its pid still finds it at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from atlasd import evalsplit, lineage, promotions, queue
from atlasd.component import Component
from atlasd.db import safe_error
from atlasd.executor import Executor, ExitInfo, LocalExecutor, RunHandle
from atlasd.health import Health
from atlasd.logging import get_logger
from atlasd.policies import Policy, PolicySet
from atlasd.runspec import EXIT_INTERRUPTED, RunResult, RunSpec
from atlasd.settings import Settings, child_env

T = TypeVar("T")

HEARTBEAT_WRITE_S = 2.0  # at most this often a heartbeat/metrics write to the run row
HEARTBEAT_TIMEOUT_S = 10.0  # a heartbeat write not done by then is abandoned (the next one retries)
METRIC_KEYS = ("step", "total_steps", "loss", "grad_norm", "lr", "tokens_per_s", "time_gen_s",
               "time_teacher_s", "time_student_s", "time_optim_s", "peak_memory_gb", "phase", "epoch")
QUIET_EVENTS = frozenset({"heartbeat"})  # logged at debug level only
WRITE_RETRY_FIRST_S = 0.5  # a write refused for a connection error is retried after this, doubling
WRITE_ATTEMPTS_STOPPING = 3  # while the daemon stops, a write is tried this often, then left to the reconcile
DEFER_FIRST_S = 30.0  # a start deferred for an unavailable registry: retried after this, doubling
DEFER_MAX_S = 1800.0


def run_dir_for(settings: Settings, run_id: int) -> Path:
    return (settings.state_dir / "runs" / f"run-{run_id}").resolve()


def confined_run_dir(settings: Settings, output_dir: str | None) -> Path | None:
    """``output_dir`` (read from a run row) when it is a run folder under ``STATE_DIR/runs``, else
    None: a row edited to point elsewhere must not make the trainer load files from there."""
    if not output_dir:
        return None
    root, folder = (settings.state_dir / "runs").resolve(), Path(output_dir).resolve()
    return folder if folder.parent == root and folder.name.startswith("run-") else None


class Supervision:
    """What happened while one child ran: the reason it was stopped (if it was) and its last words."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None  # cancel | stopping | wall_clock | stale | fault
        self.stop_detail = ""
        self.stopper: asyncio.Task | None = None  # the executor.cancel() under way, if any
        self.last_error: str | None = None
        self.metrics: dict[str, Any] = {}
        self.progress_mark: Any = None  # the last heartbeat's progress_at (or step)


@dataclass(frozen=True)
class Outcome:
    """How a run ends: its final state and what the run row records."""

    state: str  # succeeded | failed | interrupted | cancelled
    error: str | None
    result: RunResult | None = None  # this run's result.json, if the trainer wrote one
    exit_code: int | None = None
    stop_reason: str | None = None  # as _Supervision's, or refused (not started: a retry would be too)


class _Fault:
    """The stdout pump failed: a supervisor fault (the child must be stopped)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


class RunnerComponent(Component):
    name = "runner"

    def __init__(self, settings: Settings, executor: Executor | None = None, *, policies: PolicySet | None = None,
                 registrar: promotions.RegistrationRetrier | None = None) -> None:
        """``policies``: the daemon's live set (the cadence reloads it on SIGHUP); without one, the
        runner loads the policy folder once at start. ``registrar``: kicked when a run finished."""
        self.settings = settings
        self.executor: Executor = executor or LocalExecutor()
        self.log = get_logger("runner")
        self.host = socket.gethostname()
        self.daemon = None
        self.policies = policies
        self.current: RunHandle | None = None
        self.child_file = settings.state_dir / "runner-child.json"
        self.health = Health("runner")
        self._registrar = registrar
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._attached: list[tuple[queue.Run, RunSpec, RunHandle]] = []  # re-attached by the reconcile, to follow

    # ------------------------------------------------------------------ component interface
    async def start(self, daemon) -> None:
        self.daemon = daemon
        if self.policies is None:
            self.policies = PolicySet(self.settings.policies_dir)
            self.policies.reload()
        await self.reconcile(at_start=True)
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

    # ------------------------------------------------------------------ database writes
    async def _db(self, what: str, work: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """``work`` on a pooled connection, retried with backoff (WRITE_RETRY_FIRST_S doubling to
        ``reconnect_max_backoff_s``) while the database refuses or drops connections; other errors
        propagate. Once the daemon stops, gives up after WRITE_ATTEMPTS_STOPPING attempts (raises)."""
        delay, attempt = WRITE_RETRY_FIRST_S, 0
        while True:
            attempt += 1
            try:
                async with self.daemon.pool.connection() as conn:
                    done = await work(conn)
            except psycopg.OperationalError as exc:  # PoolTimeout included
                self.health.failed("runner", f"retrying: {what}", safe_error(exc))
                if self.daemon.stopping.is_set() and attempt >= WRITE_ATTEMPTS_STOPPING:
                    raise
                self.log.warning("database unavailable; retrying", action=what, error=safe_error(exc),
                                 attempt=attempt, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_backoff_s)
            else:
                self.health.recovered("runner")
                return done

    # ------------------------------------------------------------------ reconcile
    async def reconcile(self, *, at_start: bool = False) -> int:
        """Complete every run left without its outcome, registration or follow-up (module doc);
        returns how many. One run that cannot be completed is logged and left for the next time."""
        orphans = await self._db("list running runs", lambda conn: queue.list_runs(conn, states=["running"]))
        kept = {run.id for run, _, _ in self._attached}  # re-attached, not yet followed: not orphans
        repaired = 0
        for run in orphans:
            if run.id in kept:
                continue
            try:
                attached = await self._reattach(run)
            except Exception:  # e.g. Slurm's controller unreachable: neither followed nor concluded yet
                self.log.exception("cannot look for the run's live trainer; left for the next reconcile",
                                   run_id=run.id)
                kept.add(run.id)
                continue
            if attached is not None:
                self._attached.append((run, *attached))
                kept.add(run.id)
                repaired += 1
        reaped = await self._reap_remembered_child(kept)
        unregistered = await self._db("list unregistered runs", queue.unregistered_runs)
        undecided = await self._db("list undecided runs", queue.undecided_runs)
        repairs = ([(run, self._recover(run, at_start, reaped == run.id)) for run in orphans if run.id not in kept]
                   + [(run, self._register_late(run)) for run in unregistered]
                   + [(run, self._decide_late(run)) for run in undecided])
        for run, repair in repairs:
            try:
                repaired += await repair
            except Exception:  # one run must not stop the others (nor the daemon)
                self.log.exception("reconcile could not complete a run", run_id=run.id, state=run.state)
        await self._db("record the reconcile", lambda conn: queue.record_reconcile(conn, repaired))
        if repaired:
            self.log.info("reconciled", repaired=repaired)
        return repaired

    async def _reattach(self, run: queue.Run) -> tuple[RunSpec, RunHandle] | None:
        """The recorded spec of a running run and the executor's handle on its trainer still at work
        (``Executor.attach``), when the run can be supervised again: its policy and gear loaded,
        its spec recorded. The handle's start is the run's (the wall-clock limit counts from it)."""
        policy = self.policies.get(run.policy)
        if not run.output_dir or policy is None or run.gear not in policy.gears:
            return None
        try:
            spec = RunSpec.model_validate(run.spec)
        except ValueError:  # no spec recorded (or not one): nothing to supervise it by
            return None
        handle = await self.executor.attach(run.id, Path(run.output_dir))
        if handle is None:
            return None
        handle.started_at = run.started_at.timestamp() if run.started_at else handle.started_at
        self.log.warning("re-attached to the run's live trainer", run_id=run.id, policy=run.policy, gear=run.gear,
                         pid=handle.pid)
        return spec, handle

    async def _recover(self, run: queue.Run, at_start: bool, reaped: bool) -> int:
        """A running run without a supervised child: stop its child if still alive here (``reaped``:
        already stopped, found by runner-child.json), conclude it."""
        log = self.log.bind(run_id=run.id, policy=run.policy, gear=run.gear)
        if not reaped and run.pgid and run.output_dir and run.host == self.host:
            reaped = await self.executor.reap(
                run.pid or run.pgid, run.pgid, Path(run.output_dir), self.settings.child_stop_timeout_s
            )
        age = None if run.heartbeat_at is None else round(time.time() - run.heartbeat_at.timestamp(), 1)
        why = ("the daemon stopped unexpectedly during the run" if at_start
               else "the run was left running without a supervised trainer")
        why += "; its orphaned trainer was stopped" if reaped else ""
        log.warning("orphaned run recovered", reaped_child=reaped, heartbeat_age_s=age, host=run.host)
        # a trainer that lost its daemon fails on its next line (broken pipe): only success is final
        result = self._read_result(Path(run.output_dir), run.id) if run.output_dir else None
        if result is not None and result.status == "succeeded":
            outcome = Outcome("succeeded", None, result)
        else:
            failed = f" (the trainer then failed: {result.error})" if result is not None and result.error else ""
            outcome = Outcome("interrupted", why + failed, result)
        await self._conclude(run, self.policies.get(run.policy), outcome, log)
        return 1

    async def _register_late(self, run: queue.Run) -> int:
        """A succeeded run without a registration row (it ended before outcome and row were one write)."""
        if not run.output_dir:
            return 0
        files = promotions.run_files(run.output_dir, run.id)
        await self._db("queue a registration", lambda conn: promotions.queue_registration(conn, run.id, *files))
        self.log.warning("succeeded run had no registration; queued", run_id=run.id, policy=run.policy)
        self._kick_registration()
        return 1

    async def _decide_late(self, run: queue.Run) -> int:
        """A failed/interrupted run whose follow-up was undecided: decide it now that its policy is loaded."""
        policy = self.policies.get(run.policy)
        if policy is None:
            return 0
        follow = self._follow_up_for(run, Outcome(run.state, run.error), policy)
        child = await self._db("decide a follow-up", lambda conn: queue.decide_follow_up(conn, run.id, follow))
        self.log.info("follow-up decided", run_id=run.id, follow_up=follow, follow_up_run_id=child and child.id)
        self._wake.set()
        return 1

    async def _reap_remembered_child(self, attached: set[int]) -> int | None:
        """The child named in ``runner-child.json``, if alive, belongs to no supervised run: stop
        it, unless its run is re-attached (``attached``: run ids). Returns the id of its run when
        it was stopped."""
        reaped = None
        try:
            child = json.loads(self.child_file.read_text())
            run_id, pid, pgid, run_dir = child["run_id"], int(child["pid"]), int(child["pgid"]), Path(child["run_dir"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.warning("unreadable runner-child.json; ignored", error=str(exc))
        else:
            if run_id in attached:
                return None
            if await self.executor.reap(pid, pgid, run_dir, self.settings.child_stop_timeout_s):
                self.log.warning("orphaned trainer stopped", run_id=run_id, pid=pid)
                reaped = run_id
        self.child_file.unlink(missing_ok=True)
        return reaped

    # ------------------------------------------------------------------ main loop
    async def _loop(self) -> None:
        next_reconcile = time.monotonic() + self.settings.poll_interval_s
        while not self.daemon.stopping.is_set():
            if not self.daemon.lock_held.is_set():  # being re-taken: no new work (another daemon may get it)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.daemon.lock_held.wait(), self.settings.runner_poll_s)
                continue
            if time.monotonic() >= next_reconcile:
                try:
                    await self.reconcile()
                except Exception:  # the next round retries
                    self.log.exception("reconcile failed")
                next_reconcile = time.monotonic() + self.settings.poll_interval_s
            async with self.daemon.gpu_slot:  # not while a champion is re-measured for a registration
                run, spec, attached = self._attached.pop(0) if self._attached else (None, None, None)
                try:
                    if run is None:
                        async with self.daemon.pool.connection() as conn:
                            run = await queue.claim_next(conn)
                except psycopg.Error as exc:
                    self.log.warning("cannot claim a run; retrying", error=safe_error(exc))
                    run = None
                if run is not None:
                    try:
                        await (self._execute(run) if attached is None else self._follow_attached(run, spec, attached))
                    except Exception as exc:  # the runner must survive anything one run does
                        self.log.exception("run failed in the runner", run_id=run.id)
                        await self._abandon(run, exc)
                    finally:
                        self.current = None
                    continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.runner_poll_s)

    async def _abandon(self, run: queue.Run, exc: Exception) -> None:
        """After an error of the runner itself: stop the child if it still runs, then mark the run
        failed (and retried per its policy). A database given up on while the daemon stops, and
        whatever cannot be written, is left to the reconcile."""
        handle = self.current
        if handle is not None and self.executor.alive(handle.pid, handle.pgid, handle.run_dir):
            await self.executor.cancel(handle, self.settings.child_stop_timeout_s)
        if isinstance(exc, psycopg.OperationalError):
            self.log.error("run left running for the reconcile: database unavailable", run_id=run.id)
            return
        try:
            await self._conclude(run, self.policies.get(run.policy),
                                 Outcome("failed", f"runner error: {safe_error(exc)}", stop_reason="fault"),
                                 self.log.bind(run_id=run.id))
        except Exception:
            self.log.exception("cannot record the run's failure; the reconcile will", run_id=run.id)

    async def _follow_attached(self, run: queue.Run, spec: RunSpec, handle: RunHandle) -> None:
        """A run re-attached by the reconcile, supervised from its recorded spec."""
        log = self.log.bind(run_id=run.id, policy=run.policy, gear=run.gear)
        await self._follow(run, self.policies.get(run.policy), spec, handle, log)

    async def _execute(self, run: queue.Run) -> None:
        log = self.log.bind(run_id=run.id, policy=run.policy, gear=run.gear)
        policy = self.policies.get(run.policy)
        if policy is None or run.gear not in policy.gears:
            why = f"policy {run.policy!r}" + ("" if policy is None else f" has no gear {run.gear!r}")
            log.error("run has no policy to run it", reason=why)
            await self._conclude(run, policy, Outcome("failed", f"{why} is not loaded (removed or invalid); "
                                                                "nothing to run"), log)
            return

        try:
            spec = await self._build_spec(run, policy)
        except evalsplit.EvalSplitChanged as exc:
            log.error("run not started: eval split changed", error=str(exc))
            await self._conclude(run, policy, Outcome("failed", str(exc), stop_reason="refused"), log)
            return
        except promotions.RegistryCallError as exc:
            why = f"cannot resolve the champion of {policy.name!r} to start from (MLflow registry): {exc}"
            if exc.outcome.retryable:
                await self._defer(run, why, log)
            else:
                log.error("run not started: champion unknown", error=str(exc))
                await self._conclude(run, policy, Outcome("failed", why), log)
            return
        run_dir = Path(spec.output_dir)
        spec_path = spec.dump(run_dir / f"run_spec-{run.id}.json")
        await self._db("record the run spec", lambda conn: queue.record_spec(
            conn, run.id, output_dir=str(run_dir), spec=spec.model_dump(mode="json"),
            champion_version=spec.champion_version))
        # the database URL is the child's only secret (never in argv or files); no MLflow credentials
        env = {"PYTHONUNBUFFERED": "1", **child_env(ATLASD_DB_URL=self.settings.dsn)}
        if self.settings.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.cuda_visible_devices

        handle = await self.executor.submit(run.id, spec_path, run_dir, env)
        log.info("run started", pid=handle.pid, trigger=run.trigger, window_lo=run.window_lo,
                 window_hi=run.window_hi, student=spec.student, champion_version=spec.champion_version,
                 resume=spec.resume, attempt=run.attempt)
        await self._follow(run, policy, spec, handle, log)

    async def _follow(self, run: queue.Run, policy: Policy, spec: RunSpec, handle: RunHandle, log) -> None:
        """Supervise the trainer behind ``handle`` (just submitted, or re-attached after a daemon
        restart) to its end and record the run's outcome."""
        self.current = handle
        self._remember_child(handle)

        async def record(conn: psycopg.AsyncConnection) -> queue.Run:
            return await queue.record_process(
                conn, run.id, pid=handle.pid, pgid=handle.pgid, host=self.host, output_dir=str(Path(spec.output_dir)),
                spec=spec.model_dump(mode="json"), champion_version=spec.champion_version,
            )

        recorder = asyncio.create_task(self._db("record the trainer's process", record), name=f"run-{run.id}-record")
        sup = await self._supervise(run, policy, handle, recorder, log)
        info = await (sup.stopper if sup.stopper is not None else self.executor.wait(handle))
        await self._conclude(run, policy, self._outcome(run, spec, sup, info), log, handle=handle)

    async def _build_spec(self, run: queue.Run, policy: Policy) -> RunSpec:
        """A resume or retry continues its parent's output dir from the same student when the
        parent got as far as its data snapshot (the trainer then resumes from the last good
        checkpoint, if any); any other run starts from the policy's current champion (its
        checkpoint, fetched by the registry child) or, when nothing has been promoted yet, the
        base student."""
        parent = None
        if run.trigger in ("resume", "retry") and run.parent_run_id is not None:
            parent = await self._db("read the parent run", lambda conn: queue.get_run(conn, run.parent_run_id))
        parent_dir = confined_run_dir(self.settings, parent.output_dir) if parent is not None else None
        if parent is not None and parent.output_dir and parent_dir is None:
            self.log.warning("parent run folder is not under STATE_DIR/runs; starting over", run_id=run.id,
                             parent_run_id=parent.id, output_dir=parent.output_dir)
        resume = (parent_dir is not None and bool(parent.spec)
                  and (run.trigger == "resume" or (parent_dir / "data" / "train.jsonl").is_file()))
        if resume:
            output_dir = parent_dir
            student, champion_version = parent.spec["student"], parent.spec.get("champion_version")
        else:
            output_dir = run_dir_for(self.settings, run.id)
            current = await promotions.champion(self.settings, policy.name)
            student, champion_version = current.get("path"), current.get("champion")
        split = await self._db("resolve the eval split", lambda conn: evalsplit.current(conn, policy))
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
            split_salt=split.key_salt,
        )

    async def _defer(self, run: queue.Run, why: str, log) -> None:
        """Back to the queue with backoff: the store the start needs is unavailable; no attempt spent."""
        delay = min(DEFER_FIRST_S * 2 ** min(run.deferrals, 16), DEFER_MAX_S)
        back = await self._db("defer the run", lambda conn: queue.defer(conn, run.id, why, delay))
        log.warning("run start deferred: registry unavailable", error=why, retry_in_s=delay,
                    deferrals=run.deferrals + 1, queued_run_id=back.id)

    def _remember_child(self, handle: RunHandle) -> None:
        try:
            self.child_file.parent.mkdir(parents=True, exist_ok=True)
            self.child_file.write_text(json.dumps({"run_id": handle.run_id, "pid": handle.pid, "pgid": handle.pgid,
                                                   "run_dir": str(handle.run_dir)}))
        except OSError as exc:  # the run row has the pid too, once recorded
            self.log.warning("cannot write runner-child.json", run_id=handle.run_id, error=str(exc))

    # ------------------------------------------------------------------ supervision
    async def _supervise(self, run: queue.Run, policy: Policy, handle: RunHandle, recorder: asyncio.Task,
                         log) -> Supervision:
        """Until the child's output ends. Any fault (the pump, the process record, a bug here)
        stops the child; the loop keeps reading its output while it checkpoints."""
        sup = Supervision()
        sup.metrics = dict(run.metrics or {})  # a re-attached run's last metrics stand until new lines come
        events: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for event in self.executor.events(handle):
                    await events.put(event)
            except Exception as exc:  # noqa: BLE001 - e.g. ENOSPC writing stdout.jsonl
                await events.put(_Fault(f"the trainer's output cannot be read or logged: {safe_error(exc)}"))
            finally:
                await events.put(done)

        reader = asyncio.create_task(pump(), name=f"run-{run.id}-stdout")
        limit: timedelta = policy.gears[run.gear].wall_clock_limit
        last_line = last_progress = time.monotonic()
        started = last_line - max(0.0, time.time() - handle.started_at)  # a re-attached run began before
        last_write = 0.0
        dirty = True
        recorded = False
        beat: asyncio.Task | None = None  # the heartbeat write under way: never awaited by the loop
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                event = None
            if event is done:
                break
            try:
                now = time.monotonic()
                if isinstance(event, _Fault):
                    self._fault(sup, event.detail, handle, log)
                elif event is not None:
                    last_line = now
                    dirty = True
                    if self._absorb(event, sup, log):
                        last_progress = now
                if not recorded and recorder.done():
                    recorded = True
                    if recorder.exception() is not None:
                        self._fault(sup, f"cannot record the trainer's process: {safe_error(recorder.exception())}",
                                    handle, log)
                if beat is not None and beat.done():
                    if beat.result() and sup.stop_reason is None:
                        self._request_stop(sup, "cancel", "cancelled by the operator (atlasd cancel)", handle, log)
                    beat = None
                if dirty and beat is None and now - last_write >= HEARTBEAT_WRITE_S:
                    beat = asyncio.create_task(self._heartbeat(run.id, dict(sup.metrics), now - last_progress))
                    last_write, dirty = now, False
                if sup.stop_reason is None:
                    if self.daemon.stopping.is_set():
                        self._request_stop(sup, "stopping", "the daemon is stopping", handle, log)
                    elif now - started > limit.total_seconds():
                        self._request_stop(sup, "wall_clock", f"wall-clock limit of {limit} exceeded", handle, log)
                    elif now - last_line > self.settings.stale_heartbeat_s:
                        self._request_stop(sup, "stale", f"no output for {self.settings.stale_heartbeat_s:.0f}s "
                                                         "(hung trainer)", handle, log)
                    elif now - last_progress > self.settings.stale_progress_s:
                        self._request_stop(sup, "stale", f"no progress for {self.settings.stale_progress_s:.0f}s, "
                                                         "heartbeats only (hung trainer)", handle, log)
            except Exception as exc:  # noqa: BLE001 - a supervisor fault: the child is stopped, never orphaned
                log.exception("supervision failed")
                self._fault(sup, f"supervisor error: {safe_error(exc)}", handle, log)
        await reader
        if not recorder.done():  # the child is gone before the database took its pid: no point any more
            recorder.cancel()
        await asyncio.gather(recorder, *([beat] if beat else []), return_exceptions=True)
        if dirty:
            await self._heartbeat(run.id, sup.metrics, time.monotonic() - last_progress)  # the last metrics
        return sup

    def _absorb(self, event: dict[str, Any], sup: Supervision, log) -> bool:
        """Log one line and keep its metrics; True when it shows progress (anything but a heartbeat
        whose ``progress_at`` (older trainers: step) is unchanged)."""
        kind = str(event.get("event", "output"))
        fields = {k: v for k, v in event.items() if k not in ("event", "run_id", "ts")}
        if kind in QUIET_EVENTS:
            log.debug("trainer", trainer_event=kind, **fields)
        elif kind == "error":
            sup.last_error = str(event.get("error") or event)
            log.error("trainer", trainer_event=kind, **fields)
        elif kind == "output_skipped":
            log.warning("trainer output line skipped", **fields)
        else:
            log.info("trainer", trainer_event=kind, **fields)
        if kind == "eval":
            sup.metrics[f"eval_{event.get('which', 'model')}_success_rate"] = event.get("success_rate")
        sup.metrics.update({k: event[k] for k in METRIC_KEYS if event.get(k) is not None})
        if kind != "heartbeat":
            return True
        mark = event.get("progress_at", event.get("step"))
        progressed, sup.progress_mark = mark != sup.progress_mark, mark
        return progressed

    async def _heartbeat(self, run_id: int, metrics: dict[str, Any], progress_age_s: float) -> bool:
        """Write heartbeat, metrics and progress age (bounded by HEARTBEAT_TIMEOUT_S); True when
        `atlasd cancel` asked to stop the run. A failed write is logged and skipped."""
        try:
            async with asyncio.timeout(HEARTBEAT_TIMEOUT_S), self.daemon.pool.connection() as conn:
                row = await queue.heartbeat(conn, run_id, dict(metrics), progress_age_s)
        except (psycopg.Error, TimeoutError) as exc:
            self.log.warning("heartbeat write failed", run_id=run_id, error=safe_error(exc))
            return False
        except queue.QueueError:
            return False
        return row.cancel_requested_at is not None

    def _request_stop(self, sup: Supervision, reason: str, detail: str, handle: RunHandle, log) -> None:
        sup.stop_reason, sup.stop_detail = reason, detail
        log.warning("stopping the trainer", reason=reason, detail=detail, grace_s=self.settings.child_stop_timeout_s)
        sup.stopper = asyncio.create_task(self.executor.cancel(handle, self.settings.child_stop_timeout_s))

    def _fault(self, sup: Supervision, detail: str, handle: RunHandle, log) -> None:
        """A supervisor fault: stop the child (unless a stop is under way already); the run fails and is retried."""
        log.error("supervisor fault", detail=detail)
        if sup.stopper is None:
            self._request_stop(sup, "fault", detail, handle, log)

    # ------------------------------------------------------------------ outcome
    def _outcome(self, run: queue.Run, spec: RunSpec, sup: Supervision, info: ExitInfo) -> Outcome:
        result = self._read_result(Path(spec.output_dir), run.id)
        rc = info.returncode
        note = f"; checkpoint saved at step {result.steps}" if result and rc == EXIT_INTERRUPTED else ""
        if sup.stop_reason == "cancel":
            return Outcome("cancelled", sup.stop_detail + note, None, rc, sup.stop_reason)
        if sup.stop_reason == "stopping" or (rc == EXIT_INTERRUPTED and sup.stop_reason is None):
            why = sup.stop_detail or "the trainer was interrupted (SIGTERM)"
            return Outcome("interrupted", why + note, result, rc, sup.stop_reason)
        if rc == 0 and result is not None and result.status == "succeeded":
            return Outcome("succeeded", None, result, rc, sup.stop_reason)
        if sup.stop_reason:
            why = sup.stop_detail
        elif rc == 0:
            why = "the trainer exited 0 without a succeeded result.json"
        else:
            why = info.describe()
        detail = sup.last_error or (result.error if result else None) or info.stderr_tail.strip()[-2000:]
        return Outcome("failed", (f"{why}: {detail}" if detail else why) + note, result, rc, sup.stop_reason)

    @staticmethod
    def _read_result(output_dir: Path, run_id: int) -> RunResult | None:
        """This run's ``result.json`` (a resumed run's folder may still hold its parent's)."""
        path = output_dir / "result.json"
        if not path.exists():
            return None
        try:
            result = RunResult.load(path)
        except (ValueError, OSError):
            return None
        return result if result.run_id == run_id else None

    def _follow_up_for(self, run: queue.Run, outcome: Outcome, policy: Policy | None) -> queue.FollowUp | None:
        """What a failed/interrupted run calls for, per its policy (None: undecided, no policy loaded)."""
        if outcome.stop_reason in ("wall_clock", "refused"):  # a retry would end the same way
            return "none"
        if policy is None:
            return None
        if outcome.state == "interrupted":
            return "resume" if policy.resume_interrupted else "none"
        if run.gear not in policy.gears:
            return "none"
        if run.attempt < policy.retry.max_retries:
            return "retry"
        self.log.warning("run failed; no automatic retry left", run_id=run.id, attempt=run.attempt,
                         max_retries=policy.retry.max_retries)
        return "none"

    async def _conclude(self, run: queue.Run, policy: Policy | None, outcome: Outcome, log,
                        handle: RunHandle | None = None) -> None:
        """Write the outcome, the follow-up (decision and run) and the registration row in one
        transaction, retried while the database is unavailable; then hand over to registration.
        A run no longer running (concluded by an earlier attempt whose commit was not acknowledged)
        is left as it is."""
        follow = self._follow_up_for(run, outcome, policy) if outcome.state in ("failed", "interrupted") else None
        files = manifest = None
        if outcome.state in ("succeeded", "failed") and outcome.result is not None:
            output_dir = handle.run_dir if handle is not None else Path(run.output_dir)
            if outcome.state == "succeeded":
                manifest = self._manifest(output_dir, log)
                if manifest is not None:
                    outcome = replace(outcome, result=outcome.result.model_copy(update={"manifest_hash": manifest.hash}))
            files = self._registration_files(run.id, output_dir, outcome.result, log)
        result_json = outcome.result.model_dump(mode="json") if outcome.result else None

        async def write(conn: psycopg.AsyncConnection) -> tuple[bool, queue.Run | None]:
            async with conn.transaction():
                current = await queue.get_run(conn, run.id)
                if current is None or current.state != "running":
                    return False, None
                if outcome.state == "succeeded":
                    await queue.mark_succeeded(conn, run.id, result=result_json, exit_code=outcome.exit_code)
                elif outcome.state == "cancelled":
                    await queue.mark_cancelled(conn, run.id, outcome.error, exit_code=outcome.exit_code)
                else:
                    mark = queue.mark_failed if outcome.state == "failed" else queue.mark_interrupted
                    await mark(conn, run.id, outcome.error, result=result_json, exit_code=outcome.exit_code,
                               follow_up=follow)
                if files is not None:
                    await promotions.queue_registration(conn, run.id, *files)
                if manifest is not None:
                    await lineage.record(conn, run.id, manifest)
                if follow in ("retry", "resume"):
                    return True, await queue.enqueue_followup(conn, run.id, follow)
                return True, None

        concluded, child = await self._db(f"record the outcome of run {run.id}", write)
        self.child_file.unlink(missing_ok=True)
        if not concluded:
            log.info("run already concluded", outcome=outcome.state)
            return
        steps = outcome.result.steps if outcome.result else None
        wall_s = round(time.time() - handle.started_at, 1) if handle is not None else None
        log.info("run finished", outcome=outcome.state, exit_code=outcome.exit_code, steps=steps, wall_s=wall_s,
                 error=outcome.error, follow_up=follow, registration=files is not None)
        if child is not None:
            log.info("run re-queued", follow_up_run_id=child.id, trigger=child.trigger, attempt=child.attempt)
            self._wake.set()
        if files is not None:
            self._kick_registration()

    @staticmethod
    def _manifest(output_dir: Path, log) -> lineage.Manifest | None:
        """The training manifest of a succeeded run (None: its trainer wrote none, or it cannot be
        read: then no lineage is recorded and the version is never tainted; logged)."""
        try:
            return lineage.read_manifest(output_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("training manifest unreadable; the run's lineage is not recorded", error=str(exc))
            return None

    def _registration_files(self, run_id: int, output_dir: Path, result: RunResult, log) -> tuple[Path, Path, Path]:
        """The files to register; this run's own copy of its result, which a retry resuming in the
        same folder will not overwrite (result.json itself when the copy cannot be written)."""
        try:
            result.dump(output_dir / f"result-{run_id}.json")
        except OSError as exc:
            log.warning("cannot copy result.json for the registration; registering result.json", error=str(exc))
        return promotions.run_files(output_dir, run_id)

    def _kick_registration(self) -> None:
        if self._registrar is not None:
            self._registrar.kick()
