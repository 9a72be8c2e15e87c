-- The readiness rule, defined once. A session is *ready* (recorded by the intake, counted toward a
-- gear, trained on) when a reviewer approved it and its run succeeded. Every query and the NOTIFY
-- trigger call this function; a plain SQL expression in an IMMUTABLE SQL function is inlined by the
-- planner, so plans (and index use) are those of the expression itself.
CREATE OR REPLACE FUNCTION atlasd.session_ready(review_status text, status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT review_status = 'approved' AND status = 'succeeded' $$;

-- Wake-up for the daemon. Statement-level, with transition tables: one NOTIFY per statement,
-- only when some row became (or stopped being) ready. The payload is a hint (up to 500
-- comma-separated ids, or '*' for "look at everything"); the tables stay the truth and the
-- daemon reconciles from them anyway. (Supersedes the definition in 0001; `atlasd db migrate`
-- re-installs this tail on every start, so a dropped or disabled trigger comes back.)
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
                 WHERE atlasd.session_ready(review_status, status)) t;
    ELSE
        SELECT count(*), string_agg(id::text, ',') FILTER (WHERE rn <= 500)
          INTO n_changed, ids
          FROM (SELECT n.id, row_number() OVER () AS rn
                  FROM atlasd_new_rows n JOIN atlasd_old_rows o ON o.id = n.id
                 WHERE atlasd.session_ready(n.review_status, n.status)
                       IS DISTINCT FROM atlasd.session_ready(o.review_status, o.status)) t;
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
