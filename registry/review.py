"""What a reviewer reads in MLflow about a gate decision, written by ``registry.finalize`` right
after the gate decides and before the decision is tagged (a retry writes it again):

- the model version's description, in markdown: the decision, the gate table (check, value,
  threshold, met) and the slices, champion vs challenger (each learning key of the eval set, the
  probe set) with the drift. At most 5000 characters (MLflow's column): a longer one is cut at a
  line, and every check stays in the version's ``gate.*`` tags;
- the MLflow run's ``eval/samples.json`` and ``probe/samples.json`` written again with the
  champion's answer beside the challenger's (registry.tracking.log_side_by_side), when the
  champion's samples are at hand: measured for this run (its start evaluation, or a re-measure in
  its folder), or, when its metrics come from its version's tags, the samples its own MLflow run
  logged on the same eval set (Registry.with_logged_samples).
"""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from atlasd.runspec import EvalReport, ProbeReport, RunSpec, SliceResult
from registry.gate import GateDecision
from registry.tracking import log_side_by_side

DESCRIPTION_MAX = 5000


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _probe_slice(probe: ProbeReport | None, like: ProbeReport | None) -> SliceResult | None:
    """The probe report as a slice (None: none, or measured on another probe set than ``like``)."""
    if probe is None or (like is not None and probe.probe_set_hash != like.probe_set_hash):
        return None
    return SliceResult(n_samples=probe.n_samples, success_rate=probe.success_rate)


def description(spec: RunSpec, gate: GateDecision, challenger: EvalReport, champion_version: str | None,
                champion: EvalReport | None, origin: str) -> str:
    heading = f"atlasd run {spec.run_id} of policy {spec.policy} ({spec.gear} gear): **{gate.decision}**: {_cell(gate.reason)}"
    lines = [heading, "", "| check | value | threshold | met |", "|---|---|---|---|"]
    lines += [f"| {_cell(c.name)} | {_num(c.value)} | {_num(c.threshold)} | {'yes' if c.met else '**no**'} |"
              for c in gate.checks]
    against = f"champion v{champion_version} (metrics from {origin})" if champion is not None else "no champion yet"
    lines += ["", f"Slices, {against} vs this version:", "",
              "| slice | samples | champion | challenger | change (pp) |", "|---|---|---|---|---|"]
    rows = [(key, ours, champion.slices.get(key) if champion is not None else None)
            for key, ours in challenger.slices.items()]
    if challenger.probe is not None:
        rows.append(("(probe set)", _probe_slice(challenger.probe, None),
                     _probe_slice(champion.probe if champion else None, challenger.probe)))
    for name, ours, theirs in rows:
        change = "–" if theirs is None else f"{(ours.success_rate - theirs.success_rate) * 100:+.1f}"
        lines.append(f"| {_cell(name)} | {ours.n_samples} | {_num(theirs.success_rate if theirs else None)} | "
                     f"{_num(ours.success_rate)} | {change} |")
    if challenger.probe is not None:
        theirs = champion.probe if champion is not None and _probe_slice(champion.probe, challenger.probe) else None
        lines += ["", (f"Drift, KL to the base student on the probe set: {_num(challenger.probe.drift_kl)} "
                       f"(champion: {_num(theirs.drift_kl if theirs else None)})")]
    return _cut(lines)


def _cut(lines: list[str]) -> str:
    text = "\n".join(lines)
    if len(text) <= DESCRIPTION_MAX:
        return text
    note = "\n\n… cut at 5000 characters: every check is in the version's gate.* tags"
    return text[: text.rfind("\n", 0, DESCRIPTION_MAX - len(note))] + note


def publish(client: MlflowClient, name: str, version: str, mlflow_run_id: str, spec: RunSpec, result_eval: EvalReport,
            gate: GateDecision, champion_version: str | None, champion: EvalReport | None, origin: str) -> None:
    """The version's description, then the side-by-side samples tables (module docstring)."""
    client.update_model_version(name, version, description=description(
        spec, gate, result_eval, champion_version, champion, origin))
    if champion is None:
        return
    pairs = [("eval", result_eval.samples_path, champion.samples_path)]
    if result_eval.probe is not None and _probe_slice(champion.probe, result_eval.probe) is not None:
        pairs.append(("probe", result_eval.probe.samples_path, champion.probe.samples_path))
    for label, ours, theirs in pairs:
        if ours and theirs and Path(ours).is_file() and Path(theirs).is_file():
            log_side_by_side(client, mlflow_run_id, label, Path(ours), Path(theirs))
