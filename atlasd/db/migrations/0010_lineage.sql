-- Lineage and taint (atlasd/lineage.py): which sessions each succeeded run trained on (its training
-- manifest, data/train.manifest.json in the run folder), and which of them were revoked since.

-- One row per trained-on session of a run (window and rehearsal), keyed by its intake row.
-- revoked_at: when the intake first revoked that row after the run trained on it (or, for a row
-- already revoked when the run was recorded, when the intake did); never cleared by a re-approval.
CREATE TABLE IF NOT EXISTS atlasd.run_sessions (
    run_id BIGINT NOT NULL REFERENCES atlasd.runs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,                         -- atlasd.intake.seq
    session_id BIGINT NOT NULL,
    session_created_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ,
    PRIMARY KEY (run_id, seq)
);
-- a revocation finds the runs that trained on its rows by seq
CREATE INDEX IF NOT EXISTS run_sessions_seq_idx ON atlasd.run_sessions (seq);

-- One row per run whose lineage is recorded: its manifest hash, how many of its sessions are
-- revoked, and how far the MLflow tag `atlasd.tainted` on its model version has caught up
-- (tagged < revoked: still to tag, retried with backoff while the store is unavailable).
-- retrain_run_id: the clean retrain queued when the run first became tainted (policy on_taint: retrain).
CREATE TABLE IF NOT EXISTS atlasd.lineage (
    run_id BIGINT PRIMARY KEY REFERENCES atlasd.runs (id) ON DELETE CASCADE,
    manifest_hash TEXT NOT NULL,
    sessions INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    tagged INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    retrain_run_id BIGINT REFERENCES atlasd.runs (id) ON DELETE SET NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    tainted_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS lineage_to_tag ON atlasd.lineage (next_attempt_at) WHERE revoked > tagged;
