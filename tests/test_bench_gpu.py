"""bench/gpu.py, the prepared GPU benchmark, on CPU: its --tiny run end to end (the same code path as
on the device, tiny shapes, fp32), and its pieces that must hold on the device: a failing engine is
a row, not a crash; the hard time limit fires; the weight-change share counts elements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_NAMES = {"atlasd": "atlasd", "distill": "trl DistillationTrainer", "gkd": "trl experimental GKDTrainer"}


def test_tiny_run_reports_every_engine(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--steps", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| engine | status |" in out and "tiny shapes, CPU, fp32" in out
    rows = {}
    for line in out.splitlines():
        for key, name in ROW_NAMES.items():
            if line.startswith(f"| {name} |"):
                rows[key] = [c.strip() for c in line.strip("|").split("|")]
    assert set(rows) == set(ROW_NAMES), out
    for key, cells in rows.items():
        status = cells[1]
        assert status == "ok" or (status.startswith("failed: ") and len(status) > len("failed: ")), (key, status)

    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["meta"]["cuda"] is False and data["meta"]["steps"] == 3
    assert data["meta"]["versions"]["torch"] and data["meta"]["date"] and data["meta"]["device"].startswith("CPU")
    engines = {e["engine"]: e for e in data["engines"]}
    assert list(engines) == ["atlasd", "distill", "gkd"]
    assert engines["atlasd"]["status"] == "ok", engines["atlasd"]["error"]
    for name, e in engines.items():
        if e["status"] != "ok":
            assert e["error"], name
            continue
        assert len(e["step_times_s"]) == 3 and all(t > 0 for t in e["step_times_s"]), name
        assert e["median_s_per_step"] > 0 and e["vs_atlasd"] > 0, name
        assert 0 < e["weights_changed"] <= 1 and 0 <= e["weights_changed_bf16"] <= e["weights_changed"], name
        assert e["weights_dtype"] == "float32" and e["n_trained_params"] > 0, name
        assert len(e["losses"]) == 3, name
        assert {"gen", "teacher", "student"} <= set(e["split_median_s"]), name
    atlasd = engines["atlasd"]
    assert atlasd["vs_atlasd"] == pytest.approx(1.0)
    assert atlasd["split_median_s"]["gen"] > 0 and len(atlasd["trainer_rows"]) == 3
    # atlasd slices the heads to the tokenizer (512 tokens < the student's 600 rows): the padding rows of the
    # tied embedding get no gradient, so fewer weights move than under TRL, which trains every row
    trl_changed = [e["weights_changed"] for e in engines.values() if e["engine"] != "atlasd" and e["status"] == "ok"]
    assert all(atlasd["weights_changed"] < x for x in trl_changed)


# --- pieces -----------------------------------------------------------------------------------------
def _ctx(**args):
    defaults = dict(deadline_s=600.0, budget_s=100.0, reserve_s=60.0, warmup=1)
    return SimpleNamespace(args=SimpleNamespace(**{**defaults, **args}), cuda=False, steps=3,
                           t_start=time.monotonic())


def test_a_failing_engine_is_a_row_and_the_report_says_why(monkeypatch):
    import torch

    from bench import gpu

    def oom(ctx, res, clock, which):
        clock.start()
        clock.step_end()
        res.step_times_s = list(clock.times)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gpu, "run_trl", oom)
    res = gpu.run_engine("gkd", _ctx(), left_after=0)
    assert res.status == "failed" and res.error.startswith("OutOfMemoryError: CUDA out of memory")
    assert len(res.step_times_s) == 1  # what was measured before the failure is kept

    skipped = gpu.run_engine("distill", _ctx(deadline_s=10.0), left_after=0)
    assert skipped.status == "skipped" and "out of time" in skipped.error

    ok = gpu.Result(engine="atlasd", step_times_s=[3.0, 1.0, 1.2], splits=[{"gen": 1.0}] * 3,
                    weights_changed=1.0, weights_changed_bf16=0.2, weights_dtype="float32")
    meta = dict(mode="tiny", cuda=False, device="CPU", date="d", student="s", teacher="t", tokenizer_tokens=512,
                gear="fast", batch=2, accumulation=4, max_new_tokens=16, beta=0.5, temperature=0.9, lr=2e-5,
                steps=3, budget_s=100.0, plan_gib=None, plan_source="n/a",
                versions=dict(torch="x", transformers="y", trl="z", python="3"))
    table, data = gpu.report([ok, res, skipped], meta, warmup=1)
    assert "| trl experimental GKDTrainer | failed: OutOfMemoryError: CUDA out of memory" in table
    assert "| trl DistillationTrainer | skipped: out of time" in table
    assert "| atlasd | ok | 3 | 1.100 | 1.00x | 1.000 |" in table
    gkd = data["engines"][1]
    assert gkd["median_s_per_step"] > 0 and gkd["vs_atlasd"] is not None  # only the warm-up: its time, noted


def test_hard_limit_interrupts_a_running_engine():
    from bench.gpu import EngineTimeout, hard_limit

    t0 = time.monotonic()
    with pytest.raises(EngineTimeout), hard_limit(0.2):
        time.sleep(5)
    assert time.monotonic() - t0 < 2
    with hard_limit(0.2):  # disarmed on exit
        pass
    time.sleep(0.3)


def test_weight_probe_counts_changed_elements_per_tensor():
    import torch

    from bench.gpu import WeightProbe

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2, bias=False))
    model[1].weight.requires_grad_(False)  # frozen weights are not counted
    with torch.no_grad():
        model[0].weight.fill_(0.25)  # bf16 spacing at 0.25 is 2**-9: a 1e-6 step never shows as bf16
        model[0].bias.zero_()
    probe = WeightProbe(model)
    assert probe.dtype == "float32"
    with torch.no_grad():
        model[0].weight[:2] += 1e-6  # 8 of 16 weights: moved in fp32, not as bf16 values (too small)
        model[0].bias[:] += 1.0  # 4 of 4: moved in both
        model[1].weight += 1.0
    changed, changed_bf16, total = probe.compare()
    assert total == 20 and changed == pytest.approx(12 / 20) and changed_bf16 == pytest.approx(4 / 20)
    assert probe.params == [] and probe.copies == []  # no reference to the model kept


def test_unknown_engine_is_refused():
    from bench.gpu import parse_args

    assert parse_args(["--engines", "gkd,atlasd"]).engines == ["gkd", "atlasd"]
    with pytest.raises(SystemExit):
        parse_args(["--engines", "atlasd,vllm"])
