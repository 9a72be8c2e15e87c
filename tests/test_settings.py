"""Secrets in text: atlasd.settings.redact_url hides every password form atlasd prints or logs."""

from __future__ import annotations

import pytest

from atlasd.settings import redact_url


@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql://atlas:s3cret@db:5432/atlas", "postgresql://atlas:***@db:5432/atlas"),
    ("postgresql://atlas:p@ss@w0rd@db/atlas", "postgresql://atlas:***@db/atlas"),  # '@' in the password
    ("http://u:a@b@mlflow:5000/path@x", "http://u:***@mlflow:5000/path@x"),
    ("error: postgresql://a:x@h/d failed; retry http://b:y@@z@m/", "error: postgresql://a:***@h/d failed; retry http://b:***@m/"),
    ("postgresql://atlas@db/atlas", "postgresql://atlas@db/atlas"),  # no password
    ("host=db password='p w@x' user=atlas", "host=db password=*** user=atlas"),
    ("dbname=atlas PASSWORD=s3cret", "dbname=atlas PASSWORD=***"),
    ("", ""),
])
def test_redact_url(text: str, expected: str) -> None:
    assert redact_url(text) == expected


def test_stored_tracking_uris_hold_no_password(monkeypatch) -> None:
    from atlasd.runspec import MlflowTarget
    from atlasd.settings import without_password

    assert without_password("postgresql://mlflow:p@ss@db:5432/mlflow") == "postgresql://mlflow@db:5432/mlflow"
    assert without_password("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert without_password("sqlite:////var/lib/atlasd/mlflow.db") == "sqlite:////var/lib/atlasd/mlflow.db"
    target = MlflowTarget(tracking_uri="postgresql://mlflow@db:5432/mlflow", experiment="e", registered_model="m")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:p@ss@db:5432/mlflow")
    assert target.resolved_tracking_uri() == "postgresql://mlflow:p@ss@db:5432/mlflow"  # same store: its password
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:x@other:5432/mlflow")
    assert target.resolved_tracking_uri() == "postgresql://mlflow@db:5432/mlflow"  # another store: never used
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert target.resolved_tracking_uri() == "postgresql://mlflow@db:5432/mlflow"


def test_children_get_no_credentials_they_do_not_need(monkeypatch) -> None:
    from atlasd.settings import SECRET_ENV, child_env

    for name in SECRET_ENV:
        monkeypatch.setenv(name, "postgresql://u:s3cret@h/d")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env = child_env(ATLASD_DB_URL="postgresql://u:s3cret@h/d")
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["ATLASD_DB_URL"]
    assert [k for k in env if k in SECRET_ENV] == ["ATLASD_DB_URL"]
