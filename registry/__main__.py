"""``python -m registry COMMAND ...``: every command prints ONE JSON object on stdout (also on
error: ``{"error": ..., "exit_code": ...}``) and logs to stderr. ``--json`` is accepted and
changes nothing (the output is always JSON).

  finalize --spec SPEC.json --result RESULT.json [--log LOG.jsonl] [--source artifacts|path]
           [--artifact-root DIR] [--cache-dir DIR] [--actor NAME] [--defer-measure] [--revoked N]
      log the run, register its checkpoint (succeeded runs), run the promotion gate.
      ``--revoked N`` (the daemon passes it for a run with lineage): N of the sessions it trained on
      are revoked; the gate's check ``untainted`` then refuses the promotion unless N is 0.
      Tracking URI: the spec's ``mlflow.tracking_uri`` (stored without a password), or
      ``$MLFLOW_TRACKING_URI`` when that names the same store (it carries the password).
      ``--defer-measure``: exit 3 instead of re-measuring the champion (the caller holds the GPU, then calls again).
  models   [--policy P]                        registered models, versions, aliases, key metrics
  champion --policy P [--cache-dir DIR]        the champion and a local checkpoint path for RunSpec.student
  promote  --policy P --version V --reason R [--actor NAME] [--cache-dir DIR]
      forced promotion (outside the gate) of a loadable version
  rollback --policy P [--reason R] [--actor NAME] [--cache-dir DIR]
      move champion back to the champion it replaced, once that one's files load
  check    --path DIR                          is a checkpoint folder loadable (no torch)
  purge    --ids-file F                        revoked sessions' rows out of every atlasd run's eval samples
  taint    --model M --version V --count N     tag the version atlasd.tainted=N (N trained-on sessions revoked)

Commands other than finalize read the tracking URI from ``--tracking-uri`` or the
``MLFLOW_TRACKING_URI`` environment variable (the daemon uses the variable: no password in argv).
Exit codes (atlasd.runspec): 0 ok, 1 unexpected failure, 2 bad input or refused (do not retry),
3 finalize --defer-measure needs the GPU, 75 MLflow store unavailable (retry later).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

from atlasd.settings import redact_url
from registry import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NEEDS_GPU, EXIT_OK, EXIT_UNAVAILABLE, NeedsGpu, RegistryError,
                      StoreUnavailable)

_UNAVAILABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EIO, errno.ENOTDIR,
                       errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH}
_UNAVAILABLE_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def is_unavailable(exc: BaseException | None) -> bool:
    """True when the failure is the store's (database, server, artifact files), not the input's."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StoreUnavailable | sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError
                      | requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError | TimeoutError):
            return True
        if isinstance(exc, OSError) and exc.errno in _UNAVAILABLE_ERRNOS:
            return True
        if isinstance(exc, MlflowException) and (
            exc.error_code in _UNAVAILABLE_MLFLOW_CODES
            or "unable to open database file" in exc.message or "database is locked" in exc.message
            or "could not connect" in exc.message.lower() or "connection refused" in exc.message.lower()
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m registry", description="atlasd's MLflow registry child.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, *, uri: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="accepted; the output is always JSON")
        if uri:
            p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                           help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
        return p

    p = add("finalize", "log a finished run, register its checkpoint, run the promotion gate", uri=False)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--log", type=Path, help="the trainer's JSON-lines log (per-step metrics)")
    p.add_argument("--source", choices=["artifacts", "path"], default="artifacts",
                   help="register the checkpoint as run artifacts (copied; default) or by its local path")
    p.add_argument("--artifact-root", help="artifact root for new experiments (default: next to a sqlite store)")
    p.add_argument("--cache-dir", type=Path, help="where remote checkpoints are downloaded")
    p.add_argument("--actor", default="atlasd")
    p.add_argument("--defer-measure", action="store_true",
                   help="when the champion must be re-measured on this eval set, exit 3 instead of measuring "
                        "(the caller calls again once it holds the GPU)")
    p.add_argument("--revoked", type=int, help="trained-on sessions revoked so far (atlasd.lineage): gate check untainted")

    p = add("taint", "tag a model version whose run trained on sessions revoked since")
    p.add_argument("--model", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--count", type=int, required=True, help="how many of its trained-on sessions are revoked")

    p = add("purge", "remove revoked sessions' rows from every atlasd run's eval samples in MLflow")
    p.add_argument("--ids-file", type=Path, required=True, help="a JSON list of session ids")

    p = add("models", "registered models, versions, aliases and key metrics")
    p.add_argument("--policy")

    p = add("champion", "the policy's champion and a local path to its checkpoint")
    p.add_argument("--policy", required=True)
    p.add_argument("--cache-dir", type=Path)

    p = add("promote", "forced promotion of a version (outside the gate), audited by the caller")
    p.add_argument("--policy", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--actor", default="operator")
    p.add_argument("--cache-dir", type=Path)

    p = add("rollback", "move champion back to the previous champion")
    p.add_argument("--policy", required=True)
    p.add_argument("--reason", default="rollback")
    p.add_argument("--actor", default="operator")
    p.add_argument("--cache-dir", type=Path)

    p = add("check", "check that a checkpoint folder is loadable (config, weights, tokenizer)", uri=False)
    p.add_argument("--path", type=Path, required=True)
    return parser


def _registry(args: argparse.Namespace):
    from registry.store import Registry

    if not args.tracking_uri:
        raise RegistryError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return Registry(args.tracking_uri)


def cmd_finalize(args: argparse.Namespace) -> dict:
    from registry.finalize import deferred_measure, finalize, load_inputs, trainer_measure
    from registry.tracking import default_artifact_root

    spec, result = load_inputs(args.spec, args.result, args.log)
    root = args.artifact_root or default_artifact_root(spec.mlflow.resolved_tracking_uri())
    if root is None and not spec.mlflow.tracking_uri.startswith(("http://", "https://")):
        # MLflow would otherwise put artifacts in ./mlruns under whatever the current directory is
        raise RegistryError("--artifact-root is required with a database store other than sqlite")
    measure = deferred_measure if args.defer_measure else trainer_measure(args.spec)
    return finalize(
        spec, result, log_path=args.log, measure=measure, source_mode=args.source,
        artifact_root=root, cache_dir=args.cache_dir, actor=args.actor, revoked=args.revoked,
    )


def cmd_purge(args: argparse.Namespace) -> dict:
    from registry.purge import purge, read_ids

    return purge(_registry(args).client, read_ids(args.ids_file))


def cmd_taint(args: argparse.Namespace) -> dict:
    from registry import CHAMPION, TAG_TAINTED
    from registry.store import now_iso

    reg = _registry(args)
    mv = reg.version(args.model, args.version)
    reg.tag_version(args.model, str(mv.version), {TAG_TAINTED: str(args.count), "atlasd.tainted_at": now_iso()})
    return {"registered_model": args.model, "version": str(mv.version), "tainted": args.count,
            "champion": CHAMPION in mv.aliases}


def cmd_models(args: argparse.Namespace) -> dict:
    return {"models": _registry(args).models(args.policy)}


def cmd_champion(args: argparse.Namespace) -> dict:
    from registry import CHAMPION

    reg = _registry(args)
    name = reg.model_for_policy(args.policy)
    mv = reg.alias(name, CHAMPION)
    if mv is None:
        return {"policy": args.policy, "registered_model": name, "champion": None, "path": None}
    return {"policy": args.policy, "registered_model": name, "champion": str(mv.version),
            "path": str(reg.local_path(mv, args.cache_dir)), **reg.describe(mv)}


def _audit_payload(args, name: str, action: str, from_v: str | None, to_v: str, loadable: dict) -> dict:
    return {"policy": args.policy, "registered_model": name, "action": action, "from_version": from_v,
            "to_version": to_v, "previous_champion": from_v, "champion": to_v, "reason": args.reason,
            "actor": args.actor, "checks": [{"name": "loadable", "value": None, "threshold": None, "met": True,
                                             "reason": json.dumps(loadable)}]}


def cmd_promote(args: argparse.Namespace) -> dict:
    from registry.checkpoint import check_loadable

    reg = _registry(args)
    name = reg.model_for_policy(args.policy)
    mv = reg.version(name, args.version)
    loadable = check_loadable(reg.local_path(mv, args.cache_dir))
    previous = reg.set_champion(name, str(mv.version))
    reg.tag_decision(name, str(mv.version), "force", args.reason, args.actor, [])
    return _audit_payload(args, name, "force", previous, str(mv.version), loadable)


def cmd_rollback(args: argparse.Namespace) -> dict:
    reg = _registry(args)
    name = reg.model_for_policy(args.policy)
    from_v, to_v, loadable = reg.rollback(name, args.cache_dir)
    return _audit_payload(args, name, "rollback", from_v, to_v, loadable)


def cmd_check(args: argparse.Namespace) -> dict:
    from registry.checkpoint import check_loadable

    return check_loadable(args.path)


COMMANDS = {"finalize": cmd_finalize, "purge": cmd_purge, "taint": cmd_taint, "models": cmd_models, "champion": cmd_champion, "promote": cmd_promote,
            "rollback": cmd_rollback, "check": cmd_check}


def fail_fast() -> None:
    """MLflow retries an unreachable SQL store 10 times with backoff (~100 s); atlasd retries the
    whole registration later itself (atlasd.registrations), so the child gives up after ~0.4 s."""
    import mlflow.store.db.utils

    mlflow.store.db.utils.MAX_RETRY_COUNT = 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fail_fast()
    out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow's prints must not corrupt the one JSON line
            payload, code = COMMANDS[args.command](args), EXIT_OK
    except RegistryError as exc:
        payload, code = {"error": redact_url(str(exc))}, EXIT_BAD_INPUT
    except NeedsGpu as exc:
        payload, code = {"error": str(exc), "needs_gpu": True}, EXIT_NEEDS_GPU
    except Exception as exc:  # noqa: BLE001 - classified, reported as JSON, never a traceback on stdout
        code = EXIT_UNAVAILABLE if is_unavailable(exc) else EXIT_FAILED
        payload = {"error": redact_url(f"{type(exc).__name__}: {exc}")[:4000]}
    if code != EXIT_OK:
        payload["exit_code"] = code
        payload["retryable"] = code in (EXIT_UNAVAILABLE, EXIT_NEEDS_GPU)
        print(f"python -m registry {args.command}: {payload['error']}", file=sys.stderr)
    out.write(json.dumps(payload, default=str) + "\n")
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
