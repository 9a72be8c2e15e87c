"""Daemon side of the model registry: runs ``python -m registry ...`` as a child (the daemon never
imports mlflow), records each decision in ``atlasd.promotions``, retries registrations while the
MLflow store is unavailable (``atlasd.registrations``), and runs the post-promotion hook.

Entry points:
- the runner, when a run ends (succeeded, or failed with a result): ``await queue_registration(conn,
  run_id, *run_files(output_dir, run_id))`` in the transaction that writes the outcome, then
  ``RegistrationRetrier.kick()``; the registration itself (``finalize_run``: MLflow run, model
  version, gate) runs in :class:`RegistrationRetrier` (component ``atlasd.promotions``), off the
  GPU slot, retried with backoff while the store is unavailable;
- the runner, before a run: ``await champion(settings, policy_name)`` -> ``{"champion": version |
  None, "path": local checkpoint folder | None, ...}`` for ``RunSpec.student``/``champion_version``;
  ``mlflow_target(settings, policy)`` for ``RunSpec.mlflow``;
- the CLI: ``list_models``, ``force_promote``, ``rollback`` (via ``asyncio.run``); ``requeue_registration``
  and ``list_registrations`` (`atlasd register RUN_ID`, `atlasd registrations`);
- ``atlasd status``: ``champions(conn)``, the current champion per policy from the audit table.

One gate at a time per policy: every champion move (a registration's gate, ``atlasd promote
--force``, ``atlasd rollback``) holds the policy's advisory lock (``policy_lock``) from reading
the champion to moving the alias and writing the audit row, so two gates never both promote from
the same champion. A registration whose gate must re-measure the champion on the eval set (the
champion changed since the run started and carries no score for this eval set) runs that
measurement in the GPU slot: ``finalize --defer-measure`` answers ``EXIT_NEEDS_GPU`` and the
retrier calls again holding ``gpu_slot`` (the runner's), never beside a training child.

Registry children fail fast against an unreachable store: MLflow's HTTP client retries twice with a
30 s request timeout (its default, 7 retries, holds a call ~4 minutes against a server that is down)
and a PostgreSQL store gets a 10 s connect timeout (``FAIL_FAST_ENV``; the environment can override
each); ``REGISTRY_TIMEOUT_S`` bounds any child.

Post-promotion hook (when the champion moves: promote, force, rollback): ``NOTIFY
atlasd_promotions '{"model", "version", "policy"}'`` (in the transaction that writes the audit
row; ``ATLASD_PROMOTION_NOTIFY``), then ``ATLASD_PROMOTION_HOOK`` (a JSON argv list, run without
a shell, 60 s limit, environment ``ATLASD_PROMOTION_{MODEL,VERSION,POLICY,ACTION}`` and the daemon's
environment without credentials: ``atlasd.settings.SECRET_ENV``). What the
hook did is stored in ``atlasd.promotions.hook``; a failing hook never undoes a promotion.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from atlasd import lineage, queue
from atlasd.component import KickedLoop
from atlasd.db import aconnect
from atlasd.logging import get_logger
from atlasd.runspec import EXIT_BAD_INPUT, EXIT_NEEDS_GPU, EXIT_OK, EXIT_UNAVAILABLE, MlflowTarget
from atlasd.settings import Settings, child_env, redact_url, without_password

if TYPE_CHECKING:
    from atlasd.policies import Policy, PolicySet

CHANNEL = "atlasd_promotions"
REGISTRY_TIMEOUT_S = 3600.0  # finalize may upload a large checkpoint or re-measure the champion
HOOK_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 10  # registration attempts before a run's row is marked failed
LOCK_CLASS = 0x61746C61  # pg_advisory_lock(LOCK_CLASS, run_id): one finalize per run at a time
POLICY_LOCK_CLASS = 0x61746C70  # pg_advisory_lock(POLICY_LOCK_CLASS, hashtext(policy)): one champion move at a time
POLICY_LOCK_WAIT_S = 60.0  # a registration waits this long for another promotion of its policy (then: next round)
OPERATOR_LOCK_WAIT_S = 300.0  # `atlasd promote/rollback` wait this long for a registration of the policy
CHAMPION_MOVES = ("promote", "force", "rollback")
REGISTRATION_STATES = ("pending", "done", "failed")
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "PGCONNECT_TIMEOUT": "10",
}


# The gate's rejections of %(policy)s/%(gear)s's runs since its last promotion (the cadence's back-off).
REJECTIONS_SINCE_PROMOTION = """SELECT count(*) FROM atlasd.promotions p JOIN atlasd.runs r ON r.id = p.atlasd_run_id
         WHERE r.policy = %(policy)s AND r.gear = %(gear)s AND p.action = 'reject'
           AND p.id > COALESCE((SELECT max(q.id) FROM atlasd.promotions q JOIN atlasd.runs w ON w.id = q.atlasd_run_id
                                 WHERE w.policy = %(policy)s AND w.gear = %(gear)s AND q.action = 'promote'), 0)"""


class RegistrationRefused(ValueError):
    """`atlasd register` does not apply to this run (unknown, not finished, already registered); safe to show."""


class PolicyBusy(RuntimeError):
    """Another champion move of the policy holds its lock past the wait; safe to show."""


class RegistryCallError(RuntimeError):
    """The registry child refused or failed; the message is safe to show (no password)."""

    def __init__(self, outcome: RegistryOutcome):
        self.outcome = outcome
        super().__init__(outcome.error)


@dataclass(frozen=True)
class RegistryOutcome:
    code: int
    payload: dict[str, Any]
    stderr_tail: str

    @property
    def error(self) -> str:
        return redact_url(self.payload.get("error") or self.stderr_tail or f"exit {self.code}")

    @property
    def retryable(self) -> bool:
        return self.code not in (EXIT_OK, EXIT_BAD_INPUT)


def mlflow_target(settings: Settings, policy: Policy) -> MlflowTarget:
    """RunSpec.mlflow for a run of ``policy``: experiment ``atlasd/<policy>``, the policy's model; the
    store's URI without its password (the registry child gets it in ``MLFLOW_TRACKING_URI``)."""
    return MlflowTarget(tracking_uri=without_password(settings.tracking_uri), experiment=f"atlasd/{policy.name}",
                        registered_model=policy.model_name)


def actor_name() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _cache_dir(settings: Settings) -> str:
    return str(settings.state_dir.resolve() / "registry-cache")


async def run_registry(settings: Settings, *args: str, timeout_s: float = REGISTRY_TIMEOUT_S) -> RegistryOutcome:
    """``python -m registry ARGS`` with the tracking URI in its environment (not in argv). A child
    past ``timeout_s`` is killed (a retryable outcome); so is one whose caller is cancelled."""
    env = {**FAIL_FAST_ENV, **child_env(MLFLOW_TRACKING_URI=settings.tracking_uri,
                                        MLFLOW_REGISTRY_URI=settings.tracking_uri)}
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):  # an HTTP store's credentials
        if name in os.environ:
            env[name] = os.environ[name]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "registry", *args, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return RegistryOutcome(EXIT_UNAVAILABLE, {"error": f"python -m registry {args[0]} timed out after {timeout_s:g} s"}, "")
    except asyncio.CancelledError:  # the daemon is stopping: never leave a registration running unsupervised
        proc.kill()
        await proc.wait()
        raise
    tail = redact_url(stderr.decode(errors="replace")[-4000:])
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    try:
        payload = json.loads(lines[-1]) if lines else {}
    except ValueError:
        payload = {}
    code = proc.returncode if payload or proc.returncode != EXIT_OK else 1
    if not payload:
        payload = {"error": f"python -m registry {args[0]} exited {proc.returncode} without a JSON result: {tail[-500:]}"}
    return RegistryOutcome(code, payload, tail)


async def _call(settings: Settings, *args: str) -> dict:
    outcome = await run_registry(settings, *args)
    if outcome.code != EXIT_OK:
        raise RegistryCallError(outcome)
    return outcome.payload


# ---------------------------------------------------------------- audit and hooks
async def _record(conn: psycopg.AsyncConnection, *, policy: str, model: str, from_version: str | None,
                  to_version: str, action: str, reason: str, checks: list, actor: str,
                  atlasd_run_id: int | None = None, mlflow_run_id: str | None = None,
                  notify: bool) -> int | None:
    """Insert the audit row (and NOTIFY, delivered at commit). None when this run's gate decision
    was already recorded by an earlier attempt."""
    cur = await conn.execute(
        """INSERT INTO atlasd.promotions (policy, registered_model, from_version, to_version, action, reason,
                                          checks, actor, atlasd_run_id, mlflow_run_id)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (atlasd_run_id) WHERE action IN ('promote', 'reject') DO NOTHING
           RETURNING id""",
        [policy, model, from_version, to_version, action, reason, Jsonb(checks), actor, atlasd_run_id, mlflow_run_id],
    )
    row = await cur.fetchone()
    if row and notify and action in CHAMPION_MOVES:
        await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, json.dumps(
            {"model": model, "version": to_version, "policy": policy})])
    return row[0] if row else None


async def _run_hook(settings: Settings, conn: psycopg.AsyncConnection, promotion_id: int, *, policy: str,
                    model: str, version: str, action: str) -> str:
    parts = ["notified"] if settings.promotion_notify else []
    if settings.promotion_hook:
        env = child_env(ATLASD_PROMOTION_MODEL=model, ATLASD_PROMOTION_VERSION=version,
                        ATLASD_PROMOTION_POLICY=policy, ATLASD_PROMOTION_ACTION=action)
        try:
            proc = await asyncio.create_subprocess_exec(
                *settings.promotion_hook, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), HOOK_TIMEOUT_S)
                parts.append(f"hook exit {proc.returncode}: {out.decode(errors='replace').strip()[-500:]}")
            except TimeoutError:
                proc.kill()
                await proc.wait()
                parts.append(f"hook killed after {HOOK_TIMEOUT_S:g} s")
        except OSError as exc:
            parts.append(f"hook not started: {exc}")
        get_logger("registry").info("promotion hook", policy=policy, model=model, version=version, hook=parts[-1])
    text = "; ".join(parts) or "none"
    await conn.execute("UPDATE atlasd.promotions SET hook = %s WHERE id = %s", [text, promotion_id])
    return text


@contextlib.asynccontextmanager
async def policy_lock(conn: psycopg.AsyncConnection, policy: str, wait_s: float):
    """Hold ``policy``'s promotion lock (a session advisory lock on ``conn``, autocommit) for the
    block; :class:`PolicyBusy` when another holder keeps it past ``wait_s``. A connection lost
    meanwhile releases it on the server."""
    await conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{max(1, round(wait_s * 1000))}ms"])
    try:
        await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [POLICY_LOCK_CLASS, policy])
    except psycopg.errors.LockNotAvailable:
        raise PolicyBusy(f"another promotion of policy {policy!r} is in progress (waited {wait_s:g} s); "
                         "try again") from None
    finally:
        await conn.execute("SELECT set_config('lock_timeout', '0', false)")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.OperationalError):
            await conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [POLICY_LOCK_CLASS, policy])


async def _operator_action(settings: Settings, policy: str, *args: str) -> dict:
    """``python -m registry promote|rollback ...`` and its audit row, under the policy's lock."""
    async with await aconnect(settings.dsn, autocommit=True, application_name="atlasd-registry") as conn:
        async with policy_lock(conn, policy, OPERATOR_LOCK_WAIT_S):
            finished = await _finish_pending(settings, conn, policy)
            payload = await _call(settings, *args)
            async with conn.transaction():
                pid = await _record(conn, policy=payload["policy"], model=payload["registered_model"],
                                    from_version=payload["from_version"], to_version=payload["to_version"],
                                    action=payload["action"], reason=payload["reason"], checks=payload["checks"],
                                    actor=payload["actor"], notify=settings.promotion_notify)
        for done in finished:  # their hooks, in order, before the operator's
            await _after_registration(settings, conn, done)
        payload["promotion_id"] = pid
        payload["hook"] = await _run_hook(settings, conn, pid, policy=payload["policy"],
                                          model=payload["registered_model"], version=payload["to_version"],
                                          action=payload["action"])
    return payload


# ---------------------------------------------------------------- operator actions
async def list_models(settings: Settings, policy: str | None = None) -> dict:
    return await _call(settings, "models", *(["--policy", policy] if policy else []))


async def champion(settings: Settings, policy: str) -> dict:
    """The policy's champion and a local folder with its checkpoint (``{"champion": None}`` if none
    yet). Raises RegistryCallError (``.outcome.retryable``) when the registry cannot answer; a
    policy with no registered model yet answers ``{"champion": None}``."""
    outcome = await run_registry(settings, "champion", "--policy", policy, "--cache-dir", _cache_dir(settings))
    if outcome.code == EXIT_BAD_INPUT and "no registered model" in outcome.error:
        return {"policy": policy, "champion": None, "path": None}
    if outcome.code != EXIT_OK:
        raise RegistryCallError(outcome)
    return outcome.payload


async def force_promote(settings: Settings, policy: str, version: str, reason: str, actor: str) -> dict:
    return await _operator_action(settings, policy, "promote", "--policy", policy, "--version", str(version),
                                  "--reason", reason, "--actor", actor, "--cache-dir", _cache_dir(settings))


async def rollback(settings: Settings, policy: str, reason: str, actor: str) -> dict:
    return await _operator_action(settings, policy, "rollback", "--policy", policy, "--reason", reason,
                                  "--actor", actor, "--cache-dir", _cache_dir(settings))


# ---------------------------------------------------------------- registration of finished runs
def run_files(output_dir: str | Path, run_id: int) -> tuple[Path, Path, Path]:
    """The spec, result and log that run ``run_id`` left in its output folder, as registered: the
    runner's copy ``result-ID.json`` when there is one (a retry resuming in the same folder rewrites
    ``result.json``), else ``result.json``."""
    folder = Path(output_dir)
    own = folder / f"result-{run_id}.json"
    return (folder / f"run_spec-{run_id}.json", own if own.is_file() else folder / "result.json",
            folder / "stdout.jsonl")


async def queue_registration(conn: psycopg.AsyncConnection, run_id: int, spec_path: str | Path,
                             result_path: str | Path, log_path: str | Path | None) -> None:
    """A pending ``atlasd.registrations`` row for a finished run, in the caller's transaction (the
    runner's, with the outcome); an existing row is left as it is."""
    await conn.execute(
        """INSERT INTO atlasd.registrations (run_id, spec_path, result_path, log_path) VALUES (%s, %s, %s, %s)
           ON CONFLICT (run_id) DO NOTHING""",
        [run_id, str(spec_path), str(result_path), str(log_path) if log_path else None],
    )


async def requeue_registration(conn: psycopg.AsyncConnection, run_id: int) -> str:
    """`atlasd register RUN_ID`: a failed (or pending) registration is due again now with its
    attempts reset; a finished run with a result and no registration row gets one. Returns what
    was done ("re-queued" | "queued"); :class:`RegistrationRefused` when nothing applies."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT state, model_version FROM atlasd.registrations WHERE run_id = %s FOR UPDATE", [run_id])
        row = await cur.fetchone()
        if row is not None:
            if row[0] == "done":
                raise RegistrationRefused(f"run {run_id} is already registered: model version {row[1]}" if row[1]
                                          else f"run {run_id} is already logged in MLflow (a failed run has no "
                                          "model version)")
            await conn.execute(
                """UPDATE atlasd.registrations SET state = 'pending', attempts = 0, next_attempt_at = now(),
                          updated_at = now() WHERE run_id = %s""", [run_id])
            return "re-queued"
        run = await queue.get_run(conn, run_id)
        if run is None:
            raise RegistrationRefused(f"no run {run_id}")
        if run.state not in ("succeeded", "failed"):
            raise RegistrationRefused(f"run {run_id} is {run.state}: only a finished run (succeeded, or failed with "
                                      "a result) is registered")
        files = run_files(run.output_dir, run_id) if run.output_dir else None
        if files is None or not files[1].is_file():
            raise RegistrationRefused(f"run {run_id} left no result.json: nothing to register")
        await queue_registration(conn, run_id, *files)
        return "queued"


async def list_registrations(conn: psycopg.AsyncConnection, states: list[str] | None = None) -> list[dict]:
    """`atlasd registrations`: newest run first, with its policy and run state."""
    cur = await conn.execute(
        """SELECT g.run_id, r.policy, r.gear, r.state AS run_state, g.state, g.attempts, g.next_attempt_at,
                  g.last_error, g.model_version, g.decision, g.updated_at
             FROM atlasd.registrations g JOIN atlasd.runs r ON r.id = g.run_id
            WHERE %(states)s::text[] IS NULL OR g.state = ANY(%(states)s)
            ORDER BY g.run_id DESC""", {"states": states})
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


async def finalize_run(settings: Settings, run_id: int, spec_path: str | Path, result_path: str | Path,
                       log_path: str | Path | None = None, gpu_slot: asyncio.Lock | None = None) -> dict:
    """Log run ``run_id`` in MLflow, register its checkpoint and run the gate, exactly once, under
    the policy's lock. With ``gpu_slot``, a champion re-measurement waits for (and holds) it.

    Returns ``{"state": "done" | "pending" | "failed" | "busy", ...registry output}``. "pending":
    the store was unavailable (or the child failed): retried later by :func:`retry_pending`.
    "busy": another finalize of this run, or a promotion of its policy, is in progress (no
    attempt spent; the next round tries again)."""
    log = get_logger("registry", run_id=run_id)
    async with await aconnect(settings.dsn, autocommit=True, application_name="atlasd-registry") as conn:
        cur = await conn.execute(
            """INSERT INTO atlasd.registrations (run_id, spec_path, result_path, log_path) VALUES (%s, %s, %s, %s)
               ON CONFLICT (run_id) DO UPDATE SET spec_path = EXCLUDED.spec_path, result_path = EXCLUDED.result_path,
                   log_path = EXCLUDED.log_path, updated_at = now()
               RETURNING state, attempts, mlflow_run_id, model_version, decision,
                         (SELECT policy FROM atlasd.runs WHERE id = %s)""",
            [run_id, str(spec_path), str(result_path), str(log_path) if log_path else None, run_id],
        )
        state, attempts, mlflow_run_id, model_version, decision, policy = await cur.fetchone()
        if state == "done":
            return {"state": state, "mlflow_run_id": mlflow_run_id, "model_version": model_version, "decision": decision}
        if not (await (await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_CLASS, run_id])).fetchone())[0]:
            return {"state": "busy"}
        try:
            try:
                async with policy_lock(conn, policy, POLICY_LOCK_WAIT_S):
                    outcome, done = await _attempt(settings, conn, run_id, attempts, spec_path, result_path, log_path,
                                                   log, defer_measure=gpu_slot is not None)
                if outcome.code == EXIT_NEEDS_GPU:  # released meanwhile: a training run can take hours
                    log.info("the champion must be re-measured on this eval set: waiting for the GPU slot")
                    async with gpu_slot, policy_lock(conn, policy, POLICY_LOCK_WAIT_S):
                        outcome, done = await _attempt(settings, conn, run_id, attempts, spec_path, result_path,
                                                       log_path, log, defer_measure=False)
            except PolicyBusy as exc:
                log.info("registration waits: another promotion of the policy is in progress", error=str(exc))
                return {"state": "busy"}
            if done is not None:
                return await _after_registration(settings, conn, done)
            return await _not_registered(conn, run_id, attempts + 1, outcome, log)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_CLASS, run_id])


async def _attempt(settings: Settings, conn: psycopg.AsyncConnection, run_id: int, attempts: int,
                   spec_path: str | Path, result_path: str | Path, log_path: str | Path | None, log: Any, *,
                   defer_measure: bool) -> tuple[RegistryOutcome, dict | None]:
    """One ``registry finalize`` and, when it succeeded, its audit row and the registration marked
    done, all while the caller holds the policy's lock (the audit rows of a policy are written in
    the order its champion moved). Returns the outcome and, when registered, the registration."""
    revoked = await lineage.revoked_count(conn, run_id)  # read under the policy's lock, just before the gate
    args = ["finalize", "--spec", str(spec_path), "--result", str(result_path), "--source", settings.registry_source,
            "--artifact-root", str(settings.state_dir.resolve() / "mlartifacts"), "--cache-dir", _cache_dir(settings),
            *(["--log", str(log_path)] if log_path else []), *(["--defer-measure"] if defer_measure else []),
            *(["--revoked", str(revoked)] if revoked is not None else [])]
    outcome = await run_registry(settings, *args)
    if outcome.code != EXIT_OK:
        return outcome, None
    return outcome, await _registered(settings, conn, run_id, attempts + 1, outcome.payload, log)


async def _not_registered(conn: psycopg.AsyncConnection, run_id: int, attempts: int, outcome: RegistryOutcome,
                          log: Any) -> dict:
    state = "pending" if outcome.retryable and attempts < MAX_ATTEMPTS else "failed"
    await conn.execute(
        """UPDATE atlasd.registrations SET state = %s, attempts = %s, last_error = %s, updated_at = now(),
                  next_attempt_at = now() + make_interval(secs => %s) WHERE run_id = %s""",
        [state, attempts, outcome.error[:4000], min(30 * 2 ** (attempts - 1), 3600), run_id],
    )
    if state == "pending":
        log.warning("registration deferred", exit_code=outcome.code, attempts=attempts, error=outcome.error[:500])
    else:
        log.error("registration failed; `atlasd register RUN_ID` re-queues it", exit_code=outcome.code,
                  attempts=attempts, error=outcome.error[:500])
    return {"state": state, **outcome.payload}


async def _registered(settings: Settings, conn: psycopg.AsyncConnection, run_id: int, attempts: int,
                      payload: dict, log: Any) -> dict:
    """Record a registration: the gate's audit row (once per run) and the registration done."""
    decision, version = payload["decision"], payload["model_version"]
    promotion_id = None
    async with conn.transaction():
        if decision in ("promote", "reject"):
            promotion_id = await _record(
                conn, policy=payload["policy"], model=payload["registered_model"],
                from_version=payload["previous_champion"] if decision == "promote" else payload["champion"],
                to_version=version, action=decision, reason=payload["reason"], checks=payload["checks"],
                actor="atlasd", atlasd_run_id=run_id, mlflow_run_id=payload["mlflow_run_id"],
                notify=settings.promotion_notify,
            )
        await conn.execute(
            """UPDATE atlasd.registrations SET state = 'done', attempts = %s, last_error = NULL, mlflow_run_id = %s,
                      model_version = %s, decision = %s, updated_at = now() WHERE run_id = %s""",
            [attempts, payload["mlflow_run_id"], version, decision, run_id],
        )
        await queue.record_model_version(conn, run_id, version)
    log.info("registered", mlflow_run_id=payload["mlflow_run_id"], model_version=version, decision=decision,
             reason=payload["reason"], champion=payload["champion"])
    return {"state": "done", **payload, "promotion_id": promotion_id}


async def _after_registration(settings: Settings, conn: psycopg.AsyncConnection, done: dict) -> dict:
    """The post-promotion hook of a registration that moved the champion (outside the policy's lock)."""
    if done["decision"] == "promote" and done["promotion_id"] is not None:
        done["hook"] = await _run_hook(settings, conn, done["promotion_id"], policy=done["policy"],
                                       model=done["registered_model"], version=done["model_version"], action="promote")
    return done


async def _finish_pending(settings: Settings, conn: psycopg.AsyncConnection, policy: str) -> list[dict]:
    """Before an operator moves ``policy``'s champion (holding its lock): finish the policy's pending
    registrations that need no GPU measurement, so that one interrupted after its alias move (the
    daemon stopped before its audit row) is recorded before, not after, the operator's move. A
    registration another process is finishing, or that cannot finish now, is left pending."""
    rows = await (await conn.execute(
        """SELECT g.run_id, g.attempts, g.spec_path, g.result_path, g.log_path FROM atlasd.registrations g
             JOIN atlasd.runs r ON r.id = g.run_id
            WHERE r.policy = %s AND g.state = 'pending' ORDER BY g.run_id""", [policy])).fetchall()
    finished = []
    for run_id, attempts, spec_path, result_path, log_path in rows:
        if not (await (await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_CLASS, run_id])).fetchone())[0]:
            continue
        try:
            log = get_logger("registry", run_id=run_id)
            outcome, done = await _attempt(settings, conn, run_id, attempts, spec_path, result_path, log_path, log,
                                           defer_measure=True)
            if done is not None:
                finished.append(done)
            elif outcome.code != EXIT_NEEDS_GPU:
                await _not_registered(conn, run_id, attempts + 1, outcome, log)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_CLASS, run_id])
    return finished


async def retry_pending(settings: Settings, gpu_slot: asyncio.Lock | None = None) -> list[dict]:
    """Finalize every registration that is due (pending, next_attempt_at passed), oldest run first."""
    async with await aconnect(settings.dsn, autocommit=True, application_name="atlasd-registry") as conn:
        rows = await (await conn.execute(
            """SELECT run_id, spec_path, result_path, log_path FROM atlasd.registrations
                WHERE state = 'pending' AND next_attempt_at <= now() ORDER BY run_id""")).fetchall()
    return [await finalize_run(settings, *row, gpu_slot=gpu_slot) for row in rows]


class RegistrationRetrier(KickedLoop):
    """Daemon component: registers finished runs, at once when the runner hands one over
    (:meth:`kick`) and every ``poll_interval_s`` (due retries, `atlasd register`), not while the
    daemon re-takes its lock. Stopping kills a registry child in flight; its row stays pending
    and a retry finds what it did (by run id)."""

    name = "registrations"
    failure_event = "registration retry failed"

    def __init__(self, settings: Settings):
        super().__init__(settings.poll_interval_s, get_logger("registry"))
        self.settings = settings

    async def round(self, daemon: Any) -> None:
        await retry_pending(self.settings, daemon.gpu_slot)


# ---------------------------------------------------------------- taint (atlasd.lineage)
async def tag_taints(settings: Settings, policies: PolicySet | None) -> list[dict]:
    """Tag every registered version whose run's revoked count grew (``atlasd.lineage.due``) with
    ``atlasd.tainted`` (``python -m registry taint``) and record it (queuing the run's clean retrain
    when its policy says ``on_taint: retrain``); a failed tag is retried with backoff. A tainted
    champion is only logged, as a warning: it is never rolled back automatically."""
    log = get_logger("lineage")
    done = []
    async with await aconnect(settings.dsn, autocommit=True, application_name="atlasd-registry") as conn:
        for item in await lineage.due(conn):
            fields = {"run_id": item.run_id, "policy": item.policy, "model_version": item.model_version,
                      "revoked_sessions": item.revoked}
            outcome = await run_registry(settings, "taint", "--model", item.registered_model, "--version",
                                         item.model_version, "--count", str(item.revoked))
            if outcome.code != EXIT_OK:
                delay = await lineage.tag_failed(conn, item.run_id, item.attempts + 1, outcome.error)
                log.warning("taint tag deferred", exit_code=outcome.code, error=outcome.error[:500], retry_in_s=delay,
                            **fields)
                continue
            retrain = await lineage.tagged(conn, item, policies.get(item.policy) if policies else None)
            if outcome.payload.get("champion"):
                log.warning("the champion is tainted: it learned from revoked sessions; it is not rolled back "
                            "automatically (`atlasd rollback POLICY`)", retrain_run_id=retrain, **fields)
            else:
                log.info("model version tainted", retrain_run_id=retrain, **fields)
            done.append({**fields, "retrain_run_id": retrain, "champion": outcome.payload.get("champion")})
    return done


class TaintTagger(KickedLoop):
    """Daemon component: tags the versions of runs that trained on a revoked session, at once when a
    reconcile revoked something (:meth:`on_revoked`) and every ``poll_interval_s`` (retries, a
    registration done since), not while the daemon re-takes its lock. Its own loop: a registration
    waiting for the GPU slot never holds a taint back. What is still to tag stays in atlasd.lineage."""

    name = "taints"
    failure_event = "taint tagging failed"

    def __init__(self, settings: Settings, policies: PolicySet | None = None):
        super().__init__(settings.poll_interval_s, get_logger("lineage"))
        self.settings = settings
        self.policies = policies

    async def on_revoked(self, revoked: int) -> None:
        self.kick()

    async def round(self, daemon: Any) -> None:
        await tag_taints(self.settings, self.policies)


# ---------------------------------------------------------------- purge
async def purge_mlflow(settings: Settings, session_ids: set[int]) -> dict:
    """Revoked sessions' rows out of every atlasd run's eval samples in MLflow (``python -m registry
    purge``); ``{"runs_checked", "runs_changed", "rows_removed"}``. Raises RegistryCallError."""
    if not session_ids:
        return {"runs_checked": 0, "runs_changed": 0, "rows_removed": 0}
    path = settings.state_dir / "revoked-sessions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(session_ids)))
    try:
        return await _call(settings, "purge", "--ids-file", str(path))
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- status
def champions(conn: psycopg.Connection) -> dict[str, dict]:
    """Current champion per policy, as recorded in the audit table (the last alias move)."""
    rows = conn.execute(
        """SELECT DISTINCT ON (policy) policy, registered_model, to_version, action, decided_at, actor
             FROM atlasd.promotions WHERE action IN ('promote', 'force', 'rollback')
            ORDER BY policy, id DESC"""
    ).fetchall()
    return {p: {"registered_model": m, "version": v, "action": a, "since": t.isoformat(), "actor": who}
            for p, m, v, a, t, who in rows}


def audit_counts(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """Audit rows per policy and action (promote, reject, force, rollback)."""
    rows = conn.execute(
        "SELECT policy, action, count(*) FROM atlasd.promotions GROUP BY policy, action ORDER BY policy, action"
    ).fetchall()
    conn.rollback()
    out: dict[str, dict[str, int]] = {}
    for policy, action, n in rows:
        out.setdefault(policy, {})[action] = n
    return out


def registrations_section(conn: psycopg.Connection) -> dict[str, Any]:
    """Registrations still to do (pending: retried with backoff) and given up (failed: `atlasd register`)."""
    counts = dict(conn.execute("SELECT state, count(*) FROM atlasd.registrations GROUP BY state").fetchall())
    oldest = conn.execute(
        """SELECT extract(epoch FROM now() - min(created_at))::float8 FROM atlasd.registrations
            WHERE state = 'pending'"""
    ).fetchone()[0]
    failed = conn.execute(
        "SELECT run_id, attempts, last_error FROM atlasd.registrations WHERE state = 'failed' ORDER BY run_id"
    ).fetchall()
    conn.rollback()
    return {"pending": counts.get("pending", 0), "failed": counts.get("failed", 0), "done": counts.get("done", 0),
            "oldest_pending_age_s": oldest,
            "failed_runs": [{"run_id": r, "attempts": a, "last_error": e} for r, a, e in failed]}


def champion_moves(conn: psycopg.Connection) -> list[tuple[str, str, str | None]]:
    """(registered model, champion version, previous champion version) per policy: its last champion move."""
    return conn.execute(
        """SELECT DISTINCT ON (policy) registered_model, to_version, from_version
             FROM atlasd.promotions WHERE action IN ('promote', 'force', 'rollback')
            ORDER BY policy, id DESC""").fetchall()


def gate_decision(conn: psycopg.Connection, run_id: int) -> dict[str, Any] | None:
    """The gate's audit row for the run (promote or reject), or None."""
    row = conn.execute(
        """SELECT action, from_version, to_version, reason, checks FROM atlasd.promotions
            WHERE atlasd_run_id = %s AND action IN ('promote', 'reject')""", [run_id]).fetchone()
    return dict(zip(("action", "from_version", "to_version", "reason", "checks"), row, strict=True)) if row else None


def audit_rows(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every audit row, oldest first: id, action, versions, reason, run."""
    keys = ("id", "action", "from_version", "to_version", "reason", "run_id")
    return [dict(zip(keys, row, strict=True)) for row in conn.execute(
        "SELECT id, action, from_version, to_version, reason, atlasd_run_id FROM atlasd.promotions ORDER BY id")]


async def has_champion(conn: psycopg.AsyncConnection, policy: str) -> bool:
    """The audit records a champion move for the policy (promote, force, rollback)."""
    cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM atlasd.promotions WHERE policy = %s AND action = ANY(%s))",
                             [policy, list(CHAMPION_MOVES)])
    return (await cur.fetchone())[0]
