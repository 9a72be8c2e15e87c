"""The cadence decision (atlasd.cadence.decide_gear) as a pure function: table-driven, no database.
The database-backed path around it (counting, locking, writing) is tests/test_cadence.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from atlasd.cadence import NO_NEW_TRACES, GearState, decide_gear, state_from_row
from tests.cadence_support import batch_gear, cron_gear, make_policy, utc

DAY = timedelta(days=1)
NOW = utc(2026, 11, 22, 3, 0, 10)  # a Sunday, 10 s after 03:00 UTC
POLICY = make_policy(fast=batch_gear(5, min_interval="1h", max_traces=8), hq=cron_gear("0 3 * * sun", max_traces=8),
                     trickle={"trigger": {"batch": {"every": 50, "max_wait": "1h", "min_traces": 2}}},
                     plain={"trigger": {"batch": {"every": 5}}})


def state(**kw) -> GearState:
    return GearState(**{"last_window_hi": 100, "armed_at": utc(2026, 11, 1), "cron_schedule": "0 3 * * sun @ UTC",
                        "last_fire_at": None, "last_run_id": None, "skipped_fire_at": None, "skipped_reason": None,
                        **kw})


def inputs(pending: int, *, paused: bool = False, queued: int | None = None, every: int = 5, cap: int = 8,
           oldest_at=None, rejections: int = 0) -> dict:
    """What _INPUTS returns when the pending traces have seqs 101..100+pending."""
    batched = pending // every * every
    return {"paused": paused, "queued_run_id": queued, "pending": pending, "all_hi": 100 + pending,
            "oldest_at": oldest_at, "rejections": rejections,
            "batch_hi": 100 + batched if batched else None,
            "cap_lo_all": 100 + pending - cap if pending > cap else None,
            "cap_lo_batch": 100 + batched - cap if batched > cap else None}


CASES = [
    # gear, state, inputs, mode, -> action, trigger, window, n_traces, reason contains
    ("fast", {}, inputs(3), "auto", "none", None, None, 0, "3/5 new traces"),
    ("fast", {}, inputs(7), "auto", "enqueue", "batch", (100, 105), 5, "7 >= 5 new traces: 5 go into a run"),
    ("fast", {}, inputs(7, queued=42), "auto", "coalesce", "batch", (100, 105), 5, ""),
    ("fast", {}, inputs(7, paused=True), "auto", "none", None, None, 0, "paused (7/5 new traces)"),
    ("fast", {"last_fire_at": NOW - timedelta(minutes=10)}, inputs(7), "auto", "none", None, None, 0,
     "min_interval holds it"),
    ("fast", {}, inputs(12), "auto", "enqueue", "batch", (102, 110), 8, "the 2 oldest left out (filters.max_traces 8"),
    ("fast", {}, inputs(0), "manual", "none", None, None, 0, NO_NEW_TRACES),
    ("fast", {}, inputs(3), "manual", "enqueue", "manual", (100, 103), 3, "manual trigger"),
    ("fast", {}, inputs(12), "backfill", "enqueue", "manual", (100, 112), 12, "manual trigger (backfill)"),
    ("hq", {}, inputs(3), "auto", "enqueue", "cron", (100, 103), 3, "cron tick 2026-11-22T03:00:00+00:00"),
    ("hq", {"armed_at": NOW}, inputs(3), "auto", "none", None, None, 0, "next tick 2026-11-29T03:00:00+00:00"),
    ("hq", {"last_fire_at": utc(2026, 11, 22, 3)}, inputs(3), "auto", "none", None, None, 0, "next tick"),
    ("hq", {}, inputs(0), "auto", "skip", None, None, 0, NO_NEW_TRACES),
    ("hq", {}, inputs(3, paused=True), "auto", "skip", None, None, 0, "skipped: paused"),
    ("hq", {}, inputs(20), "auto", "enqueue", "cron", (112, 120), 8, "the 12 oldest left out"),
    # a slow trickle: max_wait fires a partial batch (at least min_traces) once the oldest has waited
    ("trickle", {}, inputs(3, every=50, cap=20000, oldest_at=NOW - timedelta(hours=2)), "auto", "enqueue", "batch",
     (100, 103), 3, "max_wait 1.0h fires a partial batch"),
    ("trickle", {}, inputs(3, every=50, cap=20000, oldest_at=NOW - timedelta(minutes=20)), "auto", "none", None,
     None, 0, "max_wait fires them at 2026-11-22T03:40:10+00:00"),
    ("trickle", {}, inputs(1, every=50, cap=20000, oldest_at=NOW - timedelta(hours=2)), "auto", "none", None,
     None, 0, "1/50 new traces"),
    # after gate rejections the gear backs off: min_interval (1 h here) doubling per rejection
    ("fast", {"last_fire_at": NOW - timedelta(minutes=90)}, inputs(7, rejections=2), "auto", "none", None, None, 0,
     "back-off after 2 gate rejections holds it until 2026-11-22T03:30:10+00:00"),
    ("fast", {"last_fire_at": NOW - timedelta(minutes=90)}, inputs(7, rejections=1), "auto", "enqueue", "batch",
     (100, 105), 5, ""),
    ("plain", {"last_fire_at": NOW - timedelta(minutes=30)}, inputs(7, rejections=1, cap=20000), "auto", "none",
     None, None, 0, "back-off after 1 gate rejection"),  # no min_interval: 1 h
    ("plain", {"last_fire_at": NOW - timedelta(minutes=30)}, inputs(7, cap=20000), "auto", "enqueue", "batch",
     (100, 105), 5, ""),
]


@pytest.mark.parametrize(("gear", "st", "counts", "mode", "action", "trigger", "window", "n", "reason"), CASES)
def test_decide_gear(gear, st, counts, mode, action, trigger, window, n, reason) -> None:
    plan, fire_at = decide_gear(POLICY, gear, state(**st), counts, now=NOW, catchup_window=DAY, mode=mode)
    assert (plan.action, plan.trigger, plan.n_traces) == (action, trigger, n), plan.reason
    assert ((plan.window_lo, plan.window_hi) if window else None) == window
    assert reason in plan.reason
    assert (fire_at is not None) == (action in ("enqueue", "coalesce"))
    if trigger == "cron":
        assert fire_at == utc(2026, 11, 22, 3)  # the tick, not the wake-up


@pytest.mark.parametrize(("late", "action", "trigger"), [
    (timedelta(seconds=59), "enqueue", "cron"),
    (timedelta(hours=5), "enqueue", "catch-up"),
    (timedelta(days=2), "skip", None),  # older than the catch-up window
])
def test_a_late_cron_tick_runs_on_time_catches_up_or_is_skipped(late, action, trigger) -> None:
    plan, _ = decide_gear(POLICY, "hq", state(), inputs(3), now=utc(2026, 11, 22, 3) + late, catchup_window=DAY,
                          mode="auto")
    assert (plan.action, plan.trigger) == (action, trigger), plan.reason


def test_stored_times_from_a_clock_that_was_ahead_are_clamped() -> None:
    row = {"last_window_hi": 5, "armed_at": NOW + timedelta(days=400), "cron_schedule": "0 3 * * sun @ UTC",
           "last_fire_at": NOW + timedelta(days=365), "last_run_id": 1, "skipped_fire_at": None, "skipped_reason": None}
    st, changed = state_from_row(row, NOW, "0 3 * * sun @ UTC")
    assert changed and st.last_fire_at < NOW and st.armed_at < NOW
    plan, _ = decide_gear(POLICY, "hq", st, inputs(3), now=NOW, catchup_window=DAY, mode="auto")
    assert (plan.action, plan.trigger) == ("enqueue", "cron")  # the tick due now is not lost
    same, changed = state_from_row({**row, "armed_at": utc(2026, 1, 1), "last_fire_at": utc(2026, 11, 15, 3)}, NOW,
                                   "0 3 * * sun @ UTC")
    assert not changed and same.last_fire_at == utc(2026, 11, 15, 3)
    _, rearmed = state_from_row({**row, "armed_at": utc(2026, 1, 1), "last_fire_at": None}, NOW, "0 4 * * sun @ UTC")
    assert rearmed  # a changed cron expression re-arms
