"""The chaos suite (`make chaos`; also part of `make test`): the REAL daemon (`python -m atlasd
run`, a child process) with stand-in trainer and registry children first on PYTHONPATH
(`tests/chaos/standins`), faults injected from outside, and the same invariants after every
scenario (`tests/chaos/invariants.py`: no trace lost or recorded twice, every consumed window
covered by a run, nothing running without a trainer, never two trainers at once, each succeeded
run registered exactly once, the registry's champion equal to the audit's last champion move,
no problem left in `atlasd status`). Where a scenario calls for it, the fault must also be
visible in `atlasd status --json` while it lasts.

Faults: `pg_terminate_backend` of every atlasd connection (by application_name), `ALTER DATABASE
... ALLOW_CONNECTIONS false`, `LOCK TABLE` held for seconds, `kill -9` of the daemon mid-burst,
mid-run and right after a run ends, SIGTERM during a registration, the registry down at a run's
start and at its registration, an operator's promote/rollback at the same moment as the daemon's
gate, poison sessions and policy files (+ SIGHUP), session ids reused after `TRUNCATE ... RESTART
IDENTITY`, and a forward clock step's leftover (a cron gear's last fire a year ahead)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from atlasd.cadence import _cron_key
from atlasd.policies import load_policy_file
from atlasd.settings import load_settings
from atlasd.status import collect_status
from atlasd.testing.daemon import wait_until
from tests.chaos.harness import ATLASD_APPS, Chaos
from tests.chaos.invariants import assert_invariants

FINAL = {"succeeded", "failed", "interrupted", "cancelled"}


def trainer_records(chaos: Chaos, run_id: int, event: str) -> list[dict]:
    return [r for r in chaos.journal("trainer") if r["run_id"] == run_id and r["event"] == event]


def registered(chaos: Chaos, run_id: int, timeout: float = 30) -> tuple:
    return wait_until(lambda: (r := chaos.registration(run_id)) and r[0] == "done" and r, timeout,
                      f"the registration of run {run_id} done")


# ------------------------------------------------------------------------------ database connections
def test_every_atlasd_connection_terminated_mid_run_and_mid_burst(chaos: Chaos) -> None:
    """The headline: while a trainer runs and 1,500 sessions are being approved, every atlasd
    connection is terminated, twice. Intake catches up without a restart, the SAME trainer
    process finishes the SAME run, and that run is registered exactly once."""
    chaos.write_policy(every=20)
    chaos.hold(1, at=2)
    daemon = chaos.start_daemon()
    chaos.approve(20)
    chaos.wait_run(1, {"running"})
    chaos.wait_step(1, 2)
    writer, written = chaos.burst(1_500)
    kills = []
    for kill in (1, 2):
        wait_until(lambda: chaos.one("SELECT count(*) FROM sessions") >= 20 + kill * 500, 60, "burst progress", 0.01)
        kills.append(chaos.terminate())
        daemon.wait_for("lock re-taken", timeout=20, count=kill, component="daemon")
        daemon.wait_for("listening", timeout=20, count=kill + 1, component="listener")
        assert chaos.runs()[1]["state"] == "running"
    faults_over = chaos.one("SELECT now()")
    writer.join(60)
    assert written.get("distinct") == 1_500, written
    for apps in kills:  # the pool's, the listener's and the lock's connections each time
        assert {"atlasd", "atlasd-listener", "atlasd-lock"} <= set(apps), apps
    wait_until(lambda: chaos.backlog() == 0, 30, "intake caught up after the burst")
    assert daemon.alive() and not daemon.find("stopped")
    assert chaos.sql("SELECT pid, stopped_at FROM atlasd.daemon_state") == [(daemon.pid, None)]  # no restart

    chaos.release(1)
    done = chaos.wait_run(1, FINAL)
    assert done["state"] == "succeeded", done["error"]
    [start] = trainer_records(chaos, 1, "start")  # one trainer process for run 1, never restarted
    assert start["pid"] == done["pid"] and start["resumed_from"] == 0
    assert trainer_records(chaos, 1, "end")[0]["exit_code"] == 0
    assert not [r for r in chaos.runs().values() if r["parent_run_id"] == 1]
    registered(chaos, 1)
    assert chaos.one("SELECT count(*) FROM atlasd.promotions WHERE atlasd_run_id = 1") == 1

    assert_invariants(chaos, daemon)
    # the daemon reports (heartbeat, each second) a reconcile after the faults, and nothing degraded
    wait_until(lambda: chaos.one("SELECT last_reconcile_at FROM atlasd.daemon_state") > faults_over, 10,
               "a reconcile reported after the faults")
    status = chaos.status()
    assert status["daemon"]["running"] and status["listener"]["connected"] and status["daemon"]["degraded"] == []
    assert status["registrations"]["done"] >= 1 and status["registrations"]["failed"] == 0
    assert daemon.stop() == 0


def test_database_refusing_connections_while_the_trainer_finishes(chaos: Chaos) -> None:
    """ALLOW_CONNECTIONS false and every connection but the lock's terminated, while the trainer
    finishes and sessions are approved: `atlasd status` (its JSON, read on a connection opened
    before: the CLI cannot connect meanwhile) shows the listener and the runner's outcome write
    degraded; once the database takes connections again the outcome is written, the
    sessions are recorded and trained on, with no restart."""
    chaos.write_policy(every=10)
    chaos.hold(1, at=2)
    daemon = chaos.start_daemon()
    chaos.approve(10)
    chaos.wait_run(1, {"running"})
    chaos.wait_step(1, 2)
    settings = load_settings(db_url=chaos.db_url, policies_dir=chaos.policies, state_dir=chaos.state)
    with chaos.monitor() as monitor:
        try:
            chaos.allow_connections(False)
            apps = chaos.terminate(f"{ATLASD_APPS} AND application_name <> 'atlasd-lock'", conn=monitor)
            assert {"atlasd", "atlasd-listener"} <= set(apps), apps
            monitor.execute("""INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                               SELECT 't', 'succeeded', 'approved', '{"learning_key": "math"}', '{"score": 0.9}'
                                 FROM generate_series(1, 10)""")
            chaos.release(1)
            chaos.wait_journal(lambda r: r["kind"] == "trainer" and r["run_id"] == 1 and r["event"] == "end", 20,
                               "the trainer's end while the database refuses connections")

            def degraded():
                status = collect_status(monitor, settings)
                parts = {d["part"] for d in status["daemon"]["degraded"]}
                return {"listener", "runner"} <= parts and status
            status = wait_until(degraded, 30, "`atlasd status` showing the listener and the runner degraded", 0.5)
            assert any(p.startswith("daemon degraded: runner retrying: record the outcome of run 1")
                       for p in status["problems"]), status["problems"]
            assert status["training"]["running"]["run_id"] == 1  # the outcome is not written yet
            assert status["intake"]["backlog"] == 10
        finally:
            chaos.allow_connections(True)
    done = chaos.wait_run(1, FINAL)
    assert done["state"] == "succeeded", done["error"]
    second = chaos.wait_run(2, FINAL)  # the 10 sessions approved meanwhile
    assert second["state"] == "succeeded" and second["window_lo"] == done["window_hi"]
    assert len(trainer_records(chaos, 1, "start")) == 1
    assert_invariants(chaos, daemon)
    assert daemon.alive() and not daemon.find("stopped")
    assert daemon.stop() == 0


def test_tables_locked_for_seconds(chaos: Chaos) -> None:
    """A DBA holds `LOCK TABLE atlasd.runs, atlasd.intake IN EXCLUSIVE MODE` (reads go on, writes
    wait) while a run trains and sessions are approved: `atlasd status` shows the running run's
    progress going stale and the intake backlog; once released, everything catches up."""
    chaos.write_policy(every=10)
    chaos.plan({"1": {"steps": 40, "step_s": 0.2}})
    daemon = chaos.start_daemon()
    chaos.approve(10)
    chaos.wait_run(1, {"running"})
    chaos.wait_step(1, 2)
    with chaos.locked("atlasd.runs", "atlasd.intake"):
        chaos.approve(15)

        def stale():
            status = chaos.status()
            running = status["training"]["running"]
            return running and running["progress_age_s"] is not None and running["progress_age_s"] >= 3 and status
        status = wait_until(stale, 20, "`atlasd status` showing the running run's progress age growing", 0.2)
        assert status["training"]["running"]["run_id"] == 1 and status["intake"]["backlog"] == 15
        assert chaos.runs()[1]["state"] == "running"
    wait_until(lambda: chaos.backlog() == 0, 20, "the 15 sessions recorded once the lock is gone")
    assert chaos.wait_run(1, FINAL, timeout=40)["state"] == "succeeded"
    assert chaos.wait_run(2, FINAL)["state"] == "succeeded"
    status = assert_invariants(chaos, daemon)
    assert status["training"]["running"] is None
    assert daemon.stop() == 0


# ------------------------------------------------------------------------------ kill -9 of the daemon
def test_kill_9_of_the_daemon_mid_intake_burst(chaos: Chaos) -> None:
    """kill -9 while 3,000 sessions are being written by 4 SDK-like writers; the next daemon starts
    while they go on: each session recorded exactly once."""
    chaos.write_policy(every=100_000)
    daemon = chaos.start_daemon()
    writer, written = chaos.burst(3_000)
    wait_until(lambda: chaos.one("SELECT count(*) FROM atlasd.intake") >= 300, 60, "intake under way", 0.01)
    daemon.kill9()
    assert writer.is_alive()  # mid-burst: the restart happens while sessions keep coming
    daemon = chaos.start_daemon()
    writer.join(60)
    assert written.get("distinct") == 3_000, written
    status = assert_invariants(chaos, daemon)
    assert status["intake"]["total"] == 3_000 and status["intake"]["backlog"] == 0
    status = chaos.status()
    assert status["daemon"]["running"] and status["daemon"]["pid"] == daemon.pid
    assert daemon.stop() == 0


def test_kill_9_of_the_daemon_mid_run(chaos: Chaos) -> None:
    """The daemon dies while its trainer holds at step 3 (silent: its heartbeats are 30 s apart).
    The next daemon stops the orphan before anything else (SIGTERM: it checkpoints, exit 75), marks
    the run interrupted and resumes it from step 3; never two trainers at once."""
    chaos.write_policy(every=10)
    chaos.hold(1, at=3, heartbeat_s=30)
    daemon = chaos.start_daemon()
    chaos.approve(10)
    chaos.wait_run(1, {"running"})
    chaos.wait_step(1, 3)
    orphan = chaos.runs()[1]["pid"]
    daemon.kill9()
    os.kill(orphan, 0)  # still alive: its daemon is gone
    daemon = chaos.start_daemon()
    [end] = trainer_records(chaos, 1, "end")
    assert end["exit_code"] == 75 and end["step"] == 3
    rows = chaos.runs()
    assert rows[1]["state"] == "interrupted" and rows[1]["follow_up"] == "resume"
    assert "daemon stopped unexpectedly" in rows[1]["error"]
    resumed = chaos.wait_run(2, FINAL)
    assert resumed["state"] == "succeeded" and resumed["trigger"] == "resume" and resumed["parent_run_id"] == 1
    assert trainer_records(chaos, 2, "start")[0]["resumed_from"] == 3
    status = assert_invariants(chaos, daemon)
    assert status["runner"]["repaired"] >= 1 and status["runner"]["reconcile_age_s"] is not None
    assert daemon.stop() == 0


def test_kill_9_of_the_daemon_right_after_a_run_ends(chaos: Chaos) -> None:
    """Killed (a) as soon as the trainer has written its last line, before or while the outcome is
    written, and (b) while the next run's registration child is inside its gate. Each restart
    completes what was left: outcome, registration, audit, exactly once."""
    chaos.write_policy(every=10)
    chaos.knobs(gate_delay_s=1.0, delay_runs=[2])
    daemon = chaos.start_daemon()
    chaos.approve(10)
    chaos.wait_journal(lambda r: r["kind"] == "trainer" and r["run_id"] == 1 and r["event"] == "end", 30,
                       "run 1's trainer ending")
    daemon.kill9()
    left = chaos.runs()[1]["state"], chaos.registration(1)
    daemon = chaos.start_daemon()
    assert chaos.wait_run(1, FINAL)["state"] == "succeeded", left
    registered(chaos, 1)

    chaos.approve(10)
    chaos.wait_journal(lambda r: r["kind"] == "gate" and r["run_id"] == 2 and r["event"] == "read", 30,
                       "run 2's gate under way")
    daemon.kill9()
    assert chaos.runs()[2]["state"] == "succeeded" and chaos.registration(2)[0] == "pending"
    daemon = chaos.start_daemon()
    registered(chaos, 2)
    status = assert_invariants(chaos, daemon)
    assert status["runner"]["reconcile_age_s"] is not None and status["runner"]["reconcile_age_s"] < 30
    assert status["champion"]["p"]["version"] == "2"
    assert daemon.stop() == 0


# ------------------------------------------------------------------------------ registration
def test_sigterm_during_registration(chaos: Chaos) -> None:
    """SIGTERM while the registry child is (a) inside its gate, (b) between the alias move and its
    decision tag: the daemon stops at once (exit 0), the child is killed, the registration stays
    pending (shown by `atlasd status`), and the next start finishes it exactly once."""
    chaos.write_policy(every=10)
    chaos.knobs(gate_delay_s=30, delay_runs=[1])
    daemon = chaos.start_daemon()
    chaos.approve(10)
    chaos.wait_journal(lambda r: r["kind"] == "gate" and r["run_id"] == 1 and r["event"] == "read", 30,
                       "run 1's gate under way")
    t0 = time.monotonic()
    assert daemon.stop(timeout=20) == 0 and time.monotonic() - t0 < 10
    wait_until(lambda: not chaos.registry_children(), 5, "the registry child killed with the daemon")
    assert chaos.registration(1)[:2] == ("pending", 0)
    status = chaos.status()
    assert status["registrations"]["pending"] == 1 and status["registrations"]["oldest_pending_age_s"] is not None
    assert not status["daemon"]["running"]
    assert chaos.registry_store()["models"]["p"]["aliases"].get("champion") is None

    chaos.knobs(tag_delay_s=30, delay_runs=[2])
    daemon = chaos.start_daemon()
    assert registered(chaos, 1)[3] == "1"
    chaos.approve(10)
    chaos.wait_journal(lambda r: r["kind"] == "alias" and r["run_id"] == 2, 30, "run 2's alias move")
    assert daemon.stop(timeout=20) == 0
    assert chaos.registration(2)[:2] == ("pending", 0)
    assert chaos.registry_store()["models"]["p"]["aliases"]["champion"] == "2"  # moved, decision not tagged

    chaos.knobs()
    daemon = chaos.start_daemon()
    registered(chaos, 2)
    status = assert_invariants(chaos, daemon)
    assert status["champion"]["p"]["version"] == "2" and status["registrations"]["pending"] == 0
    assert daemon.stop() == 0


def test_registry_down_at_run_start_and_at_finalize(chaos: Chaos) -> None:
    """The registry is down when the run starts (the start is deferred, no attempt spent: `atlasd
    status` lists it under training.deferred), then when it is registered (pending, retried), then
    refuses it (failed: a problem naming `atlasd register 1`); the operator re-queues it once the
    registry is fixed and it is registered exactly once."""
    chaos.write_policy(every=10)
    chaos.knobs(down=True)
    daemon = chaos.start_daemon()
    chaos.approve(10)
    deferred = wait_until(lambda: (r := chaos.runs().get(1)) and r["deferrals"] >= 1 and r, 30, "run 1 deferred")
    assert deferred["state"] == "queued" and deferred["attempt"] == 0 and deferred["started_at"] is None
    status = chaos.status()
    [shown] = status["training"]["deferred"]
    assert shown["run_id"] == 1 and "MLflow" in shown["error"]

    chaos.knobs(down=["finalize"])  # the store is back for the start, away again at registration
    chaos.sql("UPDATE atlasd.runs SET not_before = now() WHERE id = 1")  # its 30 s deferral, skipped
    done = chaos.wait_run(1, FINAL)
    assert done["state"] == "succeeded" and done["attempt"] == 0, done["error"]
    wait_until(lambda: (r := chaos.registration(1)) and r[1] >= 1, 30, "a failed registration attempt")
    state, attempts, error, _ = chaos.registration(1)
    assert state == "pending" and "unavailable" in error
    status = chaos.status()
    assert status["registrations"]["pending"] == 1 and status["registrations"]["oldest_pending_age_s"] >= 0

    chaos.knobs(refuse=["finalize"])  # back, but refusing the run: no retry, an operator's problem
    requeued = chaos.cli("register", "1")  # the operator does not wait for the backoff
    assert requeued.returncode == 0, requeued.stderr
    wait_until(lambda: chaos.registration(1)[0] == "failed", 20, "the refused registration failed")
    status = chaos.status()
    assert status["registrations"]["failed"] == 1 and status["registrations"]["failed_runs"][0]["run_id"] == 1
    assert any("atlasd register 1" in p for p in status["problems"]), status["problems"]

    chaos.knobs()
    requeued = chaos.cli("register", "1")
    assert requeued.returncode == 0, requeued.stderr
    registered(chaos, 1)
    assert_invariants(chaos, daemon)
    assert daemon.stop() == 0


def test_concurrent_gates_daemon_registration_and_operator_promote_or_rollback(chaos: Chaos) -> None:
    """An operator's `atlasd promote --force` lands inside the daemon's gate (after it read the
    champion, before it moved the alias), and an `atlasd rollback` between the gate's alias move
    and its decision. Whatever order they take, the audit's last champion move must be the
    registry's champion (each champion move holds the policy's lock, or the CLI says it is busy)."""
    chaos.write_policy(every=10)
    daemon = chaos.start_daemon()
    for run_id in (1, 2):
        chaos.approve(10)
        assert chaos.wait_run(run_id, FINAL)["state"] == "succeeded"
        registered(chaos, run_id)
    assert chaos.registry_store()["models"]["p"]["aliases"]["champion"] == "2"

    chaos.knobs(gate_delay_s=4, delay_runs=[3])
    chaos.approve(10)
    chaos.wait_journal(lambda r: r["kind"] == "gate" and r["run_id"] == 3 and r["event"] == "read", 30,
                       "run 3's gate under way")
    forced = chaos.cli("promote", "p", "1", "--force", "--reason", "chaos: operator during the gate")
    registered(chaos, 3)

    chaos.knobs(tag_delay_s=5, delay_runs=[4])
    chaos.approve(10)
    chaos.wait_journal(lambda r: r["kind"] == "alias" and r["run_id"] == 4, 30, "run 4's alias move")
    rolled = chaos.cli("rollback", "p", "--reason", "chaos: operator right after the gate's move")
    registered(chaos, 4)
    for done in (forced, rolled):  # done, or refused cleanly while the gate held the policy
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    assert_invariants(chaos, daemon)
    assert daemon.stop() == 0


def test_operator_rollback_of_a_promotion_interrupted_before_its_audit_row(chaos: Chaos) -> None:
    """SIGTERM after the gate moved the alias to v2 but before the decision was tagged and audited
    (no lock outlives a stopped daemon); while the daemon is down the operator rolls back to v1.
    The next start replays the registration: v2 is not promoted again, and the audit must still
    end with the champion the registry has (`atlasd status` shows v1, as MLflow does)."""
    chaos.write_policy(every=10)
    daemon = chaos.start_daemon()
    chaos.approve(10)
    assert chaos.wait_run(1, FINAL)["state"] == "succeeded"
    registered(chaos, 1)
    chaos.knobs(tag_delay_s=30, delay_runs=[2])
    chaos.approve(10)
    chaos.wait_journal(lambda r: r["kind"] == "alias" and r["run_id"] == 2, 30, "run 2's alias move")
    assert daemon.stop(timeout=20) == 0
    assert chaos.registration(2)[:2] == ("pending", 0)
    rolled = chaos.cli("rollback", "p", "--reason", "chaos: v2 misbehaves in production")
    assert rolled.returncode == 0, rolled.stderr
    assert chaos.registry_store()["models"]["p"]["aliases"]["champion"] == "1"

    chaos.knobs()
    daemon = chaos.start_daemon()
    registered(chaos, 2)
    assert chaos.registry_store()["models"]["p"]["aliases"]["champion"] == "1"  # never re-promoted
    status = assert_invariants(chaos, daemon)
    assert status["champion"]["p"]["version"] == "1"
    assert daemon.stop() == 0


# ------------------------------------------------------------------------------ inputs
def alias_bomb(levels: int = 9) -> str:
    lines = ['lol0: &lol0 "lol"']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines + ["teacher: t", "student: s", "gears: {}"]) + "\n"


def test_poison_sessions_and_policy_files(chaos: Chaos) -> None:
    chaos.write_policy(every=10)
    chaos.sql("DROP INDEX sessions_reward_score_idx")  # the SDK has none; its float8 cast refuses 1e-400
    daemon = chaos.start_daemon()
    poison = chaos.approve(1, reward_stats='{"score": 1e-400}') + chaos.approve(1, reward_stats='{"score": 1e400}') \
        + chaos.approve(1, reward_stats='{"score": "NaN"}') + chaos.approve(1, metadata='[1, 2]') \
        + chaos.approve(1, metadata='"just text"') + chaos.approve(1, reward_stats='[]')
    chaos.approve(10)
    assert chaos.wait_run(1, FINAL)["state"] == "succeeded"
    malformed = dict(chaos.sql("SELECT session_id, malformed FROM atlasd.intake"))
    assert all(malformed[sid] for sid in poison) and sum(1 for m in malformed.values() if m is None) == 10

    (chaos.policies / "nul.yaml").write_bytes(b"teacher: t\nstudent: s\x00\ngears: {}\n")
    (chaos.policies / "bomb.yaml").write_text(alias_bomb())
    daemon.proc.send_signal(signal.SIGHUP)
    loaded = daemon.wait_for("policies loaded", count=2, component="cadence")
    assert loaded["policies"] == ["p"]
    assert sorted(Path(f).name for f in loaded["failed_files"]) == ["bomb.yaml", "nul.yaml"]
    chaos.approve(10)
    assert chaos.wait_run(2, FINAL)["state"] == "succeeded"
    status = assert_invariants(chaos, daemon)
    assert status["intake"]["malformed"] == len(poison)
    assert all(any(name in e for e in status["policy_errors"]) for name in ("nul.yaml", "bomb.yaml"))
    assert status["daemon"]["running"] and daemon.alive()
    assert daemon.stop() == 0


def test_session_ids_reused_after_truncate_restart_identity(chaos: Chaos) -> None:
    """The SDK's tables are emptied with `TRUNCATE sessions RESTART IDENTITY CASCADE` and new
    sessions get the same ids: each new session is a new trace (its identity is the id AND its
    created_at), recorded and trained on; the old records stay explained (revoked)."""
    chaos.write_policy(every=10)
    daemon = chaos.start_daemon()
    first = chaos.approve(10)
    assert chaos.wait_run(1, FINAL)["state"] == "succeeded"
    registered(chaos, 1)
    chaos.sql("TRUNCATE sessions RESTART IDENTITY CASCADE")
    second = chaos.approve(10)
    assert second == first  # the same ids, other sessions
    assert_invariants(chaos, daemon)
    assert chaos.wait_run(2, FINAL)["state"] == "succeeded"
    status = assert_invariants(chaos, daemon)
    assert status["intake"]["total"] == 20 and status["intake"]["revoked"] == 10
    assert daemon.stop() == 0


def test_clock_step_leaves_a_cron_fire_in_the_future(chaos: Chaos) -> None:
    """A forward clock step, then back: the cron gear's last fire is stored a year ahead. The gear
    must fire again at its next tick (`* * * * *`: within a minute), not in a year."""
    path = chaos.write_policy(every=None, cron="* * * * *")
    key = _cron_key(load_policy_file(path).gears["hq"])
    chaos.sql("""INSERT INTO atlasd.policy_state (policy, gear, armed_at, cron_schedule, last_fire_at)
                 VALUES ('p', 'hq', now() - interval '10 minutes', %s, now() + interval '1 year')""", [key])
    chaos.approve(5)
    daemon = chaos.start_daemon()
    fired = wait_until(lambda: next((r for r in chaos.runs().values() if r["gear"] == "hq"), None), 75,
                       "the cron gear's next fire (a tick within a minute)", 0.5)
    assert fired["trigger"] in ("cron", "catch-up") and fired["n_traces"] == 5
    assert chaos.wait_run(fired["id"], FINAL)["state"] == "succeeded"
    last_fire = chaos.one("SELECT last_fire_at - now() FROM atlasd.policy_state WHERE gear = 'hq'")
    assert last_fire.total_seconds() <= 1, f"last_fire_at still {last_fire} ahead"
    assert_invariants(chaos, daemon)
    assert daemon.stop() == 0

