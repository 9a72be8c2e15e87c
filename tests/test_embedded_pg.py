"""The demo's throw-away cluster: starts from the local binaries, serves, and leaves nothing behind."""

from __future__ import annotations

import psycopg
import pytest

from atlasd.demo.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, find_bindir

try:
    find_bindir()
    HAVE_BINARIES = True
except EmbeddedPostgresError:
    HAVE_BINARIES = False


@pytest.mark.skipif(not HAVE_BINARIES, reason="no PostgreSQL server binaries on this machine")
def test_cluster_starts_serves_and_is_removed() -> None:
    with EmbeddedPostgres() as pg:
        root, port = pg.root, pg.port
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "atlas"
            assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
    assert not root.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2)


def test_missing_binaries_are_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("ATLASD_PG_BINDIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("atlasd.demo.embedded_pg.Path.glob", lambda self, pattern: iter(()))
    with pytest.raises(EmbeddedPostgresError, match="ATLASD_DB_URL"):
        find_bindir()
