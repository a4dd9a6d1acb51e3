-- The SQL contract for every writer and every role (SPEC §14), and scoring
-- at the cost of the work it must do. Migration 5's contract held for
-- event-only writers; this one makes it true for the rest of a real forum:
--  * loyaltyd's own score writes are told apart by what they write, not by
--    trigger depth or a session flag: they advance `score_version`
--    themselves. Any other change of a score (a client's UPDATE, an INSERT
--    of a user with a score, a forum's own trigger) is refused outside
--    legacy mode, and is versioned and credited exactly in it;
--  * legacy credits are consumed under their user's row lock, the lock
--    every credit is also written under, so concurrent events cannot race
--    for one credit and leave another behind;
--  * one event is scored by a row trigger (the cheapest path PostgreSQL
--    has); a statement of many rows is scored once, its users locked in id
--    order (so multi-row INSERTs in any row order cannot deadlock);
--  * pending leaderboard changes are counted on a row of the writing
--    backend's own: no two writers ever wait for each other on it (the old
--    64 shards deadlocked two backends that shared one);
--  * the write functions run as their owner, so the role that
--    grant_forum_access sets up can call them; the read API checks its
--    arguments like the CLI does.

-- ---------------------------------------------------------------- pending changes

-- A row per backend (its pid): only that backend writes it, so writers never
-- queue on it and a transaction that records events for many users holds no
-- lock another writer needs. The refresh subtracts what it consumed on its
-- own backend's row and folds the rows of ended backends into it, skipping
-- any row a writer holds: it never waits for a writer either. The pending
-- count is still the sum of the rows.
ALTER TABLE leaderboard_pending ALTER COLUMN shard TYPE INTEGER;

-- Counts `n` pending changes (negative: consumed) on this backend's row.
CREATE FUNCTION leaderboard_count_changes(n BIGINT) RETURNS void
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
-- is left for the next refresh).
CREATE FUNCTION leaderboard_consume_changes(consumed BIGINT) RETURNS void
    LANGUAGE plpgsql AS $$
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
    SELECT COALESCE(sum(changes), 0) INTO folded FROM gone;
    PERFORM leaderboard_count_changes(folded - consumed);
END $$;

-- ---------------------------------------------------------------- direct score writes

-- Any change of a score that did not advance its version itself: a client's
-- UPDATE, an INSERT of a user with a score, a forum's own trigger. loyaltyd's
-- writes (the scoring triggers, the sweep's repair, adopt) always write
-- score_version; a forum's statement that changes loyalty_score does not,
-- unless it means to keep the bookkeeping itself.
--  * legacy mode (loyaltyd_settings.legacy_score_writes, while an
--    application of the original design still runs): the write stands, gets a
--    new version and its transaction (so the cache and the live board
--    follow), and becomes a credit its user's next event of the same delta
--    consumes instead of adding it again;
--  * otherwise refused: the event that should come with it would count the
--    change twice.
CREATE FUNCTION users_score_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    delta BIGINT := NEW.loyalty_score - CASE WHEN TG_OP = 'UPDATE' THEN OLD.loyalty_score ELSE 0 END;
BEGIN
    IF NOT (SELECT legacy_score_writes FROM loyaltyd_settings) THEN
        RAISE EXCEPTION 'direct write of users.loyalty_score refused (user %, % by %): loyaltyd_settings.legacy_score_writes is off',
                NEW.id, CASE WHEN TG_OP = 'UPDATE' THEN 'change' ELSE 'insert' END, delta
            USING ERRCODE = 'LY003',
                  HINT = 'insert a moderation_events row instead (the score follows it); while an application '
                      || 'of the original design still writes scores itself, turn on '
                      || 'loyaltyd_settings.legacy_score_writes';
    END IF;
    NEW.score_version := next_score_version(CASE WHEN TG_OP = 'UPDATE' THEN OLD.score_version ELSE 0 END);
    NEW.score_xid := pg_current_xact_id();
    -- Under this row's lock (a BEFORE trigger of the row's own write): an
    -- event of this user consumes it under the same lock.
    INSERT INTO legacy_score_credits (user_id, delta) VALUES (NEW.id, delta);
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS users_score_written ON users;
DROP FUNCTION IF EXISTS users_score_written();
CREATE TRIGGER users_score_changed BEFORE UPDATE ON users
    FOR EACH ROW
    WHEN (OLD.loyalty_score IS DISTINCT FROM NEW.loyalty_score AND OLD.score_version = NEW.score_version)
    EXECUTE FUNCTION users_score_changed();
CREATE TRIGGER users_score_inserted BEFORE INSERT ON users
    FOR EACH ROW
    WHEN (NEW.loyalty_score <> 0 AND NEW.score_version = 0)
    EXECUTE FUNCTION users_score_changed();

-- A user inserted with its bookkeeping (a version of its own, as a restore
-- or a bulk load writes it) still needs its transaction for the cache sync.
CREATE FUNCTION users_inserted_versioned() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    NEW.score_xid := COALESCE(NEW.score_xid, pg_current_xact_id());
    RETURN NEW;
END $$;
CREATE TRIGGER users_inserted_versioned BEFORE INSERT ON users
    FOR EACH ROW
    WHEN (NEW.loyalty_score <> 0 AND NEW.score_version <> 0 AND NEW.score_xid IS NULL)
    EXECUTE FUNCTION users_inserted_versioned();

-- ---------------------------------------------------------------- scoring

-- Adds per-user deltas to scores (the statement path: many users at once),
-- locking the users in id order first, then consuming legacy credits under
-- those locks, then counting `changes` pending changes. Each (user, delta)
-- pair's events consume up to as many credits of that user and delta as
-- they are.
CREATE FUNCTION score_events(ids BIGINT[], deltas BIGINT[], nonzero BIGINT[], changes BIGINT) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    taken_ids BIGINT[];
    taken BIGINT[];
BEGIN
    PERFORM 1 FROM users u WHERE u.id = ANY(ids) ORDER BY u.id FOR NO KEY UPDATE;
    IF EXISTS (SELECT 1 FROM legacy_score_credits c WHERE c.user_id = ANY(ids)) THEN
        -- The events of each user and delta, from the caller's arrays
        -- (ids may repeat: one entry per user and delta).
        WITH ev AS (
            SELECT e.id AS user_id, e.delta, e.n FROM unnest(ids, deltas, nonzero) AS e(id, delta, n)
            WHERE e.delta <> 0
        ), consumed AS (
            DELETE FROM legacy_score_credits c
            WHERE c.id IN (
                SELECT m.id FROM (
                    SELECT lc.id, ev.n,
                           row_number() OVER (PARTITION BY lc.user_id, lc.delta ORDER BY lc.id) AS rn
                    FROM legacy_score_credits lc JOIN ev ON ev.user_id = lc.user_id AND ev.delta = lc.delta
                ) m WHERE m.rn <= m.n)
            RETURNING c.user_id, c.delta
        )
        SELECT array_agg(user_id), array_agg(delta) INTO taken_ids, taken
        FROM (SELECT user_id, sum(delta) AS delta FROM consumed GROUP BY user_id) t;
    END IF;
    UPDATE users u
    SET loyalty_score = u.loyalty_score + i.delta,
        score_version = next_score_version(u.score_version),
        score_xid = pg_current_xact_id(),
        updated_at = now()
    FROM (SELECT m.id, sum(m.delta) AS delta
          FROM (SELECT s.id, s.delta * s.n AS delta FROM unnest(ids, deltas, nonzero) AS s(id, delta, n)
                UNION ALL
                SELECT t.id, -t.delta FROM unnest(taken_ids, taken) AS t(id, delta)) m
          GROUP BY m.id) i
    WHERE u.id = i.id AND i.delta <> 0;
    IF changes <> 0 THEN
        PERFORM leaderboard_count_changes(changes);
    END IF;
END $$;

-- One event (the common case: a forum records one decision per
-- statement): its user's row lock by the UPDATE itself, a credit consumed
-- under that lock when the user has any, one pending change. An INSERT of
-- several rows is left to the statement trigger below, which locks its
-- users in id order. (The transition table is the only place a row trigger
-- can learn that its statement has other rows; reading two of its rows is
-- a constant cost.)
CREATE FUNCTION moderation_event_scored() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF (SELECT count(*) FROM (SELECT FROM new_events LIMIT 2) two) > 1 THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM legacy_score_credits c WHERE c.user_id = NEW.user_id) THEN
        PERFORM 1 FROM users u WHERE u.id = NEW.user_id FOR NO KEY UPDATE;
        DELETE FROM legacy_score_credits c
        WHERE c.id = (SELECT c2.id FROM legacy_score_credits c2
                      WHERE c2.user_id = NEW.user_id AND c2.delta = NEW.score_delta
                      ORDER BY c2.id LIMIT 1);
        IF FOUND THEN
            -- The seed's own UPDATE moved the score already.
            PERFORM leaderboard_count_changes(1);
            RETURN NULL;
        END IF;
    END IF;
    UPDATE users u
    SET loyalty_score = u.loyalty_score + NEW.score_delta,
        score_version = next_score_version(u.score_version),
        score_xid = pg_current_xact_id(),
        updated_at = now()
    WHERE u.id = NEW.user_id;
    PERFORM leaderboard_count_changes(1);
    RETURN NULL;
END $$;

-- A statement of several rows (a multi-row INSERT, COPY, an INSERT ...
-- SELECT): one pass over its rows, each user once, in id order.
CREATE FUNCTION moderation_events_scored_many() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    ids BIGINT[];
    deltas BIGINT[];
    nonzero BIGINT[];
    changes BIGINT;
BEGIN
    IF (SELECT count(*) FROM (SELECT FROM new_events LIMIT 2) two) < 2 THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(user_id ORDER BY user_id), array_agg(score_delta::BIGINT ORDER BY user_id),
           array_agg(n ORDER BY user_id), COALESCE(sum(n), 0)
    INTO ids, deltas, nonzero, changes
    FROM (SELECT user_id, score_delta, count(*) AS n FROM new_events
          WHERE score_delta <> 0 GROUP BY user_id, score_delta) per_user;
    IF ids IS NOT NULL THEN
        PERFORM score_events(ids, deltas, nonzero, changes);
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS moderation_events_scored_insert ON moderation_events;
CREATE TRIGGER moderation_event_scored AFTER INSERT ON moderation_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH ROW WHEN (NEW.score_delta <> 0) EXECUTE FUNCTION moderation_event_scored();
CREATE TRIGGER moderation_events_scored_many AFTER INSERT ON moderation_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_scored_many();

-- UPDATE and DELETE of events keep migration 5's statement triggers; their
-- helper counts pending changes on the backend's own row now.
CREATE OR REPLACE FUNCTION apply_score_deltas(ids BIGINT[], deltas BIGINT[], changes BIGINT) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM users u WHERE u.id = ANY(ids) ORDER BY u.id FOR NO KEY UPDATE;
    UPDATE users u
    SET loyalty_score = u.loyalty_score + i.delta,
        score_version = next_score_version(u.score_version),
        score_xid = pg_current_xact_id(),
        updated_at = now()
    FROM unnest(ids, deltas) AS i(id, delta)
    WHERE u.id = i.id AND i.delta <> 0;
    IF changes <> 0 THEN
        PERFORM leaderboard_count_changes(changes);
    END IF;
END $$;

-- ---------------------------------------------------------------- queue keys

-- A client's UPDATE of an ordering key (not loyaltyd's reorder, which marks
-- its transaction `loyaltyd.rekey`): in legacy mode it is the original
-- design's remove shifting every later key down after its DELETE, which the
-- DELETE's gap-closing made unnecessary, so the keys stay; otherwise it is
-- refused whole (it would move items past each other, and could run into the
-- unique key halfway).
CREATE OR REPLACE FUNCTION queue_key_written() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF (SELECT legacy_score_writes FROM loyaltyd_settings) THEN
        NEW.position_in_queue := OLD.position_in_queue;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'update of %.position_in_queue refused: the database keeps the ordering key (loyaltyd_settings.legacy_score_writes is off)', TG_TABLE_NAME
        USING ERRCODE = 'LY004',
              HINT = 'positions close their gaps by themselves on DELETE; reorder by priority with '
                  || '`loyaltyd queue reorder`; while an application of the original design still shifts '
                  || 'positions itself, turn on loyaltyd_settings.legacy_score_writes';
END $$;

-- ---------------------------------------------------------------- the write functions

-- As their owner (with migration 5's pinned search_path): a role that
-- grant_forum_access set up may call them, and they do nothing an INSERT by
-- that role could not.
ALTER FUNCTION record_moderation_event(BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT) SECURITY DEFINER;
ALTER FUNCTION record_moderation_events(BIGINT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[]) SECURITY DEFINER;

-- Appends an item at the tail of its scope and answers with its position;
-- loyaltyd's own add. Its arguments are checked first (a NULL or an unknown
-- queue is a clear error, not a constraint of a bookkeeping table).
CREATE OR REPLACE FUNCTION queue_add(p_queue TEXT, p_content_id TEXT, p_scope TEXT, p_priority FLOAT8 DEFAULT 0,
                                     OUT "position" BIGINT, OUT entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql SECURITY DEFINER AS $$
#variable_conflict use_column
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
        RETURNING i.entered_queue_at INTO entered_queue_at;
    ELSIF p_queue = 'post' THEN
        INSERT INTO post_moderation_queue AS i (post_id, topic_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.entered_queue_at INTO entered_queue_at;
    ELSE
        INSERT INTO private_message_queue AS i (message_id, conversation_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.entered_queue_at INTO entered_queue_at;
    END IF;
    SELECT sum(item_count) INTO "position" FROM queue_blocks
    WHERE queue = p_queue AND scope = CASE WHEN p_queue = 'topic' THEN '' ELSE p_scope END;
END $$;

-- ---------------------------------------------------------------- the read API's bounds

-- Refuses an argument the CLI would refuse (SQLSTATE 22023, the bound in
-- the message): the API never answers a NULL limit with the whole table.
CREATE FUNCTION loyaltyd_check_queue(p_queue TEXT) RETURNS void
    LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_queue IS NULL OR p_queue NOT IN ('topic', 'post', 'message') THEN
        RAISE EXCEPTION 'unknown queue %', COALESCE(quote_literal(p_queue), 'NULL')
            USING ERRCODE = '22023', HINT = 'queues are topic, post and message';
    END IF;
END $$;

CREATE FUNCTION loyaltyd_check_range(what TEXT, val BIGINT, lo BIGINT, hi BIGINT) RETURNS void
    LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF val IS NULL OR val < lo OR val > hi THEN
        RAISE EXCEPTION '% must be % to %, not %', what, lo, hi, COALESCE(val::TEXT, 'NULL')
            USING ERRCODE = '22023';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION queue_position(p_queue TEXT, p_content_id TEXT)
    RETURNS TABLE (scope TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    IF p_queue = 'topic' THEN
        RETURN QUERY
        SELECT ''::TEXT,
               (SELECT COALESCE(sum(b.item_count), 0) FROM queue_blocks b
                 WHERE b.queue = 'topic' AND b.scope = '' AND b.block < queue_block(i.position_in_queue))::BIGINT
             + (SELECT count(*) FROM topic_creation_queue j
                 WHERE j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                   AND j.position_in_queue <= i.position_in_queue),
               i.priority_score, i.entered_queue_at
        FROM topic_creation_queue i WHERE i.topic_id = p_content_id;
    ELSIF p_queue = 'post' THEN
        RETURN QUERY
        SELECT i.topic_id,
               (SELECT COALESCE(sum(b.item_count), 0) FROM queue_blocks b
                 WHERE b.queue = 'post' AND b.scope = i.topic_id AND b.block < queue_block(i.position_in_queue))::BIGINT
             + (SELECT count(*) FROM post_moderation_queue j
                 WHERE j.topic_id = i.topic_id
                   AND j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                   AND j.position_in_queue <= i.position_in_queue),
               i.priority_score, i.entered_queue_at
        FROM post_moderation_queue i WHERE i.post_id = p_content_id;
    ELSE
        RETURN QUERY
        SELECT i.conversation_id,
               (SELECT COALESCE(sum(b.item_count), 0) FROM queue_blocks b
                 WHERE b.queue = 'message' AND b.scope = i.conversation_id AND b.block < queue_block(i.position_in_queue))::BIGINT
             + (SELECT count(*) FROM private_message_queue j
                 WHERE j.conversation_id = i.conversation_id
                   AND j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                   AND j.position_in_queue <= i.position_in_queue),
               i.priority_score, i.entered_queue_at
        FROM private_message_queue i WHERE i.message_id = p_content_id;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION queue_head(p_queue TEXT, p_scope TEXT, p_limit INTEGER DEFAULT 100)
    RETURNS TABLE (content_id TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    PERFORM loyaltyd_check_range('queue_head: limit', p_limit, 1, 100000);
    IF p_scope IS NULL THEN
        RAISE EXCEPTION 'queue_head: scope is NULL' USING ERRCODE = '22023',
            HINT = 'the topic or conversation id; '''' for the topic queue';
    END IF;
    IF p_queue = 'topic' AND p_scope = '' THEN
        RETURN QUERY
        SELECT t.topic_id, ROW_NUMBER() OVER (ORDER BY t.position_in_queue), t.priority_score, t.entered_queue_at
        FROM (SELECT * FROM topic_creation_queue ORDER BY position_in_queue LIMIT p_limit) t
        ORDER BY t.position_in_queue;
    ELSIF p_queue = 'post' THEN
        RETURN QUERY
        SELECT t.post_id, ROW_NUMBER() OVER (ORDER BY t.position_in_queue), t.priority_score, t.entered_queue_at
        FROM (SELECT * FROM post_moderation_queue q WHERE q.topic_id = p_scope ORDER BY q.position_in_queue LIMIT p_limit) t
        ORDER BY t.position_in_queue;
    ELSIF p_queue = 'message' THEN
        RETURN QUERY
        SELECT t.message_id, ROW_NUMBER() OVER (ORDER BY t.position_in_queue), t.priority_score, t.entered_queue_at
        FROM (SELECT * FROM private_message_queue q WHERE q.conversation_id = p_scope ORDER BY q.position_in_queue LIMIT p_limit) t
        ORDER BY t.position_in_queue;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION queue_length(p_queue TEXT, p_scope TEXT) RETURNS BIGINT
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    IF p_scope IS NULL THEN
        RAISE EXCEPTION 'queue_length: scope is NULL' USING ERRCODE = '22023',
            HINT = 'the topic or conversation id; '''' for the topic queue';
    END IF;
    RETURN (SELECT COALESCE(sum(b.item_count), 0)::BIGINT FROM queue_blocks b
            WHERE b.queue = p_queue AND b.scope = p_scope);
END $$;

CREATE OR REPLACE FUNCTION loyalty_standing(p_user_id BIGINT)
    RETURNS TABLE (user_id BIGINT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_range('loyalty_standing: user id', p_user_id, 1, 9223372036854775807);
    RETURN QUERY
    SELECT u.id, u.loyalty_score, l.rank, COALESCE(l.can_create_topics, false)
    FROM users u LEFT JOIN user_leaderboard l ON l.user_id = u.id
    WHERE u.id = p_user_id;
END $$;

CREATE OR REPLACE FUNCTION leaderboard_page(p_limit INTEGER DEFAULT 100, p_offset BIGINT DEFAULT 0)
    RETURNS TABLE (user_id BIGINT, username TEXT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    PERFORM loyaltyd_check_range('leaderboard_page: limit', p_limit, 1, 1000);
    PERFORM loyaltyd_check_range('leaderboard_page: offset', p_offset, 0, 9223372036854775807);
    RETURN QUERY
    SELECT l.user_id, l.username, l.loyalty_score, l.rank, l.can_create_topics
    FROM user_leaderboard l WHERE l.rank > p_offset ORDER BY l.rank LIMIT p_limit;
END $$;

-- ---------------------------------------------------------------- privileges

-- As migration 5's, and: refuses PUBLIC and PostgreSQL's predefined roles
-- (granting to either would hand every role of the cluster the forum's
-- writes); grants the schema's USAGE and the queues' *_positions views.
CREATE OR REPLACE FUNCTION grant_forum_access(role_name NAME) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF role_name IS NULL OR lower(role_name) = 'public' THEN
        RAISE EXCEPTION 'grant_forum_access: refusing to grant the forum''s access to PUBLIC (every role)'
            USING ERRCODE = '22023', HINT = 'create a role for the forum: CREATE ROLE forum_app LOGIN';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
        RAISE EXCEPTION 'grant_forum_access: role % does not exist', quote_ident(role_name)
            USING ERRCODE = '42704', HINT = 'CREATE ROLE ' || quote_ident(role_name) || ' LOGIN';
    END IF;
    IF role_name LIKE 'pg\_%' OR (SELECT oid FROM pg_roles WHERE rolname = role_name) < 16384 THEN
        RAISE EXCEPTION 'grant_forum_access: refusing predefined role %', quote_ident(role_name)
            USING ERRCODE = '22023', HINT = 'create a role for the forum: CREATE ROLE forum_app LOGIN';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), role_name);
    EXECUTE format('GRANT SELECT, INSERT ON moderation_events TO %I', role_name);
    EXECUTE format('GRANT USAGE ON SEQUENCE moderation_events_id_seq TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON topic_creation_queue, post_moderation_queue, private_message_queue TO %I', role_name);
    EXECUTE format('GRANT SELECT ON topic_creation_queue_positions, post_moderation_queue_positions,
                    private_message_queue_positions TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION queue_position(TEXT, TEXT), queue_head(TEXT, TEXT, INTEGER),
                    queue_length(TEXT, TEXT), loyalty_standing(BIGINT), leaderboard_page(INTEGER, BIGINT),
                    record_moderation_event(BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT),
                    record_moderation_events(BIGINT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[]),
                    queue_add(TEXT, TEXT, TEXT, FLOAT8) TO %I', role_name);
END $$;

REVOKE EXECUTE ON FUNCTION
    leaderboard_count_changes(BIGINT), leaderboard_consume_changes(BIGINT),
    score_events(BIGINT[], BIGINT[], BIGINT[], BIGINT), loyaltyd_check_queue(TEXT),
    loyaltyd_check_range(TEXT, BIGINT, BIGINT, BIGINT)
    FROM PUBLIC;

-- The pinned search_path of migration 5, on what this migration adds or
-- makes callable. (The helpers the triggers call run under the caller's
-- pinned path.)
DO $$
DECLARE
    f REGPROCEDURE;
BEGIN
    FOR f IN
        SELECT p.oid::REGPROCEDURE FROM pg_proc p
        WHERE p.pronamespace = current_schema()::REGNAMESPACE
          AND p.proname IN ('users_score_changed', 'users_inserted_versioned', 'moderation_event_scored',
                            'moderation_events_scored_many', 'queue_key_written', 'queue_add', 'queue_position',
                            'queue_head', 'queue_length', 'loyalty_standing', 'leaderboard_page',
                            'grant_forum_access', 'leaderboard_consume_changes')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;
