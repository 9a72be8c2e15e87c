"""The frozen eval split of each policy (``atlasd.eval_splits``; migration 0009).

A session is in a policy's eval split when ``atlasd.in_eval_split(salt, learning_key, task_key,
threshold)`` holds: the split is by task (the same task run twice is on one side), never moves with
the session id, and is the same for every gear of the policy (they share ``eval.eval_fraction`` and
``eval.split_salt``). Its parameters are recorded the first time a policy is used (a gear
evaluated, a run started), as generation 1. Afterwards:

* parameters that differ from the newest generation are refused while the policy has a champion
  (it was measured on that split; moving sessions it trained on into eval would make the gate's
  numbers lie): :class:`EvalSplitChanged` names both and the way out;
* without a champion, the newest generation is updated in place;
* ``atlasd policies reset-eval POLICY`` records a new generation with the policy's current
  parameters: a new salt (``SALT#gN``), so a new split; the champion is re-measured on it at the
  next registration (its eval set hash differs).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from atlasd import intake, promotions
from atlasd.policies import Policy


class EvalSplitChanged(ValueError):
    """The policy's split parameters differ from the recorded ones while it has a champion; safe to
    show. ``split``: the configured parameters (what `atlasd plan` counts with meanwhile)."""

    def __init__(self, message: str, split: EvalSplit) -> None:
        super().__init__(message)
        self.split = split


@dataclass(frozen=True)
class EvalSplit:
    policy: str
    generation: int
    salt: str  # as configured (eval.split_salt, else the policy name)
    eval_fraction: float

    @property
    def key_salt(self) -> str:
        """The salt the split hash uses: a new generation is a new split."""
        return self.salt if self.generation == 1 else f"{self.salt}#g{self.generation}"

    @property
    def threshold(self) -> int:
        return intake.split_threshold(self.eval_fraction)


def configured(policy: Policy) -> tuple[str, float]:
    """(salt, eval_fraction) as the policy's gears configure them (validated equal across gears)."""
    spec = next(iter(policy.gears.values())).eval
    return spec.split_salt or policy.name, spec.eval_fraction


_NEWEST = """SELECT generation, salt, eval_fraction FROM atlasd.eval_splits
              WHERE policy = %s ORDER BY generation DESC LIMIT 1"""
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('atlasd.eval_splits:' || %s))"


def _resolve(policy: Policy, newest: tuple | None, has_champion: bool) -> tuple[EvalSplit, str]:
    """The split to use and what to write: 'insert' (first use), 'update' (changed, no champion),
    'none'. Raises EvalSplitChanged."""
    salt, fraction = configured(policy)
    if newest is None:
        return EvalSplit(policy.name, 1, salt, fraction), "insert"
    generation, stored_salt, stored_fraction = newest
    split = EvalSplit(policy.name, generation, salt, fraction)
    if (stored_salt, stored_fraction) == (salt, fraction):
        return split, "none"
    if has_champion:
        raise EvalSplitChanged(
            f"policy {policy.name!r}: the eval split changed (eval_fraction {stored_fraction:g} -> {fraction:g}, "
            f"split_salt {stored_salt!r} -> {salt!r}) while it has a champion measured on the recorded one; "
            f"restore the recorded values, or run `atlasd policies reset-eval {policy.name}` to start a new "
            "eval generation (the champion is re-measured on it at the next registration)", split)
    return split, "update"


async def current(conn: psycopg.AsyncConnection, policy: Policy, *, record: bool = True) -> EvalSplit:
    """The split the policy's runs use now, recorded on first use or updated (``record``; see the
    module doc). Raises EvalSplitChanged."""
    async with conn.transaction():
        if record:
            await conn.execute(_LOCK, [policy.name])
        newest = await (await conn.execute(_NEWEST, [policy.name])).fetchone()
        split, write = _resolve(policy, newest, newest is not None and await promotions.has_champion(conn, policy.name))
        if record and write == "insert":
            await conn.execute("INSERT INTO atlasd.eval_splits (policy, generation, salt, eval_fraction) "
                               "VALUES (%s, 1, %s, %s)", [policy.name, split.salt, split.eval_fraction])
        elif record and write == "update":
            await conn.execute("UPDATE atlasd.eval_splits SET salt = %s, eval_fraction = %s, created_at = now() "
                               "WHERE policy = %s AND generation = %s",
                               [split.salt, split.eval_fraction, policy.name, split.generation])
    return split


def current_sync(conn: psycopg.Connection, policy: Policy) -> EvalSplit:
    """:func:`current` without recording, on a synchronous connection (`atlasd status`, STATUS=)."""
    newest = conn.execute(_NEWEST, [policy.name]).fetchone()
    return _resolve(policy, newest, newest is not None and policy.name in promotions.champions(conn))[0]


async def reset(conn: psycopg.AsyncConnection, policy: Policy, actor: str) -> EvalSplit:
    """A new eval generation with the policy's current parameters (``atlasd policies reset-eval``)."""
    salt, fraction = configured(policy)
    async with conn.transaction():
        await conn.execute(_LOCK, [policy.name])
        cur = await conn.execute(
            """INSERT INTO atlasd.eval_splits (policy, generation, salt, eval_fraction, reset_by)
               SELECT %s, COALESCE(max(generation), 0) + 1, %s, %s, %s FROM atlasd.eval_splits WHERE policy = %s
               RETURNING generation""", [policy.name, salt, fraction, actor, policy.name])
        generation = (await cur.fetchone())[0]
    return EvalSplit(policy.name, generation, salt, fraction)
