"""Models: device, precision, loading, tokenizer checks, LoRA, saving.

**Precision** (``optim.precision``; ``auto`` = ``bf16-mixed`` on CUDA, ``fp32`` on CPU):
``bf16-mixed`` keeps what is trained in fp32 (master weights, fp32 gradients and optimizer state)
and runs the forward passes under ``torch.autocast(bfloat16)``; frozen weights (the teacher, a
LoRA base model) are stored in bf16. Pure bf16 weights with AdamW were dropped: at the gears'
learning rates most updates round away (measured on N(0, 0.02) weights: at 2e-5 only 16.7 % of
weights change per step, at 3e-6 2.5 %, and LayerNorm weights near 1 never move). This costs
16 bytes per trained parameter instead of 12 (see ``python -m trainers plan``); a stochastic-rounding
bf16 optimizer would save 4 of them but no maintained one covers our optimizer state layout.

**Saving**: periodic checkpoints keep the fp32 master weights (exact resume); ``final/`` is saved in
the dtype it will be served in (the base student's ``config.json`` dtype), a LoRA adapter merged in
fp32 first, and the final evaluation scores that folder, reloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16-mixed"
    device: torch.device

    @classmethod
    def resolve(cls, setting: str, device: torch.device) -> Precision:
        if setting == "auto":
            setting = "bf16-mixed" if device.type == "cuda" else "fp32"
        return cls(setting, device)

    @property
    def mixed(self) -> bool:
        return self.name == "bf16-mixed"

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Weights that are not trained: the teacher, a LoRA base."""
        return torch.bfloat16 if self.mixed else torch.float32

    def autocast(self):
        """The context every forward pass of the student runs in."""
        if self.mixed:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def config_dtype(path: str) -> torch.dtype | None:
    """The dtype a checkpoint declares in its config.json (what it is served in)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype, *, trainable: bool):
    """Load straight onto ``device`` in ``dtype`` (never a CPU copy first)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def load_student(spec_student: str, checkpoint: Path | None, precision: Precision, lora):
    """The student to train: fp32 master weights (full fine-tuning), or a frozen base in the frozen
    dtype with fp32 LoRA adapters; from ``checkpoint`` when resuming (LoRA: base + saved adapter)."""
    device = precision.device
    if lora is None:
        return load_causal_lm(str(checkpoint or spec_student), device, torch.float32, trainable=True)
    base = load_causal_lm(spec_student, device, precision.frozen_dtype, trainable=True)
    if checkpoint is None:
        return add_lora(base, lora)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(checkpoint / "adapter"), is_trainable=True)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ValueError(f"tokenizer at {path} has no chat template")
    return tok


def tokenizer_mismatch(student_path: str, teacher_path: str) -> str | None:
    """None when the teacher scores in the student's token space, else why not (naming both).

    Same tokenizer = same token -> id map; the models' embedding sizes may differ (padding rows
    beyond the tokenizer are sliced off by the loss), but each must cover the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        s_tok = AutoTokenizer.from_pretrained(student_path)
    except Exception as exc:  # noqa: BLE001
        return f"student {student_path}: cannot load its tokenizer ({type(exc).__name__}: {exc})"
    try:
        t_tok = AutoTokenizer.from_pretrained(teacher_path)
    except Exception:  # noqa: BLE001  (a teacher folder without tokenizer files: its vocab size is checked below)
        t_tok = None
    if t_tok is not None:
        s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
        if s_vocab != t_vocab:
            diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:3]
            return (f"teacher {teacher_path} ({len(t_vocab)} tokens) and student {student_path} ({len(s_vocab)} tokens) "
                    f"use different tokenizers (e.g. {', '.join(f'{t!r}={i}' for t, i in diff)}); on-policy "
                    "distillation needs one token space")
    n = len(s_tok)
    for name, path in (("student", student_path), ("teacher", teacher_path)):
        size = AutoConfig.from_pretrained(path).get_text_config().vocab_size
        if size < n:
            return f"{name} {path}: vocab_size {size} is smaller than the tokenizer's {n} tokens"
    return None


def add_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)  # adapters in fp32 (autocast_adapter_dtype)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def hf_model(model):
    """The plain transformers model (under a PEFT wrapper, the one holding the LoRA layers)."""
    return model.get_base_model() if is_peft(model) else model


def iter_merged_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain transformers state dict, one tensor at a time (cast to ``dtype`` if given); for a
    LoRA model each adapted weight is merged in fp32 (``base + delta``) as it is yielded, so at most
    one merged weight exists at a time. The model itself is left unmerged."""
    base = hf_model(model)
    merged: set[str] = set()
    if is_peft(model):
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight.detach().float()
                for adapter in module.active_adapters:
                    w = w + module.get_delta_weight(adapter).float()
                merged.add(f"{name}.weight")
                yield f"{name}.weight", w.to(dtype or module.get_base_layer().weight.dtype)
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        if key not in merged:
            yield key, value.detach().to(dtype) if dtype is not None else value.detach()


def save_hf(model, tokenizer, path: Path, dtype: torch.dtype | None = None) -> None:
    """Hugging Face format (transformers and vLLM load it): LoRA merged in fp32; weights cast to
    ``dtype`` when given (the serving dtype), else kept as they are (fp32 masters)."""
    base = hf_model(model)
    if is_peft(model) or dtype is not None:
        state = dict(iter_merged_weights(model, dtype))
        saved_dtype = base.config.dtype
        if dtype is not None:
            base.config.dtype = dtype
        try:
            base.save_pretrained(path, state_dict=state)
        finally:
            base.config.dtype = saved_dtype
    else:
        base.save_pretrained(path)
    tokenizer.save_pretrained(path)
