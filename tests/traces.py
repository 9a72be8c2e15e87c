"""Write Atlas-SDK-shaped sessions (and their atlasd.intake rows) into a test database.

Events have the SDK's IntermediateStep shape: actor under ``payload.metadata.actor`` and text
under ``payload.data``."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from atlasd import intake


def event(actor: str, text: str, key: str = "output", event_type: str = "LLM_END") -> dict[str, Any]:
    return {
        "parent_id": "root",
        "function_ancestry": {"function_name": "agent"},
        "payload": {"event_type": event_type, "event_timestamp": 1.0, "name": "llm",
                    "metadata": {"actor": actor}, "data": {key: text},
                    "usage_info": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
    }


def add_session(conn: psycopg.Connection, *, task: str, final_answer: str | None = None,
                events: list[dict] | None = None, plan: list[str] | None = None,
                steps: list[dict] | None = None, guidance: list[tuple[int, str]] | None = None,
                review_status: str = "approved", status: str = "succeeded", reward: float | None = 0.9,
                learning_key: str = "math", age_days: float = 0.0, intake: bool = True,
                malformed: str | None = None, revoked: bool = False) -> tuple[int, int | None]:
    """Insert one session (+ plan, steps, guidance, events) and, if ``intake``, its intake row.
    ``steps``: dicts with step_id, output, trace. Returns (session_id, intake seq or None)."""
    sid = conn.execute(
        """INSERT INTO sessions (task, status, metadata, final_answer, reward_stats, review_status, created_at)
           VALUES (%s, %s, %s, %s, %s, %s, now() - make_interval(secs => %s)) RETURNING id""",
        [task, status, json.dumps({"learning_key": learning_key}), final_answer,
         json.dumps({"score": reward}) if reward is not None else None, review_status, age_days * 86400],
    ).fetchone()[0]
    if plan is not None:
        conn.execute("INSERT INTO plans (session_id, plan) VALUES (%s, %s)",
                     [sid, json.dumps({"steps": [{"id": i + 1, "description": d, "depends_on": []}
                                                 for i, d in enumerate(plan)]})])
    for st in steps or []:
        conn.execute("INSERT INTO step_results (session_id, step_id, trace, output, attempts) VALUES (%s, %s, %s, %s, 1)",
                     [sid, st["step_id"], st.get("trace"), st.get("output")])
    for n, (step_id, note) in enumerate(guidance or []):
        conn.execute("INSERT INTO guidance_notes (session_id, step_id, sequence, note) VALUES (%s, %s, %s, %s)",
                     [sid, step_id, n, note])
    for ev in events or []:
        conn.execute("INSERT INTO trajectory_events (session_id, event) VALUES (%s, %s)", [sid, json.dumps(ev)])
    seq = None
    if intake:
        seq = conn.execute(
            """INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at, malformed,
                                          revoked_at, task_key)
               SELECT %s, %s, %s, created_at, %s, CASE WHEN %s THEN now() END, atlasd.task_key(task)
                 FROM sessions WHERE id = %s
               RETURNING seq""",
            [sid, learning_key, reward, malformed, revoked, sid],
        ).fetchone()[0]
    return sid, seq


def arithmetic_session(conn: psycopg.Connection, a: int, b: int, **kw) -> tuple[int, int | None]:
    """A small verifiable problem whose teacher turn ends with the answer."""
    return add_session(
        conn, task=f"Tom has {a} apples and buys {b} more. How many apples?", final_answer=str(a + b),
        plan=["add the numbers"],
        events=[event("student", f"What is {a} + {b}?", key="input"),
                event("teacher", f"{a} + {b} = {a + b}. Final Answer: {a + b}")],
        **kw,
    )


def eval_split_ids(conn: psycopg.Connection, salt: str, eval_fraction: float) -> list[int]:
    """Session ids of the intake rows in the eval split (atlasd.in_eval_split), by intake seq."""
    return [r[0] for r in conn.execute(
        f"SELECT i.session_id FROM atlasd.intake i WHERE {intake.IN_EVAL_SPLIT} ORDER BY i.seq",
        {"split_salt": salt, "split_threshold": intake.split_threshold(eval_fraction)}).fetchall()]
