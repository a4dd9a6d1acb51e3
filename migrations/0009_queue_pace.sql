-- Wait estimates (SPEC §14): "you are #12 in line, usually reviewed within
-- 40 minutes". Each scope's pace is kept by the DELETE trigger on the block
-- row it updates anyway (so no new row is written or locked on the write
-- path, for every writer): an exponentially decayed count of removals
-- (time constant queue_pace_window(), one hour), when it was last decayed,
-- and since when the block has seen removals. A scope's removal rate is the
-- sum of its blocks' decayed counts over the decayed length of the time it
-- has been observed; an item's expected wait is its position times the time
-- per item at that rate. Measured (README): the remove costs the same; the
-- estimate adds one range read of the scope's blocks to a position read.
--
-- Why not a log of removals, or the daemon sampling counts: a log is a row
-- per remove (the write path's cost doubles) and a sample table needs the
-- daemon to be running for the SQL API to answer; the decayed count needs
-- neither, and is exact for whichever writer removes.

ALTER TABLE queue_blocks ADD COLUMN removed_decayed FLOAT8 NOT NULL DEFAULT 0;
ALTER TABLE queue_blocks ADD COLUMN removed_at TIMESTAMPTZ;
ALTER TABLE queue_blocks ADD COLUMN pace_since TIMESTAMPTZ;

-- The pace's time constant, in seconds, and the fewest (decayed) removals an
-- estimate is made from: below it the answer is "unknown", never a guess.
CREATE FUNCTION queue_pace_window() RETURNS FLOAT8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 3600;
CREATE FUNCTION queue_pace_min_items() RETURNS FLOAT8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 3;

-- Migration 5's per-row count, and on DELETE the block's decayed removal
-- count (in the same UPDATE).
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
        -- An UPDATE first: all but one add in 512 find their block.
        UPDATE queue_blocks SET item_count = item_count + 1
        WHERE queue = q AND scope = s AND block = queue_block(NEW.position_in_queue);
        IF NOT FOUND THEN
            INSERT INTO queue_blocks AS b (queue, scope, block, item_count)
            VALUES (q, s, queue_block(NEW.position_in_queue), 1)
            ON CONFLICT (queue, scope, block) DO UPDATE SET item_count = b.item_count + 1;
        END IF;
    ELSE
        IF q = 'post' THEN
            s := OLD.topic_id;
        ELSIF q = 'message' THEN
            s := OLD.conversation_id;
        END IF;
        UPDATE queue_blocks
        SET item_count = item_count - 1,
            removed_decayed = removed_decayed
                * exp(-GREATEST(date_part('epoch', now() - COALESCE(removed_at, now())), 0) / queue_pace_window())
                + 1,
            removed_at = now(),
            pace_since = COALESCE(pace_since, now())
        WHERE queue = q AND scope = s AND block = queue_block(OLD.position_in_queue);
    END IF;
    RETURN NULL;
END $$;

-- The pace of a scope ('' for the topic queue): seconds per removed item,
-- the (decayed) window and removals it rests on, and its source: 'scope',
-- or 'queue' when the scope itself has too little history (a new or quiet
-- topic: the typical pace of the queue's active scopes, i.e. the queue's
-- removals per active scope); all NULL when neither has enough.
CREATE FUNCTION queue_pace(p_queue TEXT, p_scope TEXT,
                           OUT per_item_seconds FLOAT8, OUT window_seconds FLOAT8,
                           OUT items_seen FLOAT8, OUT source TEXT)
    LANGUAGE plpgsql STABLE AS $$
DECLARE
    tau CONSTANT FLOAT8 := queue_pace_window();
    since TIMESTAMPTZ;
    scopes BIGINT;
BEGIN
    -- Each block's count decayed to now; the window is the decayed length
    -- of the time observed (short history: its own length; long: tau).
    SELECT sum(b.removed_decayed * exp(-GREATEST(date_part('epoch', now() - b.removed_at), 0) / tau)),
           min(b.pace_since)
    INTO items_seen, since
    FROM queue_blocks b
    WHERE b.queue = p_queue AND b.scope = p_scope AND b.removed_at IS NOT NULL;
    IF items_seen >= queue_pace_min_items() THEN
        window_seconds := tau * (1 - exp(-GREATEST(date_part('epoch', now() - since), 0) / tau));
        per_item_seconds := window_seconds / items_seen;
        source := 'scope';
        RETURN;
    END IF;
    items_seen := NULL;
    IF p_queue <> 'topic' THEN
        SELECT sum(d), count(*) FILTER (WHERE d >= 1), min(first)
        INTO items_seen, scopes, since
        FROM (SELECT b.scope,
                     sum(b.removed_decayed * exp(-GREATEST(date_part('epoch', now() - b.removed_at), 0) / tau)) AS d,
                     min(b.pace_since) AS first
              FROM queue_blocks b
              WHERE b.queue = p_queue AND b.removed_at IS NOT NULL
              GROUP BY b.scope) per_scope;
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

-- queue_position and queue_head answer with the wait too (new columns
-- after the old ones: a client that names its columns reads what it read).
-- A function's result type cannot change in place: dropped and created
-- again, its EXECUTE given back to the roles grant_forum_access set up.
DROP FUNCTION IF EXISTS queue_position(TEXT, TEXT);
DROP FUNCTION IF EXISTS queue_head(TEXT, TEXT, INTEGER);

-- An item's exact, dense, 1-based position (migration 5: the counts of the
-- blocks before the item's block plus its rank inside its block) and its
-- expected wait: position × its scope's time per item (NULL: no history).
-- One pass over the scope's blocks gives both the counts before the item
-- and the scope's decayed removals; the queue's typical pace (queue_pace)
-- is read only when the scope has too little history.
CREATE FUNCTION queue_position(p_queue TEXT, p_content_id TEXT)
    RETURNS TABLE (scope TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ,
                   expected_wait_seconds FLOAT8, wait_source TEXT, wait_window_seconds FLOAT8,
                   wait_items_seen FLOAT8)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    IF p_queue = 'topic' THEN
        RETURN QUERY
        SELECT ''::TEXT, x.pos, x.priority_score, x.entered_queue_at, w.*
        FROM (SELECT i.priority_score, i.entered_queue_at, agg.seen, agg.since,
                     agg.before + (SELECT count(*) FROM topic_creation_queue j
                                   WHERE j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                                     AND j.position_in_queue <= i.position_in_queue) AS pos
              FROM topic_creation_queue i
              CROSS JOIN LATERAL (
                  SELECT COALESCE(sum(b.item_count) FILTER (WHERE b.block < queue_block(i.position_in_queue)), 0)::BIGINT AS before,
                         sum(b.removed_decayed * exp(-GREATEST(date_part('epoch', now() - b.removed_at), 0)
                                                     / queue_pace_window())) AS seen,
                         min(b.pace_since) AS since
                  FROM queue_blocks b WHERE b.queue = 'topic' AND b.scope = '') agg
              WHERE i.topic_id = p_content_id) x
        CROSS JOIN LATERAL (
            SELECT x.pos * y.per_item, y.source, y.window_seconds, y.items_seen
            FROM (SELECT x.seen >= queue_pace_min_items() AS own,
                         queue_pace_window() * (1 - exp(-GREATEST(date_part('epoch', now() - x.since), 0)
                                                        / queue_pace_window())) AS span) o
            CROSS JOIN LATERAL (
                SELECT o.span / x.seen AS per_item, 'scope'::TEXT AS source, o.span AS window_seconds,
                       x.seen AS items_seen
                WHERE o.own
                UNION ALL
                SELECT p.per_item_seconds, p.source, p.window_seconds, p.items_seen
                FROM queue_pace('topic', '') p
                WHERE NOT o.own OR o.own IS NULL) y) w;
    ELSIF p_queue = 'post' THEN
        RETURN QUERY
        SELECT x.topic_id, x.pos, x.priority_score, x.entered_queue_at, w.*
        FROM (SELECT i.topic_id, i.priority_score, i.entered_queue_at, agg.seen, agg.since,
                     agg.before + (SELECT count(*) FROM post_moderation_queue j
                                   WHERE j.topic_id = i.topic_id
                                     AND j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                                     AND j.position_in_queue <= i.position_in_queue) AS pos
              FROM post_moderation_queue i
              CROSS JOIN LATERAL (
                  SELECT COALESCE(sum(b.item_count) FILTER (WHERE b.block < queue_block(i.position_in_queue)), 0)::BIGINT AS before,
                         sum(b.removed_decayed * exp(-GREATEST(date_part('epoch', now() - b.removed_at), 0)
                                                     / queue_pace_window())) AS seen,
                         min(b.pace_since) AS since
                  FROM queue_blocks b WHERE b.queue = 'post' AND b.scope = i.topic_id) agg
              WHERE i.post_id = p_content_id) x
        CROSS JOIN LATERAL (
            SELECT x.pos * y.per_item, y.source, y.window_seconds, y.items_seen
            FROM (SELECT x.seen >= queue_pace_min_items() AS own,
                         queue_pace_window() * (1 - exp(-GREATEST(date_part('epoch', now() - x.since), 0)
                                                        / queue_pace_window())) AS span) o
            CROSS JOIN LATERAL (
                SELECT o.span / x.seen AS per_item, 'scope'::TEXT AS source, o.span AS window_seconds,
                       x.seen AS items_seen
                WHERE o.own
                UNION ALL
                SELECT p.per_item_seconds, p.source, p.window_seconds, p.items_seen
                FROM queue_pace('post', x.topic_id) p
                WHERE NOT o.own OR o.own IS NULL) y) w;
    ELSE
        RETURN QUERY
        SELECT x.conversation_id, x.pos, x.priority_score, x.entered_queue_at, w.*
        FROM (SELECT i.conversation_id, i.priority_score, i.entered_queue_at, agg.seen, agg.since,
                     agg.before + (SELECT count(*) FROM private_message_queue j
                                   WHERE j.conversation_id = i.conversation_id
                                     AND j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                                     AND j.position_in_queue <= i.position_in_queue) AS pos
              FROM private_message_queue i
              CROSS JOIN LATERAL (
                  SELECT COALESCE(sum(b.item_count) FILTER (WHERE b.block < queue_block(i.position_in_queue)), 0)::BIGINT AS before,
                         sum(b.removed_decayed * exp(-GREATEST(date_part('epoch', now() - b.removed_at), 0)
                                                     / queue_pace_window())) AS seen,
                         min(b.pace_since) AS since
                  FROM queue_blocks b WHERE b.queue = 'message' AND b.scope = i.conversation_id) agg
              WHERE i.message_id = p_content_id) x
        CROSS JOIN LATERAL (
            SELECT x.pos * y.per_item, y.source, y.window_seconds, y.items_seen
            FROM (SELECT x.seen >= queue_pace_min_items() AS own,
                         queue_pace_window() * (1 - exp(-GREATEST(date_part('epoch', now() - x.since), 0)
                                                        / queue_pace_window())) AS span) o
            CROSS JOIN LATERAL (
                SELECT o.span / x.seen AS per_item, 'scope'::TEXT AS source, o.span AS window_seconds,
                       x.seen AS items_seen
                WHERE o.own
                UNION ALL
                SELECT p.per_item_seconds, p.source, p.window_seconds, p.items_seen
                FROM queue_pace('message', x.conversation_id) p
                WHERE NOT o.own OR o.own IS NULL) y) w;
    END IF;
END $$;

-- The first `p_limit` items of a scope ('' for the topic queue), in order,
-- each with its expected wait (one pace for the scope).
CREATE FUNCTION queue_head(p_queue TEXT, p_scope TEXT, p_limit INTEGER DEFAULT 100)
    RETURNS TABLE (content_id TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ,
                   expected_wait_seconds FLOAT8, wait_source TEXT, wait_window_seconds FLOAT8,
                   wait_items_seen FLOAT8)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
DECLARE
    pace RECORD;
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    PERFORM loyaltyd_check_range('queue_head: limit', p_limit, 1, 100000);
    IF p_scope IS NULL THEN
        RAISE EXCEPTION 'queue_head: scope is NULL' USING ERRCODE = '22023',
            HINT = 'the topic or conversation id; '''' for the topic queue';
    END IF;
    SELECT * INTO pace FROM queue_pace(p_queue, p_scope);
    IF p_queue = 'topic' AND p_scope = '' THEN
        RETURN QUERY
        SELECT t.topic_id, t.pos, t.priority_score, t.entered_queue_at,
               t.pos * pace.per_item_seconds, pace.source, pace.window_seconds, pace.items_seen
        FROM (SELECT q.topic_id, ROW_NUMBER() OVER (ORDER BY q.position_in_queue) AS pos, q.priority_score,
                     q.entered_queue_at
              FROM (SELECT * FROM topic_creation_queue ORDER BY position_in_queue LIMIT p_limit) q) t
        ORDER BY t.pos;
    ELSIF p_queue = 'post' THEN
        RETURN QUERY
        SELECT t.post_id, t.pos, t.priority_score, t.entered_queue_at,
               t.pos * pace.per_item_seconds, pace.source, pace.window_seconds, pace.items_seen
        FROM (SELECT q.post_id, ROW_NUMBER() OVER (ORDER BY q.position_in_queue) AS pos, q.priority_score,
                     q.entered_queue_at
              FROM (SELECT * FROM post_moderation_queue x WHERE x.topic_id = p_scope
                    ORDER BY x.position_in_queue LIMIT p_limit) q) t
        ORDER BY t.pos;
    ELSIF p_queue = 'message' THEN
        RETURN QUERY
        SELECT t.message_id, t.pos, t.priority_score, t.entered_queue_at,
               t.pos * pace.per_item_seconds, pace.source, pace.window_seconds, pace.items_seen
        FROM (SELECT q.message_id, ROW_NUMBER() OVER (ORDER BY q.position_in_queue) AS pos, q.priority_score,
                     q.entered_queue_at
              FROM (SELECT * FROM private_message_queue x WHERE x.conversation_id = p_scope
                    ORDER BY x.position_in_queue LIMIT p_limit) q) t
        ORDER BY t.pos;
    END IF;
END $$;

REVOKE EXECUTE ON FUNCTION queue_position(TEXT, TEXT), queue_head(TEXT, TEXT, INTEGER),
    queue_pace(TEXT, TEXT), queue_pace_window(), queue_pace_min_items() FROM PUBLIC;

-- EXECUTE back to every role grant_forum_access set up (they have it on
-- loyalty_standing, granted with these two), and migration 5's pinned
-- search_path on the new functions.
DO $$
DECLARE
    r NAME;
    f REGPROCEDURE;
BEGIN
    FOR r IN
        SELECT g.rolname FROM pg_proc p, aclexplode(p.proacl) a JOIN pg_roles g ON g.oid = a.grantee
        WHERE p.oid = 'loyalty_standing(BIGINT)'::REGPROCEDURE AND a.privilege_type = 'EXECUTE'
          AND a.grantee <> p.proowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION queue_position(TEXT, TEXT), queue_head(TEXT, TEXT, INTEGER) TO %I', r);
    END LOOP;
    FOR f IN
        SELECT p.oid::REGPROCEDURE FROM pg_proc p
        WHERE p.pronamespace = current_schema()::REGNAMESPACE
          AND p.proname IN ('queue_item_counted', 'queue_position', 'queue_head')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;
