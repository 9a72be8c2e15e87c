"""Poison inputs against the real daemon (`python -m atlasd run`, a child process): policy files
that are binary, alias bombs or overflow, and sessions whose reward no float can hold. The daemon
starts anyway, runs the valid policy, records the poison sessions once as malformed, and names
every bad file in its log and in `atlasd status`."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import yaml

from atlasd.cli import main
from atlasd.testing.daemon import DaemonProcess, wait_until
from atlasd.testing.pg import sql
from tests.test_intake import TOO_SMALL
from tests.test_policies import billion_laughs
from tests.cadence_support import NO_SPLIT

GOOD = {"teacher": "t", "student": "s", "gears": {"fast": {"trigger": {"batch": {"every": 1000}}, "eval": NO_SPLIT}}}
POISON_FILES = {
    "nul.yaml": b"teacher: t\nstudent: s\x00\ngears: {}\n",
    "bomb.yaml": billion_laughs().encode(),
    "cycle.yaml": b"teacher: &t [*t]\nstudent: s\ngears: {}\n",
    "forever.yaml": yaml.safe_dump({**GOOD, "catchup_window": float("inf")}).encode(),
}
# reward_stats the SDK may write -> the reason intake records
POISON_SESSIONS = {
    '{"score": 1e-400}': TOO_SMALL,
    '{"score": 1e400}': "reward_stats.score is outside [0, 1]",
    '{"score": "NaN"}': "reward_stats.score is missing or not a JSON number",
}


def approve(db_url: str, reward_stats: str) -> int:
    return sql(db_url, """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                          VALUES ('t', 'succeeded', 'approved', '{"learning_key": "k"}', %s::jsonb) RETURNING id""",
               [reward_stats])[0][0]


def test_poison_policy_files_and_sessions_never_stop_the_daemon(db_url: str, tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "good.yaml").write_text(yaml.safe_dump(GOOD))
    for name, content in POISON_FILES.items():
        (folder / name).write_bytes(content)
    sql(db_url, "DROP INDEX sessions_reward_score_idx")  # the stand-in's float8 index refuses 1e-400; the SDK has none
    with DaemonProcess(db_url, tmp_path / "state", ATLASD_POLICIES_DIR=str(folder)) as daemon:
        daemon.wait_for("ready", timeout=60)
        loaded = daemon.wait_for("policies loaded", component="cadence")
        assert loaded["policies"] == ["good"]
        assert sorted(loaded["failed_files"]) == sorted(str(folder / name) for name in POISON_FILES)
        reasons = {Path(e["file"]).name: e["reason"] for e in daemon.find("invalid policy file", component="cadence")}
        assert reasons["nul.yaml"] == "not a text file: unprintable character U+0000"
        assert reasons["bomb.yaml"].startswith("the YAML expands to over 10000 values")
        assert reasons["cycle.yaml"] == "invalid YAML: an alias refers to a node that contains it"
        assert reasons["forever.yaml"] == "a duration is at most 3650 days"

        # poison sessions among good ones: every one recorded, the poison ones malformed with a reason
        good, bad = [], {}
        for reward_stats, reason in POISON_SESSIONS.items():
            good.append(approve(db_url, '{"score": 0.9}'))
            bad[approve(db_url, reward_stats)] = reason
        good.append(approve(db_url, '{"score": 0.9}'))
        wait_until(lambda: sql(db_url, "SELECT count(*) FROM atlasd.intake")[0][0] == len(good) + len(bad), 30,
                   "every session recorded")
        assert dict(sql(db_url, "SELECT session_id, malformed FROM atlasd.intake")) == {
            **{sid: None for sid in good}, **bad}

        # a bomb dropped in later and a reload (SIGHUP): logged, the daemon carries on
        (folder / "later.yaml").write_text(billion_laughs(30))
        daemon.proc.send_signal(signal.SIGHUP)
        again = daemon.wait_for("policies loaded", count=2, component="cadence")
        assert again["policies"] == ["good"] and str(folder / "later.yaml") in again["failed_files"]

        monkeypatch.setenv("ATLASD_DB_URL", db_url)
        monkeypatch.setenv("ATLASD_POLICIES_DIR", str(folder))
        assert main(["status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["intake"]["malformed_reasons"] == {reason: 1 for reason in POISON_SESSIONS.values()}
        assert status["policies"]["good"]["fast"]["pending"] == len(good)
        named = " ".join(status["policy_errors"])
        assert all(str(folder / name) in named for name in [*POISON_FILES, "later.yaml"])
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
