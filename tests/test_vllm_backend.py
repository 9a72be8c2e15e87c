"""trainers.vllm_backend: seeds, SamplingParams arguments and streamed (LoRA-merged) weights on CPU; the
engine itself only with CUDA and vllm installed."""

from __future__ import annotations

import copy
import importlib.util
import weakref

import pytest
import torch

from trainers.generation import Sampling
from trainers.models import iter_merged_weights
from trainers.vllm_backend import VllmGenerator, request_seeds, sampling_params_kwargs

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# --- seeds ---------------------------------------------------------------------------------------
def test_request_seeds_deterministic_and_distinct():
    assert request_seeds(7, 3, 16) == request_seeds(7, 3, 16)
    assert request_seeds(7, 3, 4) == request_seeds(7, 3, 16)[:4]  # request i's seed does not depend on n
    grid = [s for step in range(1, 101) for s in request_seeds(7, step, 64)]
    assert len(set(grid)) == len(grid)  # distinct across steps and requests
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in grid)  # vLLM keeps seeds as int64
    assert set(request_seeds(8, 3, 16)).isdisjoint(request_seeds(7, 3, 16))  # the run seed matters
    assert request_seeds(7, 3, 0) == []


def test_request_seeds_are_fixed_values():
    """A resumed run (another process, another Python) must draw the same seeds: no ``hash()``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "from trainers.vllm_backend import request_seeds; print(request_seeds(5, 9, 3))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="123"), cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == str(request_seeds(5, 9, 3))


# --- SamplingParams arguments ---------------------------------------------------------------------
def _sampling(temperature, seed=11):
    return Sampling(max_new_tokens=48, temperature=temperature, stop_ids=(2, 5), pad_id=0, seed=seed)


def test_sampling_params_kwargs_sampled():
    kw = sampling_params_kwargs(_sampling(0.7), 1234)
    assert kw == {
        "n": 1, "temperature": 0.7, "top_k": -1, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": 48, "min_tokens": 0,
        "stop_token_ids": [2, 5], "ignore_eos": True, "seed": 1234, "detokenize": False,
    }


def test_sampling_params_kwargs_greedy_and_invalid():
    kw = sampling_params_kwargs(_sampling(None), 9)
    assert kw["temperature"] == 0.0 and kw["top_k"] == -1 and kw["top_p"] == 1.0 and kw["seed"] == 9
    with pytest.raises(ValueError):
        sampling_params_kwargs(_sampling(0.0), 9)


def test_sampling_params_kwargs_mask_the_padded_vocabulary():
    s = Sampling(max_new_tokens=8, temperature=1.0, stop_ids=(2,), pad_id=0, vocab_size=500)
    kw = sampling_params_kwargs(s, 1, engine_vocab_size=512)
    assert kw["logit_bias"] == {i: float("-inf") for i in range(500, 512)}  # as hf_generate's _VocabLimit
    assert "logit_bias" not in sampling_params_kwargs(s, 1, engine_vocab_size=500)  # nothing padded
    assert "logit_bias" not in sampling_params_kwargs(s, 1)  # engine width unknown: the pure sampling dict
    assert "logit_bias" not in sampling_params_kwargs(_sampling(1.0), 1, engine_vocab_size=512)  # no vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        sampling_params_kwargs(s, 1, engine_vocab_size=500 + 1025)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_sampling_params_kwargs_build_sampling_params():
    from vllm import SamplingParams

    p = SamplingParams(**sampling_params_kwargs(_sampling(0.7), 1234))
    assert p.seed == 1234 and p.stop_token_ids == [2, 5] and p.max_tokens == 48 and p.temperature == 0.7


# --- streamed weights -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_path(tmp_path_factory) -> str:
    from trainers.tiny import build_tiny_pair

    _, student = build_tiny_pair(tmp_path_factory.mktemp("vllm_backend_tiny"))
    return str(student)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _lora(path, **cfg):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_load(path), LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM", **cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:  # lora_B starts at zero: make every delta count
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _adapted_names(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {f"{n}.weight" for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def test_plain_model_streams_its_state_dict_without_copies(student_path):
    model = _load(student_path)
    sd = model.state_dict()
    streamed = list(iter_merged_weights(model))
    assert [n for n, _ in streamed] == list(sd)
    for name, t in streamed:
        assert t.data_ptr() == sd[name].data_ptr()  # the model's own tensors
    assert [n for n, _ in iter_merged_weights(model, skip_tied=True)] == [k for k in sd if k != "lm_head.weight"]
    half = dict(iter_merged_weights(model, torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in half.values())


@pytest.mark.parametrize("cfg", [
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True},
    {"target_modules": ["q_proj", "o_proj"], "modules_to_save": ["input_layernorm"]},
], ids=["all-linear", "lora-bias", "modules-to-save"])
def test_lora_stream_equals_merge_and_unload(student_path, cfg):
    model = _lora(student_path, **cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain_keys = list(_load(student_path).state_dict())
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert list(expected) == plain_keys

    streamed = dict(iter_merged_weights(model))
    assert list(streamed) == plain_keys  # the plain transformers names, same order
    for name in plain_keys:
        assert streamed[name].dtype == expected[name].dtype
        torch.testing.assert_close(streamed[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    plain = _load(student_path).state_dict()
    adapted = _adapted_names(model)
    assert adapted and all(not torch.equal(streamed[n], plain[n]) for n in adapted)  # the deltas are in

    # the training model is left as it was: nothing merged into it, adapters still active
    assert not any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "merged_adapters"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lora_stream_in_engine_dtype(student_path):
    model = _lora(student_path, target_modules="all-linear")
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    streamed = dict(iter_merged_weights(model, torch.bfloat16))
    for name, t in streamed.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t, expected[name].to(torch.bfloat16), msg=name)


def test_disabled_adapters_stream_the_base_weights(student_path):
    model = _lora(student_path, target_modules="all-linear")
    plain = _load(student_path).state_dict()
    with model.disable_adapter():
        streamed = dict(iter_merged_weights(model))
    assert list(streamed) == list(plain)
    for name, t in streamed.items():
        torch.testing.assert_close(t, plain[name], rtol=0, atol=0)


def test_lora_merges_one_weight_at_a_time(student_path, monkeypatch):
    """A consumer that drops each tensor never has two merged weights alive: when the generator starts merging
    a layer, no earlier merged weight is referenced any more (by the consumer or by the generator itself)."""
    import trainers.models as vb

    model = _lora(student_path, target_modules="all-linear")
    adapted = _adapted_names(model)
    refs: list[weakref.ref] = []
    alive_at_merge: list[int] = []
    merge = vb._merged_lora_weight

    def counting_merge(module, dtype):
        alive_at_merge.append(sum(r() is not None for r in refs))
        out = merge(module, dtype)
        refs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(vb, "_merged_lora_weight", counting_merge)
    peak, seen = 0, 0
    for name, t in iter_merged_weights(model, torch.bfloat16, skip_tied=True):  # as VllmGenerator consumes it
        seen += name in adapted
        peak = max(peak, sum(r() is not None for r in refs))
        del t
    assert seen == len(adapted) == len(alive_at_merge) > 4  # every adapted weight merged once
    assert alive_at_merge == [0] * len(adapted)  # none alive when the next merge starts
    assert peak == 1
    assert all(r() is None for r in refs)

    # control: a consumer that keeps them (as a full merged state dict does) has them all alive
    refs.clear()
    alive_at_merge.clear()
    kept = dict(iter_merged_weights(model, torch.bfloat16))
    assert alive_at_merge == list(range(len(adapted))) and len(kept) > len(adapted)


def test_module_imports_without_vllm_and_constructor_says_why():
    if HAS_VLLM:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match="vllm"):
        VllmGenerator("unused", seed=0, max_model_len=128, gpu_memory_utilization=0.2)
    with pytest.raises(ValueError):
        VllmGenerator("unused", seed=0, max_model_len=128, gpu_memory_utilization=0.0)


# --- the engine (CUDA + vllm) -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (vLLM engine)")
@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm installed (0.22 - 0.31, see trainers/vllm_backend.py)")
def test_vllm_generator_is_reproducible_and_follows_the_weights(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainers.generation import sampling_for
    from trainers.tiny import build_model, build_tokenizer, synthetic_corpus

    tok = build_tokenizer(synthetic_corpus(), tmp_path / "tok")
    path = tmp_path / "student"
    base = build_model(tok, path, hidden_size=128, layers=2, heads=2, kv_heads=1, seed=3)  # head_dim 64
    # embedding padding past the tokenizer, with rows large enough to win every draw unless masked
    base.resize_token_embeddings(len(tok) + 64)
    with torch.no_grad():
        base.get_input_embeddings().weight[len(tok):] = torch.randn(64, 128) * 50
    base.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    assert model.config.vocab_size == len(tok) + 64
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tom has {a} apples and buys {b}."}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]] * 2  # duplicates: distinct seeds, distinct samples
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    sampled = sampling_for(tok, model, max_new_tokens=24, temperature=1.0, seed=17)
    greedy = sampling_for(tok, model, max_new_tokens=24, temperature=None, seed=17)

    gen = VllmGenerator(str(path), seed=17, max_model_len=256, gpu_memory_utilization=0.2)
    try:
        a = gen.generate(model, prompts, sampled, step=1)
        b = gen.generate(model, prompts, sampled, step=1)
        assert a == b  # same step, same weights: the same samples (per-request seeds)
        assert all(0 < len(c) <= 24 for c in a)
        assert max(t for c in a for t in c) < len(tok)  # padded ids never sampled
        assert sampled.vocab_size == len(tok) and gen.vocab_size == len(tok) + 64
        assert gen.generate(model, prompts, sampled, step=2) != a  # another step, other seeds
        assert a[:4] != a[4:]  # the same prompt twice in one step gets two seeds
        if hasattr(gen.llm.llm_engine, "is_sleeping"):
            assert gen.llm.llm_engine.is_sleeping()  # asleep after generate: memory free for backward
        assert model.training

        g1 = gen.generate(model, prompts, greedy, step=1)
        assert max(t for c in g1 for t in c) < len(tok)
        with torch.no_grad():
            saved = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn_like(p) * 0.5)
        g2 = gen.generate(model, prompts, greedy, step=1)
        assert g2 != g1  # the engine samples from the weights pushed now
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        assert gen.generate(model, prompts, greedy, step=1) == g1  # and not from a stale copy
        assert gen.generate(model, prompts, greedy, step=1, stop=lambda: True) == [[] for _ in prompts]
    finally:
        gen.close()
