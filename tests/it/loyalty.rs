//! Loyalty scores: the rules, atomicity, idempotency, cache coherence under
//! concurrency, Redis outages, and the integrity sweep.

use std::sync::Arc;

use loyaltyd::context::Context;
use loyaltyd::error::Error;
use loyaltyd::loyalty::{self, NewEvent};
use loyaltyd::types::{ContentType, Outcome};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::{self, event, ident, uid};

async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT SUM(changes)::BIGINT FROM leaderboard_pending")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM moderation_events")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[sqlx::test(migrations = false)]
async fn every_content_type_and_outcome_changes_the_score_by_the_rule(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let ctx = common::ctx(&pool, "rules");
    let mut expected = 0;
    let mut changes = 0;
    for content in ContentType::ALL {
        for outcome in Outcome::ALL {
            let r = loyalty::record_event(&ctx, &event(1, content, outcome))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let delta = common::seed_points(content, outcome);
            expected += delta;
            changes += i64::from(delta != 0);
            assert_eq!(
                (r.score_delta, r.loyalty_score),
                (delta, expected),
                "{content:?} {outcome:?}"
            );
            assert_eq!(
                common::redis_get_i64(&ctx.cache.score_key(uid(1))).await,
                Some(expected)
            );
        }
    }
    assert_eq!(
        pending(&pool).await,
        changes,
        "each non-zero delta is one pending change"
    );
    assert_eq!(events(&pool).await, 9);
}

#[sqlx::test(migrations = false)]
async fn an_unknown_user_is_refused_and_nothing_is_written(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let ctx = common::ctx(&pool, "unknown");
    let err = loyalty::record_event(&ctx, &event(42, ContentType::Topic, Outcome::Approved)).await;
    assert!(matches!(err, Err(Error::UnknownUser(42))), "{err:?}");
    assert_eq!(err.map(|_| ()).unwrap_err().exit_code(), 65);
    let batch = [
        event(1, ContentType::Post, Outcome::Approved),
        event(43, ContentType::Post, Outcome::Approved),
    ];
    let err = loyalty::record_events(&ctx, &batch).await;
    assert!(matches!(err, Err(Error::UnknownUser(43))), "{err:?}");
    assert_eq!(events(&pool).await, 0);
    assert_eq!(pending(&pool).await, 0);
    let score: i64 = sqlx::query_scalar("SELECT loyalty_score FROM users WHERE id = 1")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(score, 0, "the batch is all or nothing");
    assert!(matches!(
        loyalty::get_score(&ctx, uid(42)).await,
        Err(Error::UnknownUser(42))
    ));
}

#[sqlx::test(migrations = false)]
async fn a_retried_event_id_counts_once_even_when_retried_concurrently(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 20).await;
    common::users(&pool, 2).await;
    let ctx = Arc::new(common::ctx(&pool, "idem"));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut e = event(1, ContentType::Topic, Outcome::Approved);
            e.event_id = Some(ident("evt-7"));
            loyalty::record_event(&ctx, &e).await
        }));
    }
    let mut firsts = 0;
    for t in tasks {
        let r = t
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r.loyalty_score, 5,
            "every retry answers with the current score"
        );
        firsts += i32::from(!r.duplicate);
    }
    assert_eq!(firsts, 1);
    assert_eq!(events(&pool).await, 1);
    assert_eq!(pending(&pool).await, 1);
    // The same key for another user, or for the same user with another
    // payload, is a conflict (exit 65), not a silent success.
    let mut other = event(2, ContentType::Post, Outcome::Approved);
    other.event_id = Some(ident("evt-7"));
    let mut changed = event(1, ContentType::Topic, Outcome::Rejected);
    changed.event_id = Some(ident("evt-7"));
    for reuse in [other, changed] {
        let err = loyalty::record_event(&ctx, &reuse).await;
        match &err {
            Err(e @ Error::EventIdConflict { event_id, .. }) => {
                assert_eq!(event_id, "evt-7");
                assert_eq!(e.exit_code(), 65);
                assert!(e.to_string().contains("user 1"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(events(&pool).await, 1);
    assert_eq!(common::score_drift(&pool).await, vec![]);
}

#[sqlx::test(migrations = false)]
async fn concurrent_writers_leave_scores_equal_to_their_events_and_the_cache_equal_to_the_database(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 24).await;
    common::users(&pool, 10).await;
    let ctx = Arc::new(common::ctx(&pool, "concurrent"));
    let contents = ContentType::ALL;
    let outcomes = Outcome::ALL;
    let mut tasks = Vec::new();
    // 32 tasks, 2,000 events in all, over 10 users; readers refill the cache meanwhile.
    for t in 0..32usize {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..(2000 / 32 + usize::from(t < 2000 % 32)) {
                let n = t * 1000 + i;
                let user = (n * 7 % 10 + 1) as i64;
                let e = event(user, contents[n % 3], outcomes[(n / 3) % 3]);
                loyalty::record_event(&ctx, &e)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                if i % 4 == 0 {
                    loyalty::get_score(&ctx, uid((n % 10 + 1) as i64))
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(events(&pool).await, 2000);
    assert_eq!(
        common::score_drift(&pool).await,
        vec![],
        "scores equal their events"
    );
    let db: Vec<(i64, i64)> = sqlx::query_as("SELECT id, loyalty_score FROM users ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (id, score) in db {
        let cached = common::redis_get_i64(&ctx.cache.score_key(uid(id))).await;
        assert_eq!(cached, Some(score), "cache of user {id}");
    }
    let nonzero: i64 =
        sqlx::query_scalar("SELECT count(*) FROM moderation_events WHERE score_delta <> 0")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pending(&pool).await, nonzero);
}

#[sqlx::test(migrations = false)]
async fn a_reader_refilling_the_cache_from_an_old_snapshot_cannot_overwrite_a_newer_score(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let ctx = common::ctx(&pool, "versions");
    loyalty::record_event(&ctx, &event(1, ContentType::Topic, Outcome::Approved))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // What a slow reader would have read before that write: score 0, version 0.
    let stale = common::stale_score(1);
    assert!(ctx.cache.set_scores(&[stale]).await);
    assert_eq!(
        common::redis_get_i64(&ctx.cache.score_key(uid(1))).await,
        Some(5)
    );
    let fresh = loyalty::get_score(&ctx, uid(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((fresh.loyalty_score, fresh.cached), (5, true));
}

#[sqlx::test(migrations = false)]
async fn with_redis_unreachable_writes_and_reads_still_work(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let mut config = common::config(&pool, "down");
    config.redis.url = common::dead_redis_url().into();
    let ctx = common::ctx_with(&pool, config, true);
    for _ in 0..3 {
        let r = loyalty::record_event(&ctx, &event(1, ContentType::Post, Outcome::Approved))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!r.duplicate);
    }
    let s = loyalty::get_score(&ctx, uid(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s.loyalty_score, s.cached), (3, false));
    let batch = loyalty::record_events(&ctx, &[event(1, ContentType::Topic, Outcome::Rejected)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(batch.scores, vec![(uid(1), -2)]);
    let sweep = common::sweep(&ctx, 100).await;
    assert_eq!(
        (sweep.users_checked, sweep.drifted_users, sweep.completed),
        (1, 0, true)
    );
}

#[sqlx::test(migrations = false)]
async fn a_batch_is_one_transaction_with_consistent_scores(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 50).await;
    let ctx = common::ctx(&pool, "batch");
    let batch: Vec<NewEvent> = (0..500)
        .map(|i| {
            let mut e = event(
                i % 50 + 1,
                ContentType::ALL[(i % 3) as usize],
                Outcome::ALL[((i / 3) % 3) as usize],
            );
            e.event_id = (i % 10 == 0).then(|| ident(&format!("b-{i}")));
            e
        })
        .collect();
    let r = loyalty::record_events(&ctx, &batch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.events_recorded, 500);
    // Replaying the batch records only the events without an id.
    let again = loyalty::record_events(&ctx, &batch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.events_recorded, 450);
    assert_eq!(common::score_drift(&pool).await, vec![]);
    for (user, score) in again.scores {
        assert_eq!(
            common::redis_get_i64(&ctx.cache.score_key(user)).await,
            Some(score)
        );
    }
}

#[sqlx::test(migrations = false)]
async fn concurrent_batches_over_the_same_users_do_not_deadlock(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 10).await;
    common::users(&pool, 20).await;
    let ctx = Arc::new(common::ctx(&pool, "batches"));
    let mut tasks = Vec::new();
    for t in 0..8i64 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..5i64 {
                // Each task walks the users in a different order.
                let batch: Vec<NewEvent> = (0..40)
                    .map(|i| {
                        event(
                            (i * (t + 1) + round) % 20 + 1,
                            ContentType::Post,
                            Outcome::Approved,
                        )
                    })
                    .collect();
                loyalty::record_events(&ctx, &batch)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(events(&pool).await, 8 * 5 * 40);
    assert_eq!(common::score_drift(&pool).await, vec![]);
}

async fn corrupt(pool: &PgPool, users: &[i64]) {
    sqlx::query("UPDATE users SET loyalty_score = loyalty_score + 1000 + id, score_version = score_version + 1 WHERE id = ANY($1)")
        .bind(users)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[sqlx::test(migrations = false)]
async fn the_sweep_repairs_exactly_the_corrupted_users_in_the_database_and_the_cache(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 300).await;
    let ctx = common::ctx(&pool, "sweep");
    let batch: Vec<NewEvent> = (0..3000)
        .map(|i| {
            event(
                i % 300 + 1,
                ContentType::ALL[(i % 3) as usize],
                Outcome::ALL[((i / 7) % 3) as usize],
            )
        })
        .collect();
    loyalty::record_events(&ctx, &batch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let clean = common::sweep(&ctx, 64).await;
    assert_eq!(
        (
            clean.users_checked,
            clean.drifted_users,
            clean.cache_repaired
        ),
        (300, 0, 0)
    );
    assert_eq!(clean.batches, 0, "nothing to repair, no repair transaction");

    let corrupted = [3, 64, 65, 200, 300];
    corrupt(&pool, &corrupted).await;
    // A cache entry corrupted on its own (the database is right for user 10).
    let mut r = common::redis().await;
    let _: () = redis::cmd("SET")
        .arg(ctx.cache.score_key(uid(10)))
        .arg(-999)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pending_before = pending(&pool).await;

    let report = common::sweep(&ctx, 64).await;
    assert_eq!((report.drifted_users, report.batches), (5, 1));
    assert_eq!(
        report.drifted_user_ids,
        corrupted.iter().map(|&i| uid(i)).collect::<Vec<_>>()
    );
    assert_eq!(report.cache_repaired, 1);
    assert_eq!(common::score_drift(&pool).await, vec![]);
    for id in 1..=300 {
        let db: i64 = sqlx::query_scalar("SELECT loyalty_score FROM users WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let cached = common::redis_get_i64(&ctx.cache.score_key(uid(id))).await;
        assert!(
            cached.is_none() || cached == Some(db),
            "user {id}: cache {cached:?}, db {db}"
        );
    }
    assert_eq!(
        pending(&pool).await,
        pending_before + 5,
        "repairs move the leaderboard"
    );
    let again = common::sweep(&ctx, 64).await;
    assert_eq!((again.drifted_users, again.cache_repaired), (0, 0));
}

#[sqlx::test(migrations = false)]
async fn recalculating_one_user_repairs_only_that_user(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 2).await;
    let ctx = common::ctx(&pool, "recalc");
    for user in [1, 2] {
        loyalty::record_event(&ctx, &event(user, ContentType::Topic, Outcome::Approved))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    corrupt(&pool, &[1, 2]).await;
    let r = loyalty::recalc_user(&ctx, uid(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.loyalty_score, r.previous_score, r.drifted),
        (5, 1006, true)
    );
    assert_eq!(
        common::redis_get_i64(&ctx.cache.score_key(uid(1))).await,
        Some(5)
    );
    assert_eq!(common::score_drift(&pool).await, vec![(2, 1007, 5)]);
    let r = loyalty::recalc_user(&ctx, uid(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.drifted);
    assert!(matches!(
        loyalty::recalc_user(&ctx, uid(9)).await,
        Err(Error::UnknownUser(9))
    ));
}

#[sqlx::test(migrations = false)]
async fn a_sweep_racing_writers_never_reverts_their_changes(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 16).await;
    common::users(&pool, 40).await;
    let ctx = Arc::new(common::ctx(&pool, "race"));
    let writers: Vec<_> = (0..8i64)
        .map(|t| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                for i in 0..150i64 {
                    let e = event(
                        (t * 150 + i) % 40 + 1,
                        ContentType::ALL[(i % 3) as usize],
                        Outcome::Approved,
                    );
                    loyalty::record_event(&ctx, &e)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            })
        })
        .collect();
    let sweeper = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut drifted = 0;
            for _ in 0..10 {
                let r = common::sweep(&ctx, 7).await;
                drifted += r.drifted_users;
            }
            drifted
        })
    };
    for w in writers {
        w.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let drifted = sweeper.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(drifted, 0, "concurrent writes are not drift");
    assert_eq!(common::score_drift(&pool).await, vec![]);
}

#[sqlx::test(migrations = false)]
async fn demo_seed_writes_scores_consistent_with_its_events(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx: Context = common::ctx(&pool, "demo");
    let r = loyaltyd::demo::seed(&ctx, 500, 20_000, 300, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.users, r.events, r.queue_items), (500, 20_000, 300));
    assert_eq!(events(&pool).await, 20_000);
    assert_eq!(common::score_drift(&pool).await, vec![]);
    let mix: Vec<(String, i64)> = sqlx::query_as(
        "SELECT content_type, count(*) FROM moderation_events GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mix.len(), 3, "all content types appear: {mix:?}");
    let ranked: i64 = sqlx::query_scalar("SELECT count(*) FROM user_leaderboard")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ranked > 0, "the board is refreshed after seeding");
    let sweep = common::sweep(&ctx, 1000).await;
    assert_eq!(sweep.drifted_users, 0);
    // A second run adds to the first.
    loyaltyd::demo::seed(&ctx, 10, 100, 10, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events(&pool).await, 20_100);
    assert_eq!(common::score_drift(&pool).await, vec![]);
}

#[sqlx::test(migrations = false)]
async fn demo_seed_is_not_bound_by_the_request_statement_timeout(pool: PgPool) {
    common::migrate(&pool).await;
    // Each of its statements takes far longer than this limit (at ten
    // million users, longer than the default 30 s: the seed failed there).
    let mut cfg = common::config(&pool, "demo-limit");
    cfg.database.statement_timeout = std::time::Duration::from_millis(50);
    // The program's own pool, which applies the limit to every session.
    let ctx = Context::connect(cfg, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = loyaltyd::demo::seed(&ctx, 100_000, 300_000, 0, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.users, r.events), (100_000, 300_000));
    assert_eq!(events(&pool).await, 300_000);
}

#[sqlx::test(migrations = false)]
async fn cache_entries_from_before_a_database_restore_are_outranked_and_repaired(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 2).await;
    let ctx = common::ctx(&pool, "restore");
    let mut r = common::redis().await;
    // What the cache kept from before the restore: versions this database never reached.
    let now_us = chrono::Utc::now().timestamp_micros();
    for (user, version) in [(1, now_us - 5_000_000), (2, now_us + 3_600_000_000)] {
        let key = ctx.cache.score_key(uid(user));
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(4242)
            .query_async(&mut r)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _: () = redis::cmd("SET")
            .arg(format!("{key}:version"))
            .arg(version)
            .query_async(&mut r)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // The next write of user 1 outranks the old entry: versions follow the clock.
    let rec = loyalty::record_event(&ctx, &event(1, ContentType::Post, Outcome::Approved))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        common::redis_get_i64(&ctx.cache.score_key(uid(1))).await,
        Some(rec.loyalty_score)
    );
    // User 2's entry claims a version from the future: only the sweep can tell, and repairs it.
    assert_eq!(
        common::redis_get_i64(&ctx.cache.score_key(uid(2))).await,
        Some(4242)
    );
    let report = common::sweep(&ctx, 100).await;
    assert_eq!((report.drifted_users, report.cache_repaired), (0, 1));
    assert_eq!(
        common::redis_get_i64(&ctx.cache.score_key(uid(2))).await,
        Some(0)
    );
    let again = common::sweep(&ctx, 100).await;
    assert_eq!(again.cache_repaired, 0, "repaired for good");
}

/// A batch of more users than one script call takes (500: the cache and the
/// live board are written in calls of that many, and a cluster's cache one
/// user a call): every user's cached score and board place equal the
/// database's, by the integrity sweep and by the board's own check, also
/// for users whose entries an older write left behind.
#[sqlx::test(migrations = false)]
async fn a_batch_across_several_script_calls_leaves_every_cache_entry_and_board_place_exact(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    common::users(&pool, 1_200).await;
    let ctx = common::ctx(&pool, "batch-chunks");
    loyaltyd::leaderboard::live::build(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Two batches over the same 1,200 users: the second overwrites what the
    // first wrote, in three script calls each.
    for round in 0..2 {
        let batch: Vec<NewEvent> = (1..=1_200)
            .map(|u| {
                event(
                    u,
                    ContentType::ALL[((u + round) % 3) as usize],
                    Outcome::ALL[((u / 7 + round) % 3) as usize],
                )
            })
            .collect();
        let r = loyalty::record_events(&ctx, &batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.events_recorded, 1_200);
    }
    crate::live::assert_exact(&ctx, &pool, "after batches of 1,200 users").await;
    let swept = common::sweep(&ctx, 500).await;
    assert_eq!(
        (
            swept.users_checked,
            swept.drifted_users,
            swept.cache_repaired
        ),
        (1_200, 0, 0),
        "{swept:?}"
    );
}

/// A refusal keeps the database's error behind it: its SQLSTATE reads back
/// from the error loyaltyd returns.
#[sqlx::test(migrations = false)]
async fn errors_keep_the_sqlstate_of_the_database_error_behind_them(pool: PgPool) {
    use loyaltyd::error::DbContext;
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let direct = sqlx::query("UPDATE users SET loyalty_score = 5 WHERE id = 1")
        .execute(&pool)
        .await
        .db("writing a score directly");
    let e = direct
        .err()
        .unwrap_or_else(|| panic!("a direct score write was let through"));
    assert_eq!(e.sqlstate().as_deref(), Some("LY003"), "{e}");
    assert_eq!(e.exit_code(), 1);
    let missing = sqlx::query("SELECT no_such_function()")
        .execute(&pool)
        .await
        .db("calling");
    let e = missing
        .err()
        .unwrap_or_else(|| panic!("an undefined function ran"));
    assert_eq!(e.sqlstate().as_deref(), Some("42883"), "{e}");
    assert!(e.one_line().contains("loyaltyd migrate"), "{e}");
}
