"""The non-regression gate: per-slice success (each learning key of the eval set, the probe set),
drift from the base student, and what a reviewer reads in MLflow (the version's description, the
samples side by side). Real MLflow sqlite store, real tiny models, a real trainer child."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from atlasd.runspec import EXIT_OK, EvalReport, ProbeReport, RunResult, RunSpec, SliceResult, Targets
from tests.test_registry import finalize_paths, make_run, store_dir, tracking_uri  # noqa: F401 - fixtures
from tests.test_trainer_cli import ROOT, child_env, write_spec
from tests.traces import add_session, event

TARGETS = Targets(baseline_success=0.5)  # success target only: the tests are about the other checks


def sliced(a: float, b: float, *, probe: float | None = None, drift: float | None = None, n: int = 20,
           tokens: float = 50.0, eval_hash: str = "evalA") -> EvalReport:
    """A report on two slices of n samples each (overall: their mean), with a probe set if ``probe``."""
    return EvalReport(
        model="m", eval_set_hash=eval_hash, n_samples=2 * n, success_rate=(a + b) / 2, avg_tokens=tokens,
        slices={"math": SliceResult(n_samples=n, success_rate=a), "code": SliceResult(n_samples=n, success_rate=b)},
        probe=None if probe is None else ProbeReport(probe_set_hash="probeA", n_samples=10, success_rate=probe,
                                                     avg_tokens=20.0, drift_kl=drift))


def failing(gate) -> list[str]:
    return [c.name for c in gate.checks if not c.met]


# ------------------------------------------------------------------------------------ the pure gate
def test_a_slice_falling_beyond_the_tolerance_is_refused_even_when_the_other_improves() -> None:
    from registry.gate import decide

    champion = sliced(0.50, 0.90)
    worse = sliced(0.90, 0.85)  # math +40 pp, code -5 pp: better overall, beats the champion
    gate = decide(TARGETS, worse, TARGETS.summarize(worse), champion)
    assert gate.decision == "reject" and failing(gate) == ["no_regression:code"]
    check = next(c for c in gate.checks if c.name == "no_regression:code")
    assert check.value == 0.85 and check.threshold == pytest.approx(0.88)
    assert "-5.0 pp" in check.reason and "no_regression:code" in gate.reason
    assert next(c for c in gate.checks if c.name == "no_regression:math").met

    within = sliced(0.90, 0.89)  # code -1 pp: within the default 2
    gate = decide(TARGETS, within, TARGETS.summarize(within), champion)
    assert gate.decision == "promote", gate.reason
    assert [c.name for c in gate.checks] == ["success_delta", "beats_champion", "no_regression:math",
                                             "no_regression:code"]
    exactly = sliced(0.90, 0.88)  # exactly 2 pp (float error allowed)
    assert decide(TARGETS, exactly, TARGETS.summarize(exactly), champion).decision == "promote"
    strict = TARGETS.model_copy(update={"max_regression_pp": 0.5})
    assert failing(decide(strict, within, strict.summarize(within), champion)) == ["no_regression:code"]


def test_no_champion_probe_slice_and_drift() -> None:
    from registry.gate import decide

    challenger = sliced(0.7, 0.7, probe=0.50, drift=0.3)
    gate = decide(TARGETS, challenger, TARGETS.summarize(challenger), None)
    assert gate.decision == "promote"
    assert [(c.name, c.reason) for c in gate.checks if c.name.startswith(("no_regression", "probe_no"))] == [
        ("no_regression:math", "no champion yet"), ("no_regression:code", "no champion yet"),
        ("probe_no_regression", "no champion yet")]
    drift = next(c for c in gate.checks if c.name == "probe_drift")
    assert drift.met and drift.value == 0.3 and drift.threshold is None and "not gated" in drift.reason

    champion = sliced(0.6, 0.6, probe=0.60, drift=0.1)  # the probe falls 10 pp: the general skill regressed
    gate = decide(TARGETS, challenger, TARGETS.summarize(challenger), champion)
    assert failing(gate) == ["probe_no_regression"]
    other_probe = champion.model_copy(update={"probe": champion.probe.model_copy(update={"probe_set_hash": "probeB"})})
    gate = decide(TARGETS, challenger, TARGETS.summarize(challenger), other_probe)
    assert failing(gate) == ["probe_no_regression"] and "not measured on this probe set" in gate.reason

    capped = TARGETS.model_copy(update={"max_drift": 0.25})
    gate = decide(capped, challenger, capped.summarize(challenger), None)
    assert failing(gate) == ["probe_drift"] and "0.3 > 0.25" in gate.reason
    plain = sliced(0.7, 0.7)
    assert failing(decide(capped, plain, capped.summarize(plain), None)) == ["probe_drift"]  # nothing to measure on


def test_a_champion_without_slices_is_not_comparable() -> None:
    """A report stored before slices existed (or on another probe set) makes finalize re-measure."""
    from registry.gate import comparable, slice_label

    challenger = sliced(0.7, 0.7, probe=0.5)
    assert comparable(sliced(0.1, 0.1, probe=0.9), challenger)
    assert not comparable(sliced(0.1, 0.1, probe=0.9).model_copy(update={"slices": {}}), challenger)
    assert not comparable(sliced(0.1, 0.1), challenger)
    assert not comparable(sliced(0.1, 0.1, probe=0.9, eval_hash="evalB"), challenger)
    assert comparable(sliced(0.1, 0.1), sliced(0.7, 0.7))
    assert slice_label("math/algebra|x") != slice_label("math/algebra?x")  # unsafe keys stay distinct
    assert slice_label("math.v2 a-b") == "math.v2 a-b"


def test_policy_probe_set_path_and_max_drift_need_a_probe_set(tmp_path) -> None:
    from atlasd.policies import PolicyFileError, parse_policy

    def policy(targets: dict, probe: str | None) -> str:
        evl = {"probe_set": probe} if probe else {}
        return json.dumps({"teacher": "t", "student": "s", "targets": targets,
                           "gears": {"fast": {"trigger": {"batch": {"every": 10}}, "eval": evl}}})

    p = parse_policy(policy({"max_drift": 0.5}, "./probes/general.jsonl"), file="x.yaml", stem="x", base_dir=tmp_path)
    assert p.gears["fast"].eval.probe_set == str(tmp_path / "probes" / "general.jsonl")
    assert p.targets.max_regression_pp == 2.0
    spec = p.run_spec("fast", run_id=1, trigger="batch", window_lo=0, window_hi=5, student=None,
                      champion_version=None, output_dir=tmp_path / "run")
    assert spec.eval.probe_set == str(tmp_path / "probes" / "general.jsonl") and spec.targets.max_drift == 0.5
    with pytest.raises(PolicyFileError, match="set eval.probe_set in gear"):
        parse_policy(policy({"max_drift": 0.5}, None), file="x.yaml", stem="x", base_dir=tmp_path)


# ------------------------------------------------------------------------------------ evaluation
def test_per_slice_success_and_probe_drift(tiny_frozen, tmp_path) -> None:
    from trainers.dataset import Example
    from trainers.evaluate import evaluate, evaluate_probe, load_probe_set

    tok, student, teacher, device = tiny_frozen
    examples = [Example(session_id=i, seq=i, prompt=[{"role": "user", "content": f"{i} + 1?"}], completion="x",
                        reference="yes" if i in (0, 1, 2, 5) else "no", learning_key="math" if i < 4 else "code")
                for i in range(7)]
    judge = lambda gen, ref: ref == "yes"  # noqa: E731  (the slices' rates do not depend on the generation)
    kw = {"model_name": "s", "max_new_tokens": 4, "max_prompt_tokens": 64, "device": device, "batch_size": 3}
    rep = evaluate(student, tok, examples, judge, samples_path=tmp_path / "s.jsonl", **kw)
    assert rep.slices == {"code": SliceResult(n_samples=3, success_rate=1 / 3),
                          "math": SliceResult(n_samples=4, success_rate=0.75)}
    assert rep.success_rate == pytest.approx(4 / 7)
    assert [json.loads(x)["learning_key"] for x in (tmp_path / "s.jsonl").read_text().splitlines()] == \
        ["math"] * 4 + ["code"] * 3

    probe_file = tmp_path / "probe.jsonl"
    probe_file.write_text('{"prompt": "2 + 2?", "answer": 4}\n\n'
                          '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 3?"}],'
                          ' "answer": "6"}\n')
    probe = load_probe_set(probe_file)
    assert [(e.session_id, e.reference, e.prompt[-1]["content"]) for e in probe] == [(1, "4", "2 + 2?"), (3, "6", "3 + 3?")]
    itself = evaluate_probe(student, tok, probe, judge, base=student, samples_path=tmp_path / "p.jsonl", **kw)
    assert itself.drift_kl == pytest.approx(0.0, abs=1e-6) and itself.n_samples == 2
    moved = evaluate_probe(student, tok, probe, judge, base=teacher, **kw)  # another model as the "base": drift
    assert moved.drift_kl > 0.01 and moved.probe_set_hash == itself.probe_set_hash
    for bad, why in (('{"prompt": "x"}', "answer"), ("[1, 2]", "invalid probe row"), ('{"messages": [], "answer": 1}',
                                                                                       "expected")):
        probe_file.write_text(bad + "\n")
        with pytest.raises(ValueError, match=why) as info:
            load_probe_set(probe_file)
        assert f"{probe_file}:1" in str(info.value)


# ------------------------------------------------------------------------------------ registry flow
def test_finalize_refuses_a_slice_regression_then_promotes_within_tolerance(tmp_path, store_dir, tracking_uri,
                                                                            tiny_models) -> None:
    """End to end on a real store: the champion's numbers come from the runs' start evaluations; the
    audit rows, the gate.* tags, the version's description and the side-by-side samples."""
    from mlflow import MlflowClient

    from registry.store import Registry

    def run(run_id: int, report: EvalReport, start: EvalReport | None, champion: str | None):
        spec, res, log = make_run(tmp_path, Path(tiny_models[1]), run_id, tracking_uri, targets=TARGETS,
                                  champion_version=champion)
        result = RunResult.load(res)
        out = RunSpec.load(spec).output_dir
        for which, rep in (("final", report), ("start", start)):
            if rep is None:
                continue
            path = out / "eval" / f"{which}_samples.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps({"session_id": i, "learning_key": "math" if i < 2 else "code",
                                                "prompt": [{"role": "user", "content": f"q{i}"}],
                                                "generation": f"{which}{run_id}-a{i}", "correct": i % 2 == 0,
                                                "tokens": i}) + "\n" for i in range(4)))
            setattr(result, "eval" if which == "final" else "eval_start",
                    rep.model_copy(update={"samples_path": str(path)}))
        result.baseline = TARGETS.summarize(result.eval)
        result.dump(res)
        return finalize_paths(spec, res, log)

    assert run(1, sliced(0.5, 0.9), None, None)["champion"] == "1"
    out2 = run(2, sliced(0.9, 0.85), sliced(0.5, 0.9), "1")
    assert out2["decision"] == "reject" and out2["champion"] == "1" and out2["champion_metrics_from"] == "eval_start"
    assert [c["name"] for c in out2["checks"] if not c["met"]] == ["no_regression:code"]  # the audit's rows
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    mv = client.get_model_version("atlasd-p1", "2")
    assert json.loads(mv.tags["gate.no_regression:code"])["met"] is False
    assert json.loads(mv.tags["gate.no_regression:math"])["met"] is True
    lines = mv.description.splitlines()
    assert "**reject**" in lines[0] and "| check | value | threshold | met |" in lines
    assert "| no_regression:code | 0.85 | 0.88 | **no** |" in lines
    assert "| beats_champion | 0.875 | 0.7 | yes |" in lines
    assert any("champion v1 (metrics from eval_start)" in line for line in lines)
    assert "| code | 20 | 0.9 | 0.85 | -5.0 |" in lines and "| math | 20 | 0.5 | 0.9 | +40.0 |" in lines
    table = json.loads(Path(client.download_artifacts(out2["mlflow_run_id"], "eval/samples.json",
                                                      str(tmp_path / "dl"))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == 4  # written again in place, not appended to
    assert [(r["generation"], r["champion_generation"]) for r in rows] == [
        (f"final2-a{i}", f"start2-a{i}") for i in range(4)]
    assert {"champion_correct", "champion_tokens", "learning_key"} <= set(table["columns"])

    out3 = run(3, sliced(0.9, 0.89), sliced(0.5, 0.9), "1")
    assert out3["decision"] == "promote" and out3["champion"] == "3", out3["reason"]
    assert "| no_regression:code | 0.89 | 0.88 | yes |" in Registry(tracking_uri).version("atlasd-p1", "3").description

    # a run that did not start from the champion: its numbers come from v3's tags, its answers from
    # the samples v3's own MLflow run logged on this eval set
    out4 = run(4, sliced(0.95, 0.9), None, None)
    assert out4["champion_metrics_from"] == "tags" and out4["decision"] == "promote", out4["reason"]
    table = json.loads(Path(client.download_artifacts(out4["mlflow_run_id"], "eval/samples.json",
                                                      str(tmp_path / "dl4"))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["generation"], r["champion_generation"]) for r in rows] == [(f"final4-a{i}", f"final3-a{i}")
                                                                           for i in range(4)]


def test_trainer_run_measures_slices_and_probe_then_finalize_reports_them(db_url, tiny_models, tmp_path, store_dir,
                                                                          tracking_uri) -> None:
    """A real `python -m trainers run` on a two-key eval set with a probe set (a policy with
    learning_key null): slices per key, the probe set and the drift from the base student in
    result.json; finalize shows them in the gate table and logs the probe samples."""
    from mlflow import MlflowClient

    from registry.finalize import trainer_measure

    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(24):
            key, answer = ("math", i + 3) if i % 2 else ("code", i * 2)
            add_session(conn, task=f"Task {i}: what is {answer}?", final_answer=str(answer), learning_key=key,
                        events=[event("student", f"What is {answer}?", key="input"),
                                event("teacher", f"Final Answer: {answer}")])
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": f"What is {n} + {n}?", "answer": 2 * n}) + "\n" for n in range(3)))
    out = tmp_path / "run"
    spec_path = write_spec(
        tmp_path / "run_spec.json", tiny_models, out,
        optim={"learning_rate": 5e-2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
               "max_steps": 2, "save_steps": 100, "max_length": 128},
        eval={"eval_fraction": 0.4, "max_samples": 8, "max_new_tokens": 6, "probe_set": str(probe)},
        targets={"baseline_success": 0.0, "min_success_delta": 0.0, "max_regression_pp": 2.0},
        mlflow={"tracking_uri": tracking_uri, "experiment": "atlasd/math", "registered_model": "atlasd-math"})
    done = subprocess.run([sys.executable, "-m", "trainers", "run", str(spec_path)], capture_output=True, text=True,
                          env=child_env(db_url), cwd=ROOT, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    result = RunResult.load(out / "result.json")
    evl, start = result.eval, result.eval_start
    assert set(evl.slices) == {"math", "code"} and sum(s.n_samples for s in evl.slices.values()) == evl.n_samples
    assert evl.probe.n_samples == 3 and evl.probe.probe_set_hash == start.probe.probe_set_hash
    assert start.probe.drift_kl == pytest.approx(0.0, abs=1e-6)  # the start is the base student itself
    assert evl.probe.drift_kl > 0  # trained: it moved away from the base
    assert Path(evl.probe.samples_path).is_file()

    fin = finalize_paths(spec_path, out / "result.json", measure=trainer_measure(spec_path))
    assert fin["decision"] == "promote" and fin["champion_metrics_from"] == "none", fin["reason"]
    checks = {c["name"]: c for c in fin["checks"]}
    assert {"no_regression:math", "no_regression:code", "probe_no_regression", "probe_drift"} <= set(checks)
    assert checks["probe_drift"]["value"] == pytest.approx(evl.probe.drift_kl)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    desc = client.get_model_version("atlasd-math", "1").description
    assert "| probe_drift |" in desc and "| (probe set) | 3 |" in desc and "Drift, KL to the base student" in desc
    run = client.get_run(fin["mlflow_run_id"])
    assert run.data.metrics["eval/probe/drift_kl"] == pytest.approx(evl.probe.drift_kl)
    assert "eval/slice/math/success_rate" in run.data.metrics
    table = json.loads(Path(client.download_artifacts(fin["mlflow_run_id"], "probe/samples.json",
                                                      str(tmp_path / "dl"))).read_text())
    assert len(table["data"]) == 3

    # the same checkpoint registered again by another run, the champion's stored report gone: the champion
    # is re-measured by the real `trainers eval` (eval set, slices, probe set), its answers shown beside
    rid = 43
    spec2 = RunSpec.load(spec_path).model_copy(update={"run_id": rid}).dump(tmp_path / "run_spec2.json")
    result2 = result.model_copy(update={"run_id": rid}).dump(tmp_path / "result2.json")
    client.delete_model_version_tag("atlasd-math", "1", f"atlasd.eval.{evl.eval_set_hash}")
    fin2 = finalize_paths(spec2, result2, measure=trainer_measure(spec2))
    assert fin2["champion_metrics_from"] == "re-measured", fin2
    assert [c["name"] for c in fin2["checks"] if not c["met"]] == ["beats_champion"]  # a full tie: the champion stays
    checks = {c["name"]: c for c in fin2["checks"]}
    assert checks["probe_no_regression"]["threshold"] == pytest.approx(evl.probe.success_rate - 0.02)
    assert checks["no_regression:math"]["threshold"] == pytest.approx(evl.slices["math"].success_rate - 0.02)
    table = json.loads(Path(client.download_artifacts(fin2["mlflow_run_id"], "probe/samples.json",
                                                      str(tmp_path / "dl2"))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == 3 and all(r["champion_generation"] == r["generation"] for r in rows)
    table = json.loads(Path(client.download_artifacts(fin2["mlflow_run_id"], "eval/samples.json",
                                                      str(tmp_path / "dl3"))).read_text())
    assert "champion_generation" in table["columns"] and len(table["data"]) == evl.n_samples
