"""Evaluation of a student on the frozen eval split: greedy generation, a verifiable judge,
generated-token count and the mean per-token reverse KL to the teacher.

- ``success_rate``: share of eval sessions whose generation the judge accepts against the
  session's ``final_answer`` (its reference completion if it has none);
- ``avg_tokens``: generated tokens per sample, the end-of-turn token not counted;
- ``reverse_kl``: KL(student || teacher) per generated token (end token included), averaged over
  all generated tokens of the set, at temperature 1 (the chunked divergence of ``trainers.loss``);
- samples (one JSON object per line: session_id, prompt, generation, reference, correct, tokens).

The model is in ``eval()`` mode (no dropout, LoRA's included) for generation and scoring alike, and
is put back in the mode it was in afterwards. Greedy generation uses the shared ``Sampling`` (no
setting from the checkpoint's generation_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atlasd.runspec import EvalReport
from trainers.dataset import Example, encode_prompt, eval_set_hash
from trainers.generation import hf_generate, sampling_for
from trainers.gkd import completion_hidden
from trainers.loss import Head, token_divergence
from trainers.models import Precision
from trainers.telemetry import Telemetry


def evaluate(student, tokenizer, examples: list[Example], judge, *, model_name: str, max_new_tokens: int,
             max_prompt_tokens: int, device, teacher=None, batch_size: int = 8, samples_path: Path | None = None,
             telemetry: Telemetry | None = None, stop=None, precision: Precision | None = None) -> EvalReport:
    was_training = student.training
    student.eval()
    try:
        return _evaluate(student, tokenizer, examples, judge, model_name=model_name, max_new_tokens=max_new_tokens,
                         max_prompt_tokens=max_prompt_tokens, device=device, teacher=teacher, batch_size=batch_size,
                         samples_path=samples_path, telemetry=telemetry, stop=stop,
                         precision=precision or Precision.resolve("auto", torch.device(device)))
    finally:
        student.train(was_training)


def _evaluate(student, tokenizer, examples, judge, *, model_name, max_new_tokens, max_prompt_tokens, device, teacher,
              batch_size, samples_path, telemetry, stop, precision: Precision) -> EvalReport:
    prompts = [encode_prompt(tokenizer, ex.prompt, max_prompt_tokens)[0] for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    generations: dict[int, list[int]] = {}
    kl_sum, kl_tokens = 0.0, 0
    sampling = sampling_for(tokenizer, student, max_new_tokens=max_new_tokens, temperature=None)
    end_ids = {*sampling.stop_ids, tokenizer.pad_token_id}
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        batch_prompts = [prompts[i] for i in idx]
        with precision.autocast():
            outs = hf_generate(student, batch_prompts, sampling, device=device, stop=stop)
        generations.update(zip(idx, outs, strict=True))
        if teacher is not None and any(outs):
            with torch.no_grad(), precision.autocast():
                s_hidden, _ = completion_hidden(student, batch_prompts, outs, tokenizer.pad_token_id, device)
                t_hidden, _ = completion_hidden(teacher, batch_prompts, outs, tokenizer.pad_token_id, device)
                kl = token_divergence(s_hidden, Head.of(student), t_hidden, Head.of(teacher), 1.0, len(tokenizer))
            kl_sum += kl.sum().item()
            kl_tokens += kl.numel()
        if telemetry is not None:
            telemetry.emit("eval_progress", model=model_name, done=min(lo + batch_size, len(order)), total=len(order))
    correct, n_tokens, samples = 0, 0, []
    for i, ex in enumerate(examples):
        ids = generations.get(i, [])
        content = [t for t in ids if t not in end_ids]
        text = tokenizer.decode(content, skip_special_tokens=True)
        ok = bool(judge(text, ex.reference))
        correct += ok
        n_tokens += len(content)
        samples.append({"session_id": ex.session_id, "prompt": ex.prompt, "generation": text,
                        "reference": ex.reference, "correct": ok, "tokens": len(content)})
    if samples_path is not None:
        samples_path = Path(samples_path)
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        samples_path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    n = len(examples)
    return EvalReport(
        model=model_name, eval_set_hash=eval_set_hash(examples), n_samples=n,
        success_rate=correct / n if n else 0.0, avg_tokens=n_tokens / n if n else 0.0,
        reverse_kl=kl_sum / kl_tokens if kl_tokens else None,
        samples_path=str(samples_path) if samples_path is not None else None,
    )

