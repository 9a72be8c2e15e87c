-- The running daemon's self-report, written only by the instance holding the per-database
-- advisory lock (atlasd/lock.py). One row; `atlasd status` reads it. A heartbeat older than
-- atlasd.lock.HEARTBEAT_STALE_S means no daemon is alive, whatever the other columns say.
CREATE TABLE IF NOT EXISTS atlasd.daemon_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    version TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    listener_connected BOOLEAN NOT NULL DEFAULT false,
    last_reconcile_at TIMESTAMPTZ,
    stopped_at TIMESTAMPTZ
);

