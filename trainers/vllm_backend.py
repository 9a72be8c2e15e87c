"""Student sampling with vLLM inside the training process (TRL's "colocate" mode), for GKD.

Targets **vLLM 0.22.0 - 0.31.0**, the range TRL 1.16 supports (``trl.import_utils.is_vllm_available`` warns
outside it; the source was read at 0.31.0), i.e. the V1 engine only. Note vLLM 0.31.0 itself pins
``torch==2.13.0`` and ``transformers<5.18``: install it in the GPU environment with a transformers it accepts.

How it follows TRL 1.16 (``trl/generation/vllm_generation.py``, ``VLLMGeneration._init_vllm`` /
``sync_weights`` / ``generate``, used by ``DistillationTrainer`` and ``GRPOTrainer`` for
``vllm_mode="colocate"``):

* The engine is built with ``distributed_executor_backend="external_launcher"``, which makes vLLM V1 run its
  engine core and its single worker in this process (vLLM sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` for it; we
  set it too). Only then is ``llm.llm_engine.model_executor.driver_worker.model_runner.model`` reachable, and
  weights are pushed with that model's ``load_weights`` one tensor at a time, as TRL does. ``RANK``,
  ``LOCAL_RANK`` and ``WORLD_SIZE`` are set for a world of one and ``MASTER_ADDR``/``MASTER_PORT`` by TRL's
  ``ensure_master_addr_port``. ``max_num_batched_tokens=4096`` as TRL (vLLM's profiler misjudges the default).
* ``enable_sleep_mode=True``: the engine sleeps at level 2 (weights and KV cache released) except inside
  ``generate``, which wakes the weights, pushes the current student, wakes the KV cache, samples and sleeps
  again, so the backward pass has that memory. Level 2 discards the weights, hence the full push every call
  (``reload_weights`` would reload the checkpoint from disk, not the trained weights).
* PEFT names: ``base_model.model.`` is not in our names (we read the base model's own state dict),
  ``.base_layer`` is dropped and ``lora_*`` entries are skipped, as TRL does.

Where this differs from ``VLLMGeneration`` (which is tied to an ``Accelerator`` and the Trainer's config, so it
is not used directly):

* LoRA: TRL calls ``model.merge_adapter()`` / ``unmerge_adapter()`` on the training weights; in bf16 that round
  trip is lossy, so it drifts the base weights a little at every sync. ``iter_merged_weights`` never touches the
  model: each adapted weight is merged on the fly in fp32 (``base + B @ A * scaling``), cast to the engine
  dtype and yielded, one layer at a time (no full copy of the adapted weights).
* Seeds: TRL gives every request the same sampling parameters (one engine seed per process). Here request ``i``
  of optimizer step ``step`` gets ``request_seeds(seed, step, n)[i]``, so a run resumed at step k samples what
  the uninterrupted run sampled.
* Sampling: only ``trainers.generation.Sampling`` decides (softmax(logits / T) over the whole vocabulary, stop
  set = ``sampling.stop_ids`` exactly); nothing from the checkpoint's ``generation_config.json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from trainers.generation import Sampling, cut_at_stop, request_seeds
from trainers.models import iter_merged_weights

VLLM_MIN, VLLM_MAX = "0.22.0", "0.31.0"  # what TRL 1.16 supports (trl.import_utils.is_vllm_available)
MAX_NUM_BATCHED_TOKENS = 4096  # as TRL colocate
MAX_MASKED_IDS = 1024  # vLLM model runner V2: at most this many logit_bias entries per request


# --- sampling parameters (pure) ----------------------------------------------------------------
def sampling_params_kwargs(sampling: Sampling, seed: int, *, engine_vocab_size: int | None = None) -> dict:
    """``vllm.SamplingParams`` keyword arguments: the distribution and stop set of ``sampling`` only.

    ``engine_vocab_size``: the width of the engine's logits (``model_config.get_vocab_size()``); the ids from
    ``sampling.vocab_size`` up to it (embedding padding past the tokenizer) get a -inf logit bias, as
    ``hf_generate`` masks them."""
    if sampling.temperature is not None and not sampling.temperature > 0:
        raise ValueError(f"temperature must be > 0, or None for greedy; got {sampling.temperature}")
    kwargs = {
        "n": 1,
        "temperature": 0.0 if sampling.temperature is None else float(sampling.temperature),  # 0: greedy
        "top_k": -1,
        "top_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": int(sampling.max_new_tokens),
        "min_tokens": 0,
        "stop_token_ids": list(sampling.stop_ids),
        # The stop set is exactly ``stop_ids`` (which holds the tokenizer's EOS): without ignore_eos vLLM adds the
        # checkpoint's EOS and generation_config eos ids on its own. It does not mask EOS, only stops on it.
        "ignore_eos": True,
        "seed": int(seed),
        "detokenize": False,  # token ids only; no stop strings
    }
    vocab = getattr(sampling, "vocab_size", None)
    if vocab is not None and engine_vocab_size is not None and engine_vocab_size > vocab:
        if engine_vocab_size - vocab > MAX_MASKED_IDS:
            raise ValueError(f"{engine_vocab_size - vocab} padded vocabulary ids to mask; vLLM takes at most "
                             f"{MAX_MASKED_IDS} logit_bias entries per request")
        # allowed_token_ids would list the whole vocabulary, past the 1024 ids model runner V2 accepts
        kwargs["logit_bias"] = dict.fromkeys(range(vocab, engine_vocab_size), float("-inf"))
    return kwargs


# --- the engine ----------------------------------------------------------------------------------
def _single_process_env() -> None:
    """What ``external_launcher`` reads: a torch.distributed world of one, on this process's CUDA device."""
    from trl.trainer.utils import ensure_master_addr_port

    world = os.environ.get("WORLD_SIZE")
    if world not in (None, "", "1"):
        raise RuntimeError(f"VllmGenerator runs one engine in one process; WORLD_SIZE={world}")
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    os.environ["LOCAL_RANK"] = str(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # external_launcher sets it as well
    ensure_master_addr_port()  # TRL: MASTER_ADDR=localhost, a free MASTER_PORT unless one is set


class VllmGenerator:
    """Student sampling with an in-process vLLM engine (``optim.generation_backend = "vllm"``, CUDA only).

    The engine sleeps (level 2: no weights, no KV cache on the GPU) except during ``generate``, which pushes the
    current weights of the student (LoRA merged on the fly) before sampling."""

    def __init__(self, model_path: str, *, seed: int, max_model_len: int, gpu_memory_utilization: float,
                 dtype: str = "bfloat16"):
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        from trl.import_utils import is_vllm_available  # warns outside the vLLM versions TRL supports

        if not is_vllm_available():
            raise ImportError(f"the vLLM generation backend needs vllm ({VLLM_MIN} - {VLLM_MAX}) installed")
        from vllm import LLM  # noqa: PLC0415  (optional dependency)

        _single_process_env()
        self.seed = int(seed)
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            seed=self.seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",  # V1 engine in this process (TRL colocate)
            enable_sleep_mode=True,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
            generation_config="vllm",  # vLLM's neutral defaults, never the checkpoint's generation_config.json
        )
        self.dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        self.vocab_size: int = self.llm.llm_engine.model_config.get_vocab_size()  # width of the logits
        self.llm.sleep(level=2)  # until the first generate: the checkpoint's weights are replaced then anyway

    def _engine_model(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as e:  # a multiprocess engine has no model_executor in this process
            raise RuntimeError("the vLLM engine is not in this process (external_launcher / "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0 not in effect)") from e

    def push_weights(self, model) -> int:
        """Load the current weights of ``model`` into the (awake) engine, one tensor at a time. Returns the
        number of tensors pushed."""
        engine_model = self._engine_model()
        n = 0
        with torch.no_grad():
            for name, tensor in iter_merged_weights(model, self.dtype, skip_tied=True):
                engine_model.load_weights([(name, tensor)])  # as TRL colocate: one (name, tensor) per call
                del tensor
                n += 1
        return n

    def generate(self, model, prompts: list[list[int]], sampling: Sampling, *, step: int,
                 stop: Callable[[], bool] | None = None) -> list[list[int]]:
        """Wake the engine, push the weights of ``model``, sample one completion per prompt (request ``i`` seeded
        with ``request_seeds(sampling.seed, step, n)[i]``; the engine seed if ``sampling.seed`` is None), cut
        each after its first stop token and put the engine back to sleep. ``stop``: if it is already set, nothing
        is generated (empty completions); one that arrives during the call takes effect when the batch ends (a
        vLLM batch is not interrupted)."""
        from vllm import SamplingParams  # noqa: PLC0415

        if stop is not None and stop():
            return [[] for _ in prompts]
        if not prompts:
            return []
        base_seed = self.seed if sampling.seed is None else sampling.seed
        params = [SamplingParams(**sampling_params_kwargs(sampling, s, engine_vocab_size=self.vocab_size))
                  for s in request_seeds(base_seed, step, len(prompts))]
        torch.cuda.empty_cache()  # as TRL before waking: the caching allocator may hold what vLLM needs
        self.llm.wake_up(tags=["weights"])
        self.push_weights(model)
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # cached KV was computed with the previous weights
        try:
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        finally:
            self.llm.sleep(level=2)  # KV cache and weights released for the backward pass
        return cut_at_stop([list(o.outputs[0].token_ids) for o in outs], sampling.stop_ids)

    def close(self) -> None:
        """Shut the engine down and release its GPU memory and the torch.distributed group it created."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm, core
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: PLC0415

        cleanup_dist_env_and_memory()

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
