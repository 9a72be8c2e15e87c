"""The invariants every chaos scenario ends with (one place, one function).

1. **traces lost 0**: every ready session (``review_status = 'approved' AND status = 'succeeded'``)
   is in ``atlasd.intake`` under its identity (session id and ``session_created_at``: a reused id
   is another session);
2. **duplicate intake 0**: no identity recorded twice;
3. **every consumed window covered**: per policy and gear, ``(0, last_window_hi]`` of
   ``atlasd.policy_state`` is covered by the windows of runs that succeeded, are queued or
   running, or failed/interrupted with their follow-up still undecided;
4. **nothing running without a live trainer** (after up to ``settle_s``, 30 s);
5. **never two trainer process groups at once**: the stand-in trainers' start/end journal;
6. **each succeeded run registered exactly once**: its ``atlasd.registrations`` row done, one
   version for it in the stand-in registry (and none for a run that did not succeed), one gate
   decision in ``atlasd.promotions``; no registration left failed;
7. **the champion agrees with the audit**: per policy, the stand-in registry's ``champion`` alias is
   the ``to_version`` of the last champion-moving row of ``atlasd.promotions`` (promote, force,
   rollback), which is what ``atlasd status`` reports as the champion (and the last alias move in
   the registry's journal is that champion);
8. **nothing left for an operator**: ``atlasd status`` lists no ``problems`` once settled.

Everything is polled until it holds or ``settle_s`` passes (a registration or an outcome may still
be in flight when a scenario ends); then every violation is reported at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from atlasd.settings import load_settings
from atlasd.status import collect_status
from tests.chaos.harness import Chaos, ChaosDaemon

CHAMPION_MOVES = ("promote", "force", "rollback")


def assert_invariants(chaos: Chaos, daemon: ChaosDaemon | None = None, *, settle_s: float = 30) -> dict:
    """Poll until every invariant holds (or ``settle_s``); fail listing each violation. Returns
    ``atlasd status`` (as ``--json`` prints it) at the end."""
    deadline = time.monotonic() + settle_s
    while True:
        violations, status = _check(chaos)
        if daemon is not None and not daemon.alive():
            violations.append(f"the daemon exited ({daemon.proc.returncode})")
        if not violations:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"chaos invariants violated after {settle_s:.0f}s:\n  - " + "\n  - ".join(violations))
        time.sleep(0.25)


def _check(chaos: Chaos) -> tuple[list[str], dict]:
    out: list[str] = []
    out += _lost_and_duplicates(chaos)
    out += _windows(chaos)
    out += _running_has_a_trainer(chaos)
    out += _no_overlapping_trainers(chaos)
    out += _registered_once(chaos)
    out += _champion_matches_audit(chaos)
    settings = load_settings(db_url=chaos.db_url, policies_dir=chaos.policies, state_dir=chaos.state)
    with chaos.monitor() as conn:
        status = collect_status(conn, settings)
    if status["problems"]:
        out.append(f"atlasd status lists problems: {status['problems']}")
    return out, status


def _lost_and_duplicates(chaos: Chaos) -> list[str]:
    out = []
    lost = chaos.sql("""SELECT s.id FROM sessions s
                         WHERE s.review_status = 'approved' AND s.status = 'succeeded'
                           AND NOT EXISTS (SELECT 1 FROM atlasd.intake i WHERE i.session_id = s.id
                                              AND i.session_created_at IS NOT DISTINCT FROM s.created_at)
                         ORDER BY s.id""")
    if lost:
        out.append(f"traces lost: {len(lost)} ready sessions not in atlasd.intake under their identity "
                   f"(session id, created_at), e.g. ids {[r[0] for r in lost[:10]]}")
    dups = chaos.sql("""SELECT session_id, count(*) FROM atlasd.intake GROUP BY session_id, session_created_at
                         HAVING count(*) > 1 ORDER BY session_id LIMIT 10""")
    if dups:
        out.append(f"duplicate intake: {dups}")
    return out


def _windows(chaos: Chaos) -> list[str]:
    out = []
    runs = chaos.runs()
    for policy, gear, hi in chaos.sql("SELECT policy, gear, last_window_hi FROM atlasd.policy_state ORDER BY 1, 2"):
        spans = sorted((r["window_lo"], r["window_hi"]) for r in runs.values()
                       if r["policy"] == policy and r["gear"] == gear
                       and (r["state"] in ("succeeded", "queued", "running")
                            or (r["state"] in ("failed", "interrupted") and r["follow_up"] is None)))
        covered, gaps = 0, []
        for lo, top in spans:
            if lo > covered:
                gaps.append((covered, lo))
            covered = max(covered, top)
        if covered < hi:
            gaps.append((covered, hi))
        if gaps:
            states = {r["id"]: (r["state"], r["window_lo"], r["window_hi"], r["follow_up"]) for r in runs.values()
                      if r["policy"] == policy and r["gear"] == gear}
            out.append(f"{policy}/{gear}: consumed up to seq {hi} but windows {gaps} are in no succeeded, queued, "
                       f"running or pending-follow-up run (runs: {states})")
    return out


def _running_has_a_trainer(chaos: Chaos) -> list[str]:
    out = []
    for run in chaos.runs().values():
        if run["state"] != "running":
            continue
        if not run["pgid"] or not run["output_dir"] or not _group_in(run["pgid"], Path(run["output_dir"])):
            out.append(f"run {run['id']} is running without a live trainer (pid {run['pid']}, pgid {run['pgid']})")
    return out


def _group_in(pgid: int, run_dir: Path) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z" and Path(os.readlink(entry / "cwd")) == run_dir.resolve():
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _alive(pid: int) -> bool:
    try:
        return b"trainers" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _no_overlapping_trainers(chaos: Chaos) -> list[str]:
    out = []
    spans: dict[int, dict] = {}
    for record in chaos.journal("trainer"):
        span = spans.setdefault(record["pid"], {"pid": record["pid"], "run_id": record["run_id"]})
        span[record["event"]] = record["t"]
        span["pgid"] = record["pgid"]
    for span in spans.values():
        if span["pgid"] != span["pid"]:
            out.append(f"trainer pid {span['pid']} (run {span['run_id']}) is not its own process group leader")
        if "end" not in span:
            if _alive(span["pid"]):
                span["end"] = float("inf")
            else:
                out.append(f"trainer pid {span['pid']} (run {span['run_id']}) exited without its end record (SIGKILL?)")
                span["end"] = float("inf")
    ordered = sorted(spans.values(), key=lambda s: s.get("start", 0))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.get("start", 0) < a["end"]:
            out.append(f"two trainer process groups at once: pid {a['pid']} (run {a['run_id']}) and pid {b['pid']} "
                       f"(run {b['run_id']}) started {b.get('start', 0) - a.get('start', 0):.3f}s after it, "
                       f"before it ended")
    return out


def _registered_once(chaos: Chaos) -> list[str]:
    out = []
    runs = chaos.runs()
    regs = {r[0]: r[1:] for r in chaos.sql(
        "SELECT run_id, state, model_version, attempts, last_error FROM atlasd.registrations")}
    gates: dict[int, int] = dict(chaos.sql("""SELECT atlasd_run_id, count(*) FROM atlasd.promotions
                                               WHERE action IN ('promote', 'reject') GROUP BY 1"""))
    versions: dict[int, list[tuple[str, str]]] = {}
    for name, model in chaos.registry_store()["models"].items():
        for v in model["versions"].values():
            versions.setdefault(v["run_id"], []).append((name, v["version"]))
    for run_id, run in runs.items():
        if run["state"] != "succeeded":
            if run_id in versions:
                out.append(f"run {run_id} is {run['state']} but has registry versions {versions[run_id]}")
            continue
        reg = regs.get(run_id)
        if reg is None or reg[0] != "done":
            out.append(f"succeeded run {run_id}: registration {reg and reg[0]!r} (attempts {reg and reg[2]}, "
                       f"last error {reg and reg[3]!r}), not done")
            continue
        found = versions.get(run_id, [])
        if len(found) != 1:
            out.append(f"succeeded run {run_id} has {len(found)} versions in the registry: {found}")
        elif reg[1] != found[0][1] or run["model_version"] != found[0][1]:
            out.append(f"run {run_id}: registry version {found[0][1]}, registration row {reg[1]}, run row "
                       f"{run['model_version']}")
        if gates.get(run_id, 0) != 1:
            out.append(f"succeeded run {run_id} has {gates.get(run_id, 0)} gate decisions in atlasd.promotions")
    for run_id in versions:
        if run_id not in runs:
            out.append(f"the registry has versions for run {run_id}, which atlasd does not know")
    failed = [(run_id, reg[3]) for run_id, reg in regs.items() if reg[0] == "failed"]
    if failed:
        out.append(f"registrations failed: {failed}")
    return out


def _champion_matches_audit(chaos: Chaos) -> list[str]:
    out = []
    moves = chaos.sql(f"""SELECT policy, registered_model, from_version, to_version, action FROM atlasd.promotions
                           WHERE action IN {CHAMPION_MOVES} ORDER BY id""")
    alias_moves = [r for r in chaos.journal("alias") if r["alias"] == "champion"]
    for name, model in chaos.registry_store()["models"].items():
        champion = model["aliases"].get("champion")
        rows = [m for m in moves if m[0] == model["policy"]]
        audited = rows[-1][3] if rows else None
        if champion != audited:
            out.append(f"policy {model['policy']}: the registry's champion is v{champion} but the last champion move "
                       f"in atlasd.promotions is {rows[-1][4] + ' to v' + rows[-1][3] if rows else 'none'} "
                       f"(moves: {[(m[4], m[2], m[3]) for m in rows]})")
        mine = [r for r in alias_moves if r["model"] == name]
        if mine and mine[-1]["to"] != champion:
            out.append(f"registry journal: last alias move of {name} is to v{mine[-1]['to']}, alias is v{champion}")
    return out
