//! loyaltyd on a real Redis Cluster (three masters, three replicas, started
//! per test): the cache and its versions, leases and sync; the live board;
//! perf lists and `stats` across masters; the seed's counter; the daemon;
//! an unreachable cluster; and a master SIGKILLed under 16 writers.

use std::time::Duration;

use loyaltyd::config::Config;
use loyaltyd::context::Context;
use loyaltyd::leaderboard::{self, Source};
use loyaltyd::loyalty;
use loyaltyd::types::{ContentType, Outcome};
use redis::AsyncCommands;
use redis::cluster_async::ClusterConnection;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::common::{self, Daemon, uid};
use crate::engines::RedisCluster;

fn config(pool: &PgPool, cluster: &RedisCluster, name: &str) -> Config {
    let mut c = common::config(pool, name);
    c.redis.cluster_nodes = cluster.urls().into_iter().map(Into::into).collect();
    c.redis.url = common::dead_redis_url().into(); // not used in cluster mode
    c
}

async fn client(cluster: &RedisCluster) -> ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap_or_else(|e| panic!("{e}"))
        .get_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn get(c: &mut ClusterConnection, key: &str) -> Option<String> {
    c.get(key)
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

/// Every user's cached score next to the database's (users with a cached
/// score); `None` when the cluster did not answer.
async fn try_cached_vs_db(ctx: &Context, pool: &PgPool) -> Option<Vec<(i64, i64, i64)>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT id, loyalty_score FROM users ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let users: Vec<_> = rows.iter().map(|r| uid(r.0)).collect();
    let cached = ctx.cache.get_scores(&users).await?;
    Some(
        rows.iter()
            .zip(cached)
            .filter_map(|(&(id, db), c)| c.map(|c| (id, c, db)))
            .collect(),
    )
}

async fn cached_vs_db(ctx: &Context, pool: &PgPool) -> Vec<(i64, i64, i64)> {
    try_cached_vs_db(ctx, pool)
        .await
        .unwrap_or_else(|| panic!("the cluster did not answer an MGET"))
}

#[sqlx::test(migrations = false)]
async fn scores_versions_leases_and_the_sync_work_across_hash_slots(pool: PgPool) {
    common::migrate(&pool).await;
    let cluster = RedisCluster::start().await;
    common::users(&pool, 60).await;
    let ctx = common::ctx_with(&pool, config(&pool, &cluster, "cl-cache"), false);
    let mut c = client(&cluster).await;
    // One user: the seed's key with a hash tag, its version beside it.
    loyalty::record_event(
        &ctx,
        &common::event(1, ContentType::Topic, Outcome::Approved),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let key = ctx.cache.score_key(uid(1));
    assert!(key.ends_with("loyalty:{1}"), "{key}");
    assert_eq!(get(&mut c, &key).await.as_deref(), Some("5"));
    assert!(get(&mut c, &ctx.cache.version_key(uid(1))).await.is_some());
    // An older score cannot land over it.
    let stale = common::stale_score(1);
    assert!(ctx.cache.set_scores(&[stale]).await);
    assert_eq!(get(&mut c, &key).await.as_deref(), Some("5"));
    // A batch over 60 users: their keys spread over every master.
    let batch: Vec<_> = (1..=60)
        .map(|u| common::varied_event(u, u as usize))
        .collect();
    loyalty::record_events(&ctx, &batch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pairs = cached_vs_db(&ctx, &pool).await;
    assert_eq!(pairs.len(), 60, "every score cached");
    assert!(pairs.iter().all(|(_, c, d)| c == d), "{pairs:?}");
    // A miss is refilled under a lease.
    assert!(ctx.redis.delete(&[ctx.cache.score_key(uid(7))]).await);
    let first = loyalty::get_score(&ctx, uid(7))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!first.cached);
    let again = loyalty::get_score(&ctx, uid(7))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (again.cached, again.loyalty_score),
        (true, first.loyalty_score)
    );
    // Plain SQL writes reach the cluster through the sync.
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         SELECT g, 'moderation_decision', 'topic', 'sql-' || g, 'approved' FROM generate_series(1, 60) g",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    common::sync(&ctx).await;
    let pairs = cached_vs_db(&ctx, &pool).await;
    assert!(pairs.iter().all(|(_, c, d)| c == d), "{pairs:?}");
    // The sweep's cache check corrects a poisoned entry on any master.
    let _: () = c
        .set(ctx.cache.score_key(uid(33)), "999")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let report = common::sweep(&ctx, 16).await;
    assert_eq!(
        (report.drifted_users, report.cache_repaired),
        (0, 1),
        "{report:?}"
    );
    assert!(report.cache_checked);
}

#[sqlx::test(migrations = false)]
async fn the_live_board_perf_lists_stats_and_the_seed_counter_work_on_a_cluster(pool: PgPool) {
    common::migrate(&pool).await;
    let cluster = RedisCluster::start().await;
    common::users(&pool, 30).await;
    // A key prefix whose three perf lists below do not all hash to one
    // master (a random prefix put them on one in about 1 run in 9, and the
    // check below could not tell a scan of one master from a scan of all).
    let mut c = client(&cluster).await;
    let mut cfg = config(&pool, &cluster, "cl-board");
    loop {
        let mut masters = std::collections::BTreeSet::new();
        for list in [
            "perf:loyalty_updates",
            "perf:queue:add:topic",
            "perf:queue:position:topic",
        ] {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("{}{list}", cfg.redis.key_prefix))
                .query_async(&mut c)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            masters.insert(slot * 3 / 16384);
        }
        if masters.len() >= 2 {
            break;
        }
        cfg = config(&pool, &cluster, "cl-board");
    }
    let ctx = common::ctx_with(&pool, cfg.clone(), true);
    for u in 1..=30 {
        loyalty::record_event(&ctx, &common::varied_event(u, u as usize))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let built = loyaltyd::leaderboard::live::build(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(built > 0);
    for u in 1..=30 {
        loyalty::record_event(&ctx, &common::varied_event(u, 100 + u as usize))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    crate::live::assert_exact(&ctx, &pool, "on a cluster").await;
    // Perf lists land on several masters; stats finds every one.
    let queue = loyaltyd::types::QueueKind::Topic;
    for i in 0..5 {
        let id = loyaltyd::types::Ident::parse("t", &format!("topic-{i}"))
            .unwrap_or_else(|e| panic!("{e}"));
        loyaltyd::queues::add(
            &ctx,
            queue,
            &id,
            &loyaltyd::types::Scope::Global,
            loyaltyd::types::Priority::new(1.0).unwrap_or_else(|e| panic!("{e}")),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        loyaltyd::queues::position(&ctx, queue, &id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    ctx.perf.flush(Duration::from_secs(5)).await;
    let stats = loyaltyd::perf::collect(&ctx.redis, &ctx.perf)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let keys: Vec<&str> = stats.lists.iter().map(|l| l.key.as_str()).collect();
    assert!(keys.len() >= 3, "{keys:?}");
    let mut slots_nodes = std::collections::BTreeSet::new();
    for key in &keys {
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        slots_nodes.insert(slot * 3 / 16384); // three masters, equal ranges
    }
    assert!(slots_nodes.len() >= 2, "lists on one master only: {keys:?}");
    // The seed's pending counter is read and consumed.
    let pending_key = ctx.redis.key(loyaltyd::leaderboard::refresh::SEED_PENDING);
    let _: i64 = c
        .incr(&pending_key, 4)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let before = leaderboard::status(&ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(before.pending_changes >= 4);
    common::refresh(&ctx).await;
    assert_eq!(get(&mut c, &pending_key).await.as_deref(), Some("0"));
}

#[sqlx::test(migrations = false)]
async fn the_daemon_and_the_cli_run_on_a_cluster(pool: PgPool) {
    common::migrate(&pool).await;
    let cluster = RedisCluster::start().await;
    common::users(&pool, 20).await;
    let mut cfg = config(&pool, &cluster, "cl-daemon");
    cfg.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let daemon = Daemon::start(&cfg);
    daemon
        .wait_for_log("built the live leaderboard", Duration::from_secs(30))
        .await;
    let rec = common::run_json(&cfg, &common::record_args("3", "topic", "c", "approved"));
    assert_eq!(rec["loyalty_score"], 5);
    let score = common::run_json(&cfg, &["score", "get", "--user", "3"]);
    assert_eq!(
        (score["loyalty_score"].clone(), score["cached"].clone()),
        (5.into(), true.into())
    );
    let rank = common::run_json(&cfg, &["leaderboard", "rank", "--user", "3"]);
    assert_eq!(
        (rank["rank"].clone(), rank["source"].clone()),
        (1.into(), "live".into())
    );
    let stats = common::run_json(&cfg, &["stats"]);
    assert!(
        stats["lists"].as_array().is_some_and(|l| !l.is_empty()),
        "{stats}"
    );
    // A plain SQL write reaches the cluster through the daemon's sync.
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (3, 'd', 'topic', 'c2', 'approved')",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let cfg2 = cfg.clone();
    common::eventually(
        "the daemon syncs the score",
        Duration::from_secs(10),
        || {
            let cfg = cfg2.clone();
            async move {
                common::run_json(&cfg, &["score", "get", "--user", "3"])["loyalty_score"] == 10
            }
        },
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn an_unreachable_cluster_is_a_cache_miss_and_writes_succeed(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 2).await;
    let mut cfg = common::config(&pool, "cl-dead");
    cfg.redis.cluster_nodes = vec![
        common::dead_redis_url().into(),
        common::dead_redis_url().into(),
    ];
    let ctx = common::ctx_with(&pool, cfg, false);
    let started = std::time::Instant::now();
    let rec = loyalty::record_event(
        &ctx,
        &common::event(1, ContentType::Topic, Outcome::Approved),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rec.loyalty_score, 5);
    let got = loyalty::get_score(&ctx, uid(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((got.loyalty_score, got.cached), (5, false));
    let rank = leaderboard::rank(&ctx, uid(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rank.source, Source::View);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[sqlx::test(migrations = false)]
async fn a_master_killed_under_sixteen_writers_loses_no_write_and_no_cached_score_goes_back(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    let mut cluster = RedisCluster::start().await;
    common::users(&pool, 200).await;
    let wide = common::wide_pool(pool.connect_options().as_ref().clone(), 24).await;
    let mut cfg = config(&wide, &cluster, "cl-failover");
    cfg.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let ctx = common::ctx_with(&wide, cfg.clone(), false);
    // The daemon keeps the cache in sync and watches for failovers.
    let daemon = Daemon::start(&cfg);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..16usize {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let (mut n, mut i) = (0u32, 0usize);
            while !stop.is_cancelled() {
                let user = 1 + ((w * 7919 + i * 31) % 200) as i64;
                loyalty::record_event(&ctx, &common::varied_event(user, w * 100_000 + i))
                    .await
                    .unwrap_or_else(|e| panic!("a write failed during the failover: {e}"));
                n += 1;
                i += 1;
            }
            n
        }));
    }
    common::eventually("the writers writing", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM moderation_events")
            .fetch_one(&wide)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            >= 200
    })
    .await;
    // The master dies while its replica is frozen: the writes it took in
    // that time never reach the replica that takes its place (replication
    // is asynchronous), so their cached scores are lost with it.
    let victim = cluster.masters()[0];
    let mut frozen = cluster.freeze(cluster.replica_of(victim), 1.5);
    // Into the freeze: the writes of this window are what the replica misses.
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.kill(victim);
    // The writers stop with it: no later write of the same users hides
    // what was lost.
    stop.cancel();
    let _ = frozen.wait();
    common::eventually("a replica taking over", Duration::from_secs(30), || {
        let gone = !cluster.masters().contains(&victim);
        async move { gone }
    })
    .await;
    cluster.wait_settled().await;
    assert!(!cluster.masters().contains(&victim), "a replica took over");
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM moderation_events")
        .fetch_one(&wide)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        events,
        i64::from(writes),
        "every acknowledged write is there"
    );
    // Once settled, no cached score is behind the database: the daemon
    // rewrote what the dead master may have taken with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let differing: Option<Vec<_>> = try_cached_vs_db(&ctx, &wide).await.map(|pairs| {
            pairs
                .into_iter()
                .filter(|(_, cached, db)| cached != db)
                .collect()
        });
        if differing.as_ref().is_some_and(Vec::is_empty) {
            break;
        }
        if differing.is_none() {
            // The test's own reader may still be on the dead node (the
            // daemon's failover watch reconnects the daemon's client; this
            // one is the test's): what a library user does after a failover.
            ctx.redis.reconnect().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cached scores still differ from the database 30 s after the cluster settled \
             (user, cached, database): {differing:?}\ndaemon log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = common::sweep(&ctx, 50).await;
    assert_eq!(
        (report.drifted_users, report.cache_repaired),
        (0, 0),
        "{report:?}"
    );
    assert!(report.cache_checked, "{report:?}");
    eprintln!("failover: {writes} writes by 16 writers; master {victim} killed");
    drop(daemon);
}

#[sqlx::test(migrations = false)]
async fn after_a_failover_the_daemon_rewrites_what_the_new_master_missed(pool: PgPool) {
    common::migrate(&pool).await;
    let cluster = RedisCluster::start().await;
    common::users(&pool, 100).await;
    let mut cfg = config(&pool, &cluster, "cl-resync");
    cfg.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let ctx = common::ctx_with(&pool, cfg.clone(), false);
    let batch: Vec<_> = (1..=100)
        .map(|u| common::varied_event(u, 1 + u as usize % 2))
        .collect();
    loyalty::record_events(&ctx, &batch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&cfg);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    // What a replica that missed the last writes holds: older scores at
    // older versions (set directly; the newer-version-wins script would
    // refuse them).
    let mut c = client(&cluster).await;
    for u in 1..=100 {
        let _: () = redis::pipe()
            .set(ctx.cache.score_key(uid(u)), -7)
            .set(ctx.cache.version_key(uid(u)), 1)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // A replica takes over (a manual failover: the masters change).
    let old = cluster.masters();
    let replica = cluster.replica_of(old[0]);
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &replica.to_string(), "cluster", "failover"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    common::eventually("the replica takes over", Duration::from_secs(20), || {
        let masters = cluster.masters();
        async move { masters.contains(&replica) }
    })
    .await;
    common::eventually(
        "the daemon rewrites the recent scores",
        Duration::from_secs(20),
        || {
            let (ctx, pool) = (ctx.clone(), pool.clone());
            async move {
                try_cached_vs_db(&ctx, &pool)
                    .await
                    .is_some_and(|pairs| pairs.len() == 100 && pairs.iter().all(|(_, c, d)| c == d))
            }
        },
    )
    .await;
    daemon
        .wait_for_log(
            "rewrote recent scores after a failover",
            Duration::from_secs(5),
        )
        .await;
}

#[sqlx::test(migrations = false)]
async fn a_python_cluster_client_reads_exact_live_standing_through_the_function_library(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    let cluster = RedisCluster::start().await;
    common::users(&pool, 90).await;
    let ctx = common::ctx_with(&pool, config(&pool, &cluster, "cl-python"), false);
    // The library goes to every master: the board's keys share one slot,
    // but which master holds it is the cluster's business.
    let board = loyaltyd::leaderboard::live::Board::new(&ctx.redis);
    common::live_board_after_writers(&ctx, &pool, 90, 40).await;
    let db = crate::adopt::database(&pool).await;
    let node = format!("127.0.0.1:{}", cluster.ports[0]);
    let out = common::python_live_standing(&db, "cluster", &node, ctx.redis.prefix(), "exact");
    assert!(out.contains("\"users\": 90"), "{out}");
    // A master that lost the library (FUNCTION FLUSH on each) gets it back
    // from the check the daemon runs.
    let mut c = client(&cluster).await;
    let _: redis::Value = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        board.ensure_library(false).await,
        "the library is loaded again"
    );
    common::python_live_standing(&db, "cluster", &node, ctx.redis.prefix(), "exact");
}
