"""A memory plan for a run spec, before any model is loaded (``python -m trainers plan SPEC.json``).

Model sizes come from the two ``config.json`` files only: each model is instantiated on the meta
device (``accelerate.init_empty_weights`` + ``AutoModelForCausalLM.from_config``; no weights are
read), parameters are counted exactly (tied embeddings once) and the shapes (layers L, hidden H,
query width Hq = heads x head_dim, MLP width I, vocabulary V) are read from the config.
GB in this module means GiB (2^30 bytes), the unit torch and nvidia-smi report (an "80 GB" H100
has 79.6 GiB).

What the trainer (``trainers.gkd``, ``trainers.models``) holds, in bytes, with P = student
parameters, p = trained parameters (P, or the LoRA adapters), Pt = teacher parameters:

- **static** (the whole run): student weights (full fine-tuning: fp32 masters, 4P; LoRA: frozen
  base in the frozen dtype, 2P under bf16-mixed / 4P under fp32, + 4p of fp32 adapters); teacher
  weights (2Pt / 4Pt); optimizer state (AdamW 8p, torchao AdamW8bit ~2p: 1-byte codes + one fp32
  scale per 256 values, tensors under 4096 values or not in whole blocks stay fp32).
- on top of that, the largest of seven **moments** of an optimizer step (``MemoryPlan.moments``; the
  table's "when" column says which parts each one holds):
  - *generation* (the student samples): one batched HF ``generate`` for all bs x accumulation
    prompts: KV cache of 2 x layers x batch x kv_heads x head_dim x cache_len (cache_len =
    max_length; on CUDA the prompt is padded to a multiple of 64, static cache), in the dtype of the
    residual stream (fp32 for a full fine-tune even under bf16-mixed: its embeddings are fp32
    masters; bf16 for a bf16 base), the prefill working set of one layer over all prompt tokens, and
    the autocast weight cache. With ``generation_backend: vllm`` instead: the engine's share,
    ``vllm_gpu_memory_utilization`` x device total (its weights + KV cache; it sleeps at level 2,
    holding nothing, outside ``generate``), plus the one-tensor-at-a-time weight push;
  - *teacher generation* (``seq_kd``): the same HF sampler for the teacher (bf16 KV cache);
  - *teacher forward* (no grad, one micro-batch of bs x max_length tokens): one layer's working set
    and the last hidden states, plus the gradients accumulated so far;
  - *student forward* (end of the loss forward): gradients (4p, fp32; all of them from the 2nd
    micro-batch on when accumulating), the autocast weight cache (bf16-mixed full fine-tuning: a bf16
    copy of every decoder Linear weight, 2 B each, alive until autocast exits; without checkpointing
    the copies are saved for backward and live on into it), the teacher's hidden states at the
    N = bs x max_new_tokens completion positions, the activations and the loss forward;
  - *loss backward*: the same with the loss backward's buffers instead;
  - *layer backward* (checkpointing only; without it the backward only frees memory after the loss):
    gradients, the kept layer inputs, one recomputed layer and its gradients' transients;
  - *optimizer step*: gradients + the optimizer's temporaries (fused AdamW on CUDA: none; torch's
    per-tensor AdamW on CPU: ~2 copies of the largest tensor; AdamW8bit: ~3 fp32 copies of it, an
    estimate: torchao's 8-bit step does not run on CPU here to measure it).

**Activations** (``sdpa`` attention, so no seq^2 term except the attention mask; T = bs x
max_length tokens, S = max_length). Saved tensors per token per decoder layer of a Llama/Qwen2
block, with e = 2 (bf16-mixed) or 4 (fp32) the compute dtype and padded batches (then k and v are
repeated to all heads before ``scaled_dot_product_attention``, so both count Hq):

- full fine-tuning: two RMSNorms save their input and the normalised input (2 x 2 x 4H: the
  residual stream is fp32 master-weight output even under autocast); the Linear inputs (fp32: the
  two norm outputs 2 x 4H; bf16-mixed: autocast casts the input once per Linear, q/k/v and gate/up:
  5 x 2H); attention q, k, v, output e x 4Hq + the float mask e x S + log-sum-exp; MLP gate, act,
  up, down-input e x 4I.  fp32: 24H + 16Hq + 16I + 4S; bf16-mixed: 26H + 8Hq + 8I + 2S bytes.
- LoRA (frozen base: its Linears save no input): the norms keep one fp32 copy of their input
  (2 x 4H); attention e x 4Hq + e x S; MLP gate, act, up e x 3I; each adapted Linear of input
  width n saves its dropout mask (1 B/value on CUDA, an fp32 noise tensor on CPU) and the input of
  ``lora_A`` (e x n), and r values of ``lora_A``'s output.
- under LoRA the first layer's input needs no gradient: its input norm and q/k/v dropouts save nothing.
- gradient checkpointing: each layer keeps only its input (H values in the stream dtype), and one
  layer is recomputed at a time in backward (its full saved set + ~2I + 2H of gradient transients).
- outside the layers: the final norm, rotary cos/sin, ids, and the N selected hidden states.

**Loss** (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``): forward: two fp32 tile
buffers of min(N, 4096) x 32768 (always allocated at full width); backward: the same two, an fp32
grad of the hidden states (N x H) and, for a trained head, an fp32 grad of the lm_head (V x H), which
the ``weight[:vocab]`` slice copies once more into a full-size gradient. On CUDA the tiles are folded
by Triton kernels; on CPU the torch fallback makes a few tile-sized temporaries, counted below
(``CPU_FOLD_TEMPS_*``, measured: 7 in the forward, 10 in the backward). On CUDA under bf16-mixed the
fp32 head is cast to bf16 one 32768-row chunk at a time, and in backward each tile once more to bf16.

**Checked** against the live tensor bytes of real trainer steps on CPU (tests/test_plan.py: fp32 and
bf16-mixed autocast, LoRA, checkpointing): the totals are within 1-2 %, each moment within a few %.

**Several GPUs** (``optim.num_gpus``, ``trainers.distributed``; the plan is per GPU, every GPU alike): the
student's fp32 weights, gradients and AdamW state are sharded over the N ranks by FSDP2 (/N each), and so
are the teacher's weights (/N, in their dtype; no gradients, no optimizer state); each rank samples, and
runs forward and backward on, its own ``per_device_train_batch_size x gradient_accumulation_steps``
examples, so the activations, the sampler and the loss are those of one GPU. On top, what FSDP2 gathers:
for the student, the root's parameters (embeddings, final norm and head) for a whole forward and backward
and about three layers' fp32 parameters or gradients at once (the current layer, the prefetched one and
one gradient before its reduce-scatter); for the teacher, its root's parameters (the same three, in its
dtype) around each micro-batch (its forward, and the loss forward and backward that read its head) and
each teacher sample, and about three of its layers at once in its forward (the current one, its
all-gather buffer, the next one's). Two more moments: *loading*, where each rank holds the whole fp32
student and the whole teacher before sharding them (both are loaded whole on every rank; rank 0 evaluates
the starting student then; the optimizer state counted static is not allocated yet), and *final
evaluation*, where the teacher is gathered whole again on every rank and rank 0 reloads ``final/`` to
evaluate it (counted in the frozen dtype; the student's shards and optimizer state, freed by then, are
still counted; the evaluation's sampler is not). The autocast weight cache is not sharded (autocast keeps a bf16 copy of
each gathered Linear weight until the forward ends). This part of the plan is a paper estimate: it is not
checked against a measurement (CPU ranks share one memory, and no GPU has run it yet).

**Safety margin**: a run fits when the peak is at most ``free - 5 % of total - 1 GB``: the 5 %
covers allocator fragmentation and library workspaces (cuBLAS, Triton autotuning, CUDA graphs of the
compiled decode), the 1 GB the CUDA context and kernels (on CPU: the Python process and libraries).
``ATLASD_DEVICE_MEMORY_GB`` overrides the device's free and total memory (tests, or a DGX Spark whose
unified memory the driver misreports).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from atlasd.runspec import LoraSettings, RunSpec
from trainers.run import BadSpec

GiB = 2**30
SAFETY_FRACTION = 0.05  # of the device's total memory
RESERVE_BYTES = 1 * GiB  # CUDA context and kernels (CPU: the process itself)
ENV_MEMORY = "ATLASD_DEVICE_MEMORY_GB"
TOKEN_CHUNK_SIZE = 4096  # = trl.kernels.chunked_divergence.TOKEN_CHUNK_SIZE
VOCAB_CHUNK_SIZE = 32768  # = trl.kernels.chunked_divergence.VOCAB_CHUNK_SIZE
PAD_MULTIPLE = 64  # = trainers.generation.PAD_MULTIPLE (CUDA static cache)
# Tile-sized temporaries of TRL's torch fallback on CPU (no Triton), measured on torch 2.13 / trl 1.16:
# at their peaks the forward's JSD fold and the backward's fold hold this many (rows x chunk) fp32 tensors.
CPU_FOLD_TEMPS_FORWARD = 7
CPU_FOLD_TEMPS_BACKWARD = 10
AO_MIN_QUANT_SIZE = 4096  # torchao AdamW8bit keeps smaller tensors' state in fp32
AO_BLOCK_SIZE = 256  # one fp32 scale per block of 256 values
LORA_LR_FACTOR = 10  # LoRA typically needs ~10x the full fine-tuning learning rate
TIGHT_FRACTION = 0.03  # a fit with less than this share of the device to spare is reported as tight

MOMENTS = ("loading", "generation", "teacher generation", "teacher forward", "student forward", "loss backward",
           "layer backward", "optimizer step", "final evaluation")
_SHORT = {"loading": "load", "generation": "gen", "teacher generation": "teacher-gen", "teacher forward": "teacher",
          "student forward": "fwd", "loss backward": "loss-bwd", "layer backward": "layer-bwd",
          "optimizer step": "step", "final evaluation": "eval"}


class PlanError(BadSpec):
    """The plan cannot be made: a model's config cannot be read, or no memory size is known (exit 2)."""


class PlanRefused(BadSpec):
    """The run does not fit the device. The message is the formatted plan with its ways out; the
    training child exits 2 (``EXIT_BAD_SPEC``) before loading any model."""

    def __init__(self, plan: MemoryPlan):
        super().__init__(format_plan(plan))
        self.plan = plan


# --- model shapes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    source: str
    model_type: str
    n_params: int  # unique parameters (tied embeddings counted once)
    buffer_bytes: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    decoder_linear_params: int  # weights + biases of every nn.Linear except the output layer
    largest_param: int  # values in the largest parameter tensor
    small_params: int  # values in parameter tensors torchao's AdamW8bit keeps in fp32 (see _ao_fp32)
    linears: tuple[tuple[str, int, int], ...] = ()  # (module name, in, out) of every Linear but the head

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def lora_targets(self, lora: LoraSettings) -> list[tuple[str, int, int]]:
        """The Linears PEFT wraps: ``all-linear`` = every Linear but the output layer; a list of names
        matches a module name exactly or as its last dotted part(s)."""
        if lora.target_modules == "all-linear":
            return list(self.linears)
        return [(n, i, o) for n, i, o in self.linears
                if any(n == t or n.endswith("." + t) for t in lora.target_modules)]

    def lora_params(self, lora: LoraSettings) -> int:
        return sum(lora.r * (i + o) for _, i, o in self.lora_targets(lora))

    def layer_lora_inputs(self, lora: LoraSettings) -> list[tuple[str, int]]:
        """(short name, input width) of the adapted Linears of one decoder layer (layer 0's; all are alike)."""
        return [(n.rsplit(".", 1)[-1], i) for n, i, _ in self.lora_targets(lora) if ".layers.0." in f".{n}."]


def _local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def _load_config(source: str, field_name: str):
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if _local(source):
        if not (path / "config.json").is_file():
            raise PlanError(f"{field_name}: {source} is not a Hugging Face model folder (no config.json)")
        target = str(path)
    else:
        target = source
    try:
        return AutoConfig.from_pretrained(target)
    except Exception as exc:  # noqa: BLE001
        offline = " with HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        hint = "" if _local(source) else f" (not a local folder, and not in the Hugging Face cache{offline})"
        raise PlanError(f"{field_name}: cannot read the config of {source!r}{hint}: "
                        f"{type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=16)
def _shape_cached(source: str, field_name: str, stamp: float) -> ModelShape:
    import accelerate
    import torch
    from transformers import AutoModelForCausalLM

    config = _load_config(source, field_name)
    text = config.get_text_config()
    try:
        with accelerate.init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise PlanError(f"{field_name}: cannot build {source!r} from its config "
                        f"({type(exc).__name__}: {exc})") from None
    tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    head = model.get_output_embeddings()
    if tied:
        model.tie_weights()  # init_empty_weights breaks the tie that from_config made
    params = list(model.parameters())  # unique: a tied head is its embedding
    if tied and head is not None and head.weight is not model.get_input_embeddings().weight:
        raise PlanError(f"{field_name}: {source!r} declares tied embeddings that could not be tied on the meta device")
    linears = tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    linear_params = sum(p.numel() for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m is not head for p in m.parameters(recurse=False))
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    return ModelShape(
        source=source, model_type=str(getattr(text, "model_type", "") or config.model_type),
        n_params=sum(p.numel() for p in params),
        buffer_bytes=sum(b.numel() * 4 for b in model.buffers()),
        layers=int(text.num_hidden_layers), hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        vocab=int(text.vocab_size), tied=tied, decoder_linear_params=linear_params,
        largest_param=max(p.numel() for p in params),
        small_params=sum(p.numel() for p in params if _ao_fp32(p.numel())),
        linears=linears,
    )


def _ao_fp32(numel: int) -> bool:
    """torchao AdamW8bit quantises a tensor's state only if it has >= 4096 values in whole blocks."""
    return numel < AO_MIN_QUANT_SIZE or numel % AO_BLOCK_SIZE != 0


def model_shape(source: str, field_name: str = "model") -> ModelShape:
    """The shape of the model at ``source`` (a local folder or a cached hub id), from its config only."""
    path = Path(source).expanduser() / "config.json"
    stamp = path.stat().st_mtime if path.is_file() else 0.0
    return _shape_cached(source, field_name, stamp)


# --- device memory -----------------------------------------------------------------------------
def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def _env_memory() -> int | None:
    raw = os.environ.get(ENV_MEMORY)
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        raise PlanError(f"{ENV_MEMORY}={raw!r} is not a number of GB") from None
    if not gb > 0:
        raise PlanError(f"{ENV_MEMORY}={raw!r} must be positive")
    return int(gb * GiB)


def device_memory(device_type: str) -> tuple[int, int]:
    """(free, total) bytes of the device: CUDA ``torch.cuda.mem_get_info()``, CPU MemAvailable and
    MemTotal of /proc/meminfo; ``ATLASD_DEVICE_MEMORY_GB`` overrides both."""
    env = _env_memory()
    if env is not None:
        return env, env
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise PlanError(f"no CUDA device here to measure: pass --device-memory-gb or set {ENV_MEMORY}")
        free, total = torch.cuda.mem_get_info()
        return int(free), int(total)
    info = _meminfo()
    total = info.get("MemTotal")
    if total is None:
        raise PlanError(f"cannot read MemTotal from /proc/meminfo: set {ENV_MEMORY}")
    return info.get("MemAvailable", info.get("MemFree", total)), total


def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name()
        except Exception:  # noqa: BLE001
            pass
    return ""


def resolve_device_type(spec_device: str) -> str:
    if spec_device != "auto":
        return spec_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- the plan ----------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    bytes: int
    note: str
    when: tuple[str, ...] = ()  # () = static (the whole run); else the moments it is alive in

    @property
    def static(self) -> bool:
        return not self.when


@dataclass
class WayOut:
    change: str  # the spec settings to change
    saves_bytes: int
    total_bytes: int
    fits: bool
    note: str = ""

    def __str__(self) -> str:
        if self.saves_bytes <= 0 and not self.fits:
            return f"{self.change}{': ' + self.note if self.note else ''}"
        verdict = "fits" if self.fits else "still does not fit"
        return (f"{self.change}: saves {_gb(self.saves_bytes)} GB -> {_gb(self.total_bytes)} GB, {verdict}"
                f"{'; ' + self.note if self.note else ''}")


@dataclass
class MemoryPlan:
    device: str  # description
    device_type: str
    precision: str
    gradient_checkpointing: bool
    parts: list[Part]
    static_bytes: int
    moments: dict[str, int]  # moment -> bytes on top of the static parts
    peak_moment: str
    total_bytes: int
    free_bytes: int
    device_total_bytes: int
    available_bytes: int
    fits: bool
    world: int = 1  # GPUs (ranks) the run trains on; the bytes are per GPU
    summary: list[str] = field(default_factory=list)  # what is planned (models, batch), one line each
    ways_out_detail: list[WayOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def layout(self) -> str:
        if self.world == 1:
            return "one device"
        return f"student and teacher sharded over {self.world} ranks (FSDP2)"

    @property
    def ways_out(self) -> list[str]:
        return [str(w) for w in self.ways_out_detail]

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def as_dict(self) -> dict:
        return {
            "fits": self.fits, "device": self.device, "device_type": self.device_type, "ranks": self.world,
            "layout": self.layout, "precision": self.precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "total_gb": _gb(self.total_bytes), "available_gb": _gb(self.available_bytes),
            "free_gb": _gb(self.free_bytes), "device_total_gb": _gb(self.device_total_bytes),
            "static_gb": _gb(self.static_bytes), "peak_moment": self.peak_moment,
            "moments_gb": {k: _gb(v) for k, v in self.moments.items()},
            "parts": [{"name": p.name, "gb": _gb(p.bytes), "when": list(p.when) or ["always"], "note": p.note}
                      for p in self.parts],
            "summary": self.summary,
            "ways_out": [{"change": w.change, "saves_gb": _gb(w.saves_bytes), "total_gb": _gb(w.total_bytes),
                          "fits": w.fits, "note": w.note} for w in self.ways_out_detail],
            "notes": self.notes,
        }


def _gb(n: int | float) -> float:
    return round(n / GiB, 2)


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


@dataclass(frozen=True)
class _Settings:
    device_type: str
    mixed: bool
    lora: LoraSettings | None
    gc: bool
    optimizer: str
    backend: str
    bs: int
    ga: int
    max_length: int
    max_new_tokens: int

    @property
    def e_c(self) -> int:  # compute dtype bytes
        return 2 if self.mixed else 4

    @property
    def e_frozen(self) -> int:  # frozen weights (teacher, LoRA base)
        return 2 if self.mixed else 4

    @property
    def e_stream(self) -> int:  # the student's residual stream: fp32 masters for full FT, else the frozen dtype
        return 4 if self.lora is None else self.e_frozen

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"


def _resolve(spec: RunSpec, device_type: str) -> _Settings:
    o = spec.optim
    precision = o.precision if o.precision != "auto" else ("bf16-mixed" if device_type == "cuda" else "fp32")
    gc = o.gradient_checkpointing
    if gc is None:
        gc = device_type == "cuda" and o.lora is None
    return _Settings(device_type=device_type, mixed=precision == "bf16-mixed", lora=o.lora, gc=gc,
                     optimizer=o.optimizer, backend=o.generation_backend, bs=o.per_device_train_batch_size,
                     ga=o.gradient_accumulation_steps, max_length=o.max_length, max_new_tokens=spec.gkd.max_new_tokens)


_NORM1_READERS = ("q_proj", "k_proj", "v_proj", "qkv_proj")  # read the input norm's output
_NORM2_READERS = ("gate_proj", "up_proj", "gate_up_proj")  # read the post-attention norm's output


def _layer_saved(s: ModelShape, st: _Settings, seq: int, *, lora_inputs: list[tuple[str, int]]) -> float:
    """Bytes saved for backward per token by one decoder layer (see the module docstring)."""
    H, Hq, I = s.hidden, s.q_width, s.intermediate
    e = st.e_c
    kv = Hq  # padded batches: k and v repeated to every query head before sdpa
    attention = (2 * Hq + 2 * kv) * e + 4 * s.heads + seq * e  # q, k, v, output; lse; float mask row
    if st.lora is None:
        norms = 2 * (2 * H * 4 + 4)  # input and normalised input, fp32 (fp32 master residual stream), rsqrt
        linear_inputs = 5 * H * e if st.mixed else 2 * H * 4  # one autocast cast per Linear, or the 2 norm outputs
        return norms + linear_inputs + attention + 4 * I * e
    r = st.lora.r
    norms = 2 * (H * 4 + 4)  # one fp32 copy of the input (the RMSNorm upcast), rsqrt
    per_adapter = 0.0
    for _, width in lora_inputs:
        if st.lora.dropout > 0:
            mask = 1 if st.cuda else 4  # CUDA fused dropout: a bool mask; CPU: an fp32 noise tensor
            per_adapter += width * (mask + e) + r * e  # mask + lora_A's input, lora_A's output
        else:  # bf16-mixed: autocast's bf16 copy of PEFT's fp32 copy of the input, per adapter
            per_adapter += width * (e if st.mixed else 0) + r * e
    if st.lora.dropout == 0 and not st.mixed:  # fp32 without dropout: lora_A saves the shared input itself
        names = {n for n, _ in lora_inputs}
        per_adapter += (H * 4 * bool(names & set(_NORM1_READERS)) + H * 4 * bool(names & set(_NORM2_READERS))
                        + I * 4 * ("down_proj" in names))  # o_proj's input is the attention output, counted
    return norms + attention + 3 * I * e + per_adapter


def _backward_working_set(s: ModelShape, st: _Settings) -> float:
    """Bytes per token of the gradient transients while one layer runs backward (gradients of the MLP
    activations and of the hidden states), beyond its saved tensors."""
    return 2 * s.intermediate * st.e_c + 2 * s.hidden * 4


def _lora_first_layer_saving(s: ModelShape, st: _Settings) -> float:
    """Under LoRA the first layer's input (the frozen embedding's output) needs no gradient: its input
    norm and the dropout of the Linears reading it (q/k/v) save nothing. Bytes per token."""
    if st.lora is None or st.lora.dropout == 0:
        return 0.0
    mask = 1 if st.cuda else 4
    return s.hidden * 4 + 4 + mask * sum(i for n, i in s.layer_lora_inputs(st.lora) if n in _NORM1_READERS)


def _fsdp_units(s: ModelShape) -> tuple[int, int]:
    """Parameters of a model's FSDP2 root (embeddings, head unless tied, final norm) and of one of its
    decoder layers (the rest, split evenly: Llama/Qwen2 layers are alike)."""
    root = s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden
    return root, (s.n_params - root) // max(s.layers, 1)


def _working_set(s: ModelShape, tokens: int, seq: int, batch: int, e_c: int, e_stream: int) -> int:
    """Peak of one no-grad forward over ``tokens`` tokens beyond what it keeps: one layer's transients
    (MLP gate/up/product, q/k/v and repeated k/v, the residual and norm in the stream dtype) and the
    padded attention mask (bool + one float copy)."""
    per_token = 3 * s.intermediate * e_c + 4 * s.q_width * e_c + 3 * s.hidden * e_stream
    return int(tokens * per_token + batch * seq * seq * (1 + e_c))


def _plan(spec: RunSpec, student: ModelShape, teacher: ModelShape, device_type: str, free: int, total: int,
          device_desc: str, world: int) -> MemoryPlan:
    st = _resolve(spec, device_type)
    n = world  # the student's weights, gradients and optimizer state are split n ways
    parts: list[Part] = []
    notes: list[str] = []
    L, C = st.max_length, st.max_new_tokens
    B, GA = st.bs, st.ga
    T = B * L  # tokens per micro-batch
    N = B * C  # completion tokens per micro-batch (at most)
    rows = min(N, TOKEN_CHUNK_SIZE)
    e_c, e_f = st.e_c, st.e_frozen
    # with accumulation, every gradient exists from the 2nd micro-batch on; with none, only the layers'
    # backward and the optimizer step see them
    grads_in_forward = ("teacher forward", "student forward", "loss backward") if GA > 1 else ()
    backward = ("loss backward", "layer backward") if st.gc else ("loss backward",)

    # static: weights and optimizer state
    sharded = f" / {n} GPUs (FSDP2)" if n > 1 else ""
    if st.lora is None:
        trained = student.n_params
        parts.append(Part("student weights", student.n_params * 4 // n + student.buffer_bytes,
                          f"fp32 master weights, {_fmt_params(student.n_params)} x 4 B{sharded}"))
    else:
        trained = student.lora_params(st.lora)
        if trained == 0:
            notes.append(f"optim.lora.target_modules {st.lora.target_modules!r} match no Linear of the student")
        parts.append(Part("student weights", student.n_params * e_f + trained * 4 + student.buffer_bytes,
                          f"frozen base {_fmt_params(student.n_params)} x {e_f} B ({'bf16' if e_f == 2 else 'fp32'}) "
                          f"+ LoRA r={st.lora.r} adapters {_fmt_params(trained)} x 4 B (fp32)"))
    parts.append(Part("teacher weights", teacher.n_params * e_f // n + teacher.buffer_bytes,
                      f"{_fmt_params(teacher.n_params)} x {e_f} B ({'bf16' if e_f == 2 else 'fp32'}), no grads"
                      + sharded))
    if st.optimizer == "adamw-8bit":
        small = student.small_params if st.lora is None else sum(
            n for _, i, o in student.lora_targets(st.lora) for n in (st.lora.r * i, st.lora.r * o) if _ao_fp32(n))
        quant = trained - small
        opt = int(quant * 2 * (1 + 4 / AO_BLOCK_SIZE) + small * 8)
        parts.append(Part("optimizer state", opt // n, f"torchao AdamW8bit: ~2 B x {_fmt_params(trained)} trained{sharded}"))
    else:
        parts.append(Part("optimizer state", trained * 8 // n,
                          f"AdamW exp_avg + exp_avg_sq fp32: 8 B x {_fmt_params(trained)} trained{sharded}"))
    if st.backend == "vllm" and not st.cuda:
        notes.append("generation_backend vllm needs CUDA; the trainer refuses it on CPU")

    # gradients
    parts.append(Part("gradients", trained * 4 // n, f"fp32, 4 B x {_fmt_params(trained)} trained{sharded}"
                      + ("; all of them from the 2nd micro-batch on" if GA > 1 else ""),
                      grads_in_forward + ("layer backward", "optimizer step")))
    student_generates = spec.gkd.lmbda > 0 and st.backend == "hf"
    teacher_generates = spec.gkd.seq_kd and spec.gkd.lmbda < 1
    if n > 1:  # FSDP2: the root's parameters for a whole forward + backward, ~3 layers' at a time
        root, layer = _fsdp_units(student)
        parts.append(Part("FSDP2 gathered", 4 * (root + 3 * layer),
                          f"fp32 root parameters (embeddings, head, final norm) {_fmt_params(root)} + 3 layers' "
                          f"parameters or gradients ({_fmt_params(layer)} each), unsharded",
                          (("generation",) if student_generates else ()) + ("student forward", "loss backward",
                                                                           "layer backward")))
        t_sample = ("teacher generation",) if teacher_generates else ()
        t_root, t_layer = _fsdp_units(teacher)
        parts.append(Part("teacher FSDP2 root", e_f * t_root,
                          f"the teacher's root parameters (embeddings, head, final norm) {_fmt_params(t_root)} x "
                          f"{e_f} B, unsharded around each micro-batch (its forward, the loss that reads its head) "
                          "and sample",
                          t_sample + ("teacher forward", "student forward", "loss backward", "layer backward")))
        parts.append(Part("teacher FSDP2 layers", e_f * 3 * t_layer,
                          f"3 teacher layers' parameters ({_fmt_params(t_layer)} x {e_f} B each: the current one, its "
                          "all-gather buffer, the next one's), unsharded in its forward",
                          t_sample + ("teacher forward",)))
        parts.append(Part("whole student (loading)", student.n_params * 4 - student.n_params * 4 // n,
                          "every rank loads the whole fp32 student before sharding it (rank 0 evaluates it then); "
                          "beyond its shard", ("loading",)))
        parts.append(Part("whole teacher", teacher.n_params * e_f - teacher.n_params * e_f // n,
                          "every rank loads the whole teacher before sharding it, and gathers it whole again after "
                          "training (rank 0's final evaluation runs it alone); beyond its shard",
                          ("loading", "final evaluation")))
        parts.append(Part("final student (evaluation)", student.n_params * e_f,
                          f"rank 0 reloads final/ ({_fmt_params(student.n_params)} x {e_f} B) to evaluate it",
                          ("final evaluation",)))

    # autocast weight cache
    if st.mixed:
        cast = 2 * (student.decoder_linear_params if st.lora is None else trained)
        when = (("generation",) if student_generates else ()) + ("student forward",) + (() if st.gc else backward)
        parts.append(Part("autocast weight cache", cast,
                          "bf16 copy of each trained Linear weight, made by autocast in the forward"
                          + ("" if st.gc else "; saved for backward (no checkpointing)"), when))

    # samplers: the student's (HF generate or the vLLM engine) and, with seq_kd, the teacher's (HF)
    gen_batch = B * GA
    prompt = L - C
    cache_len = (math.ceil(prompt / PAD_MULTIPLE) * PAD_MULTIPLE + C) if st.cuda else L

    def hf_sampler(who: str, shape: ModelShape, e_kv: int, when: str) -> Part:
        kv = 2 * shape.layers * gen_batch * shape.kv_width * cache_len * e_kv
        work = (_working_set(shape, gen_batch * prompt, prompt, gen_batch, e_c, e_kv)
                + gen_batch * shape.vocab * 4 * 3)  # last-position logits, scores, probabilities
        return Part(f"{who} sampler" if who == "teacher" else "sampler", kv + work,
                    f"{who} generate: KV cache {_gb(kv)} GB ({gen_batch} sequences x {cache_len} tokens, "
                    f"{'fp32' if e_kv == 4 else 'bf16'}) + prefill working set {_gb(work)} GB", (when,))

    if student_generates:
        parts.append(hf_sampler("student", student, st.e_stream, "generation"))
    elif st.backend == "vllm" and spec.gkd.lmbda > 0:
        # awake only inside generate (sleep level 2 otherwise); the weights are pushed one tensor at a time
        share = int(spec.optim.vllm_gpu_memory_utilization * total)
        largest = student.largest_param if st.lora is None else max(
            (i * o for n, i, o in student.lora_targets(st.lora)), default=student.largest_param)
        push = largest * (2 if st.lora is None else 4 * 3)  # a bf16 cast; a LoRA merge in fp32
        parts.append(Part("vLLM engine", share + push,
                          f"vllm_gpu_memory_utilization {spec.optim.vllm_gpu_memory_utilization:g} x device total "
                          f"(engine weights + KV cache, awake only while sampling) + {_gb(push)} GB weight push",
                          ("generation",)))
    if teacher_generates:
        parts.append(hf_sampler("teacher", teacher, e_f, "teacher generation"))

    # teacher forward working set and hidden states
    parts.append(Part("teacher forward", _working_set(teacher, T, L, B, e_c, e_f) + T * teacher.hidden * e_f,
                      f"no-grad forward over {B} x {L} tokens: one layer's transients + last hidden states",
                      ("teacher forward",)))
    parts.append(Part("teacher hidden states", N * teacher.hidden * e_f,
                      f"{N} completion positions x {teacher.hidden} x {e_f} B", ("teacher forward", "student forward")
                      + backward))

    # activations
    lora_inputs = student.layer_lora_inputs(st.lora) if st.lora is not None else []
    per_layer = _layer_saved(student, st, L, lora_inputs=lora_inputs)
    H = student.hidden
    if st.lora is None:
        final = 2 * H * 4 + 4  # final norm: input and normalised input (fp32 stream)
    else:
        final = H * 4 + 4  # the fp32 upcast of its input
    outside = T * (final + 2 * student.head_dim * st.e_stream + 16) + N * H * st.e_stream
    if st.gc:
        acts = int(student.layers * T * H * st.e_stream + outside)
        how = f"checkpointing: {student.layers} layer inputs x {T} tokens x {H} x {st.e_stream} B"
    else:
        acts = int(student.layers * T * per_layer + outside - T * _lora_first_layer_saving(student, st))
        how = f"no checkpointing: {student.layers} layers x {T} tokens x {per_layer / 1024:.1f} KiB saved per token"
    parts.append(Part("activations", acts, how, ("student forward",) + backward))
    if st.gc:  # backward recomputes one layer at a time: its saved tensors, its gradients' transients
        layer_params = (student.decoder_linear_params if st.lora is None else trained) // max(student.layers, 1)
        recomputed = int(T * per_layer + T * _backward_working_set(student, st)
                         + (2 * layer_params if st.mixed else 0))
        parts.append(Part("recomputed layer", recomputed, f"one layer's saved tensors ({per_layer / 1024:.1f} KiB per "
                          "token) + its backward's gradient transients", ("layer backward",)))

    # loss
    V = student.vocab
    chunk = min(V, VOCAB_CHUNK_SIZE)
    tiles = 2 * rows * VOCAB_CHUNK_SIZE * 4
    fwd = tiles
    bwd = tiles + N * H * 4
    if not st.cuda:  # torch fallback: tile-sized temporaries (the bf16 casts below are not at its peak)
        fwd += CPU_FOLD_TEMPS_FORWARD * rows * chunk * 4
        bwd += CPU_FOLD_TEMPS_BACKWARD * rows * chunk * 4
    elif st.mixed:
        head_cast = chunk * H * 2 if st.lora is None else 0  # fp32 master head -> one bf16 chunk at a time
        fwd += head_cast + rows * H * 2
        bwd += head_cast + rows * chunk * 2  # and each gradient tile in bf16
    head_grad = V * H * 4 if st.lora is None else 0
    bwd = max(bwd + head_grad, N * H * 4 + 2 * head_grad)  # the kernel's grad, then the slice's full-size copy
    parts.append(Part("loss (forward)", fwd, f"2 fp32 tiles {rows} x {VOCAB_CHUNK_SIZE}"
                      + ("" if st.cuda else f" + {CPU_FOLD_TEMPS_FORWARD} CPU fold temporaries {rows} x {chunk}"),
                      ("student forward",)))
    parts.append(Part("loss (backward)", bwd, "2 fp32 tiles, fp32 grad of the hidden states"
                      + (f" and of the lm_head ({V} x {H}, twice: kernel + slice)" if head_grad else "")
                      + ("" if st.cuda else f" + {CPU_FOLD_TEMPS_BACKWARD} CPU fold temporaries"),
                      ("loss backward",)))

    # optimizer step temporaries
    largest = student.largest_param if st.lora is None else max((st.lora.r * max(i, o) for _, i, o in
                                                                 student.lora_targets(st.lora)), default=0)
    largest //= n
    if st.optimizer == "adamw-8bit":
        temps = 3 * largest * 4
        how = "AdamW8bit dequantises one tensor's state at a time (~3 fp32 copies of the largest)"
    elif st.cuda:
        temps, how = 0, "fused AdamW: no temporaries"
    else:
        temps, how = 2 * largest * 4, "per-tensor AdamW on CPU: ~2 fp32 copies of the largest tensor"
    parts.append(Part("optimizer temporaries", temps, how, ("optimizer step",)))

    static = sum(p.bytes for p in parts if p.static)
    present = {m for p in parts for m in p.when if m != "layer backward" or st.gc}
    moments = {m: sum(p.bytes for p in parts if m in p.when) for m in MOMENTS if m in present}
    peak_moment = max(moments, key=moments.get)
    total_bytes = static + moments[peak_moment]
    available = int(free - SAFETY_FRACTION * total - RESERVE_BYTES)

    if st.lora is not None and spec.optim.learning_rate < 1e-4:
        lr = spec.optim.learning_rate
        notes.append(f"LoRA usually needs ~{LORA_LR_FACTOR}x the full fine-tuning learning rate: this gear has "
                     f"{lr:g}; consider learning_rate {lr * LORA_LR_FACTOR:g}")
    if spec.optim.gradient_checkpointing is None:
        notes.append(f"gradient checkpointing {'on' if st.gc else 'off'} (auto: on for full fine-tuning on CUDA)")
    if spec.optim.precision == "auto":
        notes.append(f"precision {'bf16-mixed' if st.mixed else 'fp32'} (auto on {device_type})")
    for shape, who in ((student, "student"), (teacher, "teacher")):
        if shape.model_type not in ("qwen2", "qwen3", "llama", "mistral"):
            notes.append(f"{who} model_type {shape.model_type!r}: activations assume a Llama/Qwen2 decoder block")
    if n > 1 and device_type == "cpu":
        notes.append(f"the {n} CPU ranks share this memory: the verdict counts {n} x the peak")
    summary = [
        f"student {spec.student}: {_fmt_params(student.n_params)} params, "
        + (f"LoRA r={st.lora.r} ({_fmt_params(trained)} trained)" if st.lora else "full fine-tuning")
        + f", {'bf16-mixed' if st.mixed else 'fp32'}, {st.optimizer}, "
          f"gradient checkpointing {'on' if st.gc else 'off'}",
        f"teacher {spec.teacher}: {_fmt_params(teacher.n_params)} params, {'bf16' if e_f == 2 else 'fp32'}",
        f"batch {B} x accumulation {GA}, max_length {L}, max_new_tokens {C}, generation {st.backend}",
    ]
    if n > 1:
        summary.append(f"{n} GPUs (ranks): student and teacher sharded with FSDP2; global batch {B * GA * n}; "
                       "bytes per GPU")
    return MemoryPlan(
        device=device_desc, device_type=device_type, precision="bf16-mixed" if st.mixed else "fp32",
        gradient_checkpointing=st.gc, parts=parts, static_bytes=static, moments=moments, peak_moment=peak_moment,
        total_bytes=total_bytes, free_bytes=free, device_total_bytes=total, available_bytes=available,
        fits=total_bytes * (n if device_type == "cpu" else 1) <= available, world=n, summary=summary, notes=notes,
    )


def _tight(plan: MemoryPlan) -> bool:
    return plan.fits and plan.available_bytes - plan.total_bytes < TIGHT_FRACTION * plan.device_total_bytes


def _with(spec: RunSpec, **optim) -> RunSpec:
    gkd = {k[4:]: optim.pop(k) for k in list(optim) if k.startswith("gkd_")}
    return spec.model_copy(update={"optim": spec.optim.model_copy(update=optim),
                                   "gkd": spec.gkd.model_copy(update=gkd)})


def _ways_out(spec: RunSpec, plan: MemoryPlan, replan) -> list[WayOut]:
    o, g = spec.optim, spec.gkd
    st = _resolve(spec, plan.device_type)
    candidates: list[tuple[str, dict, str]] = []
    if o.lora is None:
        lr = o.learning_rate * LORA_LR_FACTOR
        lora = LoraSettings()
        note = (f"LoRA needs roughly {LORA_LR_FACTOR}x the full fine-tuning learning rate: {lr:g} for this gear's "
                f"{o.learning_rate:g}; the rank barely changes memory")
        change = f"optim.lora: {{r: {lora.r}, alpha: {lora.alpha}}}, optim.learning_rate: {lr:g}"
        alone = replan(_with(spec, lora=lora, learning_rate=lr))
        if not alone.gradient_checkpointing and (not alone.fits or _tight(alone)):  # LoRA: auto checkpointing is off
            candidates.append((change + ", optim.gradient_checkpointing: true",
                               {"lora": lora, "learning_rate": lr, "gradient_checkpointing": True}, note))
        else:
            candidates.append((change, {"lora": lora, "learning_rate": lr}, note))
    if o.optimizer == "adamw" and o.lora is None:
        import importlib.util

        missing = "" if importlib.util.find_spec("torchao") else "; needs torchao installed (pip install torchao)"
        candidates.append(("optim.optimizer: adamw-8bit", {"optimizer": "adamw-8bit"},
                           f"torchao AdamW8bit: ~2 B instead of 8 B of state per parameter{missing}"))
    if not st.gc:
        candidates.append(("optim.gradient_checkpointing: true", {"gradient_checkpointing": True},
                           "each layer's forward runs again in backward (slower steps)"))
    if o.per_device_train_batch_size > 1:
        ga = o.gradient_accumulation_steps * o.per_device_train_batch_size
        candidates.append((f"optim.per_device_train_batch_size: 1, optim.gradient_accumulation_steps: {ga}",
                           {"per_device_train_batch_size": 1, "gradient_accumulation_steps": ga},
                           "same effective batch, smaller micro-batches"))
    if g.max_new_tokens >= 64:
        n = g.max_new_tokens // 2
        candidates.append((f"gkd.max_new_tokens: {n}", {"gkd_max_new_tokens": n}, "longer completions are cut"))
    shorter = max(g.max_new_tokens + 8, o.max_length // 2)
    if shorter < o.max_length:
        candidates.append((f"optim.max_length: {shorter}", {"max_length": shorter},
                           f"prompts are cut to {shorter - g.max_new_tokens} tokens (keeping the system message)"))
    if o.generation_backend == "vllm" and o.vllm_gpu_memory_utilization > 0.1:
        u = round(max(0.05, o.vllm_gpu_memory_utilization / 2), 2)
        candidates.append((f"optim.vllm_gpu_memory_utilization: {u:g}", {"vllm_gpu_memory_utilization": u},
                           "a smaller vLLM KV cache (fewer concurrent sequences)"))
    out = []
    for change, upd, note in candidates:
        p = replan(_with(spec, **upd))
        out.append((WayOut(change, plan.total_bytes - p.total_bytes, p.total_bytes, p.fits, note), upd))
    ways = [w for w, _ in out]
    if ways and not any(w.fits for w in ways):  # none alone: combine, biggest savings first
        combo, names = {}, []
        for w, upd in sorted(out, key=lambda x: -x[0].saves_bytes):
            if w.saves_bytes <= 0:
                continue
            combo.update(upd)
            names.append(w.change)
            p = replan(_with(spec, **dict(combo)))
            if p.fits:
                ways.append(WayOut("together: " + "; ".join(names), plan.total_bytes - p.total_bytes, p.total_bytes,
                                   True, "no single change is enough"))
                break
    teacher = plan.part("teacher weights").bytes
    if teacher >= plan.available_bytes:
        ways.append(WayOut("a smaller teacher", 0, plan.total_bytes, False,
                           f"the teacher's weights alone take {_gb(teacher)} GB of the {_gb(plan.available_bytes)} GB "
                           "available"))
    if o.lora is None and o.optimizer == "adamw" and o.generation_backend == "hf" and plan.device_type == "cuda":
        more = [replan(_with(spec, num_gpus=g)) for g in (2, 4, 8) if g > plan.world]
        best = next((p for p in more if p.fits), more[-1] if more else None)
        if best is not None:
            ways.append(WayOut(f"optim.num_gpus: {best.world}", plan.total_bytes - best.total_bytes, best.total_bytes,
                               best.fits, f"the student's weights, gradients and AdamW state and the teacher's "
                               f"weights sharded over {best.world} GPUs (FSDP2); global batch x {best.world}; per GPU"))
    return ways


def build_plan(spec: RunSpec, *, device_type: str | None = None, device_memory_bytes: int | None = None,
               gpus: int | None = None) -> MemoryPlan:
    """The memory plan of ``spec`` on ``device_type`` (default: the spec's, ``auto`` resolved here) with
    ``device_memory_bytes`` of memory per device (default: measured by ``device_memory``; free = total when
    given), on ``gpus`` ranks (default: ``optim.num_gpus``, else the GPUs visible here, else 1)."""
    device_type = device_type or resolve_device_type(spec.device)
    if device_type not in ("cpu", "cuda"):
        raise PlanError(f"device: {device_type!r} is neither cpu nor cuda")
    student = model_shape(spec.student, "student")
    teacher = model_shape(spec.teacher, "teacher")
    if device_memory_bytes is not None:
        free = total = int(device_memory_bytes)
        desc = f"{device_type} (given: {_gb(total)} GB)"
    else:
        free, total = device_memory(device_type)
        if os.environ.get(ENV_MEMORY):
            desc = f"{device_type} ({ENV_MEMORY}={os.environ[ENV_MEMORY]}: {_gb(total)} GB)"
        else:
            name = _device_name(device_type)
            desc = f"{device_type}{' ' + name if name else ''} ({_gb(free)} GB free of {_gb(total)} GB)"

    if gpus is None:
        gpus = spec.optim.num_gpus or _visible_gpus(device_type)

    def replan(s: RunSpec) -> MemoryPlan:
        return _plan(s, model_shape(s.student, "student"), teacher, device_type, free, total, desc,
                     s.optim.num_gpus or gpus)

    plan = _plan(spec, student, teacher, device_type, free, total, desc, gpus)
    if not plan.fits:
        plan.ways_out_detail = _ways_out(spec, plan, replan)
    elif _tight(plan):
        spare = _gb(plan.available_bytes - plan.total_bytes)
        tip = ""
        if not plan.gradient_checkpointing:
            with_gc = replan(_with(spec, gradient_checkpointing=True))
            tip = f"; optim.gradient_checkpointing: true would bring the peak to {_gb(with_gc.total_bytes)} GB"
        plan.notes.insert(0, f"tight fit: {spare} GB to spare (under {TIGHT_FRACTION:.0%} of the device){tip}")
    return plan


def _visible_gpus(device_type: str) -> int:
    if device_type != "cuda":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def check_memory(spec: RunSpec, *, device_type: str | None = None,
                 device_memory_bytes: int | None = None) -> MemoryPlan:
    """The plan; raises ``PlanRefused`` (its message: the table and the ways out) when it does not fit."""
    plan = build_plan(spec, device_type=device_type, device_memory_bytes=device_memory_bytes)
    if not plan.fits:
        raise PlanRefused(plan)
    return plan


def format_plan(plan: MemoryPlan) -> str:
    lines = [f"Memory plan on {plan.device}" + (f", per GPU of {plan.world}" if plan.world > 1 else "")]
    lines += [f"  {s}" for s in plan.summary]
    width = max(len(p.name) for p in plan.parts)
    whens = {p.name: "always" if p.static else ",".join(_SHORT[m] for m in p.when) for p in plan.parts}
    w_when = max(len(w) for w in whens.values())
    lines.append("")
    lines.append(f"  {'part':<{width}}  {'GB':>7}  {'when':<{w_when}}  note")
    for p in plan.parts:
        lines.append(f"  {p.name:<{width}}  {_gb(p.bytes):>7.2f}  {whens[p.name]:<{w_when}}  {p.note}")
    lines.append("")
    lines.append(f"  {'static':<{width}}  {_gb(plan.static_bytes):>7.2f}  (always; the moments below add to it, "
                 "the largest sets the peak)")
    for m, b in plan.moments.items():
        mark = "  <- peak" if m == plan.peak_moment else ""
        lines.append(f"  {'+ ' + m:<{width}}  {_gb(b):>7.2f}{mark}")
    lines.append(f"  {'total (peak)':<{width}}  {_gb(plan.total_bytes):>7.2f}")
    lines.append(f"  {'available':<{width}}  {_gb(plan.available_bytes):>7.2f}  "
                 f"({_gb(plan.free_bytes)} GB free - {SAFETY_FRACTION:.0%} of {_gb(plan.device_total_bytes)} GB "
                 f"- {_gb(RESERVE_BYTES):g} GB reserve)")
    if plan.fits:
        lines.append(f"  verdict: fits ({_gb(plan.available_bytes - plan.total_bytes)} GB to spare)")
    else:
        lines.append(f"  verdict: DOES NOT FIT (needs {_gb(plan.total_bytes - plan.available_bytes)} GB more)")
        lines.append("")
        lines.append("Ways out (each alone, on this device):")
        lines += [f"  - {w}" for w in plan.ways_out]
    if plan.notes:
        lines.append("")
        lines.append("Notes:")
        lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


# --- disk --------------------------------------------------------------------------------------
ENV_DISK_FREE = "ATLASD_DISK_FREE_GB"  # pretend this much free disk (tests; a disk shared with others)


class DiskRefused(BadSpec):
    """Not enough free disk for the run's checkpoints; the message has the numbers (exit 2)."""


@dataclass(frozen=True)
class DiskPlan:
    """What the run writes at most in ``folder``: ``KEEP_CHECKPOINTS`` periodic checkpoints (+1
    while a new one is written before the oldest goes), each the student as trained (``student
    weights``) plus its optimizer state, and ``final/`` in the compute dtype. A resumed run's
    checkpoints already on disk count as written."""

    folder: Path
    checkpoints: int
    checkpoint_bytes: int
    final_bytes: int
    existing_bytes: int
    free_bytes: int

    @property
    def need_bytes(self) -> int:
        return max(0, self.checkpoints * self.checkpoint_bytes + self.final_bytes - self.existing_bytes)

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.free_bytes

    def describe(self) -> str:
        return (f"disk: {self.folder} has {_gb(self.free_bytes)} GB free; this run needs about {_gb(self.need_bytes)} GB "
                f"({self.checkpoints} checkpoints of {_gb(self.checkpoint_bytes)} GB (weights and optimizer state) + "
                f"final model {_gb(self.final_bytes)} GB" + (f" - {_gb(self.existing_bytes)} GB already written"
                                                             if self.existing_bytes else "") + ")")


def disk_plan(spec: RunSpec, plan: MemoryPlan) -> DiskPlan:
    from trainers.gkd import KEEP_CHECKPOINTS

    student = model_shape(spec.student, "student")
    checkpoint = (plan.part("student weights").bytes + plan.part("optimizer state").bytes) * plan.world  # consolidated
    final = student.n_params * (2 if plan.precision == "bf16-mixed" else 4)
    folder = spec.output_dir
    existing = sum(_tree_bytes(folder / d) for d in ("checkpoints", "final"))
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = int(float(os.environ[ENV_DISK_FREE]) * GiB) if os.environ.get(ENV_DISK_FREE) else shutil.disk_usage(probe).free
    return DiskPlan(folder, KEEP_CHECKPOINTS + 1, checkpoint, final, existing, free)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_disk(spec: RunSpec, plan: MemoryPlan) -> DiskPlan:
    """The disk plan; raises ``DiskRefused`` (numbers and what to do) when the run would fill the disk."""
    disk = disk_plan(spec, plan)
    if not disk.fits:
        raise DiskRefused(f"{disk.describe()}: free space first (`atlasd gc --dry-run` lists what the retention "
                          "policy would remove) or lower ATLASD_KEEP_VERSIONS / ATLASD_KEEP_DAYS")
    return disk


# --- command line ------------------------------------------------------------------------------
EXIT_DOES_NOT_FIT = 3


def plan_command(spec_path: str, *, device: str | None = None, memory_gb: float | None = None,
                 gpus: int | None = None, as_json: bool = False, stream=None) -> int:
    """``python -m trainers plan``: print the plan (table or JSON); exit 0 if it fits, 3 if it does not,
    2 for a bad spec or a plan that cannot be made (unreadable model config, no memory size)."""
    import json
    import sys

    from atlasd.runspec import EXIT_BAD_SPEC, EXIT_OK
    from trainers.run import load_spec

    stream = stream or sys.stdout
    try:
        if memory_gb is not None and not memory_gb > 0:
            raise PlanError(f"--device-memory-gb must be positive, not {memory_gb:g}")
        spec = load_spec(spec_path)
        if gpus is not None and gpus < 1:
            raise PlanError(f"--gpus must be at least 1, not {gpus}")
        plan = build_plan(spec, device_type=device,
                          device_memory_bytes=int(memory_gb * GiB) if memory_gb is not None else None, gpus=gpus)
    except BadSpec as exc:
        if as_json:
            stream.write(json.dumps({"fits": None, "error": str(exc)}) + "\n")
        print(f"trainers: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    stream.write((json.dumps(plan.as_dict(), indent=2) if as_json else format_plan(plan)) + "\n")
    return EXIT_OK if plan.fits else EXIT_DOES_NOT_FIT
