"""`atlasd db migrate`: idempotent, clear about missing SDK tables, trigger fires only for ready rows."""

from __future__ import annotations

import psycopg
import pytest

from atlasd.cli import main
from atlasd.db import DatabaseError
from atlasd.db.migrate import applied_versions, available_migrations, init_sdk_schema, migrate


def test_migrate_twice_is_a_noop(bare_db_url: str) -> None:
    init_sdk_schema(bare_db_url)
    first = migrate(bare_db_url)
    assert [m.version for m in first] == [m.version for m in available_migrations()]
    with psycopg.connect(bare_db_url) as conn:
        before = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.sessions'::regclass AND NOT tgisinternal"
        ).fetchone()[0]
    assert migrate(bare_db_url) == []
    with psycopg.connect(bare_db_url) as conn:
        after = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.sessions'::regclass AND NOT tgisinternal"
        ).fetchone()[0]
        assert set(applied_versions(conn)) == {m.version for m in available_migrations()}
    assert before == after == 2


def test_migrate_without_sdk_tables_says_so(bare_db_url: str, monkeypatch, capsys) -> None:
    with pytest.raises(DatabaseError, match=r"Atlas SDK tables are missing.*public\.sessions"):
        migrate(bare_db_url)
    monkeypatch.setenv("ATLASD_DB_URL", bare_db_url)
    assert main(["db", "migrate"]) == 1
    assert "init-sdk-schema" in capsys.readouterr().err


def test_cli_errors_never_show_the_password(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ATLASD_DB_URL", "postgresql://atlas:s3cret-pw@127.0.0.1:1/nope")
    assert main(["db", "migrate"]) == 1
    err = capsys.readouterr().err
    assert "s3cret-pw" not in err and "atlas:***@127.0.0.1" in err


def test_trigger_fires_only_for_ready_rows(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url, autocommit=True) as sdk:
        listener.execute("LISTEN atlasd_traces")
        sid = sdk.execute("INSERT INTO sessions (task) VALUES ('t') RETURNING id").fetchone()[0]
        assert list(listener.notifies(timeout=0.3)) == []
        sdk.execute("UPDATE sessions SET review_status = 'approved' WHERE id = %s", [sid])  # still running
        assert list(listener.notifies(timeout=0.3)) == []
        sdk.execute("UPDATE sessions SET status = 'succeeded' WHERE id = %s", [sid])  # now ready
        assert [n.payload for n in listener.notifies(timeout=1, stop_after=1)] == [str(sid)]
        sdk.execute("UPDATE sessions SET metadata = '{}' WHERE id = %s", [sid])  # no readiness change
        assert list(listener.notifies(timeout=0.3)) == []
        sdk.execute("UPDATE sessions SET review_status = 'quarantined' WHERE id = %s", [sid])  # un-approved
        assert [n.payload for n in listener.notifies(timeout=1, stop_after=1)] == [str(sid)]
        sdk.execute(
            "INSERT INTO sessions (task, status, review_status) SELECT 't', 'succeeded', 'approved' FROM generate_series(1, 600)"
        )
        assert [n.payload for n in listener.notifies(timeout=1, stop_after=1)] == ["*"]


def test_a_dropped_or_disabled_trigger_shows_in_db_status_and_migrate_brings_it_back(
        db_url: str, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ATLASD_DB_URL", db_url)
    assert main(["db", "status"]) == 0
    assert "NOTIFY triggers: enabled" in capsys.readouterr().out
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER atlasd_sessions_ready_upd ON public.sessions")
        conn.execute("ALTER TABLE public.sessions DISABLE TRIGGER atlasd_sessions_ready_ins")
    assert main(["db", "status"]) == 1
    out = capsys.readouterr().out
    assert "atlasd_sessions_ready_upd missing" in out and "atlasd_sessions_ready_ins disabled" in out
    assert migrate(db_url) == []  # nothing pending, yet the triggers are re-installed
    assert main(["db", "status"]) == 0
    assert "NOTIFY triggers: enabled" in capsys.readouterr().out
    with psycopg.connect(db_url, autocommit=True) as conn:  # and they fire again
        conn.execute("LISTEN atlasd_traces")
        conn.execute("INSERT INTO public.sessions (task, status, review_status) VALUES ('t', 'succeeded', 'approved')")
        assert next(conn.notifies(timeout=5)).channel == "atlasd_traces"
