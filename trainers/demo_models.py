"""The demo's offline task and models.

* A verifiable task: multi-step arithmetic word problems with numeric answers, generated
  deterministically from a seed, and the content an Atlas SDK session holds for each (task,
  plan, trajectory events shaped like the SDK's IntermediateStep dumps, final answer,
  reward_stats, learning_key).
* ``build_demo_models``: a digit-level BPE tokenizer, a small Qwen2 teacher trained on the spot
  by supervised fine-tuning until it solves most held-out problems, and a smaller student given
  only a short pre-training, so it knows the answer format but is mostly wrong. Both are saved
  in Hugging Face format under the cache dir, keyed by a hash of the build config, and reused.

Nothing is downloaded. Imports torch/transformers lazily: the generator is usable without them.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

DEMO_LEARNING_KEY = "demo-arithmetic"
STUDENT_REQUEST = "Solve it."

_NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Eli", "Ivy", "Max", "Lily", "Ben", "Emma"]
_ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "eggs", "stamps"]
# (sign, sentence fragment, plan description)
_GAINS = [("buys {n} more", "buys"), ("finds {n} more", "finds"), ("gets {n} more", "gets"),
          ("receives {n} more", "receives")]
_LOSSES = [("gives away {n}", "gives away"), ("sells {n}", "sells"), ("loses {n}", "loses"),
           ("uses {n}", "uses")]


@dataclass(frozen=True)
class Problem:
    """One word problem: ``start`` items, then ``ops`` as (amount with sign, verb)."""

    id: str
    name: str
    item: str
    start: int
    ops: tuple[tuple[int, str], ...]

    @property
    def answer(self) -> int:
        return self.start + sum(n for n, _ in self.ops)

    @property
    def task(self) -> str:
        parts = []
        for n, verb in self.ops:
            template = next(t for t, v in (*_GAINS, *_LOSSES) if v == verb)
            parts.append(template.format(n=abs(n)))
        actions = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
        return (f"{self.name} has {self.start} {self.item}, {actions}. "
                f"How many {self.item} does {self.name} have now?")

    def plan(self) -> dict:
        """The plan an SDK session stores in ``plans.plan``: one step per operation."""
        steps = [{"id": 1, "description": f"Start with {self.start}.", "depends_on": []}]
        for n, _ in self.ops:
            steps.append({"id": len(steps) + 1, "description": f"{'Add' if n > 0 else 'Subtract'} {abs(n)}.",
                          "depends_on": [len(steps)]})
        return {"steps": steps}

    def solution(self) -> str:
        """A teacher-quality completion: one line per operation, ending in ``Final Answer: <n>``."""
        total, lines = self.start, []
        for n, _ in self.ops:
            new = total + n
            lines.append(f"{total}{'+' if n > 0 else '-'}{abs(n)}={new}")
            total = new
        return ". ".join(lines) + f". Final Answer: {total}"


@dataclass(frozen=True)
class Comparison:
    """A second task for the continual-learning benchmark (bench/learning.py): how many more items
    one person has than another. Its prompts open like a :class:`Problem`'s ("Sam has 12 apples")
    and its solution is one subtraction, so learning it alone pulls a model away from the
    multi-step problems."""

    id: str
    name: str
    other: str
    item: str
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a - self.b

    @property
    def task(self) -> str:
        return (f"{self.name} has {self.a} {self.item} and {self.other} has {self.b} {self.item}. "
                f"How many more {self.item} does {self.name} have than {self.other}?")

    def plan(self) -> dict:
        return {"steps": [{"id": 1, "description": f"Start with {self.a}.", "depends_on": []},
                          {"id": 2, "description": f"Subtract {self.b}.", "depends_on": [1]}]}

    def solution(self) -> str:
        return f"{self.a}-{self.b}={self.answer}. Final Answer: {self.answer}"


Task = Problem | Comparison  # what a session, an example and a build are made of


def generate_problems(n: int, seed: int, *, max_total: int = 20, max_amount: int = 9, min_ops: int = 2,
                      max_ops: int = 3) -> list[Problem]:
    """``n`` problems, the same for the same arguments. Every amount is in [1, max_amount] and the
    running total stays in [0, max_total]."""
    rng = random.Random(f"demo-problems:{seed}")
    problems = []
    for i in range(n):
        total = start = rng.randint(1, max_total)
        ops = []
        for _ in range(rng.randint(min_ops, max_ops)):
            gain = total == 0 or (total < max_total and rng.random() < 0.5)
            amount = rng.randint(1, min(max_amount, max_total - total)) if gain else -rng.randint(1, min(total, max_amount))
            verb = rng.choice(_GAINS if gain else _LOSSES)[1]
            ops.append((amount, verb))
            total += amount
        problems.append(Problem(id=f"{seed}-{i}", name=rng.choice(_NAMES), item=rng.choice(_ITEMS),
                                start=start, ops=tuple(ops)))
    return problems


def generate_comparisons(n: int, seed: int, *, max_total: int = 20) -> list[Comparison]:
    """``n`` comparisons, the same for the same arguments: ``a`` in [1, max_total], ``b`` in [0, a)."""
    rng = random.Random(f"demo-comparisons:{seed}")
    out = []
    for i in range(n):
        name, other = rng.sample(_NAMES, 2)
        a = rng.randint(1, max_total)
        out.append(Comparison(id=f"c{seed}-{i}", name=name, other=other, item=rng.choice(_ITEMS), a=a,
                              b=rng.randint(0, a - 1)))
    return out


def session_messages(problem: Task, completion: str | None = None) -> list[dict]:
    """The conversation the trainer derives from the session (``trainers.dataset.conversation``):
    the system message with task and plan, the student event as user, the teacher event as
    assistant. The models are trained on exactly this; the prompt is all but the last message."""
    from trainers.dataset import conversation

    s = sdk_session(problem, completion=completion)
    return conversation(s["task"], s["plan"], s["events"], None, None, s["final_answer"])


def _llm_end_event(actor: str, name: str, inp: str, out: str, ts: datetime, parent: str) -> dict:
    words_in, words_out = len(inp.split()), len(out.split())
    return {
        "parent_id": parent,
        "function_ancestry": {"function_id": parent, "function_name": "atlas.session", "parent_id": None},
        "payload": {
            "event_type": "LLM_END",
            "event_timestamp": ts.timestamp(),
            "name": name,
            "metadata": {"actor": actor},
            "data": {"input": inp, "output": out, "chunk": None},
            "usage_info": {"prompt_tokens": words_in, "completion_tokens": words_out,
                           "total_tokens": words_in + words_out},
            "UUID": str(uuid.UUID(int=random.Random(f"{parent}:{actor}").getrandbits(128))),
        },
    }


def sdk_session(problem: Task, *, completion: str | None = None, learning_key: str = DEMO_LEARNING_KEY,
                start: datetime | None = None) -> dict:
    """What an Atlas SDK session holds for ``problem`` (column names of the SDK schema):
    ``task``, ``plan``, ``events`` (trajectory_events.event), ``final_answer``, ``reward_stats``,
    ``reward``, ``metadata`` (with ``learning_key``). ``completion`` is the teacher turn (default:
    the correct solution); the reward is 1.0 when its answer is right, else 0.0."""
    completion = problem.solution() if completion is None else completion
    from trainers.judge import extract_number

    answer = extract_number(completion)
    score = 1.0 if answer is not None and answer == problem.answer else 0.0
    start = start or datetime(2025, 1, 1, tzinfo=timezone.utc)
    parent = str(uuid.UUID(int=random.Random(f"session:{problem.id}").getrandbits(128)))
    events = [
        _llm_end_event("student", "executor", problem.task, STUDENT_REQUEST, start, parent),
        _llm_end_event("teacher", "teacher", STUDENT_REQUEST, completion, start + timedelta(seconds=1), parent),
    ]
    final = "" if answer is None else (str(int(answer)) if answer == int(answer) else str(answer))
    return {
        "task": problem.task,
        "plan": problem.plan(),
        "events": events,
        "final_answer": final,
        "reward": {"score": score, "rationale": "numeric answer check", "judges": [], "raw": {}},
        "reward_stats": {"score": score, "score_mean": score, "score_stddev": 0.0, "sample_count": 1},
        "metadata": {"learning_key": learning_key, "demo_problem_id": problem.id,
                     "expected_answer": problem.answer},
    }


# ---------------------------------------------------------------- models

TRAIN_SEED = 1  # problems the models are built on
HELD_OUT_SEED = 10_000  # problems the build measures them on (demo traffic should use other seeds too)


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built models; its hash names the cache folder."""

    teacher: ModelSpec
    student: ModelSpec
    teacher_steps: int
    student_steps: int
    batch_size: int = 16
    teacher_lr: float = 5e-3
    student_lr: float = 5e-3
    vocab_size: int = 400
    train_problems: int = 6_000
    eval_problems: int = 200
    comparisons: int = 0  # Comparisons mixed into the teacher's training set only (bench/learning.py's task B)
    seed: int = 0
    version: int = 1  # bump when the task or training code changes what gets built

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


FULL = BuildConfig(teacher=ModelSpec(64, 3, 4, 2, 192), student=ModelSpec(64, 2, 4, 2, 192),
                   teacher_steps=1500, student_steps=300)
FAST = BuildConfig(teacher=ModelSpec(64, 3, 4, 2, 192), student=ModelSpec(32, 1, 2, 1, 64),
                   teacher_steps=700, student_steps=40, train_problems=3_000, eval_problems=100)
BUILD_INFO = "build.json"


def build_demo_models(cache_dir: str | Path, *, fast: bool = False, config: BuildConfig | None = None,
                      log=None) -> tuple[Path, Path]:
    """Build (or reuse) the demo's teacher and student; returns (teacher_path, student_path).

    Both are HF folders (model, tokenizer with the ChatML template) under
    ``cache_dir/demo-models-<hash of the config>/``; ``build.json`` there records the config, the
    held-out accuracies and the build time, and marks the build complete: a folder with it is
    reused as is. ``fast`` picks the small test-suite config (``FAST``), else ``FULL``."""
    import torch

    from trainers import tiny

    cfg = config or (FAST if fast else FULL)
    log = log or (lambda msg: None)
    root = Path(cache_dir) / f"demo-models-{cfg.digest()}"
    teacher_dir, student_dir = root / "teacher", root / "student"
    if (root / BUILD_INFO).is_file():
        return teacher_dir, student_dir
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    problems = generate_problems(cfg.train_problems, seed=TRAIN_SEED + cfg.seed)
    comparisons = generate_comparisons(cfg.comparisons, seed=TRAIN_SEED + cfg.seed)
    held_out = generate_problems(cfg.eval_problems, seed=HELD_OUT_SEED + cfg.seed)
    held_out_comparisons = generate_comparisons(cfg.eval_problems if cfg.comparisons else 0,
                                                seed=HELD_OUT_SEED + cfg.seed)
    corpus = ["\n".join(m["content"] for m in session_messages(p)) for p in problems[:2000] + comparisons[:500]]
    tok = tiny.build_tokenizer(corpus, tmp / "tokenizer", vocab_size=cfg.vocab_size, individual_digits=True)
    info: dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    for role, spec, steps, lr, train in (("teacher", cfg.teacher, cfg.teacher_steps, cfg.teacher_lr,
                                          [*problems, *comparisons]),
                                         ("student", cfg.student, cfg.student_steps, cfg.student_lr, problems)):
        out = role
        t1 = time.perf_counter()
        model = tiny.build_model(tok, tmp / out, hidden_size=spec.hidden_size, layers=spec.layers, heads=spec.heads,
                                 kv_heads=spec.kv_heads, intermediate_size=spec.intermediate_size,
                                 max_position_embeddings=512, seed=cfg.seed + len(role))

        def progress(step, loss, role=role, steps=steps):
            if step % 100 == 0 or step == steps:
                log(f"{role}: step {step}/{steps} loss {loss:.3f}")

        losses = supervised_finetune(model, tok, train, steps=steps, batch_size=cfg.batch_size, lr=lr,
                                     seed=cfg.seed + len(role), callback=progress)
        model.save_pretrained(tmp / out)
        tok.save_pretrained(tmp / out)
        acc = answer_accuracy(model, tok, held_out)
        log(f"{role}: {acc:.1%} of {len(held_out)} held-out problems right")
        info[role] = {"params": sum(p.numel() for p in model.parameters()), "final_loss": losses[-1],
                      "held_out_accuracy": acc, "seconds": round(time.perf_counter() - t1, 1)}
        if held_out_comparisons:
            acc = info[role]["held_out_comparison_accuracy"] = answer_accuracy(model, tok, held_out_comparisons)
            log(f"{role}: {acc:.1%} of {len(held_out_comparisons)} held-out comparisons right")
    shutil.rmtree(tmp / "tokenizer")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    return teacher_dir, student_dir


def build_info(model_path: str | Path) -> dict:
    """``build.json`` of the build that produced ``model_path`` (teacher or student folder)."""
    return json.loads((Path(model_path).parent / BUILD_INFO).read_text())


def _encode(tokenizer, problem: Task) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids ending in EOS), tokenised as the trainer does."""
    from trainers.dataset import encode_completion, encode_prompt

    messages = session_messages(problem)
    return encode_prompt(tokenizer, messages[:-1], 1 << 16)[0], encode_completion(tokenizer, messages[-1]["content"], 1 << 16)


def supervised_finetune(model, tokenizer, problems: list[Task], *, steps: int, batch_size: int, lr: float,
                        seed: int = 0, callback=None) -> list[float]:
    """Plain SFT on the completions (prompt tokens masked), AdamW with warm-up and cosine decay.
    ``callback(step, loss)`` runs after each step (1-based) and may return True to stop early.
    Returns the loss per step."""
    import math

    import torch

    encoded = [_encode(tokenizer, p) for p in problems]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    pad = tokenizer.pad_token_id
    model.train()
    losses = []
    for step in range(steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            seq = p + c
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p): len(seq)] = torch.tensor(c)
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback is not None and callback(step + 1, losses[-1]):
            break
    model.eval()
    return losses


def answer_accuracy(model, tokenizer, problems: list[Task], *, max_new_tokens: int = 48,
                    batch_size: int = 100) -> float:
    """Share of ``problems`` whose greedy completion the ``numeric`` judge accepts."""
    import torch

    from trainers.judge import NumericAnswerJudge

    judge = NumericAnswerJudge()
    correct = 0
    model.eval()
    for i in range(0, len(problems), batch_size):
        chunk = problems[i: i + batch_size]
        prompts = [_encode(tokenizer, p)[0] for p in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        correct += sum(judge(t, str(p.answer)) for t, p in zip(texts, chunk))
    return correct / len(problems)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainers.demo_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir")
    parser.add_argument("--fast", action="store_true", help="the small test-suite config")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    teacher, student = build_demo_models(args.cache_dir, fast=args.fast,
                                         log=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True))
    info = build_info(teacher)
    print(json.dumps({"teacher": str(teacher), "student": str(student),
                      "teacher_accuracy": info["teacher"]["held_out_accuracy"],
                      "student_accuracy": info["student"]["held_out_accuracy"], "build_seconds": info["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
