"""`atlasd demo`: the whole loop on this machine, with visible progress and no question asked.

1. Models: ``python -m trainers.demo_models`` in a child (torch never enters this process) builds
   the teacher and student once, cached under ``<state dir>/models``.
2. Database: a throw-away cluster (``EmbeddedPostgres``) unless ``ATLASD_DB_URL`` names a
   throw-away database; the SDK tables and the atlasd schema are created fresh. MLflow: sqlite
   under the state dir, removed at the start of every run (the models are kept).
3. Policy: ``policies/examples/demo.yaml`` copied to ``<state dir>/policies/demo.yaml`` with the
   built models' paths and the base student's measured accuracy as baseline.
4. The real daemon (``python -m atlasd run``) as a child; traffic written as the Atlas SDK writes
   it (asyncpg, one autocommit statement per write), approved by a "reviewer" in batches.
   Batch 1 -> fast run 1 from the base student; batch 2 -> fast run 2 from the champion;
   ``atlasd trigger demo --gear quality`` -> run 3. Progress is read from the database.
5. A closing table, ``<state dir>/summary.json`` (facts collected while the database was up) and
   the commands to look further (MLflow UI, ``atlasd status``).

Every child (model build, daemon, and through it the trainer) runs in its own session, so a
Ctrl-C reaches only this process; its ``finally`` blocks stop them in order (SIGTERM, wait,
SIGKILL) and then the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml

from atlasd import evalsplit, intake, promotions, queue
from atlasd.db.migrate import init_sdk_schema, migrate
from atlasd.policies import Policy, PolicyFileError, load_policy_file
from atlasd.settings import redact_url
from atlasd.testing.daemon import DaemonProcess
from atlasd.testing.sdk import write_session

POLICY_NAME = "demo"
POLICY_TEMPLATE = Path(__file__).resolve().parents[2] / "policies" / "examples" / "demo.yaml"
TRAFFIC_SEED = 50_000  # demo traffic: problems the models were neither built nor measured on
SDK_TABLES = ("trajectory_events", "guidance_notes", "step_attempts", "step_results", "plans", "sessions")
DAEMON_STOP_TIMEOUT_S = 30.0


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and where to look."""


@dataclass(frozen=True)
class Mode:
    """How big the demo is. ``fast`` is the test suite's reduced mode: same code path, small numbers."""

    name: str
    fast_models: bool
    extra_good: int  # batch 1 holds this many good traces beyond the threshold (they stay pending)
    wrong: int  # per batch: approved sessions with a wrong answer (reward 0: below min_reward)
    rejected: int  # per batch: sessions the reviewer quarantines
    malformed: int  # per batch: approved sessions the daemon records as malformed
    approve_chunk: int  # the reviewer approves this many sessions per UPDATE
    run_timeout_s: float
    policy_overrides: dict[str, Any] = field(default_factory=dict)


FULL = Mode(name="full", fast_models=False, extra_good=10, wrong=6, rejected=8, malformed=4,
            approve_chunk=25, run_timeout_s=900)
FAST = Mode(name="fast", fast_models=True, extra_good=4, wrong=2, rejected=2, malformed=2,
            approve_chunk=10, run_timeout_s=300, policy_overrides={
                "gears.fast.trigger.batch.every": 30,
                "targets.min_success_delta": 0.0,  # the fast models are too small to promise a lift
                "gears.fast.optim.max_steps": 6,
                "gears.quality.optim.max_steps": 8,
                "gears.fast.eval.max_samples": 10,
                "gears.quality.eval.max_samples": 10,
            })


class Progress:
    """Timestamped progress lines on stdout."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, msg: str) -> None:
        with contextlib.suppress(OSError):  # stdout gone (a closed pipe): the demo and its clean-up go on
            print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- children


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any ATLASD_* setting (the demo's children get exactly the demo's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLASD_") or k == "ATLASD_PG_BINDIR"}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen | None, timeout: float, *, group: bool = True) -> None:
    """SIGTERM (to its process group: each child leads its own session), wait, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(signal.SIGKILL)
        proc.wait(10)


def build_models(models_dir: Path, fast: bool, say: Progress) -> tuple[Path, Path]:
    """Build (or reuse) the demo models in a child process; returns (teacher, student)."""
    argv = [sys.executable, "-m", "trainers.demo_models", str(models_dir), *(["--fast"] if fast else [])]
    say(f"models: {' '.join(argv[1:])} (cached after the first build)")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env({}),
                            start_new_session=True, stdin=subprocess.DEVNULL)
    last = ""
    try:
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                last = line
            elif line and "Writing model shards" not in line and "Loading weights" not in line:
                say("  models: " + re.sub(r"^\[[ 0-9.]+s\] ", "", line))  # without the child's own timestamp
        code = proc.wait()
    finally:
        stop_process(proc, 10)
    if code != 0 or not last:
        raise DemoError(f"building the demo models failed (exit {code}); run `python -m trainers.demo_models "
                        f"{models_dir}{' --fast' if fast else ''}` to see why")
    built = json.loads(last)
    return Path(built["teacher"]), Path(built["student"])


# ---------------------------------------------------------------- database


DEMO_SCHEMA_MARK = "created by atlasd demo; every demo run drops and re-creates it"


def reset_database(url: str) -> None:
    """Fresh SDK tables and atlasd schema. Refuses a database holding sessions the demo did not
    write, or an atlasd schema it did not create (a production database's run and promotion
    history, even with no sessions yet)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT to_regnamespace('atlasd')").fetchone()[0] is not None:
            mark = conn.execute("SELECT obj_description('atlasd'::regnamespace, 'pg_namespace')").fetchone()[0]
            if mark != DEMO_SCHEMA_MARK:
                raise DemoError(f"{redact_url(url)} has an atlasd schema the demo did not create (atlasd's runs, "
                                "promotions and intake): the demo empties its database, so give it a throw-away one "
                                "(or unset ATLASD_DB_URL)")
        if conn.execute("SELECT to_regclass('public.sessions')").fetchone()[0] is not None:
            # every session the demo writes carries demo_problem_id (its malformed ones inside a JSON array)
            foreign = conn.execute("SELECT count(*) FROM sessions WHERE metadata IS NULL "
                                   "OR metadata::text NOT LIKE '%\"demo_problem_id\"%'").fetchone()[0]
            if foreign:
                raise DemoError(f"{redact_url(url)} holds {foreign} Atlas sessions the demo did not write: the demo "
                                "empties its database, so give it a throw-away one (or unset ATLASD_DB_URL)")
        conn.execute("DROP SCHEMA IF EXISTS atlasd CASCADE")
        for table in SDK_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS public.{table} CASCADE")
    init_sdk_schema(url)
    migrate(url)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"COMMENT ON SCHEMA atlasd IS '{DEMO_SCHEMA_MARK}'")


# ---------------------------------------------------------------- traffic (as the Atlas SDK writes it)


@dataclass
class Batch:
    approved: list[int] = field(default_factory=list)  # good + wrong + malformed
    good: int = 0  # right answers, those in the frozen eval split included
    in_split: int = 0  # right answers whose task is in the policy's frozen eval split (measured, never trained on)
    wrong: int = 0
    malformed: int = 0
    rejected: int = 0


def _wrong(solution: str, answer: int) -> str:
    return solution.rsplit("Final Answer:", 1)[0] + f"Final Answer: {answer + 1}"


async def _good_problems(conn, policy: Policy, index: int, n_trained: int) -> tuple[list, int]:
    """The agents' right answers of batch ``index``: problems in their seeded order until
    ``n_trained`` of them fall outside the policy's frozen eval split (so the fast gear's count,
    which leaves the split out, reaches its threshold); and how many of them are in the split.
    The split is the database's (atlasd.in_eval_split on the task as the intake records it)."""
    from trainers.demo_models import generate_problems

    salt, fraction = evalsplit.configured(policy)  # generation 1: the demo's database is new
    pool = generate_problems(4 * n_trained + 40, seed=TRAFFIC_SEED + index)
    rows = await conn.fetch("SELECT atlasd.in_eval_split($1, $2, atlasd.task_key(t), $3) FROM unnest($4::text[]) "
                            "WITH ORDINALITY AS x(t, n) ORDER BY n", salt, policy.learning_key,
                            intake.split_threshold(fraction), [p.task for p in pool])
    chosen, outside = [], 0
    for problem, (in_split,) in zip(pool, rows, strict=True):
        if outside == n_trained:
            break
        chosen.append(problem)
        outside += not in_split
    if outside < n_trained:
        raise DemoError(f"batch {index}: fewer than {n_trained} generated problems outside the eval split")
    return chosen, len(chosen) - n_trained


async def write_batch(url: str, mode: Mode, policy: Policy, index: int, n_trained: int) -> Batch:
    """Write one batch of agent sessions, then review it: approve in chunks, quarantine a few.
    ``n_trained`` right answers outside the frozen eval split, with those in it on the way."""
    import asyncpg

    from trainers.demo_models import generate_problems, sdk_session

    batch = Batch()
    rejected: list[int] = []
    conn = await asyncpg.connect(url, server_settings={"application_name": "atlas-sdk-demo"})
    try:
        good, batch.in_split = await _good_problems(conn, policy, index, n_trained)
        n_good = len(good)
        others = generate_problems(mode.wrong + mode.malformed + mode.rejected, seed=TRAFFIC_SEED + 1000 + index)
        for i, problem in enumerate(good + others):
            kind = ("good" if i < n_good else "wrong" if i < n_good + mode.wrong
                    else "malformed" if i < n_good + mode.wrong + mode.malformed else "rejected")
            s = sdk_session(problem, completion=_wrong(problem.solution(), problem.answer) if kind == "wrong" else None)
            metadata, reward_stats = s["metadata"], s["reward_stats"]
            if kind == "malformed":  # alternate the two defects a buggy agent config produces
                if i % 2:
                    reward_stats = None
                else:
                    metadata = [metadata]
            sid = await write_session(conn, s, metadata=metadata, reward_stats=reward_stats)
            if kind == "rejected":
                rejected.append(sid)
            else:
                batch.approved.append(sid)
                setattr(batch, kind, getattr(batch, kind) + 1)
        batch.rejected = len(rejected)
        for lo in range(0, len(batch.approved), mode.approve_chunk):
            await conn.execute("UPDATE sessions SET review_status = 'approved' WHERE id = ANY($1)",
                               batch.approved[lo: lo + mode.approve_chunk])
        await conn.execute("UPDATE sessions SET review_status = 'quarantined', review_notes = 'wrong tool output' "
                           "WHERE id = ANY($1)", rejected)
    finally:
        await conn.close()
    return batch


# ---------------------------------------------------------------- policy


def _set_path(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


def write_policy(state_dir: Path, teacher: Path, student: Path, baseline: float, mode: Mode) -> tuple[Path, Policy]:
    """The demo policy with the built models and the measured baseline (and the fast-mode numbers)."""
    data = yaml.safe_load(POLICY_TEMPLATE.read_text())
    data["teacher"], data["student"] = str(teacher.resolve()), str(student.resolve())
    data["targets"]["baseline_success"] = baseline
    for dotted, value in mode.policy_overrides.items():
        _set_path(data, dotted, value)
    path = state_dir / "policies" / f"{POLICY_NAME}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by `atlasd demo` ({mode.name} mode) from {POLICY_TEMPLATE}; see the comments there\n"
                    + yaml.safe_dump(data, sort_keys=False))
    try:
        return path, load_policy_file(path)
    except PolicyFileError as exc:
        raise DemoError(str(exc)) from None


# ---------------------------------------------------------------- the daemon


class Daemon(DaemonProcess):
    """The shared daemon harness, leading its own session, its JSON log also in ``daemon.log``;
    failures are DemoErrors, and stopping it stops the trainer groups it was seen running."""

    def __init__(self, url: str, state_dir: Path, env: dict[str, str]) -> None:
        super().__init__(url, state_dir, cwd=Path.cwd(), log_path=state_dir / "daemon.log", new_session=True,
                         base_env=_child_env({}), **env)
        self.trainer_pgids: dict[int, tuple[int, str]] = {}  # run id -> (pgid, run dir), to clean up after a kill

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            tail = "".join(self.raw[-15:])
            raise DemoError(f"the daemon exited ({None if self.proc is None else self.proc.returncode}); "
                            f"its log is {self.log_path}:\n{tail}")

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            self.wait_for("ready", timeout)
        except AssertionError:
            self.check_alive()
            raise DemoError(f"the daemon was not ready after {timeout:.0f}s; see {self.log_path}") from None

    def stop(self) -> int | None:
        """SIGTERM (the daemon stops its trainer first), wait, SIGKILL; then any trainer group left."""
        if self.proc is None:
            return None
        code = super().stop(DAEMON_STOP_TIMEOUT_S)
        for pgid, run_dir in self.trainer_pgids.values():
            if _group_alive_in(pgid, run_dir):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        return code


def _group_alive_in(pgid: int, run_dir: str) -> bool:
    """The trainer group leader still runs in its run folder (a reused pid is never hit)."""
    try:
        return os.path.realpath(f"/proc/{pgid}/cwd") == os.path.realpath(run_dir)
    except OSError:
        return False


# ---------------------------------------------------------------- following runs


def read(url: str, owner_read, *args):
    """``owner_read(conn, *args)`` (a table owner's read) on a fresh autocommit connection."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return owner_read(conn, *args)


def fetch_run(url: str, run_id: int) -> dict:
    return read(url, queue.run_report, run_id) or {}


def promotion_of(url: str, run_id: int) -> dict | None:
    return read(url, promotions.gate_decision, run_id)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


class Follower:
    """Waits on the database for the daemon's milestones and prints one line per milestone."""

    def __init__(self, url: str, daemon: Daemon, say: Progress, mode: Mode) -> None:
        self.url, self.daemon, self.say, self.mode = url, daemon, say, mode

    def wait(self, what: str, predicate, timeout: float, interval: float = 0.5):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self.daemon.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}; see {self.daemon.log_path}")
            time.sleep(interval)

    def recorded(self, expected: int, malformed: int) -> None:
        def count():
            n, bad, reasons = read(self.url, intake.recorded_counts)
            return (n, bad, reasons) if n >= expected else None

        n, bad, reasons = self.wait(f"{expected} recorded traces", count, 60, 0.1)
        self.say(f"daemon recorded {n} traces so far ({bad} malformed: "
                 + ("; ".join(f"{c}x {r}" for r, c in reasons.items()) or "none") + ")")
        if bad != malformed:
            raise DemoError(f"expected {malformed} malformed traces recorded, the daemon has {bad}")

    def queued_run(self, after_id: int, gear: str) -> int:
        run = self.wait(f"a queued {gear} run", lambda: read(self.url, queue.first_run_after, after_id, gear), 60, 0.2)
        run_id, trigger, lo, hi, n = run.id, run.trigger, run.window_lo, run.window_hi, run.n_traces
        self.say(f"run {run_id} queued: {POLICY_NAME}/{gear}, trigger {trigger}, {n} new traces (intake seq {lo}..{hi}]")
        return run_id

    def run(self, run_id: int) -> dict:
        """Follow one run to its registration and gate decision."""
        seen_state, next_step_pct, t_start, deferred_said = "queued", 0.25, None, False
        deadline = time.monotonic() + self.mode.run_timeout_s
        while True:
            self.daemon.check_alive()
            run = fetch_run(self.url, run_id)
            state, metrics = run["state"], run["metrics"] or {}
            if seen_state == "queued" and (run["pgid"] or state not in ("queued", "running")):
                spec = run["spec"] or {}  # written with the trainer's pid, after the champion is resolved
                origin = (f"champion v{run['champion_version']} ({spec.get('student')})" if run["champion_version"]
                          else "the base student")
                self.say(f"run {run_id} started: training from {origin}")
                t_start, seen_state = time.monotonic(), "running"
            if state == "running" and run["pgid"] and run["output_dir"] and run_id not in self.daemon.trainer_pgids:
                self.daemon.trainer_pgids[run_id] = (run["pgid"], run["output_dir"])
            step, total = metrics.get("step"), metrics.get("total_steps")
            if state == "running" and step and total and step / total >= next_step_pct:
                loss = metrics.get("loss")
                self.say(f"run {run_id}: step {step}/{total}" + (f", loss {loss:.4f}" if loss is not None else ""))
                while step / total >= next_step_pct:
                    next_step_pct += 0.25
            if state not in ("queued", "running") and seen_state != state:
                seen_state = state
                result = run["result"] or {}
                wall = f"{time.monotonic() - t_start:.0f}s" if t_start else "-"
                before, after = (result.get("eval_start") or {}), (result.get("eval") or {})
                self.say(f"run {run_id} {state} after {wall}: {result.get('steps', 0)} steps on {result.get('n_train', 0)} "
                         f"traces; success on the frozen eval set ({after.get('n_samples', 0)} problems) "
                         f"{_pct(before.get('success_rate'))} -> {_pct(after.get('success_rate'))}")
                if state != "succeeded":
                    raise DemoError(f"run {run_id} {state}: {run['error']}; see {run['output_dir']}/stderr.log "
                                    f"and {self.daemon.log_path}")
            if run["registration"] == "done":
                promo = promotion_of(self.url, run_id)
                self.say(f"run {run_id} registered as version {run['model_version']} of the MLflow model")
                if promo and promo["action"] == "promote":
                    self.say(f"promoted: version {promo['to_version']} is the champion "
                             f"(was {promo['from_version'] or 'none'}): every gate check met")
                elif promo:
                    self.say(f"not promoted: {promo['reason']}")
                run["promotion"] = promo
                return run
            if run["registration"] == "failed":
                raise DemoError(f"registering run {run_id} failed: {run['registration_error']}")
            if run["registration"] == "pending" and run["registration_error"] and not deferred_said:
                deferred_said = True
                self.say(f"run {run_id}: registration deferred ({run['registration_error']}); the daemon retries it")
            if time.monotonic() > deadline:
                raise DemoError(f"run {run_id} did not finish within {self.mode.run_timeout_s:.0f}s "
                                f"(state {state}); see {self.daemon.log_path}")
            time.sleep(0.5)


def notify_evidence(events: list[dict], run_id: int) -> dict:
    """The daemon log lines showing run ``run_id`` was queued from a NOTIFY-hinted intake (not a poll)."""
    for i, e in enumerate(events):
        if e.get("event") == "run queued" and e.get("run_id") == run_id:
            intake = next((p for p in reversed(events[:i]) if p.get("event") == "intake"), None)
            if intake is None or intake.get("full") is not False or not intake.get("hinted"):
                raise DemoError(f"run {run_id} was not queued right after a NOTIFY-hinted intake: {intake}")
            return {"intake": intake, "run_queued": e}
    raise DemoError(f"no 'run queued' line for run {run_id} in the daemon log")


# ---------------------------------------------------------------- the demo


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlasd", *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def clean_state(state_dir: Path) -> None:
    """Everything from the previous demo except the models."""
    for name in ("mlflow.db", "mlartifacts", "runs", "registry-cache", "policies", "daemon.log", "summary.json"):
        path = state_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_demo(state_dir: Path, *, models_dir: Path | None = None, fast: bool = False, db_url: str | None = None,
             keep_db: bool = False) -> int:
    """The demo; 0 when every step happened. Raises DemoError (or a database error) otherwise."""
    mode = FAST if fast else FULL
    say = Progress()
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    clean_state(state_dir)
    say(f"atlasd demo ({mode.name} mode), state dir {state_dir}")

    teacher, student = build_models((models_dir or state_dir / "models").resolve(), mode.fast_models, say)
    from trainers.demo_models import DEMO_LEARNING_KEY, build_info  # pure Python (torch only inside functions)

    info = build_info(student)
    baseline = info["student"]["held_out_accuracy"]
    say(f"models ready: teacher {info['teacher']['params']:,} weights, {_pct(info['teacher']['held_out_accuracy'])} "
        f"held-out accuracy; student {info['student']['params']:,} weights, {_pct(baseline)} (the baseline)")

    pg = None
    daemon: Daemon | None = None
    try:
        if db_url is None:
            from atlasd.demo.embedded_pg import EmbeddedPostgres

            say("postgres: starting a throw-away cluster (initdb + pg_ctl)")
            pg = EmbeddedPostgres()
            pg.start()
            url = pg.url
            say(f"postgres: cluster in {pg.root} (removed at the end), port {pg.port}")
        else:
            url = db_url
        say(f"postgres: {redact_url(url)}; creating the Atlas SDK tables and the atlasd schema")
        reset_database(url)
        policy_path, policy = write_policy(state_dir, teacher, student, baseline, mode)
        every = policy.gears["fast"].trigger.batch.every
        say(f"policy: {policy_path} (fast gear every {every} traces; quality gear by cron or by hand)")

        # the harness adds the database, state and policies folders, JSON logs, a free metrics port
        # and no slow poll (intake after start-up comes from NOTIFY alone)
        daemon = Daemon(url, state_dir, {"ATLASD_RUNNER_POLL_S": "0.5", "ATLASD_CHILD_STOP_TIMEOUT_S": "20",
                                         "ATLASD_PROMOTION_NOTIFY": "true"})
        env = daemon.env  # the CLI commands below see the daemon's settings
        daemon.start()
        daemon.wait_ready()
        say(f"daemon: ready (pid {daemon.proc.pid}, JSON log {daemon.log_path})")
        follow = Follower(url, daemon, say, mode)
        facts: dict[str, Any] = {"mode": mode.name, "state_dir": str(state_dir), "teacher": str(teacher),
                                 "student": str(student), "baseline_success": baseline,
                                 "learning_key": DEMO_LEARNING_KEY, "batches": [], "runs": []}
        expected = 0
        run_ids: list[int] = []
        for index, n_trained in enumerate((every + mode.extra_good, every), start=1):
            t = time.monotonic()
            batch = asyncio.run(write_batch(url, mode, policy, index, n_trained))
            expected += len(batch.approved)
            say(f"agents: batch {index}: {len(batch.approved) + batch.rejected} sessions written "
                f"(asyncpg, SDK schema) in {time.monotonic() - t:.1f}s; reviewer approved {len(batch.approved)} "
                f"({batch.good} right answers, {batch.in_split} of them in the frozen eval split, {batch.wrong} wrong, "
                f"{batch.malformed} malformed), quarantined {batch.rejected}")
            facts["batches"].append({"index": index, "approved": len(batch.approved), "good": batch.good,
                                     "in_split": batch.in_split, "wrong": batch.wrong, "malformed": batch.malformed,
                                     "rejected": batch.rejected})
            follow.recorded(expected, sum(b["malformed"] for b in facts["batches"]))
            run_id = follow.queued_run(run_ids[-1] if run_ids else 0, "fast")
            evidence = notify_evidence(list(daemon.events), run_id)
            say(f"  triggered by NOTIFY: intake of {evidence['intake']['hinted']} hinted session ids "
                f"recorded {evidence['intake']['recorded']}, then the fast gear fired ({evidence['run_queued']['reason']})")
            facts.setdefault("notify", {})[str(run_id)] = evidence
            run_ids.append(run_id)
            follow.run(run_id)

        say(f"operator: atlasd trigger {POLICY_NAME} --gear quality")
        trig = _cli(env, "trigger", POLICY_NAME, "--gear", "quality")
        if trig.returncode != 0:
            raise DemoError(f"atlasd trigger failed: {trig.stderr.strip()}")
        say(f"  {trig.stdout.strip()}")
        run_ids.append(follow.queued_run(run_ids[-1], "quality"))
        follow.run(run_ids[-1])

        facts["runs"] = [_run_facts(url, r) for r in run_ids]
        facts["intake"] = dict(zip(("total", "malformed"), read(url, intake.recorded_counts)[:2]))
        facts["promotions"] = read(url, promotions.audit_rows)
        status = _cli(env, "status")
        status_json = _cli(env, "status", "--json")
        models = _cli(env, "models", POLICY_NAME, "--json")
        for name, proc in (("status", status_json), ("models", models)):
            if proc.returncode != 0:
                raise DemoError(f"atlasd {name} failed: {proc.stderr.strip()}")
        facts["status"] = json.loads(status_json.stdout)
        facts["models"] = json.loads(models.stdout)

        say("daemon: stopping (SIGTERM)")
        facts["daemon_exit"] = daemon.stop()
        daemon = None
        facts["daemon_log"] = str(state_dir / "daemon.log")
        facts["wall_time_s"] = round(say.elapsed(), 1)
        facts["heavy_modules_in_demo_process"] = sorted(m for m in ("torch", "transformers", "trl", "mlflow")
                                                        if m in sys.modules)
        (state_dir / "summary.json").write_text(json.dumps(facts, indent=2, default=str))
        print_summary(facts, status.stdout, state_dir, url if pg is not None and keep_db else None, pg)
        if pg is not None and keep_db:
            pg = None  # left running on purpose
        return 0
    finally:
        # a second Ctrl-C must not cut the clean-up short: each step below is bounded by its own timeout
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if daemon is not None:
                say("stopping the daemon (and its trainer)")
                daemon.stop()
            if pg is not None:
                say("stopping the throw-away postgres")
                pg.stop()
        finally:
            signal.signal(signal.SIGINT, previous)


def _run_facts(url: str, run_id: int) -> dict:
    run = fetch_run(url, run_id)
    result, spec = run["result"] or {}, run["spec"] or {}
    start, end = result.get("eval_start") or {}, result.get("eval") or {}
    return {
        "id": run_id, "gear": run["gear"], "trigger": run["trigger"], "state": run["state"],
        "n_traces": run["n_traces"], "window": [run["window_lo"], run["window_hi"]],
        "n_train": result.get("n_train"), "window_sessions": result.get("window_sessions"),
        "n_eval": result.get("n_eval"), "steps": result.get("steps"),
        "wall_time_s": (run["finished_at"] - run["started_at"]).total_seconds() if run["finished_at"] else None,
        "student": spec.get("student"), "base_student": spec.get("base_student"),
        "champion_version": run["champion_version"],
        "success_before": start.get("success_rate"), "success_after": end.get("success_rate"),
        "tokens_before": start.get("avg_tokens"), "avg_tokens": end.get("avg_tokens"),
        "eval_set_hash": end.get("eval_set_hash"),
        "success_delta": (result.get("baseline") or {}).get("success_delta"),
        "model_version": run["model_version"], "registration": run["registration"], "decision": run["decision"],
        "promotion": promotion_of(url, run_id),
    }


def print_summary(facts: dict, status_text: str, state_dir: Path, kept_url: str | None, pg) -> None:
    rows = [("run", "gear", "trigger", "trained on/new traces", "steps", "wall", "success before -> after", "avg tokens",
             "version", "promoted?")]
    for r in facts["runs"]:
        promo = r["promotion"] or {}
        verdict = ("yes" if promo.get("action") == "promote" else f"no: {promo.get('reason', 'no gate decision')}")
        rows.append((str(r["id"]), r["gear"], r["trigger"], f"{r['window_sessions']}/{r['n_traces']}",
                     str(r["steps"]),
                     f"{r['wall_time_s']:.0f}s" if r["wall_time_s"] is not None else "-",
                     f"{_pct(r['success_before'])} -> {_pct(r['success_after'])}",
                     "-" if r["avg_tokens"] is None else f"{r['avg_tokens']:.1f}", f"v{r['model_version']}", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print()
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    champion = next((m.get("aliases", {}).get("champion") for m in facts["models"].get("models", [])), None)
    print(f"\n  base student: {_pct(facts['baseline_success'])} on its held-out problems; champion: "
          f"{'version ' + str(champion) if champion else 'none'} of {facts['models']['models'][0]['registered_model'] if facts['models'].get('models') else '-'}")
    print(f"  intake: {facts['intake']['total']} traces recorded, {facts['intake']['malformed']} malformed; "
          f"demo wall time {facts['wall_time_s']:.0f}s")
    print("\n  atlasd status at the end of the demo:")
    print("".join(f"    {line}\n" for line in status_text.splitlines()), end="")
    venv_bin = Path(sys.executable).parent
    print("\n  look further:")
    print(f"    {venv_bin / 'mlflow'} ui --backend-store-uri sqlite:///{state_dir / 'mlflow.db'}   # then http://127.0.0.1:5000")
    print(f"    cat {state_dir / 'summary.json'}   # the facts above, machine-readable")
    print(f"    {state_dir / 'daemon.log'}   # the daemon's JSON log; runs in {state_dir / 'runs'}")
    if kept_url:
        env = f"ATLASD_DB_URL={kept_url} ATLASD_STATE_DIR={state_dir} ATLASD_POLICIES_DIR={state_dir / 'policies'}"
        print(f"    {env} {venv_bin / 'atlasd'} status   # the demo database is still running (--keep-db)")
        stop = " ".join(pg._as_owner([str(pg.bindir / "pg_ctl"), "-D", str(pg.root / "data"), "stop", "-m", "fast"]))
        print(f"    {stop} && rm -rf {pg.root}   # stop it when done")
    else:
        print("    (the throw-away database is gone; `atlasd demo --keep-db` leaves it running for `atlasd status`)")
