"""After a run: log it, register its checkpoint, run the gate, move the aliases.

Every step is idempotent by atlasd run id, so ``finalize`` can be retried after any failure
(store unavailable, crash): the MLflow run is found again by tag, the model version too, and a
version whose decision is already tagged is reported as decided, never decided twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from mlflow.entities.model_registry import ModelVersion

from atlasd.runspec import EvalReport, RunResult, RunSpec
from registry import CHAMPION, TAG_DECISION, TAG_PREVIOUS, NeedsGpu, RegistryError
from registry.gate import comparable, decide
from registry.review import publish
from registry.store import Registry, now_iso, summary_tags
from registry.tracking import CHECKPOINT_ARTIFACT, VERSION_RUN_TAGS, log_run, run_tags

Measure = Callable[[Path], EvalReport]
SourceMode = Literal["artifacts", "path"]


class MeasureError(RuntimeError):
    """Re-measuring the champion failed (the trainer's eval exited non-zero or printed no report)."""


def trainer_measure(spec_path: Path) -> Measure:
    """Re-measure a checkpoint with ``python -m trainers eval --model PATH --spec SPEC --out F``:
    the same evaluation code on the same frozen eval set (and probe set) as the run. F is
    ``eval/champion.json`` in the run's folder, the samples beside it (registry/review.py shows
    them beside the challenger's)."""

    def measure(model: Path) -> EvalReport:
        out = RunSpec.load(spec_path).output_dir / "eval" / "champion.json"
        out.unlink(missing_ok=True)  # a report of an earlier attempt is not this one
        proc = subprocess.run(
            [sys.executable, "-m", "trainers", "eval", "--model", str(model), "--spec", str(spec_path), "--out", str(out)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            raise MeasureError(f"trainers eval of {model} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return EvalReport.model_validate_json(out.read_text())

    return measure


def deferred_measure(model: Path) -> EvalReport:
    """``--defer-measure``: a measurement is needed, the caller must hold the GPU first."""
    raise NeedsGpu(f"the champion ({model}) has no score on this eval set: re-measure it in the GPU slot")


def load_inputs(spec_path: Path, result_path: Path, log_path: Path | None) -> tuple[RunSpec, RunResult]:
    """Read and cross-check the inputs; every problem is a RegistryError naming the file and field."""
    for label, path in (("spec", spec_path), ("result", result_path), ("log", log_path)):
        if path is not None and not path.is_file():
            raise RegistryError(f"{label} file {path} does not exist")
    try:
        spec = RunSpec.load(spec_path)
    except ValueError as exc:
        raise RegistryError(f"{spec_path}: invalid run spec: {exc}") from None
    try:
        result = RunResult.load(result_path)
    except ValueError as exc:
        raise RegistryError(f"{result_path}: invalid run result: {exc}") from None
    if spec.mlflow is None:
        raise RegistryError(f"{spec_path}: field mlflow is not set (tracking_uri, experiment, registered_model)")
    if result.run_id != spec.run_id:
        raise RegistryError(f"{result_path}: run_id {result.run_id} != spec run_id {spec.run_id}")
    if result.status == "succeeded":
        if not result.checkpoint or not Path(result.checkpoint).is_dir():
            raise RegistryError(f"{result_path}: field checkpoint: {result.checkpoint!r} is not a folder")
        if result.eval is None:
            raise RegistryError(f"{result_path}: field eval is missing for a succeeded run")
    return spec, result


def champion_report(reg: Registry, champion: ModelVersion | None, spec: RunSpec, result: RunResult,
                    measure: Measure, cache_dir: Path | None) -> tuple[EvalReport | None, str]:
    """The champion on the challenger's eval set (with its slices and probe set: gate.comparable),
    and where that report came from."""
    if champion is None:
        return None, "none"
    eval_hash = result.eval.eval_set_hash
    if spec.champion_version == str(champion.version) and result.eval_start and comparable(result.eval_start, result.eval):
        return result.eval_start, "eval_start"
    stored = reg.stored_report(champion, eval_hash)
    if stored is not None and comparable(stored, result.eval):
        return reg.with_logged_samples(champion, stored, spec.output_dir / "eval" / "champion_logged"), "tags"
    report = measure(reg.local_path(champion, cache_dir))
    if not comparable(report, result.eval):
        raise MeasureError(f"re-measured champion on eval set {report.eval_set_hash} (probe set "
                           f"{report.probe and report.probe.probe_set_hash}), expected {eval_hash} (probe set "
                           f"{result.eval.probe and result.eval.probe.probe_set_hash})")
    reg.tag_version(champion.name, str(champion.version), summary_tags(report, None) | {
        "atlasd.eval_set_hash": champion.tags.get("atlasd.eval_set_hash", eval_hash)})
    return report, "re-measured"


def finalize(
    spec: RunSpec,
    result: RunResult,
    *,
    log_path: Path | None,
    measure: Measure,
    source_mode: SourceMode = "artifacts",
    artifact_root: str | None = None,
    cache_dir: Path | None = None,
    actor: str = "atlasd",
    revoked: int | None = None,
) -> dict:
    """``revoked``: how many trained-on sessions were revoked before this registration (None: lineage
    unknown): the gate's ``untainted`` check."""
    assert spec.mlflow is not None
    reg = Registry(spec.mlflow.resolved_tracking_uri())
    experiment_id, mlflow_run_id = log_run(
        reg.client, spec, result, log_path=log_path,
        upload_checkpoint=source_mode == "artifacts" and result.status == "succeeded", artifact_root=artifact_root,
    )
    out = {"policy": spec.policy, "atlasd_run_id": spec.run_id, "experiment_id": experiment_id,
           "mlflow_run_id": mlflow_run_id, "registered_model": spec.mlflow.registered_model,
           "model_version": None, "decision": "not_registered", "reason": "", "checks": [],
           "previous_champion": None, "champion": None}
    name = spec.mlflow.registered_model
    if result.status != "succeeded":
        out["reason"] = f"run {result.status}: logged, not registered"
        return out
    if source_mode == "artifacts":
        source = f"{reg.client.get_run(mlflow_run_id).info.artifact_uri.rstrip('/')}/{CHECKPOINT_ARTIFACT}"
    else:
        source = Path(result.checkpoint).resolve().as_uri()
    baseline = spec.targets.summarize(result.eval)  # the policy's targets, as the trainer's own summary
    run = run_tags(spec, result)
    tags = summary_tags(result.eval, baseline) | {k: run[k] for k in VERSION_RUN_TAGS if k in run} | {
        "atlasd.checkpoint_path": str(Path(result.checkpoint).resolve())}
    mv = reg.register(name, spec.policy, source, mlflow_run_id, spec.run_id, tags)
    out["model_version"] = str(mv.version)
    champion = reg.alias(name, CHAMPION)
    rolled_back = mv.tags.get("atlasd.rolled_back_at")
    if rolled_back:
        # promoted, then rolled back by an operator: a replay never undoes the rollback, even when the
        # promotion was interrupted before its decision was tagged
        out.update(decision=mv.tags.get(TAG_DECISION) or "promote", previous_champion=mv.tags.get(TAG_PREVIOUS) or None,
                   reason=f"rolled back to v{mv.tags.get('atlasd.rolled_back_to')} at {rolled_back}; not promoted again",
                   checks=[json.loads(v) for k, v in sorted(mv.tags.items()) if k.startswith("gate.")], replayed=True)
    elif mv.tags.get(TAG_DECISION) or (champion is not None and str(champion.version) == str(mv.version)):
        # decided by an earlier attempt: report what was recorded (finishing an interrupted promotion)
        decision = mv.tags.get(TAG_DECISION) or "promote"
        if decision == "promote" and mv.tags.get("atlasd.promoted_at") is None:
            out["previous_champion"] = reg.set_champion(name, str(mv.version))
            reg.tag_version(name, str(mv.version), {TAG_DECISION: "promote", "atlasd.promoted_at": now_iso()})
        else:
            out["previous_champion"] = mv.tags.get(TAG_PREVIOUS) or None
        out["decision"] = decision
        out["reason"] = mv.tags.get("atlasd.reason", "promoted by an earlier, interrupted attempt")
        out["checks"] = [json.loads(v) for k, v in sorted(mv.tags.items()) if k.startswith("gate.")]
        out["replayed"] = True
    else:
        champ_report, origin = champion_report(reg, champion, spec, result, measure, cache_dir)
        gate = decide(spec.targets, result.eval, baseline, champ_report, revoked)
        out.update(decision=gate.decision, reason=gate.reason, checks=[c.model_dump() for c in gate.checks],
                   champion_metrics_from=origin)
        publish(reg.client, name, str(mv.version), mlflow_run_id, spec, result.eval, gate,
                str(champion.version) if champion else None, champ_report, origin)
        if gate.decision == "promote":
            out["previous_champion"] = reg.set_champion(name, str(mv.version))
        # tagged after the alias move: a crash in between is finished by the branch above
        reg.tag_decision(name, str(mv.version), gate.decision, gate.reason, actor, gate.checks)
        if gate.decision == "promote":
            reg.tag_version(name, str(mv.version), {"atlasd.promoted_at": now_iso()})
    current = reg.alias(name, CHAMPION)
    out["champion"] = str(current.version) if current else None
    return out
