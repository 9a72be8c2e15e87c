"""`atlasd runs [--json]`, `atlasd runs show ID [--json]`, `atlasd cancel ID` (atlasd/queue.py);
`atlasd register RUN_ID`, `atlasd registrations [--json]` (atlasd/promotions.py)."""

from __future__ import annotations

import argparse
import json

from atlasd import promotions, queue
from atlasd.cli import CommandError
from atlasd.commands import cli_settings
from atlasd.commands.policies import with_db
from atlasd.settings import redact_url
from atlasd.slurm import executor_info


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="the run queue, newest first; `runs show ID` for one run")
    p.add_argument("--json", action="store_true", help="JSON on stdout")
    p.add_argument("--state", action="append", choices=queue.STATES, help="only runs in this state (repeatable)")
    p.add_argument("--policy", help="only this policy's runs")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    p.set_defaults(func=cmd_runs)
    rsub = p.add_subparsers(dest="runs_command", metavar="ACTION")
    s = rsub.add_parser("show", help="every field of one run: window, times, process, metrics, result, error")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true", help="JSON on stdout")
    s.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "cancel",
        help="cancel a run: a queued one at once; a running one is stopped by the daemon (SIGTERM to the trainer)",
    )
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "register",
        help="re-queue the registration of a finished run (a failed one: attempts reset); the daemon retries it",
    )
    p.add_argument("id", type=int, metavar="RUN_ID")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("registrations", help="registrations of finished runs in MLflow: pending, failed, done")
    p.add_argument("--json", action="store_true", help="JSON on stdout")
    p.add_argument("--state", action="append", choices=promotions.REGISTRATION_STATES,
                   help="only registrations in this state (repeatable)")
    p.set_defaults(func=cmd_registrations)


def cmd_runs(args: argparse.Namespace) -> int:
    settings = cli_settings()
    runs = with_db(settings, lambda conn: queue.list_runs(conn, states=args.state, policy=args.policy, limit=args.limit))
    if args.json:
        print(redact_url(json.dumps([r.model_dump(mode="json") for r in runs], indent=2)))
        return 0
    if not runs:
        print("no runs")
        return 0
    header = ("ID", "POLICY", "GEAR", "STATE", "TRIGGER", "WINDOW", "TRACES", "CREATED", "FINISHED")
    rows = [
        (
            str(r.id),
            r.policy,
            r.gear,
            r.state + (" (cancel requested)" if r.cancel_requested_at and r.state == "running" else "")
            + (f" (deferred to {r.not_before:%H:%M:%S})" if r.not_before and r.state == "queued" else ""),
            r.trigger + (f" #{r.attempt}" if r.attempt else ""),
            f"({r.window_lo}, {r.window_hi}]",
            str(r.n_traces),
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.finished_at.strftime("%Y-%m-%d %H:%M:%S") if r.finished_at else "-",
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    settings = cli_settings()
    run = with_db(settings, lambda conn: queue.get_run(conn, args.id))
    if run is None:
        raise CommandError(f"no run {args.id}")
    data = json.loads(redact_url(json.dumps(run.model_dump(mode="json"))))  # rows written before specs were password-free
    data.update(executor_info(run.id, run.output_dir, run.pid) if run.pid or run.output_dir else {})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for line in json.dumps(value, indent=2).splitlines()[1:-1]:
                print(f"  {line}")
        else:
            print(f"{key}: {'-' if value is None else value}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    settings = cli_settings()
    try:
        run = with_db(settings, lambda conn: queue.cancel(conn, args.id))
    except queue.QueueError as exc:
        raise CommandError(str(exc)) from None
    if run.state == "cancelled":
        print(f"run {run.id} cancelled (it was queued)")
    else:
        print(f"run {run.id} is running: cancel requested; the daemon stops its trainer and marks it cancelled")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    settings = cli_settings()
    try:
        done = with_db(settings, lambda conn: promotions.requeue_registration(conn, args.id))
    except promotions.RegistrationRefused as exc:
        raise CommandError(str(exc)) from None
    print(f"registration of run {args.id} {done}: the daemon registers it within {settings.poll_interval_s:g} s "
          "(`atlasd registrations` shows how it went)")
    return 0


def cmd_registrations(args: argparse.Namespace) -> int:
    settings = cli_settings()
    rows = with_db(settings, lambda conn: promotions.list_registrations(conn, args.state))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no registrations")
        return 0
    header = ("RUN", "POLICY", "GEAR", "RUN STATE", "STATE", "ATTEMPTS", "VERSION", "DECISION", "LAST ERROR")
    table = [
        (str(r["run_id"]), r["policy"], r["gear"], r["run_state"],
         r["state"] + (f" (next {r['next_attempt_at']:%Y-%m-%d %H:%M:%S})" if r["state"] == "pending" else ""),
         str(r["attempts"]), r["model_version"] or "-", r["decision"] or "-", (r["last_error"] or "-")[:80])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
