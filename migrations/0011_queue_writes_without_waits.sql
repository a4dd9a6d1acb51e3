-- Queue writes that never wait for each other (SPEC §14: "the bookkeeping
-- never adds a deadlock ... conflicts at REPEATABLE READ/SERIALIZABLE surface
-- as 40001, never 23505").
--
-- Until now an INSERT locked its scope's row in queue_scopes (to read MAX + 1
-- of the scope as its key) and every INSERT and DELETE updated its block's
-- row in queue_blocks, both held to the end of the writer's transaction. Two
-- transactions touching two scopes (or two blocks) in opposite orders
-- deadlocked (40P01), and a REPEATABLE READ add that read MAX + 1 from an old
-- snapshot collided on the unique key (23505). Whatever order the locks are
-- taken in, a lock held to commit by one statement and wanted by a later
-- statement of another transaction can close a cycle: the only order-proof
-- bookkeeping is one that takes no lock another writer waits for. So:
--  * a new item's key is the next value of one sequence (sequences are not
--    transactional: no lock, no wait, never a duplicate). Keys still only
--    grow, so an item added after another is behind it in every scope;
--  * an INSERT or DELETE appends a row to queue_changes (an INSERT of a row
--    no one else can see or lock: never a wait) instead of updating a
--    counter. Positions and lengths add the committed changes not yet folded
--    to the counters: always exact, whoever folds and whenever;
--  * the counters (queue_blocks, queue_superblocks, each scope's pace in
--    queue_scopes) are written only by the fold, which moves committed
--    changes into them under a per-scope transaction advisory lock taken
--    with pg_try_advisory_xact_lock: a fold that cannot have a scope at once
--    leaves it for the next fold. Nothing that holds a fold lock ever waits
--    for one, so no cycle can form. The daemon folds every queue on its
--    backlog check (10 s), and one write in 32 at READ COMMITTED folds its
--    own scope (so a forum without the daemon keeps the unfolded rows few);
--  * with keys from a sequence shared by every scope, one scope's keys are
--    spread among the others'. Blocks of 128 keys (512 before) and
--    superblocks of 4,096 keys (32 blocks) count them: a position is the
--    superblocks before the item's, the blocks of its superblock before its
--    block, the unfolded changes before its block, and the items of its
--    block up to it: at most n / 4,096 + 31 rows and 128 index entries for
--    a scope of n items packed together (at 100,000: 25 + 31 rows, where it
--    was 196 rows and 512 entries), and for a scope spread among others at
--    most its span of keys / 4,096 + 31 rows. Drained blocks and
--    superblocks are deleted by the fold, so what a position reads is
--    bounded by the items waiting, not by history.
--
-- The price, stated: an item's transaction that commits after a later add's
-- has the earlier key, so the later item's position grows by one when it
-- commits (positions stay exact, dense and 1-based at every moment; the
-- order is the order of the INSERTs, not of the commits). Before, the later
-- add waited for the earlier one's commit instead.

-- ---------------------------------------------------------------- keys

CREATE SEQUENCE IF NOT EXISTS queue_item_keys AS BIGINT;

-- Blocks of 128 keys, and superblocks of 32 blocks: the sizes live here,
-- and in the `>> 5` by which queue_position and queue_recount go from a
-- block to its superblock.
CREATE OR REPLACE FUNCTION queue_block(key BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN key >> 7;
CREATE OR REPLACE FUNCTION queue_block_first_key(block BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN block << 7;
CREATE FUNCTION queue_superblock(key BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN queue_block(key) >> 5;

-- BEFORE INSERT, and BEFORE UPDATE of the scope column (a move to another
-- scope puts the item at that scope's tail), each row: the next key. A key
-- the writer gives is replaced (the tail is what the seed's MAX + 1 meant);
-- a move that gives a key keeps it (an operator's fix).
CREATE OR REPLACE FUNCTION queue_item_keyed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.position_in_queue IS DISTINCT FROM OLD.position_in_queue THEN
        RETURN NEW;
    END IF;
    NEW.position_in_queue := nextval('queue_item_keys');
    RETURN NEW;
END $$;

-- ---------------------------------------------------------------- changes

-- What INSERTs, DELETEs and key or scope UPDATEs did and no fold has moved
-- to the counters yet. `kind`: 1 added, -1 removed (counts toward the
-- scope's pace, at `at`), 2 moved in, -2 moved out, 3 moved in by
-- loyaltyd's reorder. Adds and moves in by others mark the scope for the
-- next reorder. `n` items: a row trigger writes one item's change; a
-- statement that moves many (a reorder) writes one row per block, at the
-- block's first key (what a position compares is the block). No primary
-- key: rows are only ever inserted by writers and deleted by the fold.
CREATE TABLE queue_changes (
    queue TEXT        NOT NULL,
    scope TEXT        NOT NULL,
    key   BIGINT      NOT NULL,
    kind  SMALLINT    NOT NULL CONSTRAINT queue_changes_kind_check CHECK (kind IN (1, -1, 2, -2, 3)),
    n     INTEGER     NOT NULL DEFAULT 1 CONSTRAINT queue_changes_n_check CHECK (n > 0),
    at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX queue_changes_scope_key ON queue_changes (queue, scope, key);
-- Without a key, the fold's DELETEs still replicate where a forum publishes
-- every table (a publication FOR ALL TABLES refuses DELETEs on a table
-- with no replica identity).
ALTER TABLE queue_changes REPLICA IDENTITY FULL;

CREATE TABLE queue_superblocks (
    queue      TEXT   NOT NULL,
    scope      TEXT   NOT NULL,
    superblock BIGINT NOT NULL,
    item_count BIGINT NOT NULL CONSTRAINT queue_superblocks_item_count_check CHECK (item_count >= 0),
    PRIMARY KEY (queue, scope, superblock)
);
ALTER TABLE queue_superblocks SET (fillfactor = 50);

-- Each scope's pace (migration 9's decayed removal count), kept per scope
-- now: the fold is its only writer, so it needs no row of the write path.
ALTER TABLE queue_scopes ADD COLUMN removed_decayed FLOAT8 NOT NULL DEFAULT 0;
ALTER TABLE queue_scopes ADD COLUMN removed_at TIMESTAMPTZ;
ALTER TABLE queue_scopes ADD COLUMN pace_since TIMESTAMPTZ;

-- The blocks' paces, decayed to now, summed per scope.
INSERT INTO queue_scopes AS s (queue, scope, needs_reorder, removed_decayed, removed_at, pace_since)
SELECT b.queue, b.scope, false,
       COALESCE(sum(b.removed_decayed * exp(-GREATEST(date_part('epoch', now() - b.removed_at), 0)
                                          / queue_pace_window())) FILTER (WHERE b.removed_at IS NOT NULL), 0),
       CASE WHEN bool_or(b.removed_at IS NOT NULL) THEN now() END,
       min(b.pace_since)
FROM queue_blocks b GROUP BY b.queue, b.scope
ON CONFLICT (queue, scope) DO UPDATE
SET removed_decayed = EXCLUDED.removed_decayed, removed_at = EXCLUDED.removed_at, pace_since = EXCLUDED.pace_since;

ALTER TABLE queue_blocks DROP COLUMN removed_decayed, DROP COLUMN removed_at, DROP COLUMN pace_since;

-- A queue's counters counted again from its items (the truth), its changes
-- dropped (the count has them), and the key sequence above its keys: what
-- this migration does at the new block sizes, and what `loyaltyd adopt`
-- does after moving the original's data. The queue's table is locked
-- against writers meanwhile (readers go on): a write between the
-- statements would be counted twice or not at all.
CREATE FUNCTION queue_recount(p_queue TEXT) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    tbl CONSTANT REGCLASS := CASE p_queue WHEN 'topic' THEN 'topic_creation_queue'::REGCLASS
                                          WHEN 'post' THEN 'post_moderation_queue'::REGCLASS
                                          ELSE 'private_message_queue'::REGCLASS END;
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
    DELETE FROM queue_changes WHERE queue = p_queue;
    DELETE FROM queue_blocks WHERE queue = p_queue;
    DELETE FROM queue_superblocks WHERE queue = p_queue;
    IF p_queue = 'topic' THEN
        INSERT INTO queue_blocks (queue, scope, block, item_count)
        SELECT p_queue, '', queue_block(position_in_queue), count(*) FROM topic_creation_queue GROUP BY 3;
    ELSIF p_queue = 'post' THEN
        INSERT INTO queue_blocks (queue, scope, block, item_count)
        SELECT p_queue, topic_id, queue_block(position_in_queue), count(*) FROM post_moderation_queue GROUP BY 2, 3;
    ELSE
        INSERT INTO queue_blocks (queue, scope, block, item_count)
        SELECT p_queue, conversation_id, queue_block(position_in_queue), count(*) FROM private_message_queue GROUP BY 2, 3;
    END IF;
    INSERT INTO queue_superblocks (queue, scope, superblock, item_count)
    SELECT p_queue, scope, block >> 5, sum(item_count) FROM queue_blocks WHERE queue = p_queue GROUP BY 2, 3;
    INSERT INTO queue_scopes (queue, scope, needs_reorder)
    SELECT DISTINCT p_queue, scope, true FROM queue_blocks WHERE queue = p_queue
    ON CONFLICT (queue, scope) DO NOTHING;
    -- Keys above the highest block counted (the block's last key).
    PERFORM setval('queue_item_keys',
                   GREATEST((SELECT COALESCE(max(block), 0) + 1 FROM queue_blocks WHERE queue = p_queue) << 7,
                            nextval('queue_item_keys')), false);
END $$;

SELECT queue_recount('topic'), queue_recount('post'), queue_recount('message');

-- AFTER INSERT or DELETE, each row: one change row. One write in 32 at READ
-- COMMITTED then folds its scope (at most once per statement). (Not at REPEATABLE READ or SERIALIZABLE:
-- there a fold could meet rows a concurrent fold deleted after the
-- snapshot, and the forum's transaction would fail for loyaltyd's sake.)
CREATE OR REPLACE FUNCTION queue_item_counted() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    q CONSTANT TEXT := TG_ARGV[0];
    s TEXT := '';
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF q = 'post' THEN
            s := NEW.topic_id;
        ELSIF q = 'message' THEN
            s := NEW.conversation_id;
        END IF;
        INSERT INTO queue_changes (queue, scope, key, kind) VALUES (q, s, NEW.position_in_queue, 1);
    ELSE
        IF q = 'post' THEN
            s := OLD.topic_id;
        ELSIF q = 'message' THEN
            s := OLD.conversation_id;
        END IF;
        INSERT INTO queue_changes (queue, scope, key, kind) VALUES (q, s, OLD.position_in_queue, -1);
    END IF;
    IF random() < 0.03125 AND current_setting('transaction_isolation') = 'read committed'
       AND current_setting('loyaltyd.folded', true) IS DISTINCT FROM statement_timestamp()::TEXT THEN
        -- Once per statement at most: a bulk INSERT folds once, not one row
        -- in 32 times over (thousands of versions of the same counter rows
        -- in one transaction); a transaction of many single-row statements
        -- still folds as it goes, so its own reads do not sum a growing
        -- tail of its changes.
        PERFORM set_config('loyaltyd.folded', statement_timestamp()::TEXT, true);
        PERFORM queue_fold(q, s);
    END IF;
    RETURN NULL;
END $$;

-- AFTER UPDATE, each statement: items whose key or scope changed move out
-- of where they were and into where they are (a priority change writes
-- nothing). Compared as multisets of (scope, key): a row that kept both is
-- in both and cancels out.
CREATE OR REPLACE FUNCTION queue_items_moved() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    q CONSTANT TEXT := TG_ARGV[0];
    moved_in CONSTANT SMALLINT := CASE WHEN current_setting('loyaltyd.rekey', true) = 'on' THEN 3 ELSE 2 END;
BEGIN
    IF q = 'topic' THEN
        INSERT INTO queue_changes (queue, scope, key, kind, n)
        SELECT q, '', queue_block_first_key(queue_block(m.k)), -2, count(*)
        FROM (SELECT position_in_queue AS k FROM old_items EXCEPT ALL SELECT position_in_queue FROM new_items) m
        GROUP BY queue_block(m.k)
        UNION ALL
        SELECT q, '', queue_block_first_key(queue_block(m.k)), moved_in, count(*)
        FROM (SELECT position_in_queue AS k FROM new_items EXCEPT ALL SELECT position_in_queue FROM old_items) m
        GROUP BY queue_block(m.k);
    ELSIF q = 'post' THEN
        INSERT INTO queue_changes (queue, scope, key, kind, n)
        SELECT q, m.s, queue_block_first_key(queue_block(m.k)), -2, count(*)
        FROM (SELECT topic_id::TEXT AS s, position_in_queue AS k FROM old_items
              EXCEPT ALL SELECT topic_id::TEXT, position_in_queue FROM new_items) m
        GROUP BY m.s, queue_block(m.k)
        UNION ALL
        SELECT q, m.s, queue_block_first_key(queue_block(m.k)), moved_in, count(*)
        FROM (SELECT topic_id::TEXT AS s, position_in_queue AS k FROM new_items
              EXCEPT ALL SELECT topic_id::TEXT, position_in_queue FROM old_items) m
        GROUP BY m.s, queue_block(m.k);
    ELSE
        INSERT INTO queue_changes (queue, scope, key, kind, n)
        SELECT q, m.s, queue_block_first_key(queue_block(m.k)), -2, count(*)
        FROM (SELECT conversation_id::TEXT AS s, position_in_queue AS k FROM old_items
              EXCEPT ALL SELECT conversation_id::TEXT, position_in_queue FROM new_items) m
        GROUP BY m.s, queue_block(m.k)
        UNION ALL
        SELECT q, m.s, queue_block_first_key(queue_block(m.k)), moved_in, count(*)
        FROM (SELECT conversation_id::TEXT AS s, position_in_queue AS k FROM new_items
              EXCEPT ALL SELECT conversation_id::TEXT, position_in_queue FROM old_items) m
        GROUP BY m.s, queue_block(m.k);
    END IF;
    RETURN NULL;
END $$;

-- TRUNCATE clears the queue's bookkeeping with it.
CREATE OR REPLACE FUNCTION queue_truncated() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    DELETE FROM queue_changes WHERE queue = TG_ARGV[0];
    DELETE FROM queue_blocks WHERE queue = TG_ARGV[0];
    DELETE FROM queue_superblocks WHERE queue = TG_ARGV[0];
    DELETE FROM queue_scopes WHERE queue = TG_ARGV[0];
    RETURN NULL;
END $$;

-- ---------------------------------------------------------------- the fold

-- The fold lock of a scope: a transaction advisory lock in a key space of
-- its own (two int4 keys; loyaltyd's job locks are bigint keys).
CREATE FUNCTION queue_fold_lock(p_queue TEXT, p_scope TEXT) RETURNS BOOLEAN
    LANGUAGE sql VOLATILE
    RETURN pg_try_advisory_xact_lock(1280921926, hashtext(p_queue || '/' || p_scope));

-- Moves the committed changes of the queue's scopes (one scope, or up to
-- `max_scopes` of them) into the counters, each scope only if its fold
-- lock is free at once; answers how many changes it moved. Runs in the
-- caller's transaction: readers see the changes or the counters, never
-- both, never neither. (The caller's own uncommitted changes are folded
-- too: they land or roll back with it.)
CREATE FUNCTION queue_fold(p_queue TEXT, p_scope TEXT DEFAULT NULL, max_scopes INTEGER DEFAULT 1000)
    RETURNS BIGINT
    LANGUAGE plpgsql AS $$
DECLARE
    tau CONSTANT FLOAT8 := queue_pace_window();
    scopes TEXT[];
    t_scope TEXT[];
    t_key BIGINT[];
    t_kind SMALLINT[];
    t_n INTEGER[];
    t_at TIMESTAMPTZ[];
BEGIN
    IF p_scope IS NOT NULL THEN
        IF NOT queue_fold_lock(p_queue, p_scope) THEN
            RETURN 0;
        END IF;
        scopes := ARRAY[p_scope];
    ELSE
        SELECT array_agg(x.scope) INTO scopes
        FROM (SELECT DISTINCT c.scope FROM queue_changes c WHERE c.queue = p_queue LIMIT max_scopes) x
        WHERE queue_fold_lock(p_queue, x.scope);
        IF scopes IS NULL THEN
            RETURN 0;
        END IF;
    END IF;
    WITH taken AS (
        DELETE FROM queue_changes c WHERE c.queue = p_queue AND c.scope = ANY(scopes)
        RETURNING c.scope, c.key, c.kind, c.n, c.at
    )
    SELECT array_agg(taken.scope), array_agg(taken.key), array_agg(taken.kind), array_agg(taken.n), array_agg(taken.at)
    INTO t_scope, t_key, t_kind, t_n, t_at FROM taken;
    IF t_scope IS NULL THEN
        RETURN 0;
    END IF;
    -- Blocks: existing ones change (a loss only ever meets an existing row:
    -- a removed item was counted, or its add is in this fold too), new ones
    -- are inserted, drained ones deleted. The scope's counters have no other
    -- writer (the lock), so none of it waits. Then the same for superblocks.
    WITH net AS (
        SELECT t.scope, queue_block(t.key) AS block, sum(CASE WHEN t.kind > 0 THEN t.n ELSE -t.n END) AS n
        FROM unnest(t_scope, t_key, t_kind, t_n) AS t(scope, key, kind, n)
        GROUP BY 1, 2 HAVING sum(CASE WHEN t.kind > 0 THEN t.n ELSE -t.n END) <> 0
    ), changed AS (
        UPDATE queue_blocks b SET item_count = b.item_count + net.n
        FROM net WHERE b.queue = p_queue AND b.scope = net.scope AND b.block = net.block
        RETURNING b.scope, b.block
    )
    INSERT INTO queue_blocks (queue, scope, block, item_count)
    SELECT p_queue, net.scope, net.block, net.n FROM net
    WHERE NOT EXISTS (SELECT 1 FROM changed c WHERE c.scope = net.scope AND c.block = net.block);
    DELETE FROM queue_blocks b WHERE b.queue = p_queue AND b.scope = ANY(scopes) AND b.item_count = 0;
    WITH net AS (
        SELECT t.scope, queue_superblock(t.key) AS superblock, sum(CASE WHEN t.kind > 0 THEN t.n ELSE -t.n END) AS n
        FROM unnest(t_scope, t_key, t_kind, t_n) AS t(scope, key, kind, n)
        GROUP BY 1, 2 HAVING sum(CASE WHEN t.kind > 0 THEN t.n ELSE -t.n END) <> 0
    ), changed AS (
        UPDATE queue_superblocks b SET item_count = b.item_count + net.n
        FROM net WHERE b.queue = p_queue AND b.scope = net.scope AND b.superblock = net.superblock
        RETURNING b.scope, b.superblock
    )
    INSERT INTO queue_superblocks (queue, scope, superblock, item_count)
    SELECT p_queue, net.scope, net.superblock, net.n FROM net
    WHERE NOT EXISTS (SELECT 1 FROM changed c WHERE c.scope = net.scope AND c.superblock = net.superblock);
    DELETE FROM queue_superblocks b WHERE b.queue = p_queue AND b.scope = ANY(scopes) AND b.item_count = 0;
    -- Each scope: its removals added to its decayed count (decayed to the
    -- latest removal's time: removals' times arrive in any order), and a
    -- reorder flag when something was added or moved in by others.
    INSERT INTO queue_scopes AS s (queue, scope, needs_reorder, removed_decayed, removed_at, pace_since)
    SELECT p_queue, t.scope, bool_or(t.kind IN (1, 2)),
           COALESCE(sum(exp(-GREATEST(date_part('epoch', t.last - t.at), 0) / tau)) FILTER (WHERE t.kind = -1), 0),
           max(t.last), min(t.at) FILTER (WHERE t.kind = -1)
    FROM (SELECT x.*, max(x.at) FILTER (WHERE x.kind = -1) OVER (PARTITION BY x.scope) AS last
          FROM unnest(t_scope, t_kind, t_at) AS x(scope, kind, at)) t
    GROUP BY t.scope
    ON CONFLICT (queue, scope) DO UPDATE
    SET needs_reorder = s.needs_reorder OR EXCLUDED.needs_reorder,
        removed_decayed = CASE
            WHEN EXCLUDED.removed_at IS NULL THEN s.removed_decayed
            WHEN s.removed_at IS NULL THEN EXCLUDED.removed_decayed
            ELSE s.removed_decayed * exp(-GREATEST(date_part('epoch', EXCLUDED.removed_at - s.removed_at), 0) / tau)
               + EXCLUDED.removed_decayed * exp(-GREATEST(date_part('epoch', s.removed_at - EXCLUDED.removed_at), 0) / tau)
            END,
        removed_at = GREATEST(s.removed_at, EXCLUDED.removed_at),
        pace_since = LEAST(s.pace_since, EXCLUDED.pace_since);
    RETURN (SELECT sum(x) FROM unnest(t_n) AS x);
END $$;

-- ---------------------------------------------------------------- reading

-- Migration 9's pace, from the scopes' counts.
CREATE OR REPLACE FUNCTION queue_pace(p_queue TEXT, p_scope TEXT,
                                      OUT per_item_seconds FLOAT8, OUT window_seconds FLOAT8,
                                      OUT items_seen FLOAT8, OUT source TEXT)
    LANGUAGE plpgsql STABLE AS $$
DECLARE
    tau CONSTANT FLOAT8 := queue_pace_window();
    since TIMESTAMPTZ;
    scopes BIGINT;
BEGIN
    -- The scope's removals decayed to now: the folded count, and the
    -- changes not folded yet.
    SELECT sc.removed_decayed * exp(-GREATEST(date_part('epoch', now() - sc.removed_at), 0) / tau), sc.pace_since
    INTO items_seen, since
    FROM queue_scopes sc WHERE sc.queue = p_queue AND sc.scope = p_scope AND sc.removed_at IS NOT NULL;
    SELECT COALESCE(items_seen, 0) + COALESCE(sum(exp(-GREATEST(date_part('epoch', now() - x.at), 0) / tau)), 0),
           LEAST(since, min(x.at))
    INTO items_seen, since
    FROM queue_changes x WHERE x.queue = p_queue AND x.scope = p_scope AND x.kind = -1;
    IF items_seen >= queue_pace_min_items() THEN
        window_seconds := tau * (1 - exp(-GREATEST(date_part('epoch', now() - since), 0) / tau));
        per_item_seconds := window_seconds / items_seen;
        source := 'scope';
        RETURN;
    END IF;
    items_seen := NULL;
    IF p_queue <> 'topic' THEN
        -- The queue's typical pace: its removals per active scope.
        SELECT sum(d), count(*) FILTER (WHERE d >= 1), min(first)
        INTO items_seen, scopes, since
        FROM (SELECT u.scope, sum(u.d) AS d, min(u.first) AS first
              FROM (SELECT sc.scope,
                           sc.removed_decayed * exp(-GREATEST(date_part('epoch', now() - sc.removed_at), 0) / tau) AS d,
                           sc.pace_since AS first
                    FROM queue_scopes sc WHERE sc.queue = p_queue AND sc.removed_at IS NOT NULL
                    UNION ALL
                    SELECT x.scope, exp(-GREATEST(date_part('epoch', now() - x.at), 0) / tau), x.at
                    FROM queue_changes x WHERE x.queue = p_queue AND x.kind = -1) u
              GROUP BY u.scope) per_scope;
        IF items_seen >= queue_pace_min_items() AND scopes > 0 THEN
            window_seconds := tau * (1 - exp(-GREATEST(date_part('epoch', now() - since), 0) / tau));
            per_item_seconds := window_seconds * scopes / items_seen;
            source := 'queue';
            RETURN;
        END IF;
    END IF;
    per_item_seconds := NULL;
    window_seconds := NULL;
    items_seen := NULL;
    source := NULL;
END $$;

-- An item's exact, dense, 1-based position and expected wait (migration
-- 9's answer) in two statements: the item's row with the count of its block
-- up to it; then the superblocks before its superblock, its superblock's
-- blocks before its block, the changes not yet folded before its block
-- (index range reads, bounded by the items waiting), and its scope's
-- removals (queue_pace's scope branch). queue_pace itself only when the
-- scope has too little history. (Each statement and each nested call costs
-- a fixed few microseconds, the read mostly those; and no SQL-language
-- helpers here: one that is not inlined is planned again on every call.)
CREATE OR REPLACE FUNCTION queue_position(p_queue TEXT, p_content_id TEXT)
    RETURNS TABLE (scope TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ,
                   expected_wait_seconds FLOAT8, wait_source TEXT, wait_window_seconds FLOAT8,
                   wait_items_seen FLOAT8)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
#variable_conflict use_variable
DECLARE
    tau CONSTANT FLOAT8 := queue_pace_window();
    k BIGINT;
    inside BIGINT;
    blk BIGINT;
    before BIGINT;
    seen FLOAT8;
    since TIMESTAMPTZ;
    pace RECORD;
BEGIN
    IF p_queue = 'topic' THEN
        SELECT '', i.position_in_queue, i.priority_score, i.entered_queue_at,
               (SELECT count(*) FROM topic_creation_queue j
                WHERE j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                  AND j.position_in_queue <= i.position_in_queue)
        INTO scope, k, priority_score, entered_queue_at, inside
        FROM topic_creation_queue i WHERE i.topic_id = p_content_id;
    ELSIF p_queue = 'post' THEN
        SELECT i.topic_id, i.position_in_queue, i.priority_score, i.entered_queue_at,
               (SELECT count(*) FROM post_moderation_queue j
                WHERE j.topic_id = i.topic_id
                  AND j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                  AND j.position_in_queue <= i.position_in_queue)
        INTO scope, k, priority_score, entered_queue_at, inside
        FROM post_moderation_queue i WHERE i.post_id = p_content_id;
    ELSIF p_queue = 'message' THEN
        SELECT i.conversation_id, i.position_in_queue, i.priority_score, i.entered_queue_at,
               (SELECT count(*) FROM private_message_queue j
                WHERE j.conversation_id = i.conversation_id
                  AND j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                  AND j.position_in_queue <= i.position_in_queue)
        INTO scope, k, priority_score, entered_queue_at, inside
        FROM private_message_queue i WHERE i.message_id = p_content_id;
    ELSE
        PERFORM loyaltyd_check_queue(p_queue);
    END IF;
    IF k IS NULL THEN
        RETURN;
    END IF;
    blk := queue_block(k);
    SELECT COALESCE((SELECT sum(x.item_count) FROM queue_superblocks x
                     WHERE x.queue = p_queue AND x.scope = scope AND x.superblock < blk >> 5), 0)
         + COALESCE((SELECT sum(b.item_count) FROM queue_blocks b
                     WHERE b.queue = p_queue AND b.scope = scope AND b.block >= (blk >> 5) << 5 AND b.block < blk), 0)
         + COALESCE((SELECT sum(CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END) FROM queue_changes c
                     WHERE c.queue = p_queue AND c.scope = scope AND c.key < queue_block_first_key(blk)), 0),
           COALESCE((SELECT sc.removed_decayed * exp(-GREATEST(date_part('epoch', now() - sc.removed_at), 0) / tau)
                     FROM queue_scopes sc
                     WHERE sc.queue = p_queue AND sc.scope = scope AND sc.removed_at IS NOT NULL), 0)
         + COALESCE((SELECT sum(exp(-GREATEST(date_part('epoch', now() - x.at), 0) / tau)) FROM queue_changes x
                     WHERE x.queue = p_queue AND x.scope = scope AND x.kind = -1), 0),
           LEAST((SELECT sc.pace_since FROM queue_scopes sc WHERE sc.queue = p_queue AND sc.scope = scope),
                 (SELECT min(x.at) FROM queue_changes x WHERE x.queue = p_queue AND x.scope = scope AND x.kind = -1))
    INTO before, seen, since;
    "position" := before + inside;
    IF seen >= queue_pace_min_items() THEN
        wait_window_seconds := tau * (1 - exp(-GREATEST(date_part('epoch', now() - since), 0) / tau));
        wait_items_seen := seen;
        wait_source := 'scope';
        expected_wait_seconds := "position" * wait_window_seconds / seen;
    ELSE
        SELECT * INTO pace FROM queue_pace(p_queue, scope);
        expected_wait_seconds := "position" * pace.per_item_seconds;
        wait_source := pace.source;
        wait_window_seconds := pace.window_seconds;
        wait_items_seen := pace.items_seen;
    END IF;
    RETURN NEXT;
END $$;

-- Appends an item at the tail of its scope and answers with its position
-- (migration 8's checks).
CREATE OR REPLACE FUNCTION queue_add(p_queue TEXT, p_content_id TEXT, p_scope TEXT, p_priority FLOAT8 DEFAULT 0,
                                     OUT "position" BIGINT, OUT entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
DECLARE
    k BIGINT;
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    IF p_content_id IS NULL THEN
        RAISE EXCEPTION 'queue_add: content id is NULL' USING ERRCODE = '22023', HINT = 'give the item''s id';
    END IF;
    IF p_queue <> 'topic' AND p_scope IS NULL THEN
        RAISE EXCEPTION 'queue_add: the % queue needs a scope (its %), not NULL', p_queue,
                CASE p_queue WHEN 'post' THEN 'topic id' ELSE 'conversation id' END
            USING ERRCODE = '22023';
    END IF;
    IF p_priority IS NULL OR p_priority IN ('NaN', 'Infinity', '-Infinity') THEN
        RAISE EXCEPTION 'queue_add: priority must be a finite number, not %', COALESCE(p_priority::TEXT, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF p_queue = 'topic' THEN
        INSERT INTO topic_creation_queue AS i (topic_id, priority_score) VALUES (p_content_id, p_priority)
        RETURNING i.position_in_queue, i.entered_queue_at INTO k, entered_queue_at;
    ELSIF p_queue = 'post' THEN
        INSERT INTO post_moderation_queue AS i (post_id, topic_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.position_in_queue, i.entered_queue_at INTO k, entered_queue_at;
    ELSE
        INSERT INTO private_message_queue AS i (message_id, conversation_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.position_in_queue, i.entered_queue_at INTO k, entered_queue_at;
    END IF;
    -- At the tail: the scope's length (its superblocks and unfolded
    -- changes) less the items behind it (none, unless a later add committed
    -- first), in one statement: where a position in the middle also reads
    -- blocks and the item's block.
    IF p_queue = 'topic' THEN
        SELECT COALESCE((SELECT sum(x.item_count) FROM queue_superblocks x WHERE x.queue = 'topic' AND x.scope = ''), 0)
             + COALESCE((SELECT sum(CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END) FROM queue_changes c
                         WHERE c.queue = 'topic' AND c.scope = ''), 0)
             - (SELECT count(*) FROM topic_creation_queue j WHERE j.position_in_queue > k)
        INTO "position";
    ELSIF p_queue = 'post' THEN
        SELECT COALESCE((SELECT sum(x.item_count) FROM queue_superblocks x WHERE x.queue = 'post' AND x.scope = p_scope), 0)
             + COALESCE((SELECT sum(CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END) FROM queue_changes c
                         WHERE c.queue = 'post' AND c.scope = p_scope), 0)
             - (SELECT count(*) FROM post_moderation_queue j WHERE j.topic_id = p_scope AND j.position_in_queue > k)
        INTO "position";
    ELSE
        SELECT COALESCE((SELECT sum(x.item_count) FROM queue_superblocks x WHERE x.queue = 'message' AND x.scope = p_scope), 0)
             + COALESCE((SELECT sum(CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END) FROM queue_changes c
                         WHERE c.queue = 'message' AND c.scope = p_scope), 0)
             - (SELECT count(*) FROM private_message_queue j WHERE j.conversation_id = p_scope AND j.position_in_queue > k)
        INTO "position";
    END IF;
END $$;

-- A scope's length: its superblocks and its changes not yet folded.
CREATE OR REPLACE FUNCTION queue_length(p_queue TEXT, p_scope TEXT) RETURNS BIGINT
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    IF p_scope IS NULL THEN
        RAISE EXCEPTION 'queue_length: scope is NULL' USING ERRCODE = '22023',
            HINT = 'the topic or conversation id; '''' for the topic queue';
    END IF;
    RETURN COALESCE((SELECT sum(x.item_count) FROM queue_superblocks x
                     WHERE x.queue = p_queue AND x.scope = p_scope), 0)::BIGINT
         + COALESCE((SELECT sum(CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END) FROM queue_changes c
                     WHERE c.queue = p_queue AND c.scope = p_scope), 0)::BIGINT;
END $$;

-- Every queue's items per scope, for the daemon's backlog metrics.
CREATE FUNCTION queue_scope_lengths() RETURNS TABLE (queue TEXT, scope TEXT, items BIGINT)
    LANGUAGE sql STABLE AS $$
        SELECT u.queue, u.scope, sum(u.n)::BIGINT
        FROM (SELECT x.queue, x.scope, x.item_count AS n FROM queue_superblocks x
              UNION ALL
              SELECT c.queue, c.scope, CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END FROM queue_changes c) u
        GROUP BY u.queue, u.scope
    $$;

REVOKE EXECUTE ON FUNCTION
    queue_fold(TEXT, TEXT, INTEGER), queue_fold_lock(TEXT, TEXT),
    queue_scope_lengths(), queue_recount(TEXT)
    FROM PUBLIC;

-- The pinned search_path of migration 5 on what this migration adds or
-- re-creates (CREATE OR REPLACE resets it).
DO $$
DECLARE
    f REGPROCEDURE;
BEGIN
    FOR f IN
        SELECT p.oid::REGPROCEDURE FROM pg_proc p
        WHERE p.pronamespace = current_schema()::REGNAMESPACE
          AND p.proname IN ('queue_item_keyed', 'queue_item_counted', 'queue_items_moved', 'queue_truncated',
                            'queue_fold', 'queue_position', 'queue_add', 'queue_length', 'queue_pace')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;

-- Migration 2's shard of the pending count (unused since migration 8's
-- per-backend rows) reads pg_backend_pid(): not PARALLEL SAFE.
ALTER FUNCTION leaderboard_shard() PARALLEL RESTRICTED;
