-- What the running daemon is riding out (atlasd/health.py), refreshed with every heartbeat:
-- a JSON array of {part, state, error, attempts, down_s}; empty when every part is healthy.
ALTER TABLE atlasd.daemon_state ADD COLUMN IF NOT EXISTS degraded JSONB NOT NULL DEFAULT '[]';
