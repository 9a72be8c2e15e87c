-- A session's identity is (id, created_at), not its id alone: the SDK's ids start again at 1
-- after `TRUNCATE sessions RESTART IDENTITY` or a restore into a fresh database, and a new
-- session reusing an old id must be recorded as new (the old row is then revoked: its session
-- is gone). Every intake row the daemon wrote has session_created_at (the SDK's created_at is
-- NOT NULL); a row without one is given the session's created_at, else its approval time.
UPDATE atlasd.intake i
   SET session_created_at = COALESCE((SELECT s.created_at FROM public.sessions s WHERE s.id = i.session_id),
                                     i.approved_at)
 WHERE session_created_at IS NULL;
ALTER TABLE atlasd.intake ALTER COLUMN session_created_at SET NOT NULL;
ALTER TABLE atlasd.intake DROP CONSTRAINT intake_pkey;
ALTER TABLE atlasd.intake ADD CONSTRAINT intake_pkey PRIMARY KEY (session_id, session_created_at);
