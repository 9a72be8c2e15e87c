"""The memory plan (``trainers.plan``, ``python -m trainers plan``): exact parameter counts from
config.json alone, the reference policy's verdicts on 80/141/128 GB GPUs, the estimate against the
measured peak of real trainer steps on tiny models (CPU), refusal and the command's exit codes."""

from __future__ import annotations

import io
import json
import weakref
from pathlib import Path

import pytest
import torch

from atlasd.policies import load_policy_file
from atlasd.runspec import GKDSettings, LoraSettings, OptimSettings, RunSpec, TraceSelection
from trainers.__main__ import main
from trainers.plan import (
    ENV_MEMORY,
    GiB,
    PlanError,
    PlanRefused,
    build_plan,
    check_memory,
    device_memory,
    disk_plan,
    format_plan,
    model_shape,
)

REPO = Path(__file__).resolve().parents[1]

# config.json of the Qwen2.5 Instruct checkpoints (the fields that matter; values as published)
_QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", attention_dropout=0.0,
             bos_token_id=151643, eos_token_id=151645, initializer_range=0.02, max_position_embeddings=32768,
             rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072, torch_dtype="bfloat16",
             use_cache=True, use_sliding_window=False)
QWEN = {
    "Qwen2.5-1.5B-Instruct": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True, max_window_layers=21),
    "Qwen2.5-3B-Instruct": dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True, max_window_layers=70),
    "Qwen2.5-7B-Instruct": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, tie_word_embeddings=False, max_window_layers=28),
    "Qwen2.5-14B-Instruct": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        vocab_size=152064, tie_word_embeddings=False, max_window_layers=70),
}
PARAMS = {"Qwen2.5-1.5B-Instruct": 1_543_714_304, "Qwen2.5-3B-Instruct": 3_085_938_688,
          "Qwen2.5-7B-Instruct": 7_615_616_512, "Qwen2.5-14B-Instruct": 14_770_033_664}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, str]:
    """Folders holding only the config.json of each Qwen2.5 model (no weights, no tokenizer)."""
    root = tmp_path_factory.mktemp("qwen_configs")
    out = {}
    for name, cfg in QWEN.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**_QWEN, **cfg}))
        out[name] = str(root / name)
    return out


def reference_spec(qwen, tmp_path, gear: str = "fast", **optim) -> RunSpec:
    """policies/default.yaml's gear, with the 14B teacher and 7B student config folders."""
    policy = load_policy_file(REPO / "policies" / "default.yaml")
    policy = policy.model_copy(update={"teacher": qwen["Qwen2.5-14B-Instruct"], "student": qwen["Qwen2.5-7B-Instruct"]})
    spec = policy.run_spec(gear, run_id=1, trigger="manual", window_lo=0, window_hi=500, student=None,
                           champion_version=None, output_dir=tmp_path / "run", device="cuda")
    return spec.model_copy(update={"optim": spec.optim.model_copy(update=optim)}) if optim else spec


# --- shapes --------------------------------------------------------------------------------------
def test_parameter_counts_come_exactly_from_config_json(qwen):
    for name, n in PARAMS.items():
        shape = model_shape(qwen[name], "student")
        assert shape.n_params == n, name
        assert shape.tied == QWEN[name]["tie_word_embeddings"]
        assert (shape.layers, shape.hidden, shape.vocab) == (QWEN[name]["num_hidden_layers"], QWEN[name]["hidden_size"],
                                                             QWEN[name]["vocab_size"])
        assert shape.head_dim == 128 and shape.kv_heads == QWEN[name]["num_key_value_heads"]
    s7 = model_shape(qwen["Qwen2.5-7B-Instruct"])
    # every Linear but lm_head: 28 layers x (q, k, v, o, gate, up, down)
    assert len(s7.linears) == 28 * 7 and s7.largest_param == 152064 * 3584
    assert s7.lora_params(LoraSettings(r=16)) == 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    qv = LoraSettings(r=8, target_modules=["q_proj", "v_proj"])
    assert s7.lora_params(qv) == 28 * 8 * ((3584 + 3584) + (3584 + 512))


def test_unreadable_models_are_named(tmp_path, qwen):
    spec = reference_spec(qwen, tmp_path).model_copy(update={"teacher": str(tmp_path / "nothing-here")})
    with pytest.raises(PlanError, match=r"teacher: .*nothing-here is not a Hugging Face model folder"):
        build_plan(spec, device_memory_bytes=80 * GiB)
    spec = reference_spec(qwen, tmp_path).model_copy(update={"student": "no-such-org/no-such-model-xyz"})
    with pytest.raises(PlanError, match="student: cannot read the config of 'no-such-org/no-such-model-xyz'"):
        build_plan(spec, device_memory_bytes=80 * GiB)


def test_constants_match_trl_and_the_sampler():
    from trl.kernels import chunked_divergence

    from trainers import plan
    from trainers.generation import PAD_MULTIPLE

    assert (plan.TOKEN_CHUNK_SIZE, plan.VOCAB_CHUNK_SIZE) == (chunked_divergence.TOKEN_CHUNK_SIZE,
                                                             chunked_divergence.VOCAB_CHUNK_SIZE)
    assert plan.PAD_MULTIPLE == PAD_MULTIPLE


# --- the reference policy on 80 / 141 / 128 GB -----------------------------------------------------
def test_reference_policy_on_80_141_and_128_gb(qwen, tmp_path):
    """7B student + 14B teacher, fast gear (batch 2 x accumulation 4, 256 new tokens, 2048 tokens), CUDA.

    Full fine-tuning with correct mixed precision: fp32 masters 28.4 + fp32 grads 28.4 + AdamW 56.7 +
    bf16 teacher 27.5 = 141.0 GiB (151 GB decimal) before a single activation; the bf16 autocast copy
    of the weights (12.2) and the rest bring the peak to ~155 GiB: refused on 80, 141 and 128 GB.
    8-bit AdamW saves 42 GB (fits 141 and 128); LoRA (bf16 base, 2 B/param) fits everywhere."""
    rows = []
    for gb in (80, 141, 128):
        full = build_plan(reference_spec(qwen, tmp_path), device_memory_bytes=gb * GiB)
        lora = build_plan(reference_spec(qwen, tmp_path, lora=LoraSettings()), device_memory_bytes=gb * GiB)
        lora_gc = build_plan(reference_spec(qwen, tmp_path, lora=LoraSettings(), gradient_checkpointing=True),
                             device_memory_bytes=gb * GiB)
        adam8 = build_plan(reference_spec(qwen, tmp_path, optimizer="adamw-8bit"), device_memory_bytes=gb * GiB)
        rows.append((gb, full, lora, lora_gc, adam8))
        assert full.precision == "bf16-mixed" and full.gradient_checkpointing
        assert not full.fits, f"full fine-tuning must not fit {gb} GB"
        assert lora.fits and lora_gc.fits, f"LoRA must fit {gb} GB"
        assert adam8.fits == (gb >= 128)
    full = rows[0][1]
    static_and_grads = sum(full.part(p).bytes for p in ("student weights", "gradients", "optimizer state",
                                                          "teacher weights"))
    assert static_and_grads / GiB == pytest.approx(141.0, abs=0.2)
    assert 150 < full.total_bytes / GiB < 165
    assert full.part("student weights").bytes == pytest.approx(PARAMS["Qwen2.5-7B-Instruct"] * 4, rel=1e-6)
    assert full.part("teacher weights").bytes == pytest.approx(PARAMS["Qwen2.5-14B-Instruct"] * 2, rel=1e-6)
    assert full.part("autocast weight cache").bytes / GiB == pytest.approx(12.15, abs=0.05)
    # ways out on 80 GB: LoRA (with the learning rate to use), 8-bit AdamW, and 8 GPUs
    text = "\n".join(full.ways_out)
    assert "optim.lora: {r: 16, alpha: 32}" in text and "optim.learning_rate: 0.0002" in text
    assert "10x the full fine-tuning learning rate: 0.0002 for this gear's 2e-05" in text
    lora_way = next(w for w in full.ways_out_detail if w.change.startswith("optim.lora"))
    assert lora_way.fits and lora_way.saves_bytes > 100 * GiB  # with checkpointing: the no-GC LoRA fit is tight
    eight = next(w for w in full.ways_out_detail if w.change == "optim.optimizer: adamw-8bit")
    assert eight.saves_bytes / GiB == pytest.approx(PARAMS["Qwen2.5-7B-Instruct"] * 6 / GiB, rel=0.02)
    assert not eight.fits
    assert any(w.startswith("optim.num_gpus: 4: saves") and "fits" in w for w in full.ways_out)
    assert any("gkd.max_new_tokens" in w for w in full.ways_out) and any("optim.max_length" in w for w in full.ways_out)
    # the LoRA gear keeps the full fine-tuning learning rate: a note says so
    assert any("LoRA usually needs ~10x" in n and "0.0002" in n for n in rows[0][2].notes)
    # the high-quality gear (3e-6, 128 new tokens) is refused as well
    assert not build_plan(reference_spec(qwen, tmp_path, gear="high-quality"), device_memory_bytes=141 * GiB).fits
    print()
    for gb, f, lo, lg, a8 in rows:
        def verdict(p):
            return f"{p.total_bytes / GiB:6.1f} {'fits' if p.fits else 'refused'}"

        print(f"{gb:>4} GB (available {a8.available_bytes / GiB:6.1f}): full FT {verdict(f)} | adamw-8bit "
              f"{verdict(a8)} | LoRA {verdict(lo)} | LoRA+GC {verdict(lg)}")


def test_several_gpus_shard_the_student_and_the_teacher(qwen, tmp_path):
    """The reference full fine-tune (7B student, 14B bf16 teacher), refused on one 80 GB GPU, on 8 of them:
    per GPU the student's fp32 weights, gradients and AdamW state / 8 and the teacher's weights / 8 (FSDP2);
    what FSDP2 gathers (the student's root and ~3 fp32 layers; the teacher's root, embeddings + head + norm
    in bf16, for each micro-batch, and ~3 of its bf16 layers in its forward); a loading moment (each rank
    holds the whole fp32 student and the whole teacher before sharding them: the peak on 8 GPUs) and a final
    evaluation moment (the teacher whole again, rank 0 reloading final/). The one-GPU plan's ways out name
    the smallest GPU count that fits (4); checkpoints stay consolidated on disk."""
    spec = reference_spec(qwen, tmp_path)
    one = build_plan(spec, device_memory_bytes=80 * GiB, gpus=1)
    four = build_plan(spec, device_memory_bytes=80 * GiB, gpus=4)
    eight = build_plan(spec, device_memory_bytes=80 * GiB, gpus=8)
    n, nt = PARAMS["Qwen2.5-7B-Instruct"], PARAMS["Qwen2.5-14B-Instruct"]
    assert (one.world, one.layout) == (1, "one device") and not {"loading", "final evaluation"} & set(one.moments)
    assert not any("FSDP2" in p.name or p.name.startswith("whole") for p in one.parts)
    assert eight.world == 8 and eight.as_dict()["ranks"] == 8 and eight.layout.startswith("student and teacher")
    assert eight.part("student weights").bytes == pytest.approx(n * 4 / 8, rel=1e-4)
    assert eight.part("optimizer state").bytes == n * 8 // 8 and eight.part("gradients").bytes == n * 4 // 8
    assert one.part("teacher weights").bytes == pytest.approx(nt * 2, rel=1e-6)
    assert eight.part("teacher weights").bytes == pytest.approx(nt * 2 / 8, rel=1e-4)
    qwen14 = QWEN["Qwen2.5-14B-Instruct"]
    root = 2 * qwen14["vocab_size"] * qwen14["hidden_size"] + qwen14["hidden_size"]  # untied: embeddings + head
    layer = (nt - root) // qwen14["num_hidden_layers"]
    t_root, t_layers = eight.part("teacher FSDP2 root"), eight.part("teacher FSDP2 layers")
    assert (t_root.bytes, t_layers.bytes) == (2 * root, 2 * 3 * layer)
    assert t_root.bytes / GiB == pytest.approx(2.90, abs=0.01) and t_layers.bytes / GiB == pytest.approx(1.54, abs=0.01)
    assert t_layers.when == ("teacher forward",)  # the fast gear: no seq_kd, the teacher never samples
    assert set(t_root.when) == {"teacher forward", "student forward", "loss backward", "layer backward"}
    assert eight.part("whole student (loading)").bytes == n * 4 - n * 4 // 8
    assert eight.part("whole teacher").bytes == nt * 2 - nt * 2 // 8
    assert eight.part("whole teacher").when == ("loading", "final evaluation")
    assert eight.part("activations").bytes == one.part("activations").bytes  # each rank: its own micro-batches
    # the loading moment: the whole fp32 student and bf16 teacher (56.3 GiB) + the optimizer state's shard
    assert eight.peak_moment == "loading"
    assert eight.total_bytes == pytest.approx(n * 4 + nt * 2 + n * 8 // 8, rel=1e-6)
    assert eight.total_bytes / GiB == pytest.approx(62.97, abs=0.05)
    training = eight.static_bytes + max(b for m, b in eight.moments.items() if m not in ("loading", "final evaluation"))
    assert training / GiB == pytest.approx(41.35, abs=0.05)
    assert eight.static_bytes + eight.moments["final evaluation"] < eight.total_bytes
    assert not one.fits and four.fits and eight.fits and four.total_bytes / GiB == pytest.approx(70.07, abs=0.05)
    assert not build_plan(spec, device_memory_bytes=80 * GiB, gpus=2).fits
    way = next(w for w in one.ways_out_detail if w.change.startswith("optim.num_gpus"))
    assert way.change == "optim.num_gpus: 4" and way.fits and way.total_bytes == four.total_bytes
    assert "teacher's weights sharded over 4 GPUs" in way.note
    assert build_plan(reference_spec(qwen, tmp_path, num_gpus=4), device_memory_bytes=80 * GiB).world == 4
    text = format_plan(eight)
    assert "per GPU of 8" in text and "student and teacher sharded with FSDP2" in text
    seq_kd = spec.model_copy(update={"gkd": GKDSettings(seq_kd=True, lmbda=0.5)})
    seq_kd = build_plan(seq_kd, device_memory_bytes=80 * GiB, gpus=8)
    assert "teacher generation" in seq_kd.part("teacher FSDP2 layers").when
    assert "teacher generation" in seq_kd.part("teacher FSDP2 root").when
    assert disk_plan(spec, eight).checkpoint_bytes == pytest.approx(disk_plan(spec, one).checkpoint_bytes, rel=1e-4)
    print(f"\nreference full FT per 80 GB GPU: 1 GPU {one.total_bytes / GiB:.2f} GiB, 4 GPUs "
          f"{four.total_bytes / GiB:.2f}, 8 GPUs {eight.total_bytes / GiB:.2f} (peak {eight.peak_moment}; training "
          f"{training / GiB:.2f})")


def test_vllm_share_counts_while_it_samples_and_can_be_lowered(qwen, tmp_path):
    """The engine sleeps (level 2, nothing held) outside generate: its share is part of the generation
    moment only, on top of the static weights, never of the backward."""
    spec = reference_spec(qwen, tmp_path, lora=LoraSettings(), generation_backend="vllm",
                          vllm_gpu_memory_utilization=0.6, gradient_checkpointing=True)
    plan = build_plan(spec, device_memory_bytes=80 * GiB)
    engine = plan.part("vLLM engine")
    assert engine.when == ("generation",) and engine.bytes >= int(0.6 * 80 * GiB)
    assert "sampler" not in {p.name for p in plan.parts} and plan.peak_moment == "generation"
    assert not plan.fits
    way = next(w for w in plan.ways_out_detail if w.change.startswith("optim.vllm_gpu_memory_utilization"))
    assert way.saves_bytes == pytest.approx(0.3 * 80 * GiB, rel=0.01) and way.fits
    assert build_plan(spec.model_copy(update={"optim": spec.optim.model_copy(
        update={"vllm_gpu_memory_utilization": 0.3})}), device_memory_bytes=80 * GiB).fits


# --- estimate vs measurement (CPU, tiny models) --------------------------------------------------------
class LiveTensorPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Exact live tensor bytes on CPU, where there is no ``max_memory_allocated``.

    Every storage an ATen op returns (forward, backward, optimizer, generation: all go through the
    dispatcher) is counted once at its full ``nbytes`` when it first appears, and uncounted by a
    weakref finalizer on the storage when it is freed; views share their storage. Tensors that exist
    before (the weights, the optimizer state) are registered up front. ``peak`` is then the maximum of
    live bytes over every op: what CUDA's allocator reports as ``max_memory_allocated``, without its
    rounding. Unlike RSS it counts memory that is allocated but never touched (TRL's tile buffers are
    allocated 32768 wide but only ``vocab`` columns are written: RSS would miss most of them, the CUDA
    allocator would not), and it is blind to allocator caches and library state."""

    def __init__(self, *existing):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        for tensors in existing:
            for t in tensors:
                self._track(t)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, n = storage._cdata, storage.nbytes()
        old = self.live.get(key)
        if old is None:
            self.live[key] = n
            self.current += n
            weakref.finalize(storage, self._free, key)
        elif old != n:  # resized in place
            self.live[key] = n
            self.current += n - old
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self._track(t)
        return out


def test_live_tensor_peak_counts_allocations_and_frees():
    w = torch.zeros(1000, 1000, requires_grad=True)  # 4 MB, registered as existing
    with LiveTensorPeak([w]) as m:
        assert m.current == 4_000_000
        x = torch.ones(100, 1000)  # 0.4 MB
        y = (x @ w).tanh().sum()  # x@w (0.4 MB) is freed; tanh's output (0.4 MB) is saved
        assert m.current == 4_000_000 + 800_000 + 4
        y.backward()  # w.grad (4 MB) stays
        del x, y
        assert m.current == 8_000_000
        assert m.peak >= 8_800_000
    del w


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[str, str]:
    """A tokenizer (~580 tokens) with a 3.1M-parameter student and a 6.5M-parameter teacher: large
    enough that framework noise is small next to weights, activations and the loss tiles."""
    from trainers.tiny import build_model, build_tokenizer, synthetic_corpus

    root = tmp_path_factory.mktemp("plan_models")
    tok = build_tokenizer(synthetic_corpus(), root / "tokenizer", vocab_size=1024)
    build_model(tok, root / "teacher", hidden_size=384, layers=4, heads=6, kv_heads=2, intermediate_size=1024, seed=1)
    build_model(tok, root / "student", hidden_size=256, layers=4, heads=4, kv_heads=2, intermediate_size=704, seed=2)
    return str(root / "teacher"), str(root / "student")


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a busy machine
    yield
    torch.set_num_threads(n)


def padded_examples(tok, n: int, max_prompt: int):
    """Prompts of distinct lengths max_prompt, max_prompt - 1, ...: every micro-batch is padded, as
    real ones are (then the attention mask exists and k/v are repeated to all heads)."""
    from trainers.dataset import Example, encode_prompt

    out = []
    for i in range(n):
        lo, hi = 0, 4 * max_prompt
        while lo < hi:  # the most words whose prompt fits max_prompt - i tokens
            mid = (lo + hi + 1) // 2
            ids, _ = encode_prompt(tok, [{"role": "system", "content": " ".join(["apples"] * mid)}], 10**6)
            lo, hi = (mid, hi) if len(ids) <= max_prompt - i else (lo, mid - 1)
        out.append(Example(session_id=i, seq=i, prompt=[{"role": "system", "content": " ".join(["apples"] * lo)}],
                           completion=" ".join(str(j) for j in range(100)), reference="1"))
    return out


@pytest.mark.parametrize("case", [
    dict(),
    dict(lora=LoraSettings(r=8)),
    dict(precision="bf16-mixed"),
    dict(precision="bf16-mixed", gradient_checkpointing=True),  # the reference's regime on CUDA
], ids=["fp32-full", "fp32-lora", "bf16-mixed-full", "bf16-mixed-full-checkpointing"])
def test_estimate_is_within_10_percent_of_the_measured_peak(tiny_pair, tmp_path, one_thread, case):
    """Real trainer steps on CPU (GKDTrainer: on-policy generation, teacher and student forwards, TRL's
    chunked loss, AdamW): step 1 creates the optimizer state, step 2 is measured with LiveTensorPeak
    (weights + optimizer state + everything the step allocates). The plan for the same spec on CPU must
    be within 10 % of that peak. bf16-mixed runs under CPU autocast, which saves the same tensors as CUDA
    autocast; the CPU-only differences (no Triton: tile temporaries; fp32 dropout noise) are modelled."""
    from trainers.gkd import GKDTrainer
    from trainers.models import Precision, load_causal_lm, load_student, load_tokenizer
    from trainers.telemetry import Telemetry

    teacher_path, student_path = tiny_pair
    cpu = torch.device("cpu")
    gkd = GKDSettings(lmbda=1.0, max_new_tokens=32)
    optim = OptimSettings(learning_rate=1e-4, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                          save_steps=1000, max_length=192, seed=7, precision=case.get("precision", "fp32"),
                          lora=case.get("lora"), gradient_checkpointing=case.get("gradient_checkpointing"))
    precision = Precision(optim.precision, cpu)
    tok = load_tokenizer(student_path)
    teacher = load_causal_lm(teacher_path, cpu, precision.frozen_dtype, trainable=False)
    student = load_student(student_path, None, precision, optim.lora)
    trainer = GKDTrainer(student=student, teacher=teacher, tokenizer=tok, train=padded_examples(tok, 12, 160), gkd=gkd,
                         optim=optim, output_dir=tmp_path, device=cpu, telemetry=Telemetry(1, stream=io.StringIO()))
    trainer.train_step(1)
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    with LiveTensorPeak([*student.parameters(), *student.buffers()], [*teacher.parameters(), *teacher.buffers()],
                        state) as meter:
        row = trainer.train_step(2)
    assert row["mode"] == "student" and row["completion_tokens"] > 90

    spec = RunSpec(run_id=1, policy="p", gear="g", teacher=teacher_path, student=student_path,
                   base_student=student_path, traces=TraceSelection(window_hi=1), gkd=gkd, optim=optim,
                   output_dir=tmp_path, device="cpu")
    plan = build_plan(spec, device_type="cpu", device_memory_bytes=64 * GiB)
    loss = plan.part("loss (forward)").bytes
    assert loss > 0.1 * plan.total_bytes, "the loss tiles must be visible at this size"
    ratio = plan.total_bytes / meter.peak
    print(f"\n{case}: plan {plan.total_bytes / 2**20:.1f} MiB, measured {meter.peak / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f} (peak moment: {plan.peak_moment})")
    assert abs(ratio - 1) <= 0.10, format_plan(plan)


# --- refusal and the command -----------------------------------------------------------------------
def test_check_memory_refuses_with_the_parts_and_ways_out(qwen, tmp_path):
    spec = reference_spec(qwen, tmp_path)
    with pytest.raises(PlanRefused) as info:
        check_memory(spec, device_memory_bytes=80 * GiB)
    err = info.value
    assert isinstance(err, ValueError) and not err.plan.fits
    message = str(err)
    for part in ("student weights", "teacher weights", "optimizer state", "gradients", "autocast weight cache",
                 "sampler", "activations", "loss (forward)", "loss (backward)"):
        assert part in message
    assert "DOES NOT FIT" in message and "Ways out" in message
    assert "optim.lora" in message and "optim.optimizer: adamw-8bit" in message and "optim.num_gpus" in message
    ok = check_memory(reference_spec(qwen, tmp_path, lora=LoraSettings(), gradient_checkpointing=True),
                      device_memory_bytes=80 * GiB)
    assert ok.fits and ok.ways_out == []


def test_device_memory_override_and_proc_meminfo(monkeypatch):
    free, total = device_memory("cpu")
    assert 0 < free <= total
    monkeypatch.setenv(ENV_MEMORY, "128")
    assert device_memory("cuda") == (128 * GiB, 128 * GiB)  # no CUDA needed with the override
    monkeypatch.setenv(ENV_MEMORY, "lots")
    with pytest.raises(PlanError, match=ENV_MEMORY):
        device_memory("cpu")


def test_plan_command_exit_codes_and_json(qwen, tmp_path, capsys, monkeypatch):
    spec_file = reference_spec(qwen, tmp_path).dump(tmp_path / "spec.json")
    assert main(["plan", str(spec_file), "--device", "cuda", "--device-memory-gb", "80"]) == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "student weights" in out and "Ways out" in out

    assert main(["plan", str(spec_file), "--device", "cuda", "--device-memory-gb", "400", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["device_type"] == "cuda" and data["ways_out"] == []
    assert main(["plan", str(spec_file), "--device", "cuda", "--device-memory-gb", "80", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == 8
    assert {p["name"] for p in data["parts"]} >= {"student weights", "gradients", "optimizer state", "activations"}
    assert data["total_gb"] == pytest.approx(sum(p["gb"] for p in data["parts"] if p["when"] == ["always"])
                                             + data["moments_gb"][data["peak_moment"]], abs=0.1)

    monkeypatch.setenv(ENV_MEMORY, "80")
    assert main(["plan", str(spec_file), "--device", "cuda", "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["available_gb"] == pytest.approx(75.0)
    assert any(w["change"].startswith("optim.lora") and w["fits"] for w in data["ways_out"])

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"run_id": 0}))
    assert main(["plan", str(bad), "--device-memory-gb", "80"]) == 2
    assert "invalid run spec" in capsys.readouterr().err
    missing = reference_spec(qwen, tmp_path).model_copy(update={"teacher": str(tmp_path / "gone")})
    assert main(["plan", str(missing.dump(tmp_path / "missing.json")), "--device-memory-gb", "80", "--json"]) == 2
    assert "teacher:" in json.loads(capsys.readouterr().out)["error"]
