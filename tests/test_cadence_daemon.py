"""The cadence inside the real daemon (`python -m atlasd run`, a child process): approved sessions
become a queued run; `atlasd reload` (SIGHUP) with one valid and one broken file; a cron tick
missed while the daemon was down is caught up at start, an older one skipped and reported."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from atlasd.cli import main
from atlasd.testing.daemon import DaemonProcess, wait_until
from atlasd.testing.pg import sql
from tests.test_policies import write_malformed_cases
from tests.cadence_support import NO_SPLIT


def approve(db_url: str, n: int, reward: float = 0.9) -> None:
    """Sessions as the SDK writes them, already approved and finished."""
    sql(
        db_url,
        """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
           SELECT 't', 'succeeded', 'approved', '{"learning_key": "k"}', jsonb_build_object('score', %s::float)
             FROM generate_series(1, %s)""",
        [reward, n],
    )


def batch_runs(db_url: str, policy: str) -> list[tuple]:
    return sql(db_url, "SELECT window_lo, window_hi FROM atlasd.runs WHERE policy = %s AND trigger = 'batch' ORDER BY id",
               [policy])


def write(folder: Path, name: str, data: dict | str) -> None:
    (folder / name).write_text(data if isinstance(data, str) else yaml.safe_dump(data))


def policy(every: int) -> dict:
    return {"teacher": "t", "student": "s", "gears": {"fast": {"trigger": {"batch": {"every": every}}, "eval": NO_SPLIT}}}


def test_daemon_queues_runs_and_reloads_on_sighup(db_url: str, tmp_path: Path, monkeypatch) -> None:
    write(tmp_path, "p.yaml", policy(5))
    write(tmp_path, "broken.yaml", {**policy(5), "gears": {"hq": {"trigger": {"cron": {"expr": "0 3 * * 0"}}}}})
    malformed = write_malformed_cases(tmp_path)  # the 100 malformed files of test_policies, side by side
    monkeypatch.setenv("ATLASD_DB_URL", db_url)
    monkeypatch.setenv("ATLASD_POLICIES_DIR", str(tmp_path))
    with DaemonProcess(db_url, tmp_path / "state", ATLASD_POLICIES_DIR=str(tmp_path)) as daemon:
        daemon.wait_for("ready")
        daemon.wait_for("invalid policy file", component="cadence")
        invalid = daemon.find("invalid policy file", component="cadence")
        [broken] = [e for e in invalid if e["file"] == str(tmp_path / "broken.yaml")]
        assert (broken["line"], broken["field"]) == (4, "gears.hq.trigger.cron") and "ambiguous" in broken["reason"]
        reported = {e["file"] for e in invalid}
        assert reported == {str(tmp_path / "broken.yaml")} | {str(f) for f in malformed}
        assert daemon.find("policies loaded", component="cadence")[0]["policies"] == ["p"]

        approve(db_url, 4)
        approve(db_url, 1, reward=0.1)  # below min_reward: does not count
        approve(db_url, 1)
        wait_until(lambda: batch_runs(db_url, "p"), 30, "a batch run of policy p")
        assert batch_runs(db_url, "p") == [(0, 6)]  # five passing traces; the window ends at the fifth

        # one valid new file, one valid file broken by an edit: `atlasd reload` sends SIGHUP
        write(tmp_path, "p.yaml", policy(-1))
        write(tmp_path, "q.yaml", policy(2))
        assert main(["reload"]) == 1  # sent; exit 1 because p.yaml is now broken
        loaded = daemon.wait_for("policies loaded", count=2, component="cadence")
        assert (loaded["added"], loaded["kept_previous"], loaded["policies"]) == (["q"], ["p"], ["p", "q"])
        assert str(tmp_path / "p.yaml") in loaded["failed_files"] and len(loaded["failed_files"]) == len(malformed) + 2
        wait_until(lambda: batch_runs(db_url, "q"), 30, "policy q's first run (the reload evaluates it)")

        approve(db_url, 5)  # p still runs its previous version (every 5)
        wait_until(lambda: batch_runs(db_url, "p")[-1][1] == 11 or None, 30, "p's second batch")
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0


def test_daemon_catches_up_a_missed_cron_tick_and_reports_an_old_one(db_url: str, tmp_path: Path) -> None:
    cron = {"trigger": {"cron": {"expr": "0 0 * * *", "timezone": "UTC"}},
            "optim": {"max_steps": None, "num_train_epochs": 5}}
    write(tmp_path, "nightly.yaml", {"teacher": "t", "student": "s", "gears": {"hq": cron}})
    write(tmp_path, "strict.yaml", {"teacher": "t", "student": "s", "catchup_window": "1m", "gears": {"hq": cron}})
    # both gears last fired three midnights ago; the daemon was down since
    last = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    for name in ("nightly", "strict"):
        sql(db_url, """INSERT INTO atlasd.policy_state (policy, gear, armed_at, cron_schedule, last_fire_at)
                       VALUES (%s, 'hq', %s, '0 0 * * * @ UTC', %s)""", [name, last - timedelta(days=1), last])
    approve(db_url, 2)
    with DaemonProcess(db_url, tmp_path / "state", ATLASD_POLICIES_DIR=str(tmp_path), ATLASD_CATCHUP_WINDOW_S=str(2 * 86400)) as daemon:
        daemon.wait_for("ready")
        skipped = daemon.wait_for("cron tick skipped", component="cadence")
        assert skipped["policy"] == "strict" and "older than the catch-up window" in skipped["reason"]
        rows = sql(db_url, "SELECT policy, trigger, scheduled_for, n_traces FROM atlasd.runs ORDER BY id")
        today = last + timedelta(days=3)
        assert [r for r in rows if r[1] in ("catch-up", "cron")] == [("nightly", "catch-up", today, 2)]
        assert sql(db_url, "SELECT skipped_fire_at FROM atlasd.policy_state WHERE policy = 'strict'") == [(today,)]
        assert daemon.stop(60) == 0  # the runner has started the catch-up run: its children stop first
