"""Dataset building from SDK-shaped rows in a real PostgreSQL: conversations, filters and skip
reasons, rehearsal, and the frozen eval split."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from atlasd.runspec import RunSpec
from tests.traces import add_session, arithmetic_session, event
from trainers.dataset import (
    build_dataset,
    encode_prompt,
    eval_set_hash,
    in_eval_split,
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
            events=[event("student", "Let me think", key="input"), event("teacher", "Add them.", key="chunk"),
                    event("executor", "2 + 3 = 5"), event("coach", "Final Answer: 5"),
                    event("unknown", "ignored"), event("student", "thanks")],
        )
        st_sid, _ = add_session(
            conn, task="Steps only", final_answer="9",
            steps=[{"step_id": 2, "output": None, "trace": "trace two"}, {"step_id": 1, "output": "out one"}],
            guidance=[(1, "guide one"), (2, "guide two")],
        )
        fa_sid, _ = add_session(conn, task="No teacher", final_answer="#### 7",
                                events=[event("student", "I computed 7")])
        bare_sid, _ = add_session(conn, task="Nothing at all", final_answer=None)
    build = build_dataset(make_spec(db_url))
    by_id = {e.session_id: e for e in build.train}
    ex = by_id[ev_sid]
    assert ex.prompt == [
        {"role": "system", "content": "Task: What is 2 + 3?\nPlan:\n1. read\n2. add"},
        {"role": "user", "content": "Let me think"},
        {"role": "assistant", "content": "Add them."},
        {"role": "user", "content": "2 + 3 = 5"},
    ]
    assert ex.completion == "Final Answer: 5" and ex.reference == "5"  # trailing user turn dropped
    ex = by_id[st_sid]  # step fallback: guidance -> assistant, output (else trace) -> user, by step id
    assert [m["content"] for m in ex.prompt] == ["Task: Steps only", "guide one", "out one"]
    assert ex.completion == "guide two"
    ex = by_id[fa_sid]  # no assistant turn: the final answer is the completion
    assert ex.prompt[-1] == {"role": "user", "content": "I computed 7"} and ex.completion == "#### 7"
    assert bare_sid not in by_id and build.skipped == {"no_completion": 1}


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
    in_split = [(sid, seq) for sid, seq in rows if in_eval_split(salt, sid, 0.3)]
    assert 6 <= len(in_split) <= 35  # the SQL hash and the Python hash agree on these
    build = build_dataset(spec)
    eval_ids = [e.session_id for e in build.eval]
    assert eval_ids == [sid for sid, _ in in_split[:5]]  # first max_samples by intake seq
    train_ids = {e.session_id for e in build.train}
    assert not train_ids & {sid for sid, _ in in_split}  # the whole split is excluded from training
    assert len(train_ids) == 60 - len(in_split)
    assert build.eval_set_hash == eval_set_hash(reversed(eval_ids))
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
    from trainers.dataset import Example, load_examples, save_examples

    ex = [Example(1, 2, [{"role": "system", "content": "Task: é"}], "c", "r", "rehearsal")]
    save_examples(ex, tmp_path / "d" / "train.jsonl")
    assert load_examples(tmp_path / "d" / "train.jsonl") == ex
