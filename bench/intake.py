"""Intake benchmark: approval -> intake latency, burst throughput, daemon RSS and start-up time;
and, with ``--history``, how the per-approval cost grows with the recorded history.

    python -m bench.intake [--singles 1000] [--burst 100000] [--writers 8]
    python -m bench.intake --history 100000,1000000,10000000
    make bench-intake

It creates a throw-away database on the test server (``ATLASD_TEST_PG_URL``, default
postgresql://postgres@127.0.0.1:5432/postgres), runs the real daemon (``python -m atlasd run``)
against it with the slow poll off (NOTIFY does the work), and drops the database at the end.

* latency: ``--singles`` sessions approved one at a time (one autocommit UPDATE each, as the
  SDK's review CLI does); from the UPDATE's commit until the row is in ``atlasd.intake``
  (observed by polling every 0.2 ms from another connection).
* burst: ``--burst`` sessions approved by ``--writers`` concurrent asyncpg connections in
  statements of 100 ids; traces/s from the first approval until the last one is recorded,
  then a count check (each ready session recorded exactly once).
* backlog: ``--burst`` more sessions approved while the daemon is stopped; time from exec until
  "ready" (the start-up full reconcile records them all before it says ready), and a count check.
* the daemon's RSS when idle and its peak, time from exec to "ready", and that no heavy module
  (torch, transformers, trl, mlflow) is loaded: from its "ready" log line and /proc/PID/maps.

``--history N1,N2,...``: for each size, a database holding N recorded sessions (written set-wise),
then, side by side in one process on the same server: the targeted reconcile one NOTIFY causes
(one approval; median of 50), one slow poll (a rolling sweep; median of 5), the cadence
evaluation of a batch gear with 1,000 traces pending (median of 20), ``atlasd status`` (the metrics refresh; median of 5)
and one full reconcile (start-up, reconnect). A table with medians and each size's ratio to the
first: what is independent of history stays near 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psycopg

from atlasd import intake
from atlasd.daemon import HEAVY_MODULES
from atlasd.db.migrate import init_sdk_schema, migrate
from atlasd.testing import pg
from atlasd.testing.daemon import DaemonProcess, wait_until

TARGETS = {"p50_ms": 50.0, "traces_per_s": 5000.0, "rss_mb": 80.0}
CHUNK = 100


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def heavy_libraries(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({name for name in ("libtorch", "libc10", "torch/_C", "mlflow") if name in maps})


def add_pending(url: str, n: int) -> list[int]:
    """Sessions that succeeded and wait for review (not ready: no NOTIFY)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            """INSERT INTO sessions (task, status, metadata, reward_stats)
               SELECT 'task ' || g, 'succeeded', jsonb_build_object('learning_key', 'key-' || (g %% 4)),
                      jsonb_build_object('score', (g %% 100) / 100.0)
                 FROM generate_series(1, %s) g RETURNING id""",
            [n],
        ).fetchall()
    return [r[0] for r in rows]


def single_latencies(url: str, ids: list[int]) -> list[float]:
    latencies = []
    with psycopg.connect(url, autocommit=True) as writer, psycopg.connect(url, autocommit=True) as reader:
        for sid in ids:
            writer.execute("UPDATE sessions SET review_status = 'approved' WHERE id = %s", [sid])
            t0 = time.perf_counter()
            while not intake.is_recorded(reader, sid):
                if time.perf_counter() - t0 > 10:
                    raise AssertionError(f"session {sid} not recorded within 10 s")
                time.sleep(0.0002)
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


async def approve_burst(url: str, ids: list[int], writers: int) -> float:
    chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]

    async def writer(w: int) -> None:
        conn = await asyncpg.connect(url)
        try:
            for chunk in chunks[w::writers]:
                await conn.execute("UPDATE sessions SET review_status = 'approved' WHERE id = ANY($1::int[])", chunk)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return t0


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(singles: int, burst: int, writers: int) -> int:
    name = pg.create_database("atlasd_bench")
    url = pg.url_for(name)

    def recorded() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            return intake.recorded_counts(conn)[0]

    try:
        init_sdk_schema(url)
        migrate(url)
        single_ids = add_pending(url, singles)
        burst_ids = add_pending(url, burst)
        backlog_ids = add_pending(url, burst)

        with tempfile.TemporaryDirectory() as state, DaemonProcess(url, Path(state)) as daemon:
            ready = daemon.wait_for("ready", timeout=60)
            to_ready = ready["_t"] - daemon.started_at
            time.sleep(2)  # settle, then measure idle memory
            idle_rss = rss_mb(daemon.pid)
            heavy = sorted(set(ready["heavy_modules"]) | set(heavy_libraries(daemon.pid)))

            latencies = single_latencies(url, single_ids)
            p50, p99 = statistics.median(latencies), percentile(latencies, 99)

            t0 = asyncio.run(approve_burst(url, burst_ids, writers))
            approved_s = time.perf_counter() - t0
            wait_until(lambda: recorded() >= singles + burst, 600, f"{burst} burst sessions", interval=0.02)
            burst_s = time.perf_counter() - t0
            with psycopg.connect(url, autocommit=True) as conn:
                total, missing = intake.recorded_counts(conn)[0], intake.unrecorded_ready(conn)
            peak_rss = rss_mb(daemon.pid, "VmHWM")
            stop_rc = daemon.stop()

        # a backlog approved while the daemon is down: the full reconcile at start records it
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE sessions SET review_status = 'approved' WHERE id = ANY(%s)", [backlog_ids])
        with tempfile.TemporaryDirectory() as state, DaemonProcess(url, Path(state)) as daemon:
            backlog_ready = daemon.wait_for("ready", timeout=600)
            backlog_s = backlog_ready["_t"] - daemon.started_at
            backlog_total = recorded()
            daemon.stop()
    finally:
        pg.drop_database(name)

    rate = burst / burst_s
    lost = missing  # approved and succeeded, never recorded
    extra = total - (singles + burst - missing)  # recorded more than once (or never approved)
    backlog_lost = singles + 2 * burst - backlog_total
    rows = [
        ("approval -> intake latency p50", f"{p50:.1f} ms", f"<= {TARGETS['p50_ms']:.0f} ms"),
        ("approval -> intake latency p99", f"{p99:.1f} ms", f"(n = {len(latencies)} single approvals)"),
        ("burst: approvals committed in", f"{approved_s:.2f} s", f"{burst} sessions, {writers} writers x {CHUNK}/stmt"),
        ("burst: all recorded after", f"{burst_s:.2f} s", "from the first approval"),
        ("burst throughput", f"{rate:,.0f} traces/s", f">= {TARGETS['traces_per_s']:,.0f}"),
        ("count check", f"{total} recorded, {extra} extra, {lost} lost", "0 lost, each once"),
        ("backlog at start: ready after", f"{backlog_s:.2f} s", f"{burst} approved while stopped, {backlog_lost} lost"),
        ("daemon idle RSS", f"{idle_rss:.1f} MB", f"<= {TARGETS['rss_mb']:.0f} MB"),
        ("daemon peak RSS (VmHWM)", f"{peak_rss:.1f} MB", "after the burst"),
        ("daemon time to ready", f"{to_ready:.2f} s", "exec -> 'ready' log line"),
        ("heavy modules in daemon", ", ".join(heavy) or "none", f"none of {', '.join(HEAVY_MODULES)}"),
        ("daemon exit on SIGTERM", str(stop_rc), "0"),
    ]
    checks = {
        f"p50 {p50:.1f} ms > {TARGETS['p50_ms']} ms": p50 > TARGETS["p50_ms"],
        f"{rate:.0f} traces/s < {TARGETS['traces_per_s']}": rate < TARGETS["traces_per_s"],
        f"{lost} lost or {extra} extra": lost != 0 or extra != 0,
        f"{backlog_lost} of the backlog lost": backlog_lost != 0,
        f"idle RSS {idle_rss:.1f} MB > {TARGETS['rss_mb']} MB": idle_rss > TARGETS["rss_mb"],
        f"heavy modules loaded: {heavy}": bool(heavy),
        f"daemon exit status {stop_rc}": stop_rc != 0,
    }
    failures = [what for what, failed in checks.items() if failed]

    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value'.ljust(vwidth)}  target / note")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 30}")
    for measure, value, note in rows:
        print(f"{measure.ljust(width)}  {value.ljust(vwidth)}  {note}")
    if failures:
        print("\nMISSED: " + "; ".join(failures))
    return 1 if failures else 0


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def history_case(size: int) -> dict[str, float]:
    """The per-operation costs on a database with ``size`` recorded sessions (see the module doc)."""
    from atlasd.cadence import evaluate_gear
    from atlasd.policies import Policy
    from atlasd.settings import load_settings
    from atlasd.status import collect_status

    name = pg.create_database("atlasd_bench")
    url = pg.url_for(name)
    try:
        init_sdk_schema(url)
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("""INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                            SELECT 't' || g, 'succeeded', 'approved', '{"learning_key": "math"}', '{"score": 0.9}'
                              FROM generate_series(1, %s) g""", [size])
        def batch_policy(every: int) -> Policy:
            return Policy.model_validate({"name": "p", "learning_key": "math", "teacher": "t", "student": "s",
                                          "gears": {"fast": {"trigger": {"batch": {"every": every}}}}})

        policy = batch_policy(20000)
        # the history recorded by the real full reconcile; the gear fired a while ago, on all but the
        # newest 1,000 (its steady state, not a new policy's first fire): a run of that window is queued
        first = batch_policy(max(size - 1000, 1))

        async def seed() -> None:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await intake.reconcile(conn, None, 5000)
                if size > 1000:
                    await evaluate_gear(conn, first, "fast", now=datetime.now(UTC), catchup_window=timedelta(days=1))

        asyncio.run(seed())
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            pending = [r[0] for r in conn.execute(
                """INSERT INTO sessions (task, status, review_status, metadata, reward_stats)
                   SELECT 'new' || g, 'succeeded', 'pending', '{"learning_key": "math"}', '{"score": 0.9}'
                     FROM generate_series(1, 50) g RETURNING id""").fetchall()]
        settings = load_settings(db_url=url, policies_dir=Path(tempfile.gettempdir()), state_dir=Path(tempfile.gettempdir()))
        now = datetime.now(UTC)

        async def measure() -> dict[str, float]:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                async def timed(coro_fn, n: int) -> float:
                    times = []
                    for i in range(n):
                        t = time.perf_counter()
                        await coro_fn(i)
                        times.append((time.perf_counter() - t) * 1000)
                    return statistics.median(times)

                async def approve_one(i: int) -> None:
                    await conn.execute("UPDATE sessions SET review_status = 'approved' WHERE id = %s", [pending[i]])
                    assert (await intake.reconcile(conn, [pending[i]], 5000)).recorded == 1

                sweep = intake.RollingSweep()
                out = {
                    "targeted reconcile (one NOTIFY), ms": await timed(approve_one, len(pending)),
                    "slow poll (rolling sweep), ms": await timed(
                        lambda i: intake.reconcile(conn, None, 5000, sweep=sweep), 5),
                    "cadence evaluation (1,000 pending), ms": await timed(
                        lambda i: evaluate_gear(conn, policy, "fast", now=now, catchup_window=timedelta(days=1),
                                                apply=False), 20),
                }
                t = time.perf_counter()
                await intake.reconcile(conn, None, 5000)
                out["full reconcile (start, reconnect), ms"] = (time.perf_counter() - t) * 1000
                return out

        out = asyncio.run(measure())
        with psycopg.connect(url, autocommit=True) as conn:
            out["atlasd status (metrics refresh), ms"] = _median_ms(lambda: collect_status(conn, settings), 5)
        return out
    finally:
        pg.drop_database(name)


def run_history(sizes: list[int]) -> int:
    results = {size: history_case(size) for size in sizes}
    first = results[sizes[0]]
    measures = list(first)
    width = max(len(m) for m in measures)
    head = "".join(f"  {f'{s:,} rows':>16}" for s in sizes)
    print(f"{'median'.ljust(width)}{head}")
    for m in measures:
        cells = "".join(f"  {results[s][m]:>8.1f} ({results[s][m] / first[m]:>4.1f}x)" for s in sizes)
        print(f"{m.ljust(width)}{cells}")
    print(f"(ratios against {sizes[0]:,} rows; one process, one server, measured one size after the other)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--singles", type=int, default=1000, help="single approvals timed for latency (>= 2)")
    parser.add_argument("--burst", type=int, default=100_000, help="approvals in the burst")
    parser.add_argument("--writers", type=int, default=8, help="concurrent approving connections in the burst")
    parser.add_argument("--history", help="comma-separated history sizes (e.g. 100000,1000000,10000000): "
                                          "per-approval, poll, cadence and status costs against the recorded history")
    args = parser.parse_args(argv)
    if args.history:
        return run_history([int(x) for x in args.history.split(",")])
    return run(max(2, args.singles), args.burst, args.writers)


if __name__ == "__main__":
    sys.exit(main())
