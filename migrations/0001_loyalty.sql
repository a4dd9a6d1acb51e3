-- Users and their moderation events: the ledger every loyalty score is derived from.

CREATE TABLE users (
    id            BIGINT      PRIMARY KEY CONSTRAINT users_id_positive CHECK (id > 0),
    username      TEXT        NOT NULL,
    loyalty_score BIGINT      NOT NULL DEFAULT 0,
    -- Advanced by every change of loyalty_score, under the row lock, so it
    -- orders writes to one user exactly as PostgreSQL committed them. The Redis
    -- cache stores it beside the score and never lets an older version
    -- overwrite a newer one (see src/cache.rs). See next_score_version().
    score_version BIGINT      NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE moderation_events (
    id           BIGSERIAL   PRIMARY KEY,
    user_id      BIGINT      NOT NULL CONSTRAINT moderation_events_user_id_fkey REFERENCES users (id),
    event_type   TEXT        NOT NULL CONSTRAINT moderation_events_event_type_check
                                 CHECK (octet_length(event_type) BETWEEN 1 AND 255),
    content_type TEXT        NOT NULL CONSTRAINT moderation_events_content_type_check
                                 CHECK (content_type IN ('post', 'topic', 'private_message')),
    content_id   TEXT        NOT NULL CONSTRAINT moderation_events_content_id_check
                                 CHECK (octet_length(content_id) BETWEEN 1 AND 255),
    outcome      TEXT        NOT NULL CONSTRAINT moderation_events_outcome_check
                                 CHECK (outcome IN ('approved', 'rejected', 'calibrated')),
    -- The scoring rule of SPEC §4, in the one place both the write path and the
    -- integrity sweep read it from: multiplier (topic 5, otherwise 1) times
    -- sign (approved +1, rejected -1, calibrated 0).
    score_delta  INTEGER     NOT NULL GENERATED ALWAYS AS (
                     (CASE outcome WHEN 'approved' THEN 1 WHEN 'rejected' THEN -1 ELSE 0 END)
                   * (CASE content_type WHEN 'topic' THEN 5 ELSE 1 END)
                 ) STORED,
    -- Optional idempotency key: a retried event with the same key counts once.
    event_id     TEXT        CONSTRAINT moderation_events_event_id_check
                                 CHECK (octet_length(event_id) BETWEEN 1 AND 255),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Partial: most events carry no key, and they should cost no index entry.
CREATE UNIQUE INDEX moderation_events_event_id_key ON moderation_events (event_id)
    WHERE event_id IS NOT NULL;

-- The seed's strategic indexes (loyalty, events, user lookups).
CREATE INDEX idx_users_loyalty_score_desc ON users (loyalty_score DESC) WHERE loyalty_score > 0;
CREATE INDEX idx_users_loyalty_username ON users (loyalty_score DESC, username) WHERE loyalty_score > 0;
-- The seed's index, carrying score_delta as a payload (INCLUDE): the
-- integrity sweep sums a range of users' deltas from this index alone
-- (index-only scan, no heap visits), and no extra index has to be kept up to
-- date on every event insert.
CREATE INDEX idx_moderation_events_user_time ON moderation_events (user_id, created_at DESC) INCLUDE (score_delta);
CREATE INDEX idx_moderation_events_content ON moderation_events (content_type, content_id);
CREATE INDEX idx_moderation_events_outcome ON moderation_events (outcome, content_type);
CREATE INDEX idx_users_username ON users (username) WHERE loyalty_score > 0;
CREATE INDEX idx_users_created_at ON users (created_at);

-- The next version of a user's score: one more than the last, and at least
-- the current time in microseconds. Per user it only grows; and after a
-- restore from a backup (which winds versions back) the next write still
-- outranks any version the cache kept from before the restore.
CREATE FUNCTION next_score_version(previous BIGINT) RETURNS BIGINT
    LANGUAGE sql VOLATILE PARALLEL SAFE
    RETURN GREATEST(previous + 1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT);
