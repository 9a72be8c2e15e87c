"""The Prometheus endpoint: ``GET http://ATLASD_METRICS_ADDR/metrics`` (default 127.0.0.1:9464).

A daemon component serves it from prometheus-client's HTTP server thread. Scrapes never touch the
database: they read a cache that one refresher thread fills every ``ATLASD_METRICS_REFRESH_S``
(default 10 s; 4x the read's duration when that is longer, so a long history costs at most a
quarter of the refresher's time) with :func:`atlasd.status.collect_status` (what ``atlasd status --json`` prints) on
ONE persistent connection (``statement_timeout`` 10 s, ``lock_timeout`` 1 s: it never queues the
SDK behind it). However many scrapes arrive at once, atlasd holds at most that one connection for
metrics and each scrape answers from memory. ``atlasd_metrics_refreshed_timestamp_seconds`` says
when the values were read. When the last refresh failed, or the cache is older than 3 refresh
intervals, a scrape answers 200 with ``atlasd_up 0`` and, of the atlasd series, only the refresh
time (when the values were last read);
``atlasd_scrape_errors_total`` counts failed refreshes. The series are listed in the README
("Running as a service").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import socket
import socketserver
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from atlasd.component import Component
from atlasd.db import DatabaseError, connect_kwargs, safe_error
from atlasd.logging import get_logger
from atlasd.queue import STATES
from atlasd.settings import Settings, split_host_port
from atlasd.status import collect_status

SCRAPE_CONNECT_TIMEOUT_S = 5
STALE_AFTER_REFRESHES = 3  # a cache older than this many refresh intervals is reported as atlasd_up 0
REFRESH_OPTIONS = "-c statement_timeout=10000 -c lock_timeout=1000"


def _ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def families(status: dict[str, Any] | None, scrape_errors: int, refreshed_at: float | None = None) -> list[Metric]:
    """The metric families for one ``collect_status`` result (None: the database was unreachable)."""
    up = GaugeMetricFamily("atlasd_up", "1 when the metrics cache holds a recent read of atlasd's state")
    up.add_metric([], 0 if status is None else 1)
    errors = CounterMetricFamily("atlasd_scrape_errors", "Metrics refreshes that could not read the database")
    errors.add_metric([], scrape_errors)
    refreshed = GaugeMetricFamily("atlasd_metrics_refreshed_timestamp_seconds",
                                  "When the cached values were read from the database (unix time)")
    if refreshed_at is not None:
        refreshed.add_metric([], refreshed_at)
    if status is None:
        return [up, errors, refreshed]

    def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    daemon_running = gauge("atlasd_daemon_running", "1 when a daemon holds the lock and its heartbeat is fresh")
    daemon_running.add_metric([], int(bool(status["daemon"]["running"])))
    listener = gauge("atlasd_listener_connected", "1 when the running daemon's NOTIFY listener is connected")
    listener.add_metric([], int(bool(status["listener"]["connected"])))
    queue_usage = gauge("atlasd_notify_queue_usage_ratio", "pg_notification_queue_usage(): fraction of the NOTIFY queue in use")
    queue_usage.add_metric([], status["listener"]["notify_queue_usage"])
    trigger = gauge("atlasd_notify_trigger_enabled",
                    "1 when this NOTIFY trigger on public.sessions exists and is enabled", ["trigger"])
    for name, state in status["listener"]["notify_trigger"].items():
        trigger.add_metric([name], int(state == "enabled"))
    degraded = gauge("atlasd_degraded_seconds", "How long this part of the daemon has been degraded (reconnecting, "
                     "re-taking the lock, retrying), as of its last heartbeat; absent when healthy", ["part"])
    for d in status["daemon"]["degraded"]:
        degraded.add_metric([d["part"]], d["for_s"])
    reconcile_age = gauge("atlasd_last_reconcile_age_seconds", "Seconds since the daemon's last successful reconcile")
    if status["daemon"]["last_reconcile_age_s"] is not None:
        reconcile_age.add_metric([], status["daemon"]["last_reconcile_age_s"])

    intake = status["intake"]
    usable = CounterMetricFamily("atlasd_intake_usable", "Recorded approved traces that are usable (not malformed)")
    usable.add_metric([], intake["usable"])
    by_key = CounterMetricFamily(
        "atlasd_intake_usable_by_learning_key", "Usable recorded traces per learning_key", labels=["learning_key"]
    )
    for key, n in intake["by_learning_key"].items():
        by_key.add_metric([str(key)], n)
    malformed = CounterMetricFamily("atlasd_intake_malformed", "Recorded approved traces that are malformed")
    malformed.add_metric([], intake["malformed"])
    revoked = gauge("atlasd_intake_revoked", "Recorded traces currently revoked (un-approved)")
    revoked.add_metric([], intake["revoked"])
    backlog = gauge("atlasd_intake_backlog", "Ready sessions not yet recorded")
    backlog.add_metric([], intake["backlog"])

    pending = gauge("atlasd_pending_traces", "New traces passing the gear's filters since its last run",
                    ["policy", "gear"])
    threshold = gauge("atlasd_pending_threshold", "Batch gears: traces per run (every N)", ["policy", "gear"])
    paused = gauge("atlasd_policy_paused", "1 when the gear is paused", ["policy", "gear"])
    for policy, gears in status["policies"].items():
        for gear, g in gears.items():
            pending.add_metric([policy, gear], g["pending"])
            paused.add_metric([policy, gear], int(bool(g["paused"])))
            if g["threshold"] is not None:
                threshold.add_metric([policy, gear], g["threshold"])

    runs = gauge("atlasd_runs", "Runs in the queue's history, by state", ["state"])
    for state in STATES:
        runs.add_metric([state], status["runs"].get(state, 0))
    last_success = gauge("atlasd_last_success_timestamp_seconds", "When a run of this gear last succeeded (unix time)",
                         ["policy", "gear"])
    for policy, gears in status["training"]["last_success_at"].items():
        for gear, iso in gears.items():
            last_success.add_metric([policy, gear], _ts(iso))

    training = [
        gauge("atlasd_training_run_id", "Id of the running run (absent when idle)", ["policy", "gear"]),
        gauge("atlasd_training_step", "The running run's last reported step", ["policy", "gear"]),
        gauge("atlasd_training_total_steps", "The running run's planned steps", ["policy", "gear"]),
        gauge("atlasd_training_loss", "The running run's last reported loss", ["policy", "gear"]),
    ]
    running = status["training"]["running"]
    if running:
        labels = [running["policy"], running["gear"]]
        for family, key in zip(training, ("run_id", "step", "total_steps", "loss"), strict=True):
            if running[key] is not None:
                family.add_metric(labels, float(running[key]))

    promotions = CounterMetricFamily("atlasd_promotions", "Promotion audit rows by policy and action "
                                     "(promote, reject, force, rollback)", labels=["policy", "action"])
    for policy, actions in status["promotions"].items():
        for action, n in actions.items():
            promotions.add_metric([policy, action], n)
    champion = gauge("atlasd_champion_version", "The champion's model version per policy",
                     ["policy", "registered_model"])
    for policy, c in status["champion"].items():
        if str(c["version"]).isdigit():  # MLflow versions are integers
            champion.add_metric([policy, c["registered_model"]], int(c["version"]))

    disk = gauge("atlasd_disk_bytes", "Disk use under the state dir by kind, as of the last gc "
                 "(runs_total, periodic_checkpoints, final_models, registry_cache, mlflow_*, filesystem_free)", ["kind"])
    for kind, n in ((status.get("disk") or {}).get("usage_bytes") or {}).items():
        disk.add_metric([kind], n)

    return [up, errors, refreshed, disk, daemon_running, listener, queue_usage, trigger, degraded, reconcile_age, usable, by_key,
            malformed, revoked, backlog, pending, threshold, paused, runs, last_success, *training, promotions, champion]


class StatusCollector(Collector):
    """Serves the cache that :meth:`run` (the refresher thread) fills every ``metrics_refresh_s``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger("metrics")
        self.scrape_errors = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._status: dict[str, Any] | None = None  # the last successful read (None after a failed one)
        self._refreshed_at: float | None = None  # time.time() of that read
        self._conn: psycopg.Connection | None = None
        self._period = settings.metrics_refresh_s  # the refresh period in force (longer for a slow read)

    def refresh(self) -> None:
        """One read of ``collect_status`` on the refresher's connection (re-opened after an error)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.settings.dsn, autocommit=True, options=REFRESH_OPTIONS,
                                             **connect_kwargs("atlasd-metrics", SCRAPE_CONNECT_TIMEOUT_S))
            status, at = collect_status(self._conn, self.settings), time.time()
        except (psycopg.Error, DatabaseError, OSError) as exc:
            self.close()
            with self._lock:
                self.scrape_errors += 1
                self._status = None
            self.log.warning("metrics refresh could not read the database", error=safe_error(exc))
            return
        with self._lock:
            self._status, self._refreshed_at = status, at

    def run(self) -> None:
        """The refresher thread: refresh now, then every ``metrics_refresh_s`` (or 3x the last
        refresh's duration when that is longer: at most a quarter of the time reading) until
        ``stopping``."""
        while not self.stopping.is_set():
            t = time.monotonic()
            self.refresh()
            self._period = max(self.settings.metrics_refresh_s, 4 * (time.monotonic() - t))
            self.stopping.wait(self._period - (time.monotonic() - t))
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            status, at, errors = self._status, self._refreshed_at, self.scrape_errors
        if at is not None and time.time() - at > STALE_AFTER_REFRESHES * self._period:
            status = None  # the refresher is stuck (a query waiting): old values are not "up"
        yield from families(status, errors, at)


def registry_for(collector: StatusCollector) -> CollectorRegistry:
    """atlasd's series plus the daemon process's own (``process_*``: RSS, CPU, open fds)."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """prometheus-client's threaded WSGI server, with a listen backlog for a burst of scrapes (its
    default of 5 makes the 6th concurrent connection wait for a SYN retry, about 1 s)."""

    daemon_threads = True
    request_queue_size = 128


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log on stderr
        return None


def serve(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve ``registry`` at http://HOST:PORT/metrics from a daemon thread."""
    server = make_server(host, port, make_wsgi_app(registry), _V6Server if ":" in host else _Server,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="atlasd-metrics-http", daemon=True).start()
    return server


class MetricsComponent(Component):
    """Daemon component: the HTTP endpoint. A port already in use is logged, not fatal (training
    matters more than metrics)."""

    name = "metrics"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger("metrics")
        self.server = None
        self.port: int | None = None
        self.collector: StatusCollector | None = None
        self._refresher: threading.Thread | None = None

    async def start(self, daemon: Any) -> None:
        if not self.settings.metrics_addr:
            self.log.info("metrics endpoint disabled (ATLASD_METRICS_ADDR is empty)")
            return
        host, port = split_host_port(self.settings.metrics_addr)
        self.collector = StatusCollector(self.settings)
        try:
            self.server = serve(host, port, registry_for(self.collector))
        except OSError as exc:
            self.log.error("metrics endpoint not started", addr=self.settings.metrics_addr, error=str(exc))
            return
        self._refresher = threading.Thread(target=self.collector.run, name="atlasd-metrics", daemon=True)
        self._refresher.start()
        self.port = self.server.server_port
        shown = f"[{host}]" if ":" in host else host
        self.log.info("metrics endpoint", url=f"http://{shown}:{self.port}/metrics", host=host, port=self.port)

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.shutdown)
            self.server.server_close()
            self.server = None
        if self._refresher is not None:
            self.collector.stopping.set()
            await asyncio.to_thread(self._refresher.join, SCRAPE_CONNECT_TIMEOUT_S + 15)
            self._refresher = None

