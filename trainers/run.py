"""`python -m trainers run|validate|eval`: the training child's commands.

``run SPEC.json``: dataset (from Postgres, snapshotted to ``output_dir/data/`` so that a resumed
run sees exactly the same examples), evaluation of the starting student, GKD training with
checkpoints, evaluation of the final model, baseline comparison, ``output_dir/result.json``.
Each evaluation reports success per learning key (``slices``) and, with ``eval.probe_set``, the
model on the probe set with its drift from the base student (loaded for it, then released).
SIGTERM/SIGINT: the current step is abandoned, a checkpoint of the last finished step is saved,
exit 75 (resume with ``resume: true`` in the spec).

On several GPUs (``trainers.distributed.world_size``) this process checks the spec and makes the plan,
then launches the ranks and waits: rank 0 alone reads the database, evaluates, prints the JSON lines
and writes ``result.json`` and ``final/``; every rank trains its share of each step.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from atlasd.runspec import (
    EXIT_BAD_SPEC,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EvalReport,
    RunResult,
    RunSpec,
)
from trainers.telemetry import Telemetry

if TYPE_CHECKING:
    from trainers.distributed import Ranks


class BadSpec(ValueError):
    """The spec is invalid or cannot be run as written (exit 2)."""


def load_spec(path: str | Path) -> RunSpec:
    path = Path(path)
    try:
        return RunSpec.load(path)
    except FileNotFoundError:
        raise BadSpec(f"{path}: no such file") from None
    except ValidationError as exc:  # include_input=False: a db_url password never reaches the message
        lines = [f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
                 for e in exc.errors(include_input=False, include_url=False)]
        raise BadSpec(f"{path}: invalid run spec:\n  " + "\n  ".join(lines)) from None


def check_spec(spec: RunSpec) -> tuple[list[str], list[str]]:
    """(errors, warnings) that pydantic cannot see: judge, models, DB URL, vLLM, lengths."""
    from trainers.judge import available_judges

    errors, warnings = [], []
    if spec.eval.judge not in available_judges():
        errors.append(f"eval.judge: unknown judge {spec.eval.judge!r}; registered: {', '.join(available_judges())}")
    for name in ("teacher", "student", "base_student"):
        value = getattr(spec, name)
        local = value.startswith(("/", ".", "~")) or Path(value).exists()
        if local and not (Path(value).expanduser() / "config.json").is_file():
            errors.append(f"{name}: {value} is not a Hugging Face model folder (no config.json)")
        elif not local and os.environ.get("HF_HUB_OFFLINE") == "1":
            errors.append(f"{name}: {value!r} is not a local folder and HF_HUB_OFFLINE=1")
    if not errors:  # both models are readable: they must share one token space (checked before loading)
        from trainers.models import tokenizer_mismatch

        mismatch = tokenizer_mismatch(spec.student, spec.teacher)
        if mismatch:
            errors.append(f"teacher: {mismatch}")
    try:
        spec.traces.resolved_db_url()
    except ValueError as exc:
        errors.append(f"traces.db_url: {exc}")
    if spec.eval.probe_set:
        from trainers.evaluate import load_probe_set

        try:
            load_probe_set(spec.eval.probe_set)
        except ValueError as exc:
            errors.append(f"eval.probe_set: {exc}")
    if spec.optim.max_length - spec.gkd.max_new_tokens < 8:
        errors.append(f"optim.max_length ({spec.optim.max_length}) must exceed gkd.max_new_tokens "
                      f"({spec.gkd.max_new_tokens}) by at least 8 prompt tokens")
    if spec.optim.generation_backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            errors.append("optim.generation_backend: 'vllm' is not installed")
        if spec.device == "cpu":
            errors.append("optim.generation_backend: 'vllm' needs device cuda")
    if not spec.resume and any((spec.output_dir / d).exists() for d in ("final", "checkpoints")):
        errors.append(f"output_dir: {spec.output_dir} already holds checkpoints of a run; set resume: true "
                      "or use a new output_dir")
    from trainers.distributed import world_size

    try:
        world = world_size(spec)
    except ValueError as exc:
        errors.append(str(exc))
        world = 1
    for name, unsupported in (("optim.lora", spec.optim.lora is not None),
                              ("optim.generation_backend: vllm", spec.optim.generation_backend == "vllm"),
                              ("optim.optimizer: adamw-8bit", spec.optim.optimizer == "adamw-8bit")):
        if world > 1 and unsupported:
            errors.append(f"{name} is not supported on {world} GPUs (ranks) yet; set optim.num_gpus: 1")
    if spec.resume and not (spec.output_dir / "data" / "train.jsonl").is_file():
        warnings.append(f"resume: no data snapshot in {spec.output_dir / 'data'}; the run starts from scratch")
    return errors, warnings


def _memory_plan(spec: RunSpec, warnings: list[str]):
    """The memory plan and the disk check (``trainers.plan``); ``PlanRefused`` / ``DiskRefused``
    (``BadSpec``) when the run does not fit the device or the disk. A plan that cannot be made (a
    hub model whose config is not in the local cache) is a warning, and so no disk check."""
    from trainers.plan import PlanError, PlanRefused, check_disk, check_memory

    try:
        plan = check_memory(spec)
    except PlanRefused:
        raise
    except PlanError as exc:
        warnings.append(f"memory plan: {exc}")
        return None
    check_disk(spec, plan)
    return plan


# --- run ---------------------------------------------------------------------------------------
class _Stop:
    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _dataset(spec: RunSpec, tel: Telemetry):
    from trainers.dataset import build_dataset, load_examples, save_examples

    data = spec.output_dir / "data"
    meta_path = data / "meta.json"
    if spec.resume and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        train, evl = load_examples(data / "train.jsonl"), load_examples(data / "eval.jsonl")
        tel.emit("dataset", source="snapshot", **meta)
        return train, evl, meta
    build = build_dataset(spec)
    save_examples(build.train, data / "train.jsonl")
    save_examples(build.eval, data / "eval.jsonl")
    meta = {"n_train": len(build.train), "n_window": build.n_window, "n_rehearsal": build.n_rehearsal,
            "window_sessions": build.window_sessions,
            "n_eval": len(build.eval), "eval_set_hash": build.eval_set_hash, "skipped": dict(build.skipped)}
    meta_path.write_text(json.dumps(meta, indent=2))
    tel.emit("dataset", source="database", **meta)
    return build.train, build.eval, meta


def serving_dtype(model_path: str, precision):
    """The dtype a model is served (and so saved and evaluated) in: its config.json's, else the
    precision's frozen dtype."""
    from trainers.models import config_dtype

    return config_dtype(model_path) or precision.frozen_dtype


def _evaluate(which: str, model, spec: RunSpec, tok, teacher, examples, judge, device, tel, stop,
              precision) -> EvalReport:
    from trainers.evaluate import evaluate

    path = spec.output_dir / "eval" / f"{which}.json"
    model_path = spec.student if which == "start" else str(spec.output_dir / "final")
    tel.set_phase(f"eval_{which}", n_samples=len(examples))
    report = evaluate(
        model, tok, examples, judge, model_name=f"{which}:{model_path}", teacher=teacher,
        samples_path=spec.output_dir / "eval" / f"{which}_samples.jsonl", stop=stop,
        **_eval_settings(spec, device, tel, precision))
    if spec.eval.probe_set and not stop():
        report.probe = _probe(model, model_path, spec, tok, judge, device, tel, stop, precision,
                              spec.output_dir / "eval" / f"{which}_probe_samples.jsonl")
    if stop():
        from trainers.gkd import Interrupted

        raise Interrupted(f"stopped during the {which} evaluation")
    path.write_text(report.model_dump_json(indent=2))
    tel.emit("eval", which=which, **report.model_dump(mode="json"))
    return report


def _eval_settings(spec: RunSpec, device, tel: Telemetry, precision) -> dict:
    """trainers.evaluate.evaluate's keywords that every evaluation of a run shares."""
    return {"max_new_tokens": spec.eval.max_new_tokens,
            "max_prompt_tokens": max(8, spec.optim.max_length - spec.eval.max_new_tokens), "device": device,
            "batch_size": spec.optim.per_device_train_batch_size * spec.optim.gradient_accumulation_steps,
            "telemetry": tel, "precision": precision}


def _probe(model, model_path: str, spec: RunSpec, tok, judge, device, tel: Telemetry, stop, precision,
           samples_path: Path):
    """The model (loaded from ``model_path``) on the probe set; its drift against the base student,
    which is loaded for this (frozen dtype) unless it is the model itself, then released."""
    from trainers.evaluate import evaluate_probe, load_probe_set
    from trainers.models import load_causal_lm

    examples = load_probe_set(spec.eval.probe_set)
    tel.set_phase("eval_probe", n_samples=len(examples))
    same = model_path == spec.base_student
    base = model if same else load_causal_lm(spec.base_student, device, precision.frozen_dtype, trainable=False)
    try:
        return evaluate_probe(model, tok, examples, judge, base=base, model_name=f"probe:{model_path}",
                              samples_path=samples_path, stop=stop, **_eval_settings(spec, device, tel, precision))
    finally:
        del base
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def run(spec_path: str | Path, stream=None) -> int:
    t_start = time.time()
    tel = Telemetry(None, stream=stream)
    try:
        spec = load_spec(spec_path)
        tel.run_id = spec.run_id
        errors, warnings = check_spec(spec)
        if errors:
            raise BadSpec("; ".join(errors))
        plan = _memory_plan(spec, warnings)  # before any model loads: refused with the ways out
    except BadSpec as exc:
        tel.emit("error", kind="bad_spec", error=str(exc))
        tel.emit("done", status="failed", exit_code=EXIT_BAD_SPEC)
        print(f"trainers: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    from trainers.distributed import ALONE, launch, world_size

    world = world_size(spec)
    if world > 1:
        return launch(world, _rank, spec, warnings, plan, t_start)
    return _train(spec, warnings, plan, t_start, tel, ALONE)


def _rank(spec: RunSpec, warnings: list[str], plan, t_start: float) -> None:
    """One rank of a multi-GPU run (``trainers.distributed.launch``); exits with the run's status."""
    from trainers.distributed import Ranks
    from trainers.models import resolve_device

    ranks = Ranks.join(resolve_device(spec.device).type)
    tel = Telemetry(spec.run_id, stream=None if ranks.main else open(os.devnull, "w"))  # noqa: SIM115
    try:
        code = _train(spec, warnings, plan, t_start, tel, ranks)
    finally:
        ranks.leave()
    sys.exit(code)


def _train(spec: RunSpec, warnings: list[str], plan, t_start: float, tel: Telemetry, ranks: Ranks) -> int:
    """The run after its checks, in this process (``ranks``: alone, or one of several)."""
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    stop = _Stop()
    stop.install()
    result = RunResult(run_id=spec.run_id, status="failed")
    trainer = None
    code = EXIT_FAILED
    if ranks.main:
        tel.start_heartbeat()
    tel.emit("start", policy=spec.policy, gear=spec.gear, trigger=spec.trigger, resume=spec.resume,
             config_hash=spec.config_hash(), warnings=warnings, pid=os.getpid(), ranks=ranks.world)
    if plan is not None:
        tel.emit("plan", **plan.as_dict())
    try:
        import torch

        from trainers.gkd import GKDTrainer, Interrupted, final_complete, latest_checkpoint
        from trainers.models import Precision, load_causal_lm, load_student, load_tokenizer, resolve_device
        from trainers.judge import load_judge

        try:
            judge = load_judge(spec.eval.judge)
            device = ranks.device(resolve_device(spec.device))
            tel.set_phase("dataset")
            train, evl, meta = ranks.on_main(lambda: _dataset(spec, tel))  # one database reader
            result.n_train, result.n_eval, result.skipped = len(train), len(evl), meta["skipped"]
            result.window_sessions = meta.get("window_sessions", 0)  # a snapshot from before it was recorded: 0
            if not train:
                raise ValueError(f"no training examples in window ({spec.traces.window_lo}, {spec.traces.window_hi}]; "
                                 f"skipped: {meta['skipped'] or 'none'}")
            torch.manual_seed(spec.optim.seed)
            tel.set_phase("loading_models")
            finished = spec.resume and final_complete(spec.output_dir)  # only the final eval is left
            checkpoint = (spec.output_dir / "final" if finished
                          else latest_checkpoint(spec.output_dir) if spec.resume else None)
            tok = load_tokenizer(str(checkpoint or spec.student))
            precision = Precision.resolve(spec.optim.precision, device)
            vllm = None
            if spec.optim.generation_backend == "vllm":  # first: its share of the GPU must be free when it starts
                if device.type != "cuda":
                    raise ValueError("optim.generation_backend 'vllm' needs CUDA")
                from trainers.vllm_backend import VllmGenerator

                vllm = VllmGenerator(str(checkpoint or spec.student), seed=spec.optim.seed,
                                     max_model_len=spec.optim.max_length,
                                     gpu_memory_utilization=spec.optim.vllm_gpu_memory_utilization)
            teacher = load_causal_lm(spec.teacher, device, precision.frozen_dtype, trainable=False)
            student = load_student(spec.student, checkpoint, precision, spec.optim.lora)
            start_file = spec.output_dir / "eval" / "start.json"
            if spec.resume and start_file.is_file():
                result.eval_start = EvalReport.model_validate_json(start_file.read_text())
            elif evl:  # rank 0 alone, before the student is sharded
                result.eval_start = ranks.on_main(lambda: _evaluate("start", student, spec, tok, teacher, evl, judge,
                                                                    device, tel, stop, precision))
            trainer = GKDTrainer(student=student, teacher=teacher, tokenizer=tok, train=train, gkd=spec.gkd,
                                 optim=spec.optim, output_dir=spec.output_dir, device=device, telemetry=tel,
                                 stop=stop, vllm=vllm, precision=precision,
                                 serve_dtype=serving_dtype(spec.student, precision), ranks=ranks)
            if checkpoint is not None and not finished:
                trainer.restore(checkpoint)
                tel.emit("resumed", step=trainer.step, path=str(checkpoint))
            tel.set_phase("train", total_steps=trainer.total)
            outcome = trainer.train()
            result.steps = outcome.steps
            result.checkpoint = str(outcome.final_dir)
            result.train_metrics = _train_metrics(trainer)
            if evl and ranks.main:  # what is registered: final/ as saved, reloaded (the trained copy dropped first)
                trainer.release()
                del student
                registered = load_causal_lm(str(outcome.final_dir), device,
                                            serving_dtype(str(outcome.final_dir), precision), trainable=False)
                result.eval = _evaluate("final", registered, spec, tok, teacher, evl, judge, device, tel, stop,
                                        precision)
                result.baseline = spec.targets.summarize(result.eval)
            result.status = "succeeded"
            code = EXIT_OK
        except Interrupted as exc:
            result.status = "interrupted"
            result.error = str(exc)
            last = spec.output_dir / "final" if final_complete(spec.output_dir) else latest_checkpoint(spec.output_dir)
            result.checkpoint = str(last) if last else None
            code = EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001  (reported in result.json and on stdout, then exit 1)
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        tel.emit("error", kind="failed", error=result.error)
        traceback.print_exc(file=sys.stderr)
        code = EXIT_FAILED
    finally:
        if trainer is not None:
            result.steps = trainer.step
            result.train_metrics = result.train_metrics or _train_metrics(trainer)
        result.wall_time_s = round(time.time() - t_start, 3)
        path = spec.output_dir / "result.json"
        if ranks.main:
            result.dump(path)
        tel.emit("done", status=result.status, exit_code=code, steps=result.steps, result=str(path),
                 checkpoint=result.checkpoint)
        tel.close()
    return code


def _train_metrics(trainer) -> dict[str, float]:
    hist = trainer.history
    if not hist:
        return {}
    losses = [h["loss"] for h in hist]
    tail = losses[-max(1, len(losses) // 10):]
    return {"loss_first": losses[0], "loss_last": losses[-1], "loss_tail_mean": statistics.fmean(tail),
            "grad_norm_last": hist[-1]["grad_norm"], "prompts_truncated": float(trainer.n_prompt_truncated)}


# --- eval --------------------------------------------------------------------------------------
def eval_command(model_path: str, spec_path: str, out: str | None, stream=None) -> int:
    """Evaluate any checkpoint on the spec's frozen eval split (the run's snapshot if it has one)."""
    tel = Telemetry(None, stream=stream)
    try:
        spec = load_spec(spec_path)
        tel.run_id = spec.run_id
        from trainers.judge import load_judge

        judge = load_judge(spec.eval.judge)
        if not (Path(model_path) / "config.json").is_file():
            raise BadSpec(f"--model: {model_path} is not a Hugging Face model folder (no config.json)")
    except (BadSpec, ValueError) as exc:
        tel.emit("error", kind="bad_spec", error=str(exc))
        print(f"trainers: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    tel.start_heartbeat()
    try:
        from trainers.dataset import build_dataset, load_examples
        from trainers.evaluate import evaluate
        from trainers.models import Precision, load_causal_lm, load_tokenizer, resolve_device

        device = resolve_device(spec.device)
        precision = Precision.resolve(spec.optim.precision, device)
        snapshot = spec.output_dir / "data" / "eval.jsonl"
        tel.set_phase("dataset")
        examples = load_examples(snapshot) if snapshot.is_file() else build_dataset(spec, with_train=False).eval
        tel.set_phase("loading_models")
        tok = load_tokenizer(model_path)
        student = load_causal_lm(model_path, device, serving_dtype(model_path, precision), trainable=False)
        teacher = load_causal_lm(spec.teacher, device, precision.frozen_dtype, trainable=False)
        out_path = Path(out) if out else spec.output_dir / "eval" / f"{Path(model_path).name}.json"
        tel.set_phase("eval", n_samples=len(examples))
        report = evaluate(student, tok, examples, judge, model_name=model_path, teacher=teacher,
                          samples_path=out_path.with_suffix(".samples.jsonl"), **_eval_settings(spec, device, tel, precision))
        if spec.eval.probe_set:
            report.probe = _probe(student, model_path, spec, tok, judge, device, tel, None, precision,
                                  out_path.with_suffix(".probe_samples.jsonl"))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(report.model_dump_json(indent=2))
        tel.emit("eval", which="model", path=str(out_path), **report.model_dump(mode="json"),
                 baseline=spec.targets.summarize(report).model_dump(mode="json"))
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001
        tel.emit("error", kind="failed", error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        return EXIT_FAILED
    finally:
        tel.close()


def validate_command(spec_path: str, stream=None) -> int:
    stream = stream or sys.stdout
    try:
        spec = load_spec(spec_path)
        errors, warnings = check_spec(spec)
    except BadSpec as exc:
        stream.write(json.dumps({"ok": False, "errors": [str(exc)], "warnings": []}) + "\n")
        return EXIT_BAD_SPEC
    stream.write(json.dumps({"ok": not errors, "run_id": spec.run_id, "config_hash": spec.config_hash(),
                             "errors": errors, "warnings": warnings}) + "\n")
    return EXIT_BAD_SPEC if errors else EXIT_OK
