"""Stand-in for ``python -m registry COMMAND ...``: a JSON-file "MLflow" for the chaos suite.

The store is ``$CHAOS_REGISTRY_DIR/store.json``, read and written under ``fcntl.flock`` of
``store.lock``, one short critical section per operation (as MLflow's calls are separate
requests: nothing holds the store across a gate). One registered model per policy, one version
per atlasd run (found again by run id: a retried finalize never creates a second one), the
``challenger`` and ``champion`` aliases, a ``previous_champion`` tag per promoted version.

Commands and output as the real ``registry/__main__.py``: ONE JSON object on stdout (on error
``{"error", "exit_code", "retryable"}``); exit 0 ok, 2 bad input or refused, 75 store unavailable
(codes from :mod:`atlasd.runspec`).
  finalize --spec S --result R [--log L] [--source M] [--artifact-root D] [--cache-dir D] [--actor A]
           [--defer-measure]   (accepted and ignored: this gate never re-measures, never exits 3)
  models [--policy P] | champion --policy P [--cache-dir D]
  promote --policy P --version V --reason R [--actor A] [--cache-dir D]
  rollback --policy P [--reason R] [--actor A] [--cache-dir D]

The gate: promote when the run's ``eval.success_rate`` beats the champion's (or there is no
champion), else reject. A replayed finalize reports what an earlier attempt decided, and finishes
a promotion interrupted between the alias move and its decision tag (as ``registry/finalize.py``).

Knobs, ``$CHAOS_REGISTRY_DIR/knobs.json`` read by every call: ``down`` (true, or a list of
commands): exit 75 as an unreachable store; ``refuse`` (a list of commands): exit 2 as a bad
input the registry will never accept (the daemon must not retry it); ``gate_delay_s``: finalize
sleeps between reading the champion and moving the alias; ``tag_delay_s``: it sleeps after the
alias move, before tagging its decision; ``delay_runs``: the atlasd run ids the two delays apply
to (default: every run).
Journal (``$CHAOS_JOURNAL``, O_APPEND): every alias move (``kind: alias``) and each gate's read
of the champion and decision (``kind: gate``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from atlasd.runspec import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, RunResult, RunSpec

CHAMPION, CHALLENGER = "champion", "challenger"


class Refused(Exception):
    """Bad input or a refused operation: exit 2."""


class Unavailable(Exception):
    """The store is "down": exit 75."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def home() -> Path:
    folder = Path(os.environ["CHAOS_REGISTRY_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def knobs() -> dict:
    path = home() / "knobs.json"
    return json.loads(path.read_text() or "{}") if path.is_file() else {}


def journal(record: dict) -> None:
    path = os.environ.get("CHAOS_JOURNAL")
    if path:
        line = (json.dumps({**record, "pid": os.getpid(), "t": time.time()}) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


@contextlib.contextmanager
def store(write: bool = False) -> Iterator[dict]:
    """The whole store under an exclusive flock; written back (atomically) when ``write``."""
    folder = home()
    with open(folder / "store.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = folder / "store.json"
        data = json.loads(path.read_text()) if path.is_file() else {"models": {}, "runs": {}}
        yield data
        if write:
            tmp = path.with_name(f".store.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)


def model_for_policy(data: dict, policy: str) -> str:
    names = [name for name, m in data["models"].items() if m["policy"] == policy]
    if not names:
        raise Refused(f"no registered model for policy {policy!r} (no run of it was registered yet)")
    return names[0]


def version_of(model: dict, name: str, version: str) -> dict:
    if str(version) not in model["versions"]:
        raise Refused(f"model {name!r} has no version {version}")
    return model["versions"][str(version)]


def set_champion(model: dict, name: str, version: str, by: str, run_id: int | None = None) -> str | None:
    """Move ``champion`` to ``version`` (journaled); the champion it replaced."""
    previous = model["aliases"].get(CHAMPION)
    if previous == version:
        return model["versions"][version]["tags"].get("previous_champion") or None
    model["versions"][version]["tags"]["previous_champion"] = previous or ""
    if previous:
        model["versions"][previous]["tags"]["previous_champion_of"] = version
    model["aliases"][CHAMPION] = version
    journal({"kind": "alias", "model": name, "alias": CHAMPION, "from": previous, "to": version, "by": by,
             "run_id": run_id})
    return previous


def describe(model: dict, v: dict) -> dict:
    return {"version": v["version"], "aliases": sorted(a for a, n in model["aliases"].items() if n == v["version"]),
            "atlasd_run_id": v["run_id"], "decision": v["tags"].get("decision"), "mlflow_run_id": v["mlflow_run_id"],
            "source": v["source"], "created_at": v["created_at"],
            "previous_champion": v["tags"].get("previous_champion") or None,
            "eval.success_rate": v["success_rate"], "eval.avg_tokens": v["avg_tokens"],
            "metrics.success_delta": None, "metrics.token_reduction_pct": None}


# ------------------------------------------------------------------------------------ commands
def cmd_finalize(args: argparse.Namespace) -> dict:
    try:
        spec = RunSpec.load(args.spec)
        result = RunResult.load(args.result)
    except (OSError, ValueError) as exc:
        raise Refused(f"invalid inputs: {exc}") from None
    if spec.mlflow is None:
        raise Refused(f"{args.spec}: field mlflow is not set")
    if result.run_id != spec.run_id:
        raise Refused(f"{args.result}: run_id {result.run_id} != spec run_id {spec.run_id}")
    run_id, name = spec.run_id, spec.mlflow.registered_model
    mlflow_run_id = f"chaos-run-{run_id}"
    out = {"policy": spec.policy, "atlasd_run_id": run_id, "experiment_id": "1", "mlflow_run_id": mlflow_run_id,
           "registered_model": name, "model_version": None, "decision": "not_registered", "reason": "",
           "checks": [], "previous_champion": None, "champion": None}
    with store(write=True) as data:
        data["runs"].setdefault(str(run_id), {"mlflow_run_id": mlflow_run_id, "status": result.status})
    if result.status != "succeeded":
        out["reason"] = f"run {result.status}: logged, not registered"
        return out
    if not result.checkpoint or not Path(result.checkpoint).is_dir() or result.eval is None:
        raise Refused(f"{args.result}: a succeeded run needs a checkpoint folder and an eval report")
    rate = result.eval.success_rate
    with store(write=True) as data:
        model = data["models"].setdefault(name, {"policy": spec.policy, "aliases": {}, "versions": {}})
        if model["policy"] != spec.policy:
            raise Refused(f"registered model {name!r} belongs to policy {model['policy']!r}, not {spec.policy!r}")
        found = [v for v in model["versions"].values() if v["run_id"] == run_id]
        if found:
            version = found[0]["version"]
        else:
            version = str(max((int(v) for v in model["versions"]), default=0) + 1)
            model["versions"][version] = {
                "version": version, "run_id": run_id, "mlflow_run_id": mlflow_run_id, "source": result.checkpoint,
                "success_rate": rate, "avg_tokens": result.eval.avg_tokens, "created_at": now_iso(), "tags": {}}
            model["aliases"][CHALLENGER] = version
        tags = dict(model["versions"][version]["tags"])
        champion = model["aliases"].get(CHAMPION)
    out["model_version"] = version
    if tags.get("rolled_back_at"):
        out.update(decision=tags.get("decision") or "promote", previous_champion=tags.get("previous_champion") or None,
                   reason=f"rolled back to v{tags.get('rolled_back_to')} at {tags['rolled_back_at']}; "
                          "not promoted again",
                   checks=json.loads(tags.get("checks", "[]")), replayed=True)
    elif tags.get("decision") or champion == version:
        decision = tags.get("decision") or "promote"
        previous = tags.get("previous_champion") or None
        if decision == "promote" and not tags.get("promoted_at"):  # an interrupted promotion: finish it
            with store(write=True) as data:
                model = data["models"][name]
                previous = set_champion(model, name, version, "finalize", run_id)
                model["versions"][version]["tags"].update(decision="promote", promoted_at=now_iso())
        out.update(decision=decision, previous_champion=previous, checks=json.loads(tags.get("checks", "[]")),
                   reason=tags.get("reason", "promoted by an earlier, interrupted attempt"), replayed=True)
    else:
        out.update(gate(name, version, run_id, rate))
    with store() as data:
        out["champion"] = data["models"][name]["aliases"].get(CHAMPION)
    journal({"kind": "gate", "event": "done", "run_id": run_id, "model": name, "version": version,
             "decision": out["decision"], "champion": out["champion"]})
    return out


def gate(name: str, version: str, run_id: int, rate: float) -> dict:
    """Read the champion, decide, move the alias, tag the decision: separate store operations."""
    k = knobs()
    delayed = k.get("delay_runs") is None or run_id in k["delay_runs"]
    with store() as data:
        model = data["models"][name]
        champion = model["aliases"].get(CHAMPION)
        champion_rate = model["versions"][champion]["success_rate"] if champion else None
    journal({"kind": "gate", "event": "read", "run_id": run_id, "model": name, "version": version,
             "champion": champion})
    if delayed and k.get("gate_delay_s"):
        time.sleep(k["gate_delay_s"])
    met = champion is None or rate > champion_rate + 1e-9
    why = "no champion yet" if champion is None else f"success {rate:g} vs champion v{champion} {champion_rate:g}"
    checks = [{"name": "beats_champion", "value": rate, "threshold": champion_rate, "met": met, "reason": why}]
    decision = "promote" if met else "reject"
    previous = None
    if met:
        with store(write=True) as data:
            previous = set_champion(data["models"][name], name, version, "finalize", run_id)
    if delayed and k.get("tag_delay_s"):
        time.sleep(k["tag_delay_s"])
    reason = "all targets met" if met else f"beats_champion: {why}"
    with store(write=True) as data:
        tags = data["models"][name]["versions"][version]["tags"]
        tags.update(decision=decision, reason=reason, checks=json.dumps(checks), gated_against=champion or "")
        if met:
            tags["promoted_at"] = now_iso()
    return {"decision": decision, "reason": reason, "checks": checks, "previous_champion": previous,
            "gated_against": champion}


def cmd_models(args: argparse.Namespace) -> dict:
    with store() as data:
        names = [model_for_policy(data, args.policy)] if args.policy else sorted(data["models"])
        return {"models": [{"policy": data["models"][n]["policy"], "registered_model": n,
                            "aliases": dict(data["models"][n]["aliases"]),
                            "versions": [describe(data["models"][n], v) for _, v in
                                         sorted(data["models"][n]["versions"].items(), key=lambda kv: int(kv[0]))]}
                           for n in names]}


def cmd_champion(args: argparse.Namespace) -> dict:
    with store() as data:
        name = model_for_policy(data, args.policy)
        model = data["models"][name]
        champion = model["aliases"].get(CHAMPION)
        if champion is None:
            return {"policy": args.policy, "registered_model": name, "champion": None, "path": None}
        v = model["versions"][champion]
        return {"policy": args.policy, "registered_model": name, "champion": champion, "path": v["source"],
                **describe(model, v)}


def _audit(args: argparse.Namespace, name: str, action: str, from_v: str | None, to_v: str) -> dict:
    return {"policy": args.policy, "registered_model": name, "action": action, "from_version": from_v,
            "to_version": to_v, "previous_champion": from_v, "champion": to_v, "reason": args.reason,
            "actor": args.actor, "checks": [{"name": "loadable", "value": None, "threshold": None, "met": True,
                                             "reason": "stand-in"}]}


def cmd_promote(args: argparse.Namespace) -> dict:
    with store(write=True) as data:
        name = model_for_policy(data, args.policy)
        model = data["models"][name]
        version_of(model, name, args.version)
        previous = set_champion(model, name, str(args.version), "promote")
        model["versions"][str(args.version)]["tags"].update(decision="force", reason=args.reason, actor=args.actor)
    return _audit(args, name, "force", previous, str(args.version))


def cmd_rollback(args: argparse.Namespace) -> dict:
    with store(write=True) as data:
        name = model_for_policy(data, args.policy)
        model = data["models"][name]
        current = model["aliases"].get(CHAMPION)
        if current is None:
            raise Refused(f"model {name!r} has no champion to roll back")
        target = model["versions"][current]["tags"].get("previous_champion")
        if not target:
            raise Refused(f"champion {name} v{current} has no previous champion to roll back to")
        model["aliases"][CHAMPION] = target
        journal({"kind": "alias", "model": name, "alias": CHAMPION, "from": current, "to": target, "by": "rollback",
                 "run_id": None})
        model["versions"][current]["tags"].update(rolled_back_to=target, rolled_back_at=now_iso())
    return _audit(args, name, "rollback", current, target)


COMMANDS = {"finalize": cmd_finalize, "models": cmd_models, "champion": cmd_champion, "promote": cmd_promote,
            "rollback": cmd_rollback}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m registry", description="chaos-suite stand-in registry")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true")
        p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
        return p

    p = add("finalize")
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--log", type=Path)
    p.add_argument("--source", choices=["artifacts", "path"], default="artifacts")
    p.add_argument("--artifact-root")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--actor", default="atlasd")
    p.add_argument("--defer-measure", action="store_true", help="accepted and ignored (never exits 3)")
    p = add("models")
    p.add_argument("--policy")
    p = add("champion")
    p.add_argument("--policy", required=True)
    p.add_argument("--cache-dir", type=Path)
    p = add("promote")
    p.add_argument("--policy", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--actor", default="operator")
    p.add_argument("--cache-dir", type=Path)
    p = add("rollback")
    p.add_argument("--policy", required=True)
    p.add_argument("--reason", default="rollback")
    p.add_argument("--actor", default="operator")
    p.add_argument("--cache-dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        k = knobs()
        if k.get("down") is True or (isinstance(k.get("down"), list) and args.command in k["down"]):
            raise Unavailable("stand-in MLflow store unavailable: connection refused")
        if args.command in k.get("refuse", []):
            raise Refused(f"{args.command} refused by the stand-in registry (knob 'refuse')")
        payload, code = COMMANDS[args.command](args), EXIT_OK
    except Refused as exc:
        payload, code = {"error": str(exc)}, EXIT_BAD_INPUT
    except Unavailable as exc:
        payload, code = {"error": str(exc)}, EXIT_UNAVAILABLE
    except Exception as exc:  # noqa: BLE001 - reported as JSON, as the real one does
        payload, code = {"error": f"{type(exc).__name__}: {exc}"}, EXIT_FAILED
    if code != EXIT_OK:
        payload.update(exit_code=code, retryable=code == EXIT_UNAVAILABLE)
        print(f"python -m registry {args.command}: {payload['error']}", file=sys.stderr)
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
