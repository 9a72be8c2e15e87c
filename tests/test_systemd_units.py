"""The unit files pass `systemd-analyze verify` with no warning, and keep the settings the design relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep key case
    parser.read(UNITS / name)
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir(), reason="systemd tools not installed")
@pytest.mark.parametrize("unit", ["atlasd.service", "atlasd-mlflow.service"])
def test_unit_verifies_without_warnings(unit: str, tmp_path: Path) -> None:
    # verify inside a root that has the system's units and the executables the units name
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    bindir = root / "opt/atlasd/venv/bin"
    bindir.mkdir(parents=True)
    for exe in ("atlasd", "mlflow"):
        (bindir / exe).write_text("#!/bin/sh\n")
        (bindir / exe).chmod(0o755)
    (root / "bin").mkdir()
    for exe in ("kill", "sh"):
        shutil.copy(shutil.which(exe), root / "bin" / exe)
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    shutil.copy(UNITS / unit, target / unit)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", unit], capture_output=True, text=True
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    assert output == "", f"systemd-analyze warned:\n{output}"


def test_atlasd_unit_has_the_service_contract() -> None:
    svc = _unit("atlasd.service")["Service"]
    assert svc["Type"] == "notify"
    assert svc["KillMode"] == "mixed"
    assert svc["Restart"] == "on-failure"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["EnvironmentFile"] == "/etc/atlasd/atlasd.env"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["ProtectSystem"] == "strict" and "/var/lib/atlasd" in svc["ReadWritePaths"]
    assert svc["NoNewPrivileges"] == "true" and svc["PrivateTmp"] == "true"
    # these two break /dev/nvidia* and CUDA's JIT
    assert "PrivateDevices" not in svc and "MemoryDenyWriteExecute" not in svc
    assert svc["User"] == "atlasd"
