-- atlasd-owned schema and the intake of approved sessions.
-- The SDK's `sessions` table only gains the two triggers at the bottom; nothing else changes there.

CREATE TABLE IF NOT EXISTS atlasd.intake (
    -- atlasd's own recording order. Only the daemon holding the per-database advisory lock
    -- inserts here, so seq order is commit order: a trace window is a seq range (lo, hi].
    seq BIGSERIAL NOT NULL UNIQUE,
    session_id INTEGER PRIMARY KEY,
    learning_key TEXT,
    reward_score DOUBLE PRECISION,
    session_created_at TIMESTAMPTZ,
    -- the SDK keeps no approval time: this is when atlasd first saw the session approved and succeeded
    approved_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- NULL for a usable record; otherwise why the row cannot be trained on (it is still recorded once)
    malformed TEXT,
    -- set when a reviewer later moves the session away from 'approved' (cleared if re-approved)
    revoked_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS intake_key_seq_idx ON atlasd.intake (learning_key, seq) WHERE malformed IS NULL;

-- Wake-up for the daemon. Statement-level, with transition tables: one NOTIFY per statement,
-- only when some row became (or stopped being) ready: review_status = 'approved' AND status = 'succeeded'.
-- The payload is a hint (up to 500 comma-separated ids, or '*' for "look at everything"); the
-- tables stay the truth and the daemon reconciles from them anyway.
CREATE OR REPLACE FUNCTION atlasd.notify_sessions_ready() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    n_changed integer;
    ids text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT count(*), string_agg(id::text, ',') FILTER (WHERE rn <= 500)
          INTO n_changed, ids
          FROM (SELECT id, row_number() OVER () AS rn FROM atlasd_new_rows
                 WHERE review_status = 'approved' AND status = 'succeeded') t;
    ELSE
        SELECT count(*), string_agg(id::text, ',') FILTER (WHERE rn <= 500)
          INTO n_changed, ids
          FROM (SELECT n.id, row_number() OVER () AS rn
                  FROM atlasd_new_rows n JOIN atlasd_old_rows o ON o.id = n.id
                 WHERE (n.review_status = 'approved' AND n.status = 'succeeded')
                       IS DISTINCT FROM (o.review_status = 'approved' AND o.status = 'succeeded')) t;
    END IF;
    IF n_changed > 0 THEN
        PERFORM pg_notify('atlasd_traces', CASE WHEN n_changed <= 500 THEN ids ELSE '*' END);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS atlasd_sessions_ready_ins ON public.sessions;
CREATE TRIGGER atlasd_sessions_ready_ins
    AFTER INSERT ON public.sessions
    REFERENCING NEW TABLE AS atlasd_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION atlasd.notify_sessions_ready();

DROP TRIGGER IF EXISTS atlasd_sessions_ready_upd ON public.sessions;
CREATE TRIGGER atlasd_sessions_ready_upd
    AFTER UPDATE ON public.sessions
    REFERENCING OLD TABLE AS atlasd_old_rows NEW TABLE AS atlasd_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION atlasd.notify_sessions_ready();
