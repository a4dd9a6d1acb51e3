-- The write API: loyaltyd's own event writes, and any client's that wants
-- the score back in the same round trip. They insert into moderation_events
-- like any writer (scoring.sql scores the rows), and run as their owner, so
-- a role that grant_forum_access set up may call them: they do nothing an
-- INSERT by that role could not. Their results cast the forum's columns,
-- which an adopted forum may keep at its own types (INTEGER ids and scores).

-- Records one event and answers with the user's score after it. A replayed
-- event id changes nothing and answers with the current score (duplicate =
-- true); an event id reused with another payload is refused (SQLSTATE
-- LY001), as an idempotency key must be. created_us: the user's sign-up
-- time, the live board's tie-break.
CREATE OR REPLACE FUNCTION record_moderation_event(
    p_user_id BIGINT, p_event_type TEXT, p_content_type TEXT, p_content_id TEXT,
    p_outcome TEXT, p_event_id TEXT DEFAULT NULL,
    OUT loyalty_score BIGINT, OUT score_version BIGINT, OUT score_delta INTEGER, OUT duplicate BOOLEAN,
    OUT created_us BIGINT)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
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
    SELECT u.loyalty_score, u.score_version, (EXTRACT(EPOCH FROM u.created_at) * 1000000)::BIGINT
    INTO loyalty_score, score_version, created_us
    FROM users u WHERE u.id = p_user_id;
END $$;

-- Many events in one statement (bulk ingestion): the statement trigger
-- updates each user once. Answers with every touched user's score after the
-- batch and how many of the batch's events were new for them.
CREATE OR REPLACE FUNCTION record_moderation_events(
    p_user_ids BIGINT[], p_event_types TEXT[], p_content_types TEXT[], p_content_ids TEXT[],
    p_outcomes TEXT[], p_event_ids TEXT[])
    RETURNS TABLE (user_id BIGINT, loyalty_score BIGINT, score_version BIGINT, events BIGINT, created_us BIGINT)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
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
