"""Continual-learning benchmark: does a second task make the student forget the first, does
rehearsal prevent it, and does the non-regression gate catch it?

    python -m bench.learning [--threads 2] [--lr 5e-4] [--steps 400] [--rehearsal 0,0.1,0.3,0.5]
                             [--cache-dir DIR] [--keep DIR] [--json FILE]          (make bench-learning)

Two tasks of the demo's world (trainers/demo_models.py), each its own learning key: A, multi-step
word problems (``arithmetic``); B, "how many more does X have than Y" (``comparison``), whose
prompts open like A's and whose answer is one subtraction. The teacher is built on both; the
student on A only (it meets B first in a training run). One policy over both keys, its frozen
eval split holding both; the real parts of the loop: a throw-away PostgreSQL database (the test
suite's server, ``ATLASD_TEST_PG_URL``) with SDK-shaped sessions recorded by atlasd's intake, the
trainer child (``python -m trainers run``) and the registry child (``python -m registry finalize``:
MLflow sqlite store, the promotion gate).

1. A's sessions arrive; run 1 trains on them from the base student and is promoted (no champion).
2. B's sessions arrive; one run per rehearsal fraction trains on them, each from the task-A
   champion, on the same window, with that share of older (task-A) sessions mixed in. Fractions
   up to 0.1 always run; larger ones only until one B run is promoted (the champion then moves).
   Each run is measured on both slices of the eval set; the champion is measured on it at the
   start of each run, and the gate compares them (``targets.max_regression_pp``, 2 points).

Prints one table: per run, the rehearsal fraction, the examples trained on, A's and B's success
before (the champion) and after, and the gate's decision with the checks that failed. The
outcome is measured, not assumed: if rehearsal does not protect A, the table says so and the
gate refuses that run too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml

from atlasd import evalsplit, intake, promotions
from atlasd.db.migrate import init_sdk_schema, migrate
from atlasd.policies import Policy, parse_policy
from atlasd.runspec import EXIT_OK, RunResult
from atlasd.settings import load_settings
from atlasd.testing import pg
from atlasd.testing.sdk import write_session

ROOT = Path(__file__).resolve().parents[1]
POLICY = "learning"
TASK_A, TASK_B = "arithmetic", "comparison"
N_A, N_B = 500, 400  # sessions of each task (a fifth of each in the eval split)
TRAFFIC_SEED = 70_000  # problems neither model was built or measured on
MUST_RUN = 0.1  # rehearsal fractions up to this always run; larger ones only while no B run was promoted


def build_config():
    from trainers.demo_models import BuildConfig, ModelSpec

    return BuildConfig(teacher=ModelSpec(64, 3, 4, 2, 192), student=ModelSpec(64, 2, 4, 2, 192),
                       teacher_steps=1500, student_steps=600, comparisons=2000, eval_problems=100)


def gear_name(rehearsal: float) -> str:
    return f"rehearsal-{rehearsal:g}"


def policy_text(teacher: Path, student: Path, *, lr: float, steps: int, rehearsal: list[float]) -> str:
    """The policy: every learning key, one gear per rehearsal fraction, otherwise equal (one eval
    split for all). No success target over the base student: the gate's checks that matter here
    are the champion's (beats_champion, no_regression per slice)."""
    gear = {
        "trigger": {"batch": {"every": 100}},  # the benchmark starts each run itself
        "filters": {"min_reward": 0.5, "max_age_days": None, "rehearsal_fraction": 0.0},
        "gkd": {"lmbda": 1.0, "beta": 0.0, "temperature": 0.9, "max_new_tokens": 40, "seq_kd": False},
        "optim": {"learning_rate": lr, "lr_scheduler_type": "constant", "per_device_train_batch_size": 16,
                  "gradient_accumulation_steps": 1, "max_steps": steps, "num_train_epochs": None, "max_length": 256,
                  "save_steps": 100_000},
        "eval": {"judge": "numeric", "eval_fraction": 0.2, "max_samples": 400, "max_new_tokens": 40},
        "wall_clock_limit": "30m",
    }
    gears = {gear_name(f): {**gear, "filters": {**gear["filters"], "rehearsal_fraction": f}} for f in rehearsal}
    return yaml.safe_dump({
        "name": POLICY, "teacher": str(teacher), "student": str(student), "registered_model": "learning-student",
        "targets": {"baseline_success": 0.0, "baseline_tokens": None, "min_success_delta": 0.0,
                    "must_beat_champion": True, "max_regression_pp": 2.0},
        "retry": {"max_retries": 0}, "resume_interrupted": False,
        "gears": gears,
    }, sort_keys=False)


async def write_traffic(url: str, task: str, n: int, seed: int) -> int:
    """``n`` approved sessions of ``task`` with right answers, recorded by the intake; returns the
    newest intake seq."""
    import asyncpg

    from trainers.demo_models import generate_comparisons, generate_problems, sdk_session

    problems = (generate_problems if task == TASK_A else generate_comparisons)(n, seed=seed)
    conn = await asyncpg.connect(url)
    try:
        for p in problems:
            s = sdk_session(p, learning_key=task)
            sid = await write_session(conn, s, metadata=s["metadata"], reward_stats=s["reward_stats"])
            await conn.execute("UPDATE sessions SET review_status = 'approved' WHERE id = $1", sid)
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as aconn:
        await intake.reconcile(aconn, None, 5000)
        return await intake.newest_seq(aconn)


class Loop:
    """The runner's part, done in order by the benchmark: spec, trainer child, registry child."""

    def __init__(self, url: str, work: Path, policy: Policy, threads: int):
        self.url, self.work, self.policy, self.threads = url, work, policy, threads
        self.settings = load_settings(db_url=url, state_dir=work / "state", policies_dir=work / "policies")
        self.split: evalsplit.EvalSplit | None = None

    async def run(self, run_id: int, gear: str, lo: int, hi: int) -> dict:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            self.split = await evalsplit.current(conn, self.policy)
        champion = await promotions.champion(self.settings, self.policy.name)
        out = self.work / "runs" / str(run_id)
        spec = self.policy.run_spec(gear, run_id=run_id, trigger="manual", window_lo=lo, window_hi=hi,
                                    student=champion["path"], champion_version=champion["champion"], output_dir=out,
                                    mlflow=promotions.mlflow_target(self.settings, self.policy), device="cpu",
                                    split_salt=self.split.key_salt)
        out.mkdir(parents=True)
        spec_path = spec.dump(out / "run_spec.json")
        t0 = time.perf_counter()
        env = {**os.environ, "ATLASD_DB_URL": self.url, "OMP_NUM_THREADS": str(self.threads),
               "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        log_path = out / "trainer.log"  # its JSON lines (and stderr, which finalize skips) as the runner keeps them
        with open(log_path, "w") as log:
            code = subprocess.call([sys.executable, "-m", "trainers", "run", str(spec_path)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        if code != EXIT_OK:
            raise RuntimeError(f"run {run_id}: the trainer exited {code}; see {log_path}")
        result_path = out / "result.json"
        outcome = await promotions.run_registry(
            self.settings, "finalize", "--spec", str(spec_path), "--result", str(result_path), "--log", str(log_path),
            "--artifact-root", str(self.work / "mlartifacts"), "--cache-dir", str(self.work / "registry-cache"))
        if outcome.code != EXIT_OK:
            raise RuntimeError(f"run {run_id}: registry finalize failed: {outcome.error}")
        result = RunResult.load(result_path)
        meta = json.loads((out / "data" / "meta.json").read_text())
        return {"run": run_id, "gear": gear, "rehearsal": spec.traces.rehearsal_fraction, "result": result,
                "n_window": meta["n_window"], "n_rehearsal": meta["n_rehearsal"], "gate": outcome.payload,
                "seconds": seconds}


def slice_rate(report, key: str) -> float | None:
    s = report.slices.get(key) if report is not None else None
    return None if s is None else s.success_rate


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    head = ("run", "trained on", "rehearsal", "examples: window + rehearsal", f"{TASK_A} before -> after",
            f"{TASK_B} before -> after", "gate", "failed checks", "run s")
    lines = []
    for r in rows:
        res: RunResult = r["result"]
        gate = r["gate"]
        failed = [c["name"] for c in gate.get("checks", []) if not c["met"]]
        lines.append((str(r["run"]), r["task"], f"{r['rehearsal']:g}", f"{r['n_window']} + {r['n_rehearsal']}",
                      f"{pct(slice_rate(res.eval_start, TASK_A))} -> {pct(slice_rate(res.eval, TASK_A))}",
                      f"{pct(slice_rate(res.eval_start, TASK_B))} -> {pct(slice_rate(res.eval, TASK_B))}",
                      gate["decision"], ", ".join(failed) or "-", f"{r['seconds']:.0f}"))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), "-+-".join("-" * w for w in widths), *(fmt.format(*line) for line in lines)])


async def bench(args) -> int:
    from trainers.demo_models import build_demo_models, build_info

    t0 = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    teacher, student = build_demo_models(args.cache_dir, config=build_config(), log=say)
    info = build_info(teacher)
    say(f"models: teacher {pct(info['teacher']['held_out_accuracy'])} A / "
        f"{pct(info['teacher']['held_out_comparison_accuracy'])} B, student "
        f"{pct(info['student']['held_out_accuracy'])} A / {pct(info['student']['held_out_comparison_accuracy'])} B "
        f"on held-out problems (built in {info['seconds']:.0f} s; cached in {args.cache_dir})")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="atlasd-bench-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "policies").mkdir(exist_ok=True)
    text = policy_text(teacher, student, lr=args.lr, steps=args.steps,
                       rehearsal=sorted({0.0, *args.rehearsal}))
    (work / "policies" / f"{POLICY}.yaml").write_text(text)
    policy = parse_policy(text, file=str(work / "policies" / f"{POLICY}.yaml"), stem=POLICY)
    name = pg.create_database("atlasd_bench")
    url = pg.url_for(name)
    try:
        init_sdk_schema(url)
        migrate(url)
        loop = Loop(url, work, policy, args.threads)
        hi_a = await write_traffic(url, TASK_A, N_A, TRAFFIC_SEED)
        say(f"{N_A} {TASK_A} sessions approved and recorded")
        rows = [{**await loop.run(1, gear_name(0.0), 0, hi_a), "task": TASK_A}]
        say(f"run 1 ({TASK_A}): {rows[-1]['gate']['decision']}")
        hi_b = await write_traffic(url, TASK_B, N_B, TRAFFIC_SEED + 1)
        say(f"{N_B} {TASK_B} sessions approved and recorded")
        for fraction in args.rehearsal:
            if fraction > MUST_RUN and any(r["gate"]["decision"] == "promote" for r in rows[1:]):
                break  # the champion moved: a further run would not start from the task-A champion
            rows.append({**await loop.run(len(rows) + 1, gear_name(fraction), hi_a, hi_b), "task": TASK_B})
            say(f"run {len(rows)} ({TASK_B}, rehearsal {fraction:g}): {rows[-1]['gate']['decision']}")
    finally:
        pg.drop_database(name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    sizes = ", ".join(f"{s.n_samples} {key}" for key, s in rows[-1]["result"].eval.slices.items())
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; frozen eval split {loop.split.eval_fraction:g} of each task "
          f"({sizes} sessions); gate tolerance {policy.targets.max_regression_pp:g} points per slice")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: (v.model_dump(mode="json") if k == "result" else v)
                                                for k, v in r.items()} for r in rows], indent=2))
    return 0


def fractions(text: str) -> list[float]:
    """``--rehearsal``: comma-separated fractions in [0, 1), sorted, each once."""
    out = set()
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number (expected e.g. 0,0.1,0.5)") from None
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: a rehearsal fraction is at least 0 and below 1")
        out.add(value)
    return sorted(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each child (default 2)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "atlasd" / "bench-learning"),
                        help="where the built models are kept between runs")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of every run (default 5e-4)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of every run (default 400)")
    parser.add_argument("--rehearsal", type=fractions,
                        default=[0.0, 0.1, 0.3, 0.5],
                        help="rehearsal fractions of the task-B runs, in order (default 0,0.1,0.3,0.5); those "
                             f"above {MUST_RUN:g} run only while no task-B run has been promoted")
    parser.add_argument("--keep", help="keep the runs, policy and MLflow store in this folder")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    return asyncio.run(bench(args))


if __name__ == "__main__":
    raise SystemExit(main())
