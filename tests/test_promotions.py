"""Daemon side of the registry (atlasd.promotions, `atlasd models|promote|rollback`): real
Postgres, real MLflow sqlite store under the state dir, real `python -m registry` children."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import psycopg
import pytest

from atlasd.cli import main
from atlasd.logging import configure_logging
from atlasd.promotions import CHANNEL, champion, champions, finalize_run, retry_pending
from atlasd.runspec import RunSpec
from atlasd.settings import load_settings
from tests.test_registry import make_run, report, tiny_student  # noqa: F401 - fixture

HOOK = "import os, json, sys; open(sys.argv[1], 'a').write(json.dumps({k: v for k, v in os.environ.items() if k.startswith('ATLASD_')}) + '\\n')"


@pytest.fixture()
def env(db_url: str, tmp_path: Path, monkeypatch) -> Path:
    configure_logging("json", "info", stream=sys.__stderr__)  # not a test's captured stream, closed after it
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("ATLASD_DB_URL", db_url)
    monkeypatch.setenv("ATLASD_STATE_DIR", str(state))
    monkeypatch.setenv("ATLASD_PROMOTION_HOOK", json.dumps([sys.executable, "-c", HOOK, str(tmp_path / "hook.jsonl")]))
    monkeypatch.delenv("ATLASD_MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def add_run(db_url: str, run_id: int, state: str = "succeeded") -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO atlasd.runs (id, policy, gear, state, trigger, window_lo, window_hi, started_at, finished_at)
               VALUES (%s, 'p1', 'fast', %s, 'batch', 0, 10, now(), now())""", [run_id, state])


def audit(db_url: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT action, from_version, to_version, actor, atlasd_run_id, reason, hook"
                            " FROM atlasd.promotions ORDER BY id").fetchall()


def test_gate_audit_hooks_rollback_and_forced_promote(env: Path, db_url: str, tiny_student, capsys) -> None:  # noqa: F811
    settings = load_settings()
    uri = settings.tracking_uri
    for run_id in (1, 2, 3):
        add_run(db_url, run_id)
    runs = {1: make_run(env, tiny_student, 1, uri, success=0.7, tokens=60),
            2: make_run(env, tiny_student, 2, uri, success=0.6, tokens=50, champion_version="1",
                        eval_start=report(0.7, 60)),
            3: make_run(env, tiny_student, 3, uri, success=0.8, tokens=55)}
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        out1 = asyncio.run(finalize_run(settings, 1, *runs[1]))
        assert out1["state"] == "done" and out1["decision"] == "promote" and out1["model_version"] == "1", out1
        note = next(listener.notifies(timeout=2, stop_after=1))
        assert json.loads(note.payload) == {"model": "atlasd-p1", "version": "1", "policy": "p1"}
        out2 = asyncio.run(finalize_run(settings, 2, *runs[2]))  # worse than the champion: rejected
        assert out2["decision"] == "reject" and out2["champion"] == "1", out2
        assert list(listener.notifies(timeout=0.3)) == []  # the champion did not move
    assert asyncio.run(finalize_run(settings, 2, *runs[2]))["state"] == "done"  # no second decision, no child
    out3 = asyncio.run(finalize_run(settings, 3, *runs[3]))
    assert out3["decision"] == "promote" and out3["previous_champion"] == "1"
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT id, model_version FROM atlasd.runs ORDER BY id").fetchall() == [
            (1, "1"), (2, "2"), (3, "3")]

    assert main(["rollback", "p1", "--reason", "bad answers in prod"]) == 0
    assert main(["promote", "p1", "2", "--force", "--reason", "hand-checked", "--json"]) == 0
    forced = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert forced["action"] == "force" and forced["from_version"] == "1" and forced["to_version"] == "2"
    rows = audit(db_url)
    assert [r[:5] for r in rows] == [
        ("promote", None, "1", "atlasd", 1), ("reject", "1", "2", "atlasd", 2), ("promote", "1", "3", "atlasd", 3),
        ("rollback", "3", "1", rows[3][3], None), ("force", "1", "2", rows[4][3], None)]
    assert rows[3][5] == "bad answers in prod" and rows[4][5] == "hand-checked"
    assert rows[0][6].startswith("notified; hook exit 0") and rows[1][6] is None
    hooks = [json.loads(line) for line in (env / "hook.jsonl").read_text().splitlines()]
    assert [(h["ATLASD_PROMOTION_VERSION"], h["ATLASD_PROMOTION_ACTION"]) for h in hooks] == [
        ("1", "promote"), ("3", "promote"), ("1", "rollback"), ("2", "force")]
    assert all("ATLASD_DB_URL" not in h for h in hooks)  # the hook never gets the database's credentials
    with psycopg.connect(db_url) as conn:
        assert champions(conn)["p1"]["version"] == "2"

    assert main(["models", "p1", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert models[0]["aliases"] == {"champion": "2", "challenger": "3"}
    assert [v["decision"] for v in models[0]["versions"]] == ["promote", "force", "promote"]
    # the next run's student is the champion's checkpoint
    champ = asyncio.run(champion(settings, "p1"))
    assert champ["champion"] == "2" and (Path(champ["path"]) / "config.json").is_file()
    spec = RunSpec.load(runs[3][0])
    RunSpec.model_validate({**spec.model_dump(), "student": champ["path"], "champion_version": champ["champion"]})


def test_rollback_refuses_unloadable_previous_champion(env: Path, db_url: str, tiny_student, capsys) -> None:  # noqa: F811
    settings = load_settings()
    for run_id in (1, 2):
        add_run(db_url, run_id)
    r1 = make_run(env, tiny_student, 1, settings.tracking_uri, success=0.7)
    r2 = make_run(env, tiny_student, 2, settings.tracking_uri, success=0.8)
    assert asyncio.run(finalize_run(settings, 1, *r1))["decision"] == "promote"
    v1 = asyncio.run(champion(settings, "p1"))["path"]
    assert asyncio.run(finalize_run(settings, 2, *r2))["decision"] == "promote"
    (Path(v1) / "model.safetensors").unlink()
    assert main(["rollback", "p1"]) == 1
    assert "no weights" in capsys.readouterr().err
    assert [r[0] for r in audit(db_url)] == ["promote", "promote"]  # nothing moved, nothing recorded


def test_registration_retried_after_store_unavailable(env: Path, db_url: str, tiny_student) -> None:  # noqa: F811
    from mlflow import MlflowClient

    settings = load_settings()
    add_run(db_url, 1)
    db_file = settings.state_dir / "mlflow.db"
    db_file.mkdir()  # the sqlite file is a folder: "unable to open database file" (root ignores chmod)
    paths = make_run(env, tiny_student, 1, settings.tracking_uri)
    out = asyncio.run(finalize_run(settings, 1, *paths))
    assert out["state"] == "pending" and out["retryable"] is True, out
    with psycopg.connect(db_url) as conn:
        state, attempts, error = conn.execute(
            "SELECT state, attempts, last_error FROM atlasd.registrations WHERE run_id = 1").fetchone()
        assert (state, attempts) == ("pending", 1) and "database" in error
        assert conn.execute("SELECT model_version FROM atlasd.runs WHERE id = 1").fetchone() == (None,)
    assert asyncio.run(retry_pending(settings)) == []  # not due yet (backoff)
    db_file.rmdir()  # store back
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE atlasd.registrations SET next_attempt_at = now()")
    done = asyncio.run(retry_pending(settings))
    assert [d["state"] for d in done] == ["done"] and done[0]["model_version"] == "1"
    assert asyncio.run(finalize_run(settings, 1, *paths))["model_version"] == "1"  # the runner calling again
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    assert len(client.search_model_versions("name = 'atlasd-p1'")) == 1
    assert [r[:3] for r in audit(db_url)] == [("promote", None, "1")]


def test_a_failed_registration_is_visible_and_register_requeues_it(env: Path, db_url: str, tiny_student, capsys) -> None:  # noqa: F811
    settings = load_settings()
    add_run(db_url, 1)
    paths = make_run(env, tiny_student, 1, settings.tracking_uri)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("""INSERT INTO atlasd.registrations (run_id, spec_path, result_path, log_path, state, attempts,
                                                          last_error)
                        VALUES (1, %s, %s, %s, 'failed', 10, 'store unavailable for 3 h')""", [str(p) for p in paths])
    assert main(["registrations", "--json", "--state", "failed"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["run_id"], row["policy"], row["state"], row["attempts"]) == (1, "p1", "failed", 10)
    assert main(["register", "1"]) == 0
    assert "registration of run 1 re-queued" in capsys.readouterr().out
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT state, attempts, next_attempt_at <= now() FROM atlasd.registrations").fetchall() == [
            ("pending", 0, True)]
    assert [d["state"] for d in asyncio.run(retry_pending(settings))] == ["done"]  # the daemon's next round
    assert main(["registrations"]) == 0
    assert "done" in capsys.readouterr().out.splitlines()[1]
    assert main(["register", "1"]) == 1
    assert "run 1 is already registered: model version 1" in capsys.readouterr().err

    # a succeeded run without a registration row (it ended before outcome and row were one write)
    add_run(db_url, 2)
    spec, result, log = make_run(env, tiny_student, 2, settings.tracking_uri)
    spec.rename(spec.with_name("run_spec-2.json"))
    add_run(db_url, 3, state="cancelled")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE atlasd.runs SET output_dir = %s WHERE id = 2", [str(result.parent)])
    assert main(["register", "2"]) == 0
    assert "registration of run 2 queued" in capsys.readouterr().out
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT spec_path, result_path, log_path FROM atlasd.registrations WHERE run_id = 2"
                            ).fetchone() == (str(result.parent / "run_spec-2.json"), str(result),
                                             str(result.parent / "stdout.jsonl"))
    assert main(["register", "3"]) == 1
    assert "run 3 is cancelled: only a finished run" in capsys.readouterr().err
    assert main(["register", "99"]) == 1
    assert "no run 99" in capsys.readouterr().err


def hold_policy_lock(db_url: str, policy: str) -> psycopg.Connection:
    """Another champion move of ``policy`` in progress: its advisory lock, held until the connection closes."""
    from atlasd.promotions import POLICY_LOCK_CLASS

    conn = psycopg.connect(db_url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [POLICY_LOCK_CLASS, policy])
    return conn


def test_a_gate_and_an_operator_move_wait_for_the_policy_lock(env: Path, db_url: str, tiny_student, capsys,  # noqa: F811
                                                             monkeypatch) -> None:
    from atlasd import promotions

    monkeypatch.setattr(promotions, "POLICY_LOCK_WAIT_S", 0.3)
    monkeypatch.setattr(promotions, "OPERATOR_LOCK_WAIT_S", 0.3)
    settings = load_settings()
    add_run(db_url, 1)
    paths = make_run(env, tiny_student, 1, settings.tracking_uri)
    other = hold_policy_lock(db_url, "p1")
    try:
        assert asyncio.run(finalize_run(settings, 1, *paths)) == {"state": "busy"}
        with psycopg.connect(db_url) as conn:  # no attempt spent, still due: the next round tries again
            assert conn.execute("SELECT state, attempts, next_attempt_at <= now() FROM atlasd.registrations"
                                ).fetchall() == [("pending", 0, True)]
        assert main(["rollback", "p1"]) == 1
        assert "another promotion of policy 'p1' is in progress" in capsys.readouterr().err
    finally:
        other.close()
    assert [d["decision"] for d in asyncio.run(retry_pending(settings))] == ["promote"]
    assert [r[:3] for r in audit(db_url)] == [("promote", None, "1")]


def test_a_champion_re_measurement_waits_for_the_gpu_slot(env: Path, db_url: str, tiny_student) -> None:  # noqa: F811
    """The champion has no score on the challenger's eval set: the first registry call answers
    "needs the GPU" and the measurement only starts once the registration holds the GPU slot."""

    class Slot(asyncio.Lock):
        async def acquire(self) -> bool:
            self.asked.set()
            return await super().acquire()

    settings = load_settings()
    for run_id in (1, 2):
        add_run(db_url, run_id)
    r1 = make_run(env, tiny_student, 1, settings.tracking_uri, success=0.7, eval_hash="old")
    r2 = make_run(env, tiny_student, 2, settings.tracking_uri, success=0.8, eval_hash="new")
    assert asyncio.run(finalize_run(settings, 1, *r1))["decision"] == "promote"

    async def scenario() -> dict:
        slot = Slot()
        slot.asked = asyncio.Event()
        await slot.acquire()  # a trainer holds the GPU
        task = asyncio.create_task(finalize_run(settings, 2, *r2, gpu_slot=slot))
        await asyncio.wait_for(slot.asked.wait(), 120)
        await asyncio.sleep(0.5)
        assert not task.done()  # waiting for the slot, not measuring beside the trainer
        slot.release()
        return await task

    out = asyncio.run(scenario())
    # measured once it held the slot: the stand-in run has no eval snapshot, so `trainers eval` fails
    assert out["state"] == "pending" and "trainers eval" in out["error"], out
