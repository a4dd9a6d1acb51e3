//! The data model: migrations, the seed's indexes and view, database-enforced rules.

use std::time::Duration;

use loyaltyd::MIGRATOR;
use sqlx::PgPool;

use crate::common;

#[sqlx::test(migrations = false)]
async fn migrations_apply_to_an_empty_database_and_again_change_nothing(pool: PgPool) {
    common::migrate(&pool).await;
    let applied = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let before = applied(pool.clone()).await;
    assert_eq!(before as usize, MIGRATOR.iter().count());
    MIGRATOR
        .run(&pool)
        .await
        .unwrap_or_else(|e| panic!("second run: {e}"));
    loyaltyd::db::migrate(&pool)
        .await
        .unwrap_or_else(|e| panic!("third run: {e}"));
    assert_eq!(applied(pool).await, before);
}

#[sqlx::test(migrations = false)]
async fn every_seed_index_and_the_view_exist(pool: PgPool) {
    common::migrate(&pool).await;
    let seed_indexes = [
        ("users", "idx_users_loyalty_score_desc"),
        ("users", "idx_users_loyalty_username"),
        ("moderation_events", "idx_moderation_events_user_time"),
        ("moderation_events", "idx_moderation_events_content"),
        ("moderation_events", "idx_moderation_events_outcome"),
        ("topic_creation_queue", "idx_topic_queue_position"),
        ("topic_creation_queue", "idx_topic_queue_priority"),
        ("post_moderation_queue", "idx_post_queue_topic_position"),
        ("post_moderation_queue", "idx_post_queue_topic_priority"),
        ("private_message_queue", "idx_message_queue_conv_position"),
        ("private_message_queue", "idx_message_queue_conv_priority"),
        ("users", "idx_users_username"),
        ("users", "idx_users_created_at"),
        ("user_leaderboard", "idx_leaderboard_user_id"),
        ("user_leaderboard", "idx_leaderboard_rank"),
        ("user_leaderboard", "idx_leaderboard_score"),
        ("user_leaderboard", "idx_leaderboard_topic_creators"),
    ];
    let present: Vec<(String, String)> = sqlx::query_as(
        "SELECT tablename::TEXT, indexname::TEXT FROM pg_indexes WHERE schemaname = 'public'",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (table, index) in seed_indexes {
        assert!(
            present.iter().any(|(t, i)| t == table && i == index),
            "missing index {index} on {table}"
        );
    }
    let unique: bool = sqlx::query_scalar(
        "SELECT indisunique FROM pg_index WHERE indexrelid = 'idx_leaderboard_user_id'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(unique, "REFRESH ... CONCURRENTLY needs the unique index");
    let kind: String =
        sqlx::query_scalar("SELECT relkind::TEXT FROM pg_class WHERE relname = 'user_leaderboard'")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kind, "m", "user_leaderboard is a materialized view");
}

#[sqlx::test(migrations = false)]
async fn the_view_ranks_by_score_then_sign_up_and_leaves_non_positive_scores_off(pool: PgPool) {
    common::migrate(&pool).await;
    sqlx::raw_sql(include_str!("../fixtures/leaderboard_ties.sql"))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("fixture: {e}"));
    let rows: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT user_id, rank, can_create_topics FROM user_leaderboard ORDER BY rank",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Five positive users: 0.1 × 5 = 0.5, so nobody may create topics.
    assert_eq!(
        rows,
        vec![
            (2, 1, false),
            (6, 2, false),
            (3, 3, false),
            (1, 4, false),
            (7, 5, false)
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn the_database_refuses_unknown_content_types_outcomes_and_bad_identifiers(pool: PgPool) {
    common::migrate(&pool).await;
    sqlx::query("INSERT INTO users (id, username) VALUES (1, 'u')")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let insert = |content: &'static str, outcome: &'static str, id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                 VALUES (1, 'e', $1, $2, $3)",
            )
            .bind(content)
            .bind(id)
            .bind(outcome)
            .execute(&pool)
            .await
        }
    };
    assert!(insert("comment", "approved", "c".into()).await.is_err());
    assert!(insert("post", "deleted", "c".into()).await.is_err());
    assert!(insert("post", "approved", String::new()).await.is_err());
    assert!(insert("post", "approved", "x".repeat(256)).await.is_err());
    assert!(insert("post", "approved", "x".repeat(255)).await.is_ok());
    let nan = sqlx::query("INSERT INTO topic_creation_queue (topic_id, position_in_queue, priority_score) VALUES ('t', 1, 'NaN')")
        .execute(&pool)
        .await;
    assert!(nan.is_err(), "a NaN priority must be refused");
}

#[sqlx::test(migrations = false)]
async fn the_database_scores_every_content_type_and_outcome_like_the_rule(pool: PgPool) {
    common::migrate(&pool).await;
    use loyaltyd::types::{ContentType, Outcome};
    sqlx::query("INSERT INTO users (id, username) VALUES (1, 'u')")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for content in ContentType::ALL {
        for outcome in Outcome::ALL {
            let (stored, rule): (i32, i32) = sqlx::query_as(
                "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                 VALUES (1, 'e', $1, 'c', $2) RETURNING score_delta, event_points($1, $2)",
            )
            .bind(content.as_str())
            .bind(outcome.as_str())
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            let want = common::seed_points(content, outcome);
            assert_eq!(
                (i64::from(stored), i64::from(rule)),
                (want, want),
                "{content:?} {outcome:?}"
            );
        }
    }
}

/// The live schema of a migrated database, checked in: a change of it shows
/// in review as a change of tests/schema.snapshot. `LOYALTYD_BLESS=1`
/// writes the snapshot anew from the database.
#[sqlx::test(migrations = false)]
async fn a_migrated_database_is_the_checked_in_schema_snapshot(pool: PgPool) {
    common::migrate(&pool).await;
    let live: Vec<String> = common::schema_text(&pool, &[]).await.into_iter().collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schema.snapshot");
    let text = format!("{}\n", live.join("\n"));
    if std::env::var_os("LOYALTYD_BLESS").is_some() {
        std::fs::write(path, &text).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let snapshot = std::fs::read_to_string(path).unwrap_or_default();
    let kept: std::collections::BTreeSet<&str> = snapshot.lines().collect();
    let only_live: Vec<&String> = live.iter().filter(|l| !kept.contains(l.as_str())).collect();
    let only_snapshot: Vec<&&str> = kept
        .iter()
        .filter(|l| !live.iter().any(|x| x == **l))
        .collect();
    assert!(
        only_live.is_empty() && only_snapshot.is_empty(),
        "the migrated schema differs from tests/schema.snapshot (run the test with LOYALTYD_BLESS=1 \
         to take the database's, and review the change):\nonly in the database: {only_live:#?}\nonly in the snapshot: {only_snapshot:#?}"
    );
}

/// Every PL/pgSQL function and trigger function, checked by plpgsql_check
/// (each trigger function with the table and transition tables of every
/// trigger that runs it; every warning class on): nothing to report.
#[sqlx::test(migrations = false)]
async fn plpgsql_check_finds_nothing_in_any_function_or_trigger(pool: PgPool) {
    common::migrate(&pool).await;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS plpgsql_check")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("plpgsql_check (scripts/services.sh --test installs it): {e}"));
    let checked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE l.lanname = 'plpgsql' AND p.pronamespace = current_schema()::REGNAMESPACE",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let found: Vec<(String, String, String, String, Option<i32>)> = sqlx::query_as(
        "SELECT p.oid::REGPROCEDURE::TEXT, COALESCE(t.tgrelid::REGCLASS::TEXT, ''), c.level, c.message, c.lineno
         FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang AND l.lanname = 'plpgsql'
         LEFT JOIN pg_trigger t ON t.tgfoid = p.oid AND NOT t.tgisinternal
         CROSS JOIN LATERAL plpgsql_check_function_tb(p.oid, COALESCE(t.tgrelid, 0),
             fatal_errors => false, other_warnings => true, performance_warnings => true,
             extra_warnings => true, security_warnings => true,
             newtable => t.tgnewtable, oldtable => t.tgoldtable) c
         WHERE p.pronamespace = current_schema()::REGNAMESPACE
           AND (p.prorettype <> 'trigger'::REGTYPE OR t.oid IS NOT NULL)
         ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(checked > 30, "only {checked} PL/pgSQL functions found");
    assert!(found.is_empty(), "plpgsql_check: {found:#?}");
}

/// A database migrated by the last release (commit ce328a4: migrations 1 to
/// 12, every function defined by them) upgrades in place while a forum's
/// least-privileged role calls the SQL API with prepared statements
/// (asyncpg): none of its calls fails, the release's own definitions that
/// sql/ no longer has are gone, and the database is what `migrate` builds
/// from empty, its scores equal to their events and its positions dense.
#[sqlx::test(migrations = false)]
async fn a_database_of_the_last_release_upgrades_in_place_under_prepared_statement_writers(
    pool: PgPool,
) {
    let release = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            MIGRATOR
                .iter()
                .filter(|m| m.version <= 12)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    release
        .run(&pool)
        .await
        .unwrap_or_else(|e| panic!("the release's migrations: {e}"));
    common::users(&pool, 200).await;
    sqlx::raw_sql(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         SELECT 1 + g % 200, 'e', (ARRAY['post', 'topic', 'private_message'])[1 + g % 3], 'c' || g,
                (ARRAY['approved', 'rejected', 'calibrated', 'approved'])[1 + g % 4]
         FROM generate_series(1, 2000) g;
         INSERT INTO post_moderation_queue (post_id, topic_id) SELECT 'p-' || g, 't-' || (1 + g % 5) FROM generate_series(1, 200) g;
         INSERT INTO topic_creation_queue (topic_id) SELECT 'tq-' || g FROM generate_series(1, 50) g;",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let role = common::ForumRole::create(&pool, "upgrade").await;
    let stop = std::env::temp_dir().join(format!("upgrade-stop-{}", role.name));
    let _ = std::fs::remove_file(&stop);
    let app = common::asyncpg_app(&role.url(), 4, 120, 200, &stop.to_string_lossy(), "api");
    let events = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM moderation_events")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let before = events().await;
    common::eventually("the forum writing", Duration::from_secs(60), || async {
        events().await > before + 100
    })
    .await;
    common::migrate(&pool).await;
    let upgraded = events().await;
    common::eventually(
        "the forum writing after the upgrade",
        Duration::from_secs(60),
        || async { events().await > upgraded + 100 },
    )
    .await;
    std::fs::write(&stop, b"").unwrap_or_else(|e| panic!("{e}"));
    let summary = common::finish(app).await;
    assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
    assert!(summary["done"].as_i64().unwrap_or(0) > 200, "{summary}");

    let fresh = common::migrated_database(&pool, "fresh").await;
    assert_eq!(
        common::schema_text(&pool, &[]).await,
        common::schema_text(&fresh, &[]).await,
        "the upgraded schema is not what migrate builds"
    );
    let gone: Option<String> = sqlx::query_scalar(
        "SELECT string_agg(f, ', ') FROM unnest(ARRAY['apply_score_deltas(bigint[],bigint[],bigint)',
                'moderation_events_scored()', 'leaderboard_shard()']) f WHERE to_regprocedure(f) IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        gone, None,
        "the release's retired functions are still there"
    );
    assert_eq!(common::score_drift(&pool).await, vec![]);
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM queue_head('post', 't-1', 1000) ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(positions, (1..=40).collect::<Vec<i64>>());
    // The role keeps what it had, and has what the definitions add.
    let (ok, out, err) = role.psql(
        "SELECT position FROM queue_position('post', 'p-5');
         SELECT queue_length('post', 't-1');",
    );
    assert!(ok, "{err}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["1", "40"]);
    role.drop_role(&pool).await;
}
