"""The code's structure rules, checked over the source tree (no database):

* every ``atlasd.*`` table has one owner module: the only module whose SQL writes it, and the only
  one that reads it, but for the few documented joins below;
* the readiness rule (approved and succeeded) is written once, in the SQL function
  ``atlasd.session_ready`` that every query and the NOTIFY trigger call;
* run states, trigger sources, follow-ups and registration states are defined once in Python and
  agree with the tables' CHECK constraints;
* no module outside tests/ imports from tests/, and no component is looked up by name.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

from atlasd import queue, runspec
from atlasd.db.migrate import available_migrations
from atlasd.promotions import REGISTRATION_STATES

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("atlasd", "trainers", "registry", "bench")

OWNERS = {
    "intake": "atlasd/intake.py",
    "runs": "atlasd/queue.py",
    "runner_state": "atlasd/queue.py",
    "registrations": "atlasd/promotions.py",
    "promotions": "atlasd/promotions.py",
    "policy_state": "atlasd/cadence.py",
    "pauses": "atlasd/cadence.py",
    "daemon_state": "atlasd/lock.py",
    "schema_version": "atlasd/db/migrate.py",
    "eval_splits": "atlasd/evalsplit.py",
    "run_sessions": "atlasd/lineage.py",
    "lineage": "atlasd/lineage.py",
}
# Reads (never writes) of a table by another owner, where the join is the point of the read.
JOINED_READS = {
    ("atlasd/promotions.py", "runs"): "a registration's or an audit row's run: its policy, gear and state",
    ("atlasd/queue.py", "registrations"): "a run with its registration's state (reports, retention, repair)",
    ("atlasd/lineage.py", "runs"): "a tainted run's policy, gear, window and model version",
    ("atlasd/lineage.py", "intake"): "a run's trained-on rows already revoked when its lineage is recorded",
}

_TABLE = r"atlasd\.(\w+)\b(?!\s*\()"  # a table, not a function call such as atlasd.session_ready(...)
WRITE = re.compile(r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE(?:\s+TABLE)?|ALTER\s+TABLE)\s+" + _TABLE, re.I)
READ = re.compile(r"\b(?:FROM|JOIN)\s+" + _TABLE, re.I)
READY_RULE = re.compile(r"review_status\s*=\s*'approved'\s+AND\s+(?:\w+\.)?status\s*=\s*'succeeded'", re.I)


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def sql_strings(path: Path) -> list[tuple[int, str]]:
    """Every string constant in the module (f-strings' literal parts included), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def migration_tables() -> set[str]:
    return {m.group(1) for mig in available_migrations()
            for m in re.finditer(r"CREATE TABLE IF NOT EXISTS atlasd\.(\w+)", mig.sql)}


def test_every_table_has_an_owner() -> None:
    assert migration_tables() | {"schema_version"} == set(OWNERS)


def test_sql_against_each_table_is_in_its_owner_module() -> None:
    stray = []
    for path in source_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, text in sql_strings(path):
            for m in WRITE.finditer(text):
                if OWNERS.get(m.group(1)) != rel:
                    stray.append(f"{rel}:{line} writes atlasd.{m.group(1)} (owner: {OWNERS.get(m.group(1))})")
            for m in READ.finditer(text):
                if OWNERS.get(m.group(1)) != rel and (rel, m.group(1)) not in JOINED_READS:
                    stray.append(f"{rel}:{line} reads atlasd.{m.group(1)} (owner: {OWNERS.get(m.group(1))})")
    assert stray == []


def test_the_scan_sees_sql() -> None:
    """The rule above can fail: the scan finds each owner's own statements."""
    found = {m.group(1) for table, owner in OWNERS.items() for _, text in sql_strings(ROOT / owner)
             for m in (*WRITE.finditer(text), *READ.finditer(text))}
    assert found >= set(OWNERS)


def test_the_readiness_rule_is_written_once() -> None:
    python = [f"{p.relative_to(ROOT)}:{line}" for p in source_files() for line, text in sql_strings(p)
              if READY_RULE.search(text)]
    assert python == []
    defining = [m.name for m in available_migrations()
                if "FUNCTION atlasd.session_ready" in m.sql]
    assert defining == ["readiness"]
    # the rule's text: in the migration that defines the function, and in 0001 (history: an applied
    # migration never changes; 0008 replaced the trigger function 0001 had)
    assert [m.version for m in available_migrations() if READY_RULE.search(m.sql)] == [1, 8]


def _check_values(column: str) -> set[str]:
    for mig in available_migrations():
        m = re.search(rf"\b{column}\b[^,]*?CHECK \({column} IN \(([^)]*)\)\)", mig.sql)
        if m:
            return {v.strip().strip("'") for v in m.group(1).split(",")}
    raise AssertionError(f"no CHECK on {column}")


def test_enumerations_are_defined_once_and_agree_with_the_tables() -> None:
    assert set(typing.get_args(runspec.TriggerSource)) == _check_values("trigger")
    assert set(typing.get_args(queue.FollowUp)) == _check_values("follow_up")
    runs = next(m.sql for m in available_migrations() if m.name == "runs")
    states = re.search(r"CHECK \(state IN \(([^)]*)\)\)", runs).group(1)
    assert {v.strip().strip("'") for v in states.split(",")} == set(queue.STATES)
    promotions = next(m.sql for m in available_migrations() if m.name == "promotions")
    reg = re.search(r"state TEXT NOT NULL DEFAULT 'pending' CHECK \(state IN \(([^)]*)\)\)", promotions).group(1)
    assert {v.strip().strip("'") for v in reg.split(",")} == set(REGISTRATION_STATES)


def test_no_module_imports_from_tests() -> None:
    offenders = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert offenders == []


def test_the_daemon_wires_its_components_explicitly(tmp_path) -> None:
    """One live policy set, handed to the cadence (which reloads it), the runner and STATUS=; the
    runner kicks the registration retrier it was given. Nothing is looked up by name."""
    from atlasd.daemon import build_daemon
    from atlasd.settings import load_settings

    daemon = build_daemon(load_settings(db_url="postgresql://nobody@127.0.0.1:1/none", state_dir=tmp_path,
                                        policies_dir=tmp_path))
    cadence, runner, registrar, tagger, *_ = daemon.components
    assert [c.name for c in daemon.components] == ["cadence", "runner", "registrations", "taints", "metrics", "gc"]
    assert cadence.policy_set is runner.policies is tagger.policies is daemon.policies
    assert runner._registrar is registrar
    lookups = [f"{p.relative_to(ROOT)}" for p in source_files()
               if re.search(r"in [\w.]*components if \w+\.name ==", p.read_text())]
    assert lookups == []
