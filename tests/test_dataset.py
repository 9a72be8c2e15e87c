"""Dataset building from SDK-shaped rows in a real PostgreSQL: conversations, filters and skip
reasons, rehearsal, the frozen eval split, poison rows (oversized sessions, scores no float can
hold), reading in short statements that never hold the SDK's ALTER TABLE (lock waits retried,
pages halved past statement_timeout, any page size reads the same) and prompt truncation in
O(log n) tokenizations."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from atlasd.runspec import RunSpec
from tests.traces import add_session, arithmetic_session, eval_split_ids, event
from trainers import dataset
from trainers.dataset import (
    DatasetError,
    Example,
    _build,
    _params,
    _read_sessions,
    _Reader,
    _select,
    build_dataset,
    encode_prompt,
    eval_set_hash,
    rehearsal_size,
    split_salt,
)


def make_spec(db_url: str, **traces) -> RunSpec:
    ev = traces.pop("eval", {})
    return RunSpec.model_validate({
        "run_id": 1, "policy": "math", "gear": "fast", "teacher": "t", "student": "s", "base_student": "s",
        "output_dir": "/tmp/unused", "traces": {"db_url": db_url, "window_hi": 10**9, "min_reward": 0.5,
                                                "rehearsal_fraction": 0.0, **traces},
        "eval": {"eval_fraction": 0.01, **ev},
    })


def test_conversations_from_events_steps_and_final_answer(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        ev_sid, _ = add_session(
            conn, task="What is 2 + 3?", final_answer="5", plan=["read", "add"],
            events=[event("student", "the student's own prompt", key="input", event_type="LLM_START"),
                    event("student", "Let me think"), event("student", "2 and 3?"),  # merged: one user turn
                    event("teacher", "Add them."), event("executor", "Let me think"),  # a repeat: dropped
                    event("executor", "x", event_type="TOOL_START", key="input"), event("executor", "2 + 3 = 5",
                                                                                       event_type="TOOL_END"),
                    event("coach", "Final Answer: 5"), event("unknown", "ignored"), event("student", "thanks")],
        )
        st_sid, _ = add_session(
            conn, task="Steps only", final_answer="9",
            steps=[{"step_id": 2, "output": None, "trace": "trace two"}, {"step_id": 1, "output": "out one"}],
            guidance=[(1, "guide one"), (2, "guide two")],
        )
        fa_sid, _ = add_session(conn, task="No teacher", final_answer="#### 7",
                                events=[event("student", "I computed 7")])
        bare_sid, _ = add_session(conn, task="Nothing at all", final_answer=None)
    build = build_dataset(make_spec(db_url, examples="last_turn"))
    by_id = {e.session_id: e for e in build.train}
    ex = by_id[ev_sid]
    assert ex.prompt == [
        {"role": "system", "content": "Task: What is 2 + 3?\nPlan:\n1. read\n2. add"},
        {"role": "user", "content": "Let me think\n\n2 and 3?"},
        {"role": "assistant", "content": "Add them."},
        {"role": "user", "content": "2 + 3 = 5"},
    ]
    assert ex.completion == "Final Answer: 5" and ex.reference == "5"  # trailing user turn dropped
    ex = by_id[st_sid]  # step fallback: output (else trace) -> user, then its guidance -> assistant, by step id
    assert [m["content"] for m in ex.prompt] == ["Task: Steps only", "out one", "guide one", "trace two"]
    assert ex.completion == "guide two"
    ex = by_id[fa_sid]  # no assistant turn: the task answered by the final answer, without the session's work
    assert ex.prompt[1:] == [{"role": "user", "content": "No teacher"}] and ex.completion == "#### 7"
    assert bare_sid not in by_id and build.skipped == {"no_completion": 1}
    per_turn = [e for e in build_dataset(make_spec(db_url)).train if e.session_id in (ev_sid, st_sid)]
    assert [(e.session_id, e.completion, e.reference) for e in per_turn] == [
        (ev_sid, "Add them.", "Add them."), (ev_sid, "Final Answer: 5", "5"),
        (st_sid, "guide one", "guide one"), (st_sid, "guide two", "9")]
    assert per_turn[0].prompt == by_id[ev_sid].prompt[:2]


def test_filters_and_skip_reasons(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        good, _ = arithmetic_session(conn, 1, 2)
        arithmetic_session(conn, 1, 3, malformed="events not JSON")
        arithmetic_session(conn, 1, 4, revoked=True)
        quarantined, _ = arithmetic_session(conn, 1, 5)
        conn.execute("UPDATE sessions SET review_status = 'quarantined' WHERE id = %s", [quarantined])
        arithmetic_session(conn, 1, 6, status="failed")
        arithmetic_session(conn, 1, 7, reward=0.2)
        arithmetic_session(conn, 1, 8, reward=None)
        arithmetic_session(conn, 1, 9, learning_key="other")
        arithmetic_session(conn, 1, 10, age_days=30)
        deleted, _ = arithmetic_session(conn, 1, 11)
        conn.execute("DELETE FROM sessions WHERE id = %s", [deleted])
        arithmetic_session(conn, 1, 12, intake=False)  # not recorded by the daemon: not in any window
    build = build_dataset(make_spec(db_url, learning_key="math", max_age_days=7))
    assert [e.session_id for e in build.train] == [good]
    assert build.skipped == {"malformed": 1, "revoked": 1, "not_approved_succeeded": 2, "low_reward": 2,
                             "other_learning_key": 1, "too_old": 1, "session_deleted": 1}


def test_window_bounds_and_rehearsal(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = [arithmetic_session(conn, i, i) for i in range(40)]
    seqs = [seq for _, seq in rows]
    lo, hi = seqs[29], seqs[35]  # window: 6 new rows; 30 older
    spec = make_spec(db_url, window_lo=lo, window_hi=hi, rehearsal_fraction=0.25, rehearsal_seed=3)
    build = build_dataset(spec)
    window_ids = {sid for sid, seq in rows if lo < seq <= hi}
    new = [e for e in build.train if e.source == "window"]
    old = [e for e in build.train if e.source == "rehearsal"]
    assert {e.session_id for e in new} == window_ids
    assert len(old) == rehearsal_size(6, 0.25) == 2 and all(e.seq <= lo for e in old)
    assert [e.session_id for e in build_dataset(spec).train] == [e.session_id for e in build.train]  # deterministic
    other_seeds = {tuple(e.session_id for e in build_dataset(spec.model_copy(update={
        "traces": spec.traces.model_copy(update={"rehearsal_seed": s})})).train if e.source == "rehearsal")
        for s in range(6)}
    assert len(other_seeds) > 1  # the seed picks the sample


def test_frozen_eval_split_is_stable_and_disjoint(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = [arithmetic_session(conn, i, 1) for i in range(60)]
    spec = make_spec(db_url, eval={"eval_fraction": 0.3, "max_samples": 5})
    salt = split_salt(spec)
    assert salt == "math"
    with psycopg.connect(db_url, autocommit=True) as conn:
        split = set(eval_split_ids(conn, salt, 0.3))
    in_split = [(sid, seq) for sid, seq in rows if sid in split]
    assert 6 <= len(in_split) <= 35
    build = build_dataset(spec)
    eval_ids = [e.session_id for e in build.eval]
    assert eval_ids == [sid for sid, _ in in_split[:5]]  # first max_samples by intake seq
    train_ids = {e.session_id for e in build.train}
    assert not train_ids & {sid for sid, _ in in_split}  # the whole split is excluded from training
    assert len(train_ids) == 60 - len(in_split)
    assert build.eval_set_hash == eval_set_hash(reversed(build.eval))
    # a later window: the same eval set once max_samples exist
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(20):
            arithmetic_session(conn, 100 + i, 1)
    later = build_dataset(make_spec(db_url, window_lo=rows[-1][1], eval={"eval_fraction": 0.3, "max_samples": 5}))
    assert [e.session_id for e in later.eval] == eval_ids and later.eval_set_hash == build.eval_set_hash
    # another salt, another split
    salted = build_dataset(make_spec(db_url, eval={"eval_fraction": 0.3, "max_samples": 5, "split_salt": "x"}))
    assert [e.session_id for e in salted.eval] != eval_ids


def test_db_errors_do_not_leak_the_password():
    spec = make_spec("postgresql://postgres:s3cret-pw@127.0.0.1:1/nope")
    with pytest.raises(Exception) as info:
        build_dataset(spec)
    assert "s3cret-pw" not in str(info.value)


def test_prompt_truncation_keeps_the_system_message(tiny_models):
    from trainers.models import load_tokenizer

    tok = load_tokenizer(tiny_models[1])
    messages = [{"role": "system", "content": "Task: keep me"}] + [
        {"role": "user" if i % 2 else "assistant", "content": f"turn {i} " + "word " * 20} for i in range(8)
    ]
    full, cut = encode_prompt(tok, messages, 10_000)
    assert not cut
    ids, cut = encode_prompt(tok, messages, len(full) // 2)
    text = tok.decode(ids)
    assert cut and len(ids) <= len(full) // 2
    assert text.startswith("<|im_start|>system\nTask: keep me") and "turn 7" in text and "turn 0" not in text
    assert text.endswith("<|im_start|>assistant\n")
    ids, _ = encode_prompt(tok, messages[:1] + [{"role": "user", "content": "x " * 500}], 40)
    text = tok.decode(ids)
    assert len(ids) == 40 and text.startswith("<|im_start|>system\nTask: keep") and text.endswith("assistant\n")


def test_snapshot_roundtrip(tmp_path: Path):
    from trainers.dataset import load_examples, save_examples

    ex = [Example(1, 2, [{"role": "system", "content": "Task: é"}], "c", "r", "rehearsal")]
    save_examples(ex, tmp_path / "d" / "train.jsonl")
    assert load_examples(tmp_path / "d" / "train.jsonl") == ex


def noise(n: int, seed: object) -> str:
    """``n`` characters of hex that do not compress."""
    return "".join(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(n // 64 + 1))[:n]


def test_oversized_sessions_are_skipped_unread(db_url):
    cap = 20_000
    with psycopg.connect(db_url, autocommit=True) as conn:
        def big(kind: str, n: int) -> int:
            if kind == "events":  # many events, each small: their sum is over the cap
                evs = [event("student", "q", key="input")] + [event("teacher", noise(6_000, (n, i))) for i in range(4)]
                return add_session(conn, task=f"big {n}", final_answer="1", events=evs)
            if kind == "compressible":  # stored compressed far below the cap, 1 MB as text
                return add_session(conn, task=f"big {n}", final_answer="1", events=[event("teacher", "a" * 1_000_000)])
            if kind == "stored":  # stored over the cap: measured without being decompressed
                return add_session(conn, task=f"big {n}", final_answer="1", events=[event("teacher", noise(60_000, n))])
            return add_session(conn, task=f"big {n}", final_answer="1",  # steps and guidance count too
                               steps=[{"step_id": 1, "output": noise(15_000, n)}], guidance=[(1, noise(6_000, -n))])

        old = [big(kind, n) for n, kind in enumerate(["events", "compressible", "stored", "steps"])]
        window = [arithmetic_session(conn, i, 1) for i in range(3)]
        window += [big(kind, 10 + n) for n, kind in enumerate(["events", "compressible", "stored", "steps"])]
    everything = [sid for sid, _ in old + window]
    fine = [sid for sid, _ in window[:3]]
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert not set(everything) & set(eval_split_ids(conn, "math", 0.01))  # none in the 1 % split

    spec = make_spec(db_url, window_lo=old[-1][1], rehearsal_fraction=0.5, rehearsal_seed=1, max_session_bytes=cap)
    build = build_dataset(spec)
    assert [e.session_id for e in build.train] == fine and build.n_rehearsal == 0
    assert build.skipped == {"oversized": 4 + rehearsal_size(3, 0.5)}  # the window's 4, 3 of the old 4 sampled
    with psycopg.connect(db_url, autocommit=True) as conn:  # what the trainer reads of them: sizes, no content
        reader = _Reader(conn)
        params = _params(spec, now=conn.execute("SELECT now()").fetchone()[0])
        window = {key: (seq, "window", None) for seq, key, reason in _select(reader, spec, params, with_train=True).window
                  if reason is None}
        sessions = _read_sessions(reader, params, window)
        fine_bytes = conn.execute("SELECT sum(octet_length(event::text)) FROM trajectory_events"
                                  " WHERE session_id = ANY(%s)", [fine]).fetchone()[0]
    over = [s for s in sessions.values() if s.state == "oversized"]
    assert len(over) == 4 and all(s.examples is None and not s.events for s in over)
    assert reader.stats.event_bytes == fine_bytes  # not one event of an oversized session was fetched
    assert build_dataset(make_spec(db_url, window_lo=old[-1][1])).skipped == {}  # under the default 8 MiB cap

    # in the frozen eval set: skipped and counted, the rest of the set stays
    with psycopg.connect(db_url, autocommit=True) as conn:
        in_split = [sid for sid in eval_split_ids(conn, "math", 0.5) if sid in everything]
    assert set(in_split) - set(fine)  # the split holds oversized sessions
    build = build_dataset(make_spec(db_url, max_session_bytes=cap, eval={"eval_fraction": 0.5, "max_samples": 100}))
    assert [e.session_id for e in build.eval] == [sid for sid in in_split if sid in fine]
    assert build.skipped == {"oversized": 8}  # each of the 8 once: from the window or from the eval set


def test_default_cap_skips_a_session_over_8_mib(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        good, _ = arithmetic_session(conn, 1, 1)
        huge, _ = add_session(conn, task="huge", final_answer="1",
                              events=[event("teacher", "x" * (4 << 20)), event("teacher", "y" * (4 << 20))])
    build = build_dataset(make_spec(db_url))
    assert [e.session_id for e in build.train] == [good] and build.skipped == {"oversized": 1}


SCORES = ['{"score": 1e-400}', '{"score": "high"}', '{"score": 1e-330}', '[0.9]', '"0.9"', '{"score": 1e400}']


def test_eligibility_is_the_recorded_one_and_no_stored_score_fails_the_build(db_url):
    """A session rescored after its approval keeps the eligibility the intake recorded (the cadence
    counted it with that): the build reads no live score, so no stored value (1e-400, text, 1e400)
    can fail it; malformed rows stay out."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        # the stand-in SDK schema indexes the score as float8; the SDK's own schema does not
        conn.execute("DROP INDEX sessions_reward_score_idx")
        rescored, malformed = [], []
        for n, raw in enumerate(SCORES):
            sid, _ = arithmetic_session(conn, n, 1)  # recorded usable; the SDK rescored it afterwards
            conn.execute("UPDATE sessions SET reward_stats = %s::jsonb WHERE id = %s", [raw, sid])
            rescored.append(sid)
            sid, _ = arithmetic_session(conn, n, 2, malformed="reward_stats.score is outside [0, 1]")
            conn.execute("UPDATE sessions SET reward_stats = %s::jsonb WHERE id = %s", [raw, sid])
            malformed.append(sid)
        window_rows = [arithmetic_session(conn, n, 3) for n in range(4)]
        in_split = set(eval_split_ids(conn, "math", 0.3))
    window = [sid for sid, _ in window_rows]
    usable = set(window + rescored)
    assert in_split & set(rescored + malformed)  # the split holds some of them
    # every set reads them: the window, the rehearsal sample of the older rows, the eval split
    build = build_dataset(make_spec(db_url, window_lo=window_rows[0][1] - 1, rehearsal_fraction=0.5,
                                    eval={"eval_fraction": 0.3}))
    rehearsal = {e.session_id for e in build.train if e.source == "rehearsal"}
    assert rehearsal and rehearsal <= set(rescored) - in_split
    assert [e.session_id for e in build.eval] == sorted(usable & in_split)
    build = build_dataset(make_spec(db_url))
    assert {e.session_id for e in build.train} == usable
    assert build.skipped == {"malformed": 6}


# --- reading in short statements: the SDK's ALTER TABLE is never held ---------------------------
def add_history(conn: psycopg.Connection, n: int) -> None:
    """``n`` approved, succeeded 'math' sessions recorded by the intake (every 10th below min_reward),
    each with a plan and two small events, written set-based (200,000 in a few seconds)."""
    conn.execute(f"""
        INSERT INTO sessions (task, status, metadata, final_answer, reward_stats, review_status, created_at)
        SELECT 'Tom has ' || g || ' apples and buys 1 more. How many apples?', 'succeeded',
               '{{"learning_key": "math"}}', (g + 1)::text,
               jsonb_build_object('score', CASE WHEN g % 10 = 0 THEN 0.2 ELSE 0.9 END), 'approved',
               now() - make_interval(secs => {n} - g)
          FROM generate_series(1, {n}) g""")
    conn.execute("""INSERT INTO plans (session_id, plan)
                    SELECT id, '{"steps": [{"id": 1, "description": "add the numbers", "depends_on": []}]}'
                      FROM sessions""")
    conn.execute("""
        INSERT INTO trajectory_events (session_id, event)
        SELECT s.id, jsonb_build_object('payload', jsonb_build_object(
                   'metadata', jsonb_build_object('actor', a.actor), 'data', jsonb_build_object(a.key, a.txt || s.id)))
          FROM sessions s, (VALUES (1, 'student', 'input', 'What is this? '),
                                   (2, 'teacher', 'output', 'Final Answer: ')) a(k, actor, key, txt)
         ORDER BY s.id, a.k""")
    conn.execute("""INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at)
                    SELECT id, 'math', (reward_stats->>'score')::float8, created_at FROM sessions ORDER BY id""")
    conn.execute("ANALYZE")


PROBE = "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS atlasd_probe int"  # what the SDK runs on every connect


def test_the_sdks_alter_table_is_never_held_by_a_build(db_url):
    """200,000 sessions: while the trainer reads them, the SDK's ALTER TABLE (ACCESS EXCLUSIVE on
    sessions, even when the column exists) runs every 100 ms with lock_timeout 1 s: none times out,
    and the build reads what it reads without them."""
    n = 200_000
    with psycopg.connect(db_url, autocommit=True) as conn:
        add_history(conn, n)
        conn.execute(PROBE)
        with psycopg.connect(db_url) as holder:  # the no-op ALTER still needs the lock
            holder.execute("SELECT 1 FROM sessions LIMIT 1")
            conn.execute("SET lock_timeout = '100ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                conn.execute(PROBE)
    spec = make_spec(db_url, window_lo=n // 2, learning_key="math", rehearsal_fraction=0.1, rehearsal_seed=7,
                     eval={"eval_fraction": 0.01, "max_samples": 200})
    quiet = build_dataset(spec)
    assert len(quiet.train) > n // 2 * 0.85 and quiet.n_rehearsal > 0 and len(quiet.eval) == 200

    with ThreadPoolExecutor(1) as pool, psycopg.connect(db_url, autocommit=True) as sdk:
        sdk.execute("SET lock_timeout = '1s'")
        running = pool.submit(_build, spec)
        probes, failures, longest = 0, [], 0.0
        while not running.done():
            start = time.monotonic()
            try:
                sdk.execute(PROBE)
            except psycopg.errors.LockNotAvailable as exc:
                failures.append(str(exc))
            probes += 1
            longest = max(longest, time.monotonic() - start)
            time.sleep(0.1)
        build, stats = running.result()
    assert not failures, (failures, stats)
    assert probes >= 20, probes  # the build took seconds: the ALTER ran all along
    assert (build.train, build.eval, build.skipped) == (quiet.train, quiet.eval, quiet.skipped)
    print(f"\n{probes} ALTERs, the longest waited {longest:.3f} s; {stats}")


def test_a_statement_that_waits_for_a_lock_is_retried(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        ids = [arithmetic_session(conn, i, 1)[0] for i in range(12)]
    spec = make_spec(db_url, eval={"eval_fraction": 0.2})
    quiet = build_dataset(spec)
    assert len(quiet.train) + len(quiet.eval) == len(ids)
    locked = threading.Event()

    def hold(seconds: float) -> None:
        with psycopg.connect(db_url) as conn:
            conn.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
            locked.set()
            time.sleep(seconds)

    with ThreadPoolExecutor(1) as pool:  # held 1.5 s: the first statement on sessions times out once, then succeeds
        holder = pool.submit(hold, 1.5)
        locked.wait(10)
        start = time.monotonic()
        build, stats = _build(spec)
        holder.result()
    assert stats.lock_retries >= 1 and time.monotonic() - start >= 1.0
    assert (build.train, build.eval, build.skipped) == (quiet.train, quiet.eval, quiet.skipped)


def test_a_lock_held_past_the_retries_fails_the_build_cleanly(db_url, monkeypatch):
    monkeypatch.setattr(dataset, "LOCK_TIMEOUT_MS", 100)
    monkeypatch.setattr(dataset, "LOCK_BACKOFF_S", 0.01)
    monkeypatch.setattr(dataset, "LOCK_RETRIES", 2)
    with psycopg.connect(db_url, autocommit=True) as conn:
        arithmetic_session(conn, 1, 1)
    with psycopg.connect(db_url) as holder:
        holder.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatasetError, match="LockNotAvailable"):
            build_dataset(make_spec(db_url))


def test_a_page_over_statement_timeout_is_retried_at_half_its_size(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 150")
        reader = _Reader(conn)
        rows, size = reader.shrinking("sleep", "SELECT pg_sleep(%(n)s * 0.04), %(n)s", lambda n: {"n": n}, 16)
    assert (size, rows[0][1], reader.stats.cancelled) == (2, 2, 3)  # 16, 8, 4 cancelled; 2 took 80 ms


def test_tiny_pages_and_event_ranges_read_the_same_dataset(db_url, monkeypatch):
    """Every page boundary: intake pages of 2 rows, 1-3 sessions per statement, event ranges from
    one id up, an oversized session crossing ranges: the same examples, reasons and counts."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(30):
            kind = i % 6
            if kind == 0:
                arithmetic_session(conn, i, 1, reward=0.1)
            elif kind == 1:  # events over the cap, one range at a time
                add_session(conn, task=f"big {i}", final_answer="1",
                            events=[event("teacher", noise(1_500, (i, k))) for k in range(4)])
            elif kind == 2:
                add_session(conn, task=f"steps {i}", final_answer="2", steps=[{"step_id": 1, "output": "o"}],
                            guidance=[(1, "g1"), (1, "g2")])
            else:
                arithmetic_session(conn, i, 2)
            if i % 4 == 0:  # another session's event between this one's
                conn.execute("INSERT INTO trajectory_events (session_id, event) VALUES (1, %s)",
                              [json.dumps(event("student", f"late {i}"))])
        seqs = [r[0] for r in conn.execute("SELECT seq FROM atlasd.intake ORDER BY seq")]
    spec = make_spec(db_url, window_lo=seqs[9], max_session_bytes=5_000, rehearsal_fraction=0.4,
                     eval={"eval_fraction": 0.2, "max_samples": 3})
    default, default_stats = _build(spec)
    assert default.n_rehearsal and default.skipped["oversized"] and default.skipped["low_reward"]
    monkeypatch.setattr(dataset, "SCAN_PAGE", 2)
    monkeypatch.setattr(dataset, "SESSION_PAGE", 3)
    monkeypatch.setattr(dataset, "EVENT_CHUNK", 1)
    monkeypatch.setattr(dataset, "CONTENT_BYTES", 1)
    tiny, stats = _build(spec)
    assert (tiny.train, tiny.eval, tiny.skipped) == (default.train, default.eval, default.skipped)
    assert stats.statements > 40
    # one range at a time, an oversized session's first events are read before its size is known
    # (then dropped); in one range none of them is
    assert stats.event_bytes > default_stats.event_bytes
    assert build_dataset(spec, with_train=False).eval == default.eval


def quadratic_encode_prompt(tokenizer, messages, max_tokens):
    """encode_prompt as it was: one re-tokenization of the whole conversation per dropped turn."""

    def ids_of(msgs):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = ids_of(messages)
    if len(ids) <= max_tokens:
        return ids, False
    msgs = list(messages)
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    while len(ids) > max_tokens and len(msgs) - first > 1:
        del msgs[first]
        ids = ids_of(msgs)
    if len(ids) > max_tokens:
        head = max_tokens // 2
        ids = ids[:head] + ids[len(ids) - (max_tokens - head):]
    return ids, True


class CountingTokenizer:
    """The tokenizer, counting tokenizations and the tokens they produced."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.tokens = tokenizer, 0, 0

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, text, **kwargs):
        out = self.tokenizer(text, **kwargs)
        self.calls += 1
        self.tokens += len(out["input_ids"])
        return out


def turns(n: int, system: bool = True, words: int = 12) -> list[dict[str, str]]:
    head = [{"role": "system", "content": "Task: keep me"}] if system else []
    return head + [{"role": "user" if i % 2 else "assistant", "content": f"turn {i} " + "word " * (words + i % 5)}
                   for i in range(n)]


def test_prompt_truncation_matches_dropping_turns_one_by_one(tiny_models):
    from trainers.models import load_tokenizer

    tok = load_tokenizer(tiny_models[1])
    checked = 0
    for system in (True, False):
        for n in (1, 2, 3, 5, 8, 13):
            messages = turns(n, system)
            full = len(encode_prompt(tok, messages, 10**6)[0])
            for max_tokens in sorted({*range(4, full + 3, max(1, full // 25)), full - 1, full}):
                assert encode_prompt(tok, messages, max_tokens) == quadratic_encode_prompt(tok, messages, max_tokens), \
                    (system, n, max_tokens)
                checked += 1
    assert checked > 250


def test_prompt_truncation_of_2000_turns_takes_log_n_tokenizations(tiny_models):
    from trainers.models import load_tokenizer

    tok = CountingTokenizer(load_tokenizer(tiny_models[1]))
    messages = turns(2000)
    start = time.monotonic()
    ids, cut = encode_prompt(tok, messages, 2048)
    elapsed = time.monotonic() - start
    full = len(tok.tokenizer(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"])
    assert cut and len(ids) <= 2048
    assert tok.calls <= 2 + math.ceil(math.log2(2000))  # the whole session once, then a binary search
    assert tok.tokens <= 3 * full  # the searched prompts shrink geometrically: not 2,000 whole sessions
    text = tok.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nTask: keep me") and "turn 1999 " in text
    assert text.endswith("<|im_start|>assistant\n")
    # the fewest dropped turns: one more kept turn would not fit
    kept = text.count("<|im_start|>") - 2
    longer = [messages[0]] + messages[len(messages) - kept - 1:]
    assert len(encode_prompt(tok.tokenizer, longer, 10**6)[0]) > 2048
    assert elapsed < 30


def test_the_eval_set_hash_names_its_content_not_only_its_ids() -> None:
    def ex(sid: int, task: str) -> Example:
        return Example(session_id=sid, seq=sid, prompt=[{"role": "system", "content": f"Task: {task}"}],
                       completion="Final Answer: 1", reference="1", source="eval")

    before = [ex(1, "a"), ex(2, "b")]
    assert eval_set_hash(before) == eval_set_hash(reversed(before))  # order does not matter
    assert eval_set_hash([ex(1, "a"), ex(2, "other task")]) != eval_set_hash(before)  # id 2 reused by another session
    assert eval_set_hash(before[:1]) != eval_set_hash(before)
