"""Sessions written by the real Atlas SDK (arc-atlas 0.1.16): its storage class
``atlas.runtime.storage.database.Database`` and its models (IntermediateStep, Plan, StepResult), as
its runtime calls them (``atlas.core``: create_session, log_plan, log_step_result, log_guidance,
finalize_session, log_session_reward, update_session_review_status, log_intermediate_step), then
the session's ``atlasd.intake`` row as the daemon records it.

arc-atlas is installed without its dependencies (``make install``): the storage module needs only
asyncpg and pydantic, but the package's ``atlas/__init__.py`` imports the whole runtime (litellm,
langgraph, anthropic, boto3: ~40 packages, 0.5 GB, and litellm fetches a price list over the
network at import). So the ``atlas`` package is entered without running its ``__init__``; every
module used here is the SDK's own, unchanged. The 0.1.16 wheel does not ship the
``schema.sql`` its ``connect()`` applies, so it connects with ``apply_schema_on_connect=False``
to a database that holds atlasd's stand-in schema (atlasd/db/sdk_schema.sql)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import types
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

if "atlas" not in sys.modules:
    _spec = importlib.util.find_spec("atlas")
    if _spec is None:
        pytest.skip("arc-atlas is not installed (make install)", allow_module_level=True)
    _pkg = types.ModuleType("atlas")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    sys.modules["atlas"] = _pkg

from atlas.config.models import StorageConfig  # noqa: E402
from atlas.runtime.models import (  # noqa: E402
    IntermediateStep,
    IntermediateStepPayload,
    IntermediateStepType,
    InvocationNode,
    StreamEventData,
)
from atlas.runtime.storage.database import Database  # noqa: E402
from atlas.types import Plan, StepResult  # noqa: E402


def llm_call(actor: str, messages: list[tuple[str, str]] | None, output: Any, *,
             chunks: list[str] | None = None) -> list[IntermediateStepPayload]:
    """One LLM call as the SDK's LangChain callback emits it: LLM_START with the input messages
    (LangChain ``type``: system, human, ai, tool), LLM_NEW_TOKEN per streamed chunk, LLM_END with
    the output (a string, or a serialised AI message with tool_calls), all under one UUID."""
    call = str(uuid.uuid4())
    meta = {"actor": actor}
    out = []
    if messages is not None:
        out.append(IntermediateStepPayload(
            UUID=call, event_type=IntermediateStepType.LLM_START, name="chat_model", metadata=meta,
            data=StreamEventData(input={"messages": [{"type": t, "content": c, "additional_kwargs": {}}
                                                     for t, c in messages]})))
    for chunk in chunks or []:
        out.append(IntermediateStepPayload(UUID=call, event_type=IntermediateStepType.LLM_NEW_TOKEN,
                                           name="chat_model", metadata=meta, data=StreamEventData(chunk=chunk)))
    out.append(IntermediateStepPayload(UUID=call, event_type=IntermediateStepType.LLM_END, name="chat_model",
                                       metadata=meta, data=StreamEventData(output=output)))
    return out


def tool_call(actor: str, name: str, args: dict, output: Any) -> list[IntermediateStepPayload]:
    """TOOL_START and TOOL_END as the SDK's student graph emits them (output: a serialised ToolMessage)."""
    call = str(uuid.uuid4())
    meta = {"actor": actor, "node": "tools", "node_type": "tool"}
    return [
        IntermediateStepPayload(UUID=call, event_type=IntermediateStepType.TOOL_START, name=name, metadata=meta,
                                data=StreamEventData(input=args)),
        IntermediateStepPayload(UUID=call, event_type=IntermediateStepType.TOOL_END, name=name, metadata=meta,
                                data=StreamEventData(input=args, output={"type": "tool", "content": output,
                                                                         "tool_call_id": call})),
    ]


def workflow(task: str, final_answer: str, inner: list[IntermediateStepPayload]) -> list[IntermediateStepPayload]:
    """``inner`` between the orchestrator's WORKFLOW_START and WORKFLOW_END (whose output is the final
    answer) and the student's plan_creation function events (no actor)."""
    run = str(uuid.uuid4())
    plan = str(uuid.uuid4())
    return [
        IntermediateStepPayload(UUID=run, event_type=IntermediateStepType.WORKFLOW_START, name="orchestration",
                                data=StreamEventData(input={"task": task})),
        IntermediateStepPayload(UUID=plan, event_type=IntermediateStepType.FUNCTION_START, name="plan_creation",
                                data=StreamEventData(input={"task": task})),
        IntermediateStepPayload(UUID=plan, event_type=IntermediateStepType.FUNCTION_END, name="plan_creation",
                                data=StreamEventData(output={"steps": [{"id": 1, "description": task}]})),
        *inner,
        IntermediateStepPayload(UUID=run, event_type=IntermediateStepType.WORKFLOW_END, name="orchestration",
                                data=StreamEventData(output=final_answer)),
    ]


@dataclass
class SdkSession:
    task: str
    final_answer: str
    plan: list[str] = field(default_factory=list)
    steps: list[tuple[int, str, str]] = field(default_factory=list)  # (step_id, trace, output)
    guidance: dict[int, list[str]] = field(default_factory=dict)  # step_id -> notes
    events: list[IntermediateStepPayload] = field(default_factory=list)
    score: float = 0.9
    learning_key: str = "math"
    auto_approved: bool = False  # review gating off: approved before the run is finalized


async def _write(db_url: str, sessions: list[SdkSession]) -> list[int]:
    db = Database(StorageConfig(database_url=db_url, apply_schema_on_connect=False))
    await db.connect()
    ids = []
    try:
        for s in sessions:
            sid = await db.create_session(s.task, {"learning_key": s.learning_key})
            if s.plan:
                await db.log_plan(sid, Plan.model_validate(
                    {"steps": [{"id": i + 1, "description": d, "depends_on": []} for i, d in enumerate(s.plan)]}))
            for step_id, trace, output in s.steps:
                await db.log_step_result(sid, StepResult(
                    step_id=step_id, trace=trace, output=output,
                    evaluation={"validation": {"valid": True}, "reward": {"score": s.score}}))
            for step_id, notes in s.guidance.items():
                await db.log_guidance(sid, step_id, notes)
            if s.auto_approved:
                await db.update_session_review_status(sid, "approved", "Auto-approved (review gating disabled).")
            await db.log_session_reward(sid, {"score": s.score}, None, None, reward_stats={"score": s.score})
            root = InvocationNode(function_id="root", function_name="root")
            for payload in s.events:
                await db.log_intermediate_step(sid, IntermediateStep(parent_id="root", function_ancestry=root,
                                                                     payload=payload))
            await db.finalize_session(sid, s.final_answer, "succeeded")
            if not s.auto_approved:
                await db.update_session_review_status(sid, "approved", "looks right")
            ids.append(sid)
    finally:
        await db.disconnect()
    return ids


def write_sessions(db_url: str, sessions: list[SdkSession]) -> list[int]:
    """Write ``sessions`` through the SDK, then record each in atlasd.intake (as the daemon does once
    it is approved and succeeded). Returns their ids."""
    ids = asyncio.run(_write(db_url, sessions))
    with psycopg.connect(db_url, autocommit=True) as conn:
        for sid in ids:
            conn.execute("""INSERT INTO atlasd.intake (session_id, learning_key, reward_score, session_created_at)
                            SELECT id, metadata->>'learning_key', (reward_stats->>'score')::float8, created_at
                              FROM sessions WHERE id = %s""", [sid])
    return ids
