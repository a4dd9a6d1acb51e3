-- The API's argument checks. A bad argument is refused with SQLSTATE 22023
-- and the accepted range in the message: the API never answers a NULL limit
-- with the whole table, nor an unknown queue with no rows.

CREATE OR REPLACE FUNCTION loyaltyd_check_queue(p_queue TEXT) RETURNS void
    LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_queue IS NULL OR p_queue NOT IN ('topic', 'post', 'message') THEN
        RAISE EXCEPTION 'unknown queue %', COALESCE(quote_literal(p_queue), 'NULL')
            USING ERRCODE = '22023', HINT = 'queues are topic, post and message';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION loyaltyd_check_range(what TEXT, val BIGINT, lo BIGINT, hi BIGINT) RETURNS void
    LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF val IS NULL OR val < lo OR val > hi THEN
        RAISE EXCEPTION '% must be % to %, not %', what, lo, hi, COALESCE(val::TEXT, 'NULL')
            USING ERRCODE = '22023';
    END IF;
END $$;
