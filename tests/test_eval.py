"""Baseline comparison (docs/atlas-sdk.md formulas) and evaluation of a tiny model."""

from __future__ import annotations

import json

import pytest

from atlasd.runspec import EvalReport, Targets
from trainers.dataset import Example, eval_set_hash
from trainers.evaluate import evaluate


def report(rate: float, tokens: float, n: int = 50) -> EvalReport:
    return EvalReport(model="m", eval_set_hash="h", n_samples=n, success_rate=rate, avg_tokens=tokens)


def test_baseline_formulas():
    s = Targets(baseline_success=0.5, baseline_tokens=100.0).summarize(report(0.6, 70.0))
    assert s.success_delta == pytest.approx(0.1)
    assert s.token_reduction_pct == pytest.approx(30.0)
    assert s.meets_success_target and s.meets_token_target and s.meets_all_targets  # 0.6-0.5 meets 0.10
    assert [c.name for c in s.checks] == ["success_delta", "token_reduction_pct"]

    s = Targets(baseline_success=0.5, baseline_tokens=100.0).summarize(report(0.7, 80.0))
    assert s.token_reduction_pct == pytest.approx(20.0)
    assert s.meets_success_target and s.meets_token_target is False and not s.meets_all_targets

    s = Targets(baseline_success=0.5, baseline_tokens=100.0).summarize(report(0.55, 10.0))
    assert not s.meets_success_target and s.meets_token_target and not s.meets_all_targets

    # longer than the baseline: a negative reduction, not met
    s = Targets(baseline_success=0.5, baseline_tokens=30.0, min_success_delta=0.0).summarize(report(0.5, 96.5))
    assert s.token_reduction_pct == pytest.approx((30 - 96.5) / 30 * 100) and not s.meets_token_target


def test_no_token_baseline_means_success_alone():
    s = Targets(baseline_success=0.5).summarize(report(0.65, 500.0))
    assert s.token_reduction_pct is None and s.meets_token_target is None
    assert s.meets_all_targets and len(s.checks) == 1


def test_missing_measures_are_never_met():
    s = Targets().summarize(report(0.9, 10.0))  # no baselines at all
    assert s.success_delta is None and not s.meets_success_target and not s.meets_all_targets
    assert s.checks[0].reason == "no baseline_success"
    s = Targets(baseline_success=0.1, baseline_tokens=50.0).summarize(report(0.0, 0.0, n=0))  # empty eval set
    assert s.success_delta is None and s.token_reduction_pct is None  # not a fake 100 % reduction
    assert not s.meets_success_target and s.meets_token_target is False and not s.meets_all_targets


def test_evaluate_tiny_model(tiny_frozen, tmp_path):
    tok, student, teacher, device = tiny_frozen
    examples = [Example(session_id=i, seq=i, prompt=[{"role": "system", "content": f"Task: {i} + 1?"}],
                        completion=f"Final Answer: {i + 1}", reference=str(i + 1)) for i in range(5)]
    always = lambda gen, ref: True  # noqa: E731
    rep = evaluate(student, tok, examples, always, model_name="s", max_new_tokens=6, max_prompt_tokens=64,
                   device=device, teacher=teacher, batch_size=2, samples_path=tmp_path / "s.jsonl")
    assert rep.n_samples == 5 and rep.success_rate == 1.0
    assert 0 <= rep.avg_tokens <= 6
    assert rep.reverse_kl is not None and rep.reverse_kl > 0
    assert rep.eval_set_hash == eval_set_hash(reversed(examples))
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["session_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert set(rows[0]) == {"session_id", "learning_key", "prompt", "generation", "reference", "correct", "tokens"}
    # greedy: the same report twice; the student against itself has zero reverse KL
    again = evaluate(student, tok, examples, always, model_name="s", max_new_tokens=6, max_prompt_tokens=64,
                     device=device, teacher=student, batch_size=3)
    assert again.avg_tokens == rep.avg_tokens and again.reverse_kl == pytest.approx(0.0, abs=1e-6)
