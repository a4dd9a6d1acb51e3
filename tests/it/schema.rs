//! The data model: migrations, the seed's indexes and view, database-enforced rules.

use loyaltyd::MIGRATOR;
use sqlx::PgPool;

#[sqlx::test(migrator = "loyaltyd::MIGRATOR")]
async fn migrations_apply_to_an_empty_database_and_again_change_nothing(pool: PgPool) {
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

#[sqlx::test(migrator = "loyaltyd::MIGRATOR")]
async fn every_seed_index_and_the_view_exist(pool: PgPool) {
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

#[sqlx::test(
    migrator = "loyaltyd::MIGRATOR",
    fixtures("../fixtures/leaderboard_ties.sql")
)]
async fn the_view_ranks_by_score_then_sign_up_and_leaves_non_positive_scores_off(pool: PgPool) {
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

#[sqlx::test(migrator = "loyaltyd::MIGRATOR")]
async fn the_database_refuses_unknown_content_types_outcomes_and_bad_identifiers(pool: PgPool) {
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

#[sqlx::test(migrator = "loyaltyd::MIGRATOR")]
async fn the_database_scores_every_content_type_and_outcome_like_the_rule(pool: PgPool) {
    use loyaltyd::types::{ContentType, Outcome, score_delta};
    sqlx::query("INSERT INTO users (id, username) VALUES (1, 'u')")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for content in ContentType::ALL {
        for outcome in Outcome::ALL {
            let delta: i32 = sqlx::query_scalar(
                "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                 VALUES (1, 'e', $1, 'c', $2) RETURNING score_delta",
            )
            .bind(content.as_str())
            .bind(outcome.as_str())
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                i64::from(delta),
                score_delta(content, outcome),
                "{content:?} {outcome:?}"
            );
        }
    }
}
