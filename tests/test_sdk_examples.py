"""Examples from sessions the real Atlas SDK wrote (tests/atlas_sdk.py): events by event_type (LLM
inputs, streamed chunks, tool calls), steps only, guidance only, auto-approved, the SDK's own
student-only trajectory. Every prompt alternates roles and ends with the user's turn, no eval prompt
holds its reference answer, and a session yields one example per assistant turn (``per_turn``) or
its last (``last_turn``, and always in the eval set)."""

from __future__ import annotations

import pytest

from tests.atlas_sdk import SdkSession, llm_call, tool_call, workflow, write_sessions
from tests.test_dataset import make_spec
from trainers.dataset import Example, build_dataset

STUDENT_PROMPT = "You are the student. Work the step; ask the teacher when stuck."
TEACHER_PROMPT = "You are the teacher. Answer the student; end with 'Final Answer: <n>'."
ASK = "I need help: what is 2 + 5?"
CALC = "Compute 12 * 3 with the calculator, then add 4."
TOOL_TURN = {"type": "ai", "content": "Let me compute.",
             "tool_calls": [{"name": "calculator", "args": {"expr": "12*3"}, "id": "c1", "type": "tool_call"}]}


def sessions() -> dict[str, SdkSession]:
    streamed = [  # the teacher's answer streamed, its LLM_END without an output
        *llm_call("student", [("system", STUDENT_PROMPT), ("human", "Step 1: add the numbers")], ASK),
        *llm_call("teacher", [("system", TEACHER_PROMPT), ("human", ASK)], "", chunks=["2 + 5", " = 7.", " Final",
                                                                                       " Answer: 7"]),
        *llm_call("reward", [("human", "Judge the answer 'Final Answer: 7'")], '{"score": 0.9}'),
    ]
    tools = [  # two teacher turns around a tool call; the second call's input repeats the whole dialogue
        *llm_call("student", [("system", STUDENT_PROMPT), ("human", "Step 1: compute")], CALC),
        *llm_call("teacher", [("system", TEACHER_PROMPT), ("human", CALC)], TOOL_TURN,
                  chunks=["Let me ", "compute."]),
        *tool_call("teacher", "calculator", {"expr": "12*3"}, "36"),
        *llm_call("teacher", [("system", TEACHER_PROMPT), ("human", CALC), ("ai", "Let me compute."), ("tool", "36")],
                  "36 + 4 = 40. Final Answer: 40"),
    ]
    own_work = [  # what the SDK itself logs: only the student's calls (the teacher calls its LLM directly)
        *llm_call("student", [("system", STUDENT_PROMPT), ("human", "Step 1: multiply 3 by 3")], "3 * 3 = 9.",
                  chunks=["3 * 3", " = 9."]),
        *tool_call("student", "calculator", {"expr": "3*3"}, "9"),
        *llm_call("student", [("system", STUDENT_PROMPT), ("human", "Step 2: answer")], "Final Answer: 9"),
    ]
    return {
        "events": SdkSession("What is 2 + 5?", "7", plan=["add"], events=workflow("What is 2 + 5?", "7", streamed)),
        "auto": SdkSession("What is 2 + 5?", "7", events=workflow("What is 2 + 5?", "7", streamed), auto_approved=True),
        "tools": SdkSession("What is 12 * 3 + 4?", "40", plan=["multiply", "add"],
                            events=workflow("What is 12 * 3 + 4?", "40", tools)),
        "steps": SdkSession("What is 3 + 4?", "7", plan=["add", "answer"],
                            steps=[(1, "adding", "3 + 4 = 7"), (2, "answering", "Final Answer: 7")]),
        "guidance": SdkSession("What is 6 + 5?", "11", plan=["add", "answer"],
                               steps=[(1, "adding", "6 + 5 = 12"), (2, "answering", "Final Answer: 11")],
                               guidance={1: ["Check the sum again: 6 + 5 is not 12."]}),
        "student_only": SdkSession("What is 3 * 3?", "9", plan=["multiply", "answer"],
                                   events=workflow("What is 3 * 3?", "9", own_work)),
    }


def alternates(prompt: list[dict[str, str]]) -> bool:
    """An optional system message, then user/assistant turns alternating, first and last the user's."""
    roles = [m["role"] for m in prompt]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return bool(roles) and len(roles) % 2 == 1 and all(r == ("user" if i % 2 == 0 else "assistant")
                                                        for i, r in enumerate(roles))


@pytest.fixture()
def written(db_url: str) -> dict[str, int]:
    cases = sessions()
    return dict(zip(cases, write_sessions(db_url, list(cases.values()))))


def by_session(examples: list[Example]) -> dict[int, list[Example]]:
    out: dict[int, list[Example]] = {}
    for e in examples:
        out.setdefault(e.session_id, []).append(e)
    return out


def test_the_eval_set_of_sdk_sessions_never_shows_the_answer(db_url, written):
    build = build_dataset(make_spec(db_url, eval={"eval_fraction": 0.999999, "max_samples": 100}))
    assert not build.train and build.skipped == {}
    ev = by_session(build.eval)
    assert set(ev) == set(written.values()) and all(len(v) == 1 for v in ev.values())  # the last turn only
    for name, sid in written.items():
        e = ev[sid][0]
        assert alternates(e.prompt), (name, e.prompt)
        assert not any(e.reference in m["content"] for m in e.prompt), (name, e.prompt)

    e = ev[written["events"]][0]  # LLM inputs the teacher saw, chunks joined, the reward judge's call left out
    assert e.prompt == [{"role": "system", "content": f"Task: What is 2 + 5?\nPlan:\n1. add\n\n{TEACHER_PROMPT}"},
                        {"role": "user", "content": ASK}]
    assert (e.completion, e.reference) == ("2 + 5 = 7. Final Answer: 7", "7")
    auto = ev[written["auto"]][0]  # approved before it finished: the same example
    assert (auto.prompt[1:], auto.completion) == (e.prompt[1:], e.completion)

    e = ev[written["tools"]][0]  # the repeated input is not repeated; the tool result is the user's turn
    assert [m["role"] for m in e.prompt] == ["system", "user", "assistant", "user"]
    assert e.prompt[2]["content"] == 'Let me compute.\nTool call: calculator({"expr": "12*3"})'
    assert e.prompt[3]["content"] == "36" and e.completion == "36 + 4 = 40. Final Answer: 40"

    for name in ("steps", "student_only"):  # the model never answered: the task, answered; its work left out
        e = ev[written[name]][0]
        task = {"steps": "What is 3 + 4?", "student_only": "What is 3 * 3?"}[name]
        assert e.prompt[1:] == [{"role": "user", "content": task}] and e.completion == e.reference, name

    e = ev[written["guidance"]][0]  # the teacher's guidance after the student's attempt; the later answer dropped
    assert e.prompt[1:] == [{"role": "user", "content": "6 + 5 = 12"}]
    assert e.completion == "Check the sum again: 6 + 5 is not 12." and e.reference == "11"


@pytest.mark.parametrize("mode", ["per_turn", "last_turn"])
def test_training_examples_per_assistant_turn(db_url, written, mode):
    build = build_dataset(make_spec(db_url, examples=mode, eval={"eval_fraction": 1e-9}))
    assert not build.eval and build.skipped == {}
    tr = by_session(build.train)
    assert set(tr) == set(written.values())
    for name, sid in written.items():
        assert all(alternates(e.prompt) for e in tr[sid]), name
    tools = tr[written["tools"]]
    assert len(tools) == (2 if mode == "per_turn" else 1)
    last = tools[-1]
    assert last.completion == "36 + 4 = 40. Final Answer: 40" and last.reference == "40"
    if mode == "per_turn":  # the first turn: what the teacher had seen then, and the turn as its own reference
        first = tools[0]
        assert first.prompt == last.prompt[:2] and first.completion == last.prompt[2]["content"]
        assert first.reference == first.completion
    assert all(len(tr[written[n]]) == 1 for n in ("events", "auto", "steps", "guidance", "student_only"))
    assert build.n_window == len(build.train)
