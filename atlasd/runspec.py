"""The run spec: the only contract between the daemon and the training child.

The daemon writes ``RunSpec`` as JSON (``run_spec.json`` in the run's output dir) and starts
``python -m trainers run SPEC.json``; the child writes ``result.json`` (``RunResult``) at the end.
The gear-setting models here are also what policy files embed (``atlasd.policies``), so a
policy field and a run-spec field are one definition. This module imports pydantic only.

Secrets: the spec carries no database password. The child reads the Atlas database URL from
``traces.db_url`` if set, else from the ``ATLASD_DB_URL`` environment variable it inherits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SPEC_VERSION = 1

# exit codes of the children, `python -m trainers ...` and `python -m registry ...`
EXIT_OK = 0
EXIT_FAILED = 1  # unexpected error: look at stderr
EXIT_BAD_SPEC = 2  # trainers: the spec is invalid
EXIT_BAD_INPUT = 2  # registry: bad spec/result/arguments, unknown policy/version: do not retry
EXIT_NEEDS_GPU = 3  # registry finalize --defer-measure: the champion must be re-measured; call again in the GPU slot
EXIT_INTERRUPTED = 75  # trainers: SIGTERM, checkpoint saved, resumable (EX_TEMPFAIL)
EXIT_UNAVAILABLE = 75  # registry: the MLflow store (database, server or artifact store) is unavailable: retry later

# A session's text for the trainer (task, final answer, plan, steps, guidance, events) above this
# is skipped unread (trainers/dataset.py). PostgreSQL caps a jsonb array at 256 MB, so the
# configurable cap stays well below that.
MAX_SESSION_BYTES = 8 << 20
MAX_SESSION_BYTES_LIMIT = 64 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GKDSettings(_Strict):
    """On-policy distillation settings. Defaults are the reference fast gear (docs/gkd.md)."""

    lmbda: float = Field(1.0, ge=0, le=1, description="Probability that the student samples the completion.")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD mixture: 0 forward KL, 1 reverse KL.")
    temperature: float = Field(0.9, gt=0, le=5, description="Student sampling temperature.")
    max_new_tokens: int = Field(256, gt=0, le=32768)
    seq_kd: bool = Field(False, description="Use teacher-generated completions (sequence-level KD).")


class LoraSettings(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class OptimSettings(_Strict):
    """Optimiser and schedule. Defaults are the reference fast gear."""

    learning_rate: float = Field(2e-5, gt=0, le=1)
    per_device_train_batch_size: int = Field(2, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    max_steps: int | None = Field(500, gt=0, description="Optimizer steps; exclusive with num_train_epochs.")
    num_train_epochs: float | None = Field(None, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_length: int = Field(2048, gt=8, description="Prompt + completion tokens; prompts are cut, keeping the system message.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    logging_steps: int = Field(1, gt=0)
    seed: int = 42
    lora: LoraSettings | None = None
    precision: Literal["auto", "fp32", "bf16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on CUDA, fp32 on CPU. bf16-mixed: fp32 master weights for what is "
        "trained, bf16 autocast for the forward passes, frozen weights (teacher, LoRA base) stored in bf16.")
    optimizer: Literal["adamw", "adamw-8bit"] = Field(
        "adamw", description="adamw: torch AdamW (8 bytes of state per trained parameter); adamw-8bit: torchao's "
        "AdamW8bit (2 bytes), for full fine-tuning that does not fit otherwise.")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward; None: on for full fine-tuning on CUDA, off otherwise.")
    generation_backend: Literal["hf", "vllm"] = "hf"
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="Share of the GPU's memory the in-process vLLM engine may take (weights + KV cache).")
    num_gpus: int | None = Field(
        None, gt=0, description="GPUs (ranks) to train on, the student sharded over them with FSDP2 "
        "(trainers/distributed.py); None: every GPU the trainer sees (ATLASD_CUDA_VISIBLE_DEVICES). On device cpu: that "
        "many gloo processes (default 1). The global batch is per_device_train_batch_size x gradient_accumulation_steps "
        "x ranks.")

    @model_validator(mode="after")
    def _one_schedule(self) -> OptimSettings:
        if (self.max_steps is None) == (self.num_train_epochs is None):
            raise ValueError("set exactly one of max_steps and num_train_epochs")
        return self


class EvalSpec(_Strict):
    judge: str = Field("numeric", description="Judge name from the `atlasd.judges` entry-point group.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of sessions in the frozen eval split.")
    max_samples: int = Field(200, gt=0, description="Cap on eval sessions (the same ones each run).")
    max_new_tokens: int = Field(256, gt=0)
    split_salt: str = Field("", description="Changes which sessions the frozen split holds; default: policy name.")
    probe_set: str | None = Field(
        None, description="A general probe set: a JSON-lines file of {\"prompt\" or \"messages\", \"answer\"} rows, "
        "judged like the eval set; one more slice of the non-regression check, and the prompts on which drift from the "
        "base student is measured (trainers/evaluate.py).")


class Targets(_Strict):
    """Promotion targets, as Atlas Core defines them, with its thresholds as defaults."""

    baseline_success: float | None = Field(None, ge=0, le=1)
    baseline_tokens: float | None = Field(None, gt=0)
    min_success_delta: float = Field(0.10, ge=-1, le=1)
    min_token_reduction_pct: float = Field(30.0, le=100)
    must_beat_champion: bool = True
    max_regression_pp: float = Field(
        2.0, ge=0, le=100, description="No slice (learning key of the eval set, probe set) may fall by more than this "
        "many percentage points of success against the champion (registry/gate.py).")
    max_drift: float | None = Field(
        None, gt=0, description="Refuse a challenger whose drift (mean per-token KL to the base student on the probe "
        "set's greedy completions) is above this; None: drift is reported, not gated. Needs eval.probe_set.")

    def summarize(self, report: EvalReport) -> BaselineSummary:
        """Compare an eval report with the baseline, with Atlas Core's formulas (docs/atlas-sdk.md):
        ``success_delta = success_rate - baseline_success`` (met when >= min_success_delta),
        ``token_reduction_pct = (baseline_tokens - avg_tokens) / baseline_tokens * 100`` (met when
        >= min_token_reduction_pct), ``meets_all`` = success and, if a token baseline exists, tokens.
        A missing measure (no baseline, empty eval set) is None and never met; unlike Core it is not
        counted as 100 %. Comparisons allow 1e-9 of float error (0.6 - 0.5 meets 0.10)."""
        eps = 1e-9
        empty = report.n_samples == 0
        delta = None if empty or self.baseline_success is None else report.success_rate - self.baseline_success
        success = TargetCheck(
            name="success_delta", value=delta, threshold=self.min_success_delta,
            met=delta is not None and delta >= self.min_success_delta - eps,
            reason="empty eval set" if empty else "no baseline_success" if delta is None else "",
        )
        checks = [success]
        reduction, token_met = None, None
        if self.baseline_tokens is not None:
            if not empty:
                reduction = (self.baseline_tokens - report.avg_tokens) / self.baseline_tokens * 100
            token_met = reduction is not None and reduction >= self.min_token_reduction_pct - eps
            checks.append(TargetCheck(
                name="token_reduction_pct", value=reduction, threshold=self.min_token_reduction_pct,
                met=token_met, reason="empty eval set" if empty else "",
            ))
        return BaselineSummary(
            success_delta=delta, token_reduction_pct=reduction, meets_success_target=success.met,
            meets_token_target=token_met, meets_all_targets=success.met and token_met is not False, checks=checks,
        )


# Training examples per session: one per assistant turn, or one for its last (the eval set always
# takes the last: the judge compares it with the session's final answer).
ExampleMode = Literal["per_turn", "last_turn"]
EXAMPLES_HELP = ("Training examples per session: per_turn (one per assistant turn, each prompt what the model "
                 "saw before it) or last_turn. The eval set always uses the last turn.")


class SessionFilters(_Strict):
    """Which recorded sessions a run takes, and how: a policy gear's ``filters`` (atlasd.policies.Filters
    adds the cadence's ``max_traces``) and the run spec's ``traces``."""

    min_reward: float = Field(0.8, ge=0, le=1, description="Minimum session reward (reward_stats.score).")
    max_age_days: float | None = Field(
        None, gt=0, le=36_500, description="Ignore sessions created longer ago than this (at most 100 years).")
    rehearsal_fraction: float = Field(0.1, ge=0, lt=1, description="Share of older approved traces mixed in.")
    max_session_bytes: int = Field(
        MAX_SESSION_BYTES, gt=0, le=MAX_SESSION_BYTES_LIMIT,
        description="Skip a session (reason 'oversized') whose text for the trainer is larger than this.")
    examples: ExampleMode = Field("per_turn", description=EXAMPLES_HELP)


class TraceSelection(SessionFilters):
    db_url: str | None = Field(None, description="Atlas DB URL; default $ATLASD_DB_URL. Never logged.")
    learning_key: str | None = Field(None, description="Only sessions of this task family; None: all.")
    window_lo: int = Field(0, ge=0, description="Intake seq range (lo, hi] of new traces.")
    window_hi: int = Field(..., ge=0)
    rehearsal_seed: int = 0

    @model_validator(mode="after")
    def _window(self) -> TraceSelection:
        if self.window_hi < self.window_lo:
            raise ValueError(f"window_hi ({self.window_hi}) < window_lo ({self.window_lo})")
        return self

    def resolved_db_url(self) -> str:
        url = self.db_url or os.environ.get("ATLASD_DB_URL")
        if not url:
            raise ValueError("no database URL: set traces.db_url in the spec or ATLASD_DB_URL")
        return url


class MlflowTarget(_Strict):
    tracking_uri: str = Field(..., description="the store, without its password (stored in the run row)")
    experiment: str
    registered_model: str

    def resolved_tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI`` when it names this same store (it carries the password the spec
        never holds), else ``tracking_uri``."""
        from atlasd.settings import without_password

        env = os.environ.get("MLFLOW_TRACKING_URI")
        return env if env and without_password(env) == without_password(self.tracking_uri) else self.tracking_uri


# What queued a run (``atlasd.runs.trigger``; the table's CHECK lists the same, tests/test_structure.py
# keeps them equal): a batch gear's threshold, a cron tick, a missed tick caught up, an operator,
# or the follow-up of a failed (retry) or interrupted (resume) run.
TriggerSource = Literal["batch", "cron", "catch-up", "manual", "retry", "resume"]


class RunSpec(_Strict):
    spec_version: int = SPEC_VERSION
    run_id: int = Field(..., ge=1, description="atlasd.runs id")
    policy: str
    gear: str
    trigger: TriggerSource = "manual"
    teacher: str = Field(..., description="Teacher model: local path or hub id.")
    student: str = Field(..., description="Student to start from: the champion's checkpoint or the base student.")
    base_student: str = Field(..., description="The policy's base student (for reference and baseline eval).")
    champion_version: str | None = Field(None, description="Registry version the student comes from, if any.")
    traces: TraceSelection
    gkd: GKDSettings = GKDSettings()
    optim: OptimSettings = OptimSettings()
    eval: EvalSpec = EvalSpec()
    targets: Targets = Targets()
    output_dir: Path
    mlflow: MlflowTarget | None = None
    resume: bool = Field(False, description="Continue from the last checkpoint in output_dir.")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        return cls.model_validate_json(Path(path).read_text())

    def dump(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        return path

    def config_hash(self) -> str:
        """Hash of what determines the model (settings, models, trace filters), not of run ids or paths."""
        data = self.model_dump(
            mode="json",
            include={"policy", "gear", "teacher", "base_student", "gkd", "optim", "eval", "targets"},
        )
        data["traces"] = self.traces.model_dump(mode="json", include={"learning_key", "min_reward", "max_age_days", "rehearsal_fraction"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class TargetCheck(_Strict):
    name: str
    value: float | None
    threshold: float | None
    met: bool
    reason: str = ""


class SliceResult(_Strict):
    """A model's success on one slice of an evaluation (the examples of one learning key, the probe set)."""

    n_samples: int
    success_rate: float


class ProbeReport(_Strict):
    """A model on the policy's probe set (``eval.probe_set``) and its drift from the base student."""

    probe_set_hash: str = Field(..., description="Hash of the probe rows: equal hash, comparable metrics.")
    n_samples: int
    success_rate: float
    avg_tokens: float
    drift_kl: float | None = Field(
        None, description="Mean per-token KL(model || base student) on the model's greedy probe completions.")
    samples_path: str | None = None


class EvalReport(_Strict):
    """What `python -m trainers eval` reports for one checkpoint on the frozen split."""

    model: str
    eval_set_hash: str = Field(..., description="Hash of the eval session ids: equal hash, comparable metrics.")
    n_samples: int
    success_rate: float
    avg_tokens: float
    reverse_kl: float | None = None
    samples_path: str | None = None
    slices: dict[str, SliceResult] = Field(
        default_factory=dict, description="Per learning key of the eval set (examples without one are in no slice).")
    probe: ProbeReport | None = None


class BaselineSummary(_Strict):
    success_delta: float | None
    token_reduction_pct: float | None
    meets_success_target: bool
    meets_token_target: bool | None
    meets_all_targets: bool
    checks: list[TargetCheck] = []


def manifest_path(examples: str | Path) -> Path:
    """The manifest beside a JSON-lines file of examples (``data/train.jsonl`` -> ``data/train.manifest.json``):
    the sessions they come from and a hash of them (trainers.dataset.save_examples writes it)."""
    path = Path(examples)
    return path.with_name(path.stem + ".manifest.json")


class RunResult(_Strict):
    run_id: int
    status: Literal["succeeded", "failed", "interrupted"]
    checkpoint: str | None = None
    steps: int = 0
    n_train: int = 0
    n_eval: int = 0
    window_sessions: int = Field(0, description="The window's sessions trained on: the run's n_traces, but for "
                                 "sessions deleted or un-approved since it was queued (in skipped).")
    skipped: dict[str, int] = Field(default_factory=dict, description="Sessions dropped, by reason.")
    train_metrics: dict[str, float] = Field(default_factory=dict)
    eval_start: EvalReport | None = Field(
        None, description="The starting student (the champion, if any) on the same frozen eval set."
    )
    eval: EvalReport | None = None
    baseline: BaselineSummary | None = None
    wall_time_s: float = 0.0
    error: str | None = None
    manifest_hash: str | None = Field(
        None, description="Hash of the training manifest (data/train.manifest.json): which sessions the run trained "
        "on. Set by the daemon's runner from the run folder when it records the run (atlasd/lineage.py).")

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        return cls.model_validate_json(Path(path).read_text())

    def dump(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path
