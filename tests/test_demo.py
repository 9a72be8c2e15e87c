"""`atlasd demo --fast`: the whole loop (throw-away cluster, SDK-shaped traffic, the real daemon,
trainer and registry children) and its chain of facts; and Ctrl-C leaving nothing running.

The demo's own embedded cluster is gone when it exits, so the facts come from the summary.json it
writes while the database is up, checked against the daemon's JSON log. The fast models are cached
next to pytest's temp folders (built by the demo's child the first time, a few minutes, then reused).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlasd.testing.daemon import ROOT, wait_until


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp().parent / "atlasd-demo-models"


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLASD_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def demo_argv(state_dir: Path, models_dir: Path) -> list[str]:
    return [sys.executable, "-m", "atlasd", "demo", "--fast", "--state-dir", str(state_dir), "--models-dir", str(models_dir)]


def log_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def processes_using(*needles: str) -> list[str]:
    """Live processes whose command line or working folder mentions one of ``needles``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if int(pid) != os.getpid() and any(n in cmd or cwd.startswith(n) for n in needles):
            found.append(f"{pid} cwd={cwd} {cmd[:200]}")
    return found


def test_demo_fast_chain_of_facts(tmp_path, models_dir):
    state = tmp_path / "demo"
    proc = subprocess.run(demo_argv(state, models_dir), cwd=ROOT, env=demo_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    facts = json.loads((state / "summary.json").read_text())
    events = log_events(state / "daemon.log")

    # the demo process never loaded the heavy libraries: training and MLflow ran in children
    assert facts["heavy_modules_in_demo_process"] == []

    # traces recorded: every approved session once, the malformed ones counted as such
    approved = sum(b["approved"] for b in facts["batches"])
    malformed = sum(b["malformed"] for b in facts["batches"])
    assert malformed > 0 and sum(b["rejected"] for b in facts["batches"]) > 0
    assert facts["intake"] == {"total": approved, "malformed": malformed}
    assert facts["status"]["intake"]["total"] == approved and facts["status"]["intake"]["malformed"] == malformed
    assert any(e.get("event") == "malformed sessions recorded" for e in events)

    runs = {r["id"]: r for r in facts["runs"]}
    # each run trained on exactly the traces that fired it (the gear's count leaves the eval split out)
    assert all(r["window_sessions"] == r["n_traces"] > 0 for r in facts["runs"]), facts["runs"]
    assert [(r["gear"], r["trigger"], r["state"]) for r in facts["runs"]] == [
        ("fast", "batch", "succeeded"), ("fast", "batch", "succeeded"), ("quality", "manual", "succeeded")]

    # the batch runs were queued by the cadence right after an intake the NOTIFY hinted (poll off: 3600 s)
    for run_id in (1, 2):
        queued = [i for i, e in enumerate(events) if e.get("event") == "run queued" and e.get("run_id") == run_id]
        assert len(queued) == 1, f"run {run_id} queued {len(queued)} times"
        before = [e for e in events[: queued[0]] if e.get("event") == "intake"]
        assert before and before[-1]["full"] is False and before[-1]["hinted"] > 0, before[-1:]
        assert events[queued[0]]["trigger"] == "batch"
        assert facts["notify"][str(run_id)]["run_queued"]["run_id"] == run_id
    assert "triggered by NOTIFY" in out

    # every run succeeded, was registered as its own version, and the gate decided once per run
    assert sorted(r["model_version"] for r in runs.values()) == ["1", "2", "3"]
    assert all(r["registration"] == "done" and r["success_after"] is not None for r in runs.values())
    for r in runs.values():
        promo = r["promotion"]
        assert promo is not None and promo["to_version"] == r["model_version"]
        assert promo["action"] == r["decision"]
        met = all(c["met"] for c in promo["checks"])
        assert (promo["action"] == "promote") == met, promo  # the alias moves exactly when every check is met

    # run 1 starts from the base student and is promoted (fast mode: min_success_delta 0, no champion yet)
    assert runs[1]["champion_version"] is None and runs[1]["student"] == runs[1]["base_student"] == facts["student"]
    assert runs[1]["promotion"]["action"] == "promote"
    # run 2 starts from the champion's checkpoint, not the base student
    champion_then = runs[1]["model_version"]
    assert runs[2]["champion_version"] == champion_then
    assert runs[2]["student"] != runs[2]["base_student"]
    assert Path(runs[2]["student"]).is_relative_to(state)  # fetched from the demo's MLflow store
    started = {e["run_id"]: e for e in events if e.get("event") == "run started"}
    assert started[2]["champion_version"] == champion_then and started[2]["student"] == runs[2]["student"]

    # MLflow's alias agrees with the audit table: the champion is the last promoted version
    promoted = [p["to_version"] for p in facts["promotions"] if p["action"] == "promote"]
    (model,) = facts["models"]["models"]
    assert model["aliases"]["champion"] == promoted[-1]
    assert facts["status"]["champion"]["demo"]["version"] == promoted[-1]
    decisions = {v["version"]: v["decision"] for v in model["versions"]}
    assert decisions == {r["model_version"]: r["decision"] for r in runs.values()}

    # the daemon stopped cleanly; nothing of the demo is left running
    assert facts["daemon_exit"] == 0
    assert any(e.get("event") == "stopped" for e in events)
    pg_root = re.search(r"postgres: cluster in (\S+)", out).group(1)
    assert not Path(pg_root).exists()
    assert processes_using(str(state), pg_root) == []
    assert "mlflow ui --backend-store-uri sqlite:///" in out


def test_demo_ctrl_c_leaves_nothing_running(tmp_path, models_dir):
    state = tmp_path / "demo"
    proc = subprocess.Popen(demo_argv(state, models_dir), cwd=ROOT, env=demo_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        def training() -> bool:
            line = proc.stdout.readline()
            lines.append(line)
            assert line or proc.poll() is None, "".join(lines)
            return "run 1 started" in line

        wait_until(training, 420, "run 1 to start training", interval=0)
        out = "".join(lines)
        pg_root = re.search(r"postgres: cluster in (\S+)", out).group(1)
        daemon_pid = int(re.search(r"daemon: ready \(pid (\d+)", out).group(1))
        trainers = processes_using(str(state / "runs"))
        assert trainers, "no trainer process running in the run folder"

        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends (the children have their own sessions)
        rest, _ = proc.communicate(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out += rest
    assert proc.returncode == 130, out[-3000:]
    assert elapsed < 60, f"the demo took {elapsed:.0f}s to stop"
    assert "stopping the daemon" in rest and "stopping the throw-away postgres" in rest
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)
    assert processes_using(str(state), pg_root) == []
    assert not Path(pg_root).exists()
    events = log_events(state / "daemon.log")
    assert any(e.get("event") == "stop requested" and e.get("signal") == "SIGTERM" for e in events)
    assert any(e.get("event") == "stopping the trainer" and e.get("run_id") == 1 for e in events)  # SIGTERM forwarded
    assert any(e.get("event") == "stopped" for e in events)


def test_the_demo_never_empties_a_database_whose_atlasd_schema_it_did_not_create(db_url: str) -> None:
    """No sessions yet, but atlasd's history (a fresh production database after `atlasd db migrate`)."""
    import psycopg

    from atlasd.demo.run import DemoError, reset_database

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO atlasd.pauses (policy, reason) VALUES ('p', 'kept')")
    with pytest.raises(DemoError, match="atlasd schema the demo did not create"):
        reset_database(db_url)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT reason FROM atlasd.pauses").fetchall() == [("kept",)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA atlasd CASCADE")
    reset_database(db_url)  # nothing of atlasd's: the demo sets up its own, marked
    reset_database(db_url)  # and starts over on it next time
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM atlasd.pauses").fetchone() == (0,)
