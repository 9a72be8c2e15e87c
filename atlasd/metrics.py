"""The Prometheus endpoint: ``GET http://ATLASD_METRICS_ADDR/metrics`` (default 127.0.0.1:9464).

A daemon component serves it from prometheus-client's HTTP server thread. Every scrape runs
:func:`atlasd.status.collect_status` (what ``atlasd status --json`` prints) on its own short-lived
synchronous connection, in the HTTP thread, so the event loop never waits for a scrape and the
values are exactly those of ``atlasd status``. With the database unreachable a scrape still
answers 200: ``atlasd_up 0`` and ``atlasd_scrape_errors_total`` counting up, no other atlasd series.
The series are listed in the README ("Running as a service").
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from atlasd.db import DatabaseError, connect_kwargs, safe_error
from atlasd.logging import get_logger
from atlasd.queue import STATES
from atlasd.settings import Settings, split_host_port
from atlasd.status import collect_status

SCRAPE_CONNECT_TIMEOUT_S = 5  # below Prometheus' default scrape timeout (10 s)


def _ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def families(status: dict[str, Any] | None, scrape_errors: int) -> list[Metric]:
    """The metric families for one ``collect_status`` result (None: the database was unreachable)."""
    up = GaugeMetricFamily("atlasd_up", "1 when this scrape could read atlasd's state from the database")
    up.add_metric([], 0 if status is None else 1)
    errors = CounterMetricFamily("atlasd_scrape_errors", "Scrapes that could not read the database")
    errors.add_metric([], scrape_errors)
    if status is None:
        return [up, errors]

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

    return [up, errors, daemon_running, listener, queue_usage, trigger, degraded, reconcile_age, usable, by_key,
            malformed, revoked, backlog, pending, threshold, paused, runs, last_success, *training, promotions, champion]


class StatusCollector(Collector):
    """Reads ``collect_status`` on every scrape (in the HTTP server's thread)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger("metrics")
        self.scrape_errors = 0
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        status = None
        try:
            kwargs = connect_kwargs("atlasd-metrics", connect_timeout=SCRAPE_CONNECT_TIMEOUT_S)
            with psycopg.connect(self.settings.dsn, **kwargs) as conn:
                status = collect_status(conn, self.settings)
        except (psycopg.Error, DatabaseError, OSError) as exc:
            with self._lock:
                self.scrape_errors += 1
            self.log.warning("metrics scrape could not read the database", error=safe_error(exc))
        yield from families(status, self.scrape_errors)


def registry_for(settings: Settings) -> CollectorRegistry:
    """atlasd's series plus the daemon process's own (``process_*``: RSS, CPU, open fds)."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(settings))
    ProcessCollector(registry=registry)
    return registry


class MetricsComponent:
    """Daemon component: the HTTP endpoint. A port already in use is logged, not fatal (training
    matters more than metrics)."""

    name = "metrics"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger("metrics")
        self.server = None
        self.port: int | None = None

    async def start(self, daemon: Any) -> None:
        if not self.settings.metrics_addr:
            self.log.info("metrics endpoint disabled (ATLASD_METRICS_ADDR is empty)")
            return
        host, port = split_host_port(self.settings.metrics_addr)
        try:
            self.server, _ = start_http_server(port, host, registry=registry_for(self.settings))
        except OSError as exc:
            self.log.error("metrics endpoint not started", addr=self.settings.metrics_addr, error=str(exc))
            return
        self.port = self.server.server_port
        shown = f"[{host}]" if ":" in host else host
        self.log.info("metrics endpoint", url=f"http://{shown}:{self.port}/metrics", host=host, port=self.port)

    async def on_intake(self, recorded: int) -> None:
        return None

    async def reload(self) -> None:
        return None

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.shutdown)
            self.server.server_close()
            self.server = None


def create_component(settings: Settings) -> MetricsComponent:
    """Entry for ``atlasd.daemon.COMPONENT_MODULES``."""
    return MetricsComponent(settings)
