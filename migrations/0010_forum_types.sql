-- The read API on a forum that keeps its own column types.
--
-- `loyaltyd adopt` no longer changes the type of a forum's existing column
-- online (src/adopt.rs: a type change fails every prepared statement of the
-- application that reads the column, "cached plan must not change result
-- type"). An adopted forum may keep INTEGER ids, scores and queue keys,
-- VARCHAR ids, TIMESTAMP without time zone and REAL priorities. Triggers and
-- writes need nothing for that (assignments cast); a function that answers
-- with RETURN QUERY must answer its declared types exactly, so the ones that
-- read forum columns cast them here. On a database `migrate` built the
-- casts are no-ops. (Functions cannot be edited in the migration that made
-- them: applied migrations are history.)

-- Migration 8's, with casts.
CREATE OR REPLACE FUNCTION loyalty_standing(p_user_id BIGINT)
    RETURNS TABLE (user_id BIGINT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_range('loyalty_standing: user id', p_user_id, 1, 9223372036854775807);
    RETURN QUERY
    SELECT u.id::BIGINT, u.loyalty_score::BIGINT, l.rank, COALESCE(l.can_create_topics, false)
    FROM users u LEFT JOIN user_leaderboard l ON l.user_id = u.id
    WHERE u.id = p_user_id;
END $$;

-- Migration 8's, with casts.
CREATE OR REPLACE FUNCTION leaderboard_page(p_limit INTEGER DEFAULT 100, p_offset BIGINT DEFAULT 0)
    RETURNS TABLE (user_id BIGINT, username TEXT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_range('leaderboard_page: limit', p_limit, 1, 1000);
    PERFORM loyaltyd_check_range('leaderboard_page: offset', p_offset, 0, 9223372036854775807);
    RETURN QUERY
    SELECT l.user_id::BIGINT, l.username::TEXT, l.loyalty_score::BIGINT, l.rank, l.can_create_topics
    FROM user_leaderboard l WHERE l.rank > p_offset ORDER BY l.rank LIMIT p_limit;
END $$;

-- Migration 5's (SECURITY DEFINER since migration 8), with casts.
CREATE OR REPLACE FUNCTION record_moderation_events(
    p_user_ids BIGINT[], p_event_types TEXT[], p_content_types TEXT[], p_content_ids TEXT[],
    p_outcomes TEXT[], p_event_ids TEXT[])
    RETURNS TABLE (user_id BIGINT, loyalty_score BIGINT, score_version BIGINT, events BIGINT, created_us BIGINT)
    LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
DECLARE
    ids BIGINT[];
    counts BIGINT[];
BEGIN
    WITH inserted AS (
        INSERT INTO moderation_events AS e (user_id, event_type, content_type, content_id, outcome, event_id)
        -- In user order: fills the user-keyed indexes in order.
        SELECT t.user_id, t.event_type, t.content_type, t.content_id, t.outcome, t.event_id
        FROM unnest(p_user_ids, p_event_types, p_content_types, p_content_ids, p_outcomes, p_event_ids)
             WITH ORDINALITY AS t(user_id, event_type, content_type, content_id, outcome, event_id, ord)
        ORDER BY t.user_id, t.ord
        ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING
        RETURNING e.user_id
    )
    SELECT array_agg(i.user_id ORDER BY i.user_id), array_agg(i.n ORDER BY i.user_id) INTO ids, counts
    FROM (SELECT inserted.user_id, count(*) AS n FROM inserted GROUP BY inserted.user_id) i;
    -- The trigger ran at the end of the INSERT: this query sees its scores.
    RETURN QUERY
    SELECT u.id::BIGINT, u.loyalty_score::BIGINT, u.score_version, c.n,
           (EXTRACT(EPOCH FROM u.created_at) * 1000000)::BIGINT
    FROM unnest(ids, counts) AS c(id, n) JOIN users u ON u.id = c.id
    ORDER BY u.id;
END $$;

-- Migration 9's, with casts.
CREATE OR REPLACE FUNCTION queue_position(p_queue TEXT, p_content_id TEXT)
    RETURNS TABLE (scope TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ,
                   expected_wait_seconds FLOAT8, wait_source TEXT, wait_window_seconds FLOAT8,
                   wait_items_seen FLOAT8)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    IF p_queue = 'topic' THEN
        RETURN QUERY
        SELECT ''::TEXT, x.pos, x.priority_score::FLOAT8, x.entered_queue_at::TIMESTAMPTZ, w.*
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
        SELECT x.topic_id::TEXT, x.pos, x.priority_score::FLOAT8, x.entered_queue_at::TIMESTAMPTZ, w.*
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
        SELECT x.conversation_id::TEXT, x.pos, x.priority_score::FLOAT8, x.entered_queue_at::TIMESTAMPTZ, w.*
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
CREATE OR REPLACE FUNCTION queue_head(p_queue TEXT, p_scope TEXT, p_limit INTEGER DEFAULT 100)
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
        SELECT t.topic_id::TEXT, t.pos, t.priority_score::FLOAT8, t.entered_queue_at::TIMESTAMPTZ,
               t.pos * pace.per_item_seconds, pace.source, pace.window_seconds, pace.items_seen
        FROM (SELECT q.topic_id, ROW_NUMBER() OVER (ORDER BY q.position_in_queue) AS pos, q.priority_score,
                     q.entered_queue_at
              FROM (SELECT * FROM topic_creation_queue ORDER BY position_in_queue LIMIT p_limit) q) t
        ORDER BY t.pos;
    ELSIF p_queue = 'post' THEN
        RETURN QUERY
        SELECT t.post_id::TEXT, t.pos, t.priority_score::FLOAT8, t.entered_queue_at::TIMESTAMPTZ,
               t.pos * pace.per_item_seconds, pace.source, pace.window_seconds, pace.items_seen
        FROM (SELECT q.post_id, ROW_NUMBER() OVER (ORDER BY q.position_in_queue) AS pos, q.priority_score,
                     q.entered_queue_at
              FROM (SELECT * FROM post_moderation_queue x WHERE x.topic_id = p_scope
                    ORDER BY x.position_in_queue LIMIT p_limit) q) t
        ORDER BY t.pos;
    ELSIF p_queue = 'message' THEN
        RETURN QUERY
        SELECT t.message_id::TEXT, t.pos, t.priority_score::FLOAT8, t.entered_queue_at::TIMESTAMPTZ,
               t.pos * pace.per_item_seconds, pace.source, pace.window_seconds, pace.items_seen
        FROM (SELECT q.message_id, ROW_NUMBER() OVER (ORDER BY q.position_in_queue) AS pos, q.priority_score,
                     q.entered_queue_at
              FROM (SELECT * FROM private_message_queue x WHERE x.conversation_id = p_scope
                    ORDER BY x.position_in_queue LIMIT p_limit) q) t
        ORDER BY t.pos;
    END IF;
END $$;

-- CREATE OR REPLACE resets a function's settings: migration 5's pinned
-- search_path again (the privileges stay).
DO $$
DECLARE
    f REGPROCEDURE;
BEGIN
    FOR f IN
        SELECT p.oid::REGPROCEDURE FROM pg_proc p
        WHERE p.pronamespace = current_schema()::REGNAMESPACE
          AND p.proname IN ('loyalty_standing', 'leaderboard_page', 'record_moderation_events',
                            'queue_position', 'queue_head')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;
