-- The SQL contract (SPEC §10): the seed's tables are the application's
-- interface. Plain SQL from any client, in the client's own transaction,
-- keeps every rule loyaltyd's own code keeps, because loyaltyd's own code goes
-- through the same triggers: there is one source of truth.
--
-- Why triggers, and why these: measured with pgbench on 200,000 users and
-- 4,000,000 events (README, "Integrating your forum"). A statement-level
-- trigger over a transition table costs what the old one-statement CTE cost
-- for one event (0.41-0.45 ms against 0.41-0.45 ms), and for a 500-event
-- INSERT it runs one UPDATE per user instead of one per event (35 ms against
-- 46 ms for a row trigger); it also locks the users of a multi-row INSERT in
-- id order, so two such INSERTs cannot deadlock. NOTIFY was measured too and
-- is not used: every notifying transaction takes one database-wide lock from
-- its commit until it ends, which serialized commits (16 clients: 5.9-7.1 ms
-- per event against 2.3-3.5 ms). The daemon instead polls `users.score_xid`
-- (below), which costs the write path nothing measurable.
--
-- Every function that writes on a client's behalf is SECURITY DEFINER with a
-- pinned search_path (set at the end of this file), so the forum's own role
-- needs no privilege on `users` or on any bookkeeping table; the helpers they
-- call are not executable by PUBLIC.

-- ---------------------------------------------------------------- scores

-- The transaction that last changed the score. The daemon keeps the Redis
-- cache coherent for writers that bypass loyaltyd by reading the rows whose
-- transaction it has not yet seen committed (src/sync.rs): exact, without
-- time margins, at the cost of one index entry per score change.
ALTER TABLE users ADD COLUMN score_xid xid8;
CREATE INDEX users_score_xid ON users (score_xid) WHERE score_xid IS NOT NULL;

-- Adds per-user deltas to scores: locks the users in id order first (so two
-- writers of many users cannot deadlock), bumps each score's version and
-- records the writing transaction; then counts `changes` pending leaderboard
-- changes on this backend's shard. (It runs inside a trigger, where
-- users_score_written, below, lets its writes through.)
CREATE FUNCTION apply_score_deltas(ids BIGINT[], deltas BIGINT[], changes BIGINT) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    -- Several users: their row locks first, in id order (an UPDATE's own
    -- locking order is its plan's). One user needs no pass of its own.
    IF cardinality(ids) > 1 THEN
        PERFORM 1 FROM users u WHERE u.id = ANY(ids) ORDER BY u.id FOR NO KEY UPDATE;
    END IF;
    UPDATE users u
    SET loyalty_score = u.loyalty_score + i.delta,
        score_version = next_score_version(u.score_version),
        score_xid = pg_current_xact_id(),
        updated_at = now()
    FROM unnest(ids, deltas) AS i(id, delta)
    WHERE u.id = i.id AND i.delta <> 0;
    IF changes > 0 THEN
        UPDATE leaderboard_pending p SET changes = p.changes + apply_score_deltas.changes
        WHERE p.shard = leaderboard_shard();
    END IF;
END $$;

-- ---------------------------------------------------------------- the seed's writers
--
-- While a forum switches over, an application still running the original
-- code changes scores itself (UPDATE users SET loyalty_score = loyalty_score
-- + delta), then inserts the event in a second statement; with the trigger
-- below the event would count twice. `loyaltyd_settings.legacy_score_writes`
-- (on while the old code runs; `loyaltyd adopt` turns it on, the operator
-- off once the application only inserts events) makes such a direct write a
-- credit: the next event of that user with that delta consumes it instead of
-- adding its delta again, whichever writer inserts it. Credits are fungible,
-- so the sum comes out exact whatever the interleaving; the integrity sweep
-- counts a fresh credit as pending and repairs one older than five minutes
-- (an UPDATE whose INSERT never came) as drift.
CREATE TABLE loyaltyd_settings (
    singleton           BOOLEAN PRIMARY KEY DEFAULT true CONSTRAINT loyaltyd_settings_singleton CHECK (singleton),
    legacy_score_writes BOOLEAN NOT NULL DEFAULT false
);
INSERT INTO loyaltyd_settings DEFAULT VALUES;

CREATE TABLE legacy_score_credits (
    id         BIGSERIAL   PRIMARY KEY,
    user_id    BIGINT      NOT NULL,
    delta      BIGINT      NOT NULL,
    written_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX legacy_score_credits_user ON legacy_score_credits (user_id, delta);

-- Any score written directly (an operator's fix, a restore, a seed-era
-- application) still gets a new version and its transaction, so the cache
-- sync brings it to Redis; in legacy mode it also becomes a credit.
-- loyaltyd's own writes do not come here: the scoring trigger's come from
-- inside a trigger (pg_trigger_depth() is 1 where the WHEN below is read; a
-- client's own UPDATE reads 0), and the sweep's repair marks its
-- transaction (`loyaltyd.scoring`).
CREATE FUNCTION users_score_written() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    NEW.score_version := next_score_version(OLD.score_version);
    NEW.score_xid := pg_current_xact_id();
    IF (SELECT legacy_score_writes FROM loyaltyd_settings) THEN
        INSERT INTO legacy_score_credits (user_id, delta)
        VALUES (NEW.id, NEW.loyalty_score - OLD.loyalty_score);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER users_score_written BEFORE UPDATE OF loyalty_score ON users
    FOR EACH ROW
    WHEN (OLD.loyalty_score IS DISTINCT FROM NEW.loyalty_score
          AND pg_trigger_depth() = 0
          AND current_setting('loyaltyd.scoring', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION users_score_written();

-- Scores follow moderation_events, whoever writes them: an INSERT (one row,
-- many rows, COPY) adds each event's score_delta to its user's score and
-- counts one pending change per event with a non-zero delta; a DELETE takes
-- the deltas back; an UPDATE moves them (to another user, or by a changed
-- outcome). Rows that ON CONFLICT DO NOTHING skipped are not in the
-- transition tables: an event-id replay counts once.
CREATE FUNCTION moderation_events_scored() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    ids BIGINT[];
    deltas BIGINT[];
    changes BIGINT;
BEGIN
    IF TG_OP = 'INSERT' AND NOT EXISTS (SELECT 1 FROM legacy_score_credits) THEN
        SELECT array_agg(user_id) FILTER (WHERE delta <> 0), array_agg(delta) FILTER (WHERE delta <> 0),
               COALESCE(sum(n), 0)
        INTO ids, deltas, changes
        FROM (SELECT user_id, sum(score_delta) AS delta, count(*) FILTER (WHERE score_delta <> 0) AS n
              FROM new_events GROUP BY user_id) per_user;
    ELSIF TG_OP = 'INSERT' THEN
        -- Seed-era writers changed some of these scores already: each new
        -- event consumes one credit of its user and delta, if there is one,
        -- instead of adding its delta again. A credit another transaction
        -- consumes first is not deleted here (its row lock, then the
        -- re-check), so it is consumed once.
        WITH ev AS (
            SELECT user_id, score_delta::BIGINT AS delta, count(*) AS n
            FROM new_events WHERE score_delta <> 0 GROUP BY user_id, score_delta
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
        SELECT array_agg(user_id), array_agg(delta), COALESCE(sum(n), 0)
        INTO ids, deltas, changes
        FROM (SELECT user_id, sum(delta) AS delta, sum(n) AS n
              FROM (SELECT user_id, score_delta::BIGINT AS delta, (score_delta <> 0)::INT AS n FROM new_events
                    UNION ALL
                    SELECT user_id, -delta, 0 FROM consumed) moved
              GROUP BY user_id) per_user;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(user_id), array_agg(delta), count(*) FILTER (WHERE delta <> 0)
        INTO ids, deltas, changes
        FROM (SELECT user_id, -sum(score_delta) AS delta FROM old_events GROUP BY user_id) per_user;
    ELSE
        SELECT array_agg(user_id), array_agg(delta), count(*) FILTER (WHERE delta <> 0)
        INTO ids, deltas, changes
        FROM (SELECT user_id, sum(delta) AS delta
              FROM (SELECT user_id, score_delta::BIGINT AS delta FROM new_events
                    UNION ALL
                    SELECT user_id, -score_delta FROM old_events) moved
              GROUP BY user_id) per_user;
    END IF;
    -- Nothing to do for events that change no score (calibrated ones).
    IF ids IS NOT NULL OR changes > 0 THEN
        PERFORM apply_score_deltas(COALESCE(ids, '{}'), COALESCE(deltas, '{}'), changes);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER moderation_events_scored_insert AFTER INSERT ON moderation_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_scored();
CREATE TRIGGER moderation_events_scored_delete AFTER DELETE ON moderation_events
    REFERENCING OLD TABLE AS old_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_scored();
CREATE TRIGGER moderation_events_scored_update AFTER UPDATE ON moderation_events
    REFERENCING OLD TABLE AS old_events NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_scored();

-- TRUNCATE fires no row triggers and would leave every score without its
-- events: refused (DELETE keeps the scores exact).
CREATE FUNCTION moderation_events_refuse_truncate() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE of moderation_events is refused: loyalty scores are derived from it'
        USING ERRCODE = 'LY002',
              HINT = 'DELETE the events instead (scores follow), or record compensating events';
END $$;
CREATE TRIGGER moderation_events_no_truncate BEFORE TRUNCATE ON moderation_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_refuse_truncate();

-- Records one event and answers with the user's score after it: loyaltyd's
-- own write path, and available to any client that wants the score back in
-- the same round trip. A replayed event id changes nothing and answers with
-- the current score (duplicate = true); an event id reused with another
-- payload is refused (SQLSTATE LY001), as an idempotency key must be.
CREATE FUNCTION record_moderation_event(
    p_user_id BIGINT, p_event_type TEXT, p_content_type TEXT, p_content_id TEXT,
    p_outcome TEXT, p_event_id TEXT DEFAULT NULL,
    OUT loyalty_score BIGINT, OUT score_version BIGINT, OUT score_delta INTEGER, OUT duplicate BOOLEAN,
    OUT created_us BIGINT)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    seen moderation_events%ROWTYPE;
BEGIN
    INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome, event_id)
    VALUES (p_user_id, p_event_type, p_content_type, p_content_id, p_outcome, p_event_id)
    ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING
    RETURNING moderation_events.score_delta INTO score_delta;
    duplicate := NOT FOUND;
    IF duplicate THEN
        -- A new statement: it sees the committed twin (ON CONFLICT waited for it).
        SELECT * INTO seen FROM moderation_events e WHERE e.event_id = p_event_id;
        IF (seen.user_id, seen.event_type, seen.content_type, seen.content_id, seen.outcome)
           IS DISTINCT FROM (p_user_id, p_event_type, p_content_type, p_content_id, p_outcome) THEN
            RAISE EXCEPTION 'event id % already recorded another event (user %, % %, %)',
                    quote_literal(p_event_id), seen.user_id, seen.content_type,
                    quote_literal(seen.content_id), seen.outcome
                USING ERRCODE = 'LY001', HINT = 'use a new event id for a new event';
        END IF;
        score_delta := 0;
    END IF;
    -- created_us: the user's sign-up time, the live board's tie-break.
    SELECT u.loyalty_score, u.score_version, (EXTRACT(EPOCH FROM u.created_at) * 1000000)::BIGINT
    INTO loyalty_score, score_version, created_us
    FROM users u WHERE u.id = p_user_id;
END $$;

-- Many events in one statement (bulk ingestion): the trigger updates each
-- user once; answers with every touched user's score after the batch and
-- how many of the batch's events were new for them.
CREATE FUNCTION record_moderation_events(
    p_user_ids BIGINT[], p_event_types TEXT[], p_content_types TEXT[], p_content_ids TEXT[],
    p_outcomes TEXT[], p_event_ids TEXT[])
    RETURNS TABLE (user_id BIGINT, loyalty_score BIGINT, score_version BIGINT, events BIGINT, created_us BIGINT)
    LANGUAGE plpgsql AS $$
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
    SELECT u.id, u.loyalty_score, u.score_version, c.n, (EXTRACT(EPOCH FROM u.created_at) * 1000000)::BIGINT
    FROM unnest(ids, counts) AS c(id, n) JOIN users u ON u.id = c.id
    ORDER BY u.id;
END $$;

-- Where the daemon's cache sync stands (src/sync.rs): every transaction
-- below `horizon` (the last read's snapshot xmax) that is not `running`
-- (its xip) had ended when the sync last read `users`, and the score changes
-- it committed are in Redis. Starts at this migration's own snapshot.
CREATE TABLE cache_sync_state (
    singleton BOOLEAN     PRIMARY KEY DEFAULT true CONSTRAINT cache_sync_state_singleton CHECK (singleton),
    horizon   xid8        NOT NULL,
    running   xid8[]      NOT NULL,
    synced_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO cache_sync_state (horizon, running)
SELECT pg_snapshot_xmax(pg_current_snapshot()), ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot()));

-- When each job last ran to its end anywhere in the cluster (the refresh,
-- which has no cron ticks, gets a row of its own on its first run): what
-- loyaltyd_job_last_success_timestamp_seconds starts from, so a job that
-- stalls shows up however often daemons restart.
ALTER TABLE job_ticks ADD COLUMN succeeded_at TIMESTAMPTZ;

-- ---------------------------------------------------------------- queues
--
-- `position_in_queue` stays the ordering key of migration 3. What changes is
-- who maintains the bookkeeping: the triggers below, for every writer.
--  * an INSERT gets its key from the database: MAX + 1 of its scope, read
--    under the scope's row lock (queue_scopes), so it lands at the tail and
--    adds commit in key order. Any key the writer gives is replaced: the
--    tail is what the seed's MAX + 1 meant, and a writer cannot jump the
--    queue;
--  * an INSERT or DELETE counts the item in or out of its block
--    (queue_blocks), in the writer's transaction; an UPDATE that changes a
--    key or a scope moves the counts (one statement trigger: a reorder moves
--    every key of a scope at once);
--  * an UPDATE that moves an item to another scope gives it the new scope's
--    tail; an UPDATE of a key is kept as written (loyaltyd's reorder, an
--    operator's fix) and counted.
-- Rows that ON CONFLICT skipped fire no AFTER trigger: they are not counted.
--
-- Why row triggers here and a statement trigger for events: measured with
-- pgbench at 100,000 items, an add and a remove cost 0.37 + 0.30 ms with row
-- triggers, 0.42 + 0.37 ms with statement triggers (the transition tables
-- cost more than the one block row they update), against 0.33 + 0.33 ms for
-- the old one-statement CTEs. A scope's length is the sum of its blocks'
-- counts (n/512 rows): a per-scope counter would be one hot row updated by
-- every item of a bulk INSERT, whose versions a transaction cannot prune.

ALTER TABLE queue_scopes DROP COLUMN last_key, DROP COLUMN item_count;

-- Every add and remove updates a block row: with room left on each page the
-- new versions stay on their page (HOT), so a scope's block rows stay
-- together and a position's sum over them reads a few pages, not one page
-- per block (measured: 196 blocks of a 100,000-item scope had spread over
-- 196 pages).
ALTER TABLE queue_blocks SET (fillfactor = 50);
ALTER TABLE queue_scopes SET (fillfactor = 50);

-- BEFORE INSERT (and BEFORE UPDATE of the scope column), each row: the
-- scope's lock, then the tail key.
CREATE FUNCTION queue_item_keyed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    q CONSTANT TEXT := TG_ARGV[0];
    s TEXT := '';
    flagged BOOLEAN;
BEGIN
    IF q = 'post' THEN
        s := NEW.topic_id;
    ELSIF q = 'message' THEN
        s := NEW.conversation_id;
    END IF;
    -- The scope's row lock: every add takes it before it reads the tail key
    -- (and every reorder takes it too). The first add creates the scope; the
    -- first add after a reorder flags it for the next one. (A plain SELECT
    -- FOR UPDATE first: most adds find their scope, and it costs less than
    -- an upsert's speculative insertion.)
    SELECT sc.needs_reorder INTO flagged FROM queue_scopes sc
    WHERE sc.queue = q AND sc.scope = s FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO queue_scopes AS sc (queue, scope, needs_reorder) VALUES (q, s, true)
        ON CONFLICT (queue, scope) DO UPDATE SET needs_reorder = true;
    ELSIF NOT flagged THEN
        UPDATE queue_scopes SET needs_reorder = true WHERE queue = q AND scope = s;
    END IF;
    -- An UPDATE gets here only for a move to another scope (the trigger's
    -- WHEN); a key given with the move is kept, and counted.
    IF TG_OP = 'UPDATE' AND NEW.position_in_queue IS DISTINCT FROM OLD.position_in_queue THEN
        RETURN NEW;
    END IF;
    -- A statement of its own, after the lock: its snapshot sees the items
    -- committed by the lock's previous holders, and the rows this statement
    -- inserted before this one.
    IF q = 'topic' THEN
        SELECT COALESCE(max(position_in_queue), 0) + 1 INTO NEW.position_in_queue
        FROM topic_creation_queue;
    ELSIF q = 'post' THEN
        SELECT COALESCE(max(position_in_queue), 0) + 1 INTO NEW.position_in_queue
        FROM post_moderation_queue WHERE topic_id = s;
    ELSE
        SELECT COALESCE(max(position_in_queue), 0) + 1 INTO NEW.position_in_queue
        FROM private_message_queue WHERE conversation_id = s;
    END IF;
    RETURN NEW;
END $$;

-- AFTER INSERT or DELETE, each row: the item's block count. An added item's
-- block may be new (an upsert); a removed item's block exists (its items
-- did), and the UPDATE re-reads the latest version of the row after waiting
-- for its lock.
CREATE FUNCTION queue_item_counted() RETURNS trigger
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
        UPDATE queue_blocks SET item_count = item_count - 1
        WHERE queue = q AND scope = s AND block = queue_block(OLD.position_in_queue);
    END IF;
    RETURN NULL;
END $$;

-- AFTER UPDATE, each statement: items whose key or scope changed leave their
-- old block and join their new one; only each block's net change is written
-- (a priority change writes nothing).
CREATE FUNCTION queue_items_moved() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    q CONSTANT TEXT := TG_ARGV[0];
    scopes TEXT[];
    blocks BIGINT[];
    deltas BIGINT[];
BEGIN
    IF q = 'topic' THEN
        SELECT array_agg(''::TEXT), array_agg(b), array_agg(n) INTO scopes, blocks, deltas
        FROM (SELECT b, sum(n) AS n
              FROM (SELECT queue_block(position_in_queue) AS b, 1 AS n FROM new_items
                    UNION ALL SELECT queue_block(position_in_queue), -1 FROM old_items) m
              GROUP BY b HAVING sum(n) <> 0) net;
    ELSIF q = 'post' THEN
        SELECT array_agg(sc), array_agg(b), array_agg(n) INTO scopes, blocks, deltas
        FROM (SELECT sc, b, sum(n) AS n
              FROM (SELECT topic_id AS sc, queue_block(position_in_queue) AS b, 1 AS n FROM new_items
                    UNION ALL SELECT topic_id, queue_block(position_in_queue), -1 FROM old_items) m
              GROUP BY sc, b HAVING sum(n) <> 0) net;
    ELSE
        SELECT array_agg(sc), array_agg(b), array_agg(n) INTO scopes, blocks, deltas
        FROM (SELECT sc, b, sum(n) AS n
              FROM (SELECT conversation_id AS sc, queue_block(position_in_queue) AS b, 1 AS n FROM new_items
                    UNION ALL SELECT conversation_id, queue_block(position_in_queue), -1 FROM old_items) m
              GROUP BY sc, b HAVING sum(n) <> 0) net;
    END IF;
    IF scopes IS NULL THEN
        RETURN NULL;
    END IF;
    -- Blocks that lose exist (their items did); blocks that gain may be new.
    -- (An upsert tests a CHECK on the row it proposes, before any conflict:
    -- losses cannot go through one.)
    UPDATE queue_blocks b SET item_count = b.item_count + m.n
    FROM unnest(scopes, blocks, deltas) AS m(sc, bl, n)
    WHERE m.n < 0 AND b.queue = q AND b.scope = m.sc AND b.block = m.bl;
    INSERT INTO queue_blocks AS b (queue, scope, block, item_count)
    SELECT q, m.sc, m.bl, m.n FROM unnest(scopes, blocks, deltas) AS m(sc, bl, n)
    WHERE m.n > 0 ORDER BY 2, 3
    ON CONFLICT (queue, scope, block) DO UPDATE SET item_count = b.item_count + EXCLUDED.item_count;
    RETURN NULL;
END $$;

-- BEFORE UPDATE of a key, each row, when the writer is not loyaltyd's
-- reorder (`loyaltyd.rekey`): in legacy mode (above) it is the seed's
-- remove, shifting every later key down by one after its DELETE. The DELETE
-- closed the gap already; the shift is kept from moving keys (it could run
-- into the unique key index halfway, row order being the plan's).
-- Otherwise (an operator's fix) the new key stands.
CREATE FUNCTION queue_key_written() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF (SELECT legacy_score_writes FROM loyaltyd_settings) THEN
        NEW.position_in_queue := OLD.position_in_queue;
    END IF;
    RETURN NEW;
END $$;

-- TRUNCATE clears the queue's bookkeeping with it.
CREATE FUNCTION queue_truncated() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    DELETE FROM queue_blocks WHERE queue = TG_ARGV[0];
    DELETE FROM queue_scopes WHERE queue = TG_ARGV[0];
    RETURN NULL;
END $$;

CREATE TRIGGER topic_creation_queue_keyed BEFORE INSERT ON topic_creation_queue
    FOR EACH ROW EXECUTE FUNCTION queue_item_keyed('topic');
CREATE TRIGGER topic_creation_queue_counted AFTER INSERT OR DELETE ON topic_creation_queue
    FOR EACH ROW EXECUTE FUNCTION queue_item_counted('topic');
CREATE TRIGGER topic_creation_queue_moved AFTER UPDATE ON topic_creation_queue
    REFERENCING OLD TABLE AS old_items NEW TABLE AS new_items
    FOR EACH STATEMENT EXECUTE FUNCTION queue_items_moved('topic');
CREATE TRIGGER topic_creation_queue_rekeyed BEFORE UPDATE OF position_in_queue ON topic_creation_queue
    FOR EACH ROW
    WHEN (OLD.position_in_queue IS DISTINCT FROM NEW.position_in_queue
          AND current_setting('loyaltyd.rekey', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION queue_key_written();
CREATE TRIGGER topic_creation_queue_truncated AFTER TRUNCATE ON topic_creation_queue
    FOR EACH STATEMENT EXECUTE FUNCTION queue_truncated('topic');

CREATE TRIGGER post_moderation_queue_keyed BEFORE INSERT ON post_moderation_queue
    FOR EACH ROW EXECUTE FUNCTION queue_item_keyed('post');
CREATE TRIGGER post_moderation_queue_rescoped BEFORE UPDATE OF topic_id ON post_moderation_queue
    FOR EACH ROW WHEN (OLD.topic_id IS DISTINCT FROM NEW.topic_id) EXECUTE FUNCTION queue_item_keyed('post');
CREATE TRIGGER post_moderation_queue_counted AFTER INSERT OR DELETE ON post_moderation_queue
    FOR EACH ROW EXECUTE FUNCTION queue_item_counted('post');
CREATE TRIGGER post_moderation_queue_moved AFTER UPDATE ON post_moderation_queue
    REFERENCING OLD TABLE AS old_items NEW TABLE AS new_items
    FOR EACH STATEMENT EXECUTE FUNCTION queue_items_moved('post');
CREATE TRIGGER post_moderation_queue_rekeyed BEFORE UPDATE OF position_in_queue ON post_moderation_queue
    FOR EACH ROW
    WHEN (OLD.position_in_queue IS DISTINCT FROM NEW.position_in_queue
          AND current_setting('loyaltyd.rekey', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION queue_key_written();
CREATE TRIGGER post_moderation_queue_truncated AFTER TRUNCATE ON post_moderation_queue
    FOR EACH STATEMENT EXECUTE FUNCTION queue_truncated('post');

CREATE TRIGGER private_message_queue_keyed BEFORE INSERT ON private_message_queue
    FOR EACH ROW EXECUTE FUNCTION queue_item_keyed('message');
CREATE TRIGGER private_message_queue_rescoped BEFORE UPDATE OF conversation_id ON private_message_queue
    FOR EACH ROW WHEN (OLD.conversation_id IS DISTINCT FROM NEW.conversation_id) EXECUTE FUNCTION queue_item_keyed('message');
CREATE TRIGGER private_message_queue_counted AFTER INSERT OR DELETE ON private_message_queue
    FOR EACH ROW EXECUTE FUNCTION queue_item_counted('message');
CREATE TRIGGER private_message_queue_moved AFTER UPDATE ON private_message_queue
    REFERENCING OLD TABLE AS old_items NEW TABLE AS new_items
    FOR EACH STATEMENT EXECUTE FUNCTION queue_items_moved('message');
CREATE TRIGGER private_message_queue_rekeyed BEFORE UPDATE OF position_in_queue ON private_message_queue
    FOR EACH ROW
    WHEN (OLD.position_in_queue IS DISTINCT FROM NEW.position_in_queue
          AND current_setting('loyaltyd.rekey', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION queue_key_written();
CREATE TRIGGER private_message_queue_truncated AFTER TRUNCATE ON private_message_queue
    FOR EACH STATEMENT EXECUTE FUNCTION queue_truncated('message');

-- Appends an item at the tail of its scope and answers with its position:
-- loyaltyd's own add. The item is the tail and this transaction holds the
-- scope's lock, so its position is the scope's length.
CREATE FUNCTION queue_add(p_queue TEXT, p_content_id TEXT, p_scope TEXT, p_priority FLOAT8 DEFAULT 0,
                          OUT "position" BIGINT, OUT entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF p_queue = 'topic' THEN
        INSERT INTO topic_creation_queue AS i (topic_id, priority_score) VALUES (p_content_id, p_priority)
        RETURNING i.entered_queue_at INTO entered_queue_at;
    ELSIF p_queue = 'post' THEN
        INSERT INTO post_moderation_queue AS i (post_id, topic_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.entered_queue_at INTO entered_queue_at;
    ELSIF p_queue = 'message' THEN
        INSERT INTO private_message_queue AS i (message_id, conversation_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.entered_queue_at INTO entered_queue_at;
    ELSE
        RAISE EXCEPTION 'unknown queue %', quote_literal(p_queue)
            USING ERRCODE = '22023', HINT = 'queues are topic, post and message';
    END IF;
    SELECT sum(item_count) INTO "position" FROM queue_blocks
    WHERE queue = p_queue AND scope = CASE WHEN p_queue = 'topic' THEN '' ELSE p_scope END;
END $$;

-- ---------------------------------------------------------------- the read API
--
-- SECURITY DEFINER: a forum role with EXECUTE needs no SELECT on the
-- bookkeeping tables. Each is one index lookup or a bounded range.

-- (PL/pgSQL, not SQL functions: a SECURITY DEFINER SQL function is never
-- inlined and is planned again on every call, 0.6 ms for queue_position;
-- PL/pgSQL keeps its plans for the session.)

-- An item's exact, dense, 1-based position: the counts of the blocks before
-- the item's block plus its rank inside its block (see migration 3).
CREATE FUNCTION queue_position(p_queue TEXT, p_content_id TEXT)
    RETURNS TABLE (scope TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
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
    ELSIF p_queue = 'message' THEN
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

-- The first `p_limit` items of a scope ('' for the topic queue), in order.
CREATE FUNCTION queue_head(p_queue TEXT, p_scope TEXT, p_limit INTEGER DEFAULT 100)
    RETURNS TABLE (content_id TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
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

-- How many items a scope holds ('' for the topic queue): the sum of its
-- blocks' counts.
CREATE FUNCTION queue_length(p_queue TEXT, p_scope TEXT) RETURNS BIGINT
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    RETURN (SELECT COALESCE(sum(b.item_count), 0)::BIGINT FROM queue_blocks b
            WHERE b.queue = p_queue AND b.scope = p_scope);
END $$;

-- A user's score, and their rank and topic right on the leaderboard view as
-- last refreshed (rank NULL when not on it). No row for an unknown user.
CREATE FUNCTION loyalty_standing(p_user_id BIGINT)
    RETURNS TABLE (user_id BIGINT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    RETURN QUERY
    SELECT u.id, u.loyalty_score, l.rank, COALESCE(l.can_create_topics, false)
    FROM users u LEFT JOIN user_leaderboard l ON l.user_id = u.id
    WHERE u.id = p_user_id;
END $$;

-- A page of the leaderboard view: `p_limit` entries after `p_offset` ranks.
CREATE FUNCTION leaderboard_page(p_limit INTEGER DEFAULT 100, p_offset BIGINT DEFAULT 0)
    RETURNS TABLE (user_id BIGINT, username TEXT, loyalty_score BIGINT, rank BIGINT, can_create_topics BOOLEAN)
    LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    -- Ranks are dense 1..n: "rank > offset" skips without reading the skipped rows.
    RETURN QUERY
    SELECT l.user_id, l.username, l.loyalty_score, l.rank, l.can_create_topics
    FROM user_leaderboard l WHERE l.rank > p_offset ORDER BY l.rank LIMIT p_limit;
END $$;

-- ---------------------------------------------------------------- privileges

-- Grants a forum's own role exactly what the contract needs (SPEC §10):
-- INSERT and SELECT on moderation_events (and its id sequence), INSERT,
-- DELETE and SELECT on the queue tables, EXECUTE on the read API and on the
-- two write functions (which do nothing an INSERT could not). Scores,
-- versions, pending counts, keys and blocks are written by the triggers on
-- the role's behalf; it gets no UPDATE anywhere.
CREATE FUNCTION grant_forum_access(role_name NAME) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT ON moderation_events TO %I', role_name);
    EXECUTE format('GRANT USAGE ON SEQUENCE moderation_events_id_seq TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON topic_creation_queue, post_moderation_queue, private_message_queue TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION queue_position(TEXT, TEXT), queue_head(TEXT, TEXT, INTEGER),
                    queue_length(TEXT, TEXT), loyalty_standing(BIGINT), leaderboard_page(INTEGER, BIGINT),
                    record_moderation_event(BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT),
                    record_moderation_events(BIGINT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[]),
                    queue_add(TEXT, TEXT, TEXT, FLOAT8) TO %I', role_name);
END $$;

-- Nothing is executable by PUBLIC but what grant_forum_access hands out.
REVOKE EXECUTE ON FUNCTION
    apply_score_deltas(BIGINT[], BIGINT[], BIGINT), queue_position(TEXT, TEXT),
    queue_head(TEXT, TEXT, INTEGER), queue_length(TEXT, TEXT), loyalty_standing(BIGINT),
    leaderboard_page(INTEGER, BIGINT), record_moderation_event(BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT),
    record_moderation_events(BIGINT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[]),
    queue_add(TEXT, TEXT, TEXT, FLOAT8), grant_forum_access(NAME)
    FROM PUBLIC;

-- A pinned search_path on every function a client can reach (directly or
-- through a trigger), as PostgreSQL's "Writing SECURITY DEFINER Functions
-- Safely" prescribes: the schema they were created in, then pg_temp last,
-- so no role can plant a same-named table or function ahead of ours. The
-- helper they call (apply_score_deltas) runs under the
-- caller's pinned path and skips the per-call cost of setting it.
DO $$
DECLARE
    f REGPROCEDURE;
BEGIN
    FOR f IN
        SELECT p.oid::REGPROCEDURE FROM pg_proc p
        WHERE p.pronamespace = current_schema()::REGNAMESPACE
          AND p.proname IN ('moderation_events_scored', 'moderation_events_refuse_truncate',
                            'users_score_written', 'queue_key_written',
                            'record_moderation_event', 'record_moderation_events',
                            'queue_item_keyed', 'queue_item_counted', 'queue_items_moved', 'queue_truncated',
                            'queue_add', 'queue_position', 'queue_head', 'queue_length', 'loyalty_standing',
                            'leaderboard_page', 'grant_forum_access')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;
