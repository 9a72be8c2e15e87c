"""The demo's task generator, its SDK-shaped sessions, and the offline teacher/student build (fast mode)."""

from __future__ import annotations

import json

import pytest

from trainers import demo_models as dm
from trainers.dataset import to_example
from trainers.judge import NumericAnswerJudge


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    cache = tmp_path_factory.mktemp("demo-cache")
    teacher, student = dm.build_demo_models(cache, fast=True)
    return cache, teacher, student


def test_generator_is_deterministic_and_correct():
    a, b = dm.generate_problems(200, seed=7), dm.generate_problems(200, seed=7)
    assert a == b
    assert a != dm.generate_problems(200, seed=8)
    assert [dm.sdk_session(p) for p in a[:20]] == [dm.sdk_session(p) for p in b[:20]]
    judge = NumericAnswerJudge()
    for p in a:
        assert 2 <= len(p.ops) <= 3
        running = p.start
        for n, _ in p.ops:
            running += n
            assert 0 <= running <= 20 and 1 <= abs(n) <= 9
        assert running == p.answer
        solution = p.solution()
        assert solution.endswith(f"Final Answer: {p.answer}")
        assert judge(solution, str(p.answer))
        assert str(p.start) in p.task and p.name in p.task and p.task.endswith("have now?")


def test_comparisons_are_deterministic_and_correct():
    a = dm.generate_comparisons(100, seed=7)
    assert a == dm.generate_comparisons(100, seed=7) and a != dm.generate_comparisons(100, seed=8)
    judge = NumericAnswerJudge()
    for c in a:
        assert 0 <= c.b < c.a <= 20 and c.name != c.other and c.answer == c.a - c.b
        assert c.task.startswith(f"{c.name} has {c.a} {c.item} and {c.other} has {c.b}")
        assert judge(c.solution(), str(c.answer)) and c.solution() == f"{c.a}-{c.b}={c.answer}. Final Answer: {c.answer}"
    s = dm.sdk_session(a[0], learning_key="comparison")
    assert s["metadata"]["learning_key"] == "comparison" and s["final_answer"] == str(a[0].answer)
    assert [st["description"] for st in s["plan"]["steps"]] == [f"Start with {a[0].a}.", f"Subtract {a[0].b}."]


def test_session_content_is_sdk_shaped():
    p = dm.generate_problems(1, seed=3)[0]
    s = dm.sdk_session(p)
    assert s["task"] == p.task
    assert s["final_answer"] == str(p.answer)
    assert s["reward_stats"]["score"] == 1.0 and s["reward"]["score"] == 1.0
    assert s["metadata"]["learning_key"] == dm.DEMO_LEARNING_KEY
    steps = s["plan"]["steps"]
    assert [st["id"] for st in steps] == list(range(1, len(p.ops) + 2))
    assert all(st["depends_on"] == ([] if st["id"] == 1 else [st["id"] - 1]) for st in steps)
    actors = []
    for ev in s["events"]:
        payload = ev["payload"]
        assert payload["event_type"] == "LLM_END"
        assert set(payload["data"]) >= {"input", "output"}
        assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(payload["usage_info"])
        actors.append(payload["metadata"]["actor"])
    assert actors == ["student", "teacher"]
    assert s["events"][-1]["payload"]["data"]["output"] == p.solution()
    json.dumps(s)  # JSONB-ready

    # the trainer's own loader turns it into the prompt/completion the models are trained on
    row = {"session_id": 1, "seq": 1, "task": s["task"], "plan": s["plan"], "events": s["events"],
           "steps": None, "guidance": None, "final_answer": s["final_answer"]}
    ex = to_example(row, "window")
    assert ex.prompt == dm.session_messages(p)[:-1]
    assert ex.prompt[0]["content"].startswith(f"Task: {p.task}\nPlan:\n1. Start with {p.start}.")
    assert ex.completion == p.solution() and ex.reference == str(p.answer)

    wrong = dm.sdk_session(p, completion=f"Final Answer: {p.answer + 1}")
    assert wrong["reward_stats"]["score"] == 0.0 and wrong["final_answer"] == str(p.answer + 1)


def test_teacher_beats_student_on_held_out_problems(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, teacher_path, student_path = built
    info = dm.build_info(teacher_path)
    assert info == dm.build_info(student_path)
    assert info["config"] == json.loads(json.dumps(dm.asdict(dm.FAST)))
    # re-measured from the saved HF folders, on problems the build never saw
    problems = dm.generate_problems(100, seed=424242)
    tok = AutoTokenizer.from_pretrained(student_path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.tokenize("123") == ["1", "2", "3"]
    acc = {}
    for role, path in (("teacher", teacher_path), ("student", student_path)):
        model = AutoModelForCausalLM.from_pretrained(path)
        acc[role] = dm.answer_accuracy(model, tok, problems)
    assert acc["teacher"] >= acc["student"] + 0.2, acc
    assert acc["student"] <= 0.2, acc
    assert info["teacher"]["params"] > info["student"]["params"]


def test_second_build_reuses_the_cache(built):
    cache, teacher_path, student_path = built
    marker = teacher_path.parent / dm.BUILD_INFO
    before = {p: p.stat().st_mtime_ns for p in (marker, *teacher_path.iterdir(), *student_path.iterdir())}
    assert dm.build_demo_models(cache, fast=True) == (teacher_path, student_path)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [p.name for p in cache.iterdir()] == [f"demo-models-{dm.FAST.digest()}"]
