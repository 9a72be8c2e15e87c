"""The model registry: one registered model per policy (found by its ``atlasd.policy`` tag), one
version per atlasd run (found by its ``atlasd.run_id`` tag), the ``challenger`` and ``champion``
aliases, promotion bookkeeping and rollback, and champion checkpoint resolution."""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from atlasd.runspec import EvalReport
from registry import (
    CHALLENGER,
    CHAMPION,
    TAG_DECISION,
    TAG_POLICY,
    TAG_PREVIOUS,
    TAG_PREVIOUS_OF,
    TAG_RUN_ID,
    TAG_TAINTED,
    RegistryError,
)
from registry.checkpoint import check_loadable

EVAL_TAG_PREFIX = "atlasd.eval."  # + eval_set_hash: an EvalReport (JSON) of this version on that eval set
SUMMARY_TAGS = ("eval.success_rate", "eval.avg_tokens", "metrics.success_delta", "metrics.token_reduction_pct")


def _is(exc: MlflowException, code: int) -> bool:
    return exc.error_code == ErrorCode.Name(code)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # registered models -------------------------------------------------------------------
    def ensure_model(self, name: str, policy: str) -> None:
        try:
            self.client.create_registered_model(
                name, tags={TAG_POLICY: policy}, description=f"atlasd policy {policy}: one version per run"
            )
        except MlflowException as exc:
            if not _is(exc, RESOURCE_ALREADY_EXISTS):
                raise
            owner = self.client.get_registered_model(name).tags.get(TAG_POLICY)
            if owner != policy:
                raise RegistryError(f"registered model {name!r} belongs to policy {owner!r}, not {policy!r}") from None

    def model_for_policy(self, policy: str) -> str:
        found = self.client.search_registered_models(f"tags.`{TAG_POLICY}` = '{_quote(policy)}'")
        if not found:
            raise RegistryError(f"no registered model for policy {policy!r} (no run of it was registered yet)")
        if len(found) > 1:
            raise RegistryError(f"policy {policy!r} has several registered models: {[m.name for m in found]}")
        return found[0].name

    def policies(self) -> dict[str, str]:
        """policy -> registered model name, for every atlasd-managed model."""
        models = self.client.search_registered_models(f"tags.`{TAG_POLICY}` LIKE '%'", max_results=1000)
        return {m.tags[TAG_POLICY]: m.name for m in models}

    # versions ----------------------------------------------------------------------------
    def version(self, name: str, version: str | int) -> ModelVersion:
        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if _is(exc, RESOURCE_DOES_NOT_EXIST):
                raise RegistryError(f"model {name!r} has no version {version}") from None
            raise

    def version_for_run(self, name: str, atlasd_run_id: int) -> ModelVersion | None:
        found = self.client.search_model_versions(f"name = '{_quote(name)}' and tags.`{TAG_RUN_ID}` = '{atlasd_run_id}'")
        return min(found, key=lambda v: int(v.version)) if found else None

    def versions(self, name: str) -> list[ModelVersion]:
        found = self.client.search_model_versions(f"name = '{_quote(name)}'", max_results=10000)
        return sorted(found, key=lambda v: int(v.version))

    def register(self, name: str, policy: str, source: str, mlflow_run_id: str, atlasd_run_id: int,
                 tags: dict[str, str]) -> ModelVersion:
        """One version per atlasd run: an existing one is returned, never a second created."""
        self.ensure_model(name, policy)
        existing = self.version_for_run(name, atlasd_run_id)
        if existing is not None:
            return existing
        # the run-id tag is written in the same insert as the version, so a retry always finds it
        mv = self.client.create_model_version(
            name, source, run_id=mlflow_run_id, tags={**tags, TAG_RUN_ID: str(atlasd_run_id)},
            description=f"atlasd run {atlasd_run_id} of policy {policy}",
        )
        self.client.set_registered_model_alias(name, CHALLENGER, str(mv.version))
        return self.version(name, str(mv.version))

    def alias(self, name: str, alias: str) -> ModelVersion | None:
        version = self.client.get_registered_model(name).aliases.get(alias)
        return self.version(name, version) if version is not None else None

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    def tag_decision(self, name: str, version: str, action: str, reason: str, actor: str, checks: list) -> None:
        tags = {TAG_DECISION: action, "atlasd.reason": reason[:5000], "atlasd.actor": actor, "atlasd.decided_at": now_iso()}
        for check in checks:
            tags[f"gate.{check.name}"] = check.model_dump_json()
        self.tag_version(name, version, tags)

    # champion ----------------------------------------------------------------------------
    def set_champion(self, name: str, version: str) -> str | None:
        """Move ``champion`` to ``version``; return the previous champion's version (None if none)."""
        previous = self.alias(name, CHAMPION)
        if previous is not None and str(previous.version) == str(version):
            return previous.tags.get(TAG_PREVIOUS) or None
        prev_v = str(previous.version) if previous is not None else None
        self.tag_version(name, str(version), {TAG_PREVIOUS: prev_v or ""})
        if prev_v:
            self.tag_version(name, prev_v, {TAG_PREVIOUS_OF: str(version)})
        self.client.set_registered_model_alias(name, CHAMPION, str(version))
        return prev_v

    def rollback_target(self, name: str) -> tuple[ModelVersion, ModelVersion]:
        current = self.alias(name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back")
        previous = current.tags.get(TAG_PREVIOUS)
        if not previous:
            raise RegistryError(f"champion {name} v{current.version} has no previous champion to roll back to")
        return current, self.version(name, previous)

    def rollback(self, name: str, cache_dir: Path | None) -> tuple[str, str, dict]:
        """Move ``champion`` back to the champion it replaced, once that one's files load."""
        current, target = self.rollback_target(name)
        loadable = check_loadable(self.local_path(target, cache_dir))
        self.client.set_registered_model_alias(name, CHAMPION, str(target.version))
        self.tag_version(name, str(current.version), {"atlasd.rolled_back_to": str(target.version),
                                                 "atlasd.rolled_back_at": now_iso()})
        return str(current.version), str(target.version), loadable

    # checkpoints -------------------------------------------------------------------------
    def local_path(self, mv: ModelVersion, cache_dir: Path | None) -> Path:
        """A local folder with the version's checkpoint: the source itself when it is a local path,
        else a download into ``cache_dir/<model>/<version>`` (kept for the next call)."""
        source = mv.source
        parsed = urlparse(source)
        if parsed.scheme in ("", "file"):
            path = Path(unquote(parsed.path) if parsed.scheme == "file" else source)
            if not path.exists():
                raise RegistryError(f"{mv.name} v{mv.version}: checkpoint {path} no longer exists")
            return path
        if cache_dir is None:
            raise RegistryError(f"{mv.name} v{mv.version}: source {source} is remote; give --cache-dir")
        from mlflow.artifacts import download_artifacts

        final = Path(cache_dir) / mv.name / str(mv.version)
        if final.is_dir():
            return final
        tmp = final.with_name(f".{mv.version}.{time.time_ns()}")
        tmp.mkdir(parents=True)
        try:
            got = Path(download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=self.tracking_uri))
            got.rename(final) if got != tmp else tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    # views -------------------------------------------------------------------------------
    @staticmethod
    def stored_report(mv: ModelVersion, eval_set_hash: str) -> EvalReport | None:
        raw = mv.tags.get(EVAL_TAG_PREFIX + eval_set_hash)
        return EvalReport.model_validate_json(raw) if raw else None

    def with_logged_samples(self, mv: ModelVersion, report: EvalReport, dest: Path) -> EvalReport:
        """``report`` (the version's stored report) with the samples its own MLflow run logged, copied
        under ``dest``, when that run measured this eval set (its own final evaluation: the tag
        ``atlasd.eval_set_hash``); the probe samples with them. Else, or when they cannot be read
        (the review then lacks the champion's answers, the gate does not need them), as it is."""
        if not mv.run_id or mv.tags.get("atlasd.eval_set_hash") != report.eval_set_hash:
            return report
        found: dict[str, str] = {}
        try:
            for label in ("eval", "probe") if report.probe is not None else ("eval",):
                jsonl = [a.path for a in self.client.list_artifacts(mv.run_id, label) if a.path.endswith(".jsonl")]
                if len(jsonl) == 1:
                    found[label] = self.client.download_artifacts(mv.run_id, jsonl[0], str(dest))
        except (MlflowException, OSError) as exc:
            print(f"champion v{mv.version}'s logged samples not read (no side-by-side answers): {exc}",
                  file=sys.stderr)
            return report
        probe = report.probe and report.probe.model_copy(update={"samples_path": found.get("probe")})
        return report.model_copy(update={"samples_path": found.get("eval"), "probe": probe})

    def describe(self, mv: ModelVersion) -> dict:
        return {
            "version": str(mv.version), "aliases": sorted(mv.aliases), "atlasd_run_id": _int(mv.tags.get(TAG_RUN_ID)),
            "decision": mv.tags.get(TAG_DECISION), "mlflow_run_id": mv.run_id, "source": mv.source,
            "created_at": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            "previous_champion": mv.tags.get(TAG_PREVIOUS) or None,
            "tainted": _int(mv.tags.get(TAG_TAINTED)),
            **{k: _float(mv.tags.get(k)) for k in SUMMARY_TAGS},
        }

    def models(self, policy: str | None) -> list[dict]:
        names = {policy: self.model_for_policy(policy)} if policy else self.policies()
        out = []
        for pol, name in sorted(names.items()):
            rm = self.client.get_registered_model(name)
            out.append({"policy": pol, "registered_model": name, "aliases": {a: str(v) for a, v in rm.aliases.items()},
                        "versions": [self.describe(mv) for mv in self.versions(name)]})
        return out


def _quote(value: str) -> str:
    return value.replace("'", "''")


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _without_samples(report: EvalReport) -> EvalReport:
    """The report without its samples' paths: files of one run's folder, not a property of the version."""
    probe = report.probe and report.probe.model_copy(update={"samples_path": None})
    return report.model_copy(update={"samples_path": None, "probe": probe})


def summary_tags(report: EvalReport, baseline) -> dict[str, str]:
    tags = {"eval.success_rate": str(report.success_rate), "eval.avg_tokens": str(report.avg_tokens),
            "eval.n_samples": str(report.n_samples), "atlasd.eval_set_hash": report.eval_set_hash,
            EVAL_TAG_PREFIX + report.eval_set_hash: _without_samples(report).model_dump_json()}
    if report.reverse_kl is not None:
        tags["eval.reverse_kl"] = str(report.reverse_kl)
    if baseline is not None:
        if baseline.success_delta is not None:
            tags["metrics.success_delta"] = str(baseline.success_delta)
        if baseline.token_reduction_pct is not None:
            tags["metrics.token_reduction_pct"] = str(baseline.token_reduction_pct)
        tags["metrics.meets_target"] = json.dumps(baseline.meets_all_targets)
    return tags
