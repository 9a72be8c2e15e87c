"""The distillation loss: the generalised Jensen-Shannon divergence of GKD, per completion token.

``generalized_jsd`` is the reference definition on full logits, equal to TRL's
``GKDTrainer.generalized_jsd_loss`` (``beta=0``: forward KL(teacher || student), ``beta=1``:
reverse KL(student || teacher), otherwise the mixture ``(1 - beta) * p_student + beta * p_teacher``),
at temperature 1, summed over the vocabulary.

``token_divergence`` is what training and evaluation use: the same value computed by TRL's
maintained chunked kernel (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``: Triton on
CUDA, torch tiles elsewhere) from both models' last hidden states and ``lm_head`` weights. Neither
model's N x V logits are ever materialised. With Triton (CUDA) the kernel keeps two fp32 tiles of
at most 4096 x 32768 (1 GiB) plus O(N) statistics, whatever the number of completion tokens,
instead of ~8 fp32 N x V tensors (at 8k tokens and a 152k vocabulary, ~5 GB each). Its torch
fallback (CPU) makes about a dozen tile-sized temporaries, so there the tokens are fed in slices of
``CPU_TOKEN_SLICE`` rows (~1.6 GiB at a full 32768-wide tile). The backward adds the head's fp32
gradient (V x H), which training needs anyway.

Only the first ``vocab_size`` rows of each head are used: the tokenizer's real size. A student
and a teacher of one tokenizer can have different padded embedding sizes (Qwen2.5 1.5B/3B: 151,936;
7B/14B: 152,064); the rows past the tokenizer never correspond to a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_TOKEN_SLICE = 1024  # rows per call of the kernel's torch fallback (memory ~ 12 x rows x 32768 x 4 bytes)
import torch.nn.functional as F


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token generalised JSD over the last dim, as TRL's ``generalized_jsd_loss`` (reduction none,
    summed over the vocabulary). Inputs (N, V); returns (N,) in fp32. The reference for tests."""
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


@dataclass(frozen=True)
class Head:
    """A model's output projection as the loss needs it: logits = scale * (h @ weight.T + bias),
    then ``softcap * tanh(logits / softcap)`` when the config has ``final_logit_softcapping``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model) -> Head:
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        linear = hf.get_output_embeddings()
        cfg = hf.config
        return cls(weight=linear.weight, bias=getattr(linear, "bias", None),
                   scale=float(getattr(cfg, "logit_scale", None) or 1.0),
                   softcap=getattr(cfg, "final_logit_softcapping", None))

    def logits(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Full logits (N, vocab_size) in fp32: for reference computations only."""
        z = hidden.float() @ self.weight[:vocab_size].float().t()
        if self.bias is not None:
            z = z + self.bias[:vocab_size].float()
        z = z * self.scale
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z


def token_divergence(student_hidden: torch.Tensor, student_head: Head, teacher_hidden: torch.Tensor,
                     teacher_head: Head, beta: float, vocab_size: int) -> torch.Tensor:
    """Per-token generalised JSD (N,) in fp32 from hidden states (N, H_s) and (N, H_t); equal to
    ``generalized_jsd(student logits, teacher logits, beta)`` on the first ``vocab_size`` logits.
    Differentiable in the student's hidden states and head; the teacher gets no gradient."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.kernels.chunked_logprob import _use_triton

    n = student_hidden.shape[0]
    if n == 0:
        return student_hidden.new_zeros((0,), dtype=torch.float32)
    s_bias = student_head.bias[:vocab_size] if student_head.bias is not None else None
    t_bias = teacher_head.bias[:vocab_size] if teacher_head.bias is not None else None
    rows = n if _use_triton(student_hidden.device) else CPU_TOKEN_SLICE
    parts = []
    for lo in range(0, n, rows):
        divergence, _entropy = ChunkedDivergenceFunction.apply(
            student_hidden[lo: lo + rows].contiguous(), student_head.weight[:vocab_size], s_bias,
            teacher_hidden[lo: lo + rows].contiguous(), teacher_head.weight[:vocab_size], t_bias,
            float(beta), 1.0, student_head.scale, student_head.softcap, teacher_head.scale, teacher_head.softcap,
        )
        parts.append(divergence)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
