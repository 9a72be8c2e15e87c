"""Precision, tokenizer/vocabulary checks and model loading (trainers/models.py), on tiny CPU models."""

from __future__ import annotations

import io
import statistics

import pytest
import torch

from atlasd.runspec import GKDSettings, OptimSettings
from trainers.gkd import GKDTrainer
from trainers.models import Precision, load_causal_lm, load_student, load_tokenizer, tokenizer_mismatch
from trainers.telemetry import Telemetry

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _examples(n: int = 12):
    from trainers.dataset import Example

    return [Example(session_id=i, seq=i, prompt=[{"role": "system", "content": f"Task: Tom has {i} apples and buys 2."}],
                    completion=f"{i} + 2 = {i + 2}. Final Answer: {i + 2}", reference=str(i + 2)) for i in range(n)]


def _trainer(teacher_path, student_path, out, *, precision="fp32", lr=2e-5, lmbda=1.0, steps=50, student=None,
             optimizer="adamw"):
    prec = Precision(precision, CPU)
    teacher = load_causal_lm(teacher_path, CPU, prec.frozen_dtype, trainable=False)
    student = student or load_student(student_path, None, prec, None)
    optim = OptimSettings(learning_rate=lr, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          max_steps=steps, save_steps=1000, max_length=128, seed=7, precision=precision,
                          optimizer=optimizer)
    return GKDTrainer(student=student, teacher=teacher, tokenizer=load_tokenizer(student_path), train=_examples(),
                      gkd=GKDSettings(max_new_tokens=8, lmbda=lmbda), optim=optim, output_dir=out, device=CPU,
                      telemetry=Telemetry(1, stream=io.StringIO()))


def _changed_after_step_1(trainer) -> float:
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.train_step(1)
    changed = sum((p != before[n]).sum().item() for n, p in trainer.student.named_parameters())
    return changed / sum(p.numel() for p in trainer.student.parameters())


def _losses(trainer) -> list[float]:
    return [trainer.train_step(s)["loss"] for s in range(1, trainer.total + 1)]


@pytest.mark.slow
def test_bf16_mixed_moves_every_weight_and_tracks_fp32(tiny_models, tmp_path):
    """bf16-mixed (fp32 masters, bf16 autocast, bf16 teacher) at the fast gear's lr 2e-5: >= 99 % of the
    student's weights change in step 1 (pure bf16 weights with AdamW, the control, lose most updates to
    rounding), and its 50-step loss curve stays within 2 % of the fp32 run's, also at a learning rate
    where the loss falls ~50x (5-step moving averages there)."""
    teacher, student = tiny_models
    mixed = _trainer(teacher, student, tmp_path / "m", precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in mixed.student.parameters())
    assert all(p.dtype == torch.bfloat16 for p in mixed.teacher.parameters())
    assert _changed_after_step_1(mixed) >= 0.99

    pure = _trainer(teacher, student, tmp_path / "p", student=load_causal_lm(student, CPU, torch.bfloat16, trainable=True))
    assert _changed_after_step_1(pure) < 0.5  # the failure bf16-mixed exists to avoid

    fp32 = _losses(_trainer(teacher, student, tmp_path / "f"))
    bf16 = _losses(_trainer(teacher, student, tmp_path / "b", precision="bf16-mixed"))
    assert len(fp32) == len(bf16) == 50
    assert all(abs(a - b) <= 0.02 * abs(a) for a, b in zip(fp32, bf16, strict=True))

    fast = dict(lr=5e-3, lmbda=0.0)
    fp32 = _losses(_trainer(teacher, student, tmp_path / "f2", **fast))
    bf16 = _losses(_trainer(teacher, student, tmp_path / "b2", precision="bf16-mixed", **fast))
    assert fp32[-1] < fp32[0] / 10  # it learns
    avg = lambda xs, i: statistics.fmean(xs[i: i + 5])  # noqa: E731
    assert all(abs(avg(fp32, i) - avg(bf16, i)) <= 0.02 * avg(fp32, i) for i in range(0, 50, 5))


@pytest.mark.slow
def test_adamw_8bit_trains(tiny_models, tmp_path):
    """optim.optimizer adamw-8bit (torchao AdamW8bit: 2 bytes of state per parameter instead of 8) is a
    real optimizer: the loss falls as with AdamW (its first call compiles, ~30 s on 2 cores)."""
    tr = _trainer(*tiny_models, tmp_path, lr=5e-3, lmbda=0.0, steps=4, optimizer="adamw-8bit")
    assert type(tr.optimizer).__name__ == "AdamW8bit"
    losses = _losses(tr)
    assert losses[-1] < losses[0]


def test_precision_resolution():
    assert Precision.resolve("auto", CPU).name == "fp32"
    assert Precision.resolve("auto", torch.device("cuda")).name == "bf16-mixed"
    mixed = Precision.resolve("bf16-mixed", CPU)
    assert mixed.frozen_dtype == torch.bfloat16
    with mixed.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_padded_teacher_vocabulary_trains(tmp_path):
    """One tokenizer, different embedding sizes (Qwen2.5 3B: 151,936 vs 7B: 152,064): accepted before
    loading, and training scores only the tokenizer's rows."""
    from trainers.tiny import build_model, build_tokenizer, synthetic_corpus

    tok = build_tokenizer(synthetic_corpus(), tmp_path / "tok")
    build_model(tok, tmp_path / "teacher", hidden_size=48, heads=4, kv_heads=2, vocab_size=len(tok) + 64, seed=1)
    build_model(tok, tmp_path / "student", hidden_size=32, vocab_size=len(tok) + 8, seed=2)
    assert tokenizer_mismatch(str(tmp_path / "student"), str(tmp_path / "teacher")) is None
    tr = _trainer(str(tmp_path / "teacher"), str(tmp_path / "student"), tmp_path / "out", lr=5e-3, steps=3)
    assert tr.vocab == len(tok)
    losses = _losses(tr)
    assert all(0 < x < 10 for x in losses)


def test_different_tokenizers_are_refused_before_loading(tiny_models, tmp_path):
    """A teacher over another tokenizer (here one with the same special tokens and a different BPE) is
    refused by the spec check, naming both models; nothing is loaded."""
    from atlasd.runspec import RunSpec
    from trainers.run import check_spec
    from trainers.tiny import build_model, build_tokenizer

    other = build_tokenizer([f"completely different corpus number {i} zebra quartz" for i in range(200)],
                            tmp_path / "tok", vocab_size=400)
    build_model(other, tmp_path / "teacher", seed=3)
    student = tiny_models[1]
    msg = tokenizer_mismatch(student, str(tmp_path / "teacher"))
    assert msg and str(tmp_path / "teacher") in msg and student in msg and "different tokenizers" in msg

    spec = RunSpec.model_validate({
        "run_id": 1, "policy": "p", "gear": "fast", "teacher": str(tmp_path / "teacher"), "student": student,
        "base_student": student, "output_dir": str(tmp_path / "out"),
        "traces": {"window_hi": 1, "db_url": "postgresql://x@h/db"}})
    errors, _ = check_spec(spec)
    assert any(e.startswith("teacher:") and "different tokenizers" in e for e in errors)

    build_model(load_tokenizer(student), tmp_path / "small", vocab_size=len(load_tokenizer(student)) - 1)
    assert "smaller than the tokenizer" in tokenizer_mismatch(student, str(tmp_path / "small"))
