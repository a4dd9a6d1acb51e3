-- Migration 13: functions, triggers, views and grants move out of the
-- migrations. From here on each has one live definition, in sql/ (one file
-- per concept), which `migrate` and `adopt` apply after the migrations
-- whenever its text changed (src/definitions.rs); migrations hold tables,
-- columns, indexes and data moves. These tables are that apply's record.

-- What the last apply defined: a definition taken out of sql/ is dropped by
-- the next apply. `identity` is as PostgreSQL prints it with the schema on
-- the search_path: `name(argument types)` for a function, `name ON table`
-- for a trigger, the name for a view.
CREATE TABLE loyaltyd_definitions (
    kind     TEXT NOT NULL CONSTRAINT loyaltyd_definitions_kind_check CHECK (kind IN ('function', 'trigger', 'view')),
    identity TEXT NOT NULL,
    PRIMARY KEY (kind, identity)
);

-- The digest of the definitions last applied, and when.
CREATE TABLE loyaltyd_definitions_applied (
    singleton  BOOLEAN     PRIMARY KEY DEFAULT true CONSTRAINT loyaltyd_definitions_applied_singleton CHECK (singleton),
    digest     TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What migrations 1 to 12 defined: the first apply replaces each of them or
-- drops it.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);
INSERT INTO loyaltyd_definitions (kind, identity)
SELECT 'function', p.oid::REGPROCEDURE::TEXT FROM pg_proc p
WHERE p.pronamespace = current_schema()::REGNAMESPACE
  AND p.proname IN ('apply_score_deltas', 'grant_forum_access', 'leaderboard_consume_changes',
                    'leaderboard_count_changes', 'leaderboard_page', 'leaderboard_shard', 'loyalty_standing',
                    'loyaltyd_check_queue', 'loyaltyd_check_range', 'moderation_event_scored',
                    'moderation_events_delta', 'moderation_events_refuse_truncate', 'moderation_events_scored',
                    'moderation_events_scored_many', 'next_score_version', 'queue_add', 'queue_block',
                    'queue_block_first_key', 'queue_fold', 'queue_fold_lock', 'queue_head', 'queue_item_counted',
                    'queue_item_keyed', 'queue_items_moved', 'queue_key_written', 'queue_length', 'queue_pace',
                    'queue_pace_min_items', 'queue_pace_window', 'queue_position', 'queue_recount',
                    'queue_scope_lengths', 'queue_superblock', 'queue_truncated', 'record_moderation_event',
                    'record_moderation_events', 'score_events', 'users_inserted_versioned', 'users_score_changed',
                    'users_username_changed')
UNION ALL
SELECT 'trigger', quote_ident(t.tgname) || ' ON ' || t.tgrelid::REGCLASS::TEXT FROM pg_trigger t
WHERE NOT t.tgisinternal
  AND t.tgrelid IN ('users'::REGCLASS, 'moderation_events'::REGCLASS, 'topic_creation_queue'::REGCLASS,
                    'post_moderation_queue'::REGCLASS, 'private_message_queue'::REGCLASS)
  AND t.tgfoid IN (SELECT p.oid FROM pg_proc p WHERE p.pronamespace = current_schema()::REGNAMESPACE
                   AND p.proname IN ('moderation_event_scored', 'moderation_events_delta',
                                     'moderation_events_refuse_truncate', 'moderation_events_scored',
                                     'moderation_events_scored_many', 'queue_item_counted', 'queue_item_keyed',
                                     'queue_items_moved', 'queue_key_written', 'queue_truncated',
                                     'users_inserted_versioned', 'users_score_changed', 'users_username_changed'))
UNION ALL
SELECT 'view', c.oid::REGCLASS::TEXT FROM pg_class c
WHERE c.relnamespace = current_schema()::REGNAMESPACE AND c.relkind = 'v'
  AND c.relname IN ('topic_creation_queue_positions', 'post_moderation_queue_positions',
                    'private_message_queue_positions');

-- The roles grant_forum_access set up (it records them from now on): each
-- apply grants them what the definitions hand out, new functions included.
-- Until now, every one of them had EXECUTE on loyalty_standing.
CREATE TABLE loyaltyd_forum_roles (
    role_name  NAME        PRIMARY KEY,
    granted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO loyaltyd_forum_roles (role_name)
SELECT g.rolname FROM pg_proc p, aclexplode(p.proacl) a JOIN pg_roles g ON g.oid = a.grantee
WHERE p.oid = 'loyalty_standing(BIGINT)'::REGPROCEDURE AND a.privilege_type = 'EXECUTE'
  AND a.grantee <> p.proowner
ON CONFLICT DO NOTHING;
