"""The GKD trainer on tiny offline models (CPU): loss semantics, normalisation, generation,
learning, checkpoints and exact resume, LoRA merge, presets."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from atlasd.runspec import GKDSettings, LoraSettings, OptimSettings
from trainers.dataset import Example
from trainers.gkd import GKDTrainer, Interrupted, latest_checkpoint, step_indices
from trainers.loss import generalized_jsd
from trainers.models import Precision, load_causal_lm, load_student, load_tokenizer
from trainers.telemetry import Telemetry

CPU = torch.device("cpu")
FP32 = Precision("fp32", CPU)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def examples(n: int = 12) -> list[Example]:
    return [
        Example(session_id=i, seq=i,
                prompt=[{"role": "system", "content": f"Task: Tom has {i} apples and buys 2 more. How many?"}],
                completion=f"{i} + 2 = {i + 2}. Final Answer: {i + 2}", reference=str(i + 2))
        for i in range(n)
    ]


def make_trainer(tiny_models, out, data=None, *, student=None, stop=lambda: False, gkd=None, lora=None,
                 precision="fp32", **optim):
    teacher_path, student_path = tiny_models
    tok = load_tokenizer(student_path)
    prec = Precision(precision, CPU)
    teacher = load_causal_lm(teacher_path, CPU, prec.frozen_dtype, trainable=False)
    student = student or load_student(student_path, None, prec, lora)
    settings = dict(learning_rate=5e-3, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
                    save_steps=1000, max_length=128, seed=7, lora=lora, precision=precision)
    settings.update(optim)
    tel = Telemetry(1, stream=io.StringIO())
    return GKDTrainer(student=student, teacher=teacher, tokenizer=tok, train=data or examples(), output_dir=out,
                      gkd=gkd or GKDSettings(max_new_tokens=8), optim=OptimSettings(**settings), device=CPU,
                      telemetry=tel, stop=stop)


def lines(trainer) -> list[dict]:
    return [json.loads(x) for x in trainer.tel.stream.getvalue().splitlines()]


# --- loss ----------------------------------------------------------------------------------------
def test_beta_0_and_1_are_forward_and_reverse_kl_and_match_trl():
    from trl.experimental.gkd import GKDTrainer as TrlGKD

    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ps, pt = s.softmax(-1), t.softmax(-1)
    forward = (pt * (pt.log() - ps.log())).sum(-1)
    reverse = (ps * (ps.log() - pt.log())).sum(-1)
    assert torch.allclose(generalized_jsd(s, t, 0.0), forward, atol=1e-6)
    assert torch.allclose(generalized_jsd(s, t, 1.0), reverse, atol=1e-6)
    for beta in (0.0, 0.3, 0.5, 1.0):  # same values as TRL's generalized_jsd_loss (sum reduction)
        trl = TrlGKD.generalized_jsd_loss(s[None], t[None], beta=beta, reduction="sum")
        assert generalized_jsd(s, t, beta).sum().item() == pytest.approx(trl.item(), rel=1e-5)
    assert torch.allclose(generalized_jsd(s, s, 0.5), torch.zeros(5), atol=1e-6)


def test_loss_is_normalised_by_completion_tokens_of_the_step(tiny_models, tmp_path):
    """Hand computation: a 2-token reference completion and a longer one in one optimizer step
    (micro-batch 1 x accumulation 2): loss = (sum of the per-token divergences) / (2 + n), not the mean
    of the two examples' means."""
    data = [Example(1, 1, [{"role": "system", "content": "Task: two"}], "7", "7"),
            Example(2, 2, [{"role": "system", "content": "Task: a longer prompt here"}], "1 + 2 = 3", "3")]
    tr = make_trainer(tiny_models, tmp_path, data, gkd=GKDSettings(lmbda=0.0, beta=0.5, max_new_tokens=8),
                      per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1)
    lengths = sorted(len(e.completion) for e in tr.encoded)
    assert lengths[0] == 2 and lengths[1] > 2  # "7" + end token; the other + end token
    total, count = 0.0, 0
    with torch.no_grad():
        for e in tr.encoded:  # unpadded, one example at a time
            ids = torch.tensor([e.prompt + e.completion])
            p, c = len(e.prompt), len(e.completion)
            s = tr.student(input_ids=ids).logits[0, p - 1: p + c - 1]
            t = tr.teacher(input_ids=ids).logits[0, p - 1: p + c - 1]
            total += generalized_jsd(s, t, 0.5).sum().item()
            count += c
    row = tr.train_step(1)
    assert row["completion_tokens"] == count == sum(lengths) and row["mode"] == "reference"
    assert row["loss"] == pytest.approx(total / count, rel=1e-4)


# --- generation -----------------------------------------------------------------------------------
def _record_generation(model):
    calls, decode_lengths = [], []
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    model.generate = generate
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: decode_lengths.append(kwargs["input_ids"].shape[1]) if not mod.training else None,
        with_kwargs=True)
    return calls, decode_lengths


def test_one_cached_generate_per_optimizer_step(tiny_models, tmp_path):
    tr = make_trainer(tiny_models, tmp_path, gkd=GKDSettings(lmbda=1.0, max_new_tokens=8), max_steps=3,
                      per_device_train_batch_size=2, gradient_accumulation_steps=3)
    calls, lengths = _record_generation(tr.student)
    tr.train()
    assert len(calls) == 3  # one per optimizer step, for all 3 micro-batches
    assert all(c["generation_config"].use_cache for c in calls)
    assert all(c["input_ids"].shape[0] == 6 for c in calls)  # batch = 2 x 3
    # with the KV cache only the first forward of each generate sees the prompt; the rest see 1 token
    assert lengths.count(1) >= len(lengths) - 3 and max(lengths) > 1
    steps = [x for x in lines(tr) if x["event"] == "step"]
    assert [s["mode"] for s in steps] == ["student"] * 3 and all(s["time_gen_s"] > 0 for s in steps)


def test_lmbda_0_uses_reference_completions_and_seq_kd_the_teacher(tiny_models, tmp_path):
    tr = make_trainer(tiny_models, tmp_path, gkd=GKDSettings(lmbda=0.0, max_new_tokens=8), max_steps=3)
    calls, _ = _record_generation(tr.student)
    tr.train()
    assert calls == []
    steps = [x for x in lines(tr) if x["event"] == "step"]
    assert {s["mode"] for s in steps} == {"reference"}
    idx = step_indices(len(tr.encoded), tr.optim.seed, 1, 4)
    assert steps[0]["completion_tokens"] == sum(len(tr.encoded[i].completion) for i in idx)

    kd = make_trainer(tiny_models, tmp_path / "kd", gkd=GKDSettings(lmbda=0.0, seq_kd=True, max_new_tokens=8),
                      max_steps=2)
    t_calls, _ = _record_generation(kd.teacher)
    s_calls, _ = _record_generation(kd.student)
    kd.train()
    assert len(t_calls) == 2 and s_calls == []


# --- learning ------------------------------------------------------------------------------------
def test_loss_is_finite_and_decreases(tiny_models, tmp_path):
    tr = make_trainer(tiny_models, tmp_path, gkd=GKDSettings(lmbda=0.5, beta=0.5, max_new_tokens=8),
                      max_steps=30, learning_rate=1e-2, lr_scheduler_type="constant")
    out = tr.train()
    losses = [h["loss"] for h in out.history]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert {h["mode"] for h in out.history} == {"student", "reference"}
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses
    assert (tmp_path / "final" / "config.json").is_file()


# --- checkpoints ----------------------------------------------------------------------------------
def test_stop_then_resume_equals_an_uninterrupted_run(tiny_models, tmp_path):
    gkd = GKDSettings(lmbda=0.5, max_new_tokens=8)
    full = make_trainer(tiny_models, tmp_path / "a", gkd=gkd, max_steps=6, save_steps=2)
    full.train()

    part = make_trainer(tiny_models, tmp_path / "b", gkd=gkd, max_steps=6, save_steps=2)
    part.stop = lambda: part.step >= 3
    with pytest.raises(Interrupted):
        part.train()
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step-3"
    events = [x for x in lines(part) if x["event"] == "checkpoint"]
    assert [(e["step"], e["reason"]) for e in events] == [(2, "periodic"), (3, "sigterm")]

    student = load_student(tiny_models[1], ckpt, FP32, None)
    resumed = make_trainer(tiny_models, tmp_path / "b", gkd=gkd, max_steps=6, save_steps=2, student=student)
    resumed.restore(ckpt)
    outcome = resumed.train()
    assert outcome.steps == 6
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    for (name, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-3", "step-4"]  # the last two kept


def test_lora_checkpoint_is_merged(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    tr = make_trainer(tiny_models, tmp_path, lora=lora, max_steps=2, learning_rate=5e-2)
    out = tr.train()
    merged = AutoModelForCausalLM.from_pretrained(out.final_dir)
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([tr.encoded[0].prompt + tr.encoded[0].completion])
    tr.student.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, tr.student(input_ids=ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_models[1])
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)


# --- presets ----------------------------------------------------------------------------------------
def test_gear_presets_match_the_reference_table():
    from atlasd.runspec import TraceSelection
    from trainers.presets import GEARS

    fast, hq = GEARS["fast"], GEARS["high-quality"]
    assert fast.gkd == GKDSettings() and fast.optim == OptimSettings()
    assert fast.min_reward == TraceSelection.model_fields["min_reward"].default == 0.8
    assert (fast.gkd.lmbda, fast.gkd.beta, fast.gkd.temperature, fast.gkd.max_new_tokens) == (1.0, 0.5, 0.9, 256)
    assert (fast.optim.learning_rate, fast.optim.max_steps) == (2e-5, 500)
    assert (hq.gkd.lmbda, hq.gkd.beta, hq.gkd.temperature, hq.gkd.max_new_tokens) == (1.0, 0.5, 0.6, 128)
    assert (hq.optim.learning_rate, hq.optim.max_steps, hq.optim.num_train_epochs, hq.min_reward) == (3e-6, None, 5, 0.9)
    for g in (fast, hq):
        assert (g.optim.per_device_train_batch_size, g.optim.gradient_accumulation_steps) == (2, 4)


def test_heartbeats_while_busy():
    import time

    stream = io.StringIO()
    tel = Telemetry(9, stream=stream, heartbeat_s=0.05)
    tel.start_heartbeat()
    tel.set_phase("generating")
    time.sleep(0.3)
    tel.close()
    rows = [json.loads(x) for x in stream.getvalue().splitlines()]
    beats = [r for r in rows if r["event"] == "heartbeat"]
    assert len(beats) >= 3 and all(b["run_id"] == 9 and b["phase"] == "generating" for b in beats)
