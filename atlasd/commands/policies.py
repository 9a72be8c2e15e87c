"""`atlasd policies validate | reset-eval`, `atlasd plan | trigger | pause | resume | reload`: the operator's handles on
the cadence (atlasd/cadence.py). Policies are read from disk (``ATLASD_POLICIES_DIR``): `plan` shows
what the daemon will do with the files as they are now (after a reload if it runs older ones)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import psycopg

from atlasd import cadence, evalsplit
from atlasd.cli import CommandError
from atlasd.commands import cli_settings
from atlasd.db import aconnect, connect
from atlasd.db.migrate import check_schema
from atlasd.lock import live_daemon
from atlasd.policies import Policy, PolicySet, expand_paths, load_files
from atlasd.promotions import actor_name
from atlasd.settings import Settings

T = TypeVar("T")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="cadence policy files: validate")
    psub = p.add_subparsers(dest="policies_command", metavar="ACTION", required=True)
    v = psub.add_parser("validate", help="check policy files (default: the policies folder); exit 1 listing every error")
    v.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="policy files or folders")
    v.set_defaults(func=cmd_validate)
    r = psub.add_parser("reset-eval", help="start a new eval generation for a policy (its current eval_fraction and "
                        "split_salt; a new frozen split); the champion is re-measured at the next registration")
    r.add_argument("policy")
    r.set_defaults(func=cmd_reset_eval)

    p = sub.add_parser("plan", help="dry run: per policy and gear, pending vs threshold, next cron tick, what would queue")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("trigger", help="queue a run of a policy's gear now (manual; same path as automatic runs)")
    p.add_argument("policy")
    p.add_argument("--gear", required=True)
    p.add_argument("--backfill", action="store_true",
                   help="every pending trace, beyond the gear's filters.max_traces (a deliberate backfill)")
    p.set_defaults(func=cmd_trigger)

    p = sub.add_parser("pause", help="stop automatic triggers of one policy, or of all (manual triggers still work)")
    p.add_argument("policy", nargs="?", help="policy name; omitted: every policy")
    p.add_argument("--reason", help="shown by plan and status")
    p.set_defaults(func=cmd_pause)

    p = sub.add_parser("resume", help="lift a pause (one policy's, or every pause); skipped cron ticks are not run")
    p.add_argument("policy", nargs="?", help="policy name; omitted: lift every pause")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("reload", help="make the running daemon re-read its policy files (sends it SIGHUP)")
    p.set_defaults(func=cmd_reload)


def with_db(settings: Settings, work: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
    """Run ``work`` on one autocommit connection after checking the schema is current."""
    with connect(settings.dsn, application_name="atlasd-cli") as conn:
        check_schema(conn)

    async def main() -> T:
        async with await aconnect(settings.dsn, autocommit=True, application_name="atlasd-cli") as conn:
            return await work(conn)

    return asyncio.run(main())


def policy_named(settings: Settings, name: str) -> Policy:
    """The valid policy ``name`` of the policies folder, else a CommandError listing the valid ones."""
    policies = load_policies(settings)
    policy = policies.get(name)
    if policy is None:
        known = ", ".join(policies.policies) or "none"
        raise CommandError(f"no valid policy {name!r} in {settings.policies_dir} (valid policies: {known})")
    return policy


def load_policies(settings: Settings) -> PolicySet:
    """The policies folder as the daemon would load it; each broken file is printed to stderr."""
    policies = PolicySet(settings.policies_dir)
    report = policies.reload()
    for issues in report.errors.values():
        for issue in issues:
            print(f"error: {issue}", file=sys.stderr)
    return policies


def cmd_validate(args: argparse.Namespace) -> int:
    settings = cli_settings()
    paths = args.paths or [settings.policies_dir]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise CommandError("no such file or folder: " + ", ".join(map(str, missing)))
    files = expand_paths(paths)
    result = load_files(files)
    for path, policy in result.policies.items():
        gears = ", ".join(f"{name} ({gear.kind})" for name, gear in policy.gears.items())
        print(f"ok: {path}: policy {policy.name!r}, gears: {gears}")
    for issues in result.errors.values():
        for issue in issues:
            print(f"error: {issue}", file=sys.stderr)
    if not files:
        print(f"no policy files (*.yaml, *.yml) in {', '.join(map(str, paths))}", file=sys.stderr)
    n_bad = len(result.errors)
    print(f"{len(result.policies)} valid, {n_bad} invalid", file=sys.stderr if n_bad else sys.stdout)
    return 1 if n_bad else 0


def cmd_plan(args: argparse.Namespace) -> int:
    settings = cli_settings()
    policies = load_policies(settings)

    async def work(conn: psycopg.AsyncConnection) -> tuple[list[cadence.GearPlan], list[str]]:
        return (
            await cadence.plan_all(conn, policies, settings, cadence.utc_now()),
            await cadence.paused_scopes(conn),
        )

    plans, paused = with_db(settings, work)
    errors = {file: [str(i) for i in issues] for file, issues in policies.errors.items()}
    if args.json:
        print(json.dumps({"gears": [p.to_json() for p in plans], "paused": paused,
                          "errors": {str(k): v for k, v in errors.items()}}, indent=2))
    else:
        if paused:
            print("paused: " + ", ".join("all policies" if s == "*" else s for s in paused))
        if not plans:
            print(f"no policies in {settings.policies_dir}")
        for p in plans:
            print(render_plan(p))
    return 1 if errors else 0


def render_plan(p: cadence.GearPlan) -> str:
    head = f"{p.policy}/{p.gear} ({p.kind}{', paused' if p.paused else ''})"
    count = f"{p.pending}/{p.threshold} pending" if p.threshold else f"{p.pending} pending"
    if p.action in ("enqueue", "coalesce"):
        what = (f"would queue a {p.trigger} run, window ({p.window_lo}, {p.window_hi}], {p.n_traces} traces"
                if p.action == "enqueue" else
                f"would widen queued run {p.queued_run_id} to {p.window_hi} (+{p.n_traces} traces)")
    else:
        what = "nothing to queue"
    lines = [f"{head}: {count}; {what}: {p.reason}"]
    if p.next_fire_at and p.kind == "cron":
        lines.append(f"    next tick: {p.next_fire_at.isoformat()}")
    if p.skipped_fire_at and p.action != "skip":
        lines.append(f"    last skipped tick: {p.skipped_fire_at.isoformat()} ({p.skipped_reason})")
    return "\n".join(lines)


def cmd_trigger(args: argparse.Namespace) -> int:
    settings = cli_settings()
    policy = policy_named(settings, args.policy)
    if args.gear not in policy.gears:
        raise CommandError(f"policy {policy.name!r} has no gear {args.gear!r} (gears: {', '.join(policy.gears)})")
    plan = with_db(settings, lambda conn: cadence.trigger_manual(conn, policy, args.gear, settings, cadence.utc_now(),
                                                                 backfill=args.backfill))
    if plan.action not in ("enqueue", "coalesce"):
        raise CommandError(f"nothing queued for {policy.name}/{args.gear}: {plan.reason}")
    if plan.action == "coalesce":
        print(f"run {plan.run_id} (already queued for {policy.name}/{args.gear}) now covers up to intake seq "
              f"{plan.window_hi}: +{plan.n_traces} traces")
    else:
        print(f"queued run {plan.run_id}: {policy.name}/{args.gear}, manual, window ({plan.window_lo}, "
              f"{plan.window_hi}], {plan.n_traces} traces")
    if plan.skipped_traces:
        print(f"{plan.skipped_traces} older pending traces left out (filters.max_traces "
              f"{policy.gears[args.gear].filters.max_traces}); `atlasd trigger {policy.name} --gear {args.gear} "
              "--backfill` would take them all")
    return 0


def cmd_reset_eval(args: argparse.Namespace) -> int:
    settings = cli_settings()
    policy = policy_named(settings, args.policy)
    split = with_db(settings, lambda conn: evalsplit.reset(conn, policy, actor_name()))
    print(f"policy {policy.name}: eval generation {split.generation} (eval_fraction {split.eval_fraction:g}, "
          f"split salt {split.key_salt!r}); the next run evaluates on the new split and its registration "
          "re-measures the champion on it")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    settings = cli_settings()
    with_db(settings, lambda conn: cadence.pause(conn, args.policy, args.reason))
    if args.policy and args.policy not in load_policies(settings).policies:
        print(f"note: no valid policy {args.policy!r} in {settings.policies_dir} now; the pause applies if it appears")
    print(f"paused {args.policy or 'all policies'}: automatic triggers stop (manual `atlasd trigger` still works)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    settings = cli_settings()

    async def work(conn: psycopg.AsyncConnection) -> tuple[list[str], list[str]]:
        return await cadence.resume(conn, args.policy), await cadence.paused_scopes(conn)

    lifted, still = with_db(settings, work)
    if not lifted:
        print(f"{args.policy or 'nothing'} was not paused")
    else:
        print("resumed " + ", ".join("all policies" if s == "*" else s for s in lifted)
              + "; cron ticks skipped while paused are not run")
    if "*" in still:
        print("note: all policies are still paused (`atlasd resume` without a name lifts that)")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    settings = cli_settings()
    with connect(settings.dsn, application_name="atlasd-cli") as conn:
        live = live_daemon(conn)
    if live is None:
        raise CommandError(f"no running atlasd on {settings.dsn_redacted} (start it with `atlasd run`)")
    pid, host = live
    if host != socket.gethostname():
        raise CommandError(f"atlasd runs on host {host!r} (pid {pid}); run `atlasd reload` there")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CommandError(f"atlasd pid {pid} is gone; it may be restarting") from None
    except PermissionError:
        raise CommandError(f"not allowed to signal atlasd pid {pid}: run as its user, or `systemctl reload atlasd`") from None
    print(f"sent SIGHUP to atlasd pid {pid}: it re-reads {settings.policies_dir}")
    files = expand_paths([settings.policies_dir]) if settings.policies_dir.is_dir() else []
    bad = load_files(files).errors
    for issues in bad.values():
        for issue in issues:
            print(f"error: {issue} (the daemon keeps running this policy's previous version, if any)", file=sys.stderr)
    return 1 if bad else 0

