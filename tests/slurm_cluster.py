"""A real single-node Slurm for the tests: Debian's ``slurm-wlm`` and ``munge`` (``.ci/run``
installs them), started in a temporary folder by :func:`start_cluster` and stopped by
:meth:`SlurmCluster.stop`; ``tests/conftest.py`` wraps it in the session fixture ``slurm_cluster``.

- munged on its own socket and key (``AuthInfo=socket=...``): nothing of the machine's munge is used.
- slurmctld and slurmd in the foreground as children of the test session, on free ports, with a
  generated ``slurm.conf``: ``SlurmctldHost=localhost``, one node ``localhost`` with this machine's
  CPUs and memory and one fake GPU (a GRES on ``/dev/null``, so that ``--gpus=1`` is schedulable;
  the job gets ``CUDA_VISIBLE_DEVICES=0``), one partition ``gpu``, ``proctrack/linuxproc``,
  ``task/none``, no accounting storage (``sacct`` answers "accounting storage is disabled": atlasd
  asks ``scontrol``), ``SlurmUser=root`` (the tests run as root), spool and state folders in the
  temporary folder.
- The Slurm commands find it through ``SLURM_CONF`` (``cluster.conf``; tests/test_slurm.py's
  ``slurm`` fixture sets it for a test).

It needs root and the binaries of :data:`BINARIES`; :func:`unavailable` names what is missing (the
tests then skip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "sacct")
SBIN = ("/usr/sbin", "/sbin")  # munged, slurmctld, slurmd: not on a non-root PATH
START_TIMEOUT_S = 60.0
PARTITION = "gpu"


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def unavailable() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    missing = [name for name in BINARIES if _which(name) is None]
    if missing:
        return (f"Slurm binaries missing: {', '.join(missing)} "
                "(apt-get install slurm-wlm munge; .ci/run installs them)")
    if os.geteuid() != 0:
        return "a real Slurm needs root (slurmd launches jobs as their user; SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 9 // 10  # slurmd refuses a node claiming more than it has
    raise RuntimeError("no MemTotal in /proc/meminfo")


@dataclass
class SlurmCluster:
    """A started cluster: its folder, its ``slurm.conf`` (the clients' ``SLURM_CONF``), its daemons."""

    root: Path
    conf: Path
    munged_pid: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def log_tail(self, limit: int = 3000) -> str:
        """The daemons' log tails, for a failure message."""
        tails = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            with contextlib.suppress(OSError):
                tails.append(f"--- {name}\n{(self.root / name).read_text(errors='replace')[-limit:]}")
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel the jobs still in the queue (a failed test's), wait until they are gone (bounded),
        then stop slurmd, slurmctld and munged (SIGTERM, SIGKILL after 10 s)."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        if self.procs and all(proc.poll() is None for proc in self.procs):
            _run(["scancel", "--user=root"], env)
            deadline = time.monotonic() + START_TIMEOUT_S
            while _run(["squeue", "-h", "-o", "%i"], env) and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.munged_pid.read_text()), signal.SIGTERM)


def _slurm_conf(root: Path, cpus: int, memory_mb: int) -> str:
    return f"""\
ClusterName=atlasd-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MinJobAge=300
KillWait=5
SchedulerParameters=sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _wait(what: str, cluster: SlurmCluster, check) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        for proc in cluster.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited {proc.returncode} before {what}\n{cluster.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {START_TIMEOUT_S:.0f}s waiting for {what}\n{cluster.log_tail()}")
        time.sleep(0.2)


def start_cluster(root: Path) -> SlurmCluster:
    """munged, slurmctld and slurmd in ``root``, returned once ``sinfo`` shows the node idle.
    Raises RuntimeError (with the daemons' log tails) when it does not come up."""
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, os.cpu_count() or 1, _memory_mb()))
    (root / "gres.conf").write_text("NodeName=localhost Name=gpu File=/dev/null\n")
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = SlurmCluster(root=root, conf=conf, munged_pid=root / "munged.pid")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munged = subprocess.run([_which("munged"), "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
                             f"--pid-file={cluster.munged_pid}", f"--log-file={root}/munged.log",
                             f"--seed-file={root}/munged.seed"], capture_output=True, text=True, timeout=30)
    if munged.returncode != 0:
        raise RuntimeError(f"munged exited {munged.returncode}: {munged.stderr.strip()}\n{cluster.log_tail()}")
    try:
        for daemon, extra in (("slurmctld", []), ("slurmd", ["-N", "localhost"])):
            with (root / f"{daemon}.out").open("ab") as out:
                cluster.procs.append(subprocess.Popen(
                    [_which(daemon), "-D", "-f", str(conf), *extra], env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True))
            if daemon == "slurmctld":
                _wait("slurmctld to answer", cluster, lambda: _run(["scontrol", "ping"], env).endswith("is UP"))

        def idle() -> bool:
            return _run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], env) == "idle"
        _wait("the node to be idle in sinfo", cluster, idle)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _run(argv: list[str], env: dict[str, str]) -> str:
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()
