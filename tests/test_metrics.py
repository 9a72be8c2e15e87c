"""atlasd.metrics: the Prometheus endpoint, against real PostgreSQL and real HTTP.

Scrapes answer from a cache that one refresher fills with ``collect_status`` on ONE persistent
connection (``application_name`` ``atlasd-metrics``); a failed or stale refresh answers
``atlasd_up 0`` with no state series; the series are those the README's table lists."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from atlasd.metrics import MetricsComponent, StatusCollector, families, registry_for
from atlasd.settings import Settings, load_settings
from atlasd.status import collect_status
from atlasd.testing import pg
from atlasd.testing.daemon import ROOT, wait_until
from atlasd.testing.pg import sql
from tests.cadence_support import NO_SPLIT

APP = "atlasd-metrics"
Samples = dict[tuple[str, frozenset], float]


pytestmark = pytest.mark.usefixtures("log_to_stdout")


def metrics_backends(db_url: str) -> list[int]:
    return [r[0] for r in sql(db_url, """SELECT pid FROM pg_stat_activity
                                          WHERE datname = current_database() AND application_name = %s""", [APP])]


def make_settings(db_url: str, tmp_path: Path, **overrides) -> Settings:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    return load_settings(db_url=db_url, policies_dir=tmp_path / "policies", state_dir=tmp_path / "state",
                         **{"metrics_addr": "127.0.0.1:0", **overrides})


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exposition(collector: StatusCollector) -> str:
    return generate_latest(registry_for(collector)).decode()


def scrape_text(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def scrape(port: int) -> Samples:
    return parse(scrape_text(port))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def atlasd_only(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0].startswith("atlasd_")}


def atlasd_names(samples: Samples) -> set[str]:
    return {name for name, _ in samples if name.startswith("atlasd_")}


DOWN_SERIES = {"atlasd_up", "atlasd_scrape_errors_total", "atlasd_metrics_refreshed_timestamp_seconds"}


def add_intake(db_url: str, key: str | None, n: int, malformed: str | None = None, revoked: bool = False) -> None:
    sql(db_url, """INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at, malformed,
                                              revoked_at)
                   SELECT COALESCE((SELECT max(session_id) FROM atlasd.intake), 0) + g, %s, 0.9, now(), %s,
                          CASE WHEN %s THEN now() END
                     FROM generate_series(1, %s) g""", [key, malformed, revoked, n])


def add_ready_sessions(db_url: str, n: int) -> None:
    """Ready sessions nobody recorded: the intake backlog."""
    sql(db_url, """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                   SELECT 't', 'succeeded', 'approved', '{"learning_key": "k"}', '{"score": 1}'
                     FROM generate_series(1, %s)""", [n])


def documented_series() -> dict[str, tuple[str, set[str]]]:
    """README "Metrics" table: series name -> (type, label names)."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| series | type | labels |", 1)[1].split("\n\n", 1)[0]
    series = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`atlasd_"):
            continue
        for name in re.findall(r"`(atlasd_\w+)`", cells[0]):
            series[name] = (cells[1], set(re.findall(r"`(\w+)`", cells[2])))
    assert len(series) >= 20, series  # the table was found and read
    return series


# ---------------------------------------------------------------- what a scrape shows
def test_the_exposition_has_every_documented_series_with_its_type_labels_and_the_status_values(
    db_url: str, tmp_path: Path
) -> None:
    settings = make_settings(db_url, tmp_path)
    (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump({
        "teacher": "t", "student": "s",
        "gears": {"fast": {"trigger": {"batch": {"every": 1000}}, "eval": NO_SPLIT},
                  "hq": {"trigger": {"cron": {"expr": "0 3 * * sun"}}, "eval": NO_SPLIT}},
    }))
    (tmp_path / "state" / "gc.json").write_text(json.dumps(
        {"at": "2026-11-30T00:00:00+00:00", "freed_bytes": 0, "removals": [],
         "usage_bytes": {"runs_total": 1234, "filesystem_free": 5678}}))
    add_intake(db_url, "math", 5)
    add_intake(db_url, "code", 2)
    add_intake(db_url, "code", 1, revoked=True)
    add_intake(db_url, None, 2, malformed="metadata.learning_key is missing or not a string")
    add_ready_sessions(db_url, 3)
    degraded = [{"part": "listener", "state": "reconnecting", "error": "e", "attempts": 2, "down_s": 3.0}]
    sql(db_url, """INSERT INTO atlasd.daemon_state (pid, host, version, started_at, heartbeat_at, last_reconcile_at,
                                                    degraded)
                   VALUES (1, 'h', 'v', now(), now(), now(), %s)""", [json.dumps(degraded)])
    sql(db_url, """INSERT INTO atlasd.runs (policy, gear, state, trigger, window_lo, window_hi, started_at, finished_at)
                   VALUES ('p', 'hq', 'succeeded', 'manual', 0, 3, now() - interval '2 hours',
                           now() - interval '1 hour')""")
    sql(db_url, """INSERT INTO atlasd.runs (policy, gear, state, trigger, window_lo, window_hi, started_at, metrics)
                   VALUES ('p', 'fast', 'running', 'batch', 3, 9, now(),
                           '{"step": 12, "total_steps": 40, "loss": 1.25}')""")
    sql(db_url, """INSERT INTO atlasd.promotions (policy, registered_model, from_version, to_version, action, actor)
                   VALUES ('p', 'atlasd-p', NULL, '1', 'promote', 'atlasd'),
                          ('p', 'atlasd-p', '1', '2', 'reject', 'atlasd')""")

    collector = StatusCollector(settings)
    try:
        collector.refresh()
        text = exposition(collector)
    finally:
        collector.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        status = collect_status(conn, settings)

    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    exposed = {(f.name + "_total" if f.type == "counter" and not f.name.endswith("_total") else f.name): f
               for f in parsed.values()}
    documented = documented_series()
    for name, (kind, labels) in documented.items():
        assert name in exposed, f"{name} is documented but not exposed"
        family = exposed[name]
        assert family.type == kind, (name, family.type)
        assert family.samples, f"{name} has no sample for this seed"
        for sample in family.samples:
            assert set(sample.labels) == labels, (name, sample.labels)
    undocumented = {n for n in exposed if n.startswith("atlasd_")} - set(documented)
    assert undocumented == set(), undocumented
    assert any(n.startswith("process_") for n in exposed)  # the daemon process's own series

    samples = parse(text)
    intake = status["intake"]
    assert value(samples, "atlasd_up") == 1 and value(samples, "atlasd_scrape_errors_total") == 0
    assert (intake["usable"], intake["malformed"], intake["revoked"], intake["backlog"]) == (8, 2, 1, 3)
    assert value(samples, "atlasd_intake_usable_total") == 8
    assert value(samples, "atlasd_intake_malformed_total") == 2
    assert value(samples, "atlasd_intake_revoked") == 1
    assert value(samples, "atlasd_intake_backlog") == 3
    for key, n in intake["by_learning_key"].items():
        assert value(samples, "atlasd_intake_usable_by_learning_key_total", learning_key=key) == n
    assert value(samples, "atlasd_intake_usable_by_learning_key_total", learning_key="code") == 3  # revoked counted
    for state, n in status["runs"].items():
        assert value(samples, "atlasd_runs", state=state) == n
    assert value(samples, "atlasd_pending_threshold", policy="p", gear="fast") == 1000
    for gear, g in status["policies"]["p"].items():
        assert value(samples, "atlasd_pending_traces", policy="p", gear=gear) == g["pending"]
    assert value(samples, "atlasd_training_step", policy="p", gear="fast") == 12
    assert value(samples, "atlasd_training_loss", policy="p", gear="fast") == 1.25
    assert value(samples, "atlasd_promotions_total", policy="p", action="reject") == 1
    assert value(samples, "atlasd_champion_version", policy="p", registered_model="atlasd-p") == 1
    assert value(samples, "atlasd_disk_bytes", kind="runs_total") == 1234
    assert value(samples, "atlasd_daemon_running") == 0  # nobody holds the lock
    assert value(samples, "atlasd_degraded_seconds", part="listener") >= 3.0
    for trigger, state in status["listener"]["notify_trigger"].items():
        assert value(samples, "atlasd_notify_trigger_enabled", trigger=trigger) == (state == "enabled") == 1


def test_without_a_status_only_up_errors_and_the_refresh_time_are_exposed() -> None:
    def samples(fams) -> Samples:
        return {(s.name, frozenset(s.labels.items())): s.value for f in fams for s in f.samples}

    down = samples(families(None, 3, 1_700_000_000.5))
    assert down == {("atlasd_up", frozenset()): 0, ("atlasd_scrape_errors_total", frozenset()): 3,
                    ("atlasd_metrics_refreshed_timestamp_seconds", frozenset()): 1_700_000_000.5}
    never = samples(families(None, 1, None))  # never refreshed: no timestamp at all
    assert never == {("atlasd_up", frozenset()): 0, ("atlasd_scrape_errors_total", frozenset()): 1}


# ---------------------------------------------------------------- the cache
def test_scrapes_answer_from_the_cache_until_the_next_refresh(db_url: str, tmp_path: Path) -> None:
    collector = StatusCollector(make_settings(db_url, tmp_path))
    try:
        assert atlasd_names(parse(exposition(collector))) == {"atlasd_up", "atlasd_scrape_errors_total"}  # not read yet
        add_intake(db_url, "k", 2)
        collector.refresh()
        first = parse(exposition(collector))
        assert value(first, "atlasd_up") == 1 and value(first, "atlasd_intake_usable_total") == 2
        [backend] = metrics_backends(db_url)

        add_intake(db_url, "k", 3)
        cached = parse(exposition(collector))  # the database changed; the cache did not
        assert value(cached, "atlasd_intake_usable_total") == 2
        assert atlasd_only(cached) == atlasd_only(first)

        collector.refresh()
        second = parse(exposition(collector))
        assert value(second, "atlasd_intake_usable_total") == 5
        assert (value(second, "atlasd_metrics_refreshed_timestamp_seconds")
                >= value(first, "atlasd_metrics_refreshed_timestamp_seconds"))
        assert metrics_backends(db_url) == [backend]  # the same persistent connection
    finally:
        collector.close()
    wait_until(lambda: metrics_backends(db_url) == [], 10, "the metrics connection closed")


def test_a_failed_refresh_answers_up_0_counts_it_and_the_next_one_reconnects(db_url: str, tmp_path: Path) -> None:
    collector = StatusCollector(make_settings(db_url, tmp_path))
    try:
        add_intake(db_url, "k", 2)
        collector.refresh()
        up = parse(exposition(collector))
        [backend] = metrics_backends(db_url)
        assert sql(db_url, "SELECT pg_terminate_backend(%s)", [backend]) == [(True,)]

        collector.refresh()  # on the dead connection: fails
        down = parse(exposition(collector))
        assert value(down, "atlasd_up") == 0 and value(down, "atlasd_scrape_errors_total") == 1
        assert atlasd_names(down) == DOWN_SERIES  # no stale state series
        assert (value(down, "atlasd_metrics_refreshed_timestamp_seconds")
                == value(up, "atlasd_metrics_refreshed_timestamp_seconds"))  # when the values were last read

        collector.refresh()  # a new connection
        again = parse(exposition(collector))
        assert value(again, "atlasd_up") == 1 and value(again, "atlasd_scrape_errors_total") == 1
        assert value(again, "atlasd_intake_usable_total") == 2
        [new_backend] = metrics_backends(db_url)
        assert new_backend != backend
    finally:
        collector.close()


def test_a_cache_older_than_three_intervals_answers_up_0(db_url: str, tmp_path: Path) -> None:
    collector = StatusCollector(make_settings(db_url, tmp_path, metrics_refresh_s=0.5))
    try:
        collector.refresh()  # no refresher thread: nothing refreshes it again
        assert value(parse(exposition(collector)), "atlasd_up") == 1  # fresh for 3 x 0.5 s
        stale = wait_until(lambda: (s := parse(exposition(collector)))[("atlasd_up", frozenset())] == 0 and s, 10,
                           "the cache going stale")
        assert atlasd_names(stale) == DOWN_SERIES
        assert value(stale, "atlasd_scrape_errors_total") == 0  # stale is not a failed read
        collector.refresh()
        assert value(parse(exposition(collector)), "atlasd_up") == 1
    finally:
        collector.close()


# ---------------------------------------------------------------- the endpoint
@contextlib.contextmanager
def endpoint(db_url: str, tmp_path: Path, refresh_s: float) -> Iterator[MetricsComponent]:
    """The daemon component, serving on a free port, refreshing every ``refresh_s``."""
    component = MetricsComponent(make_settings(db_url, tmp_path, metrics_refresh_s=refresh_s))
    asyncio.run(component.start(None))
    try:
        yield component
    finally:
        asyncio.run(component.stop())


def refreshed_at(port: int) -> float:
    return scrape(port).get(("atlasd_metrics_refreshed_timestamp_seconds", frozenset()), 0.0)


def test_the_refresher_keeps_the_cache_fresh_on_one_persistent_connection(db_url: str, tmp_path: Path) -> None:
    with endpoint(db_url, tmp_path, refresh_s=0.2) as component:
        port = component.port
        wait_until(lambda: scrape(port)[("atlasd_up", frozenset())] == 1, 10, "the first refresh")
        [backend] = metrics_backends(db_url)
        add_intake(db_url, "k", 4)
        wait_until(lambda: scrape(port).get(("atlasd_intake_usable_total", frozenset())) == 4, 10,
                   "the new intake rows in a scrape")
        for _ in range(2):  # two more refreshes
            before = refreshed_at(port)
            wait_until(lambda: refreshed_at(port) > before, 10, "another refresh")
        assert metrics_backends(db_url) == [backend]


def test_a_scrape_never_touches_the_database(db_url: str, tmp_path: Path) -> None:
    """With the cache filled, 40 concurrent scrapes while the database accepts no new connection
    and a lock blocks every read of the intake: each answers the cached values, and the one
    metrics connection ran no query meanwhile."""
    dbname = db_url.rsplit("/", 1)[1]
    with (endpoint(db_url, tmp_path, refresh_s=3600) as component,  # one refresh, at start
          psycopg.connect(db_url) as locker, psycopg.connect(db_url, autocommit=True) as observer,
          psycopg.connect(pg.ADMIN_URL, autocommit=True) as admin):
        port = component.port
        cached = wait_until(lambda: (s := scrape(port))[("atlasd_up", frozenset())] == 1 and s, 10, "the first refresh")

        def metrics_session() -> list[tuple]:  # autocommit: a fresh pg_stat_activity snapshot each time
            return observer.execute("""SELECT pid, query_start, state FROM pg_stat_activity
                                        WHERE datname = current_database() AND application_name = %s""",
                                    [APP]).fetchall()

        [before] = metrics_session()
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            locker.execute("LOCK TABLE atlasd.intake IN ACCESS EXCLUSIVE MODE")  # held until the rollback
            with ThreadPoolExecutor(8) as pool:
                scrapes = list(pool.map(lambda _: scrape(port), range(40)))
            assert metrics_session() == [before]  # the same session, no query started since the refresh
        finally:
            locker.rollback()
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    for s in scrapes:
        assert atlasd_only(s) == atlasd_only(cached)


async def test_a_scrape_with_the_database_down_answers_up_0(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    settings = load_settings(db_url=f"postgresql://atlasd:s3cret-pw@127.0.0.1:{dead}/atlas",
                             metrics_addr="127.0.0.1:0", policies_dir=tmp_path, metrics_refresh_s=0.2)
    component = MetricsComponent(settings)
    await component.start(None)
    try:
        first = await asyncio.to_thread(wait_until, lambda: (m := scrape(component.port))[
            ("atlasd_scrape_errors_total", frozenset())] >= 1 and m, 10, "a failed refresh")
        second = await asyncio.to_thread(wait_until, lambda: (m := scrape(component.port))[
            ("atlasd_scrape_errors_total", frozenset())] >= 2 and m, 10, "a second failed refresh")
        text = await asyncio.to_thread(scrape_text, component.port)
    finally:
        await component.stop()
    assert first[("atlasd_up", frozenset())] == 0 and second[("atlasd_up", frozenset())] == 0
    assert not any(name.startswith("atlasd_intake") for name, _ in second)
    assert "s3cret" not in text


def test_stop_closes_the_endpoint_and_the_connection(db_url: str, tmp_path: Path) -> None:
    component = MetricsComponent(make_settings(db_url, tmp_path, metrics_refresh_s=0.2))
    asyncio.run(component.start(None))
    port = component.port
    wait_until(lambda: scrape(port)[("atlasd_up", frozenset())] == 1, 10, "the first refresh")
    asyncio.run(component.stop())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    wait_until(lambda: metrics_backends(db_url) == [], 10, "the metrics connection closed")


def test_an_empty_address_disables_the_endpoint(db_url: str, tmp_path: Path) -> None:
    component = MetricsComponent(make_settings(db_url, tmp_path, metrics_addr=""))
    asyncio.run(component.start(None))
    assert component.server is None and component.port is None and component.collector is None
    asyncio.run(component.stop())


def test_a_port_in_use_is_logged_not_fatal(db_url: str, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        component = MetricsComponent(make_settings(db_url, tmp_path, metrics_addr=f"127.0.0.1:{port}"))
        asyncio.run(component.start(None))  # no exception: the daemon goes on without metrics
        assert component.server is None and component.port is None
        asyncio.run(component.stop())
    assert metrics_backends(db_url) == []  # and no refresher was started


def test_an_ipv6_address(db_url: str, tmp_path: Path) -> None:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError:
        pytest.skip("no IPv6 loopback here")
    component = MetricsComponent(make_settings(db_url, tmp_path, metrics_addr="[::1]:0"))
    asyncio.run(component.start(None))
    try:
        assert component.port
        text = wait_until(lambda: (t := scrape_text(component.port, host="[::1]")) and "atlasd_up 1.0" in t and t, 10,
                          "a refreshed scrape over IPv6")
        assert "atlasd_intake_usable_total" in text
    finally:
        asyncio.run(component.stop())
