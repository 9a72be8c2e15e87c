"""`python -m trainers run | validate | eval` as the daemon runs them: a real child process, a
real database, JSON lines on stdout, SIGTERM -> checkpoint + exit 75, resume to the same final step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from atlasd.runspec import EXIT_BAD_SPEC, EXIT_INTERRUPTED, EXIT_OK, EvalReport, RunResult
from tests.traces import arithmetic_session

ROOT = Path(__file__).resolve().parents[1]


def write_spec(path: Path, tiny_models, out: Path, **extra) -> Path:
    teacher, student = tiny_models
    spec = {
        "run_id": 42, "policy": "math", "gear": "fast", "teacher": teacher, "student": student,
        "base_student": student, "output_dir": str(out),
        "traces": {"window_hi": 10**6, "min_reward": 0.5, "rehearsal_fraction": 0.0},
        "gkd": {"max_new_tokens": 8, "lmbda": 0.5},
        "optim": {"learning_rate": 5e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                  "max_steps": 20, "save_steps": 100, "max_length": 128},
        "eval": {"eval_fraction": 0.2, "max_samples": 4, "max_new_tokens": 8},
        "targets": {"baseline_success": 0.0, "baseline_tokens": 10.0},
        **extra,
    }
    path.write_text(json.dumps(spec))
    return path


def child_env(db_url: str) -> dict:
    return {**os.environ, "ATLASD_DB_URL": db_url, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def seed(db_url: str, n: int = 30) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(n):
            arithmetic_session(conn, i, 3)


def test_sigterm_then_resume_reaches_the_same_final_step(db_url, tiny_models, tmp_path):
    seed(db_url)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.json", tiny_models, out)
    proc = subprocess.Popen([sys.executable, "-m", "trainers", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=child_env(db_url), cwd=ROOT)
    first = []
    for line in proc.stdout:
        first.append(json.loads(line))  # every stdout line is JSON
        if first[-1]["event"] == "step" and first[-1]["step"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    first += [json.loads(x) for x in proc.stdout]
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED
    events = [e["event"] for e in first]
    assert events[0] == "start" and events[-1] == "done" and "dataset" in events
    assert all(e["run_id"] == 42 for e in first)
    start_eval = next(e for e in first if e["event"] == "eval")
    assert start_eval["which"] == "start" and start_eval["n_samples"] >= 1
    step = next(e for e in first if e["event"] == "step")
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "time_gen_s", "time_teacher_s", "time_student_s", "time_optim_s"):
        assert isinstance(step[key], float), key
    ckpt = [e for e in first if e["event"] == "checkpoint"]
    assert len(ckpt) == 1 and ckpt[0]["reason"] == "sigterm"
    stopped = ckpt[0]["step"]
    result = RunResult.load(out / "result.json")
    assert result.status == "interrupted" and result.steps == stopped and result.checkpoint == ckpt[0]["path"]
    assert first[-1]["exit_code"] == EXIT_INTERRUPTED

    write_spec(spec, tiny_models, out, resume=True)
    done = subprocess.run([sys.executable, "-m", "trainers", "run", str(spec)], capture_output=True, text=True,
                          env=child_env(db_url), cwd=ROOT, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    second = [json.loads(x) for x in done.stdout.splitlines()]
    steps = [e["step"] for e in second if e["event"] == "step"]
    assert steps == list(range(stopped + 1, 21))  # continues where it stopped, same final step count
    assert next(e for e in second if e["event"] == "dataset")["source"] == "snapshot"
    assert [e["which"] for e in second if e["event"] == "eval"] == ["final"]  # the start eval is kept
    result = RunResult.load(out / "result.json")
    assert result.status == "succeeded" and result.steps == 20 and result.checkpoint == str(out / "final")
    assert result.n_train + result.n_eval <= 30 and result.n_eval == result.eval.n_samples
    assert result.eval_start.eval_set_hash == result.eval.eval_set_hash
    assert result.baseline is not None and result.baseline.success_delta == result.eval.success_rate
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    samples = [json.loads(x) for x in Path(result.eval.samples_path).read_text().splitlines()]
    assert len(samples) == result.n_eval and {"prompt", "generation", "reference", "correct"} <= set(samples[0])
    assert db_url not in done.stdout + done.stderr

    # the same evaluation of any checkpoint, on the same frozen set
    report_path = tmp_path / "champion.json"
    ev = subprocess.run([sys.executable, "-m", "trainers", "eval", "--model", str(out / "final"), "--spec",
                         str(spec), "--out", str(report_path)], capture_output=True, text=True,
                        env=child_env(db_url), cwd=ROOT, timeout=300)
    assert ev.returncode == EXIT_OK, ev.stderr[-3000:]
    report = EvalReport.model_validate_json(report_path.read_text())
    assert report.eval_set_hash == result.eval.eval_set_hash
    assert report.success_rate == result.eval.success_rate and report.avg_tokens == result.eval.avg_tokens


def test_lora_run_evaluates_what_it_registers(db_url, tiny_models, tmp_path):
    """A LoRA run's final eval scores final/ (merged in fp32, saved in the serving dtype), reloaded, in
    eval mode: evaluating final/ again gives the result.json numbers."""
    seed(db_url)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.json", tiny_models, out, optim={
        "learning_rate": 5e-2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 6,
        "save_steps": 100, "max_length": 128, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    done = subprocess.run([sys.executable, "-m", "trainers", "run", str(spec)], capture_output=True, text=True,
                          env=child_env(db_url), cwd=ROOT, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    result = RunResult.load(out / "result.json")
    final = [json.loads(x) for x in done.stdout.splitlines() if '"eval"' in x][-1]
    assert final["model"].endswith("final") and result.eval.reverse_kl is not None
    ev = subprocess.run([sys.executable, "-m", "trainers", "eval", "--model", str(out / "final"), "--spec", str(spec),
                         "--out", str(tmp_path / "again.json")], capture_output=True, text=True,
                        env=child_env(db_url), cwd=ROOT, timeout=300)
    assert ev.returncode == EXIT_OK, ev.stderr[-3000:]
    again = EvalReport.model_validate_json((tmp_path / "again.json").read_text())
    assert again.success_rate == pytest.approx(result.eval.success_rate, rel=0.01)
    assert again.reverse_kl == pytest.approx(result.eval.reverse_kl, rel=0.01)
    assert again.avg_tokens == result.eval.avg_tokens


def test_validate_and_bad_specs(tiny_models, tmp_path):
    spec = write_spec(tmp_path / "spec.json", tiny_models, tmp_path / "out")
    env = {**child_env("postgresql://u:hunter2@127.0.0.1/db"), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "trainers", "validate", str(spec)], capture_output=True, text=True,
                        env=env, cwd=ROOT)
    assert ok.returncode == EXIT_OK and json.loads(ok.stdout)["ok"] is True

    bad = write_spec(tmp_path / "bad.json", tiny_models, tmp_path / "out", eval={"judge": "nope"},
                     teacher="/no/such/model")
    res = subprocess.run([sys.executable, "-m", "trainers", "validate", str(bad)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    body = json.loads(res.stdout)
    assert res.returncode == EXIT_BAD_SPEC and not body["ok"]
    assert any("eval.judge" in e for e in body["errors"]) and any("teacher" in e for e in body["errors"])

    raw = json.loads(spec.read_text())
    raw["traces"]["db_url"] = "postgresql://u:hunter2@127.0.0.1/db"
    raw["optim"]["max_steps"] = -1
    spec.write_text(json.dumps(raw))
    run = subprocess.run([sys.executable, "-m", "trainers", "run", str(spec)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert run.returncode == EXIT_BAD_SPEC
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    assert lines[0]["event"] == "error" and "optim.max_steps" in lines[0]["error"]
    assert "hunter2" not in run.stdout + run.stderr


def test_run_refuses_before_loading_when_the_plan_does_not_fit(tiny_models, tmp_path):
    """A device too small for the plan: exit 2 before the dataset or any model is loaded, with the plan's
    parts and ways out in the error."""
    spec = write_spec(tmp_path / "spec.json", tiny_models, tmp_path / "out")
    env = {**child_env("postgresql://u@127.0.0.1:1/nowhere"), "ATLASD_DEVICE_MEMORY_GB": "0.01"}
    run = subprocess.run([sys.executable, "-m", "trainers", "run", str(spec)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert run.returncode == EXIT_BAD_SPEC
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    assert [x["event"] for x in lines] == ["error", "done"] and lines[0]["kind"] == "bad_spec"
    assert "Memory plan" in lines[0]["error"] and "student weights" in lines[0]["error"]
    assert "ways out" in lines[0]["error"].lower()
    assert not (tmp_path / "out" / "data").exists()


def test_run_refuses_before_loading_when_the_disk_is_too_small(tiny_models, tmp_path):
    """Less free disk than the run's checkpoints and final model need: exit 2 with the numbers."""
    from trainers.plan import build_plan, disk_plan
    from trainers.run import load_spec

    spec = write_spec(tmp_path / "spec.json", tiny_models, tmp_path / "out")
    disk = disk_plan(load_spec(spec), build_plan(load_spec(spec), device_type="cpu"))
    assert disk.checkpoints == 3 and disk.checkpoint_bytes > 0 and disk.final_bytes > 0 and disk.existing_bytes == 0
    assert disk.need_bytes == 3 * disk.checkpoint_bytes + disk.final_bytes
    env = {**child_env("postgresql://u@127.0.0.1:1/nowhere"), "ATLASD_DISK_FREE_GB": "0.000001"}
    run = subprocess.run([sys.executable, "-m", "trainers", "run", str(spec)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert run.returncode == EXIT_BAD_SPEC
    error = json.loads(run.stdout.splitlines()[0])["error"]
    assert error.startswith(f"disk: {tmp_path / 'out'} has 0.0 GB free; this run needs about") and "atlasd gc" in error
    assert "3 checkpoints of" in error
    assert not (tmp_path / "out" / "data").exists()


def test_a_new_run_never_overwrites_checkpoints(tiny_models, tmp_path):
    from trainers.run import check_spec, load_spec

    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    spec = write_spec(tmp_path / "spec.json", tiny_models, out, traces={"db_url": "postgresql://x@h/db",
                                                                          "window_hi": 1})
    errors, _ = check_spec(load_spec(spec))
    assert any(e.startswith("output_dir:") for e in errors)
    write_spec(spec, tiny_models, out, resume=True, traces={"db_url": "postgresql://x@h/db", "window_hi": 1})
    errors, warnings = check_spec(load_spec(spec))
    assert errors == [] and any("no data snapshot" in w for w in warnings)
