"""Training on several ranks (``trainers.distributed``), on CPU with gloo: two ranks with FSDP2 match one
process with the same global batch, SIGTERM to the group then resume equals an uninterrupted two-rank
run, the sharded teacher scores and samples as the whole one (and is whole again for rank 0 alone), and
the executor's group signals (the runner's reaping after a daemon crash) reach every rank."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from atlasd.executor import LocalExecutor, _group_exists
from atlasd.runspec import EXIT_INTERRUPTED, EXIT_OK, RunResult, RunSpec
from tests.test_trainer_cli import child_env, seed, write_spec

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
EVAL = {"eval_fraction": 0.2, "max_samples": 1, "max_new_tokens": 8}
# 2 ranks x micro-batch 2: a global batch of 4; seed 42 (the default): steps reference, student, reference, reference
TWO_RANKS = {"learning_rate": 5e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
             "max_steps": STEPS, "save_steps": 100, "max_length": 128, "num_gpus": 2}


def _one_process(tiny_models, spec: RunSpec, out: Path):
    """The same run in this process: the two-rank run's data snapshot, micro-batch 2 x accumulation 2."""
    from trainers.dataset import load_examples
    from trainers.distributed import Ranks
    from trainers.gkd import GKDTrainer
    from trainers.models import Precision, load_causal_lm, load_student, load_tokenizer
    from trainers.telemetry import Telemetry

    cpu = torch.device("cpu")
    precision = Precision("fp32", cpu)
    teacher_path, student_path = tiny_models
    optim = spec.optim.model_copy(update={"gradient_accumulation_steps": 2, "num_gpus": None})
    trainer = GKDTrainer(student=load_student(student_path, None, precision, None),
                         teacher=load_causal_lm(teacher_path, cpu, torch.float32, trainable=False),
                         tokenizer=load_tokenizer(student_path), train=load_examples(spec.output_dir / "data" / "train.jsonl"),
                         gkd=spec.gkd, optim=optim, output_dir=out, device=cpu,
                         telemetry=Telemetry(1, stream=io.StringIO()), ranks=Ranks())
    trainer.train()
    return trainer


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"largest weight difference {a.parent.name}/{a.name} vs {b.parent.name}/{b.name}: {worst:.2e}")
    assert worst <= atol


def _cli(spec: Path, db_url: str):
    return subprocess.Popen([sys.executable, "-m", "trainers", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(db_url), cwd=ROOT,
                            start_new_session=True)


def test_two_ranks_match_one_process_and_resume_exactly_after_sigterm(db_url, tiny_models, tmp_path):
    """`python -m trainers run` with optim.num_gpus 2 on CPU (gloo, the student sharded with FSDP2):

    - rank 0 alone prints the JSON lines and writes result.json;
    - per step, the loss and gradient norm equal those of one process with the same global batch (micro-
      batch 2 x accumulation 2; the same examples and, by their per-example seeds, the same sampled
      completions), and so do the final weights;
    - SIGTERM to the process group stops both ranks at one step with one checkpoint (exit 75); the
      resumed run ends with the uninterrupted run's losses and weights."""
    seed(db_url)
    whole_spec = write_spec(tmp_path / "whole.json", tiny_models, tmp_path / "whole", device="cpu", optim=TWO_RANKS,
                            eval=EVAL)
    proc = _cli(whole_spec, db_url)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, err[-4000:]
    events = [json.loads(x) for x in out.splitlines()]  # every stdout line is JSON
    assert [e["event"] for e in events].count("start") == 1 and events[0]["ranks"] == 2
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))  # rank 0's only
    assert RunResult.load(tmp_path / "whole" / "result.json").status == "succeeded"
    whole = json.loads((tmp_path / "whole" / "final" / "trainer_state.json").read_text())["history"]

    one = _one_process(tiny_models, RunSpec.load(whole_spec), tmp_path / "one")
    assert [h["mode"] for h in one.history] == [h["mode"] for h in whole] == ["reference", "student", "reference",
                                                                              "reference"]
    print("\nstep  1 process       2 ranks         relative difference (loss, grad norm)")
    for a, b in zip(one.history, whole, strict=True):
        print(f"{a['step']:>4}  {a['loss']:.12f}  {b['loss']:.12f}  {abs(a['loss'] - b['loss']) / a['loss']:.1e}, "
              f"{abs(a['grad_norm'] - b['grad_norm']) / a['grad_norm']:.1e}")
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "whole" / "final", atol=1e-5)

    spec = write_spec(tmp_path / "stopped.json", tiny_models, tmp_path / "stopped", device="cpu", optim=TWO_RANKS,
                      eval=EVAL)
    proc = _cli(spec, db_url)
    first = []
    for line in proc.stdout:
        first.append(json.loads(line))
        if first[-1]["event"] == "step" and first[-1]["step"] >= 2:
            os.killpg(proc.pid, signal.SIGTERM)  # what the executor's cancel and the runner's reaping send
            break
    first += [json.loads(x) for x in proc.stdout]
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED, proc.stderr.read()[-4000:]
    checkpoints = [e for e in first if e["event"] == "checkpoint"]
    assert len(checkpoints) == 1 and checkpoints[0]["reason"] == "sigterm"
    stopped = checkpoints[0]["step"]
    assert 2 <= stopped < STEPS
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == [f"step-{stopped}"]
    assert RunResult.load(tmp_path / "stopped" / "result.json").status == "interrupted"

    write_spec(spec, tiny_models, tmp_path / "stopped", device="cpu", optim=TWO_RANKS, eval=EVAL, resume=True)
    proc = _cli(spec, db_url)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, err[-4000:]
    assert [json.loads(x)["step"] for x in out.splitlines() if '"event": "step"' in x] == list(range(stopped + 1,
                                                                                                   STEPS + 1))
    again = json.loads((tmp_path / "stopped" / "final" / "trainer_state.json").read_text())["history"]
    assert [h["loss"] for h in again] == pytest.approx([h["loss"] for h in whole], rel=1e-6)
    _assert_same_weights(tmp_path / "whole" / "final", tmp_path / "stopped" / "final", atol=1e-6)


TEACHER_RANKS = textwrap.dedent(
    """
    import sys
    from trainers.distributed import launch
    from tests.test_distributed import _teacher_rank
    if __name__ == "__main__":
        sys.exit(launch(2, _teacher_rank, sys.argv[1], sys.argv[2]))
    """
)
# a global batch of 4 token-id prompts (different lengths: left padding) and completions; rank r takes 2 of them
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17, 18]]
COMPLETIONS = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]]


def _teacher_rank(teacher_path: str, out: str) -> None:
    """One of two gloo ranks: the tiny teacher's logits at the completion positions and its seeded samples
    on this rank's slice, whole (as loaded on every rank), then sharded (``shard`` under its
    ``TeacherHidden`` root, gathered as the trainer gathers it), then gathered whole again
    (``keep_gathered``) and run by rank 0 alone while rank 1 waits; each rank writes what it saw to
    ``out/rank-R.json``."""
    from trainers.distributed import Ranks, gathered_root, keep_gathered, shard
    from trainers.generation import hf_generate, request_seeds, sampling_for
    from trainers.gkd import TeacherHidden
    from trainers.loss import Head
    from trainers.models import hf_model, load_causal_lm, load_tokenizer

    ranks = Ranks.join("cpu")
    cpu = torch.device("cpu")
    teacher = load_causal_lm(teacher_path, cpu, torch.float32, trainable=False)
    tok = load_tokenizer(teacher_path)
    lo = ranks.rank * 2
    prompts, completions = PROMPTS[lo: lo + 2], COMPLETIONS[lo: lo + 2]
    sampling = sampling_for(tok, teacher, max_new_tokens=6, temperature=1.0, seed=0)
    seeds = request_seeds(0, 1, len(PROMPTS))[lo: lo + 2]

    root = TeacherHidden(teacher)

    def logits() -> torch.Tensor:
        return Head.of(teacher).logits(root(prompts, completions, tok.pad_token_id, cpu), len(tok))

    def samples(sharded: bool) -> list[list[int]]:
        return hf_generate(teacher, prompts, sampling, device=cpu, seeds=seeds, sharded=sharded)

    def local_bytes() -> int:
        return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in teacher.parameters())

    with torch.no_grad():
        whole_logits, whole_samples, whole_bytes = logits(), samples(False), local_bytes()
        shard(root, hf_model(teacher).get_decoder().layers)
        sharded_bytes = local_bytes()
        with gathered_root(root, frozen=True):
            sharded_logits, sharded_samples = logits(), samples(True)
        keep_gathered(root)
        again_logits, again_samples = ranks.on_main(lambda: (logits(), samples(False)))  # rank 0 alone
    Path(out, f"rank-{ranks.rank}.json").write_text(json.dumps({
        "whole_bytes": whole_bytes, "sharded_bytes": sharded_bytes, "rows": whole_logits.shape[0],
        "sharded_logits_diff": (sharded_logits - whole_logits).abs().max().item(),
        "sharded_samples_equal": sharded_samples == whole_samples,
        "again_logits_diff": (again_logits - whole_logits).abs().max().item() if ranks.main else None,
        "again_samples_equal": again_samples == whole_samples if ranks.main else None,
        "samples": whole_samples}))
    ranks.leave()


def test_the_sharded_teacher_scores_and_samples_as_the_whole_one(tiny_models, tmp_path):
    """The teacher sharded over two gloo ranks: each rank holds half of the teacher's weights; with its root
    gathered the teacher's logits at the completion positions (what the loss reads) are those of the
    whole teacher, exactly, and so are its seeded samples (``synced_gpus``); after ``keep_gathered`` rank 0
    alone scores and samples the same (the final evaluation), with no collective."""
    (tmp_path / "teacher_ranks.py").write_text(TEACHER_RANKS)
    teacher_path, _ = tiny_models
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, str(tmp_path / "teacher_ranks.py"), teacher_path, str(tmp_path)],
                          capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                               "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")},
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list((tmp_path / "tmp").glob("torchelastic_*"))  # a launch leaves no log folder behind
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    print()
    for r, s in enumerate(seen):
        print(f"rank {r}: teacher weights {s['whole_bytes']} B whole, {s['sharded_bytes']} B sharded; "
              f"logits max |diff| sharded {s['sharded_logits_diff']:.1e}, again {s['again_logits_diff']}; "
              f"samples {s['samples']}")
    assert seen[0]["whole_bytes"] == seen[1]["whole_bytes"]
    assert seen[0]["sharded_bytes"] + seen[1]["sharded_bytes"] == seen[0]["whole_bytes"]
    assert all(s["sharded_bytes"] <= 0.55 * s["whole_bytes"] for s in seen)
    assert all(s["rows"] > 0 and s["sharded_logits_diff"] == 0.0 and s["sharded_samples_equal"] for s in seen)
    assert all(len(c) > 0 for s in seen for c in s["samples"])
    assert seen[0]["again_logits_diff"] == 0.0 and seen[0]["again_samples_equal"]


SLEEPER = textwrap.dedent(
    """
    import sys
    from trainers.distributed import launch
    from tests.test_distributed import _sleeping_rank
    if __name__ == "__main__":
        sys.exit(launch(2, _sleeping_rank))
    """
)


def _sleeping_rank() -> None:
    """A rank that ignores SIGTERM (a stuck collective): only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(f"rank-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    while True:
        time.sleep(0.1)


def test_the_executors_group_signals_reach_every_rank(tmp_path):
    """The ranks are in the launcher's process group (the executor's): reaping a run after a daemon crash
    (SIGTERM, then SIGKILL after the grace) ends every rank, even ranks that ignore SIGTERM."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    run_dir = tmp_path / "run"
    executor = LocalExecutor(command=[sys.executable, str(tmp_path / "sleeper.py")])

    async def scenario() -> list[int]:
        handle = await executor.submit(1, tmp_path / "unused.json", run_dir, {**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 120
        while len(list(run_dir.glob("rank-*.pid"))) < 2:
            assert time.monotonic() < deadline, (run_dir / "stderr.log").read_text()[-3000:]
            await asyncio.sleep(0.2)
        pids = [int(p.read_text()) for p in run_dir.glob("rank-*.pid")]
        assert all(os.getpgid(p) == handle.pgid for p in pids)
        assert await LocalExecutor().reap(handle.pid, handle.pgid, run_dir, grace_s=1.0)  # as recovery does
        await handle.process.wait()
        return pids

    pids = asyncio.run(scenario())
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not _group_exists(pids[0])


def test_what_several_ranks_do_not_support_is_refused(tiny_models, tmp_path):
    from trainers.run import check_spec

    spec_file = write_spec(tmp_path / "spec.json", tiny_models, tmp_path / "out", device="cpu",
                           optim={**TWO_RANKS, "lora": {"r": 4}, "optimizer": "adamw-8bit"})
    errors, _ = check_spec(RunSpec.load(spec_file))
    assert any(e.startswith("optim.lora is not supported on 2 GPUs") for e in errors)
    assert any(e.startswith("optim.optimizer: adamw-8bit is not supported on 2 GPUs") for e in errors)
    one = RunSpec.load(spec_file)
    one.optim = one.optim.model_copy(update={"num_gpus": None})
    assert not any("GPUs" in e for e in check_spec(one)[0])
