"""One MLflow experiment per policy, one MLflow run per atlasd run (found again by its
``atlasd.run_id`` tag, so a retry never makes a second run).

A run holds: params = the run spec flattened (``traces.db_url`` dropped, URLs redacted); metrics
per step from the trainer's JSON-lines log and per evaluation; tags naming policy, gear, trigger,
trace window, traces used, config hash and atlasd version; artifacts = the run spec, the result,
the log, the eval samples table and (default) the checkpoint itself. A run whose logging did not
finish (tag ``atlasd.logged`` missing) is deleted and logged again from scratch on retry.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from atlasd import __version__ as atlasd_version
from atlasd.runspec import EvalReport, RunResult, RunSpec
from atlasd.settings import redact_url
from registry import TAG_POLICY, TAG_RUN_ID, RegistryError

TAG_LOGGED = "atlasd.logged"
CHECKPOINT_ARTIFACT = "checkpoint"
RUN_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
# trainer log keys with a fixed MLflow name; other numeric keys become train/<key> (or keep a "/" name)
LOG_KEYS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr", "learning_rate": "train/lr",
            "tokens_per_s": "train/tokens_per_s"}
LOG_IGNORED = {"step", "epoch_float", "ts", "time", "timestamp", "run_id", "pid", "heartbeat"}


def default_artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite store: ``mlartifacts`` next to the database file; otherwise the server's default."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and parsed.path not in ("", "/:memory:"):
        return str(Path(parsed.path).parent / "mlartifacts")
    return None


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
        return out
    text = data if isinstance(data, str) else json.dumps(data)
    return {prefix.rstrip("."): redact_url(text)[:6000]}


def spec_public(spec: RunSpec) -> dict:
    """The run spec as JSON data without secrets: no DB URL, URLs redacted."""
    data = spec.model_dump(mode="json")
    data["traces"].pop("db_url", None)
    if data.get("mlflow"):
        data["mlflow"]["tracking_uri"] = redact_url(data["mlflow"]["tracking_uri"])
    return data


def log_metrics_from_jsonl(path: Path) -> list[Metric]:
    """Per-step metrics from the trainer's JSON lines (lines without a numeric ``step`` are skipped)."""
    metrics = []
    now = int(time.time() * 1000)
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a progress bar or a stray print: not a metrics line
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key, value in row.items():
            if key in LOG_IGNORED or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            name = LOG_KEYS.get(key) or (key if "/" in key else f"train/{key}")
            metrics.append(Metric(name, float(value), now + lineno, row["step"]))
    return metrics


def eval_metrics(prefix: str, report: EvalReport, step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    values = {"success_rate": report.success_rate, "avg_tokens": report.avg_tokens,
              "reverse_kl": report.reverse_kl, "n_samples": report.n_samples}
    return [Metric(f"{prefix}/{k}", float(v), now, step) for k, v in values.items() if v is not None]


def result_metrics(result: RunResult) -> list[Metric]:
    now = int(time.time() * 1000)
    metrics = [Metric(f"summary/{k}", float(v), now, result.steps)  # the trainer's totals, apart from per-step train/*
               for k, v in result.train_metrics.items() if math.isfinite(v)]
    metrics.append(Metric("summary/wall_time_s", result.wall_time_s, now, result.steps))
    if result.eval_start:
        metrics += eval_metrics("eval_start", result.eval_start, 0)
    if result.eval:
        metrics += eval_metrics("eval", result.eval, result.steps)
    if result.baseline:
        b = result.baseline
        for name, value in (("metrics/success_delta", b.success_delta),
                            ("metrics/token_reduction_pct", b.token_reduction_pct),
                            ("metrics/meets_target", float(b.meets_all_targets))):
            if value is not None:
                metrics.append(Metric(name, float(value), now, result.steps))
    return metrics


def run_tags(spec: RunSpec, result: RunResult) -> dict[str, str]:
    tags = {
        TAG_RUN_ID: str(spec.run_id), TAG_POLICY: spec.policy, "atlasd.gear": spec.gear,
        "atlasd.trigger": spec.trigger,
        "atlasd.trace_window": f"({spec.traces.window_lo}, {spec.traces.window_hi}]",
        "atlasd.n_traces": str(result.n_train), "atlasd.n_eval": str(result.n_eval),
        "atlasd.config_hash": spec.config_hash(), "atlasd.version": atlasd_version,
        "atlasd.status": result.status, "atlasd.student": redact_url(spec.student),
        "atlasd.start_champion_version": spec.champion_version or "",
    }
    if result.eval:
        tags["atlasd.eval_set_hash"] = result.eval.eval_set_hash
    if result.error:
        tags["atlasd.error"] = redact_url(result.error)[:5000]
    if result.skipped:
        tags["atlasd.skipped"] = json.dumps(result.skipped)
    return tags


def _samples_table(path: Path) -> dict[str, list]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: (v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v))
                         for k, v in row.items()})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {c: [row.get(c) for row in rows] for c in columns}


def ensure_experiment(client: MlflowClient, name: str, policy: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if artifact_root:
        location = str(Path(artifact_root) / name.replace("/", "_")) if "://" not in artifact_root \
            else f"{artifact_root.rstrip('/')}/{name.replace('/', '_')}"
    return client.create_experiment(name, artifact_location=location, tags={TAG_POLICY: policy})


def find_run(client: MlflowClient, experiment_id: str, atlasd_run_id: int):
    runs = client.search_runs([experiment_id], f"tags.`{TAG_RUN_ID}` = '{atlasd_run_id}'", max_results=10)
    return runs[0] if runs else None


def log_run(
    client: MlflowClient,
    spec: RunSpec,
    result: RunResult,
    *,
    log_path: Path | None,
    upload_checkpoint: bool,
    artifact_root: str | None,
) -> tuple[str, str]:
    """Log the atlasd run once; return (experiment id, MLflow run id). Idempotent by atlasd run id."""
    assert spec.mlflow is not None
    experiment_id = ensure_experiment(client, spec.mlflow.experiment, spec.policy, artifact_root)
    existing = find_run(client, experiment_id, spec.run_id)
    if existing is not None:
        if existing.data.tags.get(TAG_LOGGED) == "1":
            return experiment_id, existing.info.run_id
        client.delete_run(existing.info.run_id)  # half-logged by a failed attempt: start over
    run = client.create_run(experiment_id, run_name=f"{spec.policy}-{spec.gear}-run{spec.run_id}",
                            tags=run_tags(spec, result))
    rid = run.info.run_id
    params = [Param(k, v) for k, v in flatten(spec_public(spec)).items()]
    metrics = (log_metrics_from_jsonl(log_path) if log_path else []) + result_metrics(result)
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run_spec.json").write_text(json.dumps(spec_public(spec), indent=2))
        (Path(tmp) / "result.json").write_text(result.model_dump_json(indent=2))
        client.log_artifacts(rid, tmp)
    if log_path:
        client.log_artifact(rid, str(log_path))
    for label, report in (("eval", result.eval), ("eval_start", result.eval_start)):
        if report and report.samples_path:
            samples = Path(report.samples_path)
            if not samples.is_file():
                raise RegistryError(f"result.json {label}.samples_path: {samples} does not exist")
            client.log_table(rid, _samples_table(samples), artifact_file=f"{label}/samples.json")
            client.log_artifact(rid, str(samples), artifact_path=label)
    if upload_checkpoint and result.checkpoint:
        client.log_artifacts(rid, result.checkpoint, artifact_path=CHECKPOINT_ARTIFACT)
    client.set_terminated(rid, status=RUN_STATUS[result.status])
    client.set_tag(rid, TAG_LOGGED, "1")
    return experiment_id, rid
