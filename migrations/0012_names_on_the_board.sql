-- Migration 12: a user's name reaches the live board the way a score does.
--
-- The live board (Redis, src/leaderboard/live.lua) answers a page's names
-- with its ranks and scores, so a page costs one Redis call. A rename by any
-- client (plain SQL, the forum's own code) advances the row's score_version
-- and records its transaction, so the daemon's cache sync writes the new
-- name to the board as it writes a changed score: score_version is the
-- version of what loyaltyd publishes from the row, its score and its name.
-- (A rename's new version also rewrites the cached score, unchanged: harmless.)
CREATE FUNCTION users_username_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    NEW.score_version := next_score_version(OLD.score_version);
    NEW.score_xid := pg_current_xact_id();
    RETURN NEW;
END $$;

-- After users_score_changed (triggers fire in name order): a statement that
-- changes the score and the name together advances the version once.
CREATE TRIGGER users_username_changed BEFORE UPDATE OF username ON users
    FOR EACH ROW
    WHEN (OLD.username IS DISTINCT FROM NEW.username AND OLD.score_version = NEW.score_version)
    EXECUTE FUNCTION users_username_changed();

-- The pinned search_path of migration 5.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION users_username_changed() SET search_path = %I, pg_temp', current_schema());
END $$;

-- The SQL API says which answers are the view's: exact live ranks come from
-- the live board's function library in Redis (README "Live standing from
-- any language"), which PostgreSQL cannot read.
COMMENT ON FUNCTION loyalty_standing(BIGINT) IS
    'The user''s current score, and the rank and topic right of the leaderboard view as of its last refresh. '
    'Live ranks from committed scores: Redis FCALL_RO loyaltyd_rank (README "Live standing from any language").';
COMMENT ON FUNCTION leaderboard_page(INTEGER, BIGINT) IS
    'A page of the leaderboard view as of its last refresh. '
    'Live pages from committed scores, with names: Redis FCALL_RO loyaltyd_page (README "Live standing from any language").';
