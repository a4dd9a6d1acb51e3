-- The leaderboard: the seed's materialized view, verbatim, and the bookkeeping
-- that debounces its refresh.

CREATE MATERIALIZED VIEW user_leaderboard AS
SELECT
    u.id AS user_id,
    u.username,
    u.loyalty_score,
    ROW_NUMBER() OVER (ORDER BY u.loyalty_score DESC, u.created_at ASC) AS rank,
    CASE
        WHEN ROW_NUMBER() OVER (ORDER BY u.loyalty_score DESC, u.created_at ASC) <=
             (SELECT COUNT(*) * 0.1 FROM users WHERE loyalty_score > 0)
        THEN true
        ELSE false
    END AS can_create_topics,
    u.created_at,
    u.updated_at
FROM users u
WHERE u.loyalty_score > 0
ORDER BY u.loyalty_score DESC, u.created_at ASC;

-- The unique index is what REFRESH ... CONCURRENTLY needs.
CREATE UNIQUE INDEX idx_leaderboard_user_id ON user_leaderboard (user_id);
CREATE INDEX idx_leaderboard_rank ON user_leaderboard (rank);
CREATE INDEX idx_leaderboard_score ON user_leaderboard (loyalty_score DESC);
CREATE INDEX idx_leaderboard_topic_creators ON user_leaderboard (can_create_topics) WHERE can_create_topics = true;

-- Pending leaderboard changes, counted in the same statement that records the
-- event, so a change is counted exactly once and survives a Redis restart.
-- Sharded by backend so concurrent writers do not queue on one hot row (each
-- holds its shard's row lock until it commits); the count is the sum.
CREATE TABLE leaderboard_pending (
    shard   SMALLINT PRIMARY KEY,
    changes BIGINT   NOT NULL DEFAULT 0
);
INSERT INTO leaderboard_pending (shard) SELECT generate_series(0, 63);

-- This backend's shard; the shard count (64) lives here and above only.
CREATE FUNCTION leaderboard_shard() RETURNS SMALLINT
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (pg_backend_pid() % 64)::SMALLINT;

-- One row: when the view was last refreshed, and how many changes refreshes
-- have consumed in all (pending + consumed = every non-zero event ever counted).
CREATE TABLE leaderboard_state (
    singleton        BOOLEAN     PRIMARY KEY DEFAULT true CONSTRAINT leaderboard_state_singleton CHECK (singleton),
    refreshed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    consumed_changes BIGINT      NOT NULL DEFAULT 0
);
INSERT INTO leaderboard_state DEFAULT VALUES;
