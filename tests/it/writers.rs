//! The SQL contract for every writer and every role (SPEC §14, migration 8):
//! the forum's role calls every documented function and view; the original
//! design's own code beside event-only writers leaves every score exact and
//! no credit behind; a direct score write outside legacy mode is refused,
//! and one inside it reaches the cache and the live board; the read API
//! refuses what the CLI refuses.

use std::time::Duration;

use loyaltyd::Context;
use loyaltyd::types::QueueKind;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::adopt::{database, old_app};
use crate::common::finish;
use crate::common::{self, ForumRole, uid};

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Users whose score is not the sum of their events, and credits left.
async fn leftovers(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM users u
                 LEFT JOIN (SELECT user_id, sum(score_delta) AS s FROM moderation_events GROUP BY user_id) t
                        ON t.user_id = u.id
                 WHERE u.loyalty_score <> COALESCE(t.s, 0)),
                (SELECT count(*) FROM legacy_score_credits)",
    )
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `seed` processes of the original design's own code (UPDATE the score,
/// then INSERT the event, autocommitted) and four event-only writers (one
/// row, and several rows in random user order) on users 1..=`users` for a
/// few seconds; then no user is off and no credit is left over.
pub(crate) async fn coexist(pool: &PgPool, ctx: &Context, db: &str, users: i64, seed: usize) {
    let config = &ctx.config;
    let stop = std::env::temp_dir().join(format!("coexist-stop-{db}-{users}"));
    let apps: Vec<_> = (0..seed)
        .map(|w| {
            // Worker numbers (and so item names) of this round's own.
            let worker = users as usize * 100 + w;
            old_app(config, db, worker, 5, users, &stop.to_string_lossy())
        })
        .collect();
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let mut i = 0i64;
                while tokio::time::Instant::now() < deadline {
                    i += 1;
                    let a = 1 + (i * 31 + w * 7) % users;
                    let b = 1 + (i * 17 + w * 3 + 1) % users;
                    let sql = if i % 3 == 0 {
                        // Several rows, users in whatever order they come.
                        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                         VALUES ($1, 'moderation_decision', 'post', $3, 'approved'),
                                ($2, 'moderation_decision', 'topic', $3 || 'b', 'rejected'),
                                ($1, 'moderation_decision', 'private_message', $3 || 'c', 'approved')"
                    } else {
                        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                         SELECT $1, 'moderation_decision', 'post', $3, 'approved' WHERE $2 > 0"
                    };
                    sqlx::query(sql)
                        .bind(a)
                        .bind(b)
                        .bind(format!("new-{users}-{w}-{i}"))
                        .execute(&pool)
                        .await
                        .unwrap_or_else(|e| panic!("event-only writer: {e}"));
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let mut done = 0;
    for app in apps {
        let line = finish(app).await;
        assert_eq!(line["errors"], serde_json::json!({}), "{line}");
        done += line["done"].as_i64().unwrap_or(0);
    }
    assert!(done > 100, "the original code did {done} operations");
    assert_eq!(
        leftovers(pool).await,
        (0, 0),
        "{users} users: (scores off their events, credits left)"
    );
    let report = common::sweep(ctx, 1000).await;
    assert_eq!(
        (report.drifted_users, report.pending_credits),
        (0, 0),
        "{report:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn the_original_code_beside_event_only_writers_counts_every_score_once_in_legacy_mode(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 12).await;
    let db = database(&pool).await;
    common::users(&pool, 200).await;
    exec(
        &pool,
        "UPDATE loyaltyd_settings SET legacy_score_writes = true",
    )
    .await;
    let ctx = common::ctx_with(&pool, common::config(&pool, "legacy"), false);
    for users in [3, 200] {
        coexist(&pool, &ctx, &db, users, 8).await;
    }
    common::queue_invariants(&pool, QueueKind::Post).await;
}

/// Runs psql as the superuser (an operator, or a forum that owns its
/// tables) on the test database.
fn psql(db: &str, script: &str) -> (bool, String, String) {
    common::psql(&format!("host=/var/run/postgresql dbname={db}"), script)
}

/// A forum's own table with a trigger of its own that rewards each post's
/// author the original design's way (an UPDATE of the score).
const FORUM_REWARD_TRIGGER: &str = "
    CREATE TABLE forum_posts (id TEXT PRIMARY KEY, author_id BIGINT REFERENCES users (id));
    CREATE FUNCTION forum_posts_reward() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE users SET loyalty_score = loyalty_score + 1 WHERE id = NEW.author_id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER forum_posts_reward AFTER INSERT ON forum_posts
        FOR EACH ROW EXECUTE FUNCTION forum_posts_reward();";

#[sqlx::test(migrations = false)]
async fn outside_legacy_mode_a_direct_score_write_is_refused_whole_through_psql(pool: PgPool) {
    common::migrate(&pool).await;
    let db = database(&pool).await;
    common::users(&pool, 2).await;
    exec(
        &pool,
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (1, 'd', 'topic', 'x', 'approved')",
    )
    .await;
    // A forum's own table, with a trigger of its own that writes scores the
    // original design's way.
    exec(&pool, FORUM_REWARD_TRIGGER).await;
    let before: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT id, loyalty_score, score_version FROM users ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    for sql in [
        "UPDATE users SET loyalty_score = loyalty_score + 1 WHERE id = 1",
        "UPDATE users SET loyalty_score = 50",
        "INSERT INTO users (id, username, loyalty_score) VALUES (1001, 'imported', 50)",
        "INSERT INTO forum_posts VALUES ('p1', 2)",
    ] {
        let (ok, _, err) = psql(&db, &format!("\\set VERBOSITY verbose\n{sql};"));
        assert!(!ok, "{sql} went through");
        assert!(
            err.contains("LY003")
                && err.contains("loyalty_score refused")
                && err.contains("loyaltyd_settings.legacy_score_writes")
                && err.contains("insert a moderation_events row instead"),
            "{sql}: {err}"
        );
    }
    let after: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT id, loyalty_score, score_version FROM users ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after, before, "nothing written");
    let posts: i64 = sqlx::query_scalar("SELECT count(*) FROM forum_posts")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(posts, 0, "the forum's INSERT was refused whole");
    // A user without a score, and events, are what the forum writes instead.
    let (ok, _, err) = psql(
        &db,
        "INSERT INTO users (id, username) VALUES (1001, 'imported');
         INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (1001, 'import', 'topic', 'i', 'approved');",
    );
    assert!(ok, "{err}");
    assert_eq!(leftovers(&pool).await, (0, 0));
}

#[sqlx::test(migrations = false)]
async fn in_legacy_mode_an_imported_score_and_a_forum_triggers_write_reach_the_cache_and_the_live_board(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    let ctx = common::ctx(&pool, "legacy-sync");
    assert!(ctx.config.leaderboard.live);
    loyaltyd::leaderboard::live::build(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    common::sync(&ctx).await;
    exec(
        &pool,
        "UPDATE loyaltyd_settings SET legacy_score_writes = true",
    )
    .await;
    exec(&pool, FORUM_REWARD_TRIGGER).await;
    // An import with a score, and the forum's trigger crediting user 2 once;
    // then the forum records that post's event (the original pattern).
    exec(
        &pool,
        "INSERT INTO users (id, username, loyalty_score) VALUES (1001, 'imported', 50)",
    )
    .await;
    exec(&pool, "INSERT INTO forum_posts VALUES ('p1', 2)").await;
    let versioned: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT id, loyalty_score, score_version > 0 AND score_xid IS NOT NULL FROM users
         WHERE id IN (2, 1001) ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(versioned, [(2, 1, true), (1001, 50, true)]);
    let synced = common::sync(&ctx).await;
    assert!(
        matches!(synced, loyaltyd::sync::Synced::Wrote(n) if n >= 2),
        "{synced:?}"
    );
    let cached = ctx
        .cache
        .get_scores(&[uid(2), uid(1001)])
        .await
        .unwrap_or_else(|| panic!("Redis unreadable"));
    assert_eq!(cached, [Some(1), Some(50)]);
    let rank = loyaltyd::leaderboard::rank(&ctx, uid(1001))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((rank.rank, rank.loyalty_score), (Some(1), 50), "{rank:?}");
    // The event for p1 consumes the trigger's credit: counted once.
    exec(
        &pool,
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (2, 'moderation_decision', 'post', 'p1', 'approved')",
    )
    .await;
    let (score, credits): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT loyalty_score FROM users WHERE id = 2),
                (SELECT count(*) FROM legacy_score_credits WHERE user_id = 2)",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((score, credits), (1, 0));
    // The import's credit never gets an event: the sweep reports it pending,
    // not drift, while it is fresh.
    let report = common::sweep(&ctx, 100).await;
    assert_eq!(
        (report.drifted_users, report.pending_credits),
        (0, 1),
        "{report:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn every_documented_function_and_view_works_for_the_forum_role(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 43).await;
    let role = ForumRole::create(&pool, "api").await;
    let (ok, out, err) = role.psql(
        "SELECT loyalty_score, duplicate FROM record_moderation_event(42, 'moderation_decision', 'post', 'p-1', 'approved', 'k1');
         SELECT loyalty_score, duplicate FROM record_moderation_event(42, 'moderation_decision', 'post', 'p-1', 'approved', 'k1');
         SELECT user_id, loyalty_score, events FROM record_moderation_events(
             ARRAY[43, 42]::BIGINT[], ARRAY['d', 'd'], ARRAY['topic', 'post'], ARRAY['t-1', 'p-2'],
             ARRAY['approved', 'approved'], ARRAY[NULL, NULL]::TEXT[]);
         SELECT position FROM queue_add('post', 'p-9', 't-1', 0);
         SELECT position FROM queue_add('post', 'p-10', 't-1', 2);
         SELECT position FROM queue_add('topic', 'tp-1', NULL, 0);
         SELECT position FROM queue_add('message', 'm-1', 'c-1', 0);
         SELECT scope, position FROM queue_position('post', 'p-10');
         SELECT content_id, position FROM queue_head('post', 't-1', 10);
         SELECT queue_length('post', 't-1');
         SELECT loyalty_score, rank IS NULL FROM loyalty_standing(42);
         SELECT count(*) FROM leaderboard_page(10, 0);
         SELECT post_id, position FROM post_moderation_queue_positions ORDER BY position;
         SELECT topic_id, position FROM topic_creation_queue_positions;
         SELECT message_id, position FROM private_message_queue_positions;",
    );
    assert!(ok, "as the forum role: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "1|f", "1|t", "42|2|1", "43|5|1", "1", "2", "1", "1", "t-1|2", "p-9|1", "p-10|2", "2",
            "2|t", "0", "p-9|1", "p-10|2", "tp-1|1", "m-1|1",
        ],
        "{out}"
    );
    for q in [QueueKind::Post, QueueKind::Topic, QueueKind::Message] {
        common::queue_invariants(&pool, q).await;
    }
    assert_eq!(leftovers(&pool).await, (0, 0));
    // Granting the forum's access to every role, or to a predefined one, is refused.
    for (who, says) in [
        ("public", "to PUBLIC"),
        ("PUBLIC", "to PUBLIC"),
        ("pg_monitor", "predefined role"),
        ("no_such_role_here", "does not exist"),
    ] {
        let err = sqlx::query("SELECT grant_forum_access($1)")
            .bind(who)
            .execute(&pool)
            .await
            .err()
            .unwrap_or_else(|| panic!("granted to {who}"));
        assert!(err.to_string().contains(says), "{who}: {err}");
    }
    let public_can: bool = sqlx::query_scalar(
        "SELECT has_table_privilege('public', 'moderation_events', 'INSERT')
             OR has_function_privilege('public', 'record_moderation_event(BIGINT, TEXT, TEXT, TEXT, TEXT, TEXT)', 'EXECUTE')",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!public_can);
    role.drop_role(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn the_read_api_refuses_what_the_cli_refuses_with_one_sqlstate(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    exec(&pool, "SELECT queue_add('post', 'a', 't', 0)").await;
    let refused = [
        (
            "SELECT * FROM queue_head('post', 't', NULL)",
            "limit must be 1 to 100000, not NULL",
        ),
        (
            "SELECT * FROM queue_head('post', 't', 0)",
            "limit must be 1 to 100000, not 0",
        ),
        (
            "SELECT * FROM queue_head('post', 't', 100001)",
            "limit must be 1 to 100000",
        ),
        (
            "SELECT * FROM queue_head('post', NULL, 10)",
            "scope is NULL",
        ),
        (
            "SELECT * FROM queue_head('posts', 't', 10)",
            "unknown queue 'posts'",
        ),
        ("SELECT queue_length('post', NULL)", "scope is NULL"),
        ("SELECT queue_length(NULL, 't')", "unknown queue NULL"),
        (
            "SELECT * FROM queue_position('nope', 'a')",
            "unknown queue 'nope'",
        ),
        (
            "SELECT * FROM leaderboard_page(NULL, 0)",
            "limit must be 1 to 1000, not NULL",
        ),
        (
            "SELECT * FROM leaderboard_page(0, 0)",
            "limit must be 1 to 1000",
        ),
        (
            "SELECT * FROM leaderboard_page(1001, 0)",
            "limit must be 1 to 1000",
        ),
        (
            "SELECT * FROM leaderboard_page(10, -1)",
            "offset must be 0 to",
        ),
        (
            "SELECT * FROM leaderboard_page(10, NULL)",
            "offset must be 0 to",
        ),
        (
            "SELECT * FROM loyalty_standing(NULL)",
            "user id must be 1 to",
        ),
        ("SELECT * FROM loyalty_standing(-1)", "user id must be 1 to"),
        (
            "SELECT * FROM queue_add('post', 'x', NULL)",
            "needs a scope (its topic id)",
        ),
        (
            "SELECT * FROM queue_add('message', 'x', NULL)",
            "needs a scope (its conversation id)",
        ),
        (
            "SELECT * FROM queue_add('post', NULL, 't')",
            "content id is NULL",
        ),
        (
            "SELECT * FROM queue_add(NULL, 'x', 't')",
            "unknown queue NULL",
        ),
        (
            "SELECT * FROM queue_add('post', 'x', 't', 'NaN')",
            "priority must be a finite number",
        ),
        (
            "SELECT * FROM queue_add('post', 'x', 't', NULL)",
            "priority must be a finite number, not NULL",
        ),
    ];
    for (sql, says) in refused {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .err()
            .unwrap_or_else(|| panic!("{sql} answered"));
        let db = err.as_database_error().unwrap_or_else(|| panic!("{err}"));
        assert_eq!(db.code().as_deref(), Some("22023"), "{sql}: {err}");
        assert!(db.message().contains(says), "{sql}: {}", db.message());
        assert!(!db.message().contains("queue_scopes"), "{sql}: {err}");
    }
    let items: i64 = sqlx::query_scalar("SELECT count(*) FROM post_moderation_queue")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(items, 1, "nothing written by a refused call");
}

/// Outside legacy mode the original design's code is refused, never
/// counted twice: its score UPDATE fails whole (LY003), its shifting remove's
/// UPDATE too (LY004, after its DELETE closed the gap by itself), while
/// event-only writers go on; afterwards every score is its events and every
/// position dense.
#[sqlx::test(migrations = false)]
async fn outside_legacy_mode_the_original_code_is_refused_and_nothing_counts_twice(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 8).await;
    let db = database(&pool).await;
    common::users(&pool, 5).await;
    let ctx = common::ctx_with(&pool, common::config(&pool, "no-legacy"), false);
    let stop = std::env::temp_dir().join(format!("no-legacy-stop-{db}"));
    let apps: Vec<_> = (0..2)
        .map(|w| old_app(&ctx.config, &db, w, 3, 5, &stop.to_string_lossy()))
        .collect();
    for i in 0..200i64 {
        sqlx::query(
            "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             VALUES ($1, 'moderation_decision', 'post', $2, 'approved')",
        )
        .bind(1 + i % 5)
        .bind(format!("new-{i}"))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut refused = 0;
    for app in apps {
        let out = tokio::task::spawn_blocking(move || app.wait_with_output())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let line: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
        for (kind, n) in line["errors"].as_object().into_iter().flatten() {
            assert!(
                (kind.starts_with("LY003") && kind.contains("legacy_score_writes"))
                    || kind.starts_with("LY004"),
                "{kind}: {line}"
            );
            refused += n.as_i64().unwrap_or(0);
        }
    }
    assert!(refused > 0, "the original code's score writes were refused");
    assert_eq!(leftovers(&pool).await, (0, 0));
    assert_eq!(common::sweep_drift(&ctx).await, 0);
    common::queue_invariants(&pool, QueueKind::Post).await;
}

/// Every path through migration 8's scoring triggers in legacy mode, each
/// checked against the integrity sweep: one row consuming a credit, many
/// rows in any user order, COPY, a rolled-back write of either kind, an
/// UPDATE and a DELETE of events, and an event-id replay.
#[sqlx::test(migrations = false)]
async fn every_legacy_trigger_path_agrees_with_the_sweep(pool: PgPool) {
    common::migrate(&pool).await;
    let db = database(&pool).await;
    common::users(&pool, 4).await;
    let ctx = common::ctx_with(&pool, common::config(&pool, "legacy-paths"), false);
    exec(
        &pool,
        "UPDATE loyaltyd_settings SET legacy_score_writes = true",
    )
    .await;
    let ev = "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome, event_id)";
    let steps: [(&str, String, (i64, i64)); 8] = [
        (
            "one row consumes its credit",
            format!("UPDATE users SET loyalty_score = loyalty_score + 1 WHERE id = 1;
                     {ev} VALUES (1, 'd', 'post', 'a', 'approved', NULL);"),
            (0, 0),
        ),
        (
            "many rows, users out of order, each consuming",
            format!("UPDATE users SET loyalty_score = loyalty_score + 5 WHERE id = 3;
                     UPDATE users SET loyalty_score = loyalty_score - 1 WHERE id = 2;
                     {ev} VALUES (3, 'd', 'topic', 'b', 'approved', NULL), (2, 'd', 'post', 'c', 'rejected', NULL),
                                 (1, 'd', 'post', 'd', 'approved', NULL), (3, 'd', 'post', 'e', 'calibrated', NULL);"),
            (0, 0),
        ),
        (
            "COPY consumes",
            "UPDATE users SET loyalty_score = loyalty_score + 1 WHERE id = 4;
             COPY moderation_events (user_id, event_type, content_type, content_id, outcome) FROM STDIN;
4\td\tpost\tf\tapproved
2\td\tprivate_message\tg\tapproved
\\.
".to_owned(),
            (0, 0),
        ),
        (
            "a rolled-back direct write and event leave nothing",
            format!("BEGIN; UPDATE users SET loyalty_score = loyalty_score + 1 WHERE id = 1;
                     {ev} VALUES (1, 'd', 'post', 'h', 'approved', NULL); ROLLBACK;"),
            (0, 0),
        ),
        (
            "a credit whose event rolled back stays pending",
            format!("UPDATE users SET loyalty_score = loyalty_score + 1 WHERE id = 2;
                     BEGIN; {ev} VALUES (2, 'd', 'post', 'i', 'approved', NULL); ROLLBACK;"),
            // The score is its events plus the credit: off its events, not drift.
            (1, 1),
        ),
        (
            "its event, later, consumes it",
            format!("{ev} VALUES (2, 'd', 'post', 'i', 'approved', 'k-i');"),
            (0, 0),
        ),
        (
            "an event-id replay counts once",
            format!("{ev} VALUES (2, 'd', 'post', 'i', 'approved', 'k-i')
                     ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING;"),
            (0, 0),
        ),
        (
            "UPDATE and DELETE of events move the scores back",
            "UPDATE moderation_events SET outcome = 'rejected' WHERE content_id IN ('a', 'f');
             DELETE FROM moderation_events WHERE content_id IN ('b', 'g');".to_owned(),
            (0, 0),
        ),
    ];
    for (what, script, want) in steps {
        let (ok, _, err) = psql(&db, &script);
        assert!(ok, "{what}: {err}");
        assert_eq!(
            leftovers(&pool).await,
            want,
            "{what}: (users off, credits left)"
        );
        let report = common::sweep(&ctx, 100).await;
        assert_eq!(
            (report.drifted_users, report.pending_credits),
            (0, want.1 as u64),
            "{what}: {report:?}"
        );
    }
}
