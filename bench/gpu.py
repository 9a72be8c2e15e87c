"""GPU trainer benchmark: atlasd's GKD trainer vs TRL's ``DistillationTrainer`` and experimental
``GKDTrainer`` at real model shapes, on one GPU, offline, in under 8 minutes.

Run on the device machine, from the repository root (the wheels in ``.whl/`` are listed below):

    pip install -q --no-index --no-deps --target /tmp/site-packages .whl/*.whl && export PYTHONPATH=/tmp/site-packages && python -m bench.gpu

(``/tmp/site`` works too since the datasets are built with a fixed fingerprint, but keep
"site-packages" in the path: dill, which ``datasets`` hashes with, takes any module outside such a
path for a user module and cannot pickle pyarrow's types then.)

Options: ``--engines atlasd,distill,gkd`` (order = run order), ``--steps N`` (per engine, warm-up
included; default 6 on GPU, 3 with --tiny), ``--warmup 1``, ``--max-new-tokens`` (default: the gear's,
256; 16 with --tiny), ``--budget-s 110`` (per engine: no new
step starts when it would end past this, after at least warm-up + 1 step), ``--deadline-s 420``
(whole script: the hard stop of an engine is the earlier of 2 x budget and what the engines after it
need), ``--tiny`` (automatic without CUDA), ``--shapes full|vocab|tiny`` (vocab: tiny layers with the
real vocabularies, to check that path on a CPU), ``--json PATH``. Without a C compiler on the machine
(Triton builds its launchers with one) the script switches torch.compile and TRL's Triton kernels off
and says so in the report (``--no-fallback``: don't).

What runs. Models are random-initialised from configs (no downloads, no weight files), built
directly on the GPU (``torch.device("cuda")`` as the default device, in their final dtype):
a Qwen2.5-3B-shaped student (hidden 2048, intermediate 11008, 36 layers, 16 heads / 2 KV heads,
vocab 151,936, tied embeddings) and a Qwen2.5-7B-shaped teacher (hidden 3584, intermediate 18944,
28 layers, 28 / 4 heads, vocab 152,064, untied). The tokenizer is ``trainers.tiny.build_tokenizer``'s
offline BPE with a ChatML template, its vocabulary padded with unreachable entries to Qwen2.5's
151,665 tokens: both models' embeddings are larger (the "padded vocab" case; atlasd slices both heads
to the tokenizer's size, so the loss is as wide as with the real tokenizer, not ~512 columns). Random
models almost never sample an end token, so every completion runs to max_new_tokens: the worst case,
the same for every engine.

The fast gear for every engine: batch 2 x gradient accumulation 4, max_new_tokens 256, lmbda 1,
beta 0.5, temperature 0.9, learning rate 2e-5 (``GKDSettings()`` / ``OptimSettings()`` defaults).
- atlasd: ``trainers.gkd.GKDTrainer`` with ``optim.precision`` auto (on CUDA: fp32 master weights,
  bf16 autocast, bf16 teacher); the split (sampling / teacher / student fwd+bwd / optimizer) and the
  trainer's own peak memory come from its step rows.
- distill, gkd: TRL with its stock defaults (gradient checkpointing on) and ``bf16=True`` on models
  built in bf16 (pure bf16 weights and AdamW state, as a bf16 checkpoint loads). Both refuse a
  teacher whose ``vocab_size`` differs from the student's (they compare full distributions), so their
  teacher is built with the student's 151,936 rows (the same compute; noted in the row). Their split
  comes from hooks: the student's ``generate``, the teacher's forward passes, the optimizer step
  (callbacks); "student" is the rest of the step (forward, loss, backward, clipping).

Reported per engine: median seconds per optimizer step (warm-up steps excluded), the ratio to atlasd,
the split, peak GPU memory (``torch.cuda.max_memory_allocated``, reset between engines, models freed;
for atlasd also the per-step peaks of its step rows, since it resets the statistics every step), in GiB,
atlasd's memory plan (``trainers.plan.build_plan``, "n/a" when missing), and the share of the
student's trained weights that changed in the first optimizer step (in their stored dtype, and as
bf16 values: fp32 masters always move, pure bf16 weights mostly round the update away). A failing
engine (OOM, import error, timeout) is reported in its row; the others still run. The Markdown table
goes to stdout, the same data as JSON to ``$OUT/gpu_bench.json`` (``$OUT`` unset: ./gpu_bench.json).

Wheels (the image has torch, transformers, accelerate, peft, numpy and their dependencies; the rest
of what the three engines import travels in ``.whl/``). Download once, on a machine with network:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .whl trl==1.16.0 datasets==5.2.0 pyarrow==25.0.1 pandas==3.1.1 python-dateutil==2.9.0.post0 \
        six==1.17.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0 psycopg==3.3.9 psycopg-binary==3.3.9

- trl: both TRL engines, and atlasd's loss (``trl.kernels.chunked_divergence``, which imports
  ``trl.trainer.utils``, hence datasets and pandas, even for atlasd alone);
- datasets + pyarrow + dill + multiprocess + xxhash, and pandas + python-dateutil + six: imported by
  trl (pandas 3.1 needs numpy >= 2.0.2; with an image on numpy 1.x take pandas==2.2.3);
- pydantic + pydantic-core + annotated-types + typing-inspection, and typing-extensions (pydantic-core
  2.50 needs >= 4.16, newer than torch images carry): ``atlasd.runspec``;
- psycopg + psycopg-binary (bundles libpq): ``trainers.gkd`` imports ``trainers.dataset``, which
  imports psycopg at module level.
Not needed although they load when present: mlflow (``trl.extras.profiling``), scipy and Pillow
(transformers). ``--platform manylinux_2_28_x86_64`` (pip also takes older manylinux tags with it)
because pyarrow 25 ships only manylinux_2_28 wheels and pandas 3.1 manylinux_2_24/2_28.
``python -m bench.gpu --tiny`` (CPU, one thread) checks the same code path in about 15 s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    Split,
    atlasd_dtypes,
    atlasd_tokenizer,
    atlasd_trainer,
    bench_data,
    cuda_sync,
    instrument,
    losses,
    trl_distillation,
    trl_gkd,
)

ENGINES = {"atlasd": "atlasd", "distill": "trl DistillationTrainer", "gkd": "trl experimental GKDTrainer"}
GIB = 2**30  # memory is reported in GiB, as the trainer's step rows (peak_memory_gb = bytes / 2**30)

# (name: Qwen2Config fields); tied = tie_word_embeddings
FULL = {
    "student": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "teacher": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
VOCAB = {  # tiny layers, real vocabularies and tokenizer size: the full path's vocab handling, on a CPU
    "student": dict(TINY_STUDENT := dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2), vocab_size=151936,
                    tie_word_embeddings=True),
    "teacher": dict(TINY_STUDENT, intermediate_size=256, vocab_size=152064, tie_word_embeddings=False),
}
TINY = {
    "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=600, tie_word_embeddings=True),
    "teacher": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=640, tie_word_embeddings=False),
}


class EngineTimeout(Exception):
    """The engine ran past its hard time limit."""


# --- context ----------------------------------------------------------------------------------
@dataclass
class Ctx:
    args: argparse.Namespace
    device: object  # torch.device
    cuda: bool
    workdir: Path
    tok_dir: Path
    configs: dict  # name -> Qwen2Config: student, teacher, teacher_trl
    gear: object
    data: list
    steps: int
    t_start: float


@dataclass
class Result:
    engine: str
    status: str = "ok"  # ok | failed | skipped
    error: str | None = None
    step_times_s: list[float] = field(default_factory=list)
    splits: list[dict] = field(default_factory=list)  # per step: gen / teacher / student / optim seconds
    split_source: str | None = None
    losses: list[float] = field(default_factory=list)
    trainer_rows: list[dict] = field(default_factory=list)
    peak_memory_gib: float | None = None
    base_memory_gib: float | None = None
    trainer_peak_memory_gib: float | None = None
    weights_changed: float | None = None
    weights_changed_bf16: float | None = None
    weights_dtype: str | None = None
    n_trained_params: int | None = None
    build_s: float | None = None
    wall_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def measured(self, warmup: int) -> list[float]:
        return self.step_times_s[warmup:]

    def median(self, warmup: int) -> float | None:
        times = self.measured(warmup)
        return statistics.median(times) if times else None

    def split_medians(self, warmup: int) -> dict[str, float] | None:
        rows = self.splits[warmup:]
        if not rows:
            return None
        keys = [k for k in ("gen", "teacher", "student", "optim") if all(k in r for r in rows)]
        return {k: statistics.median(r[k] for r in rows) for k in keys} or None


# --- models -----------------------------------------------------------------------------------
QWEN25_TOKENIZER_LEN = 151_665  # len(AutoTokenizer.from_pretrained("Qwen/Qwen2.5-3B")): 151,643 + 22 special


def build_bench_tokenizer(out_dir: Path, size: int | None):
    """``trainers.tiny.build_tokenizer``'s offline BPE (~512 tokens, ChatML template), its vocabulary
    padded to ``size`` entries when given: the extra entries sit in the BPE model's vocabulary (no
    merges reach them, as Qwen's own unused rows), so ``len(tokenizer)`` is a real tokenizer's and
    atlasd's slice of the heads to it keeps the real width; the tokenizer still loads in a blink."""
    from transformers import AutoTokenizer

    from trainers.tiny import build_tokenizer, synthetic_corpus

    tok = build_tokenizer(synthetic_corpus(), out_dir)
    if size is None or size <= len(tok):
        return tok
    path = out_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    top = max([*vocab.values(), *(a["id"] for a in data.get("added_tokens", []))]) + 1
    for i in range(top, size):
        vocab[f"<bench_pad_{i}>"] = i
    path.write_text(json.dumps(data, ensure_ascii=False))
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert len(tok) == size, (len(tok), size)
    return tok


def make_configs(tok, shapes: dict) -> dict:
    from transformers import Qwen2Config

    def cfg(fields: dict) -> Qwen2Config:
        return Qwen2Config(**fields, max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                           dtype="bfloat16")  # what the real checkpoints declare (their serving dtype)

    student, teacher = cfg(shapes["student"]), cfg(shapes["teacher"])
    for c in (student, teacher):
        assert c.vocab_size > len(tok), (c.vocab_size, len(tok))  # the padded-vocab case, on purpose
    same_vocab = dict(shapes["teacher"], vocab_size=shapes["student"]["vocab_size"])
    return {"student": student, "teacher": teacher, "teacher_trl": cfg(same_vocab)}


def build_model(config, dtype, device, seed: int, tok, *, trainable: bool):
    """Random init from ``config`` straight on ``device`` in ``dtype`` (no CPU copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # every parameter is allocated on the device, in dtype
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)  # (it sets config.dtype)
    p = next(model.parameters())
    if p.device.type != torch.device(device).type or p.dtype != dtype:
        raise RuntimeError(f"model built on {p.device}/{p.dtype}, wanted {device}/{dtype}")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


class WeightProbe:
    """The trained parameters before the first optimizer step, copied to CPU one tensor at a time;
    ``compare()`` counts changed elements tensor by tensor on their device (no second model copy)."""

    def __init__(self, model):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.copies = [p.detach().to("cpu", copy=True) for _, p in self.params]

    @property
    def dtype(self) -> str:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in self.params})
        return "/".join(dtypes)

    def compare(self) -> tuple[float, float, int]:
        import torch

        changed = changed_bf16 = total = 0
        with torch.no_grad():
            for (_, p), old_cpu in zip(self.params, self.copies, strict=True):
                new = p.detach()
                old = old_cpu.to(new.device)
                changed += int((new != old).sum().item())
                changed_bf16 += int((new.to(torch.bfloat16) != old.to(torch.bfloat16)).sum().item())
                total += new.numel()
                del old
        self.copies, self.params = [], []  # no reference to the model left behind
        return changed / max(total, 1), changed_bf16 / max(total, 1), total


# --- clock ------------------------------------------------------------------------------------
class Clock:
    """Optimizer-step wall times (CUDA-synchronised) and the soft budget: after at least
    ``min_steps`` steps, no step starts when the last one's time would carry it past the budget."""

    def __init__(self, t0: float, budget_s: float, max_steps: int, min_steps: int, sync: bool):
        self.t0, self.budget_s, self.max_steps, self.min_steps, self.sync = t0, budget_s, max_steps, min_steps, sync
        self.times: list[float] = []
        self.last = None

    def start(self) -> None:
        if self.sync:
            cuda_sync()
        self.last = time.perf_counter()

    def step_end(self) -> float:
        if self.sync:
            cuda_sync()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        return self.times[-1]

    def should_stop(self) -> bool:
        n = len(self.times)
        if n >= self.max_steps:
            return True
        if n < self.min_steps:
            return False
        return (time.perf_counter() - self.t0) + self.times[-1] > self.budget_s


class hard_limit:
    """Raise ``EngineTimeout`` in the main thread after ``seconds`` (SIGALRM; a no-op elsewhere)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = (hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
                      and seconds > 0)

    def _fire(self, signum, frame):
        raise EngineTimeout(f"hard time limit of {self.seconds:.0f} s reached")

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


# --- engines ----------------------------------------------------------------------------------
def run_atlasd(ctx: Ctx, res: Result, clock: Clock) -> None:
    from atlasd.runspec import OptimSettings

    gkd = ctx.gear.gkd.model_copy(update={"lmbda": 1.0})
    optim = ctx.gear.optim.model_copy(update={"max_steps": ctx.steps, "save_steps": 1_000_000})
    OptimSettings.model_validate(optim.model_dump())
    s_dtype, t_dtype = atlasd_dtypes(optim, ctx.device)
    t0 = time.perf_counter()
    tok = atlasd_tokenizer(ctx.tok_dir)
    student = build_model(ctx.configs["student"], s_dtype, ctx.device, ctx.args.seed, tok, trainable=True)
    teacher = build_model(ctx.configs["teacher"], t_dtype, ctx.device, ctx.args.seed + 1, tok, trainable=False)
    trainer = atlasd_trainer(student, teacher, tok, ctx.data, gkd=gkd, optim=optim,
                             output_dir=ctx.workdir / "atlasd", device=ctx.device)
    del student, teacher
    res.build_s = time.perf_counter() - t0
    res.notes.append(f"student {str(s_dtype).removeprefix('torch.')}, teacher {str(t_dtype).removeprefix('torch.')}, "
                     f"precision {getattr(getattr(trainer, 'precision', None), 'name', optim.precision)}")
    probe = WeightProbe(trainer.student)
    res.weights_dtype = probe.dtype
    res.split_source = "trainer step rows"
    clock.start()
    for step in range(1, ctx.steps + 1):
        row = trainer.train_step(step)
        clock.step_end()
        res.step_times_s = list(clock.times)
        if row is None:
            raise RuntimeError(f"train_step({step}) returned None (stop requested)")
        res.trainer_rows.append({k: v for k, v in row.items() if isinstance(v, int | float | str | None)})
        res.losses.append(float(row["loss"]))
        res.splits.append(atlasd_split(row))
        if step == 1:
            res.weights_changed, res.weights_changed_bf16, res.n_trained_params = probe.compare()
            clock.start()  # the comparison is not part of any step
        if clock.should_stop():
            break
    # the trainer resets the CUDA peak statistics at the start of every step: its rows hold the per-step peaks
    peaks = [r["peak_memory_gb"] for r in res.trainer_rows if isinstance(r.get("peak_memory_gb"), int | float)]
    res.trainer_peak_memory_gib = max(peaks) if peaks else None
    del trainer


def atlasd_split(row: dict) -> dict[str, float]:
    out = {"gen": row["time_gen_s"], "teacher": row["time_teacher_s"], "student": row["time_student_s"],
           "optim": row["time_optim_s"]}
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


def run_trl(ctx: Ctx, res: Result, clock: Clock, which: str) -> None:
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    import trl  # noqa: F401  (an import error belongs to this row, before any model is built)
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(str(ctx.tok_dir))
    student = build_model(ctx.configs["student"], dtype, ctx.device, ctx.args.seed, tok, trainable=True)
    teacher = build_model(ctx.configs["teacher_trl"], dtype, ctx.device, ctx.args.seed + 1, tok, trainable=False)
    res.notes.append(f"student and teacher {str(dtype).removeprefix('torch.')}; teacher vocab_size "
                     f"{ctx.configs['student'].vocab_size} (TRL requires the student's, not "
                     f"{ctx.configs['teacher'].vocab_size})")
    split = Split(sync=ctx.cuda)
    handles = instrument(student, teacher, split)
    res.split_source = "hooks (generate, teacher forward, optimizer step); student = rest"
    state = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, st, control, model=None, **kw):
            state["probe"] = WeightProbe(model)
            res.weights_dtype = state["probe"].dtype
            split.take()
            clock.start()

        def on_pre_optimizer_step(self, args, st, control, **kw):
            split.begin("optim")

        def on_optimizer_step(self, args, st, control, **kw):
            split.end("optim")

        def on_step_end(self, args, st, control, **kw):
            dt = clock.step_end()
            res.step_times_s = list(clock.times)
            parts = split.take()
            parts.setdefault("gen", 0.0)
            parts.setdefault("teacher", 0.0)
            parts.setdefault("optim", 0.0)
            parts["student"] = max(dt - parts["gen"] - parts["teacher"] - parts["optim"], 0.0)
            res.splits.append(parts)
            if st.global_step == 1:
                res.weights_changed, res.weights_changed_bf16, res.n_trained_params = state.pop("probe").compare()
                clock.start()
            if clock.should_stop():
                control.should_training_stop = True

    make = trl_distillation if which == "distill" else trl_gkd
    trainer = make(student, teacher, tok, ctx.data, ctx.gear, steps=ctx.steps, lr=ctx.gear.optim.learning_rate,
                   seed=ctx.gear.optim.seed, output_dir=ctx.workdir / which, cuda=ctx.cuda, callbacks=[Probe()])
    del student, teacher
    res.build_s = time.perf_counter() - t0
    try:
        trainer.train()
    finally:
        res.losses = [float(x) for x in losses(trainer)]
        for h in handles:
            h.remove()
        state.clear()
        trainer.accelerator.free_memory()  # its references to the model and optimizer
    del trainer


def run_engine(name: str, ctx: Ctx, left_after: int) -> Result:
    import torch

    args = ctx.args
    res = Result(engine=name)
    remaining = args.deadline_s - (time.monotonic() - ctx.t_start)
    hard = min(2 * args.budget_s, remaining - args.reserve_s * left_after)
    if hard < 30:
        res.status, res.error = "skipped", f"out of time ({remaining:.0f} s left of --deadline-s {args.deadline_s:.0f})"
        return res
    if ctx.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        res.base_memory_gib = torch.cuda.memory_allocated() / GIB
        if res.base_memory_gib > 0.5:
            res.notes.append(f"{res.base_memory_gib:.1f} GiB still allocated from earlier engines")
    t0 = time.perf_counter()
    clock = Clock(t0, min(args.budget_s, hard), ctx.steps, min(ctx.steps, args.warmup + 1), sync=ctx.cuda)
    try:
        with hard_limit(hard):
            if name == "atlasd":
                run_atlasd(ctx, res, clock)
            else:
                run_trl(ctx, res, clock, name)
    except BaseException as exc:  # noqa: BLE001  (OOM, import errors, timeouts: reported in the row)
        if isinstance(exc, KeyboardInterrupt):
            raise
        res.status = "failed"
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        res.notes.append("traceback: " + " | ".join(
            line.strip() for line in traceback.format_exception(exc)[-4:-1] if line.strip())[:600])
    finally:
        res.wall_s = time.perf_counter() - t0
        if ctx.cuda:
            res.peak_memory_gib = torch.cuda.max_memory_allocated() / GIB
            _reset_compiled()  # compiled graphs (and their CUDA-graph memory pools) outlive the models otherwise
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    if res.trainer_peak_memory_gib is not None:
        res.peak_memory_gib = max(res.peak_memory_gib or 0.0, res.trainer_peak_memory_gib)
    if res.status == "ok" and len(res.step_times_s) <= args.warmup:
        res.notes.append("no step after the warm-up: the median is over the warm-up step(s)")
    return res


def _reset_compiled() -> None:
    try:
        import torch._dynamo

        torch._dynamo.reset()
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001  (best effort)
        pass


# --- memory plan --------------------------------------------------------------------------------
def memory_plan(ctx: Ctx, student_dir: Path, teacher_dir: Path) -> tuple[float | None, str, bool | None]:
    """atlasd's memory plan for this run: (bytes, or None and why not; its "fits" verdict)."""
    try:
        import torch

        from trainers.plan import build_plan

        from atlasd.runspec import RunSpec, TraceSelection

        gkd = ctx.gear.gkd.model_copy(update={"lmbda": 1.0})
        optim = ctx.gear.optim.model_copy(update={"max_steps": ctx.steps})
        spec = RunSpec(run_id=1, policy="bench", gear=ctx.args.gear, teacher=str(teacher_dir), student=str(student_dir),
                       base_student=str(student_dir), traces=TraceSelection(window_hi=1), gkd=gkd, optim=optim,
                       output_dir=ctx.workdir / "plan-run", device="cuda" if ctx.cuda else "cpu")
        kwargs = {"device_type": "cuda" if ctx.cuda else "cpu"}
        if ctx.cuda:
            kwargs["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        plan = build_plan(spec, **kwargs)
        return float(plan.total_bytes), "trainers.plan.build_plan", plan.fits
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {str(exc)[:200]}", None


# --- report -------------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}", none="-"):
    return none if x is None else fmt.format(x)


def report(results: list[Result], meta: dict, warmup: int) -> tuple[str, dict]:
    ours = next((r.median(warmup) for r in results if r.engine == "atlasd" and r.status == "ok"), None)
    lines = [
        f"# GPU trainer benchmark ({meta['mode']})",
        "",
        f"- device: {meta['device']}; torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}, trl {meta['versions']['trl']}, "
        f"python {meta['versions']['python']}; {meta['date']}",
        f"- student {meta['student']}; teacher {meta['teacher']}; tokenizer {meta['tokenizer_tokens']} tokens",
        f"- gear {meta['gear']}: batch {meta['batch']} x accumulation {meta['accumulation']}, max_new_tokens "
        f"{meta['max_new_tokens']}, lmbda 1, beta {meta['beta']}, temperature {meta['temperature']}, lr {meta['lr']}; "
        f"{meta['steps']} steps per engine ({warmup} warm-up excluded), budget {meta['budget_s']:.0f} s per engine",
        f"- atlasd memory plan: {_f(meta['plan_gib'], '{:.1f} GiB', 'n/a')} ({meta['plan_source']})",
        *([f"- **fallback**: {meta['fallback']}"] if meta.get("fallback") else []),
        "",
        "| engine | status | steps | median s/step | vs atlasd | sampling s | teacher s | student fwd+bwd s "
        "| optimizer s | peak GPU GiB | plan GiB | weights changed after step 1 (stored / as bf16) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    engines = []
    for r in results:
        med = r.median(warmup) if r.step_times_s else None
        if med is None and r.step_times_s:
            med = statistics.median(r.step_times_s)
        ratio = med / ours if (med and ours) else None
        split = r.split_medians(warmup) or (r.split_medians(0) if r.splits else None) or {}
        status = r.status if r.status == "ok" else f"{r.status}: {r.error}"
        changed = (f"{r.weights_changed:.1%} / {r.weights_changed_bf16:.1%} ({r.weights_dtype})"
                   if r.weights_changed is not None else "-")
        peak = _f(r.peak_memory_gib, "{:.1f}", "n/a (cpu)" if not meta["cuda"] else "-")
        plan = _f(meta["plan_gib"], "{:.1f}", "n/a") if r.engine == "atlasd" else "-"
        notes = "; ".join(n for n in r.notes if not n.startswith("traceback"))
        lines.append(
            f"| {ENGINES[r.engine]} | {status} | {len(r.step_times_s)} | {_f(med)} | "
            f"{_f(ratio, '{:.2f}x')} | {_f(split.get('gen'))} | {_f(split.get('teacher'))} | "
            f"{_f(split.get('student'))} | {_f(split.get('optim'))} | {peak} | {plan} | {changed} | {notes} |")
        engines.append({
            "engine": r.engine, "name": ENGINES[r.engine], "status": r.status, "error": r.error,
            "median_s_per_step": med, "vs_atlasd": ratio, "warmup_steps": warmup,
            "step_times_s": r.step_times_s, "split_median_s": split or None, "split_source": r.split_source,
            "split_per_step_s": r.splits, "losses": r.losses, "peak_memory_gib": r.peak_memory_gib,
            "base_memory_gib": r.base_memory_gib, "trainer_peak_memory_gib": r.trainer_peak_memory_gib,
            "plan_gib": meta["plan_gib"] if r.engine == "atlasd" else None,
            "weights_changed": r.weights_changed, "weights_changed_bf16": r.weights_changed_bf16,
            "weights_dtype": r.weights_dtype, "n_trained_params": r.n_trained_params, "build_s": r.build_s,
            "wall_s": r.wall_s, "trainer_rows": r.trainer_rows, "notes": r.notes,
        })
    lines.append("")
    lines.append("sampling / teacher / student / optimizer: medians over the measured steps; atlasd from its step "
                 "rows, TRL from hooks (student = the rest of the step). vs atlasd: median s/step ratio.")
    return "\n".join(lines), {"meta": meta, "engines": engines}


def _versions() -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for name in ("trl", "accelerate", "peft", "datasets"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = "missing"
    return out


def _shape(cfg) -> str:
    return (f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'}")


# --- main -----------------------------------------------------------------------------------------
def c_compiler() -> str | None:
    """The C compiler Triton needs at run time (it builds its launchers with one), if any."""
    import shutil

    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compiler_fallback() -> str:
    """Without a C compiler, Triton kernels cannot be launched: torch.compile (atlasd's compiled
    decode) is switched off before torch is imported, and TRL's Triton divergence kernels (atlasd's loss,
    the DistillationTrainer's) fall back to their torch tiles. Returns the note for the report."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    return ("no C compiler (cc/gcc/clang) on this machine: torch.compile disabled (TORCHDYNAMO_DISABLE=1, "
            "atlasd decodes eagerly) and TRL's Triton kernels off (torch tiles); install gcc for the real numbers")


def _triton_off() -> None:
    try:
        import trl.kernels.chunked_logprob as kernels
    except Exception:  # noqa: BLE001  (no trl: the engines report it)
        return
    kernels._TRITON_AVAILABLE = False  # read by its _use_triton() at every call


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in fp32 (automatic without CUDA)")
    parser.add_argument("--shapes", choices=["full", "vocab", "tiny"], default=None,
                        help="model shapes (default: full on CUDA, tiny otherwise); vocab: tiny layers with the "
                        "real vocabularies and a tokenizer padded to Qwen2.5's size")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per engine (default 6 GPU, 3 tiny)")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps excluded from the medians")
    parser.add_argument("--engines", default="atlasd,distill,gkd", help="comma-separated, in run order")
    parser.add_argument("--budget-s", type=float, default=110.0, help="soft time budget per engine")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="time budget of the whole script")
    parser.add_argument("--reserve-s", type=float, default=60.0,
                        help="time kept for each engine still to run when setting an engine's hard limit")
    parser.add_argument("--gear", default="fast", help="gear preset (trainers/presets.py)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override the gear's max_new_tokens (default: the gear's on GPU, 16 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in tiny mode (1: tiny matrices gain nothing from more, and a "
                        "busy machine makes extra threads spin: 3x slower on 2 loaded cores)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="on CUDA without a C compiler, run as is (Triton and torch.compile will fail)")
    parser.add_argument("--json", default=None, help="JSON path (default $OUT/gpu_bench.json or ./gpu_bench.json)")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        parser.error(f"--engines: unknown {bad}; choose from {','.join(ENGINES)}")
    args.engines = list(dict.fromkeys(engines))
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    args = parse_args(argv)
    compiler = c_compiler()
    fallback = compiler_fallback() if (compiler is None and not args.tiny and not args.no_fallback) else None

    import torch
    import transformers

    from trainers.presets import GEARS

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.tiny
    if fallback and cuda:
        _triton_off()
    elif fallback:  # no CUDA: nothing compiles, nothing to fall back from
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
        fallback = None
    shapes = args.shapes or ("full" if cuda else "tiny")
    mode = f"{shapes} shapes, " + ("CUDA, bf16" if cuda else "CPU, fp32")
    if not cuda:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (6 if cuda else 3)
    gear = GEARS[args.gear]
    max_new = args.max_new_tokens or (None if cuda else 16)
    if max_new and max_new != gear.gkd.max_new_tokens:
        gear = dataclasses.replace(gear, gkd=gear.gkd.model_copy(update={"max_new_tokens": max_new}))
    per_step = gear.optim.per_device_train_batch_size * gear.optim.gradient_accumulation_steps
    out_path = Path(args.json) if args.json else Path(os.environ.get("OUT") or ".") / "gpu_bench.json"

    with tempfile.TemporaryDirectory(prefix="atlasd-gpu-bench-") as tmp:
        workdir = Path(tmp)
        tok_dir = workdir / "tokenizer"
        tok = build_bench_tokenizer(tok_dir, None if shapes == "tiny" else QWEN25_TOKENIZER_LEN)
        configs = make_configs(tok, {"full": FULL, "vocab": VOCAB, "tiny": TINY}[shapes])
        folders = {}
        for name in ("student", "teacher"):  # config + tokenizer, no weights: what the plan reads
            folders[name] = workdir / name
            configs[name].save_pretrained(folders[name])
            tok.save_pretrained(folders[name])
        ctx = Ctx(args=args, device=device, cuda=cuda, workdir=workdir, tok_dir=tok_dir, configs=configs, gear=gear,
                  data=bench_data(max(64, per_step * steps)), steps=steps, t_start=t_start)
        plan_bytes, plan_source, plan_fits = memory_plan(ctx, folders["student"], folders["teacher"])
        meta = {
            "mode": mode, "cuda": cuda,
            "device": (f"{torch.cuda.get_device_name(0)} "
                       f"({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB)"
                       if cuda else f"CPU ({platform.machine()}, {args.threads} threads)"),
            "versions": _versions(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "student": _shape(configs["student"]), "teacher": _shape(configs["teacher"]),
            "tokenizer_tokens": len(tok), "gear": args.gear, "batch": gear.optim.per_device_train_batch_size,
            "accumulation": gear.optim.gradient_accumulation_steps, "max_new_tokens": gear.gkd.max_new_tokens,
            "beta": gear.gkd.beta, "temperature": gear.gkd.temperature, "lr": gear.optim.learning_rate,
            "steps": steps, "budget_s": args.budget_s, "deadline_s": args.deadline_s,
            "plan_gib": plan_bytes / GIB if plan_bytes is not None else None, "plan_source": plan_source,
            "plan_fits": plan_fits,
            "c_compiler": compiler, "fallback": fallback,
            "argv": sys.argv[1:] if argv is None else list(argv),
        }
        results = []
        for i, name in enumerate(args.engines):
            print(f"[bench.gpu] {name}: running ({time.monotonic() - t_start:.0f} s elapsed)", file=sys.stderr,
                  flush=True)
            res = run_engine(name, ctx, left_after=len(args.engines) - i - 1)
            results.append(res)
            print(f"[bench.gpu] {name}: {res.status}{' (' + res.error + ')' if res.error else ''}, "
                  f"{len(res.step_times_s)} steps in {res.wall_s or 0:.0f} s", file=sys.stderr, flush=True)
    meta["total_s"] = time.monotonic() - t_start
    table, data = report(results, meta, args.warmup)
    print(table)
    print(f"\ntotal {meta['total_s']:.0f} s; JSON: {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
