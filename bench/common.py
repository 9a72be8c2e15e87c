"""Shared by the trainer benchmarks (``bench.trainer`` on CPU, ``bench.gpu`` on one GPU): the
training data, step timing, and the three engines' construction (atlasd's ``trainers.gkd``, TRL's
``DistillationTrainer`` and experimental ``GKDTrainer``) from model objects already built.

Every heavy import is inside a function, so importing this module costs nothing and a missing
package (trl on a bare GPU image) surfaces as the failure of the engine that needs it.
"""

from __future__ import annotations

import io
import os
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- data ----------------------------------------------------------------------------------------
def bench_data(n: int):
    """``n`` arithmetic word problems (system + user prompt, reference completion)."""
    from trainers.dataset import Example

    out = []
    for i in range(n):
        a, b = (i * 7) % 50, (i * 13) % 50
        out.append(Example(session_id=i, seq=i,
                           prompt=[{"role": "system", "content": f"Task: Tom has {a} apples and buys {b} more."},
                                   {"role": "user", "content": "How many apples does Tom have?"}],
                           completion=f"{a} + {b} = {a + b}. Final Answer: {a + b}", reference=str(a + b)))
    return out


def gkd_rows(data) -> list[dict]:
    """The data as TRL GKD wants it: whole conversations (its collator splits off the last turn)."""
    return [{"messages": [*e.prompt, {"role": "assistant", "content": e.completion}]} for e in data]


def distillation_rows(data) -> list[dict]:
    """The data as the DistillationTrainer wants it: conversational prompts only."""
    return [{"prompt": e.prompt} for e in data]


# --- timing --------------------------------------------------------------------------------------
def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer:
    """A transformers callback recording the wall time at the end of each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.marks = [time.perf_counter()]

            def on_step_end(self, args, state, control, **kw):
                outer.marks.append(time.perf_counter())

        self.callback = CB()
        self.marks: list[float] = []

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


class Split:
    """Time sections of a step (``gen``, ``teacher``, ``optim``...) with CUDA synchronisation at
    their edges; nested entries of one section count once. ``take()`` returns and resets the sums."""

    def __init__(self, sync: bool):
        self.sync = sync
        self.sums: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)
        self._t0: dict[str, float] = {}

    def begin(self, name: str) -> None:
        if self._depth[name] == 0:
            if self.sync:
                cuda_sync()
            self._t0[name] = time.perf_counter()
        self._depth[name] += 1

    def end(self, name: str) -> None:
        self._depth[name] -= 1
        if self._depth[name] == 0:
            if self.sync:
                cuda_sync()
            self.sums[name] += time.perf_counter() - self._t0.pop(name)

    def take(self) -> dict[str, float]:
        out = dict(self.sums)
        self.sums.clear()
        return out


def instrument(student, teacher, split: Split) -> list:
    """Time the student's ``generate`` (as ``gen``) and the teacher's forward passes (``teacher``:
    the whole model or only its decoder, as TRL's two trainers call it). Returns the hook handles."""
    original = student.generate

    def generate(*args, **kwargs):
        split.begin("gen")
        try:
            return original(*args, **kwargs)
        finally:
            split.end("gen")

    student.generate = generate  # an instance attribute: the unwrapped model TRL generates with is this object
    handles = []
    modules = [teacher]
    decoder = teacher.get_decoder() if hasattr(teacher, "get_decoder") else None
    if decoder is not None and decoder is not teacher:
        modules.append(decoder)
    for module in modules:
        handles.append(module.register_forward_pre_hook(lambda mod, args: split.begin("teacher")))
        handles.append(module.register_forward_hook(lambda mod, args, out: split.end("teacher")))
    return handles


# --- TRL -----------------------------------------------------------------------------------------
def hf_dataset(rows: list[dict]):
    """A ``datasets.Dataset`` of ``rows`` with a fingerprint given, not computed: computing it pickles
    the Arrow schema with dill, which fails (``PicklingError: Can't pickle <class 'MonthDayNano'>``)
    when pyarrow is imported from a folder whose path lacks "site-packages" (``pip install --target
    /tmp/site``; dill then takes pyarrow for a user module)."""
    import hashlib
    import json

    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, Features
    from datasets.table import InMemoryTable

    table = InMemoryTable(pa.Table.from_pylist(rows))
    info = DatasetInfo(features=Features.from_arrow_schema(table.schema))
    fingerprint = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Dataset(table, info=info, fingerprint=fingerprint)


def quiet(trainer):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _trl_common(gear, *, steps: int, lr: float, seed: int, cuda: bool) -> dict:
    return dict(per_device_train_batch_size=gear.optim.per_device_train_batch_size,
                gradient_accumulation_steps=gear.optim.gradient_accumulation_steps, max_steps=steps,
                learning_rate=lr, beta=gear.gkd.beta, temperature=gear.gkd.temperature, bf16=cuda,
                use_cpu=not cuda, logging_steps=1, report_to=[], save_strategy="no", seed=seed, disable_tqdm=True)


def trl_gkd(student, teacher, tokenizer, data, gear, *, steps: int, lr: float, seed: int, output_dir: Path,
            cuda: bool = False, callbacks=()):
    """``trl.experimental.gkd.GKDTrainer`` with its stock defaults, lmbda 1 and the gear's batch,
    max_new_tokens, temperature and beta."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg = GKDConfig(output_dir=str(output_dir), lmbda=1.0, max_new_tokens=gear.gkd.max_new_tokens,
                    **_trl_common(gear, steps=steps, lr=lr, seed=seed, cuda=cuda))
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=hf_dataset(gkd_rows(data)),
                         processing_class=tokenizer, callbacks=list(callbacks))
    return quiet(trainer)


def trl_distillation(student, teacher, tokenizer, data, gear, *, steps: int, lr: float, seed: int,
                     output_dir: Path, cuda: bool = False, callbacks=()):
    """``trl.DistillationTrainer`` with its stock defaults (on-policy only) and the gear's batch,
    max_new_tokens (``max_completion_length``), temperature and beta."""
    from trl import DistillationConfig, DistillationTrainer

    cfg = DistillationConfig(output_dir=str(output_dir), max_completion_length=gear.gkd.max_new_tokens,
                             **_trl_common(gear, steps=steps, lr=lr, seed=seed, cuda=cuda))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg,
                                  train_dataset=hf_dataset(distillation_rows(data)),
                                  processing_class=tokenizer, callbacks=list(callbacks))
    return quiet(trainer)


# --- atlasd --------------------------------------------------------------------------------------
def atlasd_precision(optim, device):
    """``trainers.models.Precision`` for these settings."""
    from trainers.models import Precision

    return Precision.resolve(optim.precision, device)


def atlasd_dtypes(optim, device):
    """(student dtype, teacher dtype) as atlasd's loaders produce them: full fine-tuning keeps fp32
    master weights; frozen weights are bf16 on CUDA (``optim.precision`` auto)."""
    import torch

    return torch.float32, atlasd_precision(optim, device).frozen_dtype


def atlasd_tokenizer(path):
    from trainers.models import load_tokenizer

    return load_tokenizer(str(path))


def atlasd_load(teacher_path, student_path, optim, device):
    """(student, teacher, tokenizer) loaded from folders the way ``trainers.run`` loads them."""
    from trainers.models import load_causal_lm, load_student

    precision = atlasd_precision(optim, device)
    student = load_student(str(student_path), None, precision, None)
    teacher = load_causal_lm(str(teacher_path), device, precision.frozen_dtype, trainable=False)
    return student, teacher, atlasd_tokenizer(student_path)


def atlasd_trainer(student, teacher, tokenizer, data, *, gkd, optim, output_dir: Path, device):
    """``trainers.gkd.GKDTrainer`` over model objects."""
    from trainers.gkd import GKDTrainer
    from trainers.telemetry import Telemetry

    return GKDTrainer(student=student, teacher=teacher, tokenizer=tokenizer, train=data, gkd=gkd, optim=optim,
                      output_dir=output_dir, device=device, telemetry=Telemetry(0, stream=io.StringIO()),
                      precision=atlasd_precision(optim, device))
