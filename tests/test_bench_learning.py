"""bench/learning.py's policy and options (the benchmark itself is `make bench-learning`: minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlasd import evalsplit
from atlasd.policies import parse_policy
from bench import learning


def test_the_benchmark_policy_has_one_gear_per_rehearsal_fraction_and_one_eval_split(tmp_path) -> None:
    text = learning.policy_text(Path("/m/teacher"), Path("/m/student"), lr=5e-4, steps=400, rehearsal=[0.0, 0.1, 0.5])
    policy = parse_policy(text, file=str(tmp_path / "learning.yaml"), stem=learning.POLICY)
    assert policy.learning_key is None  # every key: task A and task B are slices of one eval set
    assert {name: g.filters.rehearsal_fraction for name, g in policy.gears.items()} == {
        "rehearsal-0": 0.0, "rehearsal-0.1": 0.1, "rehearsal-0.5": 0.5}
    assert {(g.optim.learning_rate, g.optim.max_steps) for g in policy.gears.values()} == {(5e-4, 400)}
    assert evalsplit.configured(policy) == (learning.POLICY, 0.2)
    assert policy.targets.max_regression_pp == 2.0 and policy.targets.must_beat_champion
    spec = policy.run_spec("rehearsal-0.1", run_id=3, trigger="manual", window_lo=394, window_hi=900, student=None,
                           champion_version="1", output_dir=tmp_path / "run")
    assert spec.traces.rehearsal_fraction == 0.1 and spec.traces.learning_key is None


def test_rehearsal_option_sorts_deduplicates_and_names_a_bad_value(capsys) -> None:
    parser_args = learning.parse_args(["--rehearsal", "0.5,0,0.1,0.1"])
    assert parser_args.rehearsal == [0.0, 0.1, 0.5]
    for bad, why in (("0,x", "'x' is not a number"), ("0,1", "'1': a rehearsal fraction is at least 0 and below 1")):
        with pytest.raises(SystemExit):
            learning.parse_args(["--rehearsal", bad])
        assert why in capsys.readouterr().err
