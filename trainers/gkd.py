"""On-policy distillation (GKD, Agarwal et al. 2024) with the costs of stock TRL removed.

Semantics (as ``trl.experimental.gkd.GKDTrainer``): per optimizer step, with probability
``lmbda`` the student samples the completions (``temperature``, ``max_new_tokens``); otherwise
the teacher samples them if ``seq_kd``, else the traces' reference completions are used. The loss
is the generalised Jensen-Shannon divergence of TRL's ``generalized_jsd_loss`` (``beta=0``:
forward KL(teacher || student), ``beta=1``: reverse KL(student || teacher)) at temperature 1,
over completion tokens (``trainers.loss``).

What is different from stock GKD (README, "Training"):
- ONE batched generate call per optimizer step for all its micro-batches, with the KV cache on
  (activation checkpointing, if used for training, is switched off around generation), sampled
  with the gear's settings only (``trainers.generation``);
- no logits at all: the loss is TRL's chunked divergence over the last hidden states at the valid
  completion positions and the two LM heads, sliced to the tokenizer's real vocabulary;
- the loss is the sum of per-token divergences over the step divided by the number of completion
  tokens of the whole optimizer step (generated tokens when generated), so every token weighs the
  same whatever the micro-batch split;
- position ids follow the attention mask, so left-padded prompts score as they were generated;
- teacher under ``torch.no_grad``; precision per ``optim.precision`` (``trainers.models``): fp32
  master weights with bf16 autocast on CUDA, fp32 on CPU.

The data order and the sampling are functions of (seed, step), and the optimizer, scheduler and
RNG states are checkpointed (with the fp32 master weights), so a resumed run continues exactly
where it stopped.

Several ranks (``trainers.distributed``): the global batch of a step (``per_device_train_batch_size x
gradient_accumulation_steps x ranks`` examples, in the one-process order) is cut into consecutive
slices, one per rank; each completion is sampled from its own seed (its position in the global batch),
the token count that divides the loss is the global one and the student's gradients are summed over the
ranks, so the loss and the update are those of one process with the same global batch. The teacher is
sharded too (inference only: its layers gathered one at a time, its root around each micro-batch and each
sample), and gathered whole again when training ends, for rank 0's final evaluation. Stops are agreed
(an all-reduce of the stop flag after generation and after each step), so every rank stops at one step.
Checkpoints are consolidated: rank 0 writes the same folder as one process (HF weights gathered from the
shards, the optimizer state as a full FQN-keyed state dict), so a checkpoint resumes at any rank count.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from atlasd.runspec import GKDSettings, OptimSettings
from trainers.dataset import Example, encode_completion, encode_prompt
from trainers.distributed import (
    ALONE,
    Ranks,
    gathered_root,
    keep_gathered,
    shard,
    shard_student,
)
from trainers.generation import (
    hf_generate,
    pad_left,
    request_seeds,
    sampling_for,
    set_activation_checkpointing,
)
from trainers.loss import Head, token_divergence
from trainers.models import Precision, hf_model, is_peft, save_hf
from trainers.telemetry import Telemetry

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # consolidated, on rank 0's CPU
KEEP_CHECKPOINTS = 2  # periodic checkpoints kept on disk (older ones are deleted after a new one is saved)
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "trainer_state.pt"


class Interrupted(Exception):
    """SIGTERM (or another stop request) arrived; a checkpoint was saved if any step was done."""


# --- batches -----------------------------------------------------------------------------------
@dataclass
class Encoded:
    prompt: list[int]
    completion: list[int]  # reference completion (ends with the end-of-turn token)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def completion_hidden(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states (before the LM head) at the positions that predict each completion
    token, (N, H) over the N real completion tokens, and the (B, C) mask that selected them. The
    logits are never computed here: the loss projects these chunk by chunk (``trainers.loss``)."""
    p_ids, p_mask = pad_left(prompts, pad_id)
    c_ids, c_mask = pad_right(completions, pad_id)
    input_ids = torch.cat([p_ids, c_ids], 1).to(device)
    attn = torch.cat([p_mask, c_mask], 1).to(device)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    p, c = p_ids.shape[1], c_ids.shape[1]
    out = hf_model(model).get_decoder()(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                                        use_cache=False)
    mask = c_mask.to(device).bool()
    return out.last_hidden_state[:, p - 1: p + c - 1][mask], mask


class StudentLoss(torch.nn.Module):
    """The student's share of a micro-batch as one module call: its hidden states at the completion
    positions and their per-token divergence (N,) from the teacher's. Under FSDP2 this module is the root,
    so its parameters (embeddings, final norm, head) are gathered for the whole call and its backward."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                teacher_hidden: torch.Tensor, teacher_head: Head, beta: float, vocab_size: int) -> torch.Tensor:
        hidden, _ = completion_hidden(self.student, prompts, completions, pad_id, teacher_hidden.device)
        return token_divergence(hidden, Head.of(self.student), teacher_hidden, teacher_head, beta, vocab_size)


class TeacherHidden(torch.nn.Module):
    """The teacher's last hidden states at a micro-batch's completion positions (``completion_hidden``) as
    one module call. Under FSDP2 this module is the teacher's root: its parameters (embeddings, final norm,
    head) are gathered around the whole micro-batch (``gathered_root``), as the loss reads the head."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> torch.Tensor:
        return completion_hidden(self.teacher, prompts, completions, pad_id, device)[0]


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


def total_steps(optim: OptimSettings, n_train: int, world: int = 1) -> int:
    if optim.max_steps is not None:
        return optim.max_steps
    per_step = optim.per_device_train_batch_size * optim.gradient_accumulation_steps * world
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
                 stop: Callable[[], bool] = lambda: False, vllm=None, precision: Precision | None = None,
                 serve_dtype: torch.dtype | None = None, ranks: Ranks = ALONE):
        """``vllm``: a ``trainers.vllm_backend.VllmGenerator`` for the student's samples (else HF
        generate). ``serve_dtype``: the dtype ``final/`` is saved in (default: the student's own).
        ``ranks``: this process's place among several (the student and the teacher are sharded here; the
        teacher is whole again on every rank once ``train`` returns); default alone."""
        from transformers import get_scheduler

        if not train:
            raise ValueError("no training examples")
        self.student, self.teacher, self.tok = student, teacher, tokenizer
        self.gkd, self.optim, self.device = gkd, optim, device
        self.precision = precision or Precision.resolve(optim.precision, device)
        self.serve_dtype = serve_dtype
        self.out = Path(output_dir)
        self.tel, self.stop, self.vllm, self.ranks = telemetry, stop, vllm, ranks
        self.pad = tokenizer.pad_token_id
        self.vocab = len(tokenizer)
        self.sampling = sampling_for(tokenizer, student, max_new_tokens=gkd.max_new_tokens,
                                     temperature=gkd.temperature, seed=optim.seed)
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
        self.total = total_steps(optim, len(train), ranks.world)
        self.per_rank = optim.per_device_train_batch_size * optim.gradient_accumulation_steps
        self.per_step = self.per_rank * ranks.world
        self.step = 0
        self.history: list[dict] = []
        for name, module in student.named_modules():  # as GKDConfig.disable_dropout, LoRA dropout excepted
            if isinstance(module, torch.nn.Dropout) and "lora_" not in name:
                module.p = 0.0
        recompute = optim.gradient_checkpointing  # activation checkpointing, not the saved checkpoints below
        if recompute is None:
            recompute = device.type == "cuda" and not is_peft(student)
        if recompute:
            set_activation_checkpointing(hf_model(student), True)
        student.train()
        self.model = StudentLoss(student)
        self.teacher_hidden = TeacherHidden(teacher)
        if ranks.sharded:
            shard_student(self.model, hf_model(student).get_decoder().layers)
            shard(self.teacher_hidden, hf_model(teacher).get_decoder().layers)
        self.optimizer = make_optimizer(self.model, optim, device)
        self.scheduler = get_scheduler(optim.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(optim.warmup_ratio * self.total),
                                       num_training_steps=self.total)

    # one optimizer step -----------------------------------------------------------------------
    def _completions(self, mode: str, batch: list[Encoded], step: int, first: int) -> list[list[int]]:
        """The completions of ``batch``, the examples ``first``, ``first + 1``, ... of the step's global
        batch; each sampled from its position's seed (``request_seeds``)."""
        if mode == "reference":
            return [e.completion for e in batch]
        prompts = [e.prompt for e in batch]
        if self.vllm is not None and mode == "student":
            return self.vllm.generate(self.student, prompts, self.sampling, step=step, stop=self.stop)
        seeds = request_seeds(self.optim.seed, step, first + len(batch))[first:]
        sharded = self.ranks.sharded
        if mode == "teacher":
            gathered = self._gathered_teacher()
        else:
            gathered = gathered_root(self.model) if sharded else contextlib.nullcontext()
        with self.precision.autocast(), gathered:
            return hf_generate(self.student if mode == "student" else self.teacher, prompts, self.sampling,
                               device=self.device, stop=self.stop, seeds=seeds, sharded=sharded)

    def _gathered_teacher(self):
        """Several ranks: the sharded teacher's root parameters (embeddings, final norm, head) gathered, around
        its samples and around a micro-batch's teacher forward and loss forward and backward (which read its
        head); its per-forward records cleared after. Alone: nothing."""
        return gathered_root(self.teacher_hidden, frozen=True) if self.ranks.sharded else contextlib.nullcontext()

    def train_step(self, step: int) -> dict | None:
        """Run optimizer step ``step``; None if a stop request cut its generation short (nothing applied)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        torch.manual_seed(self.optim.seed * 100_003 + step)  # LoRA dropout is a function of (seed, step)
        indices = step_indices(len(self.encoded), self.optim.seed, step, self.per_step)
        first = self.ranks.rank * self.per_rank  # this rank's slice of the global batch
        batch = [self.encoded[i] for i in indices[first: first + self.per_rank]]
        mode = step_mode(self.gkd, self.optim.seed, step)
        completions = self._completions(mode, batch, step, first)
        t_gen = _now(cuda) - t0
        if self.ranks.any(self.stop()):
            return None
        n_tokens = int(self.ranks.sum(sum(len(c) for c in completions)))
        t_teacher = t_student = 0.0
        loss_sum = 0.0
        bs = self.optim.per_device_train_batch_size
        for lo in range(0, len(batch), bs):
            prompts = [e.prompt for e in batch[lo: lo + bs]]
            comps = completions[lo: lo + bs]
            if not any(comps):
                continue
            t1 = _now(cuda)
            with self._gathered_teacher():
                with self.precision.autocast(), torch.no_grad():
                    t_hidden = self.teacher_hidden(prompts, comps, self.pad, self.device)
                t2 = _now(cuda)
                with self.precision.autocast():
                    div = self.model(prompts, comps, self.pad, t_hidden, Head.of(self.teacher), self.gkd.beta,
                                     self.vocab)
                    loss = div.sum() / max(n_tokens, 1)
                loss.backward()
            loss_sum += loss.item()
            t_teacher += t2 - t1
            t_student += _now(cuda) - t2
        loss_sum = self.ranks.sum(loss_sum)
        t3 = _now(cuda)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.optim.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # DTensor
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_optim = _now(cuda) - t3
        dt = _now(cuda) - t0
        n_prompt = sum(len(self.encoded[i].prompt) for i in indices)
        return {
            "step": step, "total_steps": self.total, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr,
            "mode": mode, "completion_tokens": n_tokens, "tokens_per_s": (n_prompt + n_tokens) / dt,
            "gen_tokens_per_s": n_tokens / t_gen if mode != "reference" and t_gen > 0 else None,
            "time_gen_s": t_gen, "time_teacher_s": t_teacher, "time_student_s": t_student, "time_optim_s": t_optim,
            "step_time_s": dt, "epoch": step * self.per_step / len(self.encoded),
            "peak_memory_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
        }

    # loop -------------------------------------------------------------------------------------
    def train(self) -> TrainOutcome:
        """Train to the last step (or to a stop: ``Interrupted``); several ranks: every rank calls this,
        and on return the teacher is whole on each (``keep_gathered``), so rank 0 can evaluate with it alone."""
        outcome = self._train()
        if self.ranks.sharded:
            keep_gathered(self.teacher_hidden)
        return outcome

    def _train(self) -> TrainOutcome:
        final = self.out / "final"
        if final_complete(self.out) and _state(final)["step"] == self.total:
            self.step, self.history = self.total, _state(final)["history"]
            return TrainOutcome(self.total, self.history, final)
        self.tel.progress(self.total, self.step)
        stopped = False
        try:
            while self.step < self.total:
                row = self.train_step(self.step + 1)
                if row is None:
                    stopped = True
                    break
                self.step += 1
                self.history.append({k: row[k] for k in ("step", "loss", "grad_norm", "lr", "mode")})
                if self.step % self.optim.logging_steps == 0 or self.step == self.total:
                    self.tel.emit("step", **row)
                self.tel.advance(self.step, loss=row["loss"])
                if self.ranks.any(self.stop()):
                    stopped = True
                    break
                if self.step % self.optim.save_steps == 0 and self.step < self.total:
                    self.save_checkpoint("periodic")
        finally:
            self.tel.close_progress()
        if stopped and self.step < self.total:
            if self.step > 0 and _state(self.checkpoint_dir(self.step)) is None:
                self.save_checkpoint("sigterm")
            raise Interrupted(f"stopped at step {self.step} of {self.total}")
        self.save_final()
        return TrainOutcome(self.step, self.history, final)

    def release(self) -> None:
        """Drop the trained student and the optimizer state (before the final model is reloaded)."""
        self.student = self.model = self.optimizer = self.scheduler = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # checkpoints ------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step}"

    def _state_json(self) -> dict:
        return {"step": self.step, "total_steps": self.total, "seed": self.optim.seed,
                "n_train": len(self.examples), "train_ids": _ids_hash(self.examples),
                "lora": is_peft(self.student), "history": self.history}

    def _write(self, path: Path, with_optimizer: bool, dtype: torch.dtype | None = None) -> None:
        """Every rank takes part (sharded: the weights and the optimizer state are gathered to rank 0);
        rank 0 writes ``path`` (atomically: a temporary folder renamed); all return once it is there."""
        weights = None
        if self.ranks.sharded:  # FQNs under the StudentLoss root: "student." + the HF model's own
            gathered = get_model_state_dict(self.model, options=_FULL)
            weights = {k.removeprefix("student."): v for k, v in gathered.items()}
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL) if with_optimizer else None
        if self.ranks.main:
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_hf(self.student, self.tok, tmp, dtype, state=weights)
            if is_peft(self.student):
                self.student.save_pretrained(tmp / "adapter")
            if with_optimizer:
                torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / OPTIM_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(self._state_json()))
            shutil.rmtree(path, ignore_errors=True)
            tmp.replace(path)
        self.ranks.barrier()

    def save_checkpoint(self, reason: str) -> Path:
        path = self.checkpoint_dir(self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write(path, with_optimizer=True)
        if self.ranks.main:
            kept = sorted(_checkpoints(self.out), key=lambda p: _state(p)["step"])
            for old in kept[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        self.tel.emit("checkpoint", step=self.step, path=str(path), reason=reason)
        return path

    def save_final(self) -> Path:
        path = self.out / "final"
        self._write(path, with_optimizer=False, dtype=self.serve_dtype)
        self.tel.emit("checkpoint", step=self.step, path=str(path), reason="final")
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (the student's weights must already be loaded from it)."""
        state = _state(path)
        if state["train_ids"] != _ids_hash(self.examples) or state["seed"] != self.optim.seed:
            raise ValueError(f"checkpoint {path} was made with other training data or seed; cannot resume")
        # tensors and plain containers, no pickled code; mapped, not read whole, by each rank
        blob = torch.load(path / OPTIM_FILE, weights_only=True, mmap=True)
        set_optimizer_state_dict(self.model, self.optimizer, blob["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        random.setstate(blob["python_rng"])
        self.step = state["step"]
        self.history = state["history"]


def make_optimizer(model, optim: OptimSettings, device: torch.device):
    """AdamW over the trained (fp32) parameters: torch's (fused on CUDA) or torchao's 8-bit one."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.optimizer == "adamw-8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay,
                             fused=device.type == "cuda")


def _now(cuda: bool) -> float:
    """Wall time after the GPU has finished what was queued (so the time split is real)."""
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


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
