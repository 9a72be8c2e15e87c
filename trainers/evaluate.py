"""Evaluation of a student on the frozen eval split: greedy generation, a verifiable judge,
generated-token count and the mean per-token reverse KL to the teacher.

- ``success_rate``: share of eval sessions whose generation the judge accepts against the
  session's ``final_answer`` (its reference completion if it has none);
- ``avg_tokens``: generated tokens per sample, the end-of-turn token not counted;
- ``reverse_kl``: KL(student || teacher) per generated token (end token included), averaged over
  all generated tokens of the set, at temperature 1;
- samples (one JSON object per line: session_id, prompt, generation, reference, correct, tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atlasd.runspec import EvalReport
from trainers.dataset import Example, encode_prompt, eval_set_hash
from trainers.gkd import completion_logits, eos_ids, generalized_jsd, hf_generate
from trainers.telemetry import Telemetry


def evaluate(student, tokenizer, examples: list[Example], judge, *, model_name: str, max_new_tokens: int,
             max_prompt_tokens: int, device, teacher=None, batch_size: int = 8, samples_path: Path | None = None,
             telemetry: Telemetry | None = None, stop=None) -> EvalReport:
    prompts = [encode_prompt(tokenizer, ex.prompt, max_prompt_tokens)[0] for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    generations: dict[int, list[int]] = {}
    kl_sum, kl_tokens = 0.0, 0
    end_ids = {*eos_ids(student, tokenizer), tokenizer.pad_token_id}
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        batch_prompts = [prompts[i] for i in idx]
        outs = hf_generate(student, tokenizer, batch_prompts, max_new_tokens=max_new_tokens, temperature=None,
                           device=device, stop=stop)
        generations.update(zip(idx, outs, strict=True))
        if teacher is not None and any(outs):
            with torch.no_grad():
                s_logits, mask = completion_logits(student, batch_prompts, outs, tokenizer.pad_token_id, device)
                t_logits, _ = completion_logits(teacher, batch_prompts, outs, tokenizer.pad_token_id, device)
                kl = generalized_jsd(s_logits[mask], t_logits[mask], beta=1.0)
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
        model=model_name, eval_set_hash=eval_set_hash(e.session_id for e in examples), n_samples=n,
        success_rate=correct / n if n else 0.0, avg_tokens=n_tokens / n if n else 0.0,
        reverse_kl=kl_sum / kl_tokens if kl_tokens else None,
        samples_path=str(samples_path) if samples_path is not None else None,
    )

