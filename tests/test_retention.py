"""Retention (atlasd/retention.py, `atlasd gc`): a 30-run simulated history with small fake
checkpoints keeps exactly what the policy says, never the champion's files nor anything a live run,
a queued resume or an unfinished registration needs; `--dry-run` lists the same and removes nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psycopg
import pytest

from atlasd.cli import main

MODEL = "atlasd-p"


def fake_run_folder(folder: Path) -> None:
    for sub, size in (("final", 3000), ("checkpoints/step-10", 5000), ("data", 100)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "blob").write_bytes(b"x" * size)


@pytest.fixture()
def history(db_url: str, tmp_path: Path, monkeypatch) -> Path:
    """Runs 1..30 of policy p (run N finished 30-N days ago, succeeded, registered as version N),
    champion v12 (previous v7), and the special cases named below."""
    state = tmp_path / "state"
    runs = state / "runs"
    monkeypatch.setenv("ATLASD_DB_URL", db_url)
    monkeypatch.setenv("ATLASD_STATE_DIR", str(state))
    monkeypatch.setenv("ATLASD_KEEP_VERSIONS", "3")
    monkeypatch.setenv("ATLASD_KEEP_DAYS", "4.5")
    spec = json.dumps({"mlflow": {"registered_model": MODEL}})
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n in range(1, 31):
            folder = runs / f"run-{n}"
            fake_run_folder(folder)
            state_, follow = ("failed", None) if n == 5 else ("interrupted", "resume") if n == 8 else ("succeeded", None)
            conn.execute(
                """INSERT INTO atlasd.runs (id, policy, gear, state, trigger, window_lo, window_hi, started_at,
                                            finished_at, output_dir, spec, model_version, follow_up)
                   VALUES (%s, 'p', 'fast', %s, 'batch', 0, 1, now() - make_interval(days => %s, hours => 1),
                           now() - make_interval(days => %s), %s, %s, %s, %s)""",
                [n, state_, 30 - n, 30 - n, str(folder), spec, str(n) if state_ == "succeeded" else None, follow])
            if state_ == "succeeded":
                conn.execute("""INSERT INTO atlasd.registrations (run_id, state, spec_path, result_path)
                                VALUES (%s, %s, 's', 'r')""", [n, "failed" if n == 10 else "done"])
        conn.execute("""INSERT INTO atlasd.runs (id, policy, gear, state, trigger, window_lo, window_hi, parent_run_id)
                        VALUES (31, 'p', 'fast', 'queued', 'resume', 0, 1, 8)""")  # run 8's resume, queued
        elsewhere = tmp_path / "elsewhere"
        fake_run_folder(elsewhere)
        conn.execute("""INSERT INTO atlasd.runs (id, policy, gear, state, trigger, window_lo, window_hi, started_at,
                                                 finished_at, output_dir)
                        VALUES (32, 'p', 'fast', 'failed', 'batch', 0, 1, now() - interval '90 days',
                                now() - interval '90 days', %s)""", [str(elsewhere)])
        conn.execute("SELECT setval('atlasd.runs_id_seq', 40)")
        conn.execute("""INSERT INTO atlasd.promotions (policy, registered_model, from_version, to_version, action, actor)
                        VALUES ('p', %s, NULL, '7', 'promote', 'atlasd'), ('p', %s, '7', '12', 'promote', 'atlasd')""",
                     [MODEL, MODEL])
    fake_run_folder(runs / "run-99")  # no row uses it
    cache = state / "registry-cache" / MODEL
    for version in ("2", "7", "12"):
        (cache / version).mkdir(parents=True)
        (cache / version / "model.safetensors").write_bytes(b"w" * 700)
    for partial, age_s in ((".5.123", 2 * 86400), (".6.999", 60)):
        (cache / partial).mkdir()
        os.utime(cache / partial, (time.time() - age_s, time.time() - age_s))
    return state


def test_gc_keeps_what_the_policy_says_and_dry_run_lists_the_same(history: Path, capsys) -> None:
    runs, cache = history / "runs", history / "registry-cache" / MODEL
    before = sorted(p.name for p in runs.iterdir())
    assert main(["gc", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in runs.iterdir()) == before  # a dry run removes nothing
    assert not (history / "gc.json").exists()

    live = {5: "its retry/resume is not decided yet", 8: "run 31 is queued", 10: "registration is failed"}
    kept = {7: "previous champion", 12: "champion of atlasd-p", **{n: "" for n in range(26, 31)}}
    removed_folders = {f"run-{n}" for n in range(1, 31) if n not in live and n not in kept} | {"run-99"}
    expected = ({(str(runs / name), "run folder") for name in removed_folders}
                | {(str(runs / f"run-{n}" / "checkpoints"), "periodic checkpoints") for n in kept}
                | {(str(cache / "2"), "cached model"), (str(cache / ".5.123"), "partial download")})
    assert {(r["path"], r["what"]) for r in planned["removals"]} == expected
    for n, why in {**live, 7: "previous champion", 12: "champion", 28: "last 3 versions", 26: "4.5 days"}.items():
        assert why in planned["kept"][str(runs / f"run-{n}")], (n, planned["kept"][str(runs / f"run-{n}")])
    assert planned["kept"][str(cache / "12")] == "champion of atlasd-p"
    assert planned["freed_bytes"] == sum(r["bytes"] for r in planned["removals"]) > 0

    assert main(["gc"]) == 0
    out = capsys.readouterr().out
    assert f"removed {len(expected)} item(s)" in out
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"run-{n}" for n in (*live, *kept))
    for n in live:  # untouched, periodic checkpoints included
        assert (runs / f"run-{n}" / "checkpoints" / "step-10" / "blob").is_file()
    for n in kept:
        assert (runs / f"run-{n}" / "final" / "blob").is_file() and not (runs / f"run-{n}" / "checkpoints").exists()
    assert sorted(p.name for p in cache.iterdir()) == [".6.999", "12", "7"]
    assert (history.parent / "elsewhere" / "final" / "blob").is_file()  # outside STATE_DIR/runs: never touched

    last = json.loads((history / "gc.json").read_text())
    assert last["freed_bytes"] == planned["freed_bytes"] and last["usage_bytes"]["periodic_checkpoints"] == 3 * 5000
    assert main(["status", "--json"]) == 0
    disk = json.loads(capsys.readouterr().out)["disk"]
    assert disk["freed_bytes"] == planned["freed_bytes"] and disk["usage_bytes"]["registry_cache"] == 2 * 700
    assert main(["gc", "--dry-run", "--json"]) == 0  # nothing left to do
    assert json.loads(capsys.readouterr().out)["removals"] == []


async def test_the_daemon_component_applies_the_policy_on_its_interval(history: Path, monkeypatch) -> None:
    import asyncio
    from types import SimpleNamespace

    from atlasd.retention import GcComponent
    from atlasd.settings import load_settings

    monkeypatch.setenv("ATLASD_GC_INTERVAL_S", "0.2")
    daemon = SimpleNamespace(stopping=asyncio.Event(), lock_held=asyncio.Event())
    component = GcComponent(load_settings())
    await component.start(daemon)
    try:
        await asyncio.sleep(1.0)
        assert not (history / "gc.json").exists()  # not while another daemon may hold the lock
        daemon.lock_held.set()
        for _ in range(100):
            if (history / "gc.json").exists():
                break
            await asyncio.sleep(0.05)
        assert not (history / "runs" / "run-1").exists() and (history / "runs" / "run-12" / "final").is_dir()
    finally:
        daemon.stopping.set()
        await component.stop()


def test_purge_removes_revoked_sessions_text_except_where_a_run_still_needs_it(history: Path, db_url: str,
                                                                               capsys) -> None:
    runs = history / "runs"
    lines = "".join(json.dumps({"session_id": sid, "prompt": [{"role": "system", "content": f"Task {sid}"}]}) + "\n"
                    for sid in (1, 2, 3))
    for n in (8, 27):  # run 8: its resume is queued (live); run 27: finished
        (runs / f"run-{n}" / "data" / "train.jsonl").write_text(lines)
        (runs / f"run-{n}" / "eval").mkdir(exist_ok=True)
        (runs / f"run-{n}" / "eval" / "final_samples.jsonl").write_text(lines)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("""INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at, revoked_at)
                        VALUES (1, 'k', 0.9, now(), NULL), (2, 'k', 0.9, now(), now()), (3, 'k', 0.9, now(), NULL)""")
    assert main(["purge", "--revoked", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert sorted((p["path"], p["lines"]) for p in planned["purged"]) == [
        (str(runs / "run-27" / "data" / "train.jsonl"), 1), (str(runs / "run-27" / "eval" / "final_samples.jsonl"), 1)]
    assert planned["waiting"] == {str(runs / "run-8"): 2}
    assert (runs / "run-27" / "data" / "train.jsonl").read_text() == lines  # a dry run changes nothing

    assert main(["purge", "--revoked"]) == 0
    assert "removed 2 line(s) in 2 file(s)" in capsys.readouterr().out
    for name in ("data/train.jsonl", "eval/final_samples.jsonl"):
        assert [json.loads(x)["session_id"] for x in (runs / "run-27" / name).read_text().splitlines()] == [1, 3]
        assert (runs / "run-8" / name).read_text() == lines  # live: purged once its resume is done
    assert oct((runs / "run-27" / "data" / "train.jsonl").stat().st_mode & 0o777) == "0o600"
    with psycopg.connect(db_url, autocommit=True) as conn:  # the resume ran: the next gc purges run 8 too
        conn.execute("""UPDATE atlasd.runs SET state = 'succeeded', started_at = now(), finished_at = now(),
                               output_dir = %s WHERE id = 31""", [str(runs / "run-8")])  # resumed in run 8's folder
    assert main(["gc", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {p["path"] for p in report["purged"]} == {str(runs / "run-8" / "data" / "train.jsonl"),
                                                     str(runs / "run-8" / "eval" / "final_samples.jsonl")}
