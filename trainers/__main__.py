"""``python -m trainers run SPEC.json | validate SPEC.json | eval --model PATH --spec SPEC.json [--out F]``."""

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
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.spec)
    if args.command == "validate":
        return validate_command(args.spec)
    return eval_command(args.model, args.spec, args.out)


if __name__ == "__main__":
    sys.exit(main())
