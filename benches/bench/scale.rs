//! Past one host: the cache on a Redis Cluster of three masters against one
//! Redis, and a leaderboard rank read on a streaming replica against the
//! primary, side by side in one run. Both engines are started here, by the
//! same code the tests use (`tests/it/engines.rs`, `crate::engines` in both
//! the bench binary and the test crate).

use std::time::Duration;

use loyaltyd::context::Context;
use loyaltyd::{leaderboard, loyalty};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::cases::{Rng, event, uid};
use super::{Bench, Report, Side, timed};
use crate::engines::{PgReplica, RedisCluster};

type R<T> = Result<T, String>;

const GROUP: &str = "Past one host";

/// Every case of the group.
pub async fn scale(b: &Bench, report: &mut Report) -> R<()> {
    cluster(b, report).await?;
    replica(b, report).await
}

/// `record_event` and a cached `score get` on one Redis and on the cluster.
async fn cluster(b: &Bench, report: &mut Report) -> R<()> {
    eprintln!("bench: starting a Redis Cluster (3 masters, 3 replicas)");
    let cluster = RedisCluster::start().await;
    let mut config = b.config.clone();
    config.redis.cluster_nodes = cluster.urls().into_iter().map(Into::into).collect();
    let on_cluster =
        Context::with_pool(config, b.pool.clone(), false).map_err(|e| e.to_string())?;
    let single = &b.quiet;
    let s = &b.sizes;
    let mut rng = Rng(0x5eed_c1a5_7e11_0042);
    // [record single, record cluster, get single, get cluster]
    let mut t: [Vec<Duration>; 4] = Default::default();
    for i in 0..s.iterations {
        let user = 1 + rng.below(s.users as u64) as i64;
        let ev = event(user, i)?;
        // Alternate which side goes first.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let ctx = if side == 0 { single } else { &on_cluster };
            t[side].push(timed(loyalty::record_event(ctx, &ev)).await?.1);
        }
        // The write cached the new score on both: these are hits.
        for side in order {
            let ctx = if side == 0 { single } else { &on_cluster };
            let (score, took) = timed(loyalty::get_score(ctx, uid(user)?)).await?;
            if !score.cached {
                return Err(format!("score get on side {side} missed the cache"));
            }
            t[2 + side].push(took);
        }
    }
    for (case, single, clustered) in [
        ("record_event (one Redis vs a 3-master cluster)", 0, 1),
        (
            "score get, cache hit (one Redis vs a 3-master cluster)",
            2,
            3,
        ),
    ] {
        report.case(
            GROUP,
            case,
            vec![
                Side::new("loyaltyd", &t[single]).note("one Redis"),
                Side::new("loyaltyd on Redis Cluster", &t[clustered]),
            ],
        );
    }
    Ok(())
}

/// A rank read from the view, on the primary and on a streaming replica.
async fn replica(b: &Bench, report: &mut Report) -> R<()> {
    let mut config = b.config.clone();
    config.leaderboard.live = false; // the view: what a replica serves
    let primary =
        Context::with_pool(config.clone(), b.pool.clone(), false).map_err(|e| e.to_string())?;
    leaderboard::refresh(&primary, true, &CancellationToken::new())
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("bench: starting a streaming replica (pg_basebackup -R)");
    let standby = PgReplica::start().await;
    let url = standby.url(&b.db_name);
    config.database.replicas = vec![url.clone().into()];
    let on_replica =
        Context::with_pool(config, b.pool.clone(), false).map_err(|e| e.to_string())?;
    let direct = PgPool::connect(&url).await.map_err(|e| e.to_string())?;
    caught_up(&b.pool, &direct).await?;
    let before = transactions(&direct).await?;

    let s = &b.sizes;
    let max_id: i64 = sqlx::query_scalar("SELECT max(id) FROM users")
        .fetch_one(&b.pool)
        .await
        .map_err(|e| e.to_string())?;
    let mut rng = Rng(0x0dd5_eed5_1234_5678);
    let mut t: [Vec<Duration>; 2] = Default::default();
    for i in 0..s.iterations {
        let user = uid(1 + rng.below(max_id as u64) as i64)?;
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut ranks = [None, None];
        for side in order {
            let ctx = if side == 0 { &primary } else { &on_replica };
            let (standing, took) = timed(leaderboard::rank(ctx, user)).await?;
            ranks[side] = Some(standing.rank);
            t[side].push(took);
        }
        if ranks[0] != ranks[1] {
            return Err(format!("user {user}: the replica ranked differently"));
        }
    }
    // Proof that the replica served them: its own transaction count grows
    // by at least one per read (backends report their counts within seconds).
    let mut served = 0;
    for _ in 0..150 {
        served = transactions(&direct).await? - before;
        if served >= s.iterations as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if served < s.iterations as i64 {
        return Err(format!(
            "the replica committed {served} transactions for {} reads",
            s.iterations
        ));
    }
    report.case(
        GROUP,
        "one user's rank from the view (primary vs a streaming replica)",
        vec![
            Side::new("loyaltyd", &t[0]).note("primary"),
            Side::new("loyaltyd on a replica", &t[1]),
        ],
    );
    direct.close().await;
    Ok(())
}

/// Waits until the replica has replayed everything written so far.
async fn caught_up(primary: &PgPool, replica: &PgPool) -> R<()> {
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::TEXT")
        .fetch_one(primary)
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..600 {
        let done: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&lsn)
            .fetch_one(replica)
            .await
            .unwrap_or(false);
        if done {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the replica did not catch up in a minute".into())
}

/// Transactions committed in this database, as the replica counts them.
async fn transactions(replica: &PgPool) -> R<i64> {
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(replica)
    .await
    .map_err(|e| e.to_string())
}
