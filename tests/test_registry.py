"""The registry child: gate decisions, MLflow logging, registration, promotion, rollback, champion
resolution, on a real MLflow sqlite store and a real tiny HF checkpoint.

Helpers here (``tiny_student``, ``make_run``) are imported by tests/test_promotions.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atlasd.runspec import EvalReport, MlflowTarget, RunResult, RunSpec, Targets
from registry import CHALLENGER, CHAMPION, EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE, RegistryError

TARGETS = Targets(baseline_success=0.5, baseline_tokens=100.0)


def report(success: float, tokens: float, eval_hash: str = "evalA", model: str = "m") -> EvalReport:
    return EvalReport(model=model, eval_set_hash=eval_hash, n_samples=20, success_rate=success, avg_tokens=tokens)


# ------------------------------------------------------------------------------------ gate
NO_TOKENS = TARGETS.model_copy(update={"baseline_tokens": None})
# baseline 0.5 success / 100 tokens: targets are +0.10 success and -30 % tokens
GATE_CASES = [
    # id, targets, must_beat, challenger, champion, decision, failing checks
    ("baseline-only-met", TARGETS, False, report(0.8, 60), report(0.9, 50), "promote", []),
    ("baseline-success-missed", TARGETS, False, report(0.55, 60), None, "reject", ["success_delta"]),
    ("baseline-success-exactly-met", TARGETS, False, report(0.6, 70), None, "promote", []),
    ("token-target-missed", TARGETS, True, report(0.8, 95), None, "reject", ["token_reduction_pct"]),
    ("no-token-baseline", NO_TOKENS, True, report(0.8, 95), None, "promote", []),
    ("empty-eval-set", TARGETS, True, report(0.0, 0).model_copy(update={"n_samples": 0}), None, "reject",
     ["success_delta", "token_reduction_pct"]),
    ("no-champion-yet", TARGETS, True, report(0.8, 60), None, "promote", []),
    ("beats-champion-success", TARGETS, True, report(0.8, 70), report(0.7, 60), "promote", []),
    ("loses-to-champion", TARGETS, True, report(0.7, 50), report(0.8, 60), "reject", ["beats_champion"]),
    ("tie-success-fewer-tokens", TARGETS, True, report(0.8, 55), report(0.8, 60), "promote", []),
    ("tie-success-more-tokens", TARGETS, True, report(0.8, 65), report(0.8, 60), "reject", ["beats_champion"]),
    ("full-tie-champion-stays", TARGETS, True, report(0.8, 60), report(0.8, 60), "reject", ["beats_champion"]),
    ("champion-other-eval-set", TARGETS, True, report(0.9, 50), report(0.1, 90, "evalB"), "reject", ["beats_champion"]),
    ("both-fail", TARGETS, True, report(0.5, 95), report(0.8, 60), "reject",
     ["success_delta", "token_reduction_pct", "beats_champion"]),
]


@pytest.mark.parametrize(("targets", "must_beat", "challenger", "champion", "expected", "failing"),
                         [c[1:] for c in GATE_CASES], ids=[c[0] for c in GATE_CASES])
def test_gate_table(targets, must_beat, challenger, champion, expected, failing) -> None:
    from registry.gate import decide

    targets = targets.model_copy(update={"must_beat_champion": must_beat})
    gate = decide(targets, challenger, targets.summarize(challenger), champion)
    assert gate.decision == expected
    assert [c.name for c in gate.checks if not c.met] == failing
    assert ("beats_champion" in [c.name for c in gate.checks]) == must_beat
    assert all(name in gate.reason for name in failing)
    for check in gate.checks:
        assert check.name != "beats_champion" or check.reason  # the champion check always says why


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    from trainers.tiny import build_tiny_pair

    _, student = build_tiny_pair(tmp_path_factory.mktemp("tiny"))
    return student


def make_run(root: Path, student: Path, run_id: int, tracking_uri: str, *, success: float = 0.8, tokens: float = 60.0,
             eval_hash: str = "evalA", champion_version: str | None = None,
             eval_start: EvalReport | None = None, status: str = "succeeded", policy: str = "p1", teacher: str = "t",
             targets: Targets = TARGETS) -> tuple[Path, Path, Path]:
    """A run folder like the trainer leaves it: run_spec.json, result.json, train.jsonl, a checkpoint."""
    out = root / f"run{run_id}"
    ckpt = out / "checkpoint"
    shutil.copytree(student, ckpt)
    samples = out / "eval_samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"q{i}", "generation": f"a{i}", "correct": i % 2 == 0}) + "\n"
                               for i in range(4)))
    spec = RunSpec(
        run_id=run_id, policy=policy, gear="fast", trigger="batch", teacher=teacher, student=str(student),
        base_student=str(student), champion_version=champion_version,
        traces={"window_lo": 0, "window_hi": 10, "db_url": "postgresql://atlas:s3cret@db/atlas"},
        targets=targets, output_dir=out,
        mlflow=MlflowTarget(tracking_uri=tracking_uri, experiment=f"atlasd/{policy}", registered_model=f"atlasd-{policy}"),
    )
    spec_path = spec.dump(out / "run_spec.json")
    result = RunResult(
        run_id=run_id, status=status, checkpoint=str(ckpt) if status == "succeeded" else None, steps=3, n_train=8,
        n_eval=20, train_metrics={"loss": 0.5},
        eval=report(success, tokens, eval_hash, str(ckpt)).model_copy(update={"samples_path": str(samples)})
        if status == "succeeded" else None,
        eval_start=eval_start, baseline=targets.summarize(report(success, tokens, eval_hash)) if status == "succeeded" else None,
        error=None if status == "succeeded" else "boom",
    )
    result_path = result.dump(out / "result.json")
    log = out / "train.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "grad_norm": 0.9, "lr": 2e-5, "tokens_per_s": 100.0,
                                       "time/generate_s": 0.1, "event": "step"}) + "\n" for s in (1, 2, 3))
                   + "not json: a progress bar\n")
    return spec_path, result_path, log


@pytest.fixture()
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


@pytest.fixture()
def store_dir(tmp_path: Path) -> Path:
    (tmp_path / "mlflow").mkdir()
    return tmp_path / "mlflow"


def finalize_paths(spec_path: Path, result_path: Path, log: Path | None = None, measure=None, **kw) -> dict:
    from registry.finalize import finalize, load_inputs
    from registry.tracking import default_artifact_root

    spec, result = load_inputs(spec_path, result_path, log)

    def no_measure(path: Path) -> EvalReport:
        raise AssertionError(f"unexpected re-measure of {path}")

    root = default_artifact_root(spec.mlflow.tracking_uri) or str(spec_path.parent.parent / "mlartifacts")
    return finalize(spec, result, log_path=log, measure=measure or no_measure, artifact_root=root, **kw)


# ------------------------------------------------------------------------------------ registry flow
def test_finalize_logs_registers_promotes_and_is_idempotent(tmp_path, store_dir, tracking_uri, tiny_student) -> None:
    from mlflow import MlflowClient

    spec1, res1, log1 = make_run(tmp_path, tiny_student, 1, tracking_uri)
    out = finalize_paths(spec1, res1, log1)
    assert out["decision"] == "promote" and out["model_version"] == "1" and out["champion"] == "1"
    assert out["previous_champion"] is None and out["champion_metrics_from"] == "none"
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["atlasd.run_id"] == "1" and run.data.tags["atlasd.gear"] == "fast"
    assert run.data.tags["atlasd.trace_window"] == "(0, 10]" and run.data.tags["atlasd.n_traces"] == "8"
    assert run.data.params["traces.window_hi"] == "10" and "traces.db_url" not in run.data.params
    assert "s3cret" not in json.dumps(run.data.params)
    assert run.data.metrics["eval/success_rate"] == 0.8 and run.data.metrics["metrics/meets_target"] == 1.0
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3]
    assert client.get_metric_history(run.info.run_id, "time/generate_s")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run_spec.json", "result.json", "train.jsonl", "eval", "checkpoint"} <= artifacts
    assert "s3cret" not in Path(client.download_artifacts(run.info.run_id, "run_spec.json", str(tmp_path))).read_text()
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/samples.json", str(tmp_path))).read_text())
    assert table["columns"] == ["prompt", "generation", "correct"] and len(table["data"]) == 4
    mv = client.get_model_version("atlasd-p1", "1")
    assert mv.run_id == run.info.run_id and mv.tags["atlasd.run_id"] == "1"
    assert {k: mv.tags[k] for k in ("atlasd.gear", "atlasd.trigger", "atlasd.trace_window", "atlasd.n_traces",
                                    "atlasd.config_hash")} == {k: run.data.tags[k] for k in (
        "atlasd.gear", "atlasd.trigger", "atlasd.trace_window", "atlasd.n_traces", "atlasd.config_hash")}
    assert mv.tags["atlasd.checkpoint_path"] == str((tmp_path / "run1" / "checkpoint").resolve())
    assert mv.tags["atlasd.decision"] == "promote" and json.loads(mv.tags["gate.success_delta"])["met"] is True
    assert float(mv.tags["eval.success_rate"]) == 0.8
    assert Path(mv.source).is_dir() and "artifacts/checkpoint" in mv.source  # the logged copy, not the run folder
    assert set(client.get_registered_model("atlasd-p1").aliases) == {CHAMPION, CHALLENGER}

    again = finalize_paths(spec1, res1, log1)  # a retry: same run, same version, same decision
    assert again["mlflow_run_id"] == out["mlflow_run_id"] and again["model_version"] == "1"
    assert again["decision"] == "promote" and again["replayed"] is True
    assert len(client.search_model_versions("name = 'atlasd-p1'")) == 1
    assert len(client.search_runs([out["experiment_id"]])) == 1


def test_gate_rejects_then_promotes_against_champion_then_rollback(tmp_path, store_dir, tracking_uri, tiny_student) -> None:
    from registry.store import Registry

    reg = Registry(tracking_uri)
    s1, r1, _ = make_run(tmp_path, tiny_student, 1, tracking_uri, success=0.7, tokens=60)
    assert finalize_paths(s1, r1)["champion"] == "1"
    # run 2 started from the champion and is worse on the same eval set: rejected, stays challenger
    s2, r2, _ = make_run(tmp_path, tiny_student, 2, tracking_uri, success=0.6, tokens=50, champion_version="1",
                         eval_start=report(0.7, 60))
    out2 = finalize_paths(s2, r2)
    assert out2["decision"] == "reject" and out2["champion"] == "1" and out2["champion_metrics_from"] == "eval_start"
    assert [c["name"] for c in out2["checks"] if not c["met"]] == ["beats_champion"]
    assert str(reg.alias("atlasd-p1", CHALLENGER).version) == "2" and str(reg.alias("atlasd-p1", CHAMPION).version) == "1"
    assert reg.version("atlasd-p1", "2").tags["atlasd.decision"] == "reject"
    # run 3 did not start from the champion: the champion's stored metrics on evalA are used
    s3, r3, _ = make_run(tmp_path, tiny_student, 3, tracking_uri, success=0.7, tokens=40)
    out3 = finalize_paths(s3, r3)
    assert out3["decision"] == "promote" and out3["champion_metrics_from"] == "tags"
    assert out3["previous_champion"] == "1" and out3["champion"] == "3"
    assert reg.version("atlasd-p1", "1").tags["previous_champion_of"] == "3"
    assert reg.version("atlasd-p1", "3").tags["atlasd.previous_champion"] == "1"
    # rollback: back to version 1, whose files are checked first
    assert reg.rollback("atlasd-p1", None)[:2] == ("3", "1")
    assert str(reg.alias("atlasd-p1", CHAMPION).version) == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback("atlasd-p1", None)


def test_a_replayed_registration_never_undoes_a_rollback(tmp_path, store_dir, tracking_uri, tiny_student) -> None:
    """Run 2's promotion is interrupted after the alias move, before its decision is tagged; an operator
    rolls back to v1; the retried registration of run 2 must not promote v2 again (its gate would)."""
    from mlflow import MlflowClient

    from registry.store import Registry

    reg = Registry(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    s1, r1, _ = make_run(tmp_path, tiny_student, 1, tracking_uri, success=0.7, tokens=60)
    assert finalize_paths(s1, r1)["champion"] == "1"
    s2, r2, _ = make_run(tmp_path, tiny_student, 2, tracking_uri, success=0.8, tokens=40)
    assert finalize_paths(s2, r2)["champion"] == "2"
    for tag in ("atlasd.decision", "atlasd.promoted_at"):  # as if the child died right after the alias move
        client.delete_model_version_tag("atlasd-p1", "2", tag)
    assert reg.rollback("atlasd-p1", None)[:2] == ("2", "1")

    replay = finalize_paths(s2, r2)
    assert replay["replayed"] is True and "rolled back to v1" in replay["reason"]
    assert replay["champion"] == "1" and str(reg.alias("atlasd-p1", CHAMPION).version) == "1"


def test_champion_on_another_eval_set_is_re_measured_by_the_trainer(tmp_path, store_dir, tracking_uri,
                                                                      tiny_student) -> None:
    """The champion's stored metrics are for another eval set: the gate re-measures it with the real
    `python -m trainers eval` on the challenger's frozen eval set (the run's snapshot)."""
    from registry.finalize import trainer_measure
    from registry.store import Registry
    from trainers.dataset import Example, eval_set_hash

    s1, r1, _ = make_run(tmp_path, tiny_student, 1, tracking_uri, success=0.7, tokens=60, eval_hash="old")
    finalize_paths(s1, r1)
    examples = [Example(session_id=i, seq=i, prompt=[{"role": "system", "content": f"Task: {i} + 1?"}],
                        completion=f"Final Answer: {i + 1}", reference=str(i + 1), source="eval") for i in range(3)]
    new_hash = eval_set_hash(examples)
    s2, r2, _ = make_run(tmp_path, tiny_student, 2, tracking_uri, success=0.8, tokens=60, eval_hash=new_hash,
                         teacher=str(tiny_student.parent / "teacher"))
    snapshot = RunSpec.load(s2).output_dir / "data" / "eval.jsonl"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text("".join(e.to_json() + "\n" for e in examples))
    out = finalize_paths(s2, r2, measure=trainer_measure(s2))
    assert out["champion_metrics_from"] == "re-measured", out
    reg = Registry(tracking_uri)
    stored = reg.stored_report(reg.version("atlasd-p1", "1"), new_hash)  # kept for the next gate on this set
    assert stored.n_samples == 3 and stored.eval_set_hash == new_hash
    check = next(c for c in out["checks"] if c["name"] == "beats_champion")
    assert check["threshold"] == stored.success_rate
    assert out["decision"] == ("promote" if stored.success_rate < 0.8 else "reject")


def test_failed_run_is_logged_not_registered(tmp_path, store_dir, tracking_uri, tiny_student) -> None:
    from mlflow import MlflowClient

    spec, res, log = make_run(tmp_path, tiny_student, 7, tracking_uri, status="failed")
    out = finalize_paths(spec, res, log)
    assert out["decision"] == "not_registered" and out["model_version"] is None
    assert MlflowClient(tracking_uri).get_run(out["mlflow_run_id"]).info.status == "FAILED"


def test_checkpoint_loadability(tmp_path, tiny_student) -> None:
    from registry.checkpoint import check_loadable

    ckpt = tmp_path / "c"
    shutil.copytree(tiny_student, ckpt)
    assert check_loadable(ckpt)["model_type"] == "qwen2"
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(RegistryError, match="model.safetensors: truncated"):
        check_loadable(ckpt)
    shutil.copy(tiny_student / "model.safetensors", weights)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(RegistryError, match="no tokenizer"):
        check_loadable(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(RegistryError, match="config.json: not readable JSON"):
        check_loadable(ckpt)


def test_bad_input_names_the_file_and_field(tmp_path, tracking_uri, tiny_student) -> None:
    from registry.finalize import load_inputs

    spec, res, _ = make_run(tmp_path, tiny_student, 1, tracking_uri)
    data = json.loads(res.read_text())
    data["checkpoint"] = str(tmp_path / "gone")
    res.write_text(json.dumps(data))
    with pytest.raises(RegistryError, match=r"result.json: field checkpoint"):
        load_inputs(spec, res, None)
    res.write_text("{}")
    with pytest.raises(RegistryError, match=r"result.json: invalid run result"):
        load_inputs(spec, res, None)


# ------------------------------------------------------------------------------------ the child process
def registry_cli(*args: str, env: dict | None = None) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "registry", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr[-3000:])
    return proc.returncode, json.loads(lines[0])


def test_cli_store_unavailable_then_restored_registers_once(tmp_path, tiny_student) -> None:
    """The sqlite database file is replaced by a folder (root ignores chmod): exit 75, nothing
    registered; file back: the retry registers exactly one version; `champion` gives its path."""
    db = tmp_path / "mlflow" / "mlflow.db"
    db.mkdir(parents=True)
    uri = f"sqlite:///{db}"
    spec, res, log = make_run(tmp_path, tiny_student, 1, uri)
    code, out = registry_cli("finalize", "--spec", str(spec), "--result", str(res), "--log", str(log))
    assert code == EXIT_UNAVAILABLE and out["retryable"] is True, out
    db.rmdir()
    code, out = registry_cli("finalize", "--spec", str(spec), "--result", str(res), "--log", str(log))
    assert code == EXIT_OK and out["model_version"] == "1" and out["decision"] == "promote", out
    code, champ = registry_cli("champion", "--policy", "p1", "--json", "--tracking-uri", uri)
    assert code == EXIT_OK and champ["champion"] == "1"
    RunSpec.model_validate({**json.loads(spec.read_text()), "student": champ["path"]})
    assert (Path(champ["path"]) / "model.safetensors").is_file()
    code, err = registry_cli("rollback", "--policy", "p1", "--tracking-uri", uri)
    assert code == EXIT_BAD_INPUT and "no previous champion" in err["error"]


def test_postgres_backend_and_stopped_server(tmp_path, tiny_student) -> None:
    """MLflow on a throw-away Postgres database (postgresql+psycopg://); a stopped server is
    classified as unavailable (exit 75), not as bad input."""
    from atlasd.testing import pg
    from registry.__main__ import fail_fast, is_unavailable

    name = pg.create_database("atlasd_mlflow")
    try:
        uri = pg.url_for(name).replace("postgresql://", "postgresql+psycopg://", 1)
        s, r, log = make_run(tmp_path, tiny_student, 1, uri)
        out = finalize_paths(s, r, log)
        assert out["decision"] == "promote" and out["model_version"] == "1"
        assert finalize_paths(s, r, log)["model_version"] == "1"
    finally:
        pg.drop_database(name)
    fail_fast()
    s, r, _ = make_run(tmp_path / "down", tiny_student, 2, "postgresql+psycopg://postgres@127.0.0.1:1/mlflow")
    with pytest.raises(Exception) as info:
        finalize_paths(s, r)
    assert is_unavailable(info.value), repr(info.value)


def test_purge_removes_revoked_sessions_rows_from_logged_eval_samples(tmp_path, store_dir, tracking_uri,
                                                                       tiny_student) -> None:
    """`python -m registry purge`: the rows of revoked sessions leave every atlasd run's eval samples
    (the table and the .jsonl), re-written at the same paths; a second purge with the same ids only
    reads a tag per run."""
    from mlflow import MlflowClient

    spec, result_path, log = make_run(tmp_path, tiny_student, 1, tracking_uri)
    samples = Path(RunResult.load(result_path).eval.samples_path)
    samples.write_text("".join(json.dumps({"session_id": sid, "prompt": f"secret task {sid}", "generation": "x",
                                           "correct": True}) + "\n" for sid in (11, 12, 13)))
    out = finalize_paths(spec, result_path, log)
    ids = tmp_path / "revoked.json"
    ids.write_text(json.dumps([12, 99]))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    run = subprocess.run([sys.executable, "-m", "registry", "purge", "--ids-file", str(ids)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == EXIT_OK, run.stderr
    first = json.loads(run.stdout.splitlines()[-1])
    assert (first["runs_checked"], first["runs_changed"], first["rows_removed"]) == (1, 1, 2)
    client = MlflowClient(tracking_uri)
    rid = out["mlflow_run_id"]
    table = json.loads(Path(client.download_artifacts(rid, "eval/samples.json", str(tmp_path / "dl1"))).read_text())
    assert [row[table["columns"].index("session_id")] for row in table["data"]] == [11, 13]
    jsonl = Path(client.download_artifacts(rid, f"eval/{samples.name}", str(tmp_path / "dl2"))).read_text()
    assert "secret task 12" not in jsonl and "secret task 13" in jsonl
    again = subprocess.run([sys.executable, "-m", "registry", "purge", "--ids-file", str(ids)], capture_output=True,
                           text=True, env=env, timeout=120)
    assert json.loads(again.stdout.splitlines()[-1])["runs_changed"] == 0
