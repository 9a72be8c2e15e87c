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


# --- weights, streamed: checkpoints, final/, the vLLM engine -----------------------------------
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # as TRL's _fix_param_name_to_vllm (+ compile)


def _fix_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def _tied_targets(model) -> set[str]:
    """State-dict names that are tied copies of another weight (``lm_head.weight`` of a tied model):
    ``save_pretrained`` leaves them out, and so does the checkpoint vLLM loaded."""
    return set(getattr(model, "all_tied_weights_keys", None) or ())  # transformers 5: {target: source}


def _active_lora_adapters(module) -> list[str]:
    if module.disable_adapters:
        return []
    return [a for a in module.active_adapters if a in module.lora_A and a not in module.merged_adapters]


@torch.no_grad()
def _merged_lora_weight(module, dtype: torch.dtype | None) -> torch.Tensor:
    """``base + sum of deltas`` of one LoRA layer, computed in fp32 and cast to ``dtype`` (default: the base
    weight's). The module is not modified; adapters already merged into it are not added twice."""
    from peft.tuners.lora import layer as lora_layer

    supported = tuple(c for c in (getattr(lora_layer, n, None) for n in ("Linear", "Embedding", "_ConvNd")) if c)
    if not isinstance(module, supported):  # quantized (bnb...) and parameter LoRA layers are not
        raise NotImplementedError(f"streaming merge of {type(module).__name__} LoRA layers is not supported")
    base = module.get_base_layer().weight
    adapters = _active_lora_adapters(module)
    if module.get_base_layer().bias is None and any(getattr(module, "lora_bias", {}).get(a) for a in adapters):
        raise ValueError("lora_bias=True on a layer without a bias cannot be merged")
    out_dtype = dtype or base.dtype
    if not adapters:
        return base.detach().to(out_dtype)
    w = base.detach().to(torch.float32, copy=True)
    for a in adapters:
        if a in getattr(module, "lora_variant", {}):
            raise NotImplementedError(f"streaming merge of LoRA variants (DoRA, ...) is not supported: {a!r}")
        if isinstance(module, lora_layer.Linear):  # B @ A in fp32 whatever the adapter dtype
            delta = module.lora_B[a].weight.float() @ module.lora_A[a].weight.float()
            delta = (delta.T if module.fan_in_fan_out else delta) * module.scaling[a]
        else:
            delta = module.get_delta_weight(a).float()
        w += delta
        del delta
    out = w.to(out_dtype)
    del w
    return out


@torch.no_grad()
def _merged_lora_bias(module, dtype: torch.dtype | None) -> torch.Tensor:
    bias = module.get_base_layer().bias
    adapters = [a for a in _active_lora_adapters(module) if getattr(module, "lora_bias", {}).get(a, False)]
    if not adapters:
        return _cast(bias.detach(), dtype)
    b = bias.detach().to(torch.float32, copy=True)
    for a in adapters:
        b += module.lora_B[a].bias.float() * module.scaling[a]
    return b.to(dtype or bias.dtype)


def _plain_weights(model, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in model.state_dict().items():  # references to the parameters, no copies
        yield _fix_name(key), _cast(tensor, dtype)


def _peft_weights(model, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = model.get_base_model()
    lora, to_save = {}, {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            lora[name] = module
        elif isinstance(module, ModulesToSaveWrapper):
            to_save[name] = module
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise NotImplementedError(f"{type(module).__name__} ({name}) is not supported")

    for key, tensor in base.state_dict().items():  # references, no copies
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):  # adapter weights: merged below
            continue
        if "base_layer" in parts:  # a LoRA layer's wrapped module
            i = parts.index("base_layer")
            owner, leaf = ".".join(parts[:i]), ".".join(parts[i + 1:])
            if owner not in lora:
                raise NotImplementedError(f"unexpected PEFT state-dict entry {key}")
            if leaf == "weight":
                value = _merged_lora_weight(lora[owner], dtype)
            elif leaf == "bias":
                value = _merged_lora_bias(lora[owner], dtype)
            else:
                value = _cast(tensor, dtype)
            name = f"{owner}.{leaf}"
        elif "original_module" in parts or "modules_to_save" in parts:  # modules_to_save: the copy in use
            i = next(j for j, p in enumerate(parts) if p in ("original_module", "modules_to_save"))
            owner = ".".join(parts[:i])
            wrapper = to_save[owner]
            active = None if wrapper.disable_adapters or not wrapper.active_adapters else wrapper.active_adapters[0]
            active = active if active in wrapper.modules_to_save else None
            if parts[i] == "original_module":
                if active is not None:
                    continue
                leaf = ".".join(parts[i + 1:])
            else:
                if parts[i + 1] != active:
                    continue
                leaf = ".".join(parts[i + 2:])
            name, value = f"{owner}.{leaf}", _cast(tensor, dtype)
        else:
            name, value = key, _cast(tensor, dtype)
        yield _fix_name(name), value
        del value  # drop our reference before the next merge: one merged weight alive at a time


def iter_merged_weights(model, dtype: torch.dtype | None = None, *,
                        skip_tied: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of the plain transformers state dict of ``model``, one at a time.

    For a PEFT LoRA model each adapted weight is ``base + delta`` computed in fp32 when it is reached and cast to
    ``dtype`` (default: the base weight's dtype); other tensors are the model's own (cast to ``dtype`` if given,
    else not copied). Names are the plain model's state-dict keys (``.base_layer`` dropped, ``lora_*`` skipped,
    the active ``modules_to_save`` copy under the original name). The generator keeps no reference to a yielded
    tensor once it is resumed, so a consumer that drops each tensor holds at most one merged weight.
    ``skip_tied``: leave out tied copies (``lm_head.weight`` of a model with tied embeddings), as the checkpoint
    on disk does. The model is not modified (no ``merge_adapter``)."""
    hf = hf_model(model)
    tied = _tied_targets(hf) if skip_tied else set()
    if tied and is_peft(model):
        from peft.tuners.lora import LoraLayer

        adapted = {f"{n}.weight" for n, m in hf.named_modules() if isinstance(m, LoraLayer)}
        if tied & adapted:  # the engine shares one tensor for both: which merge wins is not ours to pick
            raise NotImplementedError(f"LoRA on tied weights ({sorted(tied & adapted)}) cannot be streamed")
    stream = _peft_weights(model, dtype) if is_peft(model) else _plain_weights(model, dtype)
    for name, value in stream:
        if name in tied:
            continue
        yield name, value
        del value


def save_hf(model, tokenizer, path: Path, dtype: torch.dtype | None = None,
            state: dict[str, torch.Tensor] | None = None) -> None:
    """Hugging Face format (transformers and vLLM load it): LoRA merged in fp32; weights cast to
    ``dtype`` when given (the serving dtype), else kept as they are (fp32 masters). ``state``: the
    weights to write instead of the model's own (a sharded model's, gathered: plain state-dict names, tied
    copies as separate tensors, left out here as ``save_pretrained`` leaves out the model's own)."""
    base = hf_model(model)
    if state is not None:
        tied = _tied_targets(base)
        state = {k: _cast(v, dtype) for k, v in state.items() if k not in tied}
    elif is_peft(model) or dtype is not None:
        state = dict(iter_merged_weights(model, dtype))
    if state is not None:
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
