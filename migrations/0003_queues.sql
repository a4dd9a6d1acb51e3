-- The three moderation queues.
--
-- `position_in_queue` is each item's ORDERING KEY within its scope, not its dense
-- position: keys only grow, so an add never moves anyone and a remove leaves a
-- gap instead of rewriting every later row (the seed's O(n) remove). The dense,
-- 1-based position a caller reads is the item's rank among the keys of its
-- scope, computed in O(blocks + block size) from the counted blocks below (see
-- src/queues.rs). The *_positions views serve SQL consumers dense positions.

CREATE TABLE topic_creation_queue (
    topic_id          TEXT        PRIMARY KEY CONSTRAINT topic_creation_queue_topic_id_check
                                      CHECK (octet_length(topic_id) BETWEEN 1 AND 255),
    position_in_queue BIGINT      NOT NULL,
    priority_score    FLOAT8      NOT NULL DEFAULT 0 CONSTRAINT topic_creation_queue_priority_finite
                                      CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity')),
    entered_queue_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE post_moderation_queue (
    post_id           TEXT        PRIMARY KEY CONSTRAINT post_moderation_queue_post_id_check
                                      CHECK (octet_length(post_id) BETWEEN 1 AND 255),
    topic_id          TEXT        NOT NULL CONSTRAINT post_moderation_queue_topic_id_check
                                      CHECK (octet_length(topic_id) BETWEEN 1 AND 255),
    position_in_queue BIGINT      NOT NULL,
    priority_score    FLOAT8      NOT NULL DEFAULT 0 CONSTRAINT post_moderation_queue_priority_finite
                                      CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity')),
    entered_queue_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE private_message_queue (
    message_id        TEXT        PRIMARY KEY CONSTRAINT private_message_queue_message_id_check
                                      CHECK (octet_length(message_id) BETWEEN 1 AND 255),
    conversation_id   TEXT        NOT NULL CONSTRAINT private_message_queue_conversation_id_check
                                      CHECK (octet_length(conversation_id) BETWEEN 1 AND 255),
    position_in_queue BIGINT      NOT NULL,
    priority_score    FLOAT8      NOT NULL DEFAULT 0 CONSTRAINT private_message_queue_priority_finite
                                      CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity')),
    entered_queue_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The seed's queue indexes. The position ones are UNIQUE here: keys are unique
-- within a scope, and the database guards that.
CREATE UNIQUE INDEX idx_topic_queue_position ON topic_creation_queue (position_in_queue);
CREATE INDEX idx_topic_queue_priority ON topic_creation_queue (priority_score DESC, entered_queue_at ASC);
CREATE UNIQUE INDEX idx_post_queue_topic_position ON post_moderation_queue (topic_id, position_in_queue);
CREATE INDEX idx_post_queue_topic_priority ON post_moderation_queue (topic_id, priority_score DESC, entered_queue_at ASC);
CREATE UNIQUE INDEX idx_message_queue_conv_position ON private_message_queue (conversation_id, position_in_queue);
CREATE INDEX idx_message_queue_conv_priority ON private_message_queue (conversation_id, priority_score DESC, entered_queue_at ASC);

-- One row per queue scope ('' for the global topic queue, else the topic or
-- conversation id). Every add, remove and reorder of the scope locks this row
-- first, which serializes them per scope (so tail positions are exact and the
-- lock order is the same everywhere: no deadlocks); readers never take it.
CREATE TABLE queue_scopes (
    queue         TEXT    NOT NULL CONSTRAINT queue_scopes_queue_check CHECK (queue IN ('topic', 'post', 'message')),
    scope         TEXT    NOT NULL,
    last_key      BIGINT  NOT NULL,                  -- highest ordering key handed out
    item_count    BIGINT  NOT NULL CONSTRAINT queue_scopes_item_count_check CHECK (item_count >= 0),
    needs_reorder BOOLEAN NOT NULL DEFAULT false,    -- an add since the last reorder
    PRIMARY KEY (queue, scope)
);
CREATE INDEX queue_scopes_needs_reorder ON queue_scopes (queue) WHERE needs_reorder;

-- Counted blocks: how many items of a scope have keys in [block * 512, block * 512 + 511].
-- A position is the sum of the counts of the earlier blocks plus a count within
-- the item's own block: both bounded, whatever the queue length.
CREATE TABLE queue_blocks (
    queue      TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    block      BIGINT  NOT NULL,
    item_count INTEGER NOT NULL CONSTRAINT queue_blocks_item_count_check CHECK (item_count >= 0),
    PRIMARY KEY (queue, scope, block)
);

-- The block of an ordering key, and a block's first key: the block size (512)
-- lives here only.
CREATE FUNCTION queue_block(key BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN key >> 9;
CREATE FUNCTION queue_block_first_key(block BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN block << 9;

-- Dense 1-based positions for SQL consumers (O(n) per scan; the program reads
-- positions through the blocks instead).
CREATE VIEW topic_creation_queue_positions AS
SELECT topic_id,
       ROW_NUMBER() OVER (ORDER BY position_in_queue) AS position,
       priority_score, entered_queue_at
FROM topic_creation_queue;

CREATE VIEW post_moderation_queue_positions AS
SELECT post_id, topic_id,
       ROW_NUMBER() OVER (PARTITION BY topic_id ORDER BY position_in_queue) AS position,
       priority_score, entered_queue_at
FROM post_moderation_queue;

CREATE VIEW private_message_queue_positions AS
SELECT message_id, conversation_id,
       ROW_NUMBER() OVER (PARTITION BY conversation_id ORDER BY position_in_queue) AS position,
       priority_score, entered_queue_at
FROM private_message_queue;
