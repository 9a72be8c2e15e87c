"""The operator commands, in process, against real Postgres: policies validate (poison files too), plan, trigger,
pause, resume, runs, runs show, cancel, reload, and the status keys."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from atlasd.cli import main
from atlasd.testing.pg import sql
from tests.cadence_support import NO_SPLIT
from tests.test_policies import billion_laughs

GOOD = {
    "teacher": "t",
    "student": "s",
    "gears": {
        "fast": {"trigger": {"batch": {"every": 2}}, "eval": NO_SPLIT},
        "hq": {"trigger": {"cron": {"expr": "0 3 * * sun"}}, "optim": {"max_steps": None, "num_train_epochs": 5},
               "eval": NO_SPLIT},
    },
}


def record(db_url: str, n: int) -> None:
    sql(db_url, """INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at)
                   SELECT (SELECT COALESCE(max(session_id), 0) FROM atlasd.intake) + g, 'k', 0.9, now()
                     FROM generate_series(1, %s) g""", [n])


@pytest.fixture()
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "p.yaml").write_text(yaml.safe_dump(GOOD))
    monkeypatch.setenv("ATLASD_DB_URL", db_url)
    monkeypatch.setenv("ATLASD_POLICIES_DIR", str(folder))
    monkeypatch.setenv("ATLASD_LOG_FORMAT", "json")
    return folder


def test_validate_lists_every_error_and_exits_1(env: Path, capsys) -> None:
    assert main(["policies", "validate"]) == 0
    assert "ok: " in capsys.readouterr().out
    (env / "bad.yaml").write_text("teacher: t\nstudent: s\ngears:\n  fast:\n    trigger: {batch: {every: -2}}\n")
    (env / "worse.yml").write_text("- not\n- a mapping\n")
    assert main(["policies", "validate"]) == 1
    out = capsys.readouterr()
    assert f"error: {env / 'bad.yaml'}:5: gears.fast.trigger.batch.every: Input should be greater than 0" in out.err
    assert f"error: {env / 'worse.yml'}:1: a policy is a YAML mapping, got a list" in out.err
    assert "1 valid, 2 invalid" in out.err and f"ok: {env / 'p.yaml'}" in out.out
    assert main(["policies", "validate", str(env / "p.yaml")]) == 0
    assert main(["policies", "validate", str(env / "nope.yaml")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_plan_trigger_pause_resume_runs_cancel(env: Path, db_url: str, capsys) -> None:
    record(db_url, 3)
    assert main(["plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    fast = next(g for g in plan["gears"] if g["gear"] == "fast")
    assert (fast["action"], fast["pending"], fast["n_traces"], fast["window_hi"]) == ("enqueue", 3, 2, 2)
    assert sql(db_url, "SELECT count(*) FROM atlasd.runs") == [(0,)]  # a dry run
    assert main(["plan"]) == 0
    text = capsys.readouterr().out
    assert "p/fast (batch): 3/2 pending; would queue a batch run, window (0, 2], 2 traces" in text
    assert "p/hq (cron): 3 pending; nothing to queue" in text and "next tick:" in text

    assert main(["pause", "p", "--reason", "GPU maintenance"]) == 0
    assert main(["plan", "--json"]) == 0
    paused = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert paused["paused"] == ["p"] and all(g["paused"] for g in paused["gears"])
    assert main(["trigger", "p", "--gear", "hq"]) == 0  # manual runs work while paused
    assert "queued run 1: p/hq, manual, window (0, 3], 3 traces" in capsys.readouterr().out
    assert main(["resume"]) == 0
    assert "resumed p" in capsys.readouterr().out

    assert main(["trigger", "p", "--gear", "nope"]) == 1
    assert "has no gear 'nope' (gears: fast, hq)" in capsys.readouterr().err
    assert main(["trigger", "ghost", "--gear", "fast"]) == 1
    assert "no valid policy 'ghost'" in capsys.readouterr().err

    assert main(["runs", "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)
    assert (run["id"], run["trigger"], run["state"], run["window_hi"]) == (1, "manual", "queued", 3)
    assert main(["runs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "POLICY", "GEAR", "STATE", "TRIGGER", "WINDOW", "TRACES", "CREATED", "FINISHED"]
    assert table[1].split()[:5] == ["1", "p", "hq", "queued", "manual"]
    assert main(["runs", "show", "1"]) == 0
    assert "window_hi: 3" in capsys.readouterr().out
    assert main(["runs", "show", "7"]) == 1
    assert "no run 7" in capsys.readouterr().err

    assert main(["cancel", "1"]) == 0
    assert "run 1 cancelled" in capsys.readouterr().out
    assert main(["cancel", "1"]) == 1
    assert "already cancelled" in capsys.readouterr().err
    record(db_url, 1)
    assert main(["trigger", "p", "--gear", "fast"]) == 0
    sql(db_url, "UPDATE atlasd.runs SET state = 'running', started_at = now() WHERE id = 2")
    assert main(["cancel", "2"]) == 0
    assert "cancel requested" in capsys.readouterr().out
    assert sql(db_url, "SELECT state, cancel_requested_at IS NOT NULL FROM atlasd.runs WHERE id = 2") == [("running", True)]
    assert main(["runs", "--state", "running"]) == 0
    assert "running (cancel requested)" in capsys.readouterr().out


def test_status_json_has_policies_and_runs(env: Path, db_url: str, capsys) -> None:
    record(db_url, 1)
    (env / "broken.yaml").write_text("gears: 3\n")
    assert main(["pause"]) == 0
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["policies"]["p"]["fast"] == {
        "kind": "batch", "pending": 1, "threshold": 2, "next_fire_at": None, "paused": True, "would_queue": False}
    assert status["policies"]["p"]["hq"]["next_fire_at"].endswith("03:00:00+00:00")
    assert status["runs"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "interrupted": 0, "cancelled": 0}
    assert any("broken.yaml" in e and "gears" in e for e in status["policy_errors"])


def test_reload_signals_the_daemon_named_in_daemon_state(env: Path, db_url: str, capsys) -> None:
    assert main(["reload"]) == 1
    assert "no running atlasd" in capsys.readouterr().err
    got: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: got.append(signum))
    try:
        import socket

        sql(db_url, """INSERT INTO atlasd.daemon_state (pid, host, version, started_at, heartbeat_at)
                       VALUES (%s, %s, 'test', now(), now())""", [os.getpid(), socket.gethostname()])
        assert main(["reload"]) == 0
        assert got == [signal.SIGHUP]
        (env / "bad.yaml").write_text("teacher: [\n")
        assert main(["reload"]) == 1  # sent, and the broken file is reported
        err = capsys.readouterr().err
        assert "bad.yaml:2: invalid YAML" in err and "keeps running" in err
        sql(db_url, "UPDATE atlasd.daemon_state SET host = 'elsewhere'")
        assert main(["reload"]) == 1
        assert "runs on host 'elsewhere'" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_validate_names_poison_files_without_a_traceback(env: Path, capsys) -> None:
    (env / "nul.yaml").write_bytes(b"teacher: t\nstudent: s\x00\x00\n")
    (env / "bomb.yaml").write_text(billion_laughs())
    (env / "forever.yaml").write_text(yaml.safe_dump({**GOOD, "catchup_window": float("inf")}))
    assert main(["policies", "validate"]) == 1
    out = capsys.readouterr()
    assert f"error: {env / 'nul.yaml'}:2: not a text file: unprintable character U+0000" in out.err
    assert f"error: {env / 'bomb.yaml'}: the YAML expands to over 10000 values" in out.err
    assert f"error: {env / 'forever.yaml'}:1: catchup_window: a duration is at most 3650 days" in out.err
    assert "1 valid, 3 invalid" in out.err and f"ok: {env / 'p.yaml'}" in out.out


def test_reset_eval_starts_a_new_generation_and_unblocks_a_changed_split(env: Path, db_url: str, capsys) -> None:
    record(db_url, 3)
    assert main(["plan"]) == 0  # plan records nothing
    assert sql(db_url, "SELECT count(*) FROM atlasd.eval_splits") == [(0,)]
    assert main(["trigger", "p", "--gear", "fast"]) == 0  # the first use records generation 1
    sql(db_url, """INSERT INTO atlasd.promotions (policy, registered_model, to_version, action, actor)
                   VALUES ('p', 'p', '1', 'promote', 'atlasd')""")
    changed = {**GOOD, "gears": {g: {**spec, "eval": {"eval_fraction": 0.3}} for g, spec in GOOD["gears"].items()}}
    (env / "p.yaml").write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    assert main(["plan"]) == 0
    assert "waits: policy 'p': the eval split changed" in capsys.readouterr().out
    assert main(["policies", "reset-eval", "p"]) == 0
    assert "policy p: eval generation 2 (eval_fraction 0.3, split salt 'p#g2')" in capsys.readouterr().out
    assert main(["plan"]) == 0
    assert "waits:" not in capsys.readouterr().out
    assert main(["policies", "reset-eval", "ghost"]) == 1
    assert "no valid policy 'ghost'" in capsys.readouterr().err
