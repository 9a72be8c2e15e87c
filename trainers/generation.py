"""Sampling: one configuration for every backend, the stop set, and HF ``generate``.

Every backend (HF ``generate`` here, vLLM in ``trainers.vllm_backend``) samples from exactly
softmax(logits / temperature) over the whole vocabulary: the ``Sampling`` below is the only source
of settings. A checkpoint's own ``generation_config.json`` (``repetition_penalty``, ``top_k``,
``top_p``, ``min_p``...) is never applied: transformers would fill every field we leave unset
from it, so ``hf_generate`` swaps in a blank config for the call.

The stop set is the tokenizer's EOS, the checkpoint's ``generation_config.eos_token_id``(s) and
the chat template's end-of-turn token (a base checkpoint with a ChatML template ends turns with
``<|im_end|>``, not its EOS).

Seeds: sampled row ``i`` of optimizer step ``step`` draws its randomness from
``request_seeds(seed, step, n)[i]`` alone, in every backend (vLLM: the request's seed; HF: a
per-row generator feeding the Gumbel-max trick), so a completion is a function of (seed, step,
position in the step's global batch) and never of the batch it was generated in: a resumed run, and
a run split over several processes (``trainers.distributed``), sample what one uninterrupted
process samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

PAD_MULTIPLE = 64  # CUDA static cache: prompts are left-padded to a multiple of this to bound recompiles
_MARKER = "ATLASD_END_OF_TURN_PROBE"


@dataclass(frozen=True)
class Sampling:
    """What every backend needs to sample completions the same way."""

    max_new_tokens: int
    temperature: float | None  # None: greedy
    stop_ids: tuple[int, ...]
    pad_id: int
    seed: int | None = None  # vLLM: per-request seeds derived from it; HF: the caller seeds torch
    vocab_size: int | None = None  # ids at or past this (embedding padding) are never sampled


def request_seeds(seed: int, step: int, n: int) -> list[int]:
    """Per-row seeds of optimizer step ``step``: a hash of (seed, step, i), in [0, 2**63) (vLLM keeps
    request seeds as int64). Deterministic across processes and Python versions."""
    out = []
    for i in range(n):
        digest = hashlib.sha256(f"atlasd/vllm/{int(seed)}/{int(step)}/{i}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return out


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message, if any."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARKER}], tokenize=False)
    except Exception:  # noqa: BLE001  (a template that refuses this shape has no detectable end of turn)
        return None
    if _MARKER not in text:
        return None
    suffix = text.split(_MARKER, 1)[1]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids[0] if ids[0] in special else None


def stop_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """Tokenizer EOS + the checkpoint's generation EOS id(s) + the template's end-of-turn token."""
    ids: list[int | None] = [tokenizer.eos_token_id]
    if generation_config is not None:
        eos = generation_config.eos_token_id
        ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ids.append(end_of_turn_id(tokenizer))
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def sampling_for(tokenizer, model, *, max_new_tokens: int, temperature: float | None,
                 seed: int | None = None) -> Sampling:
    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                    stop_ids=stop_ids(tokenizer, getattr(model, "generation_config", None)),
                    pad_id=tokenizer.pad_token_id, seed=seed, vocab_size=len(tokenizer))


def pad_left(seqs: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def cut_at_stop(rows: list[list[int]], stop: tuple[int, ...] | list[int]) -> list[list[int]]:
    """Each completion up to and including its first stop token."""
    stop = set(stop)
    out = []
    for row in rows:
        end = next((i for i, tok in enumerate(row) if tok in stop), None)
        out.append(row if end is None else row[: end + 1])
    return out


def activation_checkpointing(model) -> bool:
    """Activation (gradient) checkpointing is on (transformers >= 5.19 name, else the older one)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def set_activation_checkpointing(model, on: bool) -> None:
    """Activation checkpointing on/off: ``activation_checkpointing_*`` (transformers >= 5.19) or
    ``gradient_checkpointing_*`` (every 5.x, deprecated from 5.19)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


class _VocabLimit:
    """A logits processor that rules out the embedding rows past the tokenizer (padding)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.size:
            scores[:, self.size:] = -float("inf")
        return scores


class _GumbelMax:
    """A logits processor that samples from softmax(scores / temperature) by the Gumbel-max trick
    (``argmax(scores / T + G)``, G standard Gumbel; ``generate`` then picks greedily), each row's noise
    from its own seeded generator: one vocabulary-wide draw per row per decoding step."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float32)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores.float() / self.temperature + gumbel


class _StopOn:
    """A generation stopping criterion that ends decoding when a stop was requested (SIGTERM)."""

    def __init__(self, flag: Callable[[], bool]):
        self.flag = flag

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.flag(), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], sampling: Sampling, *, device,
                stop: Callable[[], bool] | None = None, seeds: list[int] | None = None,
                sharded: bool = False) -> list[list[int]]:
    """One batched, KV-cached ``generate`` call (static cache + compiled decode on CUDA). Returns the
    completions cut after their first stop token. The model is in eval mode for the call.

    ``seeds``: one per prompt (``request_seeds``), required unless greedy. ``sharded``: the model is
    FSDP-sharded across the process group (``trainers.distributed``): every rank must call this
    together; decoding runs until every rank's rows are done (``synced_gpus``), with a dynamic cache."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    cuda = torch.device(device).type == "cuda"
    ids, mask = pad_left(prompts, sampling.pad_id, PAD_MULTIPLE if cuda else 1)
    greedy = sampling.temperature is None
    if not greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    cfg = GenerationConfig(  # sampling is _GumbelMax's: generate itself always picks the best token
        max_new_tokens=sampling.max_new_tokens, do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0,
        use_cache=True, cache_implementation="static" if cuda and not sharded else None,
        pad_token_id=sampling.pad_id, eos_token_id=list(sampling.stop_ids),
    )
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model
    gc = activation_checkpointing(hf_model)
    was_training = model.training
    own_config = hf_model.generation_config
    if gc:
        set_activation_checkpointing(hf_model, False)
    model.eval()
    hf_model.generation_config = GenerationConfig()  # nothing inherited from generation_config.json
    try:
        criteria = StoppingCriteriaList([_StopOn(stop)]) if stop else None
        processors = LogitsProcessorList([_VocabLimit(sampling.vocab_size)] if sampling.vocab_size else [])
        if not greedy:
            processors.append(_GumbelMax(seeds, sampling.temperature, device))
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                             stopping_criteria=criteria, logits_processor=processors, synced_gpus=sharded)
    finally:
        hf_model.generation_config = own_config
        if was_training:
            model.train()
        if gc:
            set_activation_checkpointing(hf_model, True)
    return cut_at_stop(out[:, ids.shape[1]:].tolist(), sampling.stop_ids)
