-- The leaderboard view's bookkeeping and its read API.
--
-- The view itself, user_leaderboard, is the seed's materialized view: a
-- stored relation with data and indexes, so it lives in migrations/ (a new
-- definition is built beside the old one and swapped in, as migration 7
-- does), not here. The live board is in Redis (src/leaderboard/live.lua).

-- ---------------------------------------------------------------- the topic right

-- The seed's topic right: a rank within the top 10 % of the ranked users
-- (its view's `rank <= COUNT(*) * 0.1`). The live board's library
-- (live.lua), loyaltyd's pages (src/leaderboard/mod.rs) and the view are
-- tested against this function (tests/it/leaderboard.rs).
CREATE OR REPLACE FUNCTION topic_right(rank BIGINT, ranked BIGINT) RETURNS BOOLEAN
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN rank <= ranked * 0.1;

-- ---------------------------------------------------------------- pending changes

-- Pending leaderboard changes are counted on a row of the writing backend's
-- own (its pid): only that backend writes it, so writers never queue on it
-- and a transaction that records events for many users holds no lock
-- another writer needs. The pending count is the sum of the rows.
CREATE OR REPLACE FUNCTION leaderboard_count_changes(n BIGINT) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    UPDATE leaderboard_pending SET changes = changes + n WHERE shard = pg_backend_pid();
    IF NOT FOUND THEN
        INSERT INTO leaderboard_pending AS p (shard, changes) VALUES (pg_backend_pid(), n)
        ON CONFLICT (shard) DO UPDATE SET changes = p.changes + EXCLUDED.changes;
    END IF;
END $$;

-- The refresh's bookkeeping, in its transaction: takes `consumed` off the
-- pending count and folds the rows of backends that have ended into this
-- backend's row (SKIP LOCKED: a row whose pid a new backend reuses and holds
-- is left for the next refresh). It never waits for a writer.
CREATE OR REPLACE FUNCTION leaderboard_consume_changes(consumed BIGINT) RETURNS void
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    folded BIGINT;
BEGIN
    WITH gone AS (
        DELETE FROM leaderboard_pending p
        WHERE p.shard IN (
            SELECT q.shard FROM leaderboard_pending q
            WHERE q.shard <> pg_backend_pid()
              AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = q.shard)
            FOR UPDATE SKIP LOCKED)
        RETURNING p.changes
    )
    SELECT COALESCE(sum(changes), 0)::BIGINT INTO folded FROM gone;
    PERFORM leaderboard_count_changes(folded - consumed);
END $$;

-- ---------------------------------------------------------------- the view's read API

-- A user's score, and their rank and topic right on the view as last
-- refreshed (rank NULL when not on it). No row for an unknown user.
CREATE OR REPLACE FUNCTION loyalty_standing(p_user_id BIGINT)
    RETURNS TABLE (user_id BIGINT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM loyaltyd_check_range('loyalty_standing: user id', p_user_id, 1, 9223372036854775807);
    RETURN QUERY
    SELECT u.id::BIGINT, u.loyalty_score::BIGINT, l.rank, COALESCE(l.can_create_topics, false)
    FROM users u LEFT JOIN user_leaderboard l ON l.user_id = u.id
    WHERE u.id = p_user_id;
END $$;

COMMENT ON FUNCTION loyalty_standing(BIGINT) IS
    'The user''s current score, and the rank and topic right of the leaderboard view as of its last refresh. '
    'Live ranks from committed scores: Redis FCALL_RO loyaltyd_rank (docs/integrating.md, "Live standing").';

-- A page of the view: `p_limit` entries after `p_offset` ranks. Ranks are
-- dense 1..n: "rank > offset" skips without reading the skipped rows.
-- (BIGINT arguments: a typed client binding 64-bit integers finds it, and
-- INTEGER ones are cast up.)
CREATE OR REPLACE FUNCTION leaderboard_page(p_limit BIGINT DEFAULT 100, p_offset BIGINT DEFAULT 0)
    RETURNS TABLE (user_id BIGINT, username TEXT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM loyaltyd_check_range('leaderboard_page: limit', p_limit, 1, 1000);
    PERFORM loyaltyd_check_range('leaderboard_page: offset', p_offset, 0, 9223372036854775807);
    RETURN QUERY
    SELECT l.user_id::BIGINT, l.username::TEXT, l.loyalty_score::BIGINT, l.rank, l.can_create_topics
    FROM user_leaderboard l WHERE l.rank > p_offset ORDER BY l.rank LIMIT p_limit;
END $$;

COMMENT ON FUNCTION leaderboard_page(BIGINT, BIGINT) IS
    'A page of the leaderboard view as of its last refresh. '
    'Live pages from committed scores, with names: Redis FCALL_RO loyaltyd_page (docs/integrating.md, "Live standing").';
