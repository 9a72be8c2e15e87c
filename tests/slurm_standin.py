"""Stand-in Slurm CLI for tests/test_slurm.py: ``sbatch``, ``squeue``, ``sacct``, ``scontrol``,
``scancel`` (and ``slurmd``, the detached process that runs one job), the subset of the Slurm
contract atlasd uses. Jobs live in ``$SLURM_STANDIN_DIR/state.json``; every call is logged to
``calls.jsonl``. ``record REAL_COMMAND ARGS...`` only logs the call, then execs the real command
(the same call log in front of the real cluster of tests/slurm_cluster.py).

- sbatch [--parsable] --job-name= --output= --error= --chdir= ... SCRIPT: runs ``bash SCRIPT`` in the
  background in its own process group with sbatch's environment (``--export=ALL``), stdout/stderr
  appended to the files named; prints the job id.
- squeue -h (-j ID | -n NAME) -o FMT (%i %T %j %Z): jobs still known, finished ones in their final state
  (like MinJobAge); an unknown id: "Invalid job id specified", exit 1.
- sacct -n -P [-X] -j ID -o State,ExitCode: ``STATE|N:M`` (nothing with ``$SLURM_STANDIN_NO_ACCOUNTING``).
- scontrol -o show job ID: ``JobId=ID JobName=NAME JobState=STATE ExitCode=N:M`` (an invalid job id,
  as once ``MinJobAge`` has passed, with ``$SLURM_STANDIN_FORGET``).
- scancel [--signal=SIG] [--batch] ID: with --signal the signal goes to the batch shell (--batch)
  or the job's process group; without, the job is cancelled (SIGTERM, SIGKILL after 1 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ["SLURM_STANDIN_DIR"])
FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


@contextlib.contextmanager
def state():
    with (ROOT / "state.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = ROOT / "state.json"
        data = json.loads(path.read_text()) if path.exists() else {"next_id": 1001, "jobs": {}}
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


def opts(argv: list[str], flags: tuple[str, ...] = ("-h", "-P", "-X", "-n")) -> tuple[dict[str, str], list[str]]:
    found, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            key, _, value = arg[2:].partition("=")
            found[key] = value
        elif arg.startswith("--"):
            found[arg[2:]] = ""
        elif arg.startswith("-") and len(arg) == 2:
            if arg in flags:
                found[arg] = ""
            else:
                found[arg] = argv[i + 1]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return found, rest


def fmt(job: dict, template: str) -> str:
    return (template.replace("%i", job["id"]).replace("%T", job["state"]).replace("%j", job["name"])
            .replace("%Z", job["chdir"]))


def sbatch(argv: list[str]) -> int:
    o, rest = opts(argv)
    script = rest[-1]
    with state() as s:
        job_id = str(s["next_id"])
        s["next_id"] += 1
        s["jobs"][job_id] = {"id": job_id, "name": o.get("job-name", Path(script).name), "state": "PENDING",
                             "script": script, "output": o.get("output", f"slurm-{job_id}.out"),
                             "error": o.get("error", o.get("output", f"slurm-{job_id}.out")),
                             "chdir": o.get("chdir", os.getcwd()), "pid": None, "exit": "0:0", "cancelled": False}
    subprocess.Popen([sys.executable, __file__, "slurmd", job_id], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    print(job_id if "parsable" in o else f"Submitted batch job {job_id}")
    return 0


def slurmd(job_id: str) -> int:
    with state() as s:
        job = s["jobs"][job_id]
        if job["cancelled"]:
            return 0
        env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": job["name"]}
        with open(job["output"], "ab") as out, open(job["error"], "ab") as err:
            proc = subprocess.Popen(["bash", job["script"]], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    cwd=job["chdir"], env=env, start_new_session=True)
        job["pid"], job["state"] = proc.pid, "RUNNING"
    rc = proc.wait()
    with state() as s:
        job = s["jobs"][job_id]
        job["exit"] = f"0:{-rc}" if rc < 0 else f"{rc}:0"
        job["state"] = "CANCELLED" if job["cancelled"] else ("COMPLETED" if rc == 0 else "FAILED")
    return 0


def squeue(argv: list[str]) -> int:
    o, _ = opts(argv, flags=("-h",))
    template = o.get("-o", o.get("format", "%i %T"))
    with state() as s:
        jobs = list(s["jobs"].values())
    if "-j" in o:
        jobs = [j for j in jobs if j["id"] == o["-j"]]
        if not jobs:
            print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
            return 1
    if "name" in o or "-n" in o:
        jobs = [j for j in jobs if j["name"] == o.get("name", o.get("-n"))]
    for job in jobs:
        print(fmt(job, template))
    return 0


def sacct(argv: list[str]) -> int:
    o, _ = opts(argv)
    with state() as s:
        job = s["jobs"].get(o["-j"])
    if job is not None and not os.environ.get("SLURM_STANDIN_NO_ACCOUNTING"):
        final = job["state"] in FINAL
        print(f"{job['state'] if final else 'RUNNING'}|{job['exit'] if final else '0:0'}")
    return 0


def scontrol(argv: list[str]) -> int:
    job_id = argv[-1]
    with state() as s:
        job = s["jobs"].get(job_id)
    if job is None or os.environ.get("SLURM_STANDIN_FORGET"):
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    final = job["state"] in FINAL
    print(f"JobId={job_id} JobName={job['name']} JobState={job['state']} ExitCode={job['exit'] if final else '0:0'}")
    return 0


def scancel(argv: list[str]) -> int:
    o, rest = opts(argv)
    job_id = rest[0]
    with state() as s:
        job = s["jobs"].get(job_id)
        if job is None or job["state"] in FINAL:
            print(f"scancel: error: Kill job error on job id {job_id}: Job/step already completing or completed",
                  file=sys.stderr)
            return 1
        pid = job["pid"]
        if "signal" not in o:
            job["cancelled"] = True
            if pid is None:
                job["state"] = "CANCELLED"
    if pid is None:
        return 0
    sig = signal.Signals["SIG" + o["signal"]] if "signal" in o else signal.SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig) if "batch" in o else os.killpg(pid, sig)
    if "signal" not in o:
        subprocess.Popen([sys.executable, "-c", f"import os,time,signal\ntime.sleep(1)\n"
                          f"try: os.killpg({pid}, signal.SIGKILL)\nexcept ProcessLookupError: pass"],
                         start_new_session=True)
    return 0


def main() -> int:
    command, argv = sys.argv[1], sys.argv[2:]
    real = None
    if command == "record":
        real, argv = argv[0], argv[1:]
        command = Path(real).name
    if command != "slurmd":
        secrets = ("ATLASD_DB_URL", "PGPASSWORD", "MLFLOW_TRACKING_URI", "ATLASD_MLFLOW_TRACKING_URI",
                   "CUDA_VISIBLE_DEVICES")
        with (ROOT / "calls.jsonl").open("a") as log:
            log.write(json.dumps({"command": command, "argv": argv, "at": time.time(),
                                  "env": sorted(k for k in secrets if k in os.environ)}) + "\n")
    if real is not None:
        os.execv(real, [real, *argv])
    return {"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scontrol": scontrol, "scancel": scancel,
            "slurmd": lambda a: slurmd(a[0])}[command](argv)


if __name__ == "__main__":
    sys.exit(main())
