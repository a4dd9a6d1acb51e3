//! The SQL contract (SPEC §10): plain SQL from clients no one here wrote
//! (psql, Python's psycopg) keeps every invariant, in the client's own
//! transaction, beside loyaltyd's own writers; every trigger path is checked
//! against the integrity sweep.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loyaltyd::loyalty::{self, NewEvent};
use loyaltyd::queues;
use loyaltyd::types::{ContentType, Outcome, Priority, QueueKind, Scope, UserId};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::{self, ForumRole, ident, score, scores_exact};

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[sqlx::test(migrations = false)]
async fn every_event_write_path_keeps_scores_equal_to_their_events(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 5).await;
    let ins = "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome, event_id) VALUES";
    // One row.
    exec(
        &pool,
        &format!("{ins} (1, 'm', 'topic', 't1', 'approved', NULL)"),
    )
    .await;
    assert_eq!(score(&pool, 1).await, 5);
    scores_exact(&pool, "a one-row INSERT").await;
    // Many rows, several users, zero deltas among them.
    exec(
        &pool,
        &format!(
            "{ins} (2, 'm', 'post', 'p1', 'approved', NULL), (1, 'm', 'post', 'p2', 'rejected', NULL),
                   (2, 'm', 'private_message', 'm1', 'calibrated', NULL), (3, 'm', 'topic', 't2', 'rejected', 'k-1')"
        ),
    )
    .await;
    assert_eq!(
        (
            score(&pool, 1).await,
            score(&pool, 2).await,
            score(&pool, 3).await
        ),
        (4, 1, -5)
    );
    scores_exact(&pool, "a multi-row INSERT").await;
    // A replay of an event id, through ON CONFLICT: counted once.
    exec(
        &pool,
        &format!("{ins} (3, 'm', 'topic', 't2', 'rejected', 'k-1') ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING"),
    )
    .await;
    assert_eq!(score(&pool, 3).await, -5);
    scores_exact(&pool, "a replayed event id").await;
    // COPY.
    let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    let mut copy = conn
        .copy_in_raw(
            "COPY moderation_events (user_id, event_type, content_type, content_id, outcome) FROM STDIN",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    copy.send(
        "4\tm\tpost\tc1\tapproved\n4\tm\ttopic\tc2\tapproved\n5\tm\tpost\tc3\trejected\n"
            .as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    copy.finish().await.unwrap_or_else(|e| panic!("{e}"));
    drop(conn);
    assert_eq!((score(&pool, 4).await, score(&pool, 5).await), (6, -1));
    scores_exact(&pool, "COPY").await;
    // A rolled-back INSERT changes nothing.
    exec(
        &pool,
        &format!("BEGIN; {ins} (5, 'm', 'topic', 't9', 'approved', NULL); ROLLBACK;"),
    )
    .await;
    assert_eq!(score(&pool, 5).await, -1);
    scores_exact(&pool, "a rollback").await;
    // UPDATE moves deltas: to another user, and by a changed outcome; each
    // user whose score moved is one pending change.
    let before = common::changes_counted(&pool).await;
    exec(
        &pool,
        "UPDATE moderation_events SET user_id = 5 WHERE content_id = 'c2'",
    )
    .await;
    exec(
        &pool,
        "UPDATE moderation_events SET outcome = 'approved' WHERE content_id = 'p2'",
    )
    .await;
    assert_eq!(
        (
            score(&pool, 1).await,
            score(&pool, 4).await,
            score(&pool, 5).await
        ),
        (6, 1, 4)
    );
    assert_eq!(common::changes_counted(&pool).await, before + 3);
    let ctx = common::ctx(&pool, "exact");
    assert_eq!(common::sweep_drift(&ctx).await, 0, "drift after UPDATEs");
    // DELETE takes deltas back.
    exec(
        &pool,
        "DELETE FROM moderation_events WHERE user_id IN (1, 3)",
    )
    .await;
    assert_eq!((score(&pool, 1).await, score(&pool, 3).await), (0, 0));
    assert_eq!(common::sweep_drift(&ctx).await, 0, "drift after DELETE");
    // TRUNCATE would leave every score without its events: refused, clearly.
    let err = sqlx::raw_sql("TRUNCATE moderation_events")
        .execute(&pool)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("TRUNCATE of moderation_events is refused"),
        "{err}"
    );
    assert_eq!(common::sweep_drift(&ctx).await, 0);
}

#[sqlx::test(migrations = false)]
async fn every_queue_write_path_keeps_positions_exact_and_dense(pool: PgPool) {
    common::migrate(&pool).await;
    // Every invariant with the changes not folded yet, then again after a
    // fold has moved them into the counters (migration 11): the positions
    // are the same either way.
    let check = |what: &'static str| {
        let pool = pool.clone();
        async move {
            for q in QueueKind::ALL {
                let unfolded = common::queue_invariants(&pool, q).await;
                sqlx::query("SELECT queue_fold($1)")
                    .bind(q.as_str())
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let left: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM queue_changes WHERE queue = $1")
                        .bind(q.as_str())
                        .fetch_one(&pool)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(left, 0, "{what}: the fold left changes of the {q} queue");
                assert_eq!(common::queue_invariants(&pool, q).await, unfolded, "{what}");
            }
        }
    };
    // Plain INSERTs without a key, one and many rows, several scopes.
    exec(
        &pool,
        "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('a', 't1')",
    )
    .await;
    exec(
        &pool,
        "INSERT INTO post_moderation_queue (post_id, topic_id, priority_score)
         VALUES ('b', 't1', 2), ('c', 't2', 0), ('d', 't1', 1)",
    )
    .await;
    check("inserts").await;
    // A given key is replaced by the tail's: no jumping the queue.
    exec(
        &pool,
        "INSERT INTO post_moderation_queue (post_id, topic_id, position_in_queue) VALUES ('e', 't1', -100)",
    )
    .await;
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["t1"], ["a", "b", "d", "e"]);
    // ON CONFLICT DO NOTHING skips a duplicate without counting it.
    exec(
        &pool,
        "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('a', 't1'), ('f', 't1')
         ON CONFLICT (post_id) DO NOTHING",
    )
    .await;
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["t1"], ["a", "b", "d", "e", "f"]);
    // COPY, across blocks (600 items: five blocks of 128).
    let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    let mut copy = conn
        .copy_in_raw("COPY topic_creation_queue (topic_id, priority_score) FROM STDIN")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rows: String = (0..600).map(|i| format!("x{i}\t{}\n", i % 7)).collect();
    copy.send(rows.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    copy.finish().await.unwrap_or_else(|e| panic!("{e}"));
    drop(conn);
    check("COPY").await;
    // DELETE one, DELETE many (across scopes and blocks), a rolled-back DELETE.
    exec(
        &pool,
        "DELETE FROM post_moderation_queue WHERE post_id = 'b'",
    )
    .await;
    exec(
        &pool,
        "DELETE FROM topic_creation_queue WHERE topic_id IN (SELECT 'x' || g FROM generate_series(0, 599, 3) g)",
    )
    .await;
    exec(
        &pool,
        "BEGIN; DELETE FROM post_moderation_queue WHERE post_id = 'a'; ROLLBACK;",
    )
    .await;
    // A fold inside a writer's transaction (one write in 32 does one) that
    // then rolls back: the counters and the changes go back together.
    exec(
        &pool,
        "BEGIN;
         INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('gone', 't1');
         DELETE FROM post_moderation_queue WHERE post_id = 'd';
         SELECT queue_fold('post', 't1');
         ROLLBACK;",
    )
    .await;
    check("deletes").await;
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["t1"], ["a", "d", "e", "f"]);
    assert_eq!(
        common::queue_invariants(&pool, QueueKind::Topic).await[""].len(),
        400
    );
    // A move to another scope goes to its tail.
    exec(
        &pool,
        "UPDATE post_moderation_queue SET topic_id = 't2' WHERE post_id = 'a'",
    )
    .await;
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(
        (scopes["t1"].clone(), scopes["t2"].clone()),
        (
            vec!["d".to_owned(), "e".to_owned(), "f".to_owned()],
            vec!["c".to_owned(), "a".to_owned()]
        )
    );
    // A client's key change is refused whole (LY004, naming the legacy
    // switch); in legacy mode it is the original design's shift and the keys
    // stay. A priority change moves nothing.
    let before = common::queue_invariants(&pool, QueueKind::Post).await;
    let err = sqlx::query("UPDATE post_moderation_queue SET position_in_queue = position_in_queue - 1 WHERE topic_id = 't1'")
        .execute(&pool)
        .await
        .err()
        .unwrap_or_else(|| panic!("a key update went through"));
    let db = err.as_database_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code().as_deref(), Some("LY004"), "{err}");
    assert!(db.message().contains("position_in_queue refused"), "{err}");
    exec(
        &pool,
        "UPDATE loyaltyd_settings SET legacy_score_writes = true",
    )
    .await;
    exec(
        &pool,
        "UPDATE post_moderation_queue SET position_in_queue = position_in_queue - 1 WHERE topic_id = 't1'",
    )
    .await;
    exec(
        &pool,
        "UPDATE loyaltyd_settings SET legacy_score_writes = false",
    )
    .await;
    exec(&pool, "UPDATE post_moderation_queue SET priority_score = 9").await;
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes, before);
    // loyaltyd's reorder is an UPDATE of keys too.
    let ctx = common::ctx(&pool, "q");
    queues::reorder(&ctx, QueueKind::Topic, &Scope::Global)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    check("a reorder").await;
    // TRUNCATE clears the bookkeeping with the items.
    exec(&pool, "TRUNCATE topic_creation_queue").await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_blocks WHERE queue = 'topic'")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left, 0);
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM queue_superblocks WHERE queue = 'topic')
              + (SELECT count(*) FROM queue_changes WHERE queue = 'topic')
              + (SELECT count(*) FROM queue_scopes WHERE queue = 'topic')",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        left, 0,
        "superblocks, changes and scopes of the truncated queue"
    );
    exec(
        &pool,
        "INSERT INTO topic_creation_queue (topic_id) VALUES ('again')",
    )
    .await;
    assert_eq!(
        common::queue_invariants(&pool, QueueKind::Topic).await[""],
        ["again"]
    );
}

#[sqlx::test(migrations = false)]
async fn the_readme_sql_handler_runs_in_psql_as_a_least_privileged_forum_role(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 42).await;
    let role = ForumRole::create(&pool, "psql").await;
    // The guide's own table of the forum, as its owner creates it.
    exec(
        &pool,
        &common::doc_example("sql-forum-table").replace("forum_app", &role.name),
    )
    .await;
    let (ok, out, err) = role.psql(&common::doc_example("sql-handler"));
    assert!(ok, "psql failed: {err}");
    // The three SELECTs: the standing (score 1, not on the unrefreshed view),
    // p-1002's position, and the head.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["1||f", "1", "p-1002|1"], "{out}");
    assert_eq!(score(&pool, 42).await, 1);
    scores_exact(&pool, "the guide's handler").await;
    common::queue_invariants(&pool, QueueKind::Post).await;
    // Running it again: the retried decision counts once (the queue INSERT
    // refuses the duplicate item first, so only the decision part reruns).
    let (ok, _, err) = role.psql(
        "BEGIN;
         INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome, event_id)
         VALUES (42, 'moderation_decision', 'post', 'p-1001', 'approved', 'decision:p-1001')
         ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING;
         COMMIT;",
    );
    assert!(ok, "{err}");
    assert_eq!(score(&pool, 42).await, 1);
    // Everything else is refused: the role cannot change a score or a
    // position but by recording events and adding or removing items.
    let refused = [
        "UPDATE users SET loyalty_score = 1000 WHERE id = 42",
        "UPDATE moderation_events SET outcome = 'approved'",
        "DELETE FROM moderation_events",
        "UPDATE post_moderation_queue SET position_in_queue = 0",
        "UPDATE post_moderation_queue SET topic_id = 't-8'",
        "UPDATE queue_blocks SET item_count = 0",
        "INSERT INTO queue_blocks VALUES ('post', 't-7', 0, 5)",
        "UPDATE leaderboard_pending SET changes = 0",
        "SELECT scores_add(ARRAY[42::BIGINT], ARRAY[1000::BIGINT], 1)",
        "SELECT scores_repair(ARRAY[42::BIGINT], INTERVAL '1 hour')",
        "TRUNCATE post_moderation_queue",
        "REFRESH MATERIALIZED VIEW user_leaderboard",
        "SELECT grant_forum_access('public')",
    ];
    for sql in refused {
        let (ok, _, err) = role.psql(sql);
        assert!(!ok, "the forum role could run {sql}");
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{sql}: {err}"
        );
    }
    assert_eq!(score(&pool, 42).await, 1);
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["t-7"], ["p-1002"]);
    role.drop_role(&pool).await;
}

/// A loyaltyd writer beside the forum: events through the library, and adds
/// and removes of its own items in the same topics.
async fn loyaltyd_writer(ctx: Arc<loyaltyd::Context>, worker: usize, n: usize, users: i64) {
    for i in 0..n {
        let user = 1 + ((worker * 13 + i * 7) as i64 % users);
        let e = NewEvent {
            user: UserId::new(user).unwrap_or_else(|e| panic!("{e}")),
            event_type: ident("moderation_decision"),
            content_type: if i % 3 == 0 {
                ContentType::Topic
            } else {
                ContentType::Post
            },
            content_id: ident(&format!("ly{worker}-{i}")),
            outcome: if i % 4 == 1 {
                Outcome::Rejected
            } else {
                Outcome::Approved
            },
            event_id: None,
        };
        loyalty::record_event(&ctx, &e)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let item = ident(&format!("ly{worker}-{i}"));
        let scope = Scope::Topic(ident(&format!("t-{}", i % 3)));
        queues::add(&ctx, QueueKind::Post, &item, &scope, Priority::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if i % 2 == 0 {
            queues::remove(&ctx, QueueKind::Post, &item)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[sqlx::test(migrations = false)]
async fn python_handlers_and_loyaltyd_writers_at_once_keep_every_invariant_and_the_cache_follows(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    const USERS: i64 = 40;
    let pool = common::wide_pool(opts, 20).await;
    common::users(&pool, USERS).await;
    exec(
        &pool,
        "CREATE TABLE forum_posts (id TEXT PRIMARY KEY, topic_id TEXT NOT NULL, author_id BIGINT NOT NULL, status TEXT NOT NULL)",
    )
    .await;
    let role = ForumRole::create(&pool, "py").await;
    exec(
        &pool,
        &format!(
            "GRANT SELECT, INSERT, UPDATE ON forum_posts TO \"{}\"",
            role.name
        ),
    )
    .await;
    // The daemon brings the forum's score changes to the cache.
    let mut config = common::config(&pool, "contract");
    config.redis.sync_interval = Duration::from_millis(50);
    config.metrics.listen = ([127, 0, 0, 1], common::free_port()).into();
    let daemon = common::Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(30))
        .await;
    let ctx = Arc::new(common::ctx_with(&pool, config.clone(), false));

    // 8 Python processes and 8 loyaltyd writers: 16 clients at once.
    let pythons: Vec<_> = (0..8)
        .map(|w| common::forum_workload(&role.dsn(), w, 25, USERS, "direct"))
        .collect();
    let writers: Vec<_> = (0..8)
        .map(|w| tokio::spawn(loyaltyd_writer(ctx.clone(), w, 25, USERS)))
        .collect();
    for w in writers {
        w.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let mut decisions = 0;
    for p in pythons {
        decisions += common::finish(p).await["decisions"]
            .as_i64()
            .unwrap_or_default();
    }
    assert_eq!(decisions, 8 * 25);
    let forum_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM moderation_events WHERE event_id LIKE 'decision:py%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        forum_events, decisions,
        "each decision once, retries and rollbacks not"
    );

    // Every invariant afterwards.
    scores_exact(&pool, "16 concurrent clients").await;
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    let queued: usize = scopes.values().map(Vec::len).sum();
    assert_eq!(
        queued,
        8 * 12,
        "loyaltyd's kept items only (odd i of 0..25)"
    );

    // Every cached score equals the database within the sync's delay.
    let started = Instant::now();
    common::eventually(
        "every cached score equal to the database",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            let ctx = ctx.clone();
            async move {
                let rows: Vec<(i64, i64)> =
                    sqlx::query_as("SELECT id, loyalty_score FROM users ORDER BY id")
                        .fetch_all(&pool)
                        .await
                        .unwrap_or_default();
                for (id, score) in rows {
                    let key = ctx
                        .cache
                        .score_key(UserId::new(id).unwrap_or_else(|e| panic!("{e}")));
                    if common::redis_get_i64(&key).await != Some(score) {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    eprintln!(
        "cache equal to the database {:?} after the last write",
        started.elapsed()
    );
    role.drop_role(&pool).await;
    drop(daemon);
}

#[sqlx::test(migrations = false)]
async fn the_cache_sync_catches_up_on_what_it_missed_while_no_daemon_ran(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    let ctx = common::ctx(&pool, "gap");
    // The cache holds score 0 for user 1 and 2 (a loyaltyd read filled it).
    for id in [1, 2] {
        loyalty::get_score(&ctx, UserId::new(id).unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Plain SQL writes while no daemon runs: the cache is behind.
    exec(
        &pool,
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (1, 'm', 'topic', 'a', 'approved'), (2, 'm', 'post', 'b', 'rejected')",
    )
    .await;
    let key = |id| {
        ctx.cache
            .score_key(UserId::new(id).unwrap_or_else(|e| panic!("{e}")))
    };
    assert_eq!(common::redis_get_i64(&key(1)).await, Some(0));
    // A transaction still open across the sync: it is read once it commits.
    let mut open = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (3, 'm', 'topic', 'c', 'approved')",
    )
    .execute(&mut *open)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // The daemon's sync, run once: it writes what changed since the last position.
    let synced = common::sync(&ctx).await;
    assert_eq!(synced, loyaltyd::sync::Synced::Wrote(2));
    assert_eq!(
        (
            common::redis_get_i64(&key(1)).await,
            common::redis_get_i64(&key(2)).await
        ),
        (Some(5), Some(-1))
    );
    assert_eq!(common::redis_get_i64(&key(3)).await, None);
    open.commit().await.unwrap_or_else(|e| panic!("{e}"));
    let synced = common::sync(&ctx).await;
    assert_eq!(
        synced,
        loyaltyd::sync::Synced::Wrote(1),
        "the transaction that was open"
    );
    assert_eq!(common::redis_get_i64(&key(3)).await, Some(5));
    // Nothing new: nothing read.
    let synced = common::sync(&ctx).await;
    assert_eq!(synced, loyaltyd::sync::Synced::Wrote(0));
    // Redis away: the position stays, and the window is written once it is back.
    let mut away = common::config(&pool, "gap");
    away.redis.url = common::dead_redis_url().into();
    away.redis.key_prefix = ctx.redis.prefix().to_owned();
    let away = common::ctx_with(&pool, away, false);
    exec(
        &pool,
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (1, 'm', 'post', 'd', 'approved')",
    )
    .await;
    assert_eq!(
        loyaltyd::sync::sync_once(&away)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        loyaltyd::sync::Synced::RedisUnavailable
    );
    assert_eq!(
        loyaltyd::sync::sync_once(&ctx)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        loyaltyd::sync::Synced::Wrote(1)
    );
    assert_eq!(common::redis_get_i64(&key(1)).await, Some(6));
}

#[sqlx::test(migrations = false)]
async fn the_seeds_redis_counter_counts_as_pending_and_a_refresh_keeps_what_arrives_during_it(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "seedcount");
    let key = ctx.redis.key("leaderboard:refresh_pending");
    let mut r = common::redis().await;
    let _: i64 = redis::cmd("INCRBY")
        .arg(&key)
        .arg(12)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = loyaltyd::leaderboard::status(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.pending_changes, 12);
    // Due by the threshold (10) on the seed's count alone.
    let report =
        loyaltyd::leaderboard::refresh(&ctx, false, &tokio_util::sync::CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.refreshed, "{report:?}");
    assert_eq!(report.pending_changes, 12);
    let left: Option<i64> = common::redis_get_i64(&key).await;
    assert_eq!(left, Some(0), "consumed by DECRBY, not deleted");
    // An increment that lands between the read and the commit survives: the
    // refresh takes off what it saw, not everything.
    let _: i64 = redis::cmd("INCRBY")
        .arg(&key)
        .arg(3)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loyaltyd::leaderboard::refresh::consume_seed_pending(&ctx.redis, 2).await;
    assert_eq!(common::redis_get_i64(&key).await, Some(1));
}

/// The forum's role signs its users up and renames them with plain SQL, and
/// can write nothing else of `users`; an event for a user it has not signed
/// up is refused with a line that names the user and says to insert it.
#[sqlx::test(migrations = false)]
async fn the_forum_role_signs_users_up_and_renames_them_and_nothing_else(pool: PgPool) {
    common::migrate(&pool).await;
    let role = ForumRole::create(&pool, "users").await;
    let (ok, out, err) = role.psql(
        "INSERT INTO users (id, username) VALUES (7, 'ada');
         INSERT INTO users (id, username, created_at) VALUES (8, 'bob', '2024-05-01');
         UPDATE users SET username = 'ada lovelace' WHERE id = 7;
         INSERT INTO users (id, username) VALUES (8, 'bobby')
             ON CONFLICT (id) DO UPDATE SET username = EXCLUDED.username;
         INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             VALUES (7, 'moderation_decision', 'topic', 't-1', 'approved');
         SELECT id, username, loyalty_score FROM users ORDER BY id;",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["7|ada lovelace|5", "8|bobby|0"]
    );
    for sql in [
        "UPDATE users SET loyalty_score = 100 WHERE id = 7",
        "INSERT INTO users (id, username, loyalty_score) VALUES (9, 'cy', 50)",
        "UPDATE users SET created_at = now() WHERE id = 7",
        "DELETE FROM users WHERE id = 8",
    ] {
        let (ok, _, err) = role.psql(sql);
        assert!(!ok && err.contains("permission denied"), "{sql}: {err}");
    }
    let (ok, _, err) = role.psql(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (404, 'moderation_decision', 'post', 'p-1', 'approved')",
    );
    assert!(!ok);
    assert!(
        err.contains("unknown user 404") && err.contains("insert the user first"),
        "{err}"
    );
    assert!(
        err.contains("INSERT INTO users (id, username) VALUES (404"),
        "{err}"
    );
    // loyaltyd's own path says the same, with the data exit code.
    let ctx = common::ctx(&pool, "users");
    let refused = loyaltyd::loyalty::record_event(
        &ctx,
        &common::event(404, ContentType::Post, Outcome::Approved),
    )
    .await;
    assert!(
        matches!(refused, Err(loyaltyd::error::Error::UnknownUser(404))),
        "{refused:?}"
    );
    assert_eq!(score(&pool, 7).await, 5);
    scores_exact(&pool, "sign-ups and renames").await;
    role.drop_role(&pool).await;
}

/// A typed client (JDBC, Debian's driver: a Java long binds as BIGINT, an
/// int as INTEGER, and a statement is prepared on the server from its fifth
/// run) finds every read function as the forum's role, and a NULL id is
/// refused with 22023.
#[sqlx::test(migrations = false)]
async fn a_jdbc_client_binding_longs_finds_every_read_function_and_null_ids_are_refused(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    exec(
        &pool,
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             VALUES (1, 'moderation_decision', 'topic', 't-0', 'approved');
         INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('p-1', 't-1'), ('p-2', 't-1');
         REFRESH MATERIALIZED VIEW user_leaderboard;",
    )
    .await;
    let role = ForumRole::create(&pool, "jdbc").await;
    let out = Command::new("java")
        .args(["-cp", "/usr/share/java/postgresql.jar"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/TypedClient.java"
        ))
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:5432/{}",
            role.database
        ))
        .args([role.name.as_str(), role.password.as_str()])
        .output()
        .unwrap_or_else(|e| panic!("java (scripts/services.sh --test installs it): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [
            "page_long 1",
            "page_int 1",
            "standing 5",
            "head p-1",
            "length 2",
            "position 2",
            "position_null refused 22023",
            "page_null refused 22023",
            "record 6",
        ]
    );
    assert_eq!(
        score(&pool, 1).await,
        6,
        "the replayed event id counted once"
    );
    role.drop_role(&pool).await;
}
