"""One MLflow experiment per policy, one MLflow run per atlasd run (found again by its
``atlasd.run_id`` tag, so a retry never makes a second run).

A run holds: params = the run spec flattened (``traces.db_url`` dropped, URLs redacted); metrics
per step from the trainer's JSON-lines log and per evaluation (with ``<prefix>/slice/<key>/success_rate``
per learning key and ``<prefix>/probe/*`` for the probe set); tags naming policy, gear, trigger,
trace window, traces used, config hash and atlasd version; artifacts = the run spec, the result,
the log, the eval samples tables (``eval/``, ``eval_start/``; the registration writes ``eval/samples.json``
again with the champion's answers beside the challenger's, registry/review.py), the probe set's
(``probe/``) and (default) the checkpoint itself; dataset inputs = the run's
training and eval manifests (``data/*.manifest.json``: which sessions, by intake seq, id and
creation time; digest = the manifest's hash), each also an artifact under ``data/``. A run whose
logging did not finish (tag ``atlasd.logged`` missing) is deleted and logged again from scratch on retry.
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
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from atlasd import __version__ as atlasd_version
from atlasd.runspec import EvalReport, RunResult, RunSpec, manifest_path
from atlasd.settings import redact_url
from registry import TAG_POLICY, TAG_RUN_ID, RegistryError
from registry.gate import slice_label

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
    values |= {f"slice/{slice_label(key)}/success_rate": result.success_rate for key, result in report.slices.items()}
    if report.probe is not None:
        values |= {"probe/success_rate": report.probe.success_rate, "probe/avg_tokens": report.probe.avg_tokens,
                   "probe/drift_kl": report.probe.drift_kl}
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


# the MLflow run's tags its model version carries too (with the eval summary and the checkpoint path)
VERSION_RUN_TAGS = ("atlasd.gear", "atlasd.trigger", "atlasd.config_hash", "atlasd.trace_window", "atlasd.n_traces",
                    "atlasd.manifest_hash")


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
    if result.manifest_hash:
        tags["atlasd.manifest_hash"] = result.manifest_hash
    return tags


def log_manifests(client: MlflowClient, rid: str, spec: RunSpec, result: RunResult) -> None:
    """The run folder's training and eval manifests as the run's dataset inputs (contexts training
    and eval) and artifacts. The training manifest must be the one the result names."""
    inputs = []
    for name, context in (("train", "training"), ("eval", "eval")):
        path = manifest_path(spec.output_dir / "data" / f"{name}.jsonl")
        if not path.is_file():
            continue
        manifest = json.loads(path.read_text())
        if name == "train" and result.manifest_hash and manifest["hash"] != result.manifest_hash:
            raise RegistryError(f"{path}: hash {manifest['hash']} is not the manifest the run trained on "
                                f"({result.manifest_hash})")
        source = {"table": "atlasd.intake", "window": [spec.traces.window_lo, spec.traces.window_hi],
                  "artifact": f"data/{path.name}"}
        dataset = Dataset(name=f"{spec.policy}/run-{spec.run_id}/{name}", digest=manifest["hash"], source_type="atlasd",
                          source=json.dumps(source), profile=json.dumps({"sessions": manifest["n_sessions"],
                                                                         "examples": manifest["n_examples"]}))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        client.log_artifact(rid, str(path), artifact_path="data")
    if inputs:
        client.log_inputs(rid, datasets=inputs)


def _sample_rows(path: Path) -> list[dict]:
    """The samples file's rows, a value that is not a scalar (the prompt's messages) as JSON text."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: (v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v))
                         for k, v in row.items()})
    return rows


def _samples_table(path: Path) -> dict[str, list]:
    rows = _sample_rows(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {c: [row.get(c) for row in rows] for c in columns}


CHAMPION_COLUMNS = ("generation", "correct", "tokens")  # beside the challenger's, as champion_<column>


def log_side_by_side(client: MlflowClient, rid: str, label: str, challenger: Path, champion: Path) -> None:
    """``<label>/samples.json`` written again in place (log_table would append to it), each of the
    challenger's rows with the champion's ``champion_generation``, ``champion_correct`` and
    ``champion_tokens`` for the same sample (session id and prompt; None where the champion has none),
    in log_table's format."""
    theirs = {(r.get("session_id"), r.get("prompt")): r for r in _sample_rows(champion)}
    rows = [{**row, **{f"champion_{c}": theirs.get((row.get("session_id"), row.get("prompt")), {}).get(c)
                       for c in CHAMPION_COLUMNS}} for row in _sample_rows(challenger)]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.json"
        path.write_text(json.dumps({"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}))
        client.log_artifact(rid, str(path), artifact_path=label)


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
    log_manifests(client, rid, spec, result)
    for label, report in (("eval", result.eval), ("eval_start", result.eval_start),
                          ("probe", result.eval and result.eval.probe)):
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
