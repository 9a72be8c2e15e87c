"""Evaluation of a student on the frozen eval split: greedy generation, a verifiable judge,
generated-token count and the mean per-token reverse KL to the teacher.

- ``success_rate``: share of eval sessions whose generation the judge accepts against the
  session's ``final_answer`` (its reference completion if it has none);
- ``avg_tokens``: generated tokens per sample, the end-of-turn token not counted;
- ``reverse_kl``: KL(student || teacher) per generated token (end token included), averaged over
  all generated tokens of the set, at temperature 1 (the chunked divergence of ``trainers.loss``);
- ``slices``: success per learning key of the examples (the non-regression gate compares them
  with the champion's, registry/gate.py);
- samples (one JSON object per line: session_id, learning_key, prompt, generation, reference,
  correct, tokens).

The probe set (``eval.probe_set``, :func:`load_probe_set`) is evaluated the same way, with the base
student in the teacher's place: its ``reverse_kl`` is the model's drift, KL(model || base student)
per token of the model's greedy completions of general prompts (:func:`evaluate_probe`). Teacher-free
and on the model's own outputs, it grows as fine-tuning moves the model away from its base on
inputs outside the policy's tasks.

The model is in ``eval()`` mode (no dropout, LoRA's included) for generation and scoring alike, and
is put back in the mode it was in afterwards. Greedy generation uses the shared ``Sampling`` (no
setting from the checkpoint's generation_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atlasd.runspec import EvalReport, ProbeReport, SliceResult
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
        samples.append({"session_id": ex.session_id, "learning_key": ex.learning_key, "prompt": ex.prompt,
                        "generation": text, "reference": ex.reference, "correct": ok, "tokens": len(content)})
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
        slices=slices(samples),
    )


def slices(samples: list[dict]) -> dict[str, SliceResult]:
    """Success per learning key of the samples (those without a key, from an older snapshot, in none)."""
    by_key: dict[str, list[bool]] = {}
    for s in samples:
        if s["learning_key"] is not None:
            by_key.setdefault(s["learning_key"], []).append(s["correct"])
    return {key: SliceResult(n_samples=len(oks), success_rate=sum(oks) / len(oks)) for key, oks in sorted(by_key.items())}


def load_probe_set(path: str | Path) -> list[Example]:
    """The probe set's rows as examples: a JSON object per line with ``prompt`` (the user turn) or
    ``messages`` (chat messages, role and content), and ``answer`` (what the judge compares
    with); ``session_id`` is the line number, ``source`` "probe", no learning key. ValueError naming
    the file and line on a bad row or an empty set."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the probe set: {exc}") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
            if not (isinstance(messages, list) and messages and isinstance(row["answer"], str | int | float)
                    and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in messages)):
                raise ValueError("expected {\"prompt\": text or \"messages\": [{role, content}], \"answer\": text}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: invalid probe row: {exc}") from None
        answer = str(row["answer"])
        examples.append(Example(session_id=n, seq=0, prompt=messages, completion=answer, reference=answer,
                                source="probe"))
    if not examples:
        raise ValueError(f"{path}: the probe set is empty")
    return examples


def evaluate_probe(model, tokenizer, examples: list[Example], judge, *, base, **kw) -> ProbeReport:
    """``model`` on the probe set (:func:`evaluate`'s keywords), ``base`` (the base student) in the
    teacher's place: ``drift_kl`` is KL(model || base) per token of the model's greedy completions."""
    report = evaluate(model, tokenizer, examples, judge, teacher=base, **kw)
    return ProbeReport(probe_set_hash=report.eval_set_hash, n_samples=report.n_samples,
                       success_rate=report.success_rate, avg_tokens=report.avg_tokens, drift_kl=report.reverse_kl,
                       samples_path=report.samples_path)

