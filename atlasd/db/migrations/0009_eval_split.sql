-- The frozen eval split, by task. A session's split key is its learning key and its task
-- (normalised: trimmed, runs of white space as one space, lower case), so the same task run twice
-- falls on the same side; the split of a policy is recorded on first use (atlasd.eval_splits) and
-- changes only by an explicit `atlasd policies reset-eval` (a new generation, a new salt).
CREATE OR REPLACE FUNCTION atlasd.task_key(task text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT md5(lower(regexp_replace(btrim(task), '\s+', ' ', 'g'))) $$;

-- In the eval split: the first 60 bits of sha256("salt:learning_key:task_key") below `threshold`
-- (eval_fraction * 2^60). trainers/dataset.py's split_hash() is the same formula in Python.
CREATE OR REPLACE FUNCTION atlasd.in_eval_split(salt text, learning_key text, task_key text, threshold bigint)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ('x' || substr(encode(sha256(convert_to(salt || ':' || coalesce(learning_key, '') || ':' || task_key,
                                                   'UTF8')), 'hex'), 1, 15))::bit(60)::bigint < threshold $$;

-- Recorded at intake from the session's task (and here for the rows recorded before); NULL only
-- for a row whose session was gone by then: its session id stands for its task.
ALTER TABLE atlasd.intake ADD COLUMN IF NOT EXISTS task_key TEXT;
UPDATE atlasd.intake i SET task_key = atlasd.task_key(s.task)
  FROM public.sessions s
 WHERE s.id = i.session_id AND s.created_at = i.session_created_at AND i.task_key IS NULL;

-- One row per policy and eval generation: the split parameters its runs use. A run refuses
-- parameters that differ from the newest generation while the policy has a champion (measured on
-- that split); without a champion the row is updated in place.
CREATE TABLE IF NOT EXISTS atlasd.eval_splits (
    policy TEXT NOT NULL,
    generation INTEGER NOT NULL CHECK (generation >= 1),
    salt TEXT NOT NULL,
    eval_fraction DOUBLE PRECISION NOT NULL CHECK (eval_fraction > 0 AND eval_fraction < 1),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    reset_by TEXT,
    PRIMARY KEY (policy, generation)
);
