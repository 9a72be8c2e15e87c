-- Model registry bookkeeping (atlasd/promotions.py; the MLflow work runs in `python -m registry`).

-- Every move of the `champion` alias, and every gate decision, as it happened.
--   promote:  the gate promoted to_version (from_version: the champion it replaced, NULL if none)
--   reject:   the gate kept from_version; to_version is the rejected challenger
--   force:    an operator promoted to_version outside the gate (`atlasd promote --force`)
--   rollback: an operator moved the champion back from from_version to to_version
CREATE TABLE IF NOT EXISTS atlasd.promotions (
    id BIGSERIAL PRIMARY KEY,
    policy TEXT NOT NULL,
    registered_model TEXT NOT NULL,
    from_version TEXT,
    to_version TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('promote', 'force', 'rollback', 'reject')),
    reason TEXT NOT NULL DEFAULT '',
    checks JSONB NOT NULL DEFAULT '[]',          -- [{name, value, threshold, met, reason}]
    decided_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor TEXT NOT NULL,                         -- 'atlasd' for the gate, else the operator
    atlasd_run_id BIGINT REFERENCES atlasd.runs (id),
    mlflow_run_id TEXT,
    hook TEXT                                    -- what the post-promotion hook did (notify, command exit)
);
CREATE INDEX IF NOT EXISTS promotions_policy_idx ON atlasd.promotions (policy, id DESC);
-- one gate decision per run: a retried registration never writes a second one
CREATE UNIQUE INDEX IF NOT EXISTS promotions_one_gate_per_run ON atlasd.promotions (atlasd_run_id)
    WHERE action IN ('promote', 'reject');

-- Registration of a finished run in MLflow (`python -m registry finalize`), retried while the
-- store is unavailable. The run's result stays on atlasd.runs; this row says whether MLflow has it.
--   pending: not yet (or the last attempt failed retryably: see attempts, last_error, next_attempt_at)
--   done:    logged (and, for a succeeded run, registered and gated); atlasd.runs.model_version set
--   failed:  bad input or too many attempts: needs an operator (last_error says why)
CREATE TABLE IF NOT EXISTS atlasd.registrations (
    run_id BIGINT PRIMARY KEY REFERENCES atlasd.runs (id) ON DELETE CASCADE,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    spec_path TEXT NOT NULL,
    result_path TEXT NOT NULL,
    log_path TEXT,
    mlflow_run_id TEXT,
    model_version TEXT,
    decision TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS registrations_due ON atlasd.registrations (next_attempt_at) WHERE state = 'pending';
