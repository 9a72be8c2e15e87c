"""Approved Atlas SDK sessions -> (prompt, completion) examples, read from PostgreSQL in short statements.

Which sessions (all through ``atlasd.intake``, the daemon's record of approved sessions):

- **window**: intake rows with ``window_lo < seq <= window_hi`` that are eligible as the cadence
  counted them (``atlasd.intake``: not malformed, not revoked, the spec's learning_key and
  min_reward as recorded at approval, max_age_days on the session's ``created_at``, outside the
  eval split) and whose session still exists and is still approved and succeeded;
- **rehearsal**: older rows (``seq <= window_lo``) passing the same checks, a deterministic sample
  (md5 of ``rehearsal_seed`` and session id) sized so that rehearsal is ``rehearsal_fraction`` of
  the training set's sessions;
- **eval** (frozen split, by task): rows for which ``atlasd.in_eval_split(salt, learning_key,
  task_key, eval_fraction * 2^60)`` holds (migration 0009; the same task run twice is on one side),
  salt = ``eval.split_salt`` as the runner resolved it from the policy's recorded split
  (atlasd/evalsplit.py), else the policy name. The eval set is the first ``eval.max_samples`` of
  them by intake seq up to ``window_hi`` (learning_key and min_reward apply, max_age_days does
  not, so the set never drifts). Split sessions are never trained on.

How a session becomes examples (docs/atlas-sdk.md, :func:`conversation`): a system message
``Task: ...`` plus ``Plan:`` lines, then user and assistant turns, strictly alternating. The
trajectory events give the turns by ``payload.event_type`` and actor (``payload.metadata.actor``:
teacher/coach -> assistant, student/executor -> user, system -> system; others, such as the SDK's
reward judge, are left out): an LLM_END's output (a streamed call's chunks joined), an assistant
actor's LLM inputs (what it saw; the student's own prompts are not shown), TOOL_END outputs as user
turns; repeats dropped, same-role turns merged. Without events the steps are used: step output
(else trace) -> user, then its guidance notes -> assistant. Each assistant turn is an example
(``traces.examples: per_turn``, the default; ``last_turn``: only the last; the eval set always
takes the last): the **prompt** is everything before it, the **completion** that turn, the reference
the session's ``final_answer`` (for an earlier turn: the turn). A session where no assistant turn
exists becomes the task (as the user turn) answered by its ``final_answer``, its own work (which
holds that answer) left out; with no final answer either it is skipped (``no_completion``).

Reading never holds a lock on an SDK table for long: the SDK runs ``ALTER TABLE sessions ADD
COLUMN IF NOT EXISTS`` on every connect, which needs an ACCESS EXCLUSIVE lock on ``sessions``, waits
for every statement holding a lock there and queues every later SDK statement behind it. Every
statement of a build runs on its own (autocommit: no transaction spans two of them) and is bounded
(a page of intake rows, a page of sessions, a range of event ids), with ``lock_timeout`` 1 s (a
statement that waited that long, say behind the SDK's queued ALTER, is retried after a backoff,
six times) and ``statement_timeout`` 5 s (a page over it is retried at half its size). In order:

1. ``atlasd.intake`` in pages by seq, the window first, each row with its session by primary key
   and identity (id, created_at): the window's rows and reasons, the eval set, the rehearsal sample
   (md5 order; only as many candidates as the window's usable rows can call for);
2. the wanted sessions' sizes without their events, by page (plans, step_results and
   guidance_notes by session_id);
3. ``trajectory_events`` (no index on ``session_id``) once, in ranges of its primary key: the wanted
   events' sizes, then the content of those whose session is still within
   ``traces.max_session_bytes`` (default 8 MiB). A session is dropped as ``oversized`` as soon as
   its bytes exceed the cap and no more of it is read: its content is never fetched when it is over
   the cap before its events or within one range, and at most the cap of it otherwise;
4. the remaining sessions' content, by page and identity (a window session deleted, or whose id
   was reused, since step 1 is skipped as ``session_deleted``), each turned into its example.

Sizes are measured in SQL: text as stored (never decompressed), JSON as text unless it is stored
over the cap. ``oversized`` is also counted for a session in the eval set or the rehearsal sample.
The clock of ``max_age_days`` is read once per build.

Long prompts are cut by :func:`encode_prompt` with O(log n) tokenizations of an n-turn session.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from atlasd import intake
from atlasd.runspec import RunSpec, manifest_path

ACTOR_ROLES = {"teacher": "assistant", "coach": "assistant", "student": "user", "executor": "user", "system": "system"}
# An LLM call's input messages (LangChain's ``type``, or a chat ``role``) -> roles; others are user turns.
MESSAGE_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
                 "tool": "user", "function": "user"}


@dataclass
class Example:
    session_id: int
    seq: int
    prompt: list[dict[str, str]]  # chat messages, the first is the system message
    completion: str  # reference completion (the last assistant turn)
    reference: str  # what the judge compares against: final_answer, else the completion
    source: str = "window"  # window | rehearsal | eval
    session_created_at: str | None = None  # the session's identity with session_id (ISO 8601; None: an older snapshot)
    learning_key: str | None = None  # as the intake recorded it: the eval set's slices (None: an older snapshot)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Example:
        return cls(**json.loads(line))


@dataclass
class DatasetBuild:
    train: list[Example]
    eval: list[Example]
    skipped: Counter = field(default_factory=Counter)  # window sessions by reason, + 'oversized' of eval/rehearsal
    n_window: int = 0  # examples from the window
    n_rehearsal: int = 0  # examples from the rehearsal sample
    window_sessions: int = 0  # the window's sessions those come from (the traces the run was fired on)

    @property
    def eval_set_hash(self) -> str:
        return eval_set_hash(self.eval)


class DatasetError(RuntimeError):
    """The dataset cannot be built; the message is safe to show (no DB URL)."""


def split_salt(spec: RunSpec) -> str:
    """The eval split's salt: as the runner resolved it (atlasd.evalsplit, the policy's recorded
    split), else the policy name."""
    return spec.eval.split_salt or spec.policy


def eval_set_hash(examples: Iterable[Example]) -> str:
    """The eval set's identity: its sessions and what each one asks and expects (prompt,
    completion, reference), in any order. Equal hashes mean the same eval content, also when the
    SDK's session ids were reused by other sessions."""
    items = sorted((e.session_id, hashlib.sha256(json.dumps([e.prompt, e.completion, e.reference], ensure_ascii=False,
                                                            sort_keys=True).encode()).hexdigest()) for e in examples)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


# --- SQL --------------------------------------------------------------------------------------
# Every statement below is short and bounded (a page of intake rows, a page of sessions, a range
# of event ids) and runs on its own in autocommit mode: no lock on an SDK table outlives it.

# Eligibility is atlasd.intake's (the cadence counts with the same parts: a gear that fires on N
# traces trains on those N): usable, the learning key and minimum reward as recorded, age, outside
# the policy's eval split. This build adds what only a live read can tell: the session still exists
# with the same identity and is still ready (the intake revokes such a row at its next poll).
# %(now)s: the build's clock, read once, so that every page applies the same age cut-off.
_READY = f"({intake.READY})"

# The reason a window row cannot be used (NULL: usable), in this order; then 'eval_split' (_scan).
_WINDOW_REASON = f"""
       CASE WHEN i.malformed IS NOT NULL THEN 'malformed'
            WHEN i.revoked_at IS NOT NULL THEN 'revoked'
            WHEN s.id IS NULL THEN 'session_deleted'
            WHEN NOT {_READY} THEN 'not_approved_succeeded'
            WHEN NOT {intake.KEY_OK} THEN 'other_learning_key'
            WHEN NOT {intake.REWARD_OK} THEN 'low_reward'
            WHEN NOT {intake.AGE_OK} THEN 'too_old'
       END"""  # then 'eval_split' when the row's split is true (_scan)
_USABLE = f"{intake.USABLE} AND s.id IS NOT NULL AND {_READY} AND {intake.KEY_OK} AND {intake.REWARD_OK}"

# One page of intake rows (seq in (after, upto], at most `page` of them: the statement is bounded
# by the page, not by how many rows match) with the session of the same identity (id, created_at),
# looked up by primary key (LATERAL ... OFFSET 0: never a hash join over all sessions). Per row:
# the window reason, and the conditions of the eval set (usable AND split) and of the rehearsal
# pool (usable AND age_ok AND NOT split), with WHERE semantics (NULL is false).
_SCAN = f"""
SELECT i.seq, i.session_id, i.session_created_at, {_WINDOW_REASON} AS reason,
       ({_USABLE}) IS TRUE AS usable, ({intake.AGE_OK}) IS TRUE AS age_ok, ({intake.IN_EVAL_SPLIT}) IS TRUE AS split,
       i.learning_key
  FROM ({intake.PAGE}) i
  LEFT JOIN LATERAL (SELECT id, review_status, status FROM sessions
                      WHERE id = i.session_id AND created_at = i.session_created_at OFFSET 0) s ON true
 ORDER BY i.seq
"""

# A page of sessions' bytes for the trainer, apart from their events: text columns by octet_length
# (the stored length, nothing is decompressed), JSON as text, except a JSON value stored larger than
# the cap, which is counted as stored and never decompressed. plans, step_results and
# guidance_notes are read by session_id (the SDK's primary keys start with it). Each session comes
# with its created_at: the caller keeps only the identity it selected.
_SIZES = """
WITH part AS (
  SELECT p.session_id, CASE WHEN pg_column_size(p.plan) > %(max_session_bytes)s THEN pg_column_size(p.plan)
                            ELSE octet_length(p.plan::text) END AS bytes
    FROM plans p WHERE p.session_id = ANY(%(ids)s::int[])
  UNION ALL
  SELECT r.session_id, coalesce(octet_length(r.output), 0) + coalesce(octet_length(r.trace), 0)
    FROM step_results r WHERE r.session_id = ANY(%(ids)s::int[])
  UNION ALL
  SELECT g.session_id, coalesce(octet_length(g.note), 0)
    FROM guidance_notes g WHERE g.session_id = ANY(%(ids)s::int[])),
sums AS (SELECT session_id, sum(bytes) AS bytes FROM part GROUP BY session_id)
SELECT s.id, s.created_at,
       octet_length(s.task) + coalesce(octet_length(s.final_answer), 0) + coalesce(sums.bytes, 0)
  FROM sessions s LEFT JOIN sums ON sums.session_id = s.id
 WHERE s.id = ANY(%(ids)s::int[])
"""

# trajectory_events has no index on session_id: it is read once, in ranges of its primary key.
# First each wanted event's size (the same measure as above) ...
_EVENT_SIZES = """
SELECT id, session_id, CASE WHEN pg_column_size(event) > %(max_session_bytes)s THEN pg_column_size(event)
                            ELSE octet_length(event::text) END
  FROM trajectory_events
 WHERE id > %(lo)s AND id <= %(hi)s AND session_id = ANY(%(ids)s::int[])
 ORDER BY id
"""
# ... then the content of those whose session is still within max_session_bytes.
_EVENTS = """
SELECT id, event::text FROM trajectory_events
 WHERE id > %(lo)s AND id <= %(hi)s AND id = ANY(%(want)s::int[])
 ORDER BY id
"""

# The content of a page of sessions within the cap, read last (a session not found here by its
# identity is gone: deleted since it was selected, or its id reused).
_CONTENT = """
WITH st AS (SELECT r.session_id,
                   jsonb_agg(jsonb_build_object('step_id', r.step_id, 'output', r.output, 'trace', r.trace)
                             ORDER BY r.step_id) AS steps
              FROM step_results r WHERE r.session_id = ANY(%(ids)s::int[]) GROUP BY r.session_id),
     gn AS (SELECT g.session_id,
                   jsonb_agg(jsonb_build_object('step_id', g.step_id, 'note', g.note)
                             ORDER BY g.step_id, g.sequence) AS guidance
              FROM guidance_notes g WHERE g.session_id = ANY(%(ids)s::int[]) GROUP BY g.session_id)
SELECT s.id, s.created_at, s.task, s.final_answer, p.plan, st.steps, gn.guidance
  FROM sessions s
  LEFT JOIN plans p ON p.session_id = s.id
  LEFT JOIN st ON st.session_id = s.id
  LEFT JOIN gn ON gn.session_id = s.id
 WHERE s.id = ANY(%(ids)s::int[])
"""


# --- conversation ----------------------------------------------------------------------------
def _text(value: Any) -> str:
    """Text of a value: a string; a chat message or chunk ({"content"} as a string or a list of text
    parts, else {"text"}), with its tool calls; anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict) and ("content" in value or "text" in value):
        content = value.get("content")
        if isinstance(content, list):
            content = "".join(p if isinstance(p, str) else str(p.get("text") or "") for p in content
                              if isinstance(p, (str, dict)))
        if not isinstance(content, str) or (not content and isinstance(value.get("text"), str)):
            content = value.get("text") if isinstance(value.get("text"), str) else ""
        calls = [f"Tool call: {c.get('name')}({json.dumps(c.get('args'), ensure_ascii=False, sort_keys=True)})"
                 for c in value.get("tool_calls") or [] if isinstance(c, dict)]
        return "\n".join(t for t in [content.strip(), *calls] if t)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _input_messages(value: Any) -> list[dict[str, str]]:
    """An LLM call's input as chat messages: LangChain's ``{"messages": [...]}`` (flat or one list per
    prompt), each message's ``type`` (or ``role``) mapped by MESSAGE_ROLES; any other input is one
    user message."""
    raw = value.get("messages") if isinstance(value, dict) else None
    if not isinstance(raw, list):
        text = _text(value)
        return [{"role": "user", "content": text}] if text else []
    flat = [m for item in raw for m in (item if isinstance(item, list) else [item])]
    out = []
    for m in flat:
        kind = str(m.get("type") or m.get("role") or "") if isinstance(m, dict) else ""
        role, text = MESSAGE_ROLES.get(kind.lower(), "user"), _text(m)
        if text:
            out.append({"role": role, "content": text})
    return out


def event_turns(events: Iterable[Any]) -> list[dict[str, str]]:
    """A session's trajectory events (IntermediateStep dumps, in id order) -> chat turns, in order,
    before duplicates are removed and same-role turns merged (turns()).

    Only events of a known actor (``payload.metadata.actor``, ACTOR_ROLES) count, by
    ``payload.event_type``: LLM_END: the call's output in the actor's role (the text, with any tool
    calls; a streamed call without an output: its LLM_NEW_TOKEN chunks joined, in the place of the
    first chunk). LLM_START (else the LLM_END's own input): what an assistant actor's call was
    given, as its system, user and tool messages (the assistant messages there are its earlier
    outputs, taken from their LLM_END: the input does not keep their tool calls). TOOL_END: the tool's output as a user turn. Everything else (the
    student's own prompts, TOOL_START, workflow, task, function and span events) is left out."""
    turns: list[dict[str, str]] = []
    streamed: dict[Any, dict[str, str]] = {}  # call UUID -> its turn built from chunks
    started: set[Any] = set()  # calls whose input was taken from their LLM_START
    for event in events:
        payload = event.get("payload") if isinstance(event, dict) else None
        if not isinstance(payload, dict):
            continue
        meta = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
        role = ACTOR_ROLES.get(str(meta.get("actor") or "").lower())
        data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        kind, call = payload.get("event_type"), payload.get("UUID")
        if role is None:
            continue
        if kind == "LLM_START" or (kind == "LLM_END" and call not in started):
            if role == "assistant":  # its own earlier turns in the input come from their LLM_END
                turns += [m for m in _input_messages(data.get("input")) if m["role"] != "assistant"]
            started.add(call)
        if kind == "LLM_NEW_TOKEN":
            chunk = data.get("chunk")  # a string, or the SDK's {"content"/"text": ...}; never stripped
            if isinstance(chunk, dict):
                chunk = chunk.get("content") if isinstance(chunk.get("content"), str) else chunk.get("text")
            text = chunk if isinstance(chunk, str) else ""
            if call not in streamed:
                streamed[call] = {"role": role, "content": ""}
                turns.append(streamed[call])
            streamed[call]["content"] += text
        elif kind == "LLM_END":
            text = _text(data.get("output"))
            if call in streamed:
                turn = streamed.pop(call)
                turn["content"] = text or turn["content"]
            elif text:
                turns.append({"role": role, "content": text})
        elif kind == "TOOL_END":
            text = _text(data.get("output"))
            if text:
                turns.append({"role": "user", "content": text})
    return [{"role": t["role"], "content": t["content"].strip()} for t in turns if t["content"].strip()]


def step_turns(steps: list | None, guidance: list | None) -> list[dict[str, str]]:
    """Without events: per step (by step id) its output, else its trace, as a user turn, then the
    guidance notes on it (the teacher's, given after the attempt) as assistant turns."""
    notes: dict[int, list[str]] = {}
    for g in guidance or []:
        if _text(g.get("note")):
            notes.setdefault(g.get("step_id"), []).append(_text(g["note"]))
    by_step = {s.get("step_id"): s for s in steps or []}
    turns = []
    for sid in sorted(set(by_step) | set(notes), key=lambda x: (x is None, x)):
        step = by_step.get(sid) or {}
        text = _text(step.get("output")) or _text(step.get("trace"))
        if text:
            turns.append({"role": "user", "content": text})
        turns += [{"role": "assistant", "content": n} for n in notes.get(sid, [])]
    return turns


def system_message(task: str, plan: Any) -> dict[str, str]:
    lines = [f"Task: {task.strip()}"]
    steps = plan.get("steps") if isinstance(plan, dict) else None
    if isinstance(steps, list) and steps:
        lines.append("Plan:")
        for n, step in enumerate(steps, 1):
            desc = _text(step.get("description")) if isinstance(step, dict) else _text(step)
            if desc:
                lines.append(f"{n}. {desc}")
    return {"role": "system", "content": "\n".join(lines)}


def conversation(task: str, plan: Any, events: list | None, steps: list | None, guidance: list | None,
                 final_answer: str | None) -> list[dict[str, str]]:
    """The session as chat messages: the system message (``Task:``, ``Plan:``, then any system
    message the model was given), then user and assistant turns strictly alternating, starting
    with a user turn: the turns from the events (event_turns), else from the steps (step_turns),
    without any turn whose text an earlier message already holds, same-role turns merged (blank
    line between). The task is the first user turn when the turns start with the assistant's.
    With no assistant turn at all, the model never answered in the session: the conversation is
    the task as the user turn and ``final_answer`` as the assistant's (the session's own work,
    which holds that answer, is left out); without a final answer, there is no assistant turn."""
    head = system_message(task, plan)
    body = event_turns(events or []) or step_turns(steps, guidance)
    if not any(t["role"] == "assistant" for t in body):
        body = [{"role": "assistant", "content": _text(final_answer)}] if _text(final_answer) else []
    seen = {head["content"]}
    turns: list[dict[str, str]] = []
    for t in body:
        if t["content"] in seen:
            continue
        seen.add(t["content"])
        if t["role"] == "system":
            head = {"role": "system", "content": head["content"] + "\n\n" + t["content"]}
        elif turns and turns[-1]["role"] == t["role"]:
            turns[-1] = {"role": t["role"], "content": turns[-1]["content"] + "\n\n" + t["content"]}
        else:
            turns.append(dict(t))
    if turns and turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": task.strip()})
    return [head, *turns]


def to_examples(row: dict, source: str, per_turn: bool = False) -> list[Example] | str:
    """The session's examples (``row``: session_id, seq, task, plan, events, steps, guidance,
    final_answer, learning_key), or the reason it has none (no_task, no_completion). One per assistant turn
    (``per_turn``), else one for its last: the prompt is the conversation before that turn, the
    completion that turn. The reference is ``final_answer`` for the last turn (the completion without
    one) and the turn itself for earlier ones."""
    if not _text(row.get("task")):
        return "no_task"
    messages = conversation(row["task"], row.get("plan"), row.get("events"), row.get("steps"), row.get("guidance"),
                            row.get("final_answer"))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return "no_completion"
    return [Example(session_id=row["session_id"], seq=row["seq"], prompt=messages[:i],
                    completion=messages[i]["content"], source=source, session_created_at=row.get("session_created_at"),
                    learning_key=row.get("learning_key"),
                    reference=(_text(row.get("final_answer")) if i == turns[-1] else "") or messages[i]["content"])
            for i in (turns if per_turn else turns[-1:])]


def to_example(row: dict, source: str) -> Example | str:
    """The session's example for its last assistant turn, or the reason it has none (to_examples)."""
    out = to_examples(row, source)
    return out if isinstance(out, str) else out[0]


# --- reading ----------------------------------------------------------------------------------
LOCK_TIMEOUT_MS = 1_000  # a statement waits at most this long for a lock (the SDK's ALTER may be queued) ...
LOCK_RETRIES = 6  # ... then it is retried, this many times, after LOCK_BACKOFF_S * 2**n (at most 2 s)
LOCK_BACKOFF_S = 0.1
STATEMENT_TIMEOUT_MS = 5_000  # a statement running longer is cancelled and retried on half its page
SCAN_PAGE = 5_000  # intake rows per selection statement
SESSION_PAGE = 1_000  # sessions per size or content statement ...
CONTENT_BYTES = 32 << 20  # ... and per content statement, at most this many of their bytes
EVENT_CHUNK = 50_000  # trajectory_events ids per statement at first, then adapted to take 0.25-1 s
EVENT_CHUNK_MAX = 1_000_000

Key = tuple[int, datetime]  # a session's identity: (sessions.id, sessions.created_at)


@dataclass
class ReadStats:
    """What reading cost: statements (each timed with its rows' transfer), lock waits retried,
    statements cancelled by statement_timeout, the longest statement."""
    statements: int = 0
    lock_retries: int = 0
    cancelled: int = 0
    longest: float = 0.0  # seconds
    longest_name: str = ""
    seconds: Counter = field(default_factory=Counter)  # per kind of statement: in all ...
    slowest: Counter = field(default_factory=Counter)  # ... and the longest one
    event_bytes: int = 0  # event content fetched (bytes as measured for max_session_bytes)


class _Reader:
    """Runs one short autocommit statement at a time. One that waited LOCK_TIMEOUT_MS for a lock
    (say behind the SDK's queued ALTER TABLE) is retried after a backoff, LOCK_RETRIES times; one
    cancelled by statement_timeout is retried on a smaller page (shrinking, halving)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn, self.stats = conn, ReadStats()

    def rows(self, name: str, sql: str, params: dict) -> list[tuple]:
        attempt = 0
        while True:
            start = time.monotonic()
            try:
                return self.conn.execute(sql, params).fetchall()
            except psycopg.errors.LockNotAvailable:
                if attempt == LOCK_RETRIES:
                    raise
            finally:
                self._timed(name, time.monotonic() - start)
            self.stats.lock_retries += 1
            time.sleep(min(LOCK_BACKOFF_S * 2**attempt, 2.0))
            attempt += 1

    def _timed(self, name: str, seconds: float) -> None:
        self.stats.statements += 1
        self.stats.seconds[name] += seconds
        self.stats.slowest[name] = max(self.stats.slowest[name], seconds)
        if seconds > self.stats.longest:
            self.stats.longest, self.stats.longest_name = seconds, name

    def shrinking(self, name: str, sql: str, params: Callable[[int], dict], size: int) -> tuple[list[tuple], int]:
        """rows() of the page of ``size`` that params(size) describes, halving ``size`` while the
        statement is cancelled by statement_timeout; returns the rows and the size used."""
        while True:
            try:
                return self.rows(name, sql, params(size)), size
            except psycopg.errors.QueryCanceled:
                if size <= 1:
                    raise
                self.stats.cancelled += 1
                size //= 2

    def halving(self, name: str, sql: str, params: Callable[[list], dict], items: list) -> list[tuple]:
        """rows() for the statement on ``items`` (ids, keys); cancelled by statement_timeout, it is
        run on each half instead."""
        try:
            return self.rows(name, sql, params(items))
        except psycopg.errors.QueryCanceled:
            if len(items) <= 1:
                raise
            self.stats.cancelled += 1
            half = len(items) // 2
            return self.halving(name, sql, params, items[:half]) + self.halving(name, sql, params, items[half:])


@dataclass
class _Session:
    """A wanted session as read: where it was selected, its bytes so far, its events until its
    content is read, then its Examples (or why it has none: no_task, no_completion)."""
    seq: int
    source: str  # window | rehearsal | eval
    learning_key: str | None  # as recorded by the intake
    bytes: int = 0
    state: str = "gone"  # ok | oversized | gone (deleted, or its id reused, since it was selected)
    events: list = field(default_factory=list)  # its trajectory events, in id order
    examples: list[Example] | str | None = None

    @property
    def outcome(self) -> list[Example] | str:
        """The Examples, or why the session is skipped."""
        if self.state == "ok":
            return self.examples
        return "session_deleted" if self.state == "gone" else self.state


@dataclass
class _Selection:
    window: list[tuple[int, Key, str | None]] = field(default_factory=list)  # (seq, key, reason), by seq
    eval: list[tuple[int, Key]] = field(default_factory=list)  # (seq, key), by seq
    rehearsal: list[tuple[int, Key]] = field(default_factory=list)  # the largest sample that can be needed, in order
    learning_keys: dict[Key, str | None] = field(default_factory=dict)  # of every selected row, as recorded


def _params(spec: RunSpec, **extra) -> dict:
    t = spec.traces
    return {
        "window_lo": t.window_lo, "window_hi": t.window_hi, "learning_key": t.learning_key,
        "min_reward": t.min_reward, "max_age_days": t.max_age_days, "rehearsal_seed": t.rehearsal_seed,
        "split_salt": split_salt(spec), "split_threshold": intake.split_threshold(spec.eval.eval_fraction),
        "eval_max": spec.eval.max_samples, "max_session_bytes": t.max_session_bytes, "examples": t.examples, **extra,
    }


def _rehearsal_order(seed: int, session_id: int, seq: int) -> tuple[str, int]:
    """The rehearsal sample's order: md5("seed:session_id") in hex (PostgreSQL's md5()), then seq."""
    return hashlib.md5(f"{seed}:{session_id}".encode()).hexdigest(), seq


def _scan(reader: _Reader, params: dict, after: int, upto: int) -> Iterator[list[tuple]]:
    """Pages of intake rows with seq in (after, upto], in seq order: (seq, session_id,
    session_created_at, reason, usable, age_ok, split, learning_key)."""
    size = SCAN_PAGE
    while after < upto:
        rows, size = reader.shrinking("select", _SCAN, lambda n, after=after: {
            **params, "after": after, "upto": upto, "page": n}, size)
        if rows:  # the last reason: in the frozen eval split (`split`, computed once per row)
            yield [(seq, sid, created, "eval_split" if reason is None and split else reason, usable, age_ok, split, key)
                   for seq, sid, created, reason, usable, age_ok, split, key in rows]
        if len(rows) < size:
            return
        after = rows[-1][0]


def _select(reader: _Reader, spec: RunSpec, params: dict, with_train: bool) -> _Selection:
    """The window's rows, the eval set and the rehearsal candidates, from pages of the intake.

    The window (lo, hi] is scanned first: its usable rows bound the rehearsal sample (rehearsal_size
    of them; the sample is smaller when some of them turn out unusable once read), so the older rows
    are sampled in the same pass as the eval set, keeping no more candidates than that."""
    t, sel = spec.traces, _Selection()
    eval_max = spec.eval.max_samples
    window_eval: list[tuple[int, Key]] = []
    k_max = 0
    if with_train:
        for page in _scan(reader, params, t.window_lo, t.window_hi):
            for seq, sid, created, reason, usable, _age_ok, split, learning_key in page:
                sel.window.append((seq, (sid, created), reason))
                sel.learning_keys[(sid, created)] = learning_key
                if usable and split and len(window_eval) < eval_max:
                    window_eval.append((seq, (sid, created)))
        k_max = rehearsal_size(sum(1 for _, _, reason in sel.window if reason is None), t.rehearsal_fraction)
    pool: list[tuple[tuple[str, int], Key, str | None]] = []  # ((md5, seq), key, learning key), trimmed to the k_max first
    for page in _scan(reader, params, 0, min(t.window_lo, t.window_hi) if with_train else t.window_hi):
        for seq, sid, created, _reason, usable, age_ok, split, learning_key in page:
            if usable and split and len(sel.eval) < eval_max:
                sel.eval.append((seq, (sid, created)))
                sel.learning_keys[(sid, created)] = learning_key
            elif k_max and usable and age_ok and not split:
                pool.append((_rehearsal_order(t.rehearsal_seed, sid, seq), (sid, created), learning_key))
        if len(pool) > 2 * k_max + SCAN_PAGE:
            pool = heapq.nsmallest(k_max, pool)
        if len(sel.eval) >= eval_max and not k_max:
            break
    sel.eval = (sel.eval + window_eval)[:eval_max]
    for order, key, learning_key in heapq.nsmallest(k_max, pool):
        sel.rehearsal.append((order[1], key))
        sel.learning_keys[key] = learning_key
    return sel


def _batches(keys: list[Key], sizes: dict[Key, int] | None = None) -> Iterator[list[Key]]:
    """Pages of at most SESSION_PAGE sessions (and CONTENT_BYTES of them, when sizes are given)."""
    batch: list[Key] = []
    total = 0
    for key in keys:
        n = sizes[key] if sizes else 0
        if batch and (len(batch) >= SESSION_PAGE or total + n > CONTENT_BYTES):
            yield batch
            batch, total = [], 0
        batch.append(key)
        total += n
    if batch:
        yield batch


def _ints(values: Iterable[int]) -> str:
    """An int[] literal (cast in SQL): far faster than psycopg's dumping of a long list."""
    return "{" + ",".join(map(str, values)) + "}"


def _read_sessions(reader: _Reader, params: dict, wanted: dict[Key, tuple[int, str, str | None]]) -> dict[Key, _Session]:
    """The wanted sessions ({key: (seq, source, learning key)}) read in three passes: their sizes without events,
    their events, their content. A session is 'oversized' as soon as its bytes so far exceed
    max_session_bytes, and no more of it is read; one not found by its identity in the first or the
    last pass is 'gone'. Each becomes its Examples as soon as its content is read (to_examples: one per
    assistant turn with ``examples: per_turn``, except in the eval set, else its last turn)."""
    cap = params["max_session_bytes"]
    keys = sorted(wanted)
    sessions = {key: _Session(*wanted[key]) for key in keys}

    def page(batch: list[Key]) -> dict:
        return {**params, "ids": _ints(sid for sid, _ in batch)}

    for batch in _batches(keys):
        for sid, created, size in reader.halving("sizes", _SIZES, page, batch):
            s = sessions.get((sid, created))
            if s is not None:
                s.state, s.bytes = ("ok" if size <= cap else "oversized"), size
    _read_events(reader, params, {key[0]: s for key, s in sessions.items() if s.state == "ok"})
    ok = [key for key in keys if sessions[key].state == "ok"]
    for key in ok:
        sessions[key].state = "gone"  # until its content is read, by identity
    for batch in _batches(ok, {key: sessions[key].bytes for key in ok}):
        for sid, created, task, final_answer, plan, steps, guidance in reader.halving("content", _CONTENT, page, batch):
            s = sessions.get((sid, created))
            if s is not None:
                row = {"session_id": sid, "session_created_at": created.isoformat(), "seq": s.seq, "task": task, "final_answer": final_answer, "plan": plan,
                       "steps": steps, "guidance": guidance, "events": s.events, "learning_key": s.learning_key}
                per_turn = params["examples"] == "per_turn" and s.source != "eval"
                s.state, s.examples, s.events = "ok", to_examples(row, s.source, per_turn), []
    return sessions


def _read_events(reader: _Reader, params: dict, wanted: dict[int, _Session]) -> None:
    """trajectory_events, once, in ranges of its primary key: per range the wanted sessions' event
    sizes, then the content of the events of the sessions still within max_session_bytes, kept in
    id order. A session over the cap leaves ``wanted`` (no later range asks for it)."""
    cap = params["max_session_bytes"]
    lo, last = reader.rows("events", "SELECT coalesce(min(id), 0)::bigint - 1, coalesce(max(id), 0) "
                                     "FROM trajectory_events", {})[0]
    chunk = EVENT_CHUNK
    while lo < last and wanted:
        start = time.monotonic()
        rows, chunk = reader.shrinking("event_sizes", _EVENT_SIZES, lambda n, lo=lo, ids=_ints(wanted): {
            **params, "lo": lo, "hi": lo + n, "ids": ids}, chunk)
        hi = lo + chunk
        for _, sid, size in rows:
            s = wanted.get(sid)
            if s is not None:
                s.bytes += size
                if s.bytes > cap:
                    s.state, s.events = "oversized", []
                    del wanted[sid]
        owner = {eid: sid for eid, sid, _ in rows if sid in wanted}
        batch, total = [], 0
        for n, (eid, _, size) in enumerate(row for row in rows if row[0] in owner):
            batch.append(eid)
            total += size
            if total >= CONTENT_BYTES or n == len(owner) - 1:
                reader.stats.event_bytes += total
                texts = reader.halving("events", _EVENTS, lambda ids, lo=lo, hi=hi: {
                    "lo": lo, "hi": hi, "want": _ints(ids)}, batch)
                for (event_id, _), event in zip(texts, json.loads("[" + ",".join(text for _, text in texts) + "]")):
                    wanted[owner[event_id]].events.append(event)
                batch, total = [], 0
        lo = hi
        took = time.monotonic() - start
        if took < 0.25 and chunk < EVENT_CHUNK_MAX:
            chunk *= 2
        elif took > 1.0 and chunk > 1_000:
            chunk //= 2


# --- building ---------------------------------------------------------------------------------
def rehearsal_size(n_window: int, fraction: float) -> int:
    """Rehearsal examples so that they are ``fraction`` of the training set: n * f / (1 - f), rounded."""
    return round(n_window * fraction / (1 - fraction)) if n_window and fraction else 0


def _connect(dsn: str, spec: RunSpec) -> psycopg.Connection:
    # autocommit: every statement is its own transaction, so no lock outlives it. No server-side
    # prepared statements: each statement is planned with its parameters (hashed = ANY(array)).
    conn = psycopg.connect(dsn, application_name=f"atlasd-trainer-{spec.run_id}", connect_timeout=10,
                           autocommit=True, prepare_threshold=None)
    try:
        conn.execute("SET default_transaction_read_only = on")
        conn.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT_MS)}")
        conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT_MS)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _build(spec: RunSpec, dsn: str | None = None, *, with_train: bool = True) -> tuple[DatasetBuild, ReadStats]:
    """build_dataset(), and what reading cost."""
    dsn = dsn or spec.traces.resolved_db_url()
    skipped: Counter = Counter()
    aside: Counter = Counter()  # why eval and rehearsal sessions were dropped: only 'oversized' is reported
    try:
        with _connect(dsn, spec) as conn:
            reader = _Reader(conn)
            now = reader.rows("now", "SELECT now()", {})[0][0]
            params = _params(spec, now=now)
            sel = _select(reader, spec, params, with_train)
            wanted = {key: (seq, "eval", sel.learning_keys[key]) for seq, key in sel.eval}
            wanted.update((key, (seq, "rehearsal", sel.learning_keys[key])) for seq, key in sel.rehearsal)
            wanted.update((key, (seq, "window", sel.learning_keys[key])) for seq, key, reason in sel.window if reason is None)
            sessions = _read_sessions(reader, params, wanted)
    except psycopg.Error as exc:  # psycopg messages name host/db/user, never the password
        raise DatasetError(f"reading traces failed: {type(exc).__name__}: {exc}".strip()) from None

    def examples(keys: Iterable[Key], reasons: Counter) -> list[Example]:
        out = []
        for key in keys:
            outcome = sessions[key].outcome
            if isinstance(outcome, str):
                reasons[outcome] += 1
            else:
                out += outcome
        return out

    eval_set = examples((key for _, key in sel.eval), aside)
    train: list[Example] = []
    n_sessions = 0  # window sessions with examples: the rehearsal sample is sized in sessions
    for _, key, reason in sel.window:
        if reason is None:
            found = examples([key], skipped)
            train += found
            n_sessions += bool(found)
        elif reason != "eval_split":
            skipped[reason] += 1
    k = rehearsal_size(n_sessions, spec.traces.rehearsal_fraction)
    rehearsal = examples((key for _, key in sorted(sel.rehearsal[:k])), aside)
    train += rehearsal
    if aside["oversized"]:
        skipped["oversized"] += aside["oversized"]
    build = DatasetBuild(train=train, eval=eval_set, skipped=skipped,
                         n_window=len(train) - len(rehearsal), n_rehearsal=len(rehearsal), window_sessions=n_sessions)
    return build, reader.stats


def build_dataset(spec: RunSpec, dsn: str | None = None, *, with_train: bool = True) -> DatasetBuild:
    """Window + rehearsal training examples and the frozen eval set, read from the Atlas database."""
    return _build(spec, dsn, with_train=with_train)[0]


def save_examples(examples: list[Example], path: Path) -> None:
    """The examples as JSON lines at ``path`` and, beside it, their manifest
    (``atlasd.runspec.manifest_path``: ``data/train.jsonl`` -> ``data/train.manifest.json``): the
    lineage of a run (atlasd/lineage.py records the training manifest, the registry logs both as
    the MLflow run's dataset inputs). The manifest is written first: a snapshot never lacks it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(manifest_path(path), json.dumps(manifest(examples), indent=1))
    _write(path, "".join(e.to_json() + "\n" for e in examples))


def manifest(examples: list[Example]) -> dict:
    """The sessions the examples come from, once each in seq order (intake seq, session id and creation
    time: the session's identity), and ``hash``: the first 16 hex digits of the sha256 of the identities."""
    sessions = sorted({(e.seq, e.session_id, e.session_created_at, e.source) for e in examples})
    keys = ("seq", "session_id", "session_created_at", "source")
    digest = hashlib.sha256(json.dumps([[sid, created] for _, sid, created, _ in sessions]).encode()).hexdigest()[:16]
    return {"hash": digest, "n_sessions": len(sessions), "n_examples": len(examples),
            "sessions": [dict(zip(keys, s, strict=True)) for s in sessions]}


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_examples(path: Path) -> list[Example]:
    return [Example.from_json(line) for line in path.read_text().splitlines() if line.strip()]


# --- tokenisation -----------------------------------------------------------------------------
def encode_prompt(tokenizer, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[int], bool]:
    """Chat-templated prompt ids (with the generation prompt), at most ``max_tokens``.

    Too long: drop the fewest oldest non-system turns that make it fit (keeping the system message
    and the last turn); still too long: cut tokens from the middle, keeping the head (system) and
    the tail (latest turn and generation prompt). O(log n) tokenizations for n turns. Returns
    (ids, truncated)."""

    def ids_of(msgs):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = ids_of(messages)
    if len(ids) <= max_tokens:
        return ids, False
    first = 1 if messages and messages[0]["role"] == "system" else 0

    def dropping(n: int) -> list[dict[str, str]]:  # without the n oldest non-system turns
        return messages[:first] + messages[first + n :]

    # The fewest turns to drop (the last one always stays). The prompt only shrinks as more go, so
    # a binary search finds what dropping them one at a time would, with O(log n) tokenizations.
    most = max(len(messages) - first - 1, 0)
    lo, hi = min(1, most), most
    tried = {0: ids}
    while lo < hi:
        mid = (lo + hi) // 2
        tried[mid] = ids_of(dropping(mid))
        if len(tried[mid]) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    ids = tried[lo] if lo in tried else ids_of(dropping(lo))
    if len(ids) > max_tokens:
        head = max_tokens // 2
        ids = ids[:head] + ids[len(ids) - (max_tokens - head):]
    return ids, True


def encode_completion(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Reference completion ids ending with the end-of-turn token, at most ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
    return ids + [tokenizer.eos_token_id]
