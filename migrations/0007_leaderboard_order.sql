-- The leaderboard's order gets its last tie-break, the user id (SPEC: score
-- descending, sign-up time ascending, then id). Users who signed up in the
-- same microsecond (every user of one bulk INSERT) had an arbitrary order in
-- the seed's view, one the live board in Redis could not reproduce, and a
-- refresh could reorder them without any score changing.
--
-- Built beside the old view and swapped in, keeping its grants, so readers
-- wait only for the renames, not for the build.
DO $$
DECLARE
    g RECORD;
BEGIN
    CREATE MATERIALIZED VIEW user_leaderboard_next AS
    SELECT
        u.id AS user_id,
        u.username,
        u.loyalty_score,
        ROW_NUMBER() OVER (ORDER BY u.loyalty_score DESC, u.created_at ASC, u.id ASC) AS rank,
        CASE
            WHEN ROW_NUMBER() OVER (ORDER BY u.loyalty_score DESC, u.created_at ASC, u.id ASC) <=
                 (SELECT COUNT(*) * 0.1 FROM users WHERE loyalty_score > 0)
            THEN true
            ELSE false
        END AS can_create_topics,
        u.created_at,
        u.updated_at
    FROM users u
    WHERE u.loyalty_score > 0
    ORDER BY u.loyalty_score DESC, u.created_at ASC, u.id ASC;
    CREATE UNIQUE INDEX idx_leaderboard_user_id_next ON user_leaderboard_next (user_id);
    CREATE INDEX idx_leaderboard_rank_next ON user_leaderboard_next (rank);
    CREATE INDEX idx_leaderboard_score_next ON user_leaderboard_next (loyalty_score DESC);
    CREATE INDEX idx_leaderboard_topic_creators_next ON user_leaderboard_next (can_create_topics)
        WHERE can_create_topics = true;
    FOR g IN
        SELECT a.privilege_type AS privilege,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee
        FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE c.oid = 'user_leaderboard'::REGCLASS AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON user_leaderboard_next TO %s', g.privilege, g.grantee);
    END LOOP;
    DROP MATERIALIZED VIEW user_leaderboard;
    ALTER MATERIALIZED VIEW user_leaderboard_next RENAME TO user_leaderboard;
    ALTER INDEX idx_leaderboard_user_id_next RENAME TO idx_leaderboard_user_id;
    ALTER INDEX idx_leaderboard_rank_next RENAME TO idx_leaderboard_rank;
    ALTER INDEX idx_leaderboard_score_next RENAME TO idx_leaderboard_score;
    ALTER INDEX idx_leaderboard_topic_creators_next RENAME TO idx_leaderboard_topic_creators;
END $$;
