-- The run queue and the cadence state (atlasd/queue.py, atlasd/cadence.py).

-- One row per training run. State machine:
--   queued -> running -> succeeded | failed | interrupted ; queued | running -> cancelled
-- A run is a trace window of the intake: seq range (window_lo, window_hi].
CREATE TABLE IF NOT EXISTS atlasd.runs (
    id BIGSERIAL PRIMARY KEY,
    policy TEXT NOT NULL,
    gear TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'interrupted', 'cancelled')),
    trigger TEXT NOT NULL CHECK (trigger IN ('batch', 'cron', 'catch-up', 'manual', 'retry', 'resume')),
    -- claimed highest first, then oldest first: cron (high-quality) gears 10, batch gears 0
    priority INTEGER NOT NULL DEFAULT 0,
    window_lo BIGINT NOT NULL CHECK (window_lo >= 0),
    window_hi BIGINT NOT NULL,
    n_traces INTEGER NOT NULL DEFAULT 0,       -- new traces in the window that pass the gear's filters
    coalesced INTEGER NOT NULL DEFAULT 0,      -- later batch fires merged into this queued run
    scheduled_for TIMESTAMPTZ,                 -- cron/catch-up: the cron tick this run is for
    attempt INTEGER NOT NULL DEFAULT 0,        -- 0 first try; retries/resumes of the same window count up
    parent_run_id BIGINT REFERENCES atlasd.runs (id),  -- the run a retry/resume continues
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    -- runner (issue 5): the child process and its liveness
    heartbeat_at TIMESTAMPTZ,
    pid INTEGER,
    pgid INTEGER,
    host TEXT,
    output_dir TEXT,
    spec JSONB,                                -- the RunSpec written for the child
    champion_version TEXT,                     -- registry version the student started from (NULL: base student)
    metrics JSONB,                             -- latest metrics reported by the child
    result JSONB,                              -- RunResult (result.json)
    exit_code INTEGER,
    error TEXT,                                -- why it failed / was interrupted / was cancelled
    -- `atlasd cancel` on a running run sets this; the runner stops the child and marks it cancelled
    cancel_requested_at TIMESTAMPTZ,
    -- registry (issue 6): the model version registered for this run (idempotent by run id)
    model_version TEXT,
    registered_at TIMESTAMPTZ,
    CHECK (window_hi >= window_lo),
    CHECK ((state IN ('queued', 'running')) = (finished_at IS NULL))
);

-- The one GPU slot: at most one run is running, whatever races the callers have.
CREATE UNIQUE INDEX IF NOT EXISTS runs_one_running ON atlasd.runs ((true)) WHERE state = 'running';
-- At most one queued batch-triggered run per policy and gear: later batch fires widen it (coalescing).
CREATE UNIQUE INDEX IF NOT EXISTS runs_one_queued_batch ON atlasd.runs (policy, gear)
    WHERE state = 'queued' AND trigger = 'batch';
CREATE INDEX IF NOT EXISTS runs_queue_order ON atlasd.runs (priority DESC, id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS runs_policy_gear ON atlasd.runs (policy, gear, id);

-- Per policy and gear: what the cadence has consumed and when it last fired.
-- The batch trigger locks this row (SELECT ... FOR UPDATE) so a threshold fires exactly once.
CREATE TABLE IF NOT EXISTS atlasd.policy_state (
    policy TEXT NOT NULL,
    gear TEXT NOT NULL,
    last_window_hi BIGINT NOT NULL DEFAULT 0,  -- intake seq up to which traces went into a run of this gear
    armed_at TIMESTAMPTZ NOT NULL,             -- first seen: cron ticks before this are never "missed"
    cron_schedule TEXT,                        -- 'expr @ timezone' the gear was armed with; a change re-arms it
    last_fire_at TIMESTAMPTZ,                  -- last automatic fire (cron: the tick's time; batch: when)
    last_run_id BIGINT,                        -- last run enqueued for this gear (any trigger)
    last_run_at TIMESTAMPTZ,
    skipped_fire_at TIMESTAMPTZ,               -- last cron tick not run (paused, or older than the catch-up window)
    skipped_reason TEXT,
    PRIMARY KEY (policy, gear)
);

-- Pauses set by `atlasd pause [POLICY]`: policy '*' pauses every policy. Paused gears do not fire
-- automatically (traces keep counting; cron ticks are skipped); manual triggers still work.
CREATE TABLE IF NOT EXISTS atlasd.pauses (
    policy TEXT PRIMARY KEY,
    paused_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason TEXT
);
