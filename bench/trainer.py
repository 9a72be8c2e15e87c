"""Trainer benchmark: atlasd's GKD trainer vs `trl.experimental.gkd.GKDTrainer` and
`trl.DistillationTrainer`, in one process, on the same tiny offline models, data and gear settings.

    python -m bench.trainer [--steps 4] [--threads 2] [--gear fast] [--lr 5e-4]

Shared by all three: the gear's batch (per-device 2 x accumulation 4), max_new_tokens, sampling
temperature and beta; lmbda = 1 (fully on-policy, the only mode DistillationTrainer has); fp32 on
CPU (bf16 off); the learning rate (--lr; the gear's 2e-5 barely moves a random tiny model, which
would hide the loss trajectories); the seed. Everything else is each trainer's stock default
(notably gradient checkpointing on for both TRL trainers, as shipped). Prints the median seconds per
optimizer step (the first step, a warm-up, excluded), ratios, and the loss per step.

Loss scales differ by design: stock GKD divides by the reference completion's token count, the
DistillationTrainer applies the temperature inside the divergence; atlasd divides by the generated
tokens of the step at temperature 1 (as GKD's loss).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import StepTimer, atlasd_load, atlasd_trainer, bench_data, losses, trl_distillation, trl_gkd


def bench_atlasd(paths, data, gear, args, workdir):
    import torch

    from atlasd.runspec import OptimSettings

    teacher_path, student_path = paths
    torch.manual_seed(args.seed)
    cpu = torch.device("cpu")
    gkd = gear.gkd.model_copy(update={"lmbda": 1.0})
    optim = OptimSettings(learning_rate=args.lr, per_device_train_batch_size=gear.optim.per_device_train_batch_size,
                          gradient_accumulation_steps=gear.optim.gradient_accumulation_steps, max_steps=args.steps,
                          max_length=1024, save_steps=10_000, seed=args.seed, lr_scheduler_type="linear")
    student, teacher, tok = atlasd_load(teacher_path, student_path, optim, cpu)
    trainer = atlasd_trainer(student, teacher, tok, data, gkd=gkd, optim=optim, output_dir=workdir / "atlasd",
                             device=cpu)
    times, losses_ = [], []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        row = trainer.train_step(step)
        times.append(time.perf_counter() - t0)
        losses_.append(row["loss"])
    return times, losses_


def bench_trl_gkd(paths, data, gear, args, workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_path, student_path = paths
    timer = StepTimer()
    trainer = trl_gkd(AutoModelForCausalLM.from_pretrained(student_path),
                      AutoModelForCausalLM.from_pretrained(teacher_path), AutoTokenizer.from_pretrained(student_path),
                      data, gear, steps=args.steps, lr=args.lr, seed=args.seed, output_dir=workdir / "trl_gkd",
                      callbacks=[timer.callback])
    trainer.train()
    return timer.step_times(), losses(trainer)


def bench_trl_distillation(paths, data, gear, args, workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_path, student_path = paths
    timer = StepTimer()
    trainer = trl_distillation(AutoModelForCausalLM.from_pretrained(student_path),
                               AutoModelForCausalLM.from_pretrained(teacher_path),
                               AutoTokenizer.from_pretrained(student_path), data, gear, steps=args.steps, lr=args.lr,
                               seed=args.seed, output_dir=workdir / "trl_distill", callbacks=[timer.callback])
    trainer.train()
    return timer.step_times(), losses(trainer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per trainer (first one is warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--gear", default="fast", help="gear preset (trainers/presets.py)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", choices=["atlasd", "trl-gkd", "trl-distillation"], action="append")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from trainers.presets import GEARS
    from trainers.tiny import build_tiny_pair

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    gear = GEARS[args.gear]
    runs = {"atlasd": bench_atlasd, "trl-gkd": bench_trl_gkd, "trl-distillation": bench_trl_distillation}
    with tempfile.TemporaryDirectory(prefix="atlasd-bench-") as tmp:
        workdir = Path(tmp)
        paths = build_tiny_pair(workdir / "models")
        data = bench_data(64)
        results = {}
        for name, fn in runs.items():
            if args.only and name not in args.only:
                continue
            times, losses = fn(paths, data, gear, args, workdir)
            results[name] = (statistics.median(times[1:] or times), losses)

    ours = results.get("atlasd", (None,))[0]
    print(f"\ntrainer benchmark: gear {args.gear} (batch {gear.optim.per_device_train_batch_size} x accum "
          f"{gear.optim.gradient_accumulation_steps}, max_new_tokens {gear.gkd.max_new_tokens}, lmbda 1, "
          f"beta {gear.gkd.beta}, temperature {gear.gkd.temperature}), {args.steps} steps, "
          f"{args.threads} CPU threads, torch {torch.__version__}")
    print(f"{'trainer':<18} {'median s/step':>14} {'vs atlasd':>10}")
    for name, (median, _) in results.items():
        ratio = f"{median / ours:.2f}x" if ours else "-"
        print(f"{name:<18} {median:>14.3f} {ratio:>10}")
    print("\nloss per optimizer step:")
    for name, (_, losses) in results.items():
        print(f"{name:<18} " + " ".join(f"{x:.4f}" for x in losses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
