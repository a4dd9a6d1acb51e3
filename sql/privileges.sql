-- What a forum's own role may do (SPEC §10, §14, §15): exactly what the
-- contract needs. It signs its users up and renames them (INSERT of id,
-- username and created_at, UPDATE of username); scores, versions, pending
-- counts, queue keys and counters are written by the triggers on the role's
-- behalf (they run as their owner), and the role gets no UPDATE of any of
-- them.

-- Grants a forum's role the contract and records it, so that every later
-- apply of these definitions grants it what they add (below). Refuses
-- PUBLIC and PostgreSQL's predefined roles: granting to either would hand
-- every role of the cluster the forum's writes.
CREATE OR REPLACE FUNCTION grant_forum_access(role_name NAME) RETURNS void
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
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
    EXECUTE format('GRANT SELECT (id, username, loyalty_score, created_at, updated_at), INSERT (id, username, created_at),
                    UPDATE (username) ON users TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT ON moderation_events TO %I', role_name);
    EXECUTE format('GRANT USAGE ON SEQUENCE moderation_events_id_seq TO %I', role_name);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON topic_creation_queue, post_moderation_queue, private_message_queue TO %I', role_name);
    EXECUTE format('GRANT SELECT ON topic_creation_queue_positions, post_moderation_queue_positions,
                    private_message_queue_positions TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION queue_position(TEXT, TEXT), queue_head(TEXT, TEXT, BIGINT),
                    queue_length(TEXT, TEXT), loyalty_standing(BIGINT), leaderboard_page(BIGINT, BIGINT),
                    record_moderation_event(BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT),
                    record_moderation_events(BIGINT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[]),
                    queue_add(TEXT, TEXT, TEXT, FLOAT8) TO %I', role_name);
    INSERT INTO loyaltyd_forum_roles (role_name) VALUES (role_name) ON CONFLICT DO NOTHING;
END $$;

-- Nothing of loyaltyd's is executable by PUBLIC: only what
-- grant_forum_access hands out. (Every function this apply defined: the
-- forum's own functions in the schema are not touched.)
DO $$
DECLARE
    f REGPROCEDURE;
BEGIN
    FOR f IN
        SELECT p.oid::REGPROCEDURE FROM pg_proc p
        WHERE p.pronamespace = current_schema()::REGNAMESPACE AND p.xmin = pg_current_xact_id()::XID
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END $$;

-- The roles set up before: what these definitions hand out now (a role
-- dropped since is forgotten).
DELETE FROM loyaltyd_forum_roles r WHERE NOT EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = r.role_name);
SELECT grant_forum_access(r.role_name) FROM loyaltyd_forum_roles r;
