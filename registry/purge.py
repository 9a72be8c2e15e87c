"""Revoked sessions' text out of MLflow: ``python -m registry purge --ids-file F``.

A logged run holds session text in its eval samples: ``<label>/samples.json`` (the table) and
``<label>/<file>.jsonl`` for ``label`` in ``eval`` and ``eval_start``. For every atlasd run (tag
``atlasd.run_id``) of every ``atlasd/*`` experiment, the rows whose ``session_id`` is in the file's
ids are removed and the artifacts written again at the same paths; the run is then tagged
``atlasd.purged`` with a digest of the id set, so an unchanged set costs one tag read per run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from registry import TAG_RUN_ID, RegistryError

TAG_PURGED = "atlasd.purged"
LABELS = ("eval", "eval_start")


def read_ids(path: Path) -> set[int]:
    try:
        return {int(x) for x in json.loads(path.read_text())}
    except (OSError, ValueError, TypeError) as exc:
        raise RegistryError(f"--ids-file {path}: expected a JSON list of session ids ({exc})") from None


def digest(ids: set[int]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16]


def _filter_jsonl(path: Path, ids: set[int]) -> int:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not (line.strip() and json.loads(line).get("session_id") in ids)]
    if len(kept) != len(lines):
        path.write_text("".join(kept), encoding="utf-8")
    return len(lines) - len(kept)


def _filter_table(path: Path, ids: set[int]) -> int:
    table = json.loads(path.read_text(encoding="utf-8"))  # MLflow's log_table: {"columns": [...], "data": [[...]]}
    columns, rows = table.get("columns", []), table.get("data", [])
    if "session_id" not in columns:
        return 0
    at = columns.index("session_id")
    kept = [row for row in rows if row[at] not in ids]
    if len(kept) != len(rows):
        table["data"] = kept
        path.write_text(json.dumps(table), encoding="utf-8")
    return len(rows) - len(kept)


def purge(client: MlflowClient, ids: set[int]) -> dict:
    mark = digest(ids)
    out = {"runs_checked": 0, "runs_changed": 0, "rows_removed": 0, "digest": mark}
    experiments = [e for e in client.search_experiments() if e.name.startswith("atlasd/")]
    if not experiments:
        return out
    for run in client.search_runs([e.experiment_id for e in experiments], f"tags.`{TAG_RUN_ID}` != ''",
                                  max_results=50_000):
        out["runs_checked"] += 1
        if run.data.tags.get(TAG_PURGED) == mark:
            continue
        rid, removed = run.info.run_id, 0
        for label in LABELS:
            names = [a.path for a in client.list_artifacts(rid, label) if not a.is_dir]
            for name in names:
                if not name.endswith((".jsonl", ".json")):
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    local = Path(client.download_artifacts(rid, name, tmp))
                    n = _filter_jsonl(local, ids) if name.endswith(".jsonl") else _filter_table(local, ids)
                    if n:
                        client.log_artifact(rid, str(local), artifact_path=label)
                        removed += n
        if removed:
            out["runs_changed"] += 1
            out["rows_removed"] += removed
        client.set_tag(rid, TAG_PURGED, mark)
    return out
