"""On-policy distillation (GKD, Agarwal et al. 2024) with the costs of stock TRL removed.

Semantics (as ``trl.experimental.gkd.GKDTrainer``): per optimizer step, with probability
``lmbda`` the student samples the completions (``temperature``, ``max_new_tokens``); otherwise
the teacher samples them if ``seq_kd``, else the traces' reference completions are used. The loss
is the generalised Jensen-Shannon divergence of TRL's ``generalized_jsd_loss`` (``beta=0``:
forward KL(teacher || student), ``beta=1``: reverse KL(student || teacher)) at temperature 1,
over completion tokens.

What is different from stock GKD (GKD_NOTES.md):
- ONE batched generate call per optimizer step for all its micro-batches, with the KV cache on
  (gradient checkpointing, if used for training, is switched off around generation);
- logits only at completion positions (``logits_to_keep``), gathered to the valid tokens before
  ``log_softmax``: no full-vocabulary fp32 tensors over prompt positions;
- the loss is the sum of per-token divergences over the step divided by the number of completion
  tokens of the whole optimizer step (generated tokens when generated), so every token weighs the
  same whatever the micro-batch split;
- position ids follow the attention mask, so left-padded prompts score as they were generated;
- teacher under ``torch.no_grad``; bf16 on GPU, fp32 on CPU.

The data order and the sampling are functions of (seed, step), and the optimizer, scheduler and
RNG states are checkpointed, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from atlasd.runspec import GKDSettings, OptimSettings
from trainers.dataset import Example, encode_completion, encode_prompt
from trainers.telemetry import Telemetry

KEEP_CHECKPOINTS = 2  # periodic checkpoints kept on disk (older ones are deleted after a new one is saved)
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "trainer_state.pt"


class Interrupted(Exception):
    """SIGTERM (or another stop request) arrived; a checkpoint was saved if any step was done."""


# --- loss --------------------------------------------------------------------------------------
def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token generalised JSD over the last dim, as TRL's ``generalized_jsd_loss`` (reduction none,
    summed over the vocabulary). Inputs (N, V); returns (N,) in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        div = F.kl_div(s, t, reduction="none", log_target=True)  # KL(teacher || student)
    elif beta == 1:
        div = F.kl_div(t, s, reduction="none", log_target=True)  # KL(student || teacher)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        div = b * F.kl_div(mix, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mix, s, reduction="none", log_target=True
        )
    return div.sum(-1)


# --- batches -----------------------------------------------------------------------------------
@dataclass
class Encoded:
    prompt: list[int]
    completion: list[int]  # reference completion (ends with the end-of-turn token)


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def completion_logits(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict each completion token: (B, C, V), and the (B, C) mask."""
    p_ids, p_mask = pad_left(prompts, pad_id)
    c_ids, c_mask = pad_right(completions, pad_id)
    input_ids = torch.cat([p_ids, c_ids], 1).to(device)
    attn = torch.cat([p_mask, c_mask], 1).to(device)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    width = c_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                logits_to_keep=width + 1, use_cache=False)
    return out.logits[:, :-1, :], c_mask.to(device).bool()


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys([tokenizer.eos_token_id, *ids]))


def cut_at_eos(rows: list[list[int]], eos: list[int]) -> list[list[int]]:
    """Each completion up to and including its first end token."""
    out = []
    for row in rows:
        end = next((i for i, tok in enumerate(row) if tok in eos), None)
        out.append(row if end is None else row[: end + 1])
    return out


def _checkpointing(model) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", False))


def set_checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing on/off (transformers >= 5 names)."""
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()


class _StopOn:
    """A generation stopping criterion that ends decoding when a stop was requested (SIGTERM)."""

    def __init__(self, flag: Callable[[], bool]):
        self.flag = flag

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.flag(), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float | None,
                device, stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """One batched, KV-cached ``generate`` call. ``temperature=None``: greedy. Returns completions cut
    after their first end token."""
    from transformers import GenerationConfig, StoppingCriteriaList

    ids, mask = pad_left(prompts, tokenizer.pad_token_id)
    eos = eos_ids(model, tokenizer)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=temperature is not None, temperature=temperature or 1.0,
        top_k=0, top_p=1.0, use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
    )
    gc = _checkpointing(model)
    was_training = model.training
    if gc:
        set_checkpointing(model, False)
    model.eval()
    try:
        criteria = StoppingCriteriaList([_StopOn(stop)]) if stop else None
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                             stopping_criteria=criteria)
    finally:
        if was_training:
            model.train()
        if gc:
            set_checkpointing(model, True)
    return cut_at_eos(out[:, ids.shape[1]:].tolist(), eos)


class VllmGenerator:
    """Student sampling with vLLM in this process (``optim.generation_backend = "vllm"``, CUDA only).
    Weights are pushed to the engine before each generation (merged, if LoRA)."""

    def __init__(self, model_path: str, seed: int, max_len: int):
        from vllm import LLM  # noqa: PLC0415  (optional dependency)

        self.llm = LLM(model=model_path, gpu_memory_utilization=0.3, seed=seed, max_model_len=max_len,
                       enable_prefix_caching=True)

    def sync(self, model) -> None:
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights(merged_state_dict(model).items())
        self.llm.reset_prefix_cache()

    def generate(self, model, tokenizer, prompts, *, max_new_tokens, temperature, device, stop=None):
        from vllm import SamplingParams  # noqa: PLC0415

        self.sync(model)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature or 0.0, top_k=-1, top_p=1.0,
                                stop_token_ids=eos_ids(model, tokenizer))
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return cut_at_eos([list(o.outputs[0].token_ids) for o in outs], eos_ids(model, tokenizer))


# --- models ------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_causal_lm(path: str, device: torch.device, *, trainable: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(device)).to(device)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ValueError(f"tokenizer at {path} has no chat template")
    return tok


def add_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The plain transformers state dict; for a LoRA model, with the adapters merged in (the model
    itself is left unmerged)."""
    if not is_peft(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    sd = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                w += module.get_delta_weight(adapter).to(w.dtype)
            sd[f"{name}.weight"] = w
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        sd.setdefault(key, value)
    return sd


def save_hf(model, tokenizer, path: Path) -> None:
    """Hugging Face format (transformers and vLLM load it); LoRA merged."""
    if is_peft(model):
        model.get_base_model().save_pretrained(path, state_dict=merged_state_dict(model))
    else:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# --- data order --------------------------------------------------------------------------------
def step_indices(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """Example indices of optimizer step ``step`` (1-based): consecutive slices of a concatenation of
    per-epoch permutations, each a function of (seed, epoch) only."""
    start = (step - 1) * per_step
    out, perms = [], {}
    for pos in range(start, start + per_step):
        epoch = pos // n
        if epoch not in perms:
            perm = list(range(n))
            random.Random(f"{seed}:{epoch}").shuffle(perm)
            perms[epoch] = perm
        out.append(perms[epoch][pos % n])
    return out


def total_steps(optim: OptimSettings, n_train: int) -> int:
    if optim.max_steps is not None:
        return optim.max_steps
    per_step = optim.per_device_train_batch_size * optim.gradient_accumulation_steps
    return max(1, math.ceil(optim.num_train_epochs * n_train / per_step))


def step_mode(gkd: GKDSettings, seed: int, step: int) -> str:
    """Where the completions of a step come from: 'student', 'teacher' (seq_kd) or 'reference'."""
    if random.Random(f"lmbda:{seed}:{step}").random() < gkd.lmbda:
        return "student"
    return "teacher" if gkd.seq_kd else "reference"


# --- trainer -----------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    steps: int
    history: list[dict] = field(default_factory=list)
    final_dir: Path | None = None


class GKDTrainer:
    def __init__(self, *, student, teacher, tokenizer, train: list[Example], gkd: GKDSettings,
                 optim: OptimSettings, output_dir: Path, device: torch.device, telemetry: Telemetry,
                 stop: Callable[[], bool] = lambda: False, vllm: VllmGenerator | None = None):
        from transformers import get_scheduler

        if not train:
            raise ValueError("no training examples")
        self.student, self.teacher, self.tok = student, teacher, tokenizer
        self.gkd, self.optim, self.device = gkd, optim, device
        self.out = Path(output_dir)
        self.tel, self.stop, self.vllm = telemetry, stop, vllm
        self.pad = tokenizer.pad_token_id
        max_prompt = optim.max_length - gkd.max_new_tokens
        if max_prompt < 8:
            raise ValueError(f"optim.max_length ({optim.max_length}) leaves no room for prompts after "
                             f"gkd.max_new_tokens ({gkd.max_new_tokens})")
        self.examples = train
        self.encoded: list[Encoded] = []
        self.n_prompt_truncated = 0
        for ex in train:
            prompt, cut = encode_prompt(tokenizer, ex.prompt, max_prompt)
            self.n_prompt_truncated += cut
            self.encoded.append(Encoded(prompt, encode_completion(tokenizer, ex.completion, gkd.max_new_tokens)))
        self.total = total_steps(optim, len(train))
        self.per_step = optim.per_device_train_batch_size * optim.gradient_accumulation_steps
        self.step = 0
        self.history: list[dict] = []
        for name, module in student.named_modules():  # as GKDConfig.disable_dropout, LoRA dropout excepted
            if isinstance(module, torch.nn.Dropout) and "lora_" not in name:
                module.p = 0.0
        if device.type == "cuda" and not is_peft(student):
            set_checkpointing(student, True)
        student.train()
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
        self.scheduler = get_scheduler(optim.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(optim.warmup_ratio * self.total),
                                       num_training_steps=self.total)

    # one optimizer step -----------------------------------------------------------------------
    def _completions(self, mode: str, batch: list[Encoded]) -> list[list[int]]:
        if mode == "reference":
            return [e.completion for e in batch]
        model = self.student if mode == "student" else self.teacher
        gen = self.vllm.generate if (self.vllm and mode == "student") else hf_generate
        return gen(model, self.tok, [e.prompt for e in batch], max_new_tokens=self.gkd.max_new_tokens,
                   temperature=self.gkd.temperature, device=self.device, stop=self.stop)

    def train_step(self, step: int) -> dict | None:
        """Run optimizer step ``step``; None if a stop request cut its generation short (nothing applied)."""
        t0 = time.perf_counter()
        torch.manual_seed(self.optim.seed * 100_003 + step)  # sampling is a function of (seed, step)
        batch = [self.encoded[i] for i in step_indices(len(self.encoded), self.optim.seed, step, self.per_step)]
        mode = step_mode(self.gkd, self.optim.seed, step)
        completions = self._completions(mode, batch)
        t_gen = time.perf_counter() - t0
        if self.stop():
            return None
        n_tokens = sum(len(c) for c in completions)
        t_teacher = t_train = 0.0
        loss_sum = 0.0
        bs = self.optim.per_device_train_batch_size
        for lo in range(0, len(batch), bs):
            prompts = [e.prompt for e in batch[lo: lo + bs]]
            comps = completions[lo: lo + bs]
            if not any(comps):
                continue
            t1 = time.perf_counter()
            with torch.no_grad():
                t_logits, mask = completion_logits(self.teacher, prompts, comps, self.pad, self.device)
                t_logits = t_logits[mask]
            t2 = time.perf_counter()
            s_logits, _ = completion_logits(self.student, prompts, comps, self.pad, self.device)
            loss = generalized_jsd(s_logits[mask], t_logits, self.gkd.beta).sum() / max(n_tokens, 1)
            loss.backward()
            loss_sum += loss.item()
            t_teacher += t2 - t1
            t_train += time.perf_counter() - t2
        t3 = time.perf_counter()
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.optim.max_grad_norm).item()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t3
        dt = time.perf_counter() - t0
        n_prompt = sum(len(e.prompt) for e in batch)
        return {
            "step": step, "total_steps": self.total, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr,
            "mode": mode, "completion_tokens": n_tokens, "tokens_per_s": (n_prompt + n_tokens) / dt,
            "gen_tokens_per_s": n_tokens / t_gen if mode != "reference" and t_gen > 0 else None,
            "time_gen_s": t_gen, "time_teacher_s": t_teacher, "time_train_s": t_train, "step_time_s": dt,
            "epoch": step * self.per_step / len(self.encoded),
        }

    # loop -------------------------------------------------------------------------------------
    def train(self) -> TrainOutcome:
        final = self.out / "final"
        if final_complete(self.out) and _state(final)["step"] == self.total:
            self.step, self.history = self.total, _state(final)["history"]
            return TrainOutcome(self.total, self.history, final)
        self.tel.progress(self.total, self.step)
        try:
            while self.step < self.total:
                row = self.train_step(self.step + 1)
                if row is None:
                    break
                self.step += 1
                self.history.append({k: row[k] for k in ("step", "loss", "grad_norm", "lr", "mode")})
                if self.step % self.optim.logging_steps == 0 or self.step == self.total:
                    self.tel.emit("step", **row)
                self.tel.advance(self.step, loss=row["loss"])
                if self.stop():
                    break
                if self.step % self.optim.save_steps == 0 and self.step < self.total:
                    self.save_checkpoint("periodic")
        finally:
            self.tel.close_progress()
        if self.stop() and self.step < self.total:
            if self.step > 0 and _state(self.checkpoint_dir(self.step)) is None:
                self.save_checkpoint("sigterm")
            raise Interrupted(f"stopped at step {self.step} of {self.total}")
        self.save_final()
        return TrainOutcome(self.step, self.history, final)

    # checkpoints ------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step}"

    def _state_json(self) -> dict:
        return {"step": self.step, "total_steps": self.total, "seed": self.optim.seed,
                "n_train": len(self.examples), "train_ids": _ids_hash(self.examples),
                "lora": is_peft(self.student), "history": self.history}

    def _write(self, path: Path, with_optimizer: bool) -> None:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(self.student, self.tok, tmp)
        if is_peft(self.student):
            self.student.save_pretrained(tmp / "adapter")
        if with_optimizer:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / OPTIM_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(self._state_json()))
        shutil.rmtree(path, ignore_errors=True)
        tmp.replace(path)

    def save_checkpoint(self, reason: str) -> Path:
        path = self.checkpoint_dir(self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write(path, with_optimizer=True)
        kept = sorted(_checkpoints(self.out), key=lambda p: _state(p)["step"])
        for old in kept[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        self.tel.emit("checkpoint", step=self.step, path=str(path), reason=reason)
        return path

    def save_final(self) -> Path:
        path = self.out / "final"
        self._write(path, with_optimizer=False)
        self.tel.emit("checkpoint", step=self.step, path=str(path), reason="final")
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (the student's weights must already be loaded from it)."""
        state = _state(path)
        if state["train_ids"] != _ids_hash(self.examples) or state["seed"] != self.optim.seed:
            raise ValueError(f"checkpoint {path} was made with other training data or seed; cannot resume")
        blob = torch.load(path / OPTIM_FILE, weights_only=False)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        random.setstate(blob["python_rng"])
        self.step = state["step"]
        self.history = state["history"]


def _ids_hash(examples: list[Example]) -> str:
    import hashlib

    return hashlib.sha256(",".join(str(e.session_id) for e in examples).encode()).hexdigest()[:16]


def _state(path: Path) -> dict | None:
    f = path / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def _checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    return [p for p in root.glob("step-*") if p.is_dir() and _state(p) is not None] if root.is_dir() else []


def final_complete(output_dir: Path) -> bool:
    """Training finished: ``output_dir/final`` holds the last step (only evaluation may remain)."""
    state = _state(Path(output_dir) / "final")
    return state is not None and state["step"] >= state["total_steps"]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = _checkpoints(Path(output_dir))
    return max(found, key=lambda p: _state(p)["step"]) if found else None


def load_student(spec_student: str, checkpoint: Path | None, device: torch.device, lora):
    """The student to train: from ``checkpoint`` when resuming (LoRA: base + saved adapter)."""
    if lora is None:
        return load_causal_lm(str(checkpoint or spec_student), device, trainable=True)
    base = load_causal_lm(spec_student, device, trainable=True)
    if checkpoint is None:
        return add_lora(base, lora)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(checkpoint / "adapter"), is_trainable=True)
