"""The promotion gate: a pure function of the policy's targets, the challenger's evaluation, its
summary against the configured baseline (``Targets.summarize(challenger)``: the formulas live
there, not here) and the champion's evaluation on the same frozen eval set.

The challenger is promoted only when every check is met:

- the baseline checks of the summary (success delta, token reduction; the token check is absent
  when no token baseline is configured, exactly as ``BaselineSummary.meets_all_targets`` says);
- when ``targets.must_beat_champion`` and a champion exists: ``beats_champion``;
- non-regression, per slice of the eval set (its learning keys: one for a policy of one key, those
  present for a policy of every key) ``no_regression:<key>`` and, with a probe set,
  ``probe_no_regression``: the challenger's success is at least the champion's less
  ``targets.max_regression_pp`` percentage points (1e-9 of float error allowed). No champion yet:
  met. A champion without a result on the slice (another eval or probe set): not met;
- with a probe set (or ``targets.max_drift``): ``probe_drift``, the challenger's KL to the base
  student on the probe set (trainers/evaluate.py), met unless ``targets.max_drift`` is set and
  exceeded (or set without a probe set to measure it);
- when the run's lineage is known (``revoked`` is not None): ``untainted``, none of the sessions it
  trained on was revoked before its registration (atlasd/lineage.py).

"Beats" is defined on the same eval set only (equal ``eval_set_hash``), in this order:
success rate strictly higher; or success rate equal (within 1e-9: rates are k/n on the same n)
and strictly fewer average generated tokens. A full tie (equal success, equal tokens) does NOT
beat the champion: the champion stays, so an equivalent checkpoint never churns the alias.
With no champion yet, ``beats_champion`` is met ("no champion yet").
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import BaseModel

from atlasd.runspec import BaselineSummary, EvalReport, ProbeReport, SliceResult, Targets, TargetCheck

SUCCESS_EPS = 1e-9
NO_REGRESSION = "no_regression:"  # + the slice's learning key (slice_label)
PROBE_NO_REGRESSION = "probe_no_regression"
PROBE_DRIFT = "probe_drift"
_UNSAFE = re.compile(r"[^\w.\- :]")  # what an MLflow tag key (gate.<check>) cannot hold


class GateDecision(BaseModel):
    decision: Literal["promote", "reject"]
    checks: list[TargetCheck]

    @property
    def reason(self) -> str:
        failed = [c for c in self.checks if not c.met]
        if not failed:
            return "all targets met"
        return "; ".join(f"{c.name}: {c.reason or 'not met'}" for c in failed)


def beats_champion(challenger: EvalReport, champion: EvalReport | None) -> TargetCheck:
    name = "beats_champion"
    if champion is None:
        return TargetCheck(name=name, value=challenger.success_rate, threshold=None, met=True, reason="no champion yet")
    if champion.eval_set_hash != challenger.eval_set_hash:
        return TargetCheck(
            name=name, value=challenger.success_rate, threshold=champion.success_rate, met=False,
            reason=f"champion measured on another eval set ({champion.eval_set_hash} != {challenger.eval_set_hash})",
        )
    diff = challenger.success_rate - champion.success_rate
    tokens = f"tokens {challenger.avg_tokens:g} vs {champion.avg_tokens:g}"
    if diff > SUCCESS_EPS:
        met, why = True, "higher success"
    elif diff < -SUCCESS_EPS:
        met, why = False, "lower success"
    elif challenger.avg_tokens < champion.avg_tokens:
        met, why = True, "equal success, fewer tokens"
    elif challenger.avg_tokens == champion.avg_tokens:
        met, why = False, "tie (equal success and tokens): the champion stays"
    else:
        met, why = False, "equal success, more tokens"
    return TargetCheck(
        name=name, value=challenger.success_rate, threshold=champion.success_rate, met=met,
        reason=f"{why}: success {challenger.success_rate:g} vs {champion.success_rate:g}, {tokens}",
    )


def slice_label(key: str) -> str:
    """A learning key as it stands in a check's name, and so in an MLflow tag key: the key itself when
    it is 1-100 word characters, '.', '-', ' ' or ':', else those of its first 80 and 8 hex digits of
    its sha256."""
    if not _UNSAFE.search(key) and 0 < len(key) <= 100:
        return key
    return f"{_UNSAFE.sub('_', key[:80])}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def no_regression(name: str, challenger: SliceResult, champion: SliceResult | None, max_pp: float,
                  missing: str) -> TargetCheck:
    """Met when the challenger's success on the slice is at least the champion's less ``max_pp``
    points; ``missing``: why the champion has no result on it (never met)."""
    if champion is None:
        return TargetCheck(name=name, value=challenger.success_rate, threshold=None, met=False, reason=missing)
    threshold = champion.success_rate - max_pp / 100
    change = (challenger.success_rate - champion.success_rate) * 100
    met = challenger.success_rate >= threshold - SUCCESS_EPS
    return TargetCheck(
        name=name, value=challenger.success_rate, threshold=threshold, met=met,
        reason=f"success {challenger.success_rate:g} vs champion {champion.success_rate:g} on {challenger.n_samples} "
               f"samples: {change:+.1f} pp ({'within' if met else 'beyond'} -{max_pp:g} pp)")


def non_regression(targets: Targets, challenger: EvalReport, champion: EvalReport | None) -> list[TargetCheck]:
    """``no_regression:<key>`` per slice of the challenger's eval set, then ``probe_no_regression``."""
    rows: list[tuple[str, SliceResult, SliceResult | None, str]] = []  # name, challenger, champion, why none
    for key, result in challenger.slices.items():
        if champion is not None and champion.eval_set_hash != challenger.eval_set_hash:
            theirs, why = None, f"champion measured on another eval set ({champion.eval_set_hash})"
        else:
            theirs, why = (champion.slices.get(key) if champion else None), "the champion has no result on this slice"
        rows.append((NO_REGRESSION + slice_label(key), result, theirs, why))
    probe = challenger.probe
    if probe is not None:
        theirs = champion.probe if champion is not None else None
        same = theirs is not None and theirs.probe_set_hash == probe.probe_set_hash
        rows.append((PROBE_NO_REGRESSION, _as_slice(probe), _as_slice(theirs) if same else None,
                     "the champion was not measured on this probe set"))
    if champion is None:
        return [TargetCheck(name=name, value=result.success_rate, threshold=None, met=True, reason="no champion yet")
                for name, result, _, _ in rows]
    return [no_regression(name, result, theirs, targets.max_regression_pp, why) for name, result, theirs, why in rows]


def _as_slice(probe: ProbeReport) -> SliceResult:
    return SliceResult(n_samples=probe.n_samples, success_rate=probe.success_rate)


def drift(targets: Targets, probe: ProbeReport | None) -> TargetCheck:
    """``probe_drift``: the challenger's KL to the base student on the probe set; blocking only
    under ``targets.max_drift``."""
    value = probe.drift_kl if probe is not None else None
    if targets.max_drift is None:
        return TargetCheck(name=PROBE_DRIFT, value=value, threshold=None, met=True,
                           reason="reported, not gated (no targets.max_drift)")
    if value is None:
        why = "no probe set to measure drift on" if probe is None else "no drift measured (no generated tokens)"
        return TargetCheck(name=PROBE_DRIFT, value=None, threshold=targets.max_drift, met=False, reason=why)
    met = value <= targets.max_drift
    return TargetCheck(name=PROBE_DRIFT, value=value, threshold=targets.max_drift, met=met,
                       reason=f"KL to the base student {value:.4g} {'<=' if met else '>'} {targets.max_drift:g}")


def comparable(champion: EvalReport, challenger: EvalReport) -> bool:
    """The champion's report measures what the gate compares: the challenger's eval set, its slices
    when it has any, and its probe set when it has one."""
    probe = challenger.probe
    return (champion.eval_set_hash == challenger.eval_set_hash
            and (bool(champion.slices) or not challenger.slices)
            and (probe is None or (champion.probe is not None
                                   and champion.probe.probe_set_hash == probe.probe_set_hash)))


def untainted(revoked: int) -> TargetCheck:
    why = ("no trained-on session revoked" if revoked == 0
           else f"trained on {revoked} session(s) revoked since: a tainted version is never promoted")
    return TargetCheck(name="untainted", value=revoked, threshold=0, met=revoked == 0, reason=why)


def decide(
    targets: Targets,
    challenger: EvalReport,
    baseline: BaselineSummary,
    champion: EvalReport | None,
    revoked: int | None = None,
) -> GateDecision:
    checks = list(baseline.checks)  # Targets.summarize: success_delta, token_reduction_pct if a token baseline
    if targets.must_beat_champion:
        checks.append(beats_champion(challenger, champion))
    checks += non_regression(targets, challenger, champion)
    if challenger.probe is not None or targets.max_drift is not None:
        checks.append(drift(targets, challenger.probe))
    if revoked is not None:
        checks.append(untainted(revoked))
    return GateDecision(decision="promote" if all(c.met for c in checks) else "reject", checks=checks)
