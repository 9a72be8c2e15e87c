-- Every claimed run ends with an outcome (issue 12; atlasd/runner.py, atlasd/queue.py).

ALTER TABLE atlasd.runs
    -- when the trainer last made progress (a step, a phase, an eval batch: any line but a bare heartbeat);
    -- a running run without progress for ATLASD_STALE_PROGRESS_S is stopped as hung
    ADD COLUMN IF NOT EXISTS progress_at TIMESTAMPTZ,
    -- a queued run whose start was put off (the MLflow store was unavailable): not claimed before this
    ADD COLUMN IF NOT EXISTS not_before TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS deferrals INTEGER NOT NULL DEFAULT 0,
    -- what a failed or interrupted run called for, written with its outcome: a retry or resume run
    -- (parent_run_id = this id) or none; NULL while undecided (its policy was not loaded): the
    -- runner's reconcile decides once the policy is back
    ADD COLUMN IF NOT EXISTS follow_up TEXT CHECK (follow_up IN ('retry', 'resume', 'none'));

-- runs that ended before this migration were followed up (or not) by the code of their time
UPDATE atlasd.runs SET follow_up = 'none' WHERE state IN ('failed', 'interrupted') AND follow_up IS NULL;

CREATE INDEX IF NOT EXISTS runs_undecided ON atlasd.runs (id)
    WHERE state IN ('failed', 'interrupted') AND follow_up IS NULL;

-- The runner's reconcile: runs left `running` without a supervised trainer, `succeeded` without a
-- registration row, failed/interrupted without a decided follow-up. One row.
CREATE TABLE IF NOT EXISTS atlasd.runner_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    reconciled_at TIMESTAMPTZ NOT NULL,         -- the last reconcile that completed
    repaired INTEGER NOT NULL DEFAULT 0,        -- runs it completed, all reconciles together
    last_repaired_at TIMESTAMPTZ                -- when a reconcile last completed a run
);
