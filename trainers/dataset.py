"""Approved Atlas SDK sessions -> (prompt, completion) examples, streamed from PostgreSQL.

Which sessions (all through ``atlasd.intake``, the daemon's record of approved sessions):

- **window**: intake rows with ``window_lo < seq <= window_hi``, not malformed, not revoked, whose
  session is still ``approved`` and ``succeeded`` and passes the spec's filters (learning_key,
  min_reward on ``reward_stats.score`` as a JSON number, max_age_days on ``created_at``);
- **rehearsal**: older rows (``seq <= window_lo``) passing the same checks, a deterministic sample
  (md5 of ``rehearsal_seed`` and session id) sized so that rehearsal is ``rehearsal_fraction`` of
  the training set;
- **eval** (frozen split): sessions whose stable hash ``sha256(f"{salt}:{session_id}")`` falls
  below ``eval_fraction``, salt = ``eval.split_salt`` or the policy name. The eval set is the first
  ``eval.max_samples`` of them by intake seq up to ``window_hi`` (learning_key and min_reward apply,
  max_age_days does not, so the set never drifts). Split sessions are never trained on.

How a session becomes a conversation (docs/atlas-sdk.md): a system message ``Task: ...`` plus
``Plan:`` lines; then one message per trajectory event with a known actor (read from
``payload.metadata.actor``, else the top level; text from ``payload.data`` output, chunk or input):
teacher/coach -> assistant, student/executor -> user, system -> system. Without such events the
steps are used: guidance notes -> assistant, step output (else trace) -> user. The **prompt** is
everything before the last assistant turn and the **completion** that turn. A conversation with no
assistant turn gets the session's ``final_answer`` as its assistant completion (the answer is what
is judged); with neither, the session is skipped (reason ``no_completion``).

Rows are read with server-side cursors; events, steps and guidance are aggregated per session in
one hash-joined query (``trajectory_events`` has no index on ``session_id``). A session whose
text for the trainer exceeds ``traces.max_session_bytes`` (default 8 MiB) is measured in SQL and
skipped unread (reason ``oversized``, also counted when it is in the eval set or the rehearsal
sample): PostgreSQL refuses to aggregate 256 MB of events, and the trainer never holds it.

Long prompts are cut by :func:`encode_prompt` with O(log n) tokenizations of an n-turn session.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from atlasd.runspec import RunSpec

ACTOR_ROLES = {"teacher": "assistant", "coach": "assistant", "student": "user", "executor": "user", "system": "system"}
HASH_BITS = 60  # split hash: the first 15 hex digits of the sha256


@dataclass
class Example:
    session_id: int
    seq: int
    prompt: list[dict[str, str]]  # chat messages, the first is the system message
    completion: str  # reference completion (the last assistant turn)
    reference: str  # what the judge compares against: final_answer, else the completion
    source: str = "window"  # window | rehearsal | eval

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
    n_window: int = 0
    n_rehearsal: int = 0

    @property
    def eval_set_hash(self) -> str:
        return eval_set_hash(self.eval)


class DatasetError(RuntimeError):
    """The dataset cannot be built; the message is safe to show (no DB URL)."""


def split_salt(spec: RunSpec) -> str:
    return spec.eval.split_salt or spec.policy


def split_hash(salt: str, session_id: int) -> int:
    """Stable hash in [0, 2**60) of a session for the frozen eval split (same formula as the SQL)."""
    return int(hashlib.sha256(f"{salt}:{session_id}".encode()).hexdigest()[: HASH_BITS // 4], 16)


def in_eval_split(salt: str, session_id: int, eval_fraction: float) -> bool:
    return split_hash(salt, session_id) < _threshold(eval_fraction)


def _threshold(eval_fraction: float) -> int:
    return int(eval_fraction * 2**HASH_BITS)


def eval_set_hash(examples: Iterable[Example]) -> str:
    """The eval set's identity: its sessions and what each one asks and expects (prompt,
    completion, reference), in any order. Equal hashes mean the same eval content, also when the
    SDK's session ids were reused by other sessions."""
    items = sorted((e.session_id, hashlib.sha256(json.dumps([e.prompt, e.completion, e.reference], ensure_ascii=False,
                                                            sort_keys=True).encode()).hexdigest()) for e in examples)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


# --- SQL --------------------------------------------------------------------------------------
# The same split hash as split_hash(), in SQL.
_SPLIT_SQL = (
    "(('x' || substr(encode(sha256(convert_to(%(salt)s || ':' || s.id::text, 'UTF8')), 'hex'), 1, 15))"
    "::bit(60)::bigint < %(threshold)s)"
)
_READY = "(s.review_status = 'approved' AND s.status = 'succeeded')"
_KEY_OK = "(%(learning_key)s::text IS NULL OR s.metadata->>'learning_key' = %(learning_key)s::text)"
# The live session's score as numeric, NULL unless a JSON number: no value (text, 1e-400, 1e400)
# can fail the query, whatever order the planner evaluates the conditions in.
_SCORE = "(CASE WHEN jsonb_typeof(s.reward_stats->'score') = 'number' THEN (s.reward_stats->'score')::numeric END)"
_REWARD_OK = f"(COALESCE({_SCORE}, -1) >= %(min_reward)s::numeric)"
_AGE_OK = "(%(max_age_days)s::double precision IS NULL OR s.created_at >= now() - make_interval(secs => %(max_age_days)s::double precision * 86400))"
_USABLE = f"i.malformed IS NULL AND i.revoked_at IS NULL AND {_READY} AND {_KEY_OK} AND {_REWARD_OK}"

# Every intake row of the window, with the reason it cannot be used (NULL: usable).
_WINDOW_SEL = f"""
SELECT i.seq, i.session_id,
       CASE WHEN i.malformed IS NOT NULL THEN 'malformed'
            WHEN i.revoked_at IS NOT NULL THEN 'revoked'
            WHEN s.id IS NULL THEN 'session_deleted'
            WHEN NOT {_READY} THEN 'not_approved_succeeded'
            WHEN NOT {_KEY_OK} THEN 'other_learning_key'
            WHEN NOT {_REWARD_OK} THEN 'low_reward'
            WHEN NOT {_AGE_OK} THEN 'too_old'
            WHEN {_SPLIT_SQL} THEN 'eval_split'
       END AS reason
  FROM atlasd.intake i LEFT JOIN sessions s ON s.id = i.session_id AND s.created_at = i.session_created_at
 WHERE i.seq > %(window_lo)s AND i.seq <= %(window_hi)s
"""

_REHEARSAL_SEL = f"""
SELECT i.seq, i.session_id, NULL::text AS reason
  FROM atlasd.intake i JOIN sessions s ON s.id = i.session_id AND s.created_at = i.session_created_at
 WHERE i.seq <= %(window_lo)s AND {_USABLE} AND {_AGE_OK} AND NOT {_SPLIT_SQL}
 ORDER BY md5(%(rehearsal_seed)s::text || ':' || i.session_id::text), i.seq
 LIMIT %(rehearsal_n)s
"""

_EVAL_SEL = f"""
SELECT i.seq, i.session_id, NULL::text AS reason
  FROM atlasd.intake i JOIN sessions s ON s.id = i.session_id AND s.created_at = i.session_created_at
 WHERE i.seq <= %(window_hi)s AND {_USABLE} AND {_SPLIT_SQL}
 ORDER BY i.seq
 LIMIT %(eval_max)s
"""

# Sessions of `sel` with their plan, events, steps and guidance aggregated (hash joins). `size` is
# each candidate's bytes for the trainer: text columns by octet_length (the stored length, nothing
# is decompressed), JSON as text, except a JSON value stored larger than the cap, which is counted
# as stored and never decompressed. A session over max_session_bytes is skipped as 'oversized' and
# none of its content is fetched. Events (the bulk, no index on session_id) are read in one pass.
_SESSIONS = """
WITH sel AS ({sel}),
cand AS (SELECT seq, session_id FROM sel WHERE reason IS NULL),
evc AS (SELECT e.id, e.session_id, e.event FROM trajectory_events e JOIN cand USING (session_id)),
size AS (SELECT session_id, sum(bytes) AS bytes FROM (
           SELECT session_id, CASE WHEN pg_column_size(event) > %(max_session_bytes)s THEN pg_column_size(event)
                                   ELSE octet_length(event::text) END AS bytes FROM evc
           UNION ALL
           SELECT p.session_id, CASE WHEN pg_column_size(p.plan) > %(max_session_bytes)s THEN pg_column_size(p.plan)
                                     ELSE octet_length(p.plan::text) END
             FROM plans p JOIN cand USING (session_id)
           UNION ALL
           SELECT r.session_id, coalesce(octet_length(r.output), 0) + coalesce(octet_length(r.trace), 0)
             FROM step_results r JOIN cand USING (session_id)
           UNION ALL
           SELECT g.session_id, coalesce(octet_length(g.note), 0) FROM guidance_notes g JOIN cand USING (session_id)
           UNION ALL
           SELECT s.id, octet_length(s.task) + coalesce(octet_length(s.final_answer), 0)
             FROM sessions s JOIN cand ON s.id = cand.session_id) b
         GROUP BY session_id),
ok AS (SELECT seq, session_id FROM cand LEFT JOIN size USING (session_id)
        WHERE coalesce(size.bytes, 0) <= %(max_session_bytes)s),
ev AS (SELECT e.session_id, jsonb_agg(e.event ORDER BY e.id) AS events
         FROM evc e JOIN ok USING (session_id) GROUP BY e.session_id),
st AS (SELECT r.session_id,
              jsonb_agg(jsonb_build_object('step_id', r.step_id, 'output', r.output, 'trace', r.trace)
                        ORDER BY r.step_id) AS steps
         FROM step_results r JOIN ok USING (session_id) GROUP BY r.session_id),
gn AS (SELECT g.session_id,
              jsonb_agg(jsonb_build_object('step_id', g.step_id, 'note', g.note)
                        ORDER BY g.step_id, g.sequence) AS guidance
         FROM guidance_notes g JOIN ok USING (session_id) GROUP BY g.session_id)
SELECT sel.seq, sel.session_id,
       CASE WHEN sel.reason IS NULL AND ok.session_id IS NULL THEN 'oversized' ELSE sel.reason END AS reason,
       s.task, s.final_answer, p.plan, ev.events, st.steps, gn.guidance
  FROM sel
  LEFT JOIN ok ON ok.session_id = sel.session_id
  LEFT JOIN sessions s ON s.id = ok.session_id
  LEFT JOIN plans p ON p.session_id = ok.session_id
  LEFT JOIN ev ON ev.session_id = sel.session_id
  LEFT JOIN st ON st.session_id = sel.session_id
  LEFT JOIN gn ON gn.session_id = sel.session_id
 ORDER BY sel.seq
"""


# --- conversation ----------------------------------------------------------------------------
def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"].strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def event_message(event: Any) -> dict[str, str] | None:
    """One trajectory event -> a chat message, or None (unknown actor, no text)."""
    if not isinstance(event, dict):
        return None
    payload = event.get("payload") if isinstance(event.get("payload"), dict) else {}
    meta = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    actor = meta.get("actor") or event.get("actor") or (event.get("metadata") or {}).get("actor")
    role = ACTOR_ROLES.get(str(actor).lower()) if actor else None
    if role is None:
        return None
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    if not data and isinstance(event.get("data"), dict):
        data = event["data"]
    for key in ("output", "chunk", "input"):
        text = _text(data.get(key))
        if text:
            return {"role": role, "content": text}
    return None


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
    """The session as chat messages (system first); ends with an assistant turn unless none exists."""
    messages = [system_message(task, plan)]
    from_events = [m for m in map(event_message, events or []) if m]
    if from_events:
        messages += from_events
    else:
        notes: dict[int, list[str]] = {}
        for g in guidance or []:
            if _text(g.get("note")):
                notes.setdefault(g.get("step_id"), []).append(_text(g["note"]))
        step_ids = sorted({s.get("step_id") for s in steps or []} | set(notes), key=lambda x: (x is None, x))
        by_step = {s.get("step_id"): s for s in steps or []}
        for sid in step_ids:
            messages += [{"role": "assistant", "content": n} for n in notes.get(sid, [])]
            step = by_step.get(sid) or {}
            text = _text(step.get("output")) or _text(step.get("trace"))
            if text:
                messages.append({"role": "user", "content": text})
    if not any(m["role"] == "assistant" for m in messages[1:]) and _text(final_answer):
        messages.append({"role": "assistant", "content": _text(final_answer)})
    return messages


def to_example(row: dict, source: str) -> Example | str:
    """An Example, or the reason the session is skipped."""
    if not _text(row.get("task")):
        return "no_task"
    messages = conversation(row["task"], row.get("plan"), row.get("events"), row.get("steps"),
                            row.get("guidance"), row.get("final_answer"))
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        return "no_completion"
    completion = messages[last]["content"]
    return Example(
        session_id=row["session_id"], seq=row["seq"], prompt=messages[:last], completion=completion,
        reference=_text(row.get("final_answer")) or completion, source=source,
    )


# --- building ---------------------------------------------------------------------------------
def _params(spec: RunSpec, **extra) -> dict:
    t = spec.traces
    return {
        "window_lo": t.window_lo, "window_hi": t.window_hi, "learning_key": t.learning_key,
        "min_reward": t.min_reward, "max_age_days": t.max_age_days, "rehearsal_seed": t.rehearsal_seed,
        "salt": split_salt(spec), "threshold": _threshold(spec.eval.eval_fraction),
        "eval_max": spec.eval.max_samples, "max_session_bytes": t.max_session_bytes, **extra,
    }


def _stream(conn: psycopg.Connection, sel: str, params: dict, name: str) -> Iterator[dict]:
    from psycopg.rows import dict_row

    with conn.cursor(name=f"atlasd_{name}", row_factory=dict_row) as cur:
        cur.itersize = 200
        cur.execute(_SESSIONS.format(sel=sel), params)
        yield from cur


def _collect(conn, sel, params, name, source, skipped: Counter) -> list[Example]:
    out = []
    for row in _stream(conn, sel, params, name):
        if row["reason"]:
            if row["reason"] != "eval_split":
                skipped[row["reason"]] += 1
            continue
        ex = to_example(row, source)
        if isinstance(ex, str):
            skipped[ex] += 1
        else:
            out.append(ex)
    return out


def rehearsal_size(n_window: int, fraction: float) -> int:
    """Rehearsal examples so that they are ``fraction`` of the training set: n * f / (1 - f), rounded."""
    return round(n_window * fraction / (1 - fraction)) if n_window and fraction else 0


def build_dataset(spec: RunSpec, dsn: str | None = None, *, with_train: bool = True) -> DatasetBuild:
    """Window + rehearsal training examples and the frozen eval set, read from the Atlas database."""
    dsn = dsn or spec.traces.resolved_db_url()
    skipped: Counter = Counter()
    aside: Counter = Counter()  # why eval and rehearsal sessions were dropped: only 'oversized' is reported
    try:
        with psycopg.connect(dsn, application_name=f"atlasd-trainer-{spec.run_id}", connect_timeout=10) as conn:
            conn.read_only = True
            eval_set = _collect(conn, _EVAL_SEL, _params(spec), "eval", "eval", aside)
            train: list[Example] = []
            n_rehearsal = 0
            if with_train:
                train = _collect(conn, _WINDOW_SEL, _params(spec), "window", "window", skipped)
                k = rehearsal_size(len(train), spec.traces.rehearsal_fraction)
                if k:
                    rehearsal = _collect(conn, _REHEARSAL_SEL, _params(spec, rehearsal_n=k), "rehearsal",
                                         "rehearsal", aside)
                    n_rehearsal = len(rehearsal)
                    train += rehearsal
    except psycopg.Error as exc:  # psycopg messages name host/db/user, never the password
        raise DatasetError(f"reading traces failed: {type(exc).__name__}: {exc}".strip()) from None
    if aside["oversized"]:
        skipped["oversized"] += aside["oversized"]
    return DatasetBuild(train=train, eval=eval_set, skipped=skipped,
                        n_window=len(train) - n_rehearsal, n_rehearsal=n_rehearsal)


def save_examples(examples: list[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(e.to_json() + "\n" for e in examples))
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
