"""The daemon as a systemd service: the real daemon (`python -m atlasd run`, a child process) with a
NOTIFY_SOCKET bound by the test (READY, WATCHDOG, RELOADING, STOPPING, STATUS datagrams), its
database connections through a TCP proxy the test can cut or refuse per application_name, and
the Prometheus endpoint compared with `atlasd status --json`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from atlasd.settings import SettingsError, load_settings
from atlasd.testing.daemon import ROOT, DaemonProcess, wait_until
from atlasd.testing.pg import sql
from tests.cadence_support import NO_SPLIT


# ---------------------------------------------------------------- the systemd side of sd_notify
class NotifySocket:
    """A datagram socket standing in for systemd's: every message, with the time it arrived."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="atn", dir="/tmp")  # AF_UNIX paths are limited to ~107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def having(self, key: str, after: float = 0.0, before: float = float("inf")) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in list(self.messages) if key in m and after <= t <= before]

    def wait_for(self, key: str, after: float = 0.0, timeout: float = 30) -> tuple[float, dict]:
        return wait_until(lambda: (self.having(key, after) or [None])[0], timeout, f"sd_notify {key}")

    def close(self) -> None:
        self._open = False
        self.sock.close()
        self._thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


# ---------------------------------------------------------------- a TCP proxy in front of Postgres
class PgProxy:
    """Forwards TCP to the test server. ``refuse(app)`` closes new connections whose startup
    message carries that application_name (None: every connection); ``cut(app)`` closes the live
    ones. The daemon's URL gets sslmode/gssencmode=disable so the startup message is readable."""

    def __init__(self, db_url: str) -> None:
        parts = urlsplit(db_url)
        self.upstream = (parts.hostname, parts.port or 5432)
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
        self.url = urlunsplit(parts._replace(netloc=netloc, query="sslmode=disable&gssencmode=disable"))
        self.refused: set[str | None] = set()
        self.live: list[tuple[str, socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def refuse(self, app: str | None) -> None:
        self.refused.add(app)

    def allow(self, app: str | None) -> None:
        self.refused.discard(app)

    def cut(self, app: str | None) -> int:
        with self.lock:
            hit = [c for c in self.live if app is None or c[0] == app]
        for _, a, b in hit:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        return len(hit)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first = client.recv(65536)  # the StartupMessage (no SSL/GSS request: disabled in the URL)
        app = ""
        if b"application_name\x00" in first:
            app = first.split(b"application_name\x00", 1)[1].split(b"\x00", 1)[0].decode()
        if None in self.refused or app in self.refused:
            client.close()
            return
        upstream = socket.create_connection(self.upstream)
        upstream.sendall(first)
        entry = (app, client, upstream)
        with self.lock:
            self.live.append(entry)
        pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        pump.start()
        self._pump(client, upstream)
        pump.join()
        with self.lock:
            self.live.remove(entry)
        client.close()
        upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.cut(None)


def policy_file(folder: Path, every: int = 1000) -> None:
    """Policy p: a batch gear that never fires in these tests, and a weekly cron gear."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "p.yaml").write_text(yaml.safe_dump({
        "teacher": "t", "student": "s",
        "gears": {"fast": {"trigger": {"batch": {"every": every}}, "eval": NO_SPLIT},
                  "hq": {"trigger": {"cron": {"expr": "0 3 * * sun"}}, "eval": NO_SPLIT}},
    }))


def approve(db_url: str, n: int, key: str = "k", metadata: str | None = None) -> None:
    sql(db_url,
        """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
           SELECT 't', 'succeeded', 'approved', COALESCE(%s::jsonb, jsonb_build_object('learning_key', %s::text)),
                  '{"score": 0.9}' FROM generate_series(1, %s)""",
        [metadata, key, n])


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---------------------------------------------------------------- sd_notify
def test_ready_waits_for_the_listener_and_the_watchdog_rides_out_reconnects(
    db_url: str, tmp_path: Path, notify: NotifySocket
) -> None:
    proxy = PgProxy(db_url)
    proxy.refuse("atlasd-listener")  # the listener's first attempts fail; everything else connects
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000", "ATLASD_RECONNECT_MAX_BACKOFF_S": "1"}
    try:
        with DaemonProcess(proxy.url, tmp_path, **env) as daemon:
            daemon.wait_for("listener connection lost", component="listener")
            # lock held, first reconcile done, every component started: all but the listener is up
            daemon.wait_for("metrics endpoint", component="metrics")
            time.sleep(1.5)
            assert notify.having("READY") == [] and daemon.find("ready") == []
            assert notify.having("WATCHDOG")  # a listener retrying (each attempt bounded) is not stuck
            assert sql(db_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND application_name = 'atlasd-listener'") == [(0,)]

            proxy.allow("atlasd-listener")
            t_ready, ready = notify.wait_for("READY", timeout=15)
            assert ready["READY"] == "1"
            assert daemon.wait_for("ready")["listener_connected"] is True
            assert sql(db_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND application_name = 'atlasd-listener'") == [(1,)]

            # WATCHDOG_USEC = 2 s: a ping every second (half), from the heartbeat loop
            time.sleep(4.5)
            pings = notify.having("WATCHDOG", after=t_ready + 0.25, before=t_ready + 4.25)
            assert 2 <= len(pings) <= 6, [round(t - t_ready, 2) for t, _ in pings]

            # the listener's connection dies and cannot come back for a while: the pings go on,
            # STATUS= says what is degraded
            losses = len(daemon.find("listener connection lost"))
            proxy.refuse("atlasd-listener")
            assert proxy.cut("atlasd-listener") == 1
            lost = daemon.wait_for("listener connection lost", count=losses + 1)
            wait_until(lambda: any(m["STATUS"].startswith("degraded: listener reconnecting")
                                   for _, m in notify.having("STATUS", after=lost["_t"])), 10, "STATUS=degraded: listener")
            wait_until(lambda: len(notify.having("WATCHDOG", after=lost["_t"])) >= 3, 10, "pings (one a second)")
            assert daemon.proc.poll() is None

            listening = len(daemon.find("listening", component="listener"))
            proxy.allow("atlasd-listener")
            back = daemon.wait_for("listening", count=listening + 1, component="listener", timeout=15)
            wait_until(lambda: any(not m["STATUS"].startswith("degraded")
                                   for _, m in notify.having("STATUS", after=back["_t"])), 10, "STATUS= not degraded")

            # the network to the database goes away (every connection cut, new ones refused): the
            # lock connection's heartbeat fails, the daemon keeps pinging while it re-takes the lock
            proxy.refuse(None)
            proxy.cut(None)
            cut = daemon.wait_for("lock connection lost; re-taking the lock", component="daemon", timeout=30)
            wait_until(lambda: any("lock re-taking the lock" in m["STATUS"]
                                   for _, m in notify.having("STATUS", after=cut["_t"])), 10, "STATUS=degraded: lock")
            wait_until(lambda: len(notify.having("WATCHDOG", after=cut["_t"])) >= 3, 10, "pings (one a second)")
            assert daemon.proc.poll() is None

            # ... and comes back: the same daemon holds the lock again, healthy
            proxy.allow(None)
            daemon.wait_for("lock re-taken", component="daemon", timeout=30)
            daemon.wait_for("listening", count=listening + 2, component="listener", timeout=30)
            assert sql(db_url, "SELECT pid FROM atlasd.daemon_state") == [(daemon.pid,)]
            assert daemon.stop() == 0
    finally:
        proxy.close()


def test_reload_stop_and_the_status_line(db_url: str, tmp_path: Path, notify: NotifySocket) -> None:
    policy_file(tmp_path / "policies")
    approve(db_url, 3)
    with DaemonProcess(db_url, tmp_path, NOTIFY_SOCKET=notify.path) as daemon:
        t_ready, _ = notify.wait_for("READY")
        # STATUS= summary: nothing running, pending traces per gear (batch: of its threshold)
        _, status = notify.wait_for("STATUS", after=t_ready + 0.01)
        assert status["STATUS"] == "idle; pending p/fast 3/1000, p/hq 3", status

        approve(db_url, 2)
        sql(db_url, """INSERT INTO atlasd.runs (policy, gear, state, trigger, window_lo, window_hi, started_at, metrics)
                       VALUES ('p', 'fast', 'running', 'manual', 0, 5, now(), '{"step": 7, "total_steps": 20}')""")
        sql(db_url, """INSERT INTO atlasd.promotions (policy, registered_model, to_version, action, actor)
                       VALUES ('p', 'atlasd-p', '4', 'promote', 'atlasd')""")
        expected = "run {} p/fast step 7/20; pending p/fast 5/1000, p/hq 5; champion p v4".format(
            sql(db_url, "SELECT id FROM atlasd.runs WHERE state = 'running'")[0][0])
        wait_until(lambda: any(m["STATUS"] == expected for _, m in notify.having("STATUS")), 15,
                   f"STATUS={expected}")

        # SIGHUP: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, same clock for both), then READY=1
        before = monotonic_usec()
        t_hup = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        t_reloading, reloading = notify.wait_for("RELOADING", after=t_hup)
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        t_ready2, _ = notify.wait_for("READY", after=t_reloading)
        assert t_ready2 >= t_reloading
        daemon.wait_for("policies loaded", count=2, component="cadence")

        # SIGTERM: STOPPING=1, a clean exit
        t_term = time.monotonic()
        assert daemon.stop() == 0
        t_stopping, stopping = notify.wait_for("STOPPING", after=t_term, timeout=5)
        assert stopping["STOPPING"] == "1"
        assert notify.having("READY", after=t_stopping) == []


# ---------------------------------------------------------------- the metrics endpoint
def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_fresh(port: int, since: float, timeout: float = 15) -> dict[tuple[str, frozenset], float]:
    """A scrape whose cached values were read from the database after ``since`` (time.time())."""
    def fresh():
        metrics = scrape(port)
        return metrics if metrics.get(("atlasd_metrics_refreshed_timestamp_seconds", frozenset()), 0) >= since else None
    return wait_until(fresh, timeout, "a metrics refresh", interval=0.2)


def cli_status(db_url: str, policies: Path) -> dict:
    env = {**os.environ, "ATLASD_DB_URL": db_url, "ATLASD_POLICIES_DIR": str(policies), "ATLASD_LOG_FORMAT": "json"}
    out = subprocess.run([sys.executable, "-m", "atlasd", "status", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_metrics_endpoint_serves_the_documented_series_matching_atlasd_status(db_url: str, tmp_path: Path) -> None:
    policy_file(tmp_path / "policies")
    approve(db_url, 5, key="math")
    approve(db_url, 2, key="code")
    approve(db_url, 2, metadata='{"agent": "x"}')  # no learning_key: malformed
    # finished runs with nothing left to do: the succeeded one registered, the failed one not retried
    sql(db_url, """INSERT INTO atlasd.runs (policy, gear, state, trigger, window_lo, window_hi, started_at, finished_at,
                                            follow_up)
                   VALUES ('p', 'fast', 'succeeded', 'manual', 0, 3, now() - interval '2 hours', now() - interval '1 hour',
                           NULL),
                          ('p', 'hq', 'failed', 'cron', 0, 3, now() - interval '3 hours', now() - interval '150 minutes',
                           'none')""")
    sql(db_url, """INSERT INTO atlasd.registrations (run_id, state, spec_path, result_path, model_version, decision)
                   SELECT id, 'done', 'spec.json', 'result.json', '1', 'promote' FROM atlasd.runs WHERE state = 'succeeded'""")
    sql(db_url, """INSERT INTO atlasd.promotions (policy, registered_model, from_version, to_version, action, actor)
                   VALUES ('p', 'atlasd-p', NULL, '1', 'promote', 'atlasd'), ('p', 'atlasd-p', '1', '2', 'reject', 'atlasd'),
                          ('p', 'atlasd-p', '1', '3', 'promote', 'atlasd')""")
    with DaemonProcess(db_url, tmp_path, ATLASD_METRICS_REFRESH_S="0.5") as daemon:
        port = daemon.wait_for("metrics endpoint", component="metrics")["port"]
        daemon.wait_for("ready")
        sql(db_url, """INSERT INTO atlasd.runs (policy, gear, state, trigger, window_lo, window_hi, started_at, metrics)
                       VALUES ('p', 'fast', 'running', 'batch', 3, 9, now(), '{"step": 12, "total_steps": 40, "loss": 1.25}')""")
        sql(db_url, "UPDATE sessions SET review_status = 'quarantined' WHERE id = (SELECT min(id) FROM sessions)")
        wait_until(lambda: sql(db_url, "SELECT count(*), count(revoked_at) FROM atlasd.intake") == [(9, 1)], 20,
                   "9 sessions recorded, 1 revoked")
        wait_until(lambda: sql(db_url, "SELECT listener_connected FROM atlasd.daemon_state")[0][0], 10, "heartbeat")

        metrics = scrape_fresh(port, time.time())
        status = cli_status(db_url, tmp_path / "policies")

    def value(name: str, **labels: str) -> float:
        return metrics[(name, frozenset(labels.items()))]

    intake, training = status["intake"], status["training"]
    assert (intake["usable"], intake["malformed"], intake["revoked"]) == (7, 2, 1)  # the seeds above
    assert value("atlasd_up") == 1 and value("atlasd_scrape_errors_total") == 0
    assert value("atlasd_daemon_running") == int(status["daemon"]["running"]) == 1
    assert value("atlasd_listener_connected") == int(status["listener"]["connected"]) == 1
    assert value("atlasd_notify_queue_usage_ratio") == status["listener"]["notify_queue_usage"]
    assert status["listener"]["notify_trigger_ok"] and status["problems"] == [] and status["daemon"]["degraded"] == []
    for trigger in status["listener"]["notify_trigger"]:
        assert value("atlasd_notify_trigger_enabled", trigger=trigger) == 1
    assert not any(name == "atlasd_degraded_seconds" for name, _ in metrics)
    assert 0 <= value("atlasd_last_reconcile_age_seconds") < 30
    assert value("atlasd_intake_usable_total") == intake["usable"]
    assert value("atlasd_intake_malformed_total") == intake["malformed"]
    assert value("atlasd_intake_revoked") == intake["revoked"]
    assert value("atlasd_intake_backlog") == intake["backlog"] == 0
    assert intake["by_learning_key"] == {"code": 2, "math": 5}
    for key, n in intake["by_learning_key"].items():
        assert value("atlasd_intake_usable_by_learning_key_total", learning_key=key) == n
    for gear, g in status["policies"]["p"].items():
        assert value("atlasd_pending_traces", policy="p", gear=gear) == g["pending"]
        assert value("atlasd_policy_paused", policy="p", gear=gear) == 0
    assert status["policies"]["p"]["fast"]["pending"] == 6  # usable (7) less the revoked one
    assert value("atlasd_pending_threshold", policy="p", gear="fast") == 1000
    assert ("atlasd_pending_threshold", frozenset({"policy": "p", "gear": "hq"}.items())) not in metrics
    assert status["runs"]["succeeded"] == status["runs"]["failed"] == status["runs"]["running"] == 1
    for state, n in status["runs"].items():
        assert value("atlasd_runs", state=state) == n
    last = training["last_success_at"]["p"]["fast"]
    assert value("atlasd_last_success_timestamp_seconds", policy="p", gear="fast") == datetime.fromisoformat(last).timestamp()
    assert "hq" not in training["last_success_at"]["p"]  # its run failed
    running = training["running"]
    assert (running["step"], running["total_steps"], running["loss"]) == (12, 40, 1.25)
    labels = {"policy": "p", "gear": "fast"}
    assert value("atlasd_training_run_id", **labels) == running["run_id"]
    assert value("atlasd_training_step", **labels) == 12
    assert value("atlasd_training_total_steps", **labels) == 40
    assert value("atlasd_training_loss", **labels) == 1.25
    assert status["promotions"] == {"p": {"promote": 2, "reject": 1}}
    assert value("atlasd_promotions_total", policy="p", action="promote") == 2
    assert value("atlasd_promotions_total", policy="p", action="reject") == 1
    assert status["champion"]["p"]["version"] == "3"
    assert value("atlasd_champion_version", policy="p", registered_model="atlasd-p") == 3
    assert value("process_resident_memory_bytes") > 0


def test_concurrent_scrapes_answer_from_the_cache_on_one_connection(db_url: str, tmp_path: Path) -> None:
    """50 scrapes at once, while an ACCESS EXCLUSIVE lock on sessions holds every reader: each
    answers within 1 s, atlasd holds at most one metrics connection, and a refresh that cannot get
    its lock within 1 s gives up (atlasd_up 0) instead of queueing the SDK behind it."""
    from concurrent.futures import ThreadPoolExecutor

    policy_file(tmp_path / "policies")
    with DaemonProcess(db_url, tmp_path, ATLASD_METRICS_REFRESH_S="0.5") as daemon:
        port = daemon.wait_for("metrics endpoint", component="metrics")["port"]
        daemon.wait_for("ready")
        assert scrape_fresh(port, time.time())[("atlasd_up", frozenset())] == 1

        def timed(_: int) -> float:
            t = time.monotonic()
            scrape(port)
            return time.monotonic() - t

        def metrics_connections() -> int:
            return sql(db_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'atlasd-metrics'")[0][0]

        with psycopg.connect(db_url) as holder:
            holder.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
            with ThreadPoolExecutor(50) as pool:
                seen = [metrics_connections()]
                durations = list(pool.map(timed, range(50)))
                seen.append(metrics_connections())
            down = wait_until(lambda: (m := scrape(port))[("atlasd_up", frozenset())] == 0 and m, 15,
                              "a refresh giving up on the lock")
            holder.rollback()
        assert max(durations) < 1.0, sorted(durations)[-5:]
        assert max(seen) <= 1, seen
        assert down[("atlasd_scrape_errors_total", frozenset())] >= 1
        assert scrape_fresh(port, time.time())[("atlasd_up", frozenset())] == 1  # back once the lock is gone


def test_metrics_addr_setting() -> None:
    assert load_settings(metrics_addr="").metrics_addr == ""
    assert load_settings(metrics_addr=" [::1]:9464 ").metrics_addr == "[::1]:9464"
    with pytest.raises(SettingsError, match="ATLASD_METRICS_ADDR: .*HOST:PORT"):
        load_settings(metrics_addr="9464")
    with pytest.raises(SettingsError, match="ATLASD_METRICS_ADDR"):
        load_settings(metrics_addr="127.0.0.1:99999")


# ---------------------------------------------------------------- the unit file against the daemon's timings
def _seconds(value: str) -> float:
    units = {"min": 60, "s": 1, "h": 3600}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def test_unit_timeouts_fit_the_daemon() -> None:
    from atlasd.lock import HEARTBEAT_S
    from atlasd.settings import Settings
    from tests.test_systemd_units import _unit

    svc = _unit("atlasd.service")["Service"]
    assert svc["NotifyAccess"] == "main"
    # a clean stop: the child's checkpoint save (SIGKILL after child_stop_timeout_s) plus bookkeeping
    assert _seconds(svc["TimeoutStopSec"]) >= Settings.model_fields["child_stop_timeout_s"].default + 60
    # at least two heartbeats (each a WATCHDOG=1 when healthy) fit in the watchdog interval
    assert _seconds(svc["WatchdogSec"]) >= 4 * HEARTBEAT_S
    assert _seconds(svc["TimeoutStartSec"]) >= 60
