//! The leaderboard: the seed's ranking, debounced and exclusive refreshes that
//! lose no change and block no reader.

use std::time::Duration;

use loyaltyd::error::Error;
use loyaltyd::leaderboard::{self, RefreshReason};
use loyaltyd::loyalty;
use loyaltyd::types::{ContentType, Outcome};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::common::{self, uid};

/// The seed's definition computed directly: (user, rank, can_create_topics).
async fn expected_board(pool: &PgPool) -> Vec<(i64, i64, bool)> {
    let mut users: Vec<(i64, i64, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT id, loyalty_score, created_at FROM users WHERE loyalty_score > 0")
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    users.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    let n = users.len() as i64;
    users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let rank = i as i64 + 1;
            (u.0, rank, rank * 10 <= n) // rank <= 0.1 × n, in integers
        })
        .collect()
}

#[sqlx::test(migrations = false)]
async fn page_and_rank_match_the_seed_definition_at_the_ten_percent_boundaries(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "board");
    for positive in [9i64, 10, 11, 19, 20] {
        sqlx::query("DELETE FROM users")
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Sign-ups in reverse id order.
        common::tied_users(&pool, positive, 1).await;
        common::refresh(&ctx).await;
        let expected = expected_board(&pool).await;
        assert_eq!(expected.len() as i64, positive);
        let page = leaderboard::page(&ctx, 1000, 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<(i64, i64, bool)> = page
            .entries
            .iter()
            .map(|e| (e.user_id, e.rank, e.can_create_topics))
            .collect();
        assert_eq!(got, expected, "{positive} positive users");
        let topic_creators = got.iter().filter(|e| e.2).count() as i64;
        assert_eq!(topic_creators, positive / 10, "{positive} positive users");
        for (user, rank, can) in &expected {
            let s = leaderboard::rank(&ctx, uid(*user))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((s.rank, s.can_create_topics), (Some(*rank), *can));
        }
        // Paging by offset is the same board in slices.
        let tail = leaderboard::page(&ctx, 3, 5)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let ranks: Vec<i64> = tail.entries.iter().map(|e| e.rank).collect();
        assert_eq!(ranks, vec![6, 7, 8]);
        let unranked = leaderboard::rank(&ctx, uid(positive + 1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((unranked.rank, unranked.can_create_topics), (None, false));
    }
}

#[sqlx::test(migrations = false)]
async fn bad_page_arguments_and_unknown_users_are_refused_clearly(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "args");
    for (limit, offset) in [(0, 0), (1001, 0), (-1, 0), (10, -1)] {
        let err = leaderboard::page(&ctx, limit, offset).await;
        assert!(
            matches!(err, Err(Error::Invalid { .. })),
            "{limit} {offset}: {err:?}"
        );
    }
    assert!(matches!(
        leaderboard::rank(&ctx, uid(5)).await,
        Err(Error::UnknownUser(5))
    ));
}

#[sqlx::test(migrations = false)]
async fn refresh_follows_the_debounce_policy_and_records_its_time(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    let mut config = common::config(&pool, "debounce");
    config.leaderboard.refresh_threshold = 3;
    config.leaderboard.max_staleness = Duration::from_secs(3600);
    let ctx = common::ctx_with(&pool, config, false);
    let record = |user: i64| {
        let ctx = ctx.clone();
        async move {
            let e = common::event(user, ContentType::Post, Outcome::Approved);
            loyalty::record_event(&ctx, &e)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    let no = CancellationToken::new();
    assert_eq!(
        leaderboard::refresh(&ctx, false, &no)
            .await
            .map(|r| r.reason)
            .ok(),
        Some(RefreshReason::NotDue)
    );
    record(1).await;
    record(2).await;
    let r = leaderboard::refresh(&ctx, false, &no)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.refreshed, r.reason, r.pending_changes),
        (false, RefreshReason::NotDue, 2)
    );
    record(3).await;
    let r = leaderboard::refresh(&ctx, false, &no)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.refreshed, r.reason, r.pending_changes),
        (true, RefreshReason::Due, 3)
    );
    let status = leaderboard::status(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.pending_changes, 0);
    assert!(status.age_seconds < 5.0, "{status:?}");
    assert_eq!(
        leaderboard::page(&ctx, 10, 0)
            .await
            .map(|p| p.entries.len())
            .ok(),
        Some(3)
    );

    // One change and a stale view: due by staleness.
    record(1).await;
    sqlx::query("UPDATE leaderboard_state SET refreshed_at = now() - INTERVAL '2 hours'")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stale = leaderboard::status(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stale.age_seconds > 7000.0,
        "the age is read from the database: {stale:?}"
    );
    let r = leaderboard::refresh(&ctx, false, &no)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.refreshed, r.reason), (true, RefreshReason::Due));
    let consumed: i64 = sqlx::query_scalar("SELECT consumed_changes FROM leaderboard_state")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(consumed, 4);
}

#[sqlx::test(migrations = false)]
async fn two_refreshes_started_together_from_two_pools_run_once(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let a = common::wide_pool(opts.clone(), 4).await;
    let b = common::wide_pool(opts, 4).await;
    common::big_board(&a, 150_000).await;
    let ctx_a = common::ctx(&a, "two-a");
    let ctx_b = common::ctx(&b, "two-b");
    let no = CancellationToken::new();
    let (ra, rb) = tokio::join!(
        leaderboard::refresh(&ctx_a, true, &no),
        leaderboard::refresh(&ctx_b, true, &no)
    );
    let (ra, rb) = (
        ra.unwrap_or_else(|e| panic!("{e}")),
        rb.unwrap_or_else(|e| panic!("{e}")),
    );
    let reasons = [ra.reason, rb.reason];
    assert!(
        reasons.contains(&RefreshReason::Forced) && reasons.contains(&RefreshReason::Busy),
        "{reasons:?}"
    );
    assert_ne!(ra.refreshed, rb.refreshed);
}

#[sqlx::test(migrations = false)]
async fn changes_recorded_during_a_refresh_stay_pending_and_readers_are_not_blocked(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 8).await;
    common::big_board(&pool, 150_000).await;
    let ctx = common::ctx(&pool, "during");
    common::refresh(&ctx).await; // populate
    sqlx::query("UPDATE users SET loyalty_score = loyalty_score + 1, score_version = score_version + 1 WHERE id % 3 = 0")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refreshing = {
        let ctx = ctx.clone();
        tokio::spawn(async move { common::refresh(&ctx).await })
    };
    common::eventually("the refresh starting", Duration::from_secs(10), || {
        common::refreshing(&pool)
    })
    .await;
    // A reader during the refresh gets the old board without waiting.
    let read =
        tokio::time::timeout(Duration::from_secs(2), leaderboard::page(&ctx, 100, 5000)).await;
    let page = read
        .unwrap_or_else(|_| panic!("the reader was blocked"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page.entries.len(), 100);
    assert!(
        !refreshing.is_finished(),
        "the read must have happened during the refresh"
    );
    // Writes during the refresh land and stay pending.
    for user in 1..=5 {
        let e = common::event(user, ContentType::Topic, Outcome::Approved);
        loyalty::record_event(&ctx, &e)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        !refreshing.is_finished(),
        "the writes must have happened during the refresh"
    );
    let report = refreshing.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.refreshed, report.pending_changes), (true, 0));
    let status = leaderboard::status(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.pending_changes, 5,
        "changes that arrived during the refresh are still pending"
    );
}

#[sqlx::test(migrations = false)]
async fn a_cancelled_refresh_rolls_back_and_keeps_its_changes_pending(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 4).await;
    common::big_board(&pool, 150_000).await;
    sqlx::query("UPDATE leaderboard_pending SET changes = 7 WHERE shard = 3")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ctx = common::ctx(&pool, "cancel");
    let cancel = CancellationToken::new();
    let refreshing = {
        let (ctx, cancel) = (ctx.clone(), cancel.clone());
        tokio::spawn(async move { leaderboard::refresh(&ctx, true, &cancel).await })
    };
    common::eventually("the refresh starting", Duration::from_secs(10), || {
        common::refreshing(&pool)
    })
    .await;
    let started = std::time::Instant::now();
    cancel.cancel();
    let result = refreshing.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(result, Err(Error::Cancelled { .. })), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cancelled at once, not after finishing"
    );
    let status = leaderboard::status(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.pending_changes, 7);
    let ranked: i64 = sqlx::query_scalar("SELECT count(*) FROM user_leaderboard")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ranked, 0, "the view is as before");
    // The lock went with the transaction: the next refresh runs.
    assert!(common::refresh(&ctx).await.refreshed);
}
