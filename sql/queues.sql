-- The three moderation queues: exact, dense, 1-based positions at any
-- length, for every writer (SPEC §4, §10, §14).
--
-- `position_in_queue` is each item's ordering key, not its position: keys
-- come from one sequence and only grow, so an add never moves anyone and a
-- remove leaves a gap instead of rewriting every later row (the seed's O(n)
-- remove). A position is the item's rank among the keys of its scope
-- (global for topics, per topic for posts, per conversation for messages),
-- computed from counters:
--  * an INSERT or DELETE appends a row to queue_changes (an insert of a row
--    no one else can see or lock: never a wait) instead of updating a
--    counter; an UPDATE that moves keys or scopes appends one row per block;
--  * the counters (queue_blocks of 128 keys, queue_superblocks of 32 blocks,
--    each scope's pace in queue_scopes) are written only by the fold, which
--    moves committed changes into them under a per-scope advisory lock it
--    only tries (pg_try_advisory_xact_lock): nothing that holds a fold lock
--    ever waits for one, so no lock cycle can form, and conflicts at
--    REPEATABLE READ and SERIALIZABLE surface as 40001, never 23505;
--  * positions and lengths add the changes not folded yet: exact whoever
--    folds and whenever. The daemon folds every queue on its backlog check
--    (10 s), and one write in 32 at READ COMMITTED folds its own scope, so
--    a forum without the daemon keeps the unfolded rows few.
-- A position reads at most n / 4,096 + 31 counter rows and 128 index
-- entries for a scope of n items (drained blocks are deleted by the fold).
-- The price: an item whose transaction commits after a later add's has the
-- earlier key, so the later item's position grows by one at that commit
-- (positions stay exact and dense at every moment; the order is the order
-- of the INSERTs, not of the commits).
--
-- The queues' tables, item columns and scope columns are named once, in
-- queue_tables() below: the triggers of each table are made from it, and
-- the trigger functions read the scope column it names. The read and add
-- functions keep a static branch per queue: PL/pgSQL caches a static
-- statement's plan, and a forum's own column types (adopt keeps INTEGER
-- keys) keep their indexes usable.

-- ---------------------------------------------------------------- the mapping

-- Each queue's table, item column and scope column ('' scope: one global
-- scope). src/types.rs's QueueKind is tested against it.
CREATE OR REPLACE FUNCTION queue_tables()
    RETURNS TABLE (queue TEXT, table_name REGCLASS, item_column NAME, scope_column NAME)
    LANGUAGE sql STABLE AS $$
        VALUES ('topic', 'topic_creation_queue'::REGCLASS, 'topic_id'::NAME, NULL::NAME),
               ('post', 'post_moderation_queue'::REGCLASS, 'post_id', 'topic_id'),
               ('message', 'private_message_queue'::REGCLASS, 'message_id', 'conversation_id')
    $$;

-- ---------------------------------------------------------------- keys and blocks

-- Blocks of 128 keys, superblocks of 32 blocks: the sizes live here, and in
-- the `>> 5` by which queue_position goes from a block to its superblock.
CREATE OR REPLACE FUNCTION queue_block(key BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN key >> 7;
CREATE OR REPLACE FUNCTION queue_block_first_key(block BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN block << 7;
CREATE OR REPLACE FUNCTION queue_superblock(key BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN queue_block(key) >> 5;

-- ---------------------------------------------------------------- the writers' triggers

-- BEFORE INSERT, and BEFORE UPDATE of the scope column (a move to another
-- scope puts the item at that scope's tail), each row: the next key. A key
-- the writer gives is replaced (the tail is what the seed's MAX + 1 meant,
-- and a writer cannot jump the queue); a move that gives a key keeps it (an
-- operator's fix). An INSERT's NULL priority or entry time is the column's
-- default, as if left out (what an ORM sends for an attribute it was not
-- given).
CREATE OR REPLACE FUNCTION queue_item_keyed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.position_in_queue IS DISTINCT FROM OLD.position_in_queue THEN
        RETURN NEW;
    END IF;
    NEW.position_in_queue := nextval('queue_item_keys');
    IF TG_OP = 'INSERT' THEN
        NEW.priority_score := COALESCE(NEW.priority_score, 0);
        NEW.entered_queue_at := COALESCE(NEW.entered_queue_at, now());
    END IF;
    RETURN NEW;
END $$;

-- AFTER INSERT or DELETE, each row: one change row. Arguments: the queue,
-- and its scope column (none for the topic queue). One write in 32 at READ
-- COMMITTED then folds its scope, at most once per statement: a bulk INSERT
-- folds once, not one row in 32 times over; a transaction of many
-- single-row statements still folds as it goes, so its own reads do not sum
-- a growing tail of its changes. (Not at REPEATABLE READ or SERIALIZABLE:
-- there a fold could meet rows a concurrent fold deleted after the
-- snapshot, and the forum's transaction would fail for loyaltyd's sake.)
CREATE OR REPLACE FUNCTION queue_item_counted() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    q CONSTANT TEXT := TG_ARGV[0];
    item RECORD;
    s TEXT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        item := NEW;
    ELSE
        item := OLD;
    END IF;
    IF item.position_in_queue IS NULL THEN
        -- An item the original design left without a key (adopt keys or
        -- quarantines it) was never counted.
        RETURN NULL;
    END IF;
    s := COALESCE(to_jsonb(item) ->> TG_ARGV[1], '');
    INSERT INTO queue_changes (queue, scope, key, kind)
    VALUES (q, s, item.position_in_queue, CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END);
    IF random() < 0.03125 AND current_setting('transaction_isolation') = 'read committed'
       AND current_setting('loyaltyd.folded', true) IS DISTINCT FROM statement_timestamp()::TEXT THEN
        PERFORM set_config('loyaltyd.folded', statement_timestamp()::TEXT, true);
        PERFORM queue_fold(q, s);
    END IF;
    RETURN NULL;
END $$;

-- AFTER UPDATE, each statement: items whose key or scope changed move out
-- of where they were and into where they are, one change row per block (a
-- priority change writes nothing). Compared as multisets of (scope, key): a
-- row that kept both is in both and cancels out. Moves in by loyaltyd's
-- reorder (`loyaltyd.rekey`) are kind 3, which does not flag the scope for
-- the next reorder.
CREATE OR REPLACE FUNCTION queue_items_moved() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    q CONSTANT TEXT := TG_ARGV[0];
    moved_in CONSTANT SMALLINT := CASE WHEN current_setting('loyaltyd.rekey', true) = 'on' THEN 3::SMALLINT ELSE 2::SMALLINT END;
BEGIN
    -- (An item without a key, as the original design may leave one, is in
    -- no block.)
    WITH o AS (SELECT COALESCE(to_jsonb(r) ->> TG_ARGV[1], '') AS s, r.position_in_queue::BIGINT AS k FROM old_items r
               WHERE r.position_in_queue IS NOT NULL),
         n AS (SELECT COALESCE(to_jsonb(r) ->> TG_ARGV[1], '') AS s, r.position_in_queue::BIGINT AS k FROM new_items r
               WHERE r.position_in_queue IS NOT NULL),
         moves AS (SELECT x.s, x.k, -2::SMALLINT AS kind FROM (SELECT * FROM o EXCEPT ALL SELECT * FROM n) x
                   UNION ALL
                   SELECT x.s, x.k, moved_in FROM (SELECT * FROM n EXCEPT ALL SELECT * FROM o) x)
    INSERT INTO queue_changes (queue, scope, key, kind, n)
    SELECT q, m.s, queue_block_first_key(queue_block(m.k)), m.kind, count(*)
    FROM moves m GROUP BY m.s, queue_block(m.k), m.kind;
    RETURN NULL;
END $$;

-- BEFORE UPDATE of a key, each row, when the writer is not loyaltyd's
-- reorder (which marks its transaction `loyaltyd.rekey`): in legacy mode it
-- is the original design's remove shifting every later key down after its
-- DELETE, which the DELETE's gap-closing made unnecessary, so the keys
-- stay; otherwise it is refused whole (it would move items past each other,
-- and could run into the unique key halfway).
CREATE OR REPLACE FUNCTION queue_key_written() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
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

-- TRUNCATE clears the queue's bookkeeping with it. Argument: the queue.
CREATE OR REPLACE FUNCTION queue_truncated() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM queue_changes WHERE queue = TG_ARGV[0];
    DELETE FROM queue_blocks WHERE queue = TG_ARGV[0];
    DELETE FROM queue_superblocks WHERE queue = TG_ARGV[0];
    DELETE FROM queue_scopes WHERE queue = TG_ARGV[0];
    RETURN NULL;
END $$;

-- Each queue table's triggers, the same for the three: named after the
-- table, their arguments the queue and its scope column (queue_tables()).
DO $$
DECLARE
    q RECORD;
    args TEXT;
BEGIN
    FOR q IN SELECT t.queue, t.table_name::TEXT AS tbl, t.scope_column FROM queue_tables() t LOOP
        args := quote_literal(q.queue) || COALESCE(', ' || quote_literal(q.scope_column), '');
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_keyed BEFORE INSERT ON %1$s
                            FOR EACH ROW EXECUTE FUNCTION queue_item_keyed()', q.tbl);
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_counted AFTER INSERT OR DELETE ON %1$s
                            FOR EACH ROW EXECUTE FUNCTION queue_item_counted(%2$s)', q.tbl, args);
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_moved AFTER UPDATE ON %1$s
                            REFERENCING OLD TABLE AS old_items NEW TABLE AS new_items
                            FOR EACH STATEMENT EXECUTE FUNCTION queue_items_moved(%2$s)', q.tbl, args);
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_rekeyed BEFORE UPDATE OF position_in_queue ON %1$s
                            FOR EACH ROW
                            WHEN (OLD.position_in_queue IS DISTINCT FROM NEW.position_in_queue
                                  AND current_setting(''loyaltyd.rekey'', true) IS DISTINCT FROM ''on'')
                            EXECUTE FUNCTION queue_key_written()', q.tbl);
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_truncated AFTER TRUNCATE ON %1$s
                            FOR EACH STATEMENT EXECUTE FUNCTION queue_truncated(%2$L)', q.tbl, q.queue);
        -- A move to another scope puts the item at that scope's tail.
        IF q.scope_column IS NOT NULL THEN
            EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_rescoped BEFORE UPDATE OF %2$I ON %1$s
                                FOR EACH ROW WHEN (OLD.%2$I IS DISTINCT FROM NEW.%2$I)
                                EXECUTE FUNCTION queue_item_keyed()', q.tbl, q.scope_column);
        END IF;
    END LOOP;
END $$;

-- ---------------------------------------------------------------- the fold

-- The fold lock of a scope: a transaction advisory lock in a key space of
-- its own (two int4 keys; loyaltyd's job locks are bigint keys, src/locks.rs).
CREATE OR REPLACE FUNCTION queue_fold_lock(p_queue TEXT, p_scope TEXT) RETURNS BOOLEAN
    LANGUAGE sql VOLATILE
    RETURN pg_try_advisory_xact_lock(1280921926, hashtext(p_queue || '/' || p_scope));

-- Moves the committed changes of the queue's scopes (one scope, or up to
-- `max_scopes` of them) into the counters, each scope only if its fold lock
-- is free at once; answers how many changes it moved. Runs in the caller's
-- transaction: readers see the changes or the counters, never both, never
-- neither. (The caller's own uncommitted changes are folded too: they land
-- or roll back with it.)
CREATE OR REPLACE FUNCTION queue_fold(p_queue TEXT, p_scope TEXT DEFAULT NULL, max_scopes INTEGER DEFAULT 1000)
    RETURNS BIGINT
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
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
            RETURN 0::BIGINT;
        END IF;
        scopes := ARRAY[p_scope];
    ELSE
        SELECT array_agg(x.scope) INTO scopes
        FROM (SELECT DISTINCT c.scope FROM queue_changes c WHERE c.queue = p_queue LIMIT max_scopes) x
        WHERE queue_fold_lock(p_queue, x.scope);
        IF scopes IS NULL THEN
            RETURN 0::BIGINT;
        END IF;
    END IF;
    WITH taken AS (
        DELETE FROM queue_changes c WHERE c.queue = p_queue AND c.scope = ANY(scopes)
        RETURNING c.scope, c.key, c.kind, c.n, c.at
    )
    SELECT array_agg(taken.scope), array_agg(taken.key), array_agg(taken.kind), array_agg(taken.n), array_agg(taken.at)
    INTO t_scope, t_key, t_kind, t_n, t_at FROM taken;
    IF t_scope IS NULL THEN
        RETURN 0::BIGINT;
    END IF;
    -- Blocks, then superblocks: existing ones change (a loss only ever
    -- meets an existing row: a removed item was counted, or its add is in
    -- this fold too), new ones are inserted, drained ones deleted. The
    -- scope's counters have no other writer (the lock), so none of it waits.
    PERFORM queue_fold_counts(p_queue, scopes, t_scope, ARRAY(SELECT queue_block(k) FROM unnest(t_key) AS k),
                              t_kind, t_n, false);
    PERFORM queue_fold_counts(p_queue, scopes, t_scope, ARRAY(SELECT queue_superblock(k) FROM unnest(t_key) AS k),
                              t_kind, t_n, true);
    -- Each scope: its removals added to its decayed count (one a
    -- transaction at most: its removals share a time; decayed to the latest
    -- removal's time: removals' times arrive in any order), and a reorder
    -- flag when something was added or moved in by others.
    INSERT INTO queue_scopes AS s (queue, scope, needs_reorder, removed_decayed, removed_at, pace_since)
    SELECT p_queue, t.scope, bool_or(t.kind IN (1, 2)),
           COALESCE(sum(exp(-GREATEST(date_part('epoch', t.last - t.sec), 0) / tau))
                        FILTER (WHERE t.kind = -1 AND t.nth = 1), 0),
           max(t.last), min(t.sec) FILTER (WHERE t.kind = -1)
    FROM (SELECT x.scope, x.kind, x.at AS sec,
                 row_number() OVER (PARTITION BY x.scope, x.kind, x.at) AS nth,
                 max(x.at) FILTER (WHERE x.kind = -1) OVER (PARTITION BY x.scope) AS last
          FROM unnest(t_scope, t_kind, t_at) AS x(scope, kind, at)
          -- (A transaction's removals split across two folds: the second
          -- finds its time already counted.)
          WHERE x.kind <> -1 OR x.at IS DISTINCT FROM (SELECT sc.removed_at FROM queue_scopes sc
                                                      WHERE sc.queue = p_queue AND sc.scope = x.scope)) t
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
    RETURN (SELECT sum(x) FROM unnest(t_n) AS x)::BIGINT;
END $$;

-- The fold's net change of each counter (a block, or with `super` a
-- superblock) of the changes taken: added to the existing rows, inserted
-- where there are none, drained rows deleted.
CREATE OR REPLACE FUNCTION queue_fold_counts(p_queue TEXT, scopes TEXT[], t_scope TEXT[], t_counter BIGINT[],
                                             t_kind SMALLINT[], t_n INTEGER[], super BOOLEAN) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    c_scope TEXT[];
    c_counter BIGINT[];
    c_n BIGINT[];
BEGIN
    SELECT array_agg(t.scope), array_agg(t.counter), array_agg(t.n) INTO c_scope, c_counter, c_n
    FROM (SELECT x.scope, x.counter, sum(CASE WHEN x.kind > 0 THEN x.n ELSE -x.n END)::BIGINT AS n
          FROM unnest(t_scope, t_counter, t_kind, t_n) AS x(scope, counter, kind, n)
          GROUP BY 1, 2 HAVING sum(CASE WHEN x.kind > 0 THEN x.n ELSE -x.n END) <> 0) t;
    IF c_scope IS NULL THEN
        RETURN;
    END IF;
    IF super THEN
        WITH net AS (SELECT * FROM unnest(c_scope, c_counter, c_n) AS x(scope, counter, n)),
             changed AS (
                 UPDATE queue_superblocks b SET item_count = b.item_count + net.n
                 FROM net WHERE b.queue = p_queue AND b.scope = net.scope AND b.superblock = net.counter
                 RETURNING b.scope, b.superblock AS counter)
        INSERT INTO queue_superblocks (queue, scope, superblock, item_count)
        SELECT p_queue, net.scope, net.counter, net.n FROM net
        WHERE NOT EXISTS (SELECT 1 FROM changed c WHERE c.scope = net.scope AND c.counter = net.counter);
        DELETE FROM queue_superblocks b WHERE b.queue = p_queue AND b.scope = ANY(scopes) AND b.item_count = 0;
    ELSE
        WITH net AS (SELECT * FROM unnest(c_scope, c_counter, c_n) AS x(scope, counter, n)),
             changed AS (
                 UPDATE queue_blocks b SET item_count = b.item_count + net.n
                 FROM net WHERE b.queue = p_queue AND b.scope = net.scope AND b.block = net.counter
                 RETURNING b.scope, b.block AS counter)
        INSERT INTO queue_blocks (queue, scope, block, item_count)
        SELECT p_queue, net.scope, net.counter, net.n FROM net
        WHERE NOT EXISTS (SELECT 1 FROM changed c WHERE c.scope = net.scope AND c.counter = net.counter);
        DELETE FROM queue_blocks b WHERE b.queue = p_queue AND b.scope = ANY(scopes) AND b.item_count = 0;
    END IF;
END $$;

-- A queue's counters counted again from its items (the truth), its changes
-- dropped (the count has them), and the key sequence moved above its keys:
-- what `loyaltyd adopt` does after moving the original's data. The queue's
-- table is locked against writers meanwhile (readers go on): a write
-- between the statements would be counted twice or not at all.
CREATE OR REPLACE FUNCTION queue_recount(p_queue TEXT) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    q RECORD;
BEGIN
    PERFORM loyaltyd_check_queue(p_queue);
    SELECT * INTO q FROM queue_tables() t WHERE t.queue = p_queue;
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', q.table_name);
    DELETE FROM queue_changes WHERE queue = p_queue;
    DELETE FROM queue_blocks WHERE queue = p_queue;
    DELETE FROM queue_superblocks WHERE queue = p_queue;
    EXECUTE format('INSERT INTO queue_blocks (queue, scope, block, item_count)
                    SELECT $1, %s, queue_block(position_in_queue), count(*) FROM %s GROUP BY 2, 3',
                   COALESCE(quote_ident(q.scope_column) || '::TEXT', ''''''), q.table_name)
        USING p_queue;
    INSERT INTO queue_superblocks (queue, scope, superblock, item_count)
    SELECT p_queue, b.scope, b.block >> 5, sum(b.item_count) FROM queue_blocks b WHERE b.queue = p_queue GROUP BY 2, 3;
    INSERT INTO queue_scopes (queue, scope, needs_reorder)
    SELECT DISTINCT p_queue, b.scope, true FROM queue_blocks b WHERE b.queue = p_queue
    ON CONFLICT (queue, scope) DO NOTHING;
    -- Keys above the highest block counted (the block's last key).
    PERFORM setval('queue_item_keys',
                   GREATEST((SELECT COALESCE(max(b.block), 0) + 1 FROM queue_blocks b WHERE b.queue = p_queue) << 7,
                            nextval('queue_item_keys')), false);
END $$;

-- ---------------------------------------------------------------- pace and waits

-- A scope's pace is a decayed count of its removals (time constant
-- queue_pace_window(), one hour), when it was last decayed, and since when
-- the scope has seen removals: its removal rate is the decayed count over
-- the decayed length of the time observed, and an item's expected wait is
-- its position times the time per item at that rate. Below
-- queue_pace_min_items() decayed removals the answer is "unknown", never a
-- guess. (A log of removals would cost a row per remove, and a daemon's
-- samples would need the daemon running for the SQL API to answer; the
-- decayed count needs neither, and is exact for whichever writer removes.)
--
-- Two bounds keep it a moderators' pace: one transaction teaches it at most
-- one removal (its removals share a time: a purge of forty spam items in
-- one statement is not forty decisions), and the time since the last
-- removal is a floor under the time per item (moderators who stopped make
-- the estimate grow as the wait does, where the decayed rate alone would
-- take an hour to notice).
CREATE OR REPLACE FUNCTION queue_pace_window() RETURNS FLOAT8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 3600;
CREATE OR REPLACE FUNCTION queue_pace_min_items() RETURNS FLOAT8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 3;

-- The removals of a queue's scopes (one scope, or all with NULL) decayed to
-- now, per scope: the folded counts, and the changes not folded yet (one a
-- transaction at most); when each scope's removals began, and its last one.
CREATE OR REPLACE FUNCTION queue_removals(p_queue TEXT, p_scope TEXT)
    RETURNS TABLE (scope TEXT, seen FLOAT8, since TIMESTAMPTZ, last TIMESTAMPTZ)
    LANGUAGE sql STABLE AS $$
        SELECT u.scope, sum(u.d), min(u.first), max(u.last)
        FROM (SELECT sc.scope,
                     sc.removed_decayed * exp(-GREATEST(date_part('epoch', now() - sc.removed_at), 0) / queue_pace_window()) AS d,
                     sc.pace_since AS first, sc.removed_at AS last
              FROM queue_scopes sc
              WHERE sc.queue = p_queue AND (p_scope IS NULL OR sc.scope = p_scope) AND sc.removed_at IS NOT NULL
              UNION ALL
              SELECT x.scope, exp(-GREATEST(date_part('epoch', now() - x.sec), 0) / queue_pace_window()), x.sec, x.sec
              FROM (SELECT DISTINCT c.scope, c.at AS sec FROM queue_changes c
                    WHERE c.queue = p_queue AND (p_scope IS NULL OR c.scope = p_scope) AND c.kind = -1
                      -- (The rest of a transaction a fold counted already.)
                      AND c.at IS DISTINCT FROM (SELECT sc.removed_at FROM queue_scopes sc
                                                 WHERE sc.queue = c.queue AND sc.scope = c.scope)) x) u
        GROUP BY u.scope
    $$;

-- The pace of a scope ('' for the topic queue): seconds per removed item,
-- the (decayed) window and removals it rests on, and its source: 'scope',
-- or 'queue' when the scope itself has too little history (a new or quiet
-- topic: the queue's removals per active scope), each with '_idle' when the
-- time since the last removal is the floor (moderators stopped); all NULL
-- when neither has enough.
CREATE OR REPLACE FUNCTION queue_pace(p_queue TEXT, p_scope TEXT,
                                      OUT per_item_seconds FLOAT8, OUT window_seconds FLOAT8,
                                      OUT items_seen FLOAT8, OUT source TEXT)
    LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
DECLARE
    tau CONSTANT FLOAT8 := queue_pace_window();
    since TIMESTAMPTZ;
    last TIMESTAMPTZ;
    scopes BIGINT;
BEGIN
    SELECT r.seen, r.since, r.last INTO items_seen, since, last FROM queue_removals(p_queue, p_scope) r;
    IF items_seen >= queue_pace_min_items() THEN
        window_seconds := tau * (1 - exp(-GREATEST(date_part('epoch', now() - since), 0) / tau));
        per_item_seconds := window_seconds / items_seen;
        source := 'scope';
    ELSIF p_queue <> 'topic' THEN
        -- The queue's typical pace: its removals per active scope.
        SELECT sum(r.seen), count(*) FILTER (WHERE r.seen >= 1), min(r.since), max(r.last)
        INTO items_seen, scopes, since, last
        FROM queue_removals(p_queue, NULL) r;
        IF items_seen >= queue_pace_min_items() AND scopes > 0 THEN
            window_seconds := tau * (1 - exp(-GREATEST(date_part('epoch', now() - since), 0) / tau));
            per_item_seconds := window_seconds * scopes / items_seen;
            source := 'queue';
        END IF;
    END IF;
    IF source IS NULL THEN
        items_seen := NULL;
        RETURN;
    END IF;
    IF date_part('epoch', now() - last) > per_item_seconds THEN
        per_item_seconds := date_part('epoch', now() - last);
        source := source || '_idle';
    END IF;
END $$;

-- ---------------------------------------------------------------- the read API

-- An item's exact, dense, 1-based position and expected wait: the item's
-- row with the count of its block up to it; then the superblocks before its
-- superblock, its superblock's blocks before its block and the changes not
-- yet folded before its block (index range reads, bounded by the items
-- waiting); then its scope's pace. No row for an item not queued.
CREATE OR REPLACE FUNCTION queue_position(p_queue TEXT, p_content_id TEXT)
    RETURNS TABLE (scope TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ,
                   expected_wait_seconds FLOAT8, wait_source TEXT, wait_window_seconds FLOAT8,
                   wait_items_seen FLOAT8)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_variable
DECLARE
    k BIGINT;
    inside BIGINT;
    blk BIGINT;
    before BIGINT;
    pace RECORD;
BEGIN
    IF p_content_id IS NULL THEN
        RAISE EXCEPTION 'queue_position: content id is NULL' USING ERRCODE = '22023', HINT = 'give the item''s id';
    END IF;
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
    SELECT COALESCE((SELECT sum(x.item_count)::BIGINT FROM queue_superblocks x
                     WHERE x.queue = p_queue AND x.scope = scope AND x.superblock < blk >> 5), 0)
         + COALESCE((SELECT sum(b.item_count) FROM queue_blocks b
                     WHERE b.queue = p_queue AND b.scope = scope AND b.block >= (blk >> 5) << 5 AND b.block < blk), 0)
         + COALESCE((SELECT sum(CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END) FROM queue_changes c
                     WHERE c.queue = p_queue AND c.scope = scope AND c.key < queue_block_first_key(blk)), 0)
    INTO before;
    "position" := before + inside;
    SELECT * INTO pace FROM queue_pace(p_queue, scope);
    expected_wait_seconds := "position" * pace.per_item_seconds;
    wait_source := pace.source;
    wait_window_seconds := pace.window_seconds;
    wait_items_seen := pace.items_seen;
    RETURN NEXT;
END $$;

-- A scope's length ('' for the topic queue): its superblocks and its
-- changes not yet folded.
CREATE OR REPLACE FUNCTION queue_length(p_queue TEXT, p_scope TEXT) RETURNS BIGINT
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
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

-- The first `p_limit` items of a scope ('' for the topic queue), in order,
-- each with its expected wait (one pace for the scope).
CREATE OR REPLACE FUNCTION queue_head(p_queue TEXT, p_scope TEXT, p_limit BIGINT DEFAULT 100)
    RETURNS TABLE (content_id TEXT, "position" BIGINT, priority_score FLOAT8, entered_queue_at TIMESTAMPTZ,
                   expected_wait_seconds FLOAT8, wait_source TEXT, wait_window_seconds FLOAT8,
                   wait_items_seen FLOAT8)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
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
    RETURN QUERY
    SELECT h.id, h.pos, h.priority_score, h.entered_queue_at,
           h.pos * pace.per_item_seconds, pace.source, pace.window_seconds, pace.items_seen
    FROM (SELECT t.id, ROW_NUMBER() OVER (ORDER BY t.k) AS pos, t.priority_score, t.entered_queue_at
          FROM (SELECT q.topic_id::TEXT AS id, q.position_in_queue AS k, q.priority_score::FLOAT8 AS priority_score,
                       q.entered_queue_at::TIMESTAMPTZ AS entered_queue_at
                FROM topic_creation_queue q
                WHERE p_queue = 'topic' AND p_scope = ''
                ORDER BY q.position_in_queue LIMIT p_limit) t
          UNION ALL
          SELECT t.id, ROW_NUMBER() OVER (ORDER BY t.k), t.priority_score, t.entered_queue_at
          FROM (SELECT q.post_id::TEXT AS id, q.position_in_queue AS k, q.priority_score::FLOAT8 AS priority_score,
                       q.entered_queue_at::TIMESTAMPTZ AS entered_queue_at
                FROM post_moderation_queue q
                WHERE p_queue = 'post' AND q.topic_id = p_scope
                ORDER BY q.position_in_queue LIMIT p_limit) t
          UNION ALL
          SELECT t.id, ROW_NUMBER() OVER (ORDER BY t.k), t.priority_score, t.entered_queue_at
          FROM (SELECT q.message_id::TEXT AS id, q.position_in_queue AS k, q.priority_score::FLOAT8 AS priority_score,
                       q.entered_queue_at::TIMESTAMPTZ AS entered_queue_at
                FROM private_message_queue q
                WHERE p_queue = 'message' AND q.conversation_id = p_scope
                ORDER BY q.position_in_queue LIMIT p_limit) t) h
    ORDER BY h.pos;
END $$;

-- Appends an item at the tail of its scope and answers with its position:
-- loyaltyd's own add. Its arguments are checked first (a NULL or an unknown
-- queue is a clear error, not a constraint of a bookkeeping table).
CREATE OR REPLACE FUNCTION queue_add(p_queue TEXT, p_content_id TEXT, p_scope TEXT, p_priority FLOAT8 DEFAULT 0,
                                     OUT "position" BIGINT, OUT entered_queue_at TIMESTAMPTZ)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    k BIGINT;
    s CONSTANT TEXT := CASE WHEN p_queue = 'topic' THEN '' ELSE p_scope END;
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
    -- At the tail: the scope's length (its superblocks and unfolded
    -- changes) less the items behind it (none, unless a later add committed
    -- first), in the statement after the INSERT (which its snapshot sees).
    IF p_queue = 'topic' THEN
        INSERT INTO topic_creation_queue AS i (topic_id, priority_score) VALUES (p_content_id, p_priority)
        RETURNING i.position_in_queue, i.entered_queue_at INTO k, entered_queue_at;
        SELECT count(*) INTO "position" FROM topic_creation_queue j WHERE j.position_in_queue > k;
    ELSIF p_queue = 'post' THEN
        INSERT INTO post_moderation_queue AS i (post_id, topic_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.position_in_queue, i.entered_queue_at INTO k, entered_queue_at;
        SELECT count(*) INTO "position" FROM post_moderation_queue j WHERE j.topic_id = s AND j.position_in_queue > k;
    ELSE
        INSERT INTO private_message_queue AS i (message_id, conversation_id, priority_score) VALUES (p_content_id, p_scope, p_priority)
        RETURNING i.position_in_queue, i.entered_queue_at INTO k, entered_queue_at;
        SELECT count(*) INTO "position" FROM private_message_queue j WHERE j.conversation_id = s AND j.position_in_queue > k;
    END IF;
    "position" := queue_length(p_queue, s) - "position";
END $$;

-- Every queue's items per scope, for the daemon's backlog metrics.
CREATE OR REPLACE FUNCTION queue_scope_lengths() RETURNS TABLE (queue TEXT, scope TEXT, items BIGINT)
    LANGUAGE sql STABLE AS $$
        SELECT u.queue, u.scope, sum(u.n)::BIGINT
        FROM (SELECT x.queue, x.scope, x.item_count AS n FROM queue_superblocks x
              UNION ALL
              SELECT c.queue, c.scope, CASE WHEN c.kind > 0 THEN c.n ELSE -c.n END FROM queue_changes c) u
        GROUP BY u.queue, u.scope
    $$;

-- Every item with its dense position, for SQL consumers (a scan of the
-- queue: for dashboards, not per request; queue_position() reads one).
CREATE OR REPLACE VIEW topic_creation_queue_positions AS
SELECT topic_id,
       ROW_NUMBER() OVER (ORDER BY position_in_queue) AS position,
       priority_score, entered_queue_at
FROM topic_creation_queue;

CREATE OR REPLACE VIEW post_moderation_queue_positions AS
SELECT post_id, topic_id,
       ROW_NUMBER() OVER (PARTITION BY topic_id ORDER BY position_in_queue) AS position,
       priority_score, entered_queue_at
FROM post_moderation_queue;

CREATE OR REPLACE VIEW private_message_queue_positions AS
SELECT message_id, conversation_id,
       ROW_NUMBER() OVER (PARTITION BY conversation_id ORDER BY position_in_queue) AS position,
       priority_score, entered_queue_at
FROM private_message_queue;
