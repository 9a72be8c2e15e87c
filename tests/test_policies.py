"""Policy files: the shipped ones, 100 malformed ones (each a clear error naming file, line and
field), poison ones (binary, alias bombs, values that overflow: refused quickly, never an
exception), reload semantics (a broken file keeps its previous version; a removed one stops)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from atlasd.policies import (
    MAX_POLICY_BYTES,
    MAX_POLICY_NODES,
    Filters,
    Gear,
    Policy,
    PolicyFileError,
    PolicySet,
    RetrySettings,
    load_policy_file,
    parse_duration,
)
from atlasd.runspec import EvalSpec, GKDSettings, LoraSettings, OptimSettings, Targets
from trainers.presets import GEARS

ROOT = Path(__file__).resolve().parent.parent
BASE: dict[str, Any] = {
    "teacher": "t",
    "student": "s",
    "gears": {
        "fast": {"trigger": {"batch": {"every": 10, "min_interval": "1h"}}, "filters": {"min_reward": 0.8}},
        "hq": {
            "trigger": {"cron": {"expr": "0 3 * * sun", "timezone": "UTC"}},
            "optim": {"max_steps": None, "num_train_epochs": 5},
        },
    },
}


def test_shipped_default_policy_is_exactly_the_reference_gears() -> None:
    policy = load_policy_file(ROOT / "policies" / "default.yaml")
    assert policy.name == "default" and policy.learning_key is None
    for gear_name, preset in (("fast", "fast"), ("high-quality", "high-quality")):
        gear = policy.gears[gear_name]
        assert gear.gkd == GEARS[preset].gkd
        assert gear.optim == GEARS[preset].optim
        assert gear.filters.min_reward == GEARS[preset].min_reward
    assert policy.gears["fast"].kind == "batch" and policy.gears["high-quality"].kind == "cron"
    # the fast gear's settings are also the defaults of a gear
    fast = Gear.model_validate({"trigger": {"batch": {"every": 1}}})
    assert (fast.gkd, fast.optim, fast.filters.min_reward) == (GEARS["fast"].gkd, GEARS["fast"].optim, 0.8)


def test_shipped_example_is_valid_and_task_specific() -> None:
    policy = load_policy_file(ROOT / "policies" / "examples" / "gsm8k-math.yaml")
    assert policy.learning_key == "gsm8k-math"
    assert policy.gears["nightly"].trigger.cron.timezone == "Europe/Berlin"
    assert policy.gears["fast"].optim.lora is not None


def test_policies_readme_documents_every_field() -> None:
    readme = (ROOT / "policies" / "README.md").read_text()
    models: list[type[BaseModel]] = [Policy, Gear, Filters, RetrySettings, GKDSettings, OptimSettings, EvalSpec, Targets]
    missing = [f"{m.__name__}.{f}" for m in models for f in m.model_fields if f"`{f}`" not in readme]
    missing += [f"LoraSettings.{f}" for f in LoraSettings.model_fields if f"`{f}`" not in readme]
    assert missing == []


def test_defaults_name_paths_and_durations(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    path = tmp_path / "my-policy.yaml"
    path.write_text(yaml.safe_dump({**BASE, "teacher": "./models/teacher", "student": "org/student"}))
    policy = load_policy_file(path)
    assert policy.name == "my-policy" and policy.model_name == "my-policy"
    assert policy.teacher == str(tmp_path / "models" / "teacher") and policy.student == "org/student"
    assert (policy.retry.max_retries, policy.resume_interrupted) == (2, True)
    assert policy.gears["fast"].trigger.batch.min_interval.total_seconds() == 3600
    assert parse_duration("1h30m").total_seconds() == 5400 and parse_duration(90).total_seconds() == 90
    assert policy.gears["hq"].priority > policy.gears["fast"].priority


def test_run_spec_from_a_policy() -> None:
    policy = Policy.model_validate({**BASE, "name": "p", "learning_key": "k"})
    spec = policy.run_spec(
        "hq", run_id=7, trigger="cron", window_lo=10, window_hi=30, student=None, champion_version=None,
        output_dir=Path("/runs/7"),
    )
    assert (spec.student, spec.base_student, spec.traces.learning_key, spec.traces.window_hi) == ("s", "s", "k", 30)
    assert spec.optim.num_train_epochs == 5 and spec.gear == "hq"


def _set(data: dict, path: str, value: Any) -> dict:
    data = copy.deepcopy(data)
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


_DELETE = object()
F = "gears.fast"
H = "gears.hq"

# (case id, mutation path, value, field the error must name)
FIELD_CASES: list[tuple[str, str, Any, str]] = [
    # wrong types
    *[(f"type-{i}", path, value, path) for i, (path, value) in enumerate([
        ("teacher", 5), ("teacher", ["a"]), ("student", {"a": 1}), ("learning_key", [1, 2]),
        ("resume_interrupted", "sometimes"), ("retry.max_retries", "two"), ("targets.min_success_delta", "big"),
        ("targets.must_beat_champion", "yes please"), ("gears", ["fast"]), (f"{F}.trigger.batch.every", "ten"),
        (f"{F}.trigger.batch.every", 2.5), (f"{F}.filters.min_reward", "high"), (f"{F}.gkd.lmbda", [1]),
        (f"{F}.gkd.seq_kd", "maybe"), (f"{F}.optim.learning_rate", {"x": 1}), (f"{F}.optim.lr_scheduler_type", "warp"),
        (f"{F}.eval.max_samples", "all"), (f"{F}.wall_clock_limit", "forever"), (f"{F}.trigger.batch.min_interval", True),
        (f"{H}.trigger.cron.expr", 5), (f"{F}.optim.lora", "yes"), (f"{F}.optim.generation_backend", "tpu"),
    ])],
    # unknown fields, at every level
    *[(f"unknown-{i}", path, 1, path) for i, path in enumerate([
        "colour", "targets.min_delta", "retry.backoff", f"{F}.schedule", f"{F}.trigger.batch.size",
        f"{F}.trigger.interval", f"{F}.filters.min_score", f"{F}.gkd.alpha", f"{F}.optim.lr", f"{F}.eval.judges",
        f"{H}.trigger.cron.tz", f"{H}.priority", f"{F}.optim.lora.rank", "gear", "catchup", f"{F}.trigger.batch.every_n",
        f"{H}.filters.learning_key", f"{F}.gkd.temp", "Teacher", f"{F}.timeout",
    ])],
    # bad cron expressions and time zones
    *[(f"cron-{i}", f"{H}.trigger.cron.{field}", value, f"{H}.trigger.cron") for i, (field, value) in enumerate([
        ("expr", "0 3 * *"), ("expr", "0 3 * * * *"), ("expr", "61 3 * * *"), ("expr", "0 25 * * *"),
        ("expr", "0 3 32 * *"), ("expr", "0 3 * 13 *"), ("expr", "0 3 * * 0"), ("expr", "0 3 * * 1-5"),
        ("expr", "0 3 * * funday"), ("expr", "every day"), ("expr", ""), ("expr", "*/0 * * * *"),
        ("timezone", "Mars/Olympus"), ("timezone", "UTC+25"), ("expr", "0 3 * * */2"),
    ])],
    # negative or out-of-range thresholds
    *[(f"range-{i}", path, value, path) for i, (path, value) in enumerate([
        (f"{F}.trigger.batch.every", -1), (f"{F}.trigger.batch.every", 0), (f"{F}.filters.min_reward", -0.1),
        (f"{F}.filters.min_reward", 1.5), (f"{F}.filters.max_age_days", -3), (f"{F}.filters.rehearsal_fraction", 1.0),
        ("retry.max_retries", -1), (f"{F}.wall_clock_limit", -5), (f"{F}.trigger.batch.min_interval", "0s"),
        (f"{F}.optim.learning_rate", -1e-5), (f"{F}.gkd.temperature", 0), (f"{F}.gkd.max_new_tokens", -128),
        (f"{F}.optim.gradient_accumulation_steps", 0), ("targets.baseline_success", 1.2), ("catchup_window", -60),
    ])],
    # structure
    ("both-triggers", f"{F}.trigger.cron", {"expr": "0 3 * * sun"}, f"{F}.trigger"),
    ("no-trigger-kind", f"{F}.trigger", {}, f"{F}.trigger"),
    ("no-trigger", f"{F}.trigger", _DELETE, f"{F}.trigger"),
    ("no-gears", "gears", {}, "gears"),
    ("gears-missing", "gears", _DELETE, "gears"),
    ("no-teacher", "teacher", _DELETE, "teacher"),
    ("empty-student", "student", "", "student"),
    ("bad-name", "name", "no spaces allowed", "name"),
    ("bad-gear-name", "gears.fast gear", {"trigger": {"batch": {"every": 1}}}, "gears"),
    ("steps-and-epochs", f"{H}.optim.max_steps", 100, f"{H}.optim"),
    ("no-schedule", f"{F}.optim.max_steps", None, f"{F}.optim"),
    ("bad-registered-model", "registered_model", "a/b c", "registered_model"),
    ("retry-not-mapping", "retry", 3, "retry"),
    ("targets-list", "targets", [0.1, 30], "targets"),
    # values that once raised past validation (and stopped the daemon) or overflow later
    ("nul-in-path", "student", "./models/s\0", "student"),
    ("nul-in-key", "learning_key", "math\0", "learning_key"),
    ("nul-in-gear-name", "gears.fa\0st", {"trigger": {"batch": {"every": 1}}}, "gears"),
    ("unknown-home", "teacher", "~no-such-user-atlasd/teacher", "teacher"),
    ("infinite-duration", f"{F}.trigger.batch.min_interval", float("inf"), f"{F}.trigger.batch.min_interval"),
    ("huge-duration", f"{F}.wall_clock_limit", "99999999999999w", f"{F}.wall_clock_limit"),
    ("huge-catchup", "catchup_window", 1e300, "catchup_window"),
    ("huge-max-age", f"{F}.filters.max_age_days", 1e300, f"{F}.filters.max_age_days"),
    ("infinite-max-age", f"{F}.filters.max_age_days", float("inf"), f"{F}.filters.max_age_days"),
    ("huge-session-cap", f"{F}.filters.max_session_bytes", 1 << 40, f"{F}.filters.max_session_bytes"),
]

def billion_laughs(levels: int = 9) -> str:
    """The classic YAML alias bomb: 10 ** levels strings from well under a kilobyte."""
    lines = ['lol0: &lol0 "lol"']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines + ["teacher: t", "student: s", "gears: {}"]) + "\n"


# (case id, file text, what the reason says) for files that are not a policy mapping at all
TEXT_CASES: list[tuple[str, str | bytes, str]] = [
    ("list", "- teacher: t\n- student: s\n", "a policy is a YAML mapping, got a list"),
    ("scalar", "just some words\n", "a policy is a YAML mapping, got text"),
    ("number", "42\n", "a policy is a YAML mapping, got a number"),
    ("empty", "", "empty file"),
    ("comments-only", "# nothing here\n", "empty file"),
    ("null", "null\n", "a policy is a YAML mapping, got null"),
    ("unclosed-flow", "teacher: [t\nstudent: s\n", "invalid YAML"),
    ("tab-indent", "gears:\n\tfast: 1\n", "invalid YAML"),
    ("two-documents", "teacher: t\n---\nstudent: s\n", "invalid YAML"),
    ("duplicate-key", "teacher: t\nstudent: s\nteacher: u\ngears: {}\n", "duplicate key"),
    ("binary", b"\xff\xfe\x00teacher", "not UTF-8"),
    ("huge-comment", "# " + "x" * MAX_POLICY_BYTES + "\nteacher: t\n", "at most"),
    ("huge-value", yaml.safe_dump({**BASE, "teacher": "t" * (MAX_POLICY_BYTES + 10)}), "at most"),
    ("huge-gears", "teacher: t\nstudent: s\ngears:\n" + "".join(f"  g{i}: {{trigger: {{batch: {{every: 1}}}}}}\n" for i in range(40000)),
     "at most"),
    ("just-over", "teacher: t\n" + "#" * (MAX_POLICY_BYTES - 10) + "\n", "at most"),
    # poison: binary content, alias bombs and cycles, what the YAML constructor cannot build
    ("nul-bytes", b"teacher: t\nstudent: s\x00\x00\ngears: {}\n", "2: not a text file: unprintable character U+0000"),
    ("control-char", "teacher: t\x07\n", "1: not a text file: unprintable character U+0007"),
    ("latin-1", "teacher: t\nstudent: caf\xe9\n".encode("latin-1"), "2: not UTF-8 text (byte 23)"),
    ("elf", b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 4, "not UTF-8"),
    ("alias-bomb", billion_laughs(), "expands to over"),
    ("alias-cycle", "teacher: t\nstudent: &s [1, *s]\n", "2: invalid YAML: an alias refers to a node that contains it"),
    ("deep-nesting", "teacher: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
    ("impossible-date", "teacher: t\nstudent: 2024-13-45\n", "month must be in 1..12"),
    ("huge-integer", "teacher: t\nstudent: 1" + "0" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
]


assert len(FIELD_CASES) + len(TEXT_CASES) >= 100


def write_malformed_cases(folder: Path) -> dict[Path, tuple[str, str, bool]]:
    """Write every malformed case; returns path -> (expected field or reason, kind)."""
    out = {}
    for case, path, value, field in FIELD_CASES:
        file = folder / f"{case}.yaml"
        file.write_text(yaml.safe_dump(_set(BASE, path, value), sort_keys=False))
        out[file] = (field, case, True)
    for case, text, reason in TEXT_CASES:
        file = folder / f"{case}.yaml"
        file.write_bytes(text if isinstance(text, bytes) else text.encode())
        out[file] = (reason, case, False)
    return out


def test_one_hundred_malformed_policies_each_name_file_line_and_field(tmp_path: Path) -> None:
    cases = write_malformed_cases(tmp_path)
    assert len(cases) >= 100
    for file, (expected, case, is_field) in cases.items():
        with pytest.raises(PolicyFileError) as info:
            load_policy_file(file)
        issues = info.value.issues
        assert issues, case
        message = str(info.value)
        assert str(file) in message, case
        if is_field:
            assert any(i.field.startswith(expected) and i.line for i in issues), (case, message)
            assert all(i.reason for i in issues), (case, message)
            assert f"{file}:{issues[0].line}: {issues[0].field}: " in message
        else:
            assert expected in message, (case, message)


def test_field_errors_point_at_the_right_line(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(
        "teacher: t\n"
        "student: s\n"
        "gears:\n"
        "  fast:\n"
        "    trigger:\n"
        "      batch:\n"
        "        every: -4\n"
        "    gkd:\n"
        "      lmbda: 3\n"
        "      temprature: 0.5\n"
    )
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(file)
    got = [(i.line, i.field) for i in info.value.issues]
    assert got == [(7, "gears.fast.trigger.batch.every"), (9, "gears.fast.gkd.lmbda"), (10, "gears.fast.gkd.temprature")]
    assert "unknown field (allowed: lmbda, beta, temperature, max_new_tokens, seq_kd)" in str(info.value)
    assert "numbers are ambiguous" in str(pytest.raises(PolicyFileError, load_policy_file, _cron(tmp_path, "0 3 * * 0")).value)


def _cron(folder: Path, expr: str) -> Path:
    file = folder / "cron.yaml"
    file.write_text(yaml.safe_dump(_set(BASE, f"{H}.trigger.cron.expr", expr)))
    return file


def test_reload_keeps_the_previous_version_of_a_broken_file_and_drops_removed_ones(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yml"
    a.write_text(yaml.safe_dump(BASE))
    b.write_text(yaml.safe_dump(_set(BASE, "learning_key", "one")))
    c.write_text(yaml.safe_dump(BASE))
    (tmp_path / "README.md").write_text("not a policy")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "x.yaml").write_text("not: loaded")
    policies = PolicySet(tmp_path)
    first = policies.reload()
    assert first.ok and first.added == ["a", "b", "c"]

    b.write_text(yaml.safe_dump(_set(BASE, "gears.fast.trigger.batch.every", -1)))  # broken edit
    c.unlink()  # removed
    a.write_text(yaml.safe_dump(_set(BASE, "learning_key", "two")))  # valid edit
    second = policies.reload()
    assert (second.changed, second.removed, second.kept_previous) == (["a"], ["c"], ["b"])
    assert list(second.errors) == [str(b)] and "gears.fast.trigger.batch.every" in str(second.errors[str(b)][0])
    assert sorted(policies.policies) == ["a", "b"]
    assert policies.get("b").learning_key == "one" and policies.get("a").learning_key == "two"

    b.write_text(yaml.safe_dump(_set(BASE, "learning_key", "three")))  # fixed
    third = policies.reload()
    assert third.ok and third.changed == ["b"] and policies.get("b").learning_key == "three"


def test_two_files_with_one_name_and_a_hundred_broken_files_next_to_a_good_one(tmp_path: Path) -> None:
    (tmp_path / "first.yaml").write_text(yaml.safe_dump({**BASE, "name": "same"}))
    (tmp_path / "second.yaml").write_text(yaml.safe_dump({**BASE, "name": "same"}))
    policies = PolicySet(tmp_path)
    report = policies.reload()
    assert list(policies.policies) == ["same"]
    assert "already used by" in str(report.errors[str(tmp_path / "second.yaml")][0])

    broken = tmp_path / "broken"
    broken.mkdir()
    cases = write_malformed_cases(broken)
    (broken / "good.yaml").write_text(yaml.safe_dump(BASE))
    many = PolicySet(broken)
    report = many.reload()
    assert list(many.policies) == ["good"] and len(report.errors) == len(cases)


def test_alias_bombs_are_refused_within_a_second_and_small_anchors_still_work(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs(9))  # 10**9 strings from 797 bytes: minutes and gigabytes if built
    (tmp_path / "bigger.yaml").write_text(billion_laughs(40))  # 10**40
    shared = {"trigger": {"batch": {"every": 10}}, "optim": {"max_steps": 7}}
    (tmp_path / "anchors.yaml").write_text(
        "teacher: t\nstudent: s\ngears:\n"
        "  fast: &fast {trigger: {batch: {every: 10}}, optim: {max_steps: 7}}\n"
        "  again: *fast\n"
        "  merged: {<<: *fast, filters: {min_reward: 0.5}}\n"
    )
    start = time.monotonic()
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(bomb)
    policies = PolicySet(tmp_path)
    report = policies.reload()
    elapsed = time.monotonic() - start
    assert elapsed < 1.0
    assert str(info.value) == (f"{bomb}: the YAML expands to over {MAX_POLICY_NODES} values (aliases repeat their "
                               "anchor's content); a policy is a page of YAML")
    assert sorted(report.errors) == sorted([str(bomb), str(tmp_path / "bigger.yaml")])
    gears = policies.get("anchors").gears
    assert gears["fast"] == gears["again"] == Gear.model_validate(shared)
    assert gears["merged"].filters.min_reward == 0.5 and gears["merged"].optim.max_steps == 7


def test_durations_refuse_what_a_timedelta_cannot_hold() -> None:
    assert parse_duration("3650d").days == 3650
    for value in (float("inf"), float("-inf"), 1e300, "99999999999999w", "3651d"):
        with pytest.raises(ValueError, match="at most 3650 days"):
            parse_duration(value)


def test_an_unreadable_policies_folder_keeps_the_loaded_policies(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(BASE))
    policies = PolicySet(tmp_path)
    assert policies.reload().ok

    def refused(directory: Path) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr("atlasd.policies.policy_files", refused)
    report = policies.reload()
    assert list(policies.policies) == ["a"] and report.kept_previous == ["a"]
    assert str(report.errors[str(tmp_path)][0]) == (
        f"{tmp_path}: cannot read the policies folder: Permission denied; keeping the loaded policies")
