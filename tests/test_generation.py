"""Sampling: the gear's settings only (never the checkpoint's generation_config.json), the template's
end-of-turn token in the stop set, padded vocabulary rows never sampled."""

from __future__ import annotations

import shutil

import torch

from trainers.generation import (
    Sampling,
    cut_at_stop,
    end_of_turn_id,
    hf_generate,
    request_seeds,
    sampling_for,
    stop_ids,
)
from trainers.models import load_causal_lm, load_tokenizer

CPU = torch.device("cpu")
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def _sample(model, sampling, seed=3):
    return hf_generate(model, PROMPTS, sampling, device=CPU, seeds=request_seeds(seed, 1, len(PROMPTS)))


def test_checkpoint_generation_config_is_never_applied(tiny_models, tmp_path):
    """A student whose generation_config.json asks for repetition_penalty/top_k/top_p samples exactly as
    the same weights without them; the control shows those fields would change the samples."""
    from transformers import GenerationConfig

    student = tiny_models[1]
    odd = tmp_path / "odd"
    shutil.copytree(student, odd)
    GenerationConfig(repetition_penalty=3.0, top_k=2, top_p=0.5, do_sample=True,
                     eos_token_id=load_tokenizer(student).eos_token_id).save_pretrained(odd)
    plain_model = load_causal_lm(student, CPU, torch.float32, trainable=False)
    odd_model = load_causal_lm(str(odd), CPU, torch.float32, trainable=False)
    assert odd_model.generation_config.repetition_penalty == 3.0
    tok = load_tokenizer(student)
    sampling = sampling_for(tok, plain_model, max_new_tokens=12, temperature=1.0)
    assert _sample(plain_model, sampling) == _sample(odd_model, sampling)
    greedy = sampling_for(tok, plain_model, max_new_tokens=12, temperature=None)
    assert _sample(plain_model, greedy) == _sample(odd_model, greedy)
    assert odd_model.generation_config.repetition_penalty == 3.0  # left as it was (saved with final/)

    # control: left to transformers, the checkpoint's settings do change the samples
    def raw(model):
        torch.manual_seed(3)
        ids = torch.tensor([PROMPTS[0]] * 4)
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True,
                              pad_token_id=tok.pad_token_id).tolist()

    assert raw(plain_model) != raw(odd_model)


def test_stop_set_has_the_templates_end_of_turn(tiny_models):
    """A base checkpoint whose EOS is <|endoftext|> but whose ChatML template ends turns with <|im_end|>."""
    tok = load_tokenizer(tiny_models[1])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|endoftext|>"
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_id(tok) == im_end
    assert set(stop_ids(tok)) == {eot, im_end}
    rows = [[10, 11, im_end, 40, 50], [30, eot, 90], [70, 80]]
    assert cut_at_stop(rows, stop_ids(tok)) == [[10, 11, im_end], [30, eot], [70, 80]]

    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no end-of-turn token at all
    assert end_of_turn_id(tok) is None and stop_ids(tok) == (eot,)


def test_padded_vocabulary_rows_are_never_sampled(tiny_models):
    """Embedding rows past the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936/152,064) are masked even
    when their logits win."""
    model = load_causal_lm(tiny_models[1], CPU, torch.float32, trainable=False)
    tok = load_tokenizer(tiny_models[1])
    n = len(tok)

    def last_row_wins(module, args, output):  # the last real row wins everywhere; then pretend it is padding
        output.logits[..., n - 1] += 1000.0
        return output

    model.register_forward_hook(last_row_wins)
    free = Sampling(max_new_tokens=6, temperature=None, stop_ids=(), pad_id=tok.pad_token_id, vocab_size=None)
    assert all(t == n - 1 for row in _sample(model, free) for t in row)
    limited = Sampling(max_new_tokens=6, temperature=1.0, stop_ids=(), pad_id=tok.pad_token_id, vocab_size=n - 1)
    assert all(t < n - 1 for row in _sample(model, limited) for t in row)


def test_checkpointing_switches_the_real_mechanism(tiny_models):
    """set_activation_checkpointing uses activation_checkpointing_* where transformers has it (>= 5.19) and
    gradient_checkpointing_* otherwise (5.17/5.18, a stock CUDA image; not installed here, and in
    5.19+ the old names call the new ones, so only the new path runs in this test)."""
    from trainers.generation import activation_checkpointing, set_activation_checkpointing

    model = load_causal_lm(tiny_models[1], CPU, torch.float32, trainable=True)
    set_activation_checkpointing(model, True)
    assert activation_checkpointing(model) and model.model.gradient_checkpointing
    set_activation_checkpointing(model, False)
    assert not activation_checkpointing(model) and not model.model.gradient_checkpointing


def test_a_sampled_row_depends_on_its_seed_not_on_its_batch(tiny_models):
    """Each row's noise comes from its own seed (Gumbel-max), so a prompt sampled alone or in a batch, at any
    position, gives the same completion: what lets several ranks sample what one process samples."""
    model = load_causal_lm(tiny_models[1], CPU, torch.float32, trainable=False)
    tok = load_tokenizer(tiny_models[1])
    sampling = sampling_for(tok, model, max_new_tokens=12, temperature=1.0)
    seeds = request_seeds(5, 1, len(PROMPTS))
    together = hf_generate(model, PROMPTS, sampling, device=CPU, seeds=seeds)
    alone = [hf_generate(model, [p], sampling, device=CPU, seeds=[s])[0] for p, s in zip(PROMPTS, seeds, strict=True)]
    reordered = hf_generate(model, PROMPTS[::-1], sampling, device=CPU, seeds=seeds[::-1])[::-1]
    assert together == alone == reordered
    assert together != hf_generate(model, PROMPTS, sampling, device=CPU, seeds=request_seeds(6, 1, len(PROMPTS)))
