-- Stand-in for the Atlas SDK's own schema (arc-atlas 0.1.x, atlas/runtime/storage/).
-- atlasd never runs this against a production database: the SDK owns these tables.
-- Tests and the demo create them with `atlasd db init-sdk-schema` (the one place this DDL lives).
-- Like the SDK, it is idempotent (CREATE ... IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS sessions (
    id SERIAL PRIMARY KEY,
    task TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running',
    metadata JSONB,
    final_answer TEXT,
    reward JSONB,
    reward_stats JSONB,
    reward_audit JSONB,
    student_learning TEXT,
    teacher_learning TEXT,
    review_status TEXT NOT NULL DEFAULT 'pending',
    review_notes TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS sessions_learning_key_idx ON sessions ((metadata->>'learning_key'));
CREATE INDEX IF NOT EXISTS sessions_reward_score_idx ON sessions (((reward_stats->>'score')::double precision))
    WHERE reward_stats IS NOT NULL;

CREATE TABLE IF NOT EXISTS plans (
    session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    plan JSONB NOT NULL
);
CREATE TABLE IF NOT EXISTS step_results (
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    step_id INTEGER,
    trace TEXT,
    output TEXT,
    evaluation JSONB,
    attempts INTEGER,
    metadata JSONB,
    PRIMARY KEY (session_id, step_id)
);
CREATE TABLE IF NOT EXISTS step_attempts (
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    step_id INTEGER,
    attempt INTEGER,
    evaluation JSONB
);
CREATE TABLE IF NOT EXISTS guidance_notes (
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    step_id INTEGER,
    sequence INTEGER,
    note TEXT,
    PRIMARY KEY (session_id, step_id, sequence)
);
CREATE TABLE IF NOT EXISTS trajectory_events (
    id SERIAL PRIMARY KEY,
    session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
    event JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
