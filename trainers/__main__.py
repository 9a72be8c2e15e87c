"""``python -m trainers run SPEC.json | validate SPEC.json | eval --model PATH --spec SPEC.json [--out F]
| plan SPEC.json [--device cpu|cuda] [--device-memory-gb GB] [--gpus N] [--json]``."""

from __future__ import annotations

import argparse
import sys

from trainers.run import eval_command, run, validate_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train per the run spec; JSON lines on stdout, result.json in output_dir")
    p.add_argument("spec")
    p = sub.add_parser("validate", help="check a run spec (one JSON line on stdout; exit 2 if invalid)")
    p.add_argument("spec")
    p = sub.add_parser("eval", help="evaluate a model folder on the spec's frozen eval split")
    p.add_argument("--model", required=True, help="Hugging Face model folder (a checkpoint or the champion)")
    p.add_argument("--spec", required=True, help="run spec: eval set, judge, teacher, targets")
    p.add_argument("--out", help="EvalReport JSON path (default output_dir/eval/<model folder name>.json)")
    p = sub.add_parser("plan", help="memory plan from the models' configs, before loading anything "
                                    "(exit 0 fits, 3 does not fit, 2 bad spec)")
    p.add_argument("spec")
    p.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: the spec's)")
    p.add_argument("--device-memory-gb", type=float, metavar="GB",
                   help="device memory in GB (GiB); default: measured, or $ATLASD_DEVICE_MEMORY_GB")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="plan for N GPUs (ranks); default: optim.num_gpus, else the GPUs visible here")
    p.add_argument("--json", action="store_true", help="the plan as one JSON object")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.spec)
    if args.command == "validate":
        return validate_command(args.spec)
    if args.command == "plan":
        from trainers.plan import plan_command

        return plan_command(args.spec, device=args.device, memory_gb=args.device_memory_gb, gpus=args.gpus,
                            as_json=args.json)
    return eval_command(args.model, args.spec, args.out)


if __name__ == "__main__":
    sys.exit(main())
