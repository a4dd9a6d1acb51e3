//! Reliability: the real daemon under load, with faults injected, and the
//! invariants that must hold afterwards; hostile input everywhere.

use std::sync::Arc;
use std::time::Duration;

use loyaltyd::config::Config;
use loyaltyd::context::Context;
use loyaltyd::loyalty;
use loyaltyd::queues;
use loyaltyd::types::{Priority, QueueKind, Scope, UserId};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::{self, Daemon, PrivateRedis, ident as id, varied_event as event};

/// The daemon's configuration for these tests: fast schedules, its own Redis and metrics port.
fn daemon_config(pool: &PgPool, redis_url: &str, name: &str) -> Config {
    let mut c = common::config(pool, name);
    c.redis.url = redis_url.to_owned().into();
    c.metrics.listen = ([127, 0, 0, 1], common::free_port()).into();
    c.sweep.schedule = "*/2 * * * * *".into();
    c.queues.reorder_schedule = "* * * * * *".into();
    c.leaderboard.check_interval = Duration::from_millis(200);
    c.leaderboard.refresh_threshold = 20;
    c.database.connect_timeout = Duration::from_secs(2);
    c
}

/// 16 writers: events, and adds, removes and position reads on all three queues.
async fn load(ctx: Arc<Context>, users: i64, ops: usize) {
    let mut tasks = Vec::new();
    for w in 0..16usize {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine: Vec<(QueueKind, String)> = Vec::new();
            for i in 0..ops {
                let n = w * 100_000 + i;
                match i % 10 {
                    0..=5 => {
                        let user = (n as i64 * 7919) % users + 1;
                        loyalty::record_event(&ctx, &event(user, n))
                            .await
                            .unwrap_or_else(|e| panic!("record: {e}"));
                    }
                    6 | 7 => {
                        let q = QueueKind::ALL[n % 3];
                        let scope = match q {
                            QueueKind::Topic => Scope::Global,
                            QueueKind::Post => Scope::Topic(id(&format!("t{}", n % 8))),
                            QueueKind::Message => Scope::Conversation(id(&format!("c{}", n % 8))),
                        };
                        let item = format!("w{w}-{i}");
                        let p = Priority::new((n % 13) as f64).unwrap_or_default();
                        queues::add(&ctx, q, &id(&item), &scope, p)
                            .await
                            .unwrap_or_else(|e| panic!("add: {e}"));
                        mine.push((q, item));
                    }
                    8 if !mine.is_empty() => {
                        let (q, item) = mine.remove((n * 31) % mine.len());
                        queues::remove(&ctx, q, &id(&item))
                            .await
                            .unwrap_or_else(|e| panic!("remove {item}: {e}"));
                    }
                    _ => {
                        if let Some((q, item)) = mine.last() {
                            queues::position(&ctx, *q, &id(item))
                                .await
                                .unwrap_or_else(|e| panic!("position: {e}"));
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("writer: {e}"));
    }
}

/// Every invariant of the data: no drift, cache equal to the database or
/// absent, exact queue positions, and pending + consumed = every change (each
/// non-zero event, and each of the `repairs` the sweeps made).
async fn assert_invariants(pool: &PgPool, ctx: &Context, redis: &PrivateRedis, repairs: i64) {
    assert_eq!(
        common::score_drift(pool).await,
        vec![],
        "scores equal their events"
    );
    let users: Vec<(i64, i64)> = sqlx::query_as("SELECT id, loyalty_score FROM users ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (user, score) in users {
        let key = ctx
            .cache
            .score_key(UserId::new(user).unwrap_or_else(|e| panic!("{e}")));
        let cached = redis.get(&key).await;
        assert!(
            cached.is_none() || cached == Some(score),
            "user {user}: cached {cached:?}, database {score}"
        );
    }
    for q in QueueKind::ALL {
        crate::queues::check_invariants(ctx, q).await;
    }
    let (pending, consumed, changes): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT SUM(changes)::BIGINT FROM leaderboard_pending),
                (SELECT consumed_changes FROM leaderboard_state),
                (SELECT count(*) FROM moderation_events WHERE score_delta <> 0)",
    )
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        pending + consumed,
        changes + repairs,
        "pending {pending} + consumed {consumed} = every change"
    );
}

async fn terminate_daemon_connections(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE application_name = 'loyaltyd' AND datname = current_database()) t",
    )
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Terminates the daemon's backends that are inside a transaction or running
/// a statement; returns how many.
async fn cut_busy_daemon_connections(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE application_name = 'loyaltyd' AND datname = current_database()
                                 AND state IN ('active', 'idle in transaction')
                                 -- the sweep's repair batches, not the cache sync's short reads
                                 AND (query LIKE '%scores_repair%' OR query LIKE '%r(uid, previous)%')) t",
    )
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn scrape_sync(d: &Config, series: &str) -> impl Future<Output = f64> {
    let (addr, series) = (d.metrics.listen, series.to_owned());
    async move {
        common::series(&common::scrape(addr).await.unwrap_or_default(), &series).unwrap_or(0.0)
    }
}

#[sqlx::test(migrations = false)]
async fn a_soak_under_load_with_every_job_firing_loses_nothing(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 24).await;
    common::users(&pool, 200).await;
    let redis = PrivateRedis::start().await;
    let config = daemon_config(&pool, &redis.url(), "soak");
    let ctx = Arc::new(common::ctx_with(&pool, config.clone(), true));
    let mut daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    let sweeps = |daemon: &Daemon| {
        daemon
            .events()
            .iter()
            .filter(|e| e["job"] == "integrity_sweep" && e["outcome"] == "success")
            .count()
    };
    load(ctx.clone(), 200, 250).await;
    // The jobs catch up with the last writes (a sweep that began after
    // them ends), then the daemon stops cleanly.
    let swept = sweeps(&daemon) + 1;
    common::eventually("a sweep after the load", Duration::from_secs(30), || {
        let n = sweeps(&daemon);
        async move { n > swept }
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await.0, Some(0));
    assert_invariants(&pool, &ctx, &redis, 0).await;
    let runs: Vec<(String, String)> = daemon
        .events()
        .iter()
        .filter_map(|e| {
            Some((
                e.get("job")?.as_str()?.to_owned(),
                e.get("outcome")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    for job in ["leaderboard_refresh", "integrity_sweep", "queue_reorder"] {
        assert!(
            runs.iter().any(|(j, o)| j == job && o == "success"),
            "{job} ran during the soak"
        );
    }
    let errors: Vec<_> = daemon
        .events()
        .into_iter()
        .filter(|e| e["level"] == "ERROR" || e["level"] == "WARN")
        .collect();
    assert!(errors.is_empty(), "the daemon logged problems: {errors:?}");
}

#[sqlx::test(migrations = false)]
async fn redis_killed_and_postgres_connections_cut_mid_load_lose_nothing(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 24).await;
    common::users(&pool, 100).await;
    let mut redis = PrivateRedis::start().await;
    let config = daemon_config(&pool, &redis.url(), "faults");
    let ctx = Arc::new(common::ctx_with(&pool, config.clone(), true));
    let mut daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    let writers = tokio::spawn(load(ctx.clone(), 100, 300));
    // Each fault lands while the writers write: the events grow between.
    let events = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM moderation_events")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let writing = |from: i64| async move {
        common::eventually("the writers writing", Duration::from_secs(20), || async {
            events().await >= from + 10
        })
        .await;
    };
    writing(0).await;
    redis.kill();
    writing(events().await).await;
    assert!(
        terminate_daemon_connections(&pool).await >= 1,
        "the daemon holds connections"
    );
    writing(events().await).await;
    redis.restart().await;
    writers.await.unwrap_or_else(|e| panic!("writers: {e}"));
    // The daemon carries on by itself: a sweep succeeds after the faults.
    let success = "loyaltyd_job_runs_total{job=\"integrity_sweep\",outcome=\"success\"}";
    let before = scrape_sync(&config, success).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while scrape_sync(&config, success).await < before + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sweep after the faults:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await.0, Some(0));
    assert_invariants(&pool, &ctx, &redis, 0).await;
}

/// Many users, every one drifted: a sweep long enough to interrupt.
async fn long_sweep_data(pool: &PgPool, users: i64) {
    sqlx::query("INSERT INTO users (id, username, loyalty_score, score_version) SELECT g, 'u' || g, 3, 1 FROM generate_series(1, $1) g")
        .bind(users)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn repaired(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM users WHERE loyalty_score = 0")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[sqlx::test(migrations = false)]
async fn connections_cut_mid_sweep_and_a_sigkill_mid_sweep_are_recovered(pool: PgPool) {
    common::migrate(&pool).await;
    long_sweep_data(&pool, 60_000).await;
    let redis = PrivateRedis::start().await;
    let mut config = daemon_config(&pool, &redis.url(), "sweep-faults");
    config.sweep.batch_size = 200;
    config.queues.reorder_schedule = "0 0 3 * * *".into();
    let ctx = common::ctx_with(&pool, config.clone(), false);

    // Connections cut mid-sweep: that run fails, the daemon lives, a later run succeeds.
    let mut daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    common::eventually("the sweep under way", Duration::from_secs(10), || async {
        repaired(&pool).await > 0
    })
    .await;
    // Cut a connection in the middle of a repair transaction (not one idle in
    // the pool, which the pool would just replace).
    common::eventually(
        "a repair transaction cut",
        Duration::from_secs(10),
        || async { cut_busy_daemon_connections(&pool).await > 0 },
    )
    .await;
    daemon
        .wait_for_log("\"outcome\":\"failed\"", Duration::from_secs(30))
        .await;
    let at_cut = repaired(&pool).await;
    assert_eq!(at_cut % 200, 0, "whole batches only: {at_cut}");
    common::eventually(
        "a later sweep progressing",
        Duration::from_secs(15),
        || async { repaired(&pool).await > at_cut },
    )
    .await;

    // SIGKILL mid-sweep: nothing half-applied; a restarted daemon takes its lock and finishes.
    daemon.signal("KILL");
    daemon.wait_exit(Duration::from_secs(5)).await;
    let at_kill = repaired(&pool).await;
    assert_eq!(at_kill % 200, 0, "whole batches only: {at_kill}");
    let mut restarted = Daemon::start(&config);
    restarted
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    common::eventually(
        "the restarted daemon finishing the sweep",
        Duration::from_secs(60),
        || async { common::score_drift(&pool).await.is_empty() },
    )
    .await;
    restarted.signal("TERM");
    assert_eq!(
        restarted.wait_exit(Duration::from_secs(10)).await.0,
        Some(0)
    );
    // Every one of the 60,000 planted drifts was repaired exactly once.
    assert_invariants(&pool, &ctx, &redis, 60_000).await;
}

/// A leaderboard big enough that its refresh can be caught in the act, and
/// pending changes without events (the invariant below is about the counter).
async fn big_board(pool: &PgPool) {
    common::big_board(pool, 200_000).await;
    sqlx::query("UPDATE leaderboard_pending SET changes = 100 WHERE shard = 5")
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn pending(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT SUM(changes)::BIGINT FROM leaderboard_pending), (SELECT consumed_changes FROM leaderboard_state)")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[sqlx::test(migrations = false)]
async fn a_refresh_cut_off_or_stopped_midway_keeps_its_changes_pending(pool: PgPool) {
    common::migrate(&pool).await;
    big_board(&pool).await;
    let redis = PrivateRedis::start().await;
    let mut config = daemon_config(&pool, &redis.url(), "refresh-faults");
    config.sweep.schedule = "0 0 3 * * *".into();
    config.queues.reorder_schedule = "0 0 3 * * *".into();

    // Connections cut mid-refresh: nothing consumed; the next refresh does it.
    let daemon = Daemon::start(&config);
    common::eventually("a refresh", Duration::from_secs(20), || {
        common::refreshing(&pool)
    })
    .await;
    terminate_daemon_connections(&pool).await;
    daemon
        .wait_for_log("\"outcome\":\"failed\"", Duration::from_secs(30))
        .await;
    common::eventually(
        "the next refresh consuming",
        Duration::from_secs(30),
        || async { pending(&pool).await == (0, 100) },
    )
    .await;
    drop(daemon);

    // SIGTERM mid-refresh: exit 0 quickly, the changes still pending.
    sqlx::query("INSERT INTO leaderboard_pending (shard, changes) VALUES (9, 40) ON CONFLICT (shard) DO UPDATE SET changes = 40")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("UPDATE users SET loyalty_score = loyalty_score + 1, score_version = score_version + 1 WHERE id % 2 = 0")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut daemon = Daemon::start(&config);
    common::eventually("a second refresh", Duration::from_secs(20), || {
        common::refreshing(&pool)
    })
    .await;
    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{}", daemon.log_text());
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(
        pending(&pool).await,
        (40, 100),
        "the cancelled refresh consumed nothing"
    );
    assert!(
        !common::refreshing(&pool).await,
        "the refresh statement was cancelled on the server"
    );
}

#[sqlx::test(migrations = false)]
async fn a_writer_cut_off_from_redis_that_exits_at_once_leaves_no_stale_score_behind(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let proxy = common::Proxy::start(common::Upstream::redis()).await;
    let mut config = common::config(&pool, "partition");
    config.redis.url = proxy.redis_url().into();
    config.redis.sync_interval = Duration::from_millis(100);
    config.metrics.listen = ([127, 0, 0, 1], common::free_port()).into();
    let ctx = common::ctx_with(&pool, config.clone(), false);
    let user = UserId::new(1).unwrap_or_else(|e| panic!("{e}"));
    loyalty::record_event(&ctx, &event(1, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}")); // topic approved: 5
    assert_eq!(
        loyalty::get_score(&ctx, user)
            .await
            .map(|s| (s.loyalty_score, s.cached))
            .ok(),
        Some((5, true))
    );
    // The daemon reaches Redis directly; the writer, through the proxy.
    let mut daemon_config = config.clone();
    daemon_config.redis.url = common::redis_url().into();
    let daemon = Daemon::start(&daemon_config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    proxy.cut().await;
    // Redis is alive and still holds 5, but this write cannot reach it, and
    // its process is gone right after (a one-shot CLI call).
    loyalty::record_event(&ctx, &event(1, 4))
        .await
        .unwrap_or_else(|e| panic!("{e}")); // topic rejected: 0
    let written = std::time::Instant::now();
    drop(ctx);
    common::eventually("the stale 5 replaced", Duration::from_secs(5), || async {
        common::redis_get_i64(&format!("{}loyalty:1", config.redis.key_prefix)).await == Some(0)
    })
    .await;
    let bound = written.elapsed();
    eprintln!("stale entry corrected {bound:?} after the write (sync interval 100 ms)");
    drop(daemon);
    proxy.restore().await;
    // And a sweep, from any process, corrects what another process left stale.
    let other = common::ctx(&pool, "partition-other");
    let mut r = common::redis().await;
    let _: () = redis::cmd("SET")
        .arg(other.cache.score_key(user))
        .arg(5)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let report = common::sweep(&other, 100).await;
    assert_eq!(report.cache_repaired, 1);
    assert_eq!(
        common::redis_get_i64(&other.cache.score_key(user)).await,
        Some(0)
    );
}
