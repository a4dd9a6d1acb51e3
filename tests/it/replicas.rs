//! Reads that may lag, on a real streaming replica (`pg_basebackup -R`,
//! started per test): leaderboard reads are served by it within the lag
//! bound, by the primary beyond it, and by the primary without an error
//! when the replica stops in the middle of the reads.

use std::time::Duration;

use loyaltyd::context::Context;
use loyaltyd::leaderboard;
use loyaltyd::types::{ContentType, Outcome};
use sqlx::PgPool;

use crate::common::{self, uid};
use crate::engines::PgReplica;

const ON_REPLICA: &str = r#"loyaltyd_lagging_reads_total{target="replica",reason="ok"}"#;
const LAGGED: &str = r#"loyaltyd_lagging_reads_total{target="primary",reason="lag"}"#;

/// Waits until the replica has replayed everything the primary wrote so far.
/// Bounded by progress, not by wall time: the replica replays the WAL of the
/// whole cluster, which a loaded machine's other tests write by the
/// gigabyte, so catching up can take longer than any fixed bound while
/// replay moves on. Only a replay that stands still for 30 s fails.
async fn caught_up(pool: &PgPool, replica: &PgPool) {
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::TEXT")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut last, mut moved) = (String::new(), std::time::Instant::now());
    loop {
        let (replayed, done): (Option<String>, Option<bool>) = sqlx::query_as(
            "SELECT pg_last_wal_replay_lsn()::TEXT, pg_last_wal_replay_lsn() >= $1::pg_lsn",
        )
        .bind(&target)
        .fetch_one(replica)
        .await
        .unwrap_or((None, None));
        if done == Some(true) {
            return;
        }
        let replayed = replayed.unwrap_or_default();
        if replayed != last {
            (last, moved) = (replayed, std::time::Instant::now());
        }
        assert!(
            moved.elapsed() < Duration::from_secs(30),
            "the replica's replay stood still for 30 s at {last}, short of {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Users with scores and a refreshed view, and a context reading the replica.
async fn setup(pool: &PgPool, replica: &PgReplica, name: &str) -> (Context, PgPool) {
    common::users(pool, 40).await;
    let mut cfg = common::config(pool, name);
    cfg.leaderboard.live = false; // the view: what replicas serve
    let db: String = sqlx::query_scalar("SELECT current_database()::TEXT")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cfg.database.replicas = vec![replica.url(&db).into()];
    cfg.database.replica_max_lag = Duration::from_secs(1);
    let ctx = common::ctx_with(pool, cfg, false);
    for u in 1..=40 {
        loyaltyd::loyalty::record_event(&ctx, &common::varied_event(u, u as usize))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    common::refresh(&ctx).await;
    let direct = sqlx::PgPool::connect(&replica.url(&db))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    caught_up(pool, &direct).await;
    (ctx, direct)
}

#[sqlx::test(migrations = false)]
async fn leaderboard_reads_are_served_by_a_replica_within_the_lag_bound(pool: PgPool) {
    common::migrate(&pool).await;
    let addr = common::exporter().await;
    let replica = PgReplica::start().await;
    let (ctx, direct) = setup(&pool, &replica, "replica-reads").await;
    let before = common::metric(addr, ON_REPLICA).await;
    for u in 1..=20 {
        let on_replica = leaderboard::rank(&ctx, uid(u))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let want: Option<i64> =
            sqlx::query_scalar("SELECT rank FROM user_leaderboard WHERE user_id = $1")
                .bind(u)
                .fetch_optional(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(on_replica.rank, want, "user {u}");
    }
    let page = leaderboard::page(&ctx, 10, 0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page.entries.len(), 10);
    let served = common::metric(addr, ON_REPLICA).await - before;
    assert!(served >= 21.0, "{served} reads counted on the replica");
    // Replay paused while the primary moves on: past the bound, the
    // primary answers.
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&direct)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loyaltyd::loyalty::record_event(
        &ctx,
        &common::event(1, ContentType::Topic, Outcome::Approved),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let lagged_before = common::metric(addr, LAGGED).await;
    // Until the replica's lag passes the bound, reads may still go to it;
    // from then on each goes to the primary and is counted there.
    common::eventually(
        "reads past the lag bound going to the primary",
        Duration::from_secs(20),
        || async {
            for u in 1..=5 {
                leaderboard::rank(&ctx, uid(u))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            common::metric(addr, LAGGED).await - lagged_before >= 5.0
        },
    )
    .await;
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&direct)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    direct.close().await;
}

#[sqlx::test(migrations = false)]
async fn a_replica_stopped_mid_reads_sends_them_to_the_primary_without_an_error(pool: PgPool) {
    common::migrate(&pool).await;
    let addr = common::exporter().await;
    let mut replica = PgReplica::start().await;
    let (ctx, direct) = setup(&pool, &replica, "replica-stop").await;
    direct.close().await;
    let fell_back = || async {
        common::metric(
            addr,
            r#"loyaltyd_lagging_reads_total{target="primary",reason="error"}"#,
        )
        .await
            + common::metric(
                addr,
                r#"loyaltyd_lagging_reads_total{target="primary",reason="down"}"#,
            )
            .await
    };
    let (served_before, fell_back_before) =
        (common::metric(addr, ON_REPLICA).await, fell_back().await);
    let reads = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut ranks = Vec::new();
            for i in 0..300 {
                let s = leaderboard::rank(&ctx, uid(1 + i % 40))
                    .await
                    .unwrap_or_else(|e| panic!("a read failed when the replica stopped: {e}"));
                ranks.push((1 + i % 40, s.rank));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ranks
        })
    };
    // The replica stops while the reads go to it.
    common::eventually("reads on the replica", Duration::from_secs(20), || async {
        common::metric(addr, ON_REPLICA).await >= served_before + 20.0
    })
    .await;
    replica.stop();
    let ranks = reads.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ranks.len(), 300);
    assert!(
        common::metric(addr, ON_REPLICA).await > served_before,
        "the replica served reads first"
    );
    assert!(fell_back().await > fell_back_before, "then the primary did");
    for (user, rank) in ranks {
        let want: Option<i64> =
            sqlx::query_scalar("SELECT rank FROM user_leaderboard WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rank, want, "user {user}");
    }
}
