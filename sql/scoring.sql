-- Scores follow moderation_events, whoever writes them (SPEC §4, §10).
--
-- An INSERT (one row, many rows, COPY) adds each event's points to its
-- user's score and counts one pending leaderboard change per event that
-- moves a score; a DELETE takes the points back; an UPDATE moves them (to
-- another user, or by a changed outcome). Rows that ON CONFLICT DO NOTHING
-- skipped are in no transition table: an event-id replay counts once.
--
-- Why these triggers: measured with pgbench on 200,000 users and 4,000,000
-- events (docs/design.md). One event is scored by a row trigger, the
-- cheapest path PostgreSQL has; a statement of many rows once, by a
-- statement trigger over its transition table, each user once and in id
-- order (so multi-row INSERTs in any row order cannot deadlock). The daemon
-- learns of changed scores from `users.score_xid` (src/sync.rs), not from
-- NOTIFY: every notifying transaction takes one database-wide lock from its
-- commit until it ends, which serialized commits.
--
-- Every function a client's statement reaches runs as its owner
-- (SECURITY DEFINER) with a pinned search_path, so the forum's role needs no
-- privilege on `users` or on any bookkeeping table; the helpers they call
-- run under that pinned path and are not executable by PUBLIC
-- (privileges.sql).

-- ---------------------------------------------------------------- the rule

-- The points of one event (SPEC §4): the multiplier (topic 5, otherwise 1)
-- times the outcome's sign (approved +1, rejected -1, calibrated 0). The one
-- home of the scoring rule: the trigger below stores it with every event,
-- `adopt` scores the original design's rows with it, and the CLI and the
-- tests read it from here.
CREATE OR REPLACE FUNCTION event_points(p_content_type TEXT, p_outcome TEXT) RETURNS INTEGER
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (CASE p_outcome WHEN 'approved' THEN 1 WHEN 'rejected' THEN -1 ELSE 0 END)
         * (CASE p_content_type WHEN 'topic' THEN 5 ELSE 1 END);

-- score_delta is a plain column this trigger keeps (not a generated column:
-- adding one to a table that has rows rewrites it under an ACCESS EXCLUSIVE
-- lock, which `adopt` cannot do online). It runs on every INSERT and on
-- every UPDATE of its inputs, so a writer cannot store another value; as
-- its owner, like every trigger a client's statement reaches. An event of
-- a user that does not exist is refused here, saying what to do (the
-- foreign key would say only that a key is missing): the forum signs its
-- users up in `users` first.
CREATE OR REPLACE FUNCTION moderation_events_delta() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NOT EXISTS (SELECT 1 FROM users u WHERE u.id = NEW.user_id) THEN
            RAISE EXCEPTION 'unknown user %: no row in users has this id; insert the user first', NEW.user_id
                USING ERRCODE = '23503', CONSTRAINT = 'moderation_events_user_id_fkey', TABLE = 'moderation_events',
                      COLUMN = 'user_id',
                      HINT = format('sign the user up before recording their events: INSERT INTO users (id, username) VALUES (%s, ''…'')',
                                    NEW.user_id);
        END IF;
        -- A NULL time is the default's, as if left out (an ORM's unset attribute).
        NEW.created_at := COALESCE(NEW.created_at, now());
    END IF;
    NEW.score_delta := event_points(NEW.content_type, NEW.outcome);
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER moderation_events_delta
    BEFORE INSERT OR UPDATE OF outcome, content_type, score_delta ON moderation_events
    FOR EACH ROW EXECUTE FUNCTION moderation_events_delta();

-- ---------------------------------------------------------------- the score write

-- The next version of a user's score: one more than the last, and at least
-- the current time in microseconds. Per user it only grows; and after a
-- restore from a backup (which winds versions back) the next write still
-- outranks any version the cache kept from before the restore.
CREATE OR REPLACE FUNCTION next_score_version(previous BIGINT) RETURNS BIGINT
    LANGUAGE sql VOLATILE PARALLEL SAFE
    RETURN GREATEST(previous + 1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT);

-- Locks the users in id order (two writers of many users must not deadlock:
-- an UPDATE's own locking order is its plan's). Planned for its arguments on
-- every call (EXECUTE): the array is then a constant, and a row a concurrent
-- writer changed meanwhile is rechecked by a hashed lookup. In a function's
-- cached plan the array is a parameter, the recheck scans it, and a locking
-- statement that waited for another writer of its users rechecked each of
-- them against all of them: two concurrent 250,000-event INSERTs over 200,000
-- users took more than ten minutes instead of 15 s.
CREATE OR REPLACE FUNCTION users_lock(ids BIGINT[]) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE 'SELECT count(*) FROM (SELECT FROM users u WHERE u.id = ANY($1) ORDER BY u.id FOR NO KEY UPDATE) l'
        USING ids;
END $$;

-- The one statement that changes scores: adds each user's delta (one entry
-- per user), advancing the score's version (the order in which the cache
-- and the live board take writes) and recording the writing transaction
-- (the cache sync's cursor); then counts `changes` pending leaderboard
-- changes, after locking several users (users_lock). (A generic plan,
-- always: with arrays for arguments PostgreSQL would plan a custom one on
-- every call, a third of an event's cost.)
CREATE OR REPLACE FUNCTION scores_add(ids BIGINT[], deltas BIGINT[], changes BIGINT) RETURNS void
    LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF cardinality(ids) > 1 THEN
        PERFORM users_lock(ids);
    END IF;
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

-- ---------------------------------------------------------------- scoring events

-- New events: per (user, points) pair, `counts` events. While an
-- application of the original design still runs (legacy mode, below) it
-- has changed some of these scores itself: each event consumes one credit
-- of its user and points, if there is one, instead of adding its points
-- again. Credits are consumed under their user's row lock, the lock every
-- credit is written under, so two events cannot race for one credit.
CREATE OR REPLACE FUNCTION score_events(ids BIGINT[], deltas BIGINT[], counts BIGINT[]) RETURNS void
    LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    credited CONSTANT BOOLEAN := EXISTS (SELECT 1 FROM legacy_score_credits c WHERE c.user_id = ANY(ids));
    users_of BIGINT[];
    totals BIGINT[];
BEGIN
    IF credited THEN
        PERFORM users_lock(ids);
    END IF;
    WITH ev AS (
        SELECT e.id AS user_id, e.delta, e.n FROM unnest(ids, deltas, counts) AS e(id, delta, n)
    ), consumed AS (
        DELETE FROM legacy_score_credits c
        WHERE credited AND c.id IN (
            SELECT m.id FROM (
                SELECT lc.id, ev.n,
                       row_number() OVER (PARTITION BY lc.user_id, lc.delta ORDER BY lc.id) AS rn
                FROM legacy_score_credits lc JOIN ev ON ev.user_id = lc.user_id AND ev.delta = lc.delta
            ) m WHERE m.rn <= m.n)
        RETURNING c.user_id, c.delta
    )
    SELECT array_agg(t.user_id), array_agg(t.total) INTO users_of, totals
    FROM (SELECT moved.user_id, sum(moved.delta)::BIGINT AS total
          FROM (SELECT ev.user_id, ev.delta * ev.n AS delta FROM ev
                UNION ALL
                SELECT consumed.user_id, -consumed.delta FROM consumed) moved
          GROUP BY moved.user_id) t;
    PERFORM scores_add(users_of, totals, (SELECT sum(n) FROM unnest(counts) AS n)::BIGINT);
END $$;

-- One event (the common case: a forum records one decision per statement).
-- A statement of several rows is left to the statement trigger below. (The
-- transition table is the only place a row trigger can learn that its
-- statement has other rows; reading two of its rows is a constant cost.)
CREATE OR REPLACE FUNCTION moderation_event_scored() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF (SELECT count(*) FROM (SELECT FROM new_events LIMIT 2) two) > 1 THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM legacy_score_credits c WHERE c.user_id = NEW.user_id) THEN
        PERFORM score_events(ARRAY[NEW.user_id::BIGINT], ARRAY[NEW.score_delta::BIGINT], '{1}');
    ELSE
        PERFORM scores_add(ARRAY[NEW.user_id::BIGINT], ARRAY[NEW.score_delta::BIGINT], 1);
    END IF;
    RETURN NULL;
END $$;

-- A statement of several rows (a multi-row INSERT, COPY, INSERT ... SELECT):
-- one pass over its rows.
CREATE OR REPLACE FUNCTION moderation_events_scored_many() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    ids BIGINT[];
    deltas BIGINT[];
    counts BIGINT[];
BEGIN
    IF (SELECT count(*) FROM (SELECT FROM new_events LIMIT 2) two) < 2 THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(user_id), array_agg(score_delta::BIGINT), array_agg(n)
    INTO ids, deltas, counts
    FROM (SELECT user_id, score_delta, count(*) AS n FROM new_events
          WHERE score_delta <> 0 GROUP BY user_id, score_delta) per_user;
    IF ids IS NOT NULL THEN
        PERFORM score_events(ids, deltas, counts);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER moderation_event_scored AFTER INSERT ON moderation_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH ROW WHEN (NEW.score_delta <> 0) EXECUTE FUNCTION moderation_event_scored();
CREATE OR REPLACE TRIGGER moderation_events_scored_many AFTER INSERT ON moderation_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_scored_many();

-- Events moved, per user: their points added (an event's points negated
-- where it went away), one pending change per user whose score moved. (No
-- legacy credit is consumed: credits wait for an INSERT.)
CREATE OR REPLACE FUNCTION scores_moved(ids BIGINT[], deltas BIGINT[]) RETURNS void
    LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    users_of BIGINT[];
    totals BIGINT[];
BEGIN
    SELECT array_agg(m.id), array_agg(m.total) INTO users_of, totals
    FROM (SELECT d.id, sum(d.delta)::BIGINT AS total FROM unnest(ids, deltas) AS d(id, delta)
          GROUP BY d.id HAVING sum(d.delta) <> 0) m;
    IF users_of IS NOT NULL THEN
        PERFORM scores_add(users_of, totals, cardinality(users_of));
    END IF;
END $$;

-- Deleted events take their points back.
CREATE OR REPLACE FUNCTION moderation_events_unscored() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM scores_moved(ARRAY(SELECT user_id::BIGINT FROM old_events), ARRAY(SELECT -score_delta::BIGINT FROM old_events));
    RETURN NULL;
END $$;

-- Updated events move their points: from the old user to the new one, or
-- by the changed outcome or content type.
CREATE OR REPLACE FUNCTION moderation_events_rescored() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM scores_moved(m.ids, m.deltas)
    FROM (SELECT array_agg(x.id) AS ids, array_agg(x.delta) AS deltas
          FROM (SELECT user_id::BIGINT AS id, score_delta::BIGINT AS delta FROM new_events
                UNION ALL
                SELECT user_id, -score_delta FROM old_events) x) m;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER moderation_events_scored_delete AFTER DELETE ON moderation_events
    REFERENCING OLD TABLE AS old_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_unscored();
CREATE OR REPLACE TRIGGER moderation_events_scored_update AFTER UPDATE ON moderation_events
    REFERENCING OLD TABLE AS old_events NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_rescored();

-- TRUNCATE fires no row triggers and would leave every score without its
-- events: refused (a DELETE keeps the scores exact).
CREATE OR REPLACE FUNCTION moderation_events_refuse_truncate() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE of moderation_events is refused: loyalty scores are derived from it'
        USING ERRCODE = 'LY002',
              HINT = 'DELETE the events instead (scores follow), or record compensating events';
END $$;

CREATE OR REPLACE TRIGGER moderation_events_no_truncate BEFORE TRUNCATE ON moderation_events
    FOR EACH STATEMENT EXECUTE FUNCTION moderation_events_refuse_truncate();

-- ---------------------------------------------------------------- writes of users

-- Any change of a score that did not advance its version itself: a
-- client's UPDATE, an INSERT of a user with a score, a forum's own trigger.
-- loyaltyd's writes (scores_add) always advance score_version; a forum's
-- statement that changes loyalty_score does not, unless it means to keep
-- the bookkeeping itself.
--  * legacy mode (loyaltyd_settings.legacy_score_writes, while an
--    application of the original design still runs): the write stands, gets
--    a new version and its transaction (so the cache and the live board
--    follow), and becomes a credit its user's next event of the same
--    points consumes instead of adding them again (score_events);
--  * otherwise refused: the event that should come with it would count the
--    change twice.
CREATE OR REPLACE FUNCTION users_score_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
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

CREATE OR REPLACE TRIGGER users_score_changed BEFORE UPDATE ON users
    FOR EACH ROW
    WHEN (OLD.loyalty_score IS DISTINCT FROM NEW.loyalty_score AND OLD.score_version = NEW.score_version)
    EXECUTE FUNCTION users_score_changed();
CREATE OR REPLACE TRIGGER users_score_inserted BEFORE INSERT ON users
    FOR EACH ROW
    WHEN (NEW.loyalty_score <> 0 AND NEW.score_version = 0)
    EXECUTE FUNCTION users_score_changed();

-- A user inserted with its bookkeeping (a version of its own, as a restore
-- or a bulk load writes it) still needs its transaction for the cache sync.
CREATE OR REPLACE FUNCTION users_inserted_versioned() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    NEW.score_xid := COALESCE(NEW.score_xid, pg_current_xact_id());
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER users_inserted_versioned BEFORE INSERT ON users
    FOR EACH ROW
    WHEN (NEW.loyalty_score <> 0 AND NEW.score_version <> 0 AND NEW.score_xid IS NULL)
    EXECUTE FUNCTION users_inserted_versioned();

-- A user's name reaches the live board the way a score does: a rename by
-- any client advances the row's score_version (the version of what
-- loyaltyd publishes from the row, its score and its name) and records its
-- transaction, so the cache sync writes the new name to the board.
CREATE OR REPLACE FUNCTION users_username_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    NEW.score_version := next_score_version(OLD.score_version);
    NEW.score_xid := pg_current_xact_id();
    RETURN NEW;
END $$;

-- After users_score_changed (triggers fire in name order): a statement that
-- changes the score and the name together advances the version once.
CREATE OR REPLACE TRIGGER users_username_changed BEFORE UPDATE OF username ON users
    FOR EACH ROW
    WHEN (OLD.username IS DISTINCT FROM NEW.username AND OLD.score_version = NEW.score_version)
    EXECUTE FUNCTION users_username_changed();

-- ---------------------------------------------------------------- what a score is

-- Every user's score as its ledger gives it: the sum of its events' points.
-- The integrity sweep, the repair and `adopt` compare stored scores with
-- it (a filter on user_id reaches the events' index through the view; a
-- join condition does not).
CREATE OR REPLACE VIEW user_ledger_scores AS
SELECT e.user_id, sum(e.score_delta)::BIGINT AS score
FROM moderation_events e
GROUP BY e.user_id;

-- Recomputes the users' scores from their ledgers under their row locks and
-- writes back those that differ; answers each repaired user with the score
-- before. The lock comes first, in its own statement, so the recomputation's
-- snapshot includes every event committed for them and no writer can add one
-- until the transaction ends. A seed-era writer's fresh credit (its event is
-- on its way) counts; one older than `credit_grace` never got its event and
-- is dropped.
CREATE OR REPLACE FUNCTION scores_repair(ids BIGINT[], credit_grace INTERVAL)
    RETURNS TABLE (user_id BIGINT, previous BIGINT)
    LANGUAGE plpgsql AS $$
DECLARE
    fixed BIGINT[];
    deltas BIGINT[];
    befores BIGINT[];
BEGIN
    PERFORM users_lock(ids);
    SELECT array_agg(t.uid), array_agg(t.score - t.before), array_agg(t.before)
    INTO fixed, deltas, befores
    FROM (SELECT u.id::BIGINT AS uid, u.loyalty_score::BIGINT AS before,
                 (COALESCE(l.score, 0)
                  + COALESCE((SELECT sum(c.delta) FROM legacy_score_credits c
                              WHERE c.user_id = u.id AND c.written_at > now() - credit_grace), 0))::BIGINT AS score
          -- (The filter on the view itself: a join condition does not reach
          -- into its GROUP BY, and the ledger of every user would be summed.)
          FROM users u LEFT JOIN (SELECT * FROM user_ledger_scores s WHERE s.user_id = ANY(ids)) l
               ON l.user_id = u.id
          WHERE u.id = ANY(ids)) t
    WHERE t.score <> t.before;
    DELETE FROM legacy_score_credits c WHERE c.user_id = ANY(ids) AND c.written_at <= now() - credit_grace;
    IF fixed IS NOT NULL THEN
        PERFORM scores_add(fixed, deltas, cardinality(fixed));
        RETURN QUERY SELECT * FROM unnest(fixed, befores);
    END IF;
END $$;
