"""Small models built offline: a byte-level BPE tokenizer trained with `tokenizers` and
Qwen2-architecture teacher/student models sharing its vocabulary. Used by the tests, the
benchmarks and the demo; nothing is ever downloaded."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 512, *,
                    individual_digits: bool = False):
    """Train a byte-level BPE tokenizer on ``corpus`` and save it as a HF fast tokenizer.

    ``individual_digits`` splits every number into single digits (one token each), which is what
    lets a small model learn arithmetic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if individual_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.padding_side = "left"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return hf


def build_model(tokenizer, out_dir: str | Path, *, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                kv_heads: int = 1, intermediate_size: int | None = None, max_position_embeddings: int = 1024,
                seed: int = 0, vocab_size: int | None = None):
    """A randomly initialised Qwen2 causal LM over ``tokenizer``'s vocabulary, saved with it.
    ``vocab_size`` larger than the tokenizer pads the embeddings (as Qwen2.5 does)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Arithmetic word-problem text in ChatML, enough to give the BPE sensible merges."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(
            f"<|im_start|>system\nTask: Tom has {a} apples and buys {b} more. How many apples?<|im_end|>\n"
            f"<|im_start|>assistant\n{a} + {b} = {a + b}. Final Answer: {a + b}<|im_end|>\n"
        )
    return lines


def build_tiny_pair(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Tokenizer + a ~100k-parameter student and a slightly larger teacher. Returns (teacher, student)."""
    out = Path(out_dir)
    tok = build_tokenizer(synthetic_corpus(seed=seed), out / "tokenizer")
    teacher, student = out / "teacher", out / "student"
    build_model(tok, teacher, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=seed + 1)
    build_model(tok, student, hidden_size=32, layers=2, heads=2, kv_heads=1, seed=seed + 2)
    return teacher, student
