"""`atlasd models [POLICY] [--json]`, `atlasd promote POLICY VERSION --force --reason ...`,
`atlasd rollback POLICY [--reason ...]`. MLflow work runs in `python -m registry` children;
promotions and rollbacks are recorded in atlasd.promotions and fire the post-promotion hook."""

from __future__ import annotations

import argparse
import asyncio
import json

from atlasd.cli import CommandError
from atlasd.commands import cli_settings
from atlasd.promotions import PolicyBusy, RegistryCallError, actor_name, force_promote, list_models, rollback


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="registered models per policy: versions, aliases, key metrics")
    p.add_argument("policy", nargs="?", help="only this policy")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("promote", help="make VERSION the policy's champion outside the gate (audited)")
    p.add_argument("policy")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", required=True,
                   help="required: this bypasses the promotion gate")
    p.add_argument("--reason", required=True, help="why (recorded in atlasd.promotions and on the version)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="move the policy's champion back to the previous champion (audited)")
    p.add_argument("policy")
    p.add_argument("--reason", default="rollback", help="why (recorded in atlasd.promotions)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollback)


def _run(coro):
    try:
        return asyncio.run(coro)
    except RegistryCallError as exc:
        retry = " (MLflow store unavailable; try again later)" if exc.outcome.retryable else ""
        raise CommandError(f"{exc}{retry}") from None
    except PolicyBusy as exc:
        raise CommandError(str(exc)) from None


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))


def cmd_models(args: argparse.Namespace) -> int:
    settings = cli_settings()
    data = _run(list_models(settings, args.policy))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data["models"]:
        print("no registered models yet")
    for model in data["models"]:
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(model["aliases"].items())) or "no aliases"
        print(f"{model['policy']}: {model['registered_model']} ({aliases})")
        print(f"  {'version':>7}  {'run':>5}  {'decision':<8}  {'success':>7}  {'tokens':>7}  {'Δsuccess':>8}  {'-tok%':>6}  "
              f"{'tainted':>7}  aliases")
        for v in model["versions"]:
            print(f"  {v['version']:>7}  {_fmt(v['atlasd_run_id']):>5}  {_fmt(v['decision']):<8}  "
                  f"{_fmt(v['eval.success_rate']):>7}  {_fmt(v['eval.avg_tokens']):>7}  {_fmt(v['metrics.success_delta']):>8}  "
                  f"{_fmt(v['metrics.token_reduction_pct']):>6}  {_fmt(v['tainted']):>7}  {','.join(v['aliases'])}")
        champion = next((v for v in model["versions"] if v["version"] == model["aliases"].get("champion")), None)
        if champion is not None and champion["tainted"]:
            print(f"  warning: champion v{champion['version']} is tainted: it trained on {champion['tainted']} "
                  f"session(s) revoked since; it is not rolled back automatically (`atlasd rollback {model['policy']}`)")
    return 0


def _report(args: argparse.Namespace, payload: dict) -> int:
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"{payload['policy']}: champion {payload['registered_model']} v{payload['from_version'] or '-'} "
              f"-> v{payload['to_version']} ({payload['action']} by {payload['actor']}: {payload['reason']}); "
              f"hook: {payload['hook']}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    settings = cli_settings()
    return _report(args, _run(force_promote(settings, args.policy, args.version, args.reason, actor_name())))


def cmd_rollback(args: argparse.Namespace) -> int:
    settings = cli_settings()
    return _report(args, _run(rollback(settings, args.policy, args.reason, actor_name())))
