"""Lineage and taint (atlasd/lineage.py): the trainer's manifest, recorded with the run; a
revocation taints the runs that trained on the session; the gate never promotes a tainted
challenger; the taint tagger tags the versions in MLflow (`atlasd models`, `atlasd status`) and
queues a clean retrain with `on_taint: retrain`. Real Postgres, a real MLflow sqlite store, real
`python -m registry` children; the real daemon with a real trainer for the end-to-end check."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest
import yaml

from atlasd import intake, lineage
from atlasd.cli import main
from atlasd.policies import PolicySet
from atlasd.promotions import finalize_run, tag_taints
from atlasd.runspec import manifest_path
from atlasd.settings import load_settings
from atlasd.testing.daemon import wait_until
from atlasd.testing.pg import sql
from tests.test_intake import add_sessions
from tests.test_promotions import env  # noqa: F401 - fixture
from tests.test_registry import make_run, tiny_student  # noqa: F401 - fixture
from trainers.dataset import Example, save_examples


def reconcile(db_url: str, ids: list[int] | None = None) -> intake.IntakeResult:
    async def go() -> intake.IntakeResult:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            return await intake.reconcile(conn, ids, batch_size=100)
    return asyncio.run(go())


def write_policy(folder: Path, on_taint: str) -> PolicySet:
    folder.mkdir(exist_ok=True)
    (folder / "p1.yaml").write_text(yaml.safe_dump({
        "name": "p1", "teacher": "t", "student": "s", "registered_model": "atlasd-p1", "on_taint": on_taint,
        "gears": {"fast": {"trigger": {"batch": {"every": 100}}}}}))
    policies = PolicySet(folder)
    policies.reload()
    return policies


def trained(db_url: str, run_dir: Path, run_id: int, window: tuple[int, int], seqs: list[int]) -> lineage.Manifest:
    """A succeeded run of p1/fast over ``window`` that trained on the intake rows ``seqs`` (two
    examples each, as per_turn makes them): its snapshot and manifest as the trainer saves them,
    its row, and its lineage recorded as the runner does in the transaction of its outcome."""
    rows = sql(db_url, "SELECT seq, session_id, session_created_at FROM atlasd.intake WHERE seq = ANY(%s)", [seqs])
    examples = [Example(session_id=sid, seq=seq, prompt=[{"role": "system", "content": f"Task: {sid}"}],
                        completion=str(turn), reference="r", source="window" if seq > window[0] else "rehearsal",
                        session_created_at=created.isoformat())
                for seq, sid, created in rows for turn in range(2)]
    save_examples(examples, run_dir / "data" / "train.jsonl")
    sql(db_url, """INSERT INTO atlasd.runs (id, policy, gear, state, trigger, window_lo, window_hi, spec, started_at, finished_at)
                   VALUES (%s, 'p1', 'fast', 'succeeded', 'batch', %s, %s, %s, now(), now())""",
        [run_id, *window, json.dumps({"mlflow": {"registered_model": "atlasd-p1"}})])
    sql(db_url, "SELECT setval(pg_get_serial_sequence('atlasd.runs', 'id'), (SELECT max(id) FROM atlasd.runs))")
    manifest = lineage.read_manifest(run_dir)

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn, conn.transaction():
            await lineage.record(conn, run_id, manifest)
    asyncio.run(go())
    return manifest


def revoke(db_url: str, session_id: int) -> intake.IntakeResult:
    """A reviewer quarantines the session; the targeted reconcile its NOTIFY causes revokes it."""
    sql(db_url, "UPDATE sessions SET review_status = 'quarantined' WHERE id = %s", [session_id])
    return reconcile(db_url, [session_id])


def test_the_manifest_names_each_trained_on_session_once_with_a_stable_hash(tmp_path: Path) -> None:
    examples = [Example(session_id=7, seq=3, prompt=[], completion=str(i), reference="r",
                        session_created_at="2026-01-02T03:04:05+00:00") for i in range(3)]
    examples.append(Example(session_id=5, seq=1, prompt=[], completion="c", reference="r", source="rehearsal",
                            session_created_at="2026-01-01T00:00:00+00:00"))
    save_examples(examples, tmp_path / "a" / "data" / "train.jsonl")
    save_examples(list(reversed(examples)), tmp_path / "b" / "data" / "train.jsonl")
    data = json.loads(manifest_path(tmp_path / "a" / "data" / "train.jsonl").read_text())
    assert (data["n_sessions"], data["n_examples"]) == (2, 4)
    assert [(s["seq"], s["session_id"], s["source"]) for s in data["sessions"]] == [(1, 5, "rehearsal"), (3, 7, "window")]
    a, b = lineage.read_manifest(tmp_path / "a"), lineage.read_manifest(tmp_path / "b")
    assert a == b and a.sessions == [(1, 5, "2026-01-01T00:00:00+00:00"), (3, 7, "2026-01-02T03:04:05+00:00")]
    save_examples(examples[:3], tmp_path / "c" / "data" / "train.jsonl")  # another training set, another hash
    assert lineage.read_manifest(tmp_path / "c").hash != a.hash
    assert lineage.read_manifest(tmp_path / "none") is None  # a run of an older trainer: no lineage


def test_a_revocation_taints_what_learned_from_it_the_gate_refuses_it_and_a_clean_retrain_is_queued(
        env: Path, db_url: str, tiny_student, capsys) -> None:  # noqa: F811
    settings = load_settings()
    policies = write_policy(env / "policies", on_taint="retrain")
    sids = add_sessions(db_url, 6)
    assert reconcile(db_url).recorded == 6
    seq_of = dict(sql(db_url, "SELECT session_id, seq FROM atlasd.intake"))
    seqs = [seq_of[s] for s in sids]
    # run 1: window (0, 3]; run 2: window (3, 6] with the first session as rehearsal
    trained(db_url, env / "run1", 1, (0, seqs[2]), seqs[:3])
    trained(db_url, env / "run2", 2, (seqs[2], seqs[5]), [seqs[0], *seqs[3:]])
    assert sql(db_url, "SELECT run_id, count(*) FROM atlasd.run_sessions GROUP BY 1 ORDER BY 1") == [(1, 3), (2, 4)]
    assert sql(db_url, "SELECT run_id, revoked FROM atlasd.lineage ORDER BY 1") == [(1, 0), (2, 0)]

    paths = {run_id: make_run(env, tiny_student, run_id, settings.tracking_uri, success=0.6 + run_id / 10)
             for run_id in (1, 2)}
    out1 = asyncio.run(finalize_run(settings, 1, *paths[1]))
    assert out1["decision"] == "promote", out1
    assert next(c for c in out1["checks"] if c["name"] == "untainted")["met"] is True

    # a session both runs trained on is un-approved: the intake's revocation taints them both
    assert revoke(db_url, sids[0]).revoked == 1
    assert sql(db_url, "SELECT run_id, revoked, tagged FROM atlasd.lineage ORDER BY 1") == [(1, 1, 0), (2, 1, 0)]
    assert revoke(db_url, sids[4]).revoked == 1  # one of run 2's window
    assert sql(db_url, "SELECT run_id, revoked FROM atlasd.lineage ORDER BY 1") == [(1, 1), (2, 2)]

    # run 2 would beat the champion, but it trained on revoked sessions: never promoted
    out2 = asyncio.run(finalize_run(settings, 2, *paths[2]))
    assert out2["decision"] == "reject" and out2["champion"] == "1", out2
    assert [c["name"] for c in out2["checks"] if not c["met"]] == ["untainted"]
    checks = sql(db_url, "SELECT action, checks FROM atlasd.promotions WHERE atlasd_run_id = 2")
    assert checks[0][0] == "reject"
    untainted = next(c for c in checks[0][1] if c["name"] == "untainted")
    assert (untainted["value"], untainted["met"]) == (2, False)

    # the tagger tags both versions (v1 is the champion: tagged, never rolled back) and queues the retrains
    done = asyncio.run(tag_taints(settings, policies))
    assert [(d["run_id"], d["model_version"], d["revoked_sessions"], d["champion"]) for d in done] == [
        (1, "1", 1, True), (2, "2", 2, False)]
    retrains = sql(db_url, """SELECT l.run_id, r.trigger, r.gear, r.window_lo, r.window_hi, r.n_traces, r.state
                                FROM atlasd.lineage l JOIN atlasd.runs r ON r.id = l.retrain_run_id ORDER BY 1""")
    assert retrains == [(1, "manual", "fast", 0, seqs[2], 2, "queued"), (2, "manual", "fast", seqs[2], seqs[5], 2, "queued")]
    assert asyncio.run(tag_taints(settings, policies)) == []  # caught up: nothing to tag, no second retrain

    assert main(["models", "p1", "--json"]) == 0
    versions = json.loads(capsys.readouterr().out)["models"][0]["versions"]
    assert [(v["version"], v["tainted"], v["decision"]) for v in versions] == [("1", 1, "promote"), ("2", 2, "reject")]
    assert main(["models", "p1"]) == 0
    assert "warning: champion v1 is tainted: it trained on 1 session(s) revoked since" in capsys.readouterr().out
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["champion"]["p1"]["tainted"] == 1
    assert any("champion of p1 (v1) is tainted" in p for p in status["problems"])
    assert [(t["run_id"], t["revoked"], t["tagged"]) for t in status["lineage"]["tainted"]] == [(1, 1, 1), (2, 2, 2)]

    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    run = client.get_run(out2["mlflow_run_id"])  # the training manifest is the run's dataset input
    inputs = [(i.dataset.digest, [t.value for t in i.tags]) for i in run.inputs.dataset_inputs]
    assert inputs == [(lineage.read_manifest(env / "run2").hash, ["training"])]


def test_a_re_approved_session_does_not_count_twice_and_a_run_without_lineage_is_never_tainted(
        env: Path, db_url: str) -> None:  # noqa: F811
    sids = add_sessions(db_url, 3)
    reconcile(db_url)
    seqs = [s for (s,) in sql(db_url, "SELECT seq FROM atlasd.intake ORDER BY seq")]
    trained(db_url, env / "run1", 1, (0, seqs[-1]), seqs)
    sql(db_url, """INSERT INTO atlasd.runs (id, policy, gear, state, trigger, window_lo, window_hi, started_at, finished_at)
                   VALUES (2, 'p1', 'fast', 'succeeded', 'batch', 0, %s, now(), now())""", [seqs[-1]])  # trained before lineage
    revoke(db_url, sids[1])
    sql(db_url, "UPDATE sessions SET review_status = 'approved' WHERE id = %s", [sids[1]])
    assert reconcile(db_url, [sids[1]]).restored == 1
    revoke(db_url, sids[1])
    assert sql(db_url, "SELECT run_id, revoked FROM atlasd.lineage") == [(1, 1)]
    # a session revoked before the run's lineage is recorded (while it trained) counts as well
    trained(db_url, env / "run3", 3, (0, seqs[-1]), seqs)
    assert sql(db_url, "SELECT revoked FROM atlasd.lineage WHERE run_id = 3") == [(1,)]


@pytest.mark.timeout(600)
def test_the_daemon_tags_a_version_tainted_when_a_trained_on_session_is_revoked(db_url, tiny_models, tmp_path):
    """The real daemon and trainer; the slow poll is an hour away, so the tag comes from the
    revocation itself (NOTIFY, reconcile, taint tagger), well within one poll interval."""
    from tests.test_runner import RUN_TIMEOUT, daemon, enqueue, seed, wait_state, write_policy as runner_policy

    policies = tmp_path / "policies"
    runner_policy(policies, "lin", tiny_models)
    doc = yaml.safe_load((policies / "lin.yaml").read_text())
    (policies / "lin.yaml").write_text(yaml.safe_dump({**doc, "on_taint": "retrain"}))
    hi = seed(db_url, 12)
    run_id = enqueue(db_url, "lin", hi)
    with daemon(db_url, policies, tmp_path / "state", ATLASD_POLL_INTERVAL_S="3600"):
        wait_state(db_url, run_id, {"succeeded", "failed"})
        version = wait_until(lambda: sql(db_url, "SELECT model_version FROM atlasd.runs WHERE id = %s", [run_id])[0][0],
                             RUN_TIMEOUT, "registered")
        trained_on = sql(db_url, "SELECT session_id FROM atlasd.run_sessions WHERE run_id = %s ORDER BY seq", [run_id])
        assert trained_on and sql(db_url, "SELECT result ->> 'manifest_hash' = l.manifest_hash FROM atlasd.runs r "
                                          "JOIN atlasd.lineage l ON l.run_id = r.id") == [(True,)]
        sql(db_url, "UPDATE sessions SET review_status = 'quarantined' WHERE id = %s", [trained_on[0][0]])
        row = wait_until(lambda: (r := sql(db_url, "SELECT tagged, retrain_run_id FROM atlasd.lineage WHERE run_id = %s",
                                          [run_id])[0])[0] == 1 and r, 120, "the version tagged tainted")
        assert row[1] is not None  # on_taint: retrain queued the window again
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version("lin", version).tags["atlasd.tainted"] == "1"
