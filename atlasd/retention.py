"""Retention: what atlasd keeps on disk, ``atlasd gc [--dry-run]`` and the daemon's hourly gc.

Run folders (``STATE_DIR/runs/run-N``; a retry or resume continues in its parent's folder, so one
folder can hold several runs) and the registry's download cache (``STATE_DIR/registry-cache/
<model>/<version>``) are the disk atlasd fills. The rules (settings ``ATLASD_KEEP_VERSIONS``,
``ATLASD_KEEP_DAYS``):

- a folder is **live** while any of its runs is queued or running, a queued or running run
  continues from it (retry, resume), one of its failed/interrupted runs has no follow-up decided
  yet, or one of its runs has a registration that is not done (pending or failed: `atlasd
  register` needs its spec, result and checkpoint): nothing in it is touched;
- a folder is **kept** when one of its runs produced the champion, the previous champion (the
  rollback target), one of the policy's last ``keep_versions`` model versions, or finished less
  than ``keep_days`` ago; its periodic checkpoints (``checkpoints/``, with the optimizer state)
  are removed once every run in it has finished (the model is ``final/``);
- any other folder is removed whole;
- a cached download is removed unless its version is kept by the same rules (champion, previous
  champion, the last ``keep_versions``); half-finished downloads older than a day go too.

Revoked sessions (quarantined, un-approved or deleted after they were recorded) are purged from
the run folders: their lines go from the data snapshots (``data/*.jsonl``) and eval samples
(``eval/*.jsonl``) of every folder that is not live (a live folder's snapshot is what an exact
resume checks; it is purged once the folder is no longer live), and from MLflow (every atlasd run's
eval samples, ``python -m registry purge``). ``atlasd purge --revoked`` does it now; every gc does
it too.

Nothing outside ``STATE_DIR/runs`` and ``STATE_DIR/registry-cache`` is ever removed (a run row
pointing elsewhere is ignored). MLflow's own artifact copies are MLflow's (its UI deletes them).
Each gc writes ``STATE_DIR/gc.json`` (disk use per kind, what it removed); ``atlasd status``
shows it. The daemon never imports torch or mlflow: this is plain file work, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from atlasd import queue
from atlasd.component import Component
from atlasd.db import connect, safe_error
from atlasd.intake import revoked_session_ids
from atlasd.logging import get_logger
from atlasd.promotions import RegistryCallError, champion_moves, purge_mlflow
from atlasd.settings import Settings

PARTIAL_DOWNLOAD_MAX_AGE_S = 86400.0
GC_FIRST_DELAY_S = 60.0  # the daemon's first gc, after start-up work


@dataclass
class Removal:
    path: str
    what: str  # run folder | periodic checkpoints | cached model | partial download
    bytes: int
    why: str


@dataclass
class Purged:
    path: str
    lines: int  # lines of revoked sessions removed


@dataclass
class GcReport:
    dry_run: bool
    removals: list[Removal] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # folder -> why it is kept whole
    usage: dict[str, int] = field(default_factory=dict)  # kind -> bytes, after the gc
    at: str = ""
    purged: list[Purged] = field(default_factory=list)
    purge_waiting: dict[str, int] = field(default_factory=dict)  # live folder -> revoked lines left for later

    @property
    def freed(self) -> int:
        return sum(r.bytes for r in self.removals)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "at": self.at, "freed_bytes": self.freed,
                "removals": [asdict(r) for r in self.removals], "kept": self.kept, "usage_bytes": self.usage,
                "purged": [asdict(p) for p in self.purged], "purge_waiting": self.purge_waiting}


def tree_bytes(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; symlinks not followed; 0 if it is gone)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except FileNotFoundError:
        return 0
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def disk_usage(settings: Settings) -> dict[str, int]:
    """Bytes per kind under the state dir: run data, periodic checkpoints, final models, the
    registry cache, MLflow's artifacts and store (when local), and what the filesystem has free."""
    state = settings.state_dir
    runs = state / "runs"
    usage = {"runs_total": tree_bytes(runs), "periodic_checkpoints": 0, "final_models": 0}
    if runs.is_dir():
        for folder in runs.iterdir():
            usage["periodic_checkpoints"] += tree_bytes(folder / "checkpoints")
            usage["final_models"] += tree_bytes(folder / "final")
    usage["registry_cache"] = tree_bytes(state / "registry-cache")
    usage["mlflow_artifacts"] = tree_bytes(state / "mlartifacts")
    usage["mlflow_db"] = tree_bytes(state / "mlflow.db")
    if state.exists():
        usage["filesystem_free"] = shutil.disk_usage(state).free
    return usage


def _kept_versions(rows: list[dict], champions: list[tuple], keep_versions: int) -> dict[tuple[str, str], str]:
    """(registered model, version) -> why it is kept."""
    kept: dict[tuple[str, str], str] = {}
    by_model: dict[str, list[int]] = {}
    for r in rows:
        if r["registered_model"] and r["model_version"] and str(r["model_version"]).isdigit():
            by_model.setdefault(r["registered_model"], []).append(int(r["model_version"]))
    for model, versions in by_model.items():
        for v in sorted(set(versions))[-keep_versions:] if keep_versions else []:
            kept[(model, str(v))] = f"one of the last {keep_versions} versions of {model}"
    for model, champion, previous in champions:
        if previous:
            kept[(model, str(previous))] = f"previous champion of {model} (the rollback target)"
        kept[(model, str(champion))] = f"champion of {model}"
    return kept


@dataclass
class _Folders:
    """Run folders classified from the database (see the module doc)."""

    rows: list[dict]
    kept_versions: dict[tuple[str, str], str]
    live: dict[Path, str]  # folder -> why nothing in it may change
    keep: dict[Path, str]  # folder -> why it is kept (its periodic checkpoints go)
    root: Path

    def users(self, folder: Path) -> list[int]:
        return [r["id"] for r in self.rows if r["folder"] == folder]

    def run_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()), key=lambda p: p.name)


def _classify(conn: psycopg.Connection, settings: Settings, now: datetime) -> _Folders:
    rows = queue.runs_for_retention(conn)
    champions = champion_moves(conn)
    kept_versions = _kept_versions(rows, champions, settings.keep_versions)
    root = (settings.state_dir / "runs").resolve()
    by_id = {r["id"]: r for r in rows}

    def folder_of(row: dict | None) -> Path | None:
        if row is None or not row["output_dir"]:
            return None
        folder = Path(row["output_dir"]).resolve()
        return folder if folder.parent == root else None

    live: dict[Path, str] = {}
    keep: dict[Path, str] = {}
    for r in rows:
        folder = folder_of(r)
        if r["state"] in ("queued", "running"):
            parent = folder_of(by_id.get(r["parent_run_id"]))
            for f in (folder, parent):
                if f is not None:
                    live.setdefault(f, f"run {r['id']} is {r['state']}")
        if folder is None:
            continue
        if r["registration"] in ("pending", "failed"):
            live.setdefault(folder, f"run {r['id']}'s registration is {r['registration']}")
        if r["state"] in ("failed", "interrupted") and r["follow_up"] is None:
            live.setdefault(folder, f"run {r['id']} is {r['state']} and its retry/resume is not decided yet")
        why = kept_versions.get((r["registered_model"], str(r["model_version"])))
        if why:
            keep.setdefault(folder, f"run {r['id']} made v{r['model_version']}: {why}")
        elif r["finished_at"] is not None and now - r["finished_at"] < timedelta(days=settings.keep_days):
            keep.setdefault(folder, f"run {r['id']} finished less than {settings.keep_days:g} days ago")
    for r in rows:
        r["folder"] = folder_of(r)
    return _Folders(rows, kept_versions, live, keep, root)


def plan_gc(conn: psycopg.Connection, settings: Settings, now: datetime) -> GcReport:
    """What a gc would remove now (nothing is removed here)."""
    report = GcReport(dry_run=True, at=now.isoformat())
    folders = _classify(conn, settings, now)
    for folder in folders.run_folders():
        if folder in folders.live:
            report.kept[str(folder)] = folders.live[folder]
        elif folder in folders.keep:
            report.kept[str(folder)] = folders.keep[folder]
            periodic = folder / "checkpoints"
            if periodic.is_dir():
                report.removals.append(Removal(str(periodic), "periodic checkpoints", tree_bytes(periodic),
                                               "every run in the folder has finished (the model is final/)"))
        else:
            ids = folders.users(folder)
            why = (f"run{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}: finished, older than the keep "
                   "window, and not a kept model version") if ids else "no run in the database uses it"
            report.removals.append(Removal(str(folder), "run folder", tree_bytes(folder), why))
    _plan_cache(report, settings, folders.kept_versions)
    return report


def _plan_cache(report: GcReport, settings: Settings, kept_versions: dict[tuple[str, str], str]) -> None:
    cache = settings.state_dir / "registry-cache"
    if not cache.is_dir():
        return
    for model_dir in sorted(p for p in cache.iterdir() if p.is_dir() and not p.is_symlink()):
        for entry in sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            if entry.name.startswith("."):
                if time.time() - entry.stat().st_mtime > PARTIAL_DOWNLOAD_MAX_AGE_S:
                    report.removals.append(Removal(str(entry), "partial download", tree_bytes(entry),
                                                   "an interrupted download older than a day"))
            elif (model_dir.name, entry.name) in kept_versions:
                report.kept[str(entry)] = kept_versions[(model_dir.name, entry.name)]
            else:
                report.removals.append(Removal(str(entry), "cached model", tree_bytes(entry),
                                               "not the champion, the previous champion or a recent version"))


PURGE_GLOBS = ("data/*.jsonl", "eval/*.jsonl")  # the files of a run folder that hold session text
def purge_revoked(conn: psycopg.Connection, settings: Settings, now: datetime, *,
                  dry_run: bool) -> tuple[list[Purged], dict[str, int]]:
    """Remove revoked sessions' lines from the run folders that are not live (by session id: a
    reused id is purged with the revoked one). Returns what was (or would be) purged and, per live
    folder, the lines left for a later purge. (MLflow's copies: ``promotions.purge_mlflow``.)"""
    ids = revoked_session_ids(conn)
    purged: list[Purged] = []
    waiting: dict[str, int] = {}
    if not ids:
        return purged, waiting
    folders = _classify(conn, settings, now)
    for folder in folders.run_folders():
        live = folder in folders.live
        for path in (p for pattern in PURGE_GLOBS for p in sorted(folder.glob(pattern)) if p.is_file()):
            n = _purge_file(path, ids, dry_run=dry_run or live)
            if n and live:
                waiting[str(folder)] = waiting.get(str(folder), 0) + n
            elif n:
                purged.append(Purged(str(path), n))
    return purged, waiting


def _purge_file(path: Path, ids: set[int], *, dry_run: bool) -> int:
    kept, dropped = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                sid = json.loads(line).get("session_id")
            except (ValueError, AttributeError):
                sid = None
            if sid in ids:
                dropped += 1
            else:
                kept.append(line)
    if dropped and not dry_run:
        tmp = path.with_name(path.name + ".purging")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    return dropped


def run_gc(conn: psycopg.Connection, settings: Settings, now: datetime, *, dry_run: bool) -> GcReport:
    """Plan, then (unless ``dry_run``) remove and purge revoked sessions; write
    ``STATE_DIR/gc.json``. The plan is made from the database just before removing, so a run that
    starts meanwhile is in it (its folder live)."""
    report = plan_gc(conn, settings, now)
    report.dry_run = dry_run
    if not dry_run:
        for removal in report.removals:
            shutil.rmtree(removal.path, ignore_errors=True)
    report.purged, report.purge_waiting = purge_revoked(conn, settings, now, dry_run=dry_run)
    report.usage = disk_usage(settings)
    if not dry_run:
        write_last(settings, report)
    return report


def write_last(settings: Settings, report: GcReport) -> None:
    path = settings.state_dir / "gc.json"
    tmp = path.with_suffix(".json.tmp")
    data = report.as_dict()
    data["removals"] = data["removals"][:200]  # the file stays small; the log has them all
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def last_gc(settings: Settings) -> dict[str, Any] | None:
    """``atlasd status``: the last gc's time, freed bytes and disk use per kind (None: never ran)."""
    try:
        data = json.loads((settings.state_dir / "gc.json").read_text())
    except (OSError, ValueError):
        return None
    return {"at": data.get("at"), "freed_bytes": data.get("freed_bytes"), "removed": len(data.get("removals", [])),
            "usage_bytes": data.get("usage_bytes", {})}


class GcComponent(Component):
    """Daemon component: applies the retention policy ``GC_FIRST_DELAY_S`` after start, then every
    ``gc_interval_s`` (0: never; `atlasd gc` still works), only while this daemon holds its lock,
    in a thread on its own short connection (``atlasd-gc``). A failed round is logged and retried
    at the next interval."""

    name = "gc"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger("gc")
        self._task: asyncio.Task | None = None

    async def start(self, daemon: Any) -> None:
        if self.settings.gc_interval_s > 0:
            self._task = asyncio.create_task(self._loop(daemon), name="gc")

    async def _loop(self, daemon: Any) -> None:
        delay = min(GC_FIRST_DELAY_S, self.settings.gc_interval_s)
        while not daemon.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(daemon.stopping.wait(), delay)
            if daemon.stopping.is_set():
                return
            delay = self.settings.gc_interval_s
            if not daemon.lock_held.is_set():
                continue
            try:
                report, ids = await asyncio.to_thread(self.once)
            except Exception as exc:  # noqa: BLE001 - the database or the disk: next round
                self.log.warning("gc failed; retried at the next interval", error=safe_error(exc))
                continue
            try:
                mlflow = await purge_mlflow(self.settings, ids)
                if mlflow["rows_removed"]:
                    self.log.info("revoked sessions purged from MLflow", **mlflow)
            except RegistryCallError as exc:
                self.log.warning("revoked sessions not purged from MLflow yet (next gc retries)", error=str(exc))
            for r in report.removals:
                self.log.info("gc removed", path=r.path, what=r.what, bytes=r.bytes, why=r.why)
            self.log.info("gc", removed=len(report.removals), freed_bytes=report.freed, **{
                f"{k}_bytes": v for k, v in report.usage.items()})

    def once(self) -> tuple[GcReport, set[int]]:
        with connect(self.settings.dsn, autocommit=True, application_name="atlasd-gc") as conn:
            return run_gc(conn, self.settings, datetime.now(UTC), dry_run=False), revoked_session_ids(conn)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

