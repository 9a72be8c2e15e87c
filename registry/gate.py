"""The promotion gate: a pure function of the policy's targets, the challenger's evaluation, its
summary against the configured baseline (``Targets.summarize(challenger)``: the formulas live
there, not here) and the champion's evaluation on the same frozen eval set.

The challenger is promoted only when every check is met:

- the baseline checks of the summary (success delta, token reduction; the token check is absent
  when no token baseline is configured, exactly as ``BaselineSummary.meets_all_targets`` says);
- when ``targets.must_beat_champion`` and a champion exists: ``beats_champion``.

"Beats" is defined on the same eval set only (equal ``eval_set_hash``), in this order:
success rate strictly higher; or success rate equal (within 1e-9: rates are k/n on the same n)
and strictly fewer average generated tokens. A full tie (equal success, equal tokens) does NOT
beat the champion: the champion stays, so an equivalent checkpoint never churns the alias.
With no champion yet, ``beats_champion`` is met ("no champion yet").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from atlasd.runspec import BaselineSummary, EvalReport, Targets, TargetCheck

SUCCESS_EPS = 1e-9


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


def decide(
    targets: Targets,
    challenger: EvalReport,
    baseline: BaselineSummary,
    champion: EvalReport | None,
) -> GateDecision:
    checks = list(baseline.checks)  # Targets.summarize: success_delta, token_reduction_pct if a token baseline
    if targets.must_beat_champion:
        checks.append(beats_champion(challenger, champion))
    return GateDecision(decision="promote" if all(c.met for c in checks) else "reject", checks=checks)
