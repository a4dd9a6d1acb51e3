//! Faults found by fault injection, each reproduced: a leaked job lock, a
//! retry after a kill after commit, refills over a lost version key, the
//! demo beside live writers, the sweep's cache check and its time limit,
//! reused event ids, an unreachable Redis, a score overflow.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use loyaltyd::cache::Lookup;
use loyaltyd::jobs::{self, JobRunner};
use loyaltyd::loyalty::{self, NewEvent};
use loyaltyd::telemetry::{Job, JobOutcome};
use loyaltyd::types::{ContentType, Outcome};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::common::{self, PrivateRedis, Proxy, Upstream, ident, uid};

fn topic(user: i64, outcome: Outcome) -> NewEvent {
    NewEvent {
        user: uid(user),
        event_type: ident("moderation_decision"),
        content_type: ContentType::Topic,
        content_id: ident("t-1"),
        outcome,
        event_id: None,
    }
}

/// Advisory locks of the job held by any backend of this database.
async fn job_locks_held(pool: &PgPool, job: Job) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 1
           AND classid::BIGINT = ($1 >> 32) AND objid::BIGINT = ($1 & 4294967295)
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(jobs::lock_key(job))
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[sqlx::test(migrations = false)]
async fn a_tick_whose_claim_fails_under_a_lock_storm_lets_go_of_the_job_lock(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 6).await;
    let mut config = common::config(&pool, "storm");
    config.queues.reorder_schedule = "* * * * * *".into();
    config.database.statement_timeout = Duration::from_millis(300);
    // Two daemons' runners, each on its own pool (as on two hosts).
    let daemon = |name: &str| {
        let pool = loyaltyd::db::connect_lazy(&config.database).unwrap_or_else(|e| panic!("{e}"));
        let ctx = common::ctx_with(&pool, config.clone(), false);
        JobRunner::new(Job::QueueReorder, ctx, name.into()).unwrap_or_else(|e| panic!("{e}"))
    };
    let (a, b) = (daemon("a"), daemon("b"));
    // Maintenance holds job_ticks: the claim runs into statement_timeout.
    let mut storm = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("LOCK TABLE job_ticks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *storm)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let never = CancellationToken::new();
    assert_eq!(a.tick(&never).await, JobOutcome::Failed);
    // The failed tick's lock went with it: nobody holds the job's lock.
    assert_eq!(job_locks_held(&pool, Job::QueueReorder).await, 0);
    storm.rollback().await.unwrap_or_else(|e| panic!("{e}"));
    // The other daemon runs the next tick instead of skipping it as
    // "another instance is running it". (A tick is a second of the
    // schedule: time itself, not a condition, is what is waited for.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(b.tick(&never).await, JobOutcome::Skipped); // ran: nothing to reorder
    let succeeded: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT succeeded_at FROM job_ticks WHERE job = 'queue_reorder'")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        succeeded.is_some(),
        "the tick ran to its end and was recorded"
    );
}

#[sqlx::test(migrations = false)]
async fn a_job_lock_held_by_an_idle_connection_past_the_time_limit_is_a_failure_not_a_skip(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    let mut config = common::config(&pool, "leak");
    config.queues.reorder_timeout = Duration::from_millis(500);
    let ctx = common::ctx_with(&pool, config, false);
    let runner =
        JobRunner::new(Job::QueueReorder, ctx, "me".into()).unwrap_or_else(|e| panic!("{e}"));
    // A connection that took the lock and then sat idle (a leak elsewhere).
    let mut leaked = pool
        .acquire()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .detach();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(jobs::lock_key(Job::QueueReorder))
        .execute(&mut leaked)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let never = CancellationToken::new();
    // Within the time limit it could be a run: skipped.
    assert_eq!(runner.tick(&never).await, JobOutcome::Skipped);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Idle past the limit: no run lasts that long, so it is a leak.
    assert_eq!(runner.tick(&never).await, JobOutcome::Failed);
    drop(leaked);
}

/// `event record` of user 1's `content_type` item `content_id`, with an
/// event id.
fn record<'a>(
    content_type: &'a str,
    content_id: &'a str,
    outcome: &'a str,
    event_id: &'a str,
) -> Vec<&'a str> {
    let mut args = common::record_args("1", content_type, content_id, outcome);
    args.extend(["--event-id", event_id]);
    args
}

/// The event the CLI records, is killed in, and then retries.
const RETRIED: [&str; 4] = ["topic", "t-2", "rejected", "retry-me"];

#[sqlx::test(migrations = false)]
async fn a_retry_of_an_event_id_after_a_kill_after_commit_repairs_the_cache(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let proxy = Proxy::start(Upstream::redis()).await;
    let mut config = common::config(&pool, "killed");
    config.redis.url = proxy.redis_url().into();
    config.redis.timeout = Duration::from_secs(30);
    let ctx = common::ctx_with(&pool, config.clone(), false);
    loyalty::record_event(&ctx, &topic(1, Outcome::Approved))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let key = ctx.cache.score_key(uid(1));
    assert_eq!(common::redis_get_i64(&key).await, Some(5));
    // The CLI commits, then hangs on its cache write (Redis stopped
    // answering); it is killed there.
    proxy.stall();
    let mut cli = common::loyaltyd(&config)
        .args(record(RETRIED[0], RETRIED[1], RETRIED[2], RETRIED[3]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    common::eventually("the event committed", Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM moderation_events WHERE event_id = 'retry-me'",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(0)
            == 1
    })
    .await;
    // A moment into its wait, not a condition: where a kill lands.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = cli.kill(); // SIGKILL
    let _ = cli.wait();
    proxy.resume();
    assert_eq!(
        common::redis_get_i64(&key).await,
        Some(5),
        "stale after the kill"
    );
    // The caller retries with the same event id: counted once, cache repaired.
    // (Off the runtime's thread: the proxy runs on it.)
    let retry_config = config.clone();
    let out = tokio::task::spawn_blocking(move || {
        common::run_json(
            &retry_config,
            &record(RETRIED[0], RETRIED[1], RETRIED[2], RETRIED[3]),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out["duplicate"], true);
    assert_eq!(out["loyalty_score"], 0);
    assert_eq!(common::redis_get_i64(&key).await, Some(0));
    assert_eq!(common::score_drift(&pool).await, vec![]);
}

#[sqlx::test(migrations = false)]
async fn a_refill_cannot_land_over_a_newer_score_when_redis_loses_keys(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let mut redis = PrivateRedis::start().await;
    let mut config = common::config(&pool, "lease");
    config.redis.url = redis.url().into();
    let ctx = common::ctx_with(&pool, config, false);
    let user = uid(1);
    let key = ctx.cache.score_key(user);
    let read_score = || async {
        let (score, version): (i64, i64) =
            sqlx::query_as("SELECT loyalty_score, score_version FROM users WHERE id = 1")
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        loyaltyd::score_row::ScoreRow {
            user,
            score,
            version,
            created_us: 0,
            username: None,
        }
    };
    let redis_url = redis.url();
    let del = |keys: Vec<String>| {
        let url = redis_url.clone();
        async move {
            let mut c = redis::Client::open(url)
                .unwrap_or_else(|e| panic!("{e}"))
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _: i64 = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut c)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    // Three ways to lose the version key between a reader's database read
    // and its refill; each time a writer wrote 5 meanwhile.
    for way in [
        "evict the version key",
        "DEL the prefix",
        "restart Redis empty",
    ] {
        del(vec![key.clone(), ctx.cache.version_key(user)]).await;
        let Lookup::Leased(lease) = ctx.cache.lookup(user).await else {
            panic!("{way}: a miss takes the lease");
        };
        let old = read_score().await; // the reader's snapshot
        loyalty::record_event(&ctx, &topic(1, Outcome::Approved))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let newest = read_score().await.score;
        match way {
            "evict the version key" => del(vec![ctx.cache.version_key(user)]).await,
            "DEL the prefix" => {
                del(vec![
                    key.clone(),
                    ctx.cache.version_key(user),
                    ctx.cache.lease_key(user),
                ])
                .await
            }
            _ => {
                redis.kill();
                redis.restart().await;
            }
        }
        assert!(
            !ctx.cache.refill(&lease, &old).await,
            "{way}: the old refill is refused"
        );
        let cached = redis.get(&key).await;
        assert!(
            cached.is_none() || cached == Some(newest),
            "{way}: {cached:?}"
        );
        // The next reader fills it with the current score (once the
        // runner's back-off after a restart is over).
        common::eventually(way, Duration::from_secs(10), || async {
            let s = loyalty::get_score(&ctx, user)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.loyalty_score, newest, "{way}");
            redis.get(&key).await == Some(newest)
        })
        .await;
    }
}

#[sqlx::test(migrations = false)]
async fn the_demo_is_exact_beside_concurrent_writers(_o: PgPoolOptions, opts: PgConnectOptions) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 12).await;
    common::users(&pool, 50).await;
    let ctx = Arc::new(common::ctx(&pool, "demo"));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                for i in 0..60i64 {
                    let e = topic(
                        1 + (w * 17 + i) % 50,
                        if i % 3 == 0 {
                            Outcome::Rejected
                        } else {
                            Outcome::Approved
                        },
                    );
                    loyalty::record_event(&ctx, &e)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            })
        })
        .collect();
    loyaltyd::demo::seed(&ctx, 2000, 40_000, 300, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for w in writers {
        w.await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(common::sweep_drift(&ctx).await, 0);
    assert_eq!(
        common::changes_counted(&pool).await,
        common::nonzero_events(&pool).await
    );
    for q in loyaltyd::types::QueueKind::ALL {
        common::queue_invariants(&pool, q).await;
    }
}

#[sqlx::test(migrations = false)]
async fn the_sweeps_cache_check_runs_under_the_sweeps_limit_and_says_when_it_was_cut_short(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    common::users(&pool, 150_000).await;
    let mut config = common::config(&pool, "sweeplimit");
    // Far shorter than the scan of 150,000 users with their MGETs.
    config.database.statement_timeout = Duration::from_millis(100);
    let ctx = common::ctx_with(&pool, config.clone(), false);
    // A poisoned entry near the end of the scan.
    let mut r = common::redis().await;
    let _: () = redis::cmd("SET")
        .arg(ctx.cache.score_key(uid(149_999)))
        .arg(-7)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let report = common::sweep(&ctx, 1000).await;
    assert!(report.completed && report.cache_checked, "{report:?}");
    assert_eq!(report.cache_repaired, 1);
    // A sweep whose own limit cuts the check short says so.
    config.sweep.timeout = Duration::from_millis(100);
    let ctx = common::ctx_with(&pool, config, false);
    let report = loyaltyd::sweep::run(&ctx, 1000, &CancellationToken::new()).await;
    match report {
        Ok(r) => assert!(!r.completed, "{r:?}"),
        Err(e) => assert!(e.to_string().contains("cancelled"), "{e}"),
    }
}

#[sqlx::test(migrations = false)]
async fn an_event_id_reused_with_another_payload_exits_65_and_writes_nothing(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let config = common::config(&pool, "reuse");
    let args = |outcome: &'static str| record("post", "p-1", outcome, "k-1");
    assert!(common::run(&config, &args("approved")).status.success());
    let out = common::run(&config, &args("rejected"));
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("event id 'k-1' already recorded another event"),
        "{err}"
    );
    assert!(!err.contains("at line"), "{err}");
    assert_eq!(common::score_drift(&pool).await, vec![]);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM moderation_events")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 1);
}

#[sqlx::test(migrations = false)]
async fn a_score_overflow_is_one_clear_line_with_exit_65(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    sqlx::query("UPDATE users SET loyalty_score = 9223372036854775806, score_version = score_version + 1 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let config = common::config(&pool, "overflow");
    let out = common::run(&config, &common::record_args("1", "topic", "t", "approved"));
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("outside the 64-bit range"), "{err}");
    assert!(!err.contains("at line"), "{err}");
}

#[tokio::test]
async fn an_unreachable_redis_is_asked_once_per_back_off_not_once_per_command() {
    // A "Redis" that accepts and hangs up at once, counting connections.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let cfg = loyaltyd::config::RedisConfig {
        url: format!("redis://127.0.0.1:{port}/").into(),
        ..Default::default()
    };
    let redis = loyaltyd::redis_runner::Redis::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let cache = loyaltyd::cache::Cache::new(redis, &cfg);
    let started = std::time::Instant::now();
    for id in 1..=20 {
        assert_eq!(cache.lookup(uid(id)).await, Lookup::Miss);
    }
    eprintln!(
        "20 lookups against a Redis that hangs up: {:?}",
        started.elapsed()
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one try, then the back-off"
    );
}
