"""The unit files pass `systemd-analyze verify` with no warning, and keep the settings the design relies on."""

from __future__ import annotations

import configparser
import re
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


# ---- hardening (README, "Hardening"): exposure figures, the CUDA-relevant settings, the MLflow UI's login

REPO = UNITS.parent
DEPLOY = REPO / "deploy"
# `systemd-analyze security --offline=true` ceilings; measured: atlasd 1.7, atlasd-mlflow 1.1 (systemd 252)
EXPOSURE_CEILING = {"atlasd.service": 4.5, "atlasd-mlflow.service": 5.5}


def _directives(name: str) -> dict[str, list[str]]:
    """``[Service]`` key -> every value, in order (configparser keeps only the last of a repeated key)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _has_offline_security() -> bool:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return False
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    return "--offline" in proc.stdout


@pytest.mark.skipif(not _has_offline_security(), reason="systemd-analyze (with security --offline, systemd >= 250) not installed")
@pytest.mark.parametrize("unit", sorted(EXPOSURE_CEILING))
def test_unit_exposure_is_within_its_ceiling(unit: str) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNITS / unit)],
        capture_output=True, text=True,
    )
    output = proc.stdout + proc.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit)}:\s*([0-9]+(?:\.[0-9]+)?)", output)
    assert match, f"no exposure figure in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= EXPOSURE_CEILING[unit], f"{unit}: exposure {exposure} > {EXPOSURE_CEILING[unit]}\n{output}"


def test_atlasd_unit_keeps_cuda_working() -> None:
    svc = _directives("atlasd.service")
    # PrivateDevices hides /dev/nvidia*; MemoryDenyWriteExecute breaks CUDA's JIT, Triton, torch.compile;
    # ProcSubset=pid hides /proc/cpuinfo and /proc/meminfo (torch, psutil); PrivateUsers maps device owners to nobody
    for forbidden in ("PrivateDevices", "MemoryDenyWriteExecute", "ProcSubset", "PrivateUsers", "PrivateNetwork"):
        assert forbidden not in svc, forbidden
    assert svc["DevicePolicy"] == ["closed"]
    allowed = {value.split()[0]: value.split()[1] for value in svc["DeviceAllow"]}
    for group in ("char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"):  # /dev/nvidia*, -uvm, -caps/
        assert "r" in allowed.get(group, "") and "w" in allowed[group], group
    assert not any("m" in mode for mode in allowed.values())  # no mknod
    # the driver's device groups must be registered before the unit starts (DeviceAllow=char-* resolves then)
    unit_section = (UNITS / "atlasd.service").read_text().split("[Service]")[0]
    assert "modprobe@nvidia_uvm.service" in unit_section and "modprobe@nvidia.service" in unit_section
    # the syscall allow list keeps what CUDA/NCCL need (@resources: mbind, sched_setaffinity; @memlock; @ipc)
    assert svc["SystemCallFilter"] == ["@system-service"]
    assert svc["SystemCallErrorNumber"] == ["EPERM"]
    families = svc["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)


def test_atlasd_unit_hardening_and_oom() -> None:
    svc = _directives("atlasd.service")
    assert svc["UMask"] == ["0077"]
    assert svc["OOMPolicy"] == ["continue"]  # an OOM-killed trainer fails its run, the daemon keeps going
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["SystemCallArchitectures"] == ["native"]
    for key in ("ProtectClock", "ProtectHostname", "ProtectKernelLogs", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictNamespaces", "RemoveIPC", "NoNewPrivileges", "LockPersonality"):
        assert svc[key] == ["true"], key
    assert svc["ProtectProc"] == ["invisible"]
    assert svc["KeyringMode"] == ["private"]
    assert "MemoryMax" not in svc  # per box (README, "Memory"): no fixed cap fits a DGX Spark and a 2 TB DGX
    contract = _unit("atlasd.service")["Service"]
    assert contract["NotifyAccess"] == "main" and contract["KillSignal"] == "SIGTERM"
    assert contract["TimeoutStopSec"] == "15min" and contract["TimeoutStartSec"] == "5min"


def test_mlflow_unit_needs_a_login_and_keeps_secrets_out_of_argv() -> None:
    svc = _directives("atlasd-mlflow.service")
    (exec_start,) = svc["ExecStart"]
    argv = exec_start.split()
    assert argv[:2] == ["/opt/atlasd/venv/bin/mlflow", "server"]
    assert "--app-name basic-auth" in exec_start
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    # no shell, no expansion: the store URI (maybe with a password) reaches MLflow through the environment
    assert "$" not in exec_start and "ATLASD_MLFLOW_TRACKING_URI" not in exec_start
    assert "--backend-store-uri" not in exec_start and "sh -c" not in exec_start
    env = dict(value.split("=", 1) for value in svc["Environment"])
    assert env["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////var/lib/atlasd/mlflow.db"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/atlasd/mlflow-auth.ini"
    # its own root-only env file: the UI never gets the Atlas database's password
    assert svc["EnvironmentFile"] == ["/etc/atlasd/mlflow.env"]
    assert svc["PrivateDevices"] == ["true"] and svc["UMask"] == ["0077"]
    assert svc["IPAddressDeny"] == ["any"] and svc["IPAddressAllow"] == ["localhost"]
    assert svc["User"] == ["atlasd"]


def test_mlflow_reads_what_the_unit_sets() -> None:
    cli = pytest.importorskip("mlflow.cli")
    option = next(p for p in cli.server.params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"
    from importlib.metadata import entry_points

    assert "basic-auth" in {ep.name for ep in entry_points(group="mlflow.app")}
    # the auth config as MLflow parses it (mlflow/server/auth/config.py, loaded alone: the package needs Flask-WTF)
    import importlib.util
    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("_mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(DEPLOY / "mlflow-auth.ini"))
        mp.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
        mp.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
        config = module.read_auth_config()
    assert config.database_uri == "sqlite:////var/lib/atlasd/mlflow-auth.db"
    assert config.admin_username == "admin" and config.admin_password is None  # the password is in mlflow.env
    assert config.default_permission in {"READ", "EDIT", "MANAGE", "NO_PERMISSIONS"}


def test_install_pins_packages_and_keeps_env_files_private() -> None:
    script = (DEPLOY / "install.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DEPLOY / "install.sh")]).returncode == 0
    pip_lines = [line for line in script.splitlines() if "/bin/pip\" install" in line]
    assert pip_lines and all('-c "$CONSTRAINTS"' in line for line in pip_lines), pip_lines
    assert 'pip_install "$SRC" "mlflow[auth]"' in script
    assert 'install -m 0600 -o root -g atlasd "$SRC/deploy/atlasd.env.example" "$ETC/atlasd.env"' in script
    assert 'chmod 0600 "$ETC/atlasd.env"' in script and 'chmod 0600 "$ETC/mlflow.env"' in script
    assert "0640" not in (DEPLOY / "atlasd.env.example").read_text().splitlines()[0]
    example = (DEPLOY / "mlflow.env.example").read_text()
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=GENERATED" in example and "MLFLOW_AUTH_ADMIN_PASSWORD=GENERATED" in example


def test_constraints_pin_every_runtime_dependency() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - python < 3.11
        pytest.skip("tomllib")
    pins: dict[str, Version] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[key], prereleases=True), f"{req.name}=={pins[key]} does not meet {req.specifier}"
    assert "flask-wtf" in pins and pins["flask-wtf"] < Version("2")  # mlflow[auth]: Flask-WTF<2
    assert pins["torch"] == Version("2.13.0") and not pins["torch"].local  # met by +cpu and +cu130 alike
    for test_only in ("pytest", "pytest-asyncio", "pytest-timeout", "atlasd"):
        assert test_only not in pins, test_only
