//! The daemon, through the real binary: jobs, overlap, clusters, outages, shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use loyaltyd::config::Config;
use loyaltyd::loyalty;
use loyaltyd::queues;
use loyaltyd::types::{ContentType, Ident, Outcome, Priority, QueueKind, Scope};
use sqlx::PgPool;

use crate::common::{self, Daemon, Proxy, Upstream};

/// A configuration with every job on a fast schedule and its own metrics port.
fn fast(pool: &PgPool, name: &str) -> Config {
    let mut c = common::config(pool, name);
    c.metrics.listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    c.sweep.schedule = "* * * * * *".into();
    c.queues.reorder_schedule = "* * * * * *".into();
    c.leaderboard.check_interval = Duration::from_millis(200);
    c.leaderboard.refresh_threshold = 3;
    c.database.connect_timeout = Duration::from_secs(2);
    // Skipped ticks are logged at DEBUG; these tests read them.
    c.log.level = "info,loyaltyd::jobs=debug,sqlx=warn".into();
    c
}

/// Job runs of one daemon's log: (job, tick, outcome, message).
fn runs(d: &Daemon) -> Vec<(String, String, String, String)> {
    d.events()
        .into_iter()
        .filter_map(|e| {
            Some((
                e.get("job")?.as_str()?.to_owned(),
                e.get("tick")
                    .and_then(|t| t.as_str())
                    .unwrap_or("")
                    .to_owned(),
                e.get("outcome")?.as_str()?.to_owned(),
                e.get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
                    .to_owned(),
            ))
        })
        .collect()
}

async fn scrape_value(config: &Config, series: &str) -> f64 {
    let text = common::scrape(config.metrics.listen)
        .await
        .unwrap_or_default();
    common::series(&text, series).unwrap_or(0.0)
}

#[sqlx::test(migrations = false)]
async fn each_job_does_its_work_on_its_schedule(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 10).await;
    let config = fast(&pool, "jobs");
    let ctx = common::ctx_with(&pool, config.clone(), false);
    let daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;

    // Refresh: three changes reach the threshold.
    for user in [1, 2, 3] {
        loyalty::record_event(
            &ctx,
            &common::event(user, ContentType::Topic, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    common::eventually("a debounced refresh", Duration::from_secs(10), || async {
        let ranked: i64 = sqlx::query_scalar("SELECT count(*) FROM user_leaderboard")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        ranked == 3
    })
    .await;
    assert_eq!(
        loyaltyd::leaderboard::status(&ctx)
            .await
            .map(|s| s.pending_changes)
            .ok(),
        Some(0)
    );

    // Sweep: planted drift is repaired.
    sqlx::query("UPDATE users SET loyalty_score = 999, score_version = score_version + 1 WHERE id IN (4, 7)")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    common::eventually(
        "the sweep repairing drift",
        Duration::from_secs(10),
        || async { common::score_drift(&pool).await.is_empty() },
    )
    .await;

    // Reorder: items added out of priority order end up sorted.
    let scope = Scope::Topic(Ident::parse("t", "t1").unwrap_or_else(|e| panic!("{e}")));
    for (item, p) in [("a", 1.0), ("b", 3.0), ("c", 2.0)] {
        let item = Ident::parse("t", item).unwrap_or_else(|e| panic!("{e}"));
        queues::add(
            &ctx,
            QueueKind::Post,
            &item,
            &scope,
            Priority::new(p).unwrap_or_default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    common::eventually("the reorder", Duration::from_secs(10), || async {
        let list = queues::list(&ctx, QueueKind::Post, &scope, 10)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        list.items
            .iter()
            .map(|i| i.content_id.as_str())
            .collect::<Vec<_>>()
            == ["b", "c", "a"]
    })
    .await;
    let success =
        |job: &str| format!("loyaltyd_job_runs_total{{job=\"{job}\",outcome=\"success\"}}");
    for job in ["leaderboard_refresh", "integrity_sweep", "queue_reorder"] {
        assert!(
            scrape_value(&config, &success(job)).await >= 1.0,
            "{job} counted"
        );
    }
    assert!(scrape_value(&config, "loyaltyd_integrity_drifted_users").await >= 0.0);
    let errors: Vec<_> = daemon
        .events()
        .into_iter()
        .filter(|e| e["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[sqlx::test(migrations = false)]
async fn every_series_is_exported_from_start_up(pool: PgPool) {
    common::migrate(&pool).await;
    let mut config = fast(&pool, "series");
    config.sweep.schedule = "0 0 3 * * *".into();
    config.queues.reorder_schedule = "0 0 3 * * *".into();
    config.leaderboard.check_interval = Duration::from_secs(3600);
    let daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    let text = common::scrape(config.metrics.listen)
        .await
        .unwrap_or_default();
    for job in ["leaderboard_refresh", "integrity_sweep", "queue_reorder"] {
        for outcome in ["success", "skipped", "failed"] {
            let s = format!("loyaltyd_job_runs_total{{job=\"{job}\",outcome=\"{outcome}\"}}");
            assert!(common::series(&text, &s).is_some(), "{s} missing:\n{text}");
        }
    }
    for s in [
        "loyaltyd_leaderboard_pending_changes",
        "loyaltyd_leaderboard_age_seconds",
        "loyaltyd_integrity_drifted_users",
        "loyaltyd_redis_errors_total",
        "loyaltyd_perf_samples_dropped_total",
        "loyaltyd_build_info{version=\"0.1.0\"}",
        "loyaltyd_operation_duration_seconds_count{operation=\"record_event\",outcome=\"ok\"}",
        "loyaltyd_operation_duration_seconds_count{operation=\"queue_remove\",outcome=\"error\",queue=\"message\"}",
        "loyaltyd_operation_errors_total{operation=\"record_event\"}",
        "loyaltyd_job_last_success_timestamp_seconds{job=\"integrity_sweep\"}",
        "loyaltyd_cache_sync_failures_total",
        "loyaltyd_job_duration_seconds_count{job=\"integrity_sweep\"}",
    ] {
        assert!(common::series(&text, s).is_some(), "{s} missing:\n{text}");
    }
}

#[sqlx::test(migrations = false)]
async fn two_daemons_on_one_database_run_each_tick_once(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 50).await;
    let a_config = fast(&pool, "cluster-a");
    let mut b_config = a_config.clone();
    b_config.metrics.listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let a = Daemon::start(&a_config);
    let b = Daemon::start(&b_config);
    a.wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    b.wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    // Each tick's runs (by either daemon) and sightings (both).
    let tally = || {
        let mut ran: HashMap<String, u32> = HashMap::new();
        let mut seen: HashMap<String, u32> = HashMap::new();
        for (job, tick, outcome, _) in runs(&a).into_iter().chain(runs(&b)) {
            if job != "integrity_sweep" {
                continue;
            }
            *seen.entry(tick.clone()).or_default() += 1;
            if outcome == "success" {
                *ran.entry(tick).or_default() += 1;
            }
        }
        (ran, seen)
    };
    common::eventually(
        "four sweep ticks seen by both daemons",
        Duration::from_secs(30),
        || {
            let (ran, seen) = tally();
            async move { ran.len() >= 4 && seen.values().filter(|n| **n == 2).count() >= 3 }
        },
    )
    .await;
    let (ran, seen) = tally();
    let twice: Vec<_> = ran.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    assert!(ran.len() >= 4, "the sweep ran on most ticks: {ran:?}");
    // Both daemons saw the ticks; the one that did not run it skipped it.
    let both = seen.values().filter(|n| **n == 2).count();
    assert!(both >= 3, "both daemons fired: {seen:?}");
}

#[sqlx::test(migrations = false)]
async fn killing_the_lock_holder_lets_the_other_daemon_take_over(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 20).await;
    let a_config = fast(&pool, "takeover-a");
    let mut b_config = a_config.clone();
    b_config.metrics.listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut a = Daemon::start(&a_config);
    a.wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    // A has the sweep (it runs the ticks) before B comes.
    common::eventually("the first daemon sweeping", Duration::from_secs(10), || {
        let swept = runs(&a)
            .iter()
            .any(|r| r.0 == "integrity_sweep" && r.2 == "success");
        async move { swept }
    })
    .await;
    let b = Daemon::start(&b_config);
    b.wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5)).await;
    common::eventually("the survivor sweeping", Duration::from_secs(6), || async {
        runs(&b)
            .iter()
            .filter(|r| r.0 == "integrity_sweep" && r.2 == "success")
            .count()
            >= 2
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_job_slower_than_its_interval_skips_ticks_instead_of_stacking_them(pool: PgPool) {
    common::migrate(&pool).await;
    // 60,000 drifted users repaired 20 per transaction: a sweep takes several
    // seconds, ticks come every second.
    sqlx::query(
        "INSERT INTO users (id, username, loyalty_score, score_version) SELECT g, 'u' || g, 1, 1 FROM generate_series(1, 60000) g",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut config = fast(&pool, "slow");
    config.sweep.batch_size = 20;
    config.queues.reorder_schedule = "0 0 3 * * *".into();
    let daemon = Daemon::start(&config);
    // The sweep's own skip (the refresh check, every 200 ms, can be the
    // first to log one of its own while the first refresh runs).
    common::eventually(
        "a sweep tick skipped while a sweep runs",
        Duration::from_secs(30),
        || async {
            runs(&daemon).iter().any(|r| {
                r.0 == "integrity_sweep" && r.3.contains("the previous run is still going")
            })
        },
    )
    .await;
    let skipped = "loyaltyd_job_runs_total{job=\"integrity_sweep\",outcome=\"skipped\"}";
    // (The count follows the log line: scraped until it shows.)
    common::eventually("the skip counted", Duration::from_secs(10), || async {
        scrape_value(&config, skipped).await >= 1.0
    })
    .await;
    // Never two sweeps of this daemon at once: at most one holds the job lock.
    let sweeps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1
           AND classid = ($1::BIGINT >> 32)::OID AND objid = ($1::BIGINT & 4294967295)::OID",
    )
    .bind(loyaltyd::locks::JOB_SWEEP)
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(sweeps <= 1);
}

#[sqlx::test(migrations = false)]
async fn sigterm_during_a_long_sweep_exits_0_quickly_leaving_whole_batches(pool: PgPool) {
    common::migrate(&pool).await;
    // Every user drifted: each batch of 500 repairs 500 users in one transaction.
    sqlx::query("INSERT INTO users (id, username, loyalty_score, score_version) SELECT g, 'u' || g, 1, 1 FROM generate_series(1, 100000) g")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut config = fast(&pool, "sigterm");
    config.sweep.batch_size = 500;
    config.queues.reorder_schedule = "0 0 3 * * *".into();
    let mut daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    common::eventually("the sweep under way", Duration::from_secs(10), || async {
        let fixed: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE loyalty_score = 0")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        fixed > 0
    })
    .await;
    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{}", daemon.log_text());
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    let fixed: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE loyalty_score = 0")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(fixed < 100_000, "stopped before the end");
    assert_eq!(
        fixed % 500,
        0,
        "only whole batches were applied ({fixed} users repaired)"
    );
    let prefix: i64 =
        sqlx::query_scalar("SELECT count(*) FROM users WHERE loyalty_score = 0 AND id <= $1")
            .bind(fixed)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(prefix, fixed, "the batches done are the first ones");
    assert!(daemon.log_text().contains("stopped"));
    // Sweeping again finishes the job.
    let ctx = common::ctx(&pool, "sigterm-after");
    let report = common::sweep(&ctx, 5000).await;
    assert_eq!(report.drifted_users as i64, 100_000 - fixed);
    assert!(common::score_drift(&pool).await.is_empty());
}

#[sqlx::test(migrations = false)]
async fn the_daemon_survives_redis_going_away_and_uses_it_again_when_back(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 5).await;
    let proxy = Proxy::start(Upstream::redis()).await;
    let mut config = fast(&pool, "redis-outage");
    config.redis.url = proxy.redis_url().into();
    config.queues.reorder_schedule = "0 0 3 * * *".into();
    let ctx = common::ctx(&pool, "redis-outage-direct");
    let daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    let success = "loyaltyd_job_runs_total{job=\"integrity_sweep\",outcome=\"success\"}";
    proxy.cut().await;
    // A wrong cached score for user 2 that only a sweep reaching Redis can fix.
    let key = format!("{}loyalty:2", config.redis.key_prefix);
    let mut r = common::redis().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(777)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _: () = redis::cmd("SET")
        .arg(format!("{key}:version"))
        .arg(0)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    common::eventually("Redis errors counted", Duration::from_secs(10), || async {
        scrape_value(&config, "loyaltyd_redis_errors_total").await >= 1.0
    })
    .await;
    let before = scrape_value(&config, success).await;
    common::eventually(
        "a sweep succeeding without Redis",
        Duration::from_secs(10),
        || async { scrape_value(&config, success).await > before },
    )
    .await;
    assert_eq!(common::redis_get_i64(&key).await, Some(777));
    proxy.restore().await;
    common::eventually(
        "the cache repaired through the restored Redis",
        Duration::from_secs(15),
        || async { common::redis_get_i64(&key).await == Some(0) },
    )
    .await;
    assert!(daemon.child.id() > 0);
    drop(ctx);
}

#[sqlx::test(migrations = false)]
async fn the_daemon_survives_postgresql_going_away_and_recovers_by_itself(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 5).await;
    let proxy = Proxy::start(Upstream::postgres()).await;
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or("postgres")
        .to_owned();
    let mut config = fast(&pool, "pg-outage");
    config.database.url = proxy.postgres_url(&db).into();
    let mut daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(20))
        .await;
    let success = "loyaltyd_job_runs_total{job=\"integrity_sweep\",outcome=\"success\"}";
    let failed = "loyaltyd_job_runs_total{job=\"integrity_sweep\",outcome=\"failed\"}";
    common::eventually("a first sweep", Duration::from_secs(10), || async {
        scrape_value(&config, success).await >= 1.0
    })
    .await;
    proxy.cut().await;
    common::eventually(
        "failures counted while PostgreSQL is away",
        Duration::from_secs(15),
        || async { scrape_value(&config, failed).await >= 2.0 },
    )
    .await;
    assert!(
        matches!(daemon.child.try_wait(), Ok(None)),
        "the daemon is still running"
    );
    proxy.restore().await;
    let before = scrape_value(&config, success).await;
    common::eventually(
        "sweeps succeeding again",
        Duration::from_secs(20),
        || async { scrape_value(&config, success).await >= before + 2.0 },
    )
    .await;
    // And planted drift is repaired through the new connections.
    sqlx::query(
        "UPDATE users SET loyalty_score = 5, score_version = score_version + 1 WHERE id = 3",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    common::eventually(
        "drift repaired after the outage",
        Duration::from_secs(10),
        || async { common::score_drift(&pool).await.is_empty() },
    )
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await.0, Some(0));
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    // scripts/services.sh --test installs it (Debian's systemd package).
    let analyze = which("systemd-analyze")
        .unwrap_or_else(|()| panic!("systemd-analyze is needed (apt-get install systemd)"));
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/loyaltyd.service"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "EnvironmentFile=",
    ] {
        assert!(unit.contains(directive), "{directive} missing");
    }
    let dir = std::env::temp_dir().join(common::unique_prefix("unit").replace(':', "_"));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("loyaltyd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/loyaltyd", env!("CARGO_BIN_EXE_loyaltyd")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    let out = std::process::Command::new(&analyze)
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for loyaltyd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    assert!(level <= 2.0, "exposure {level}: {text}");
}

fn which(cmd: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(cmd))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

/// SIGHUP re-reads the configuration file: the log level and the jobs'
/// schedules change without a restart; a bad file is refused with one
/// error line and the running configuration stays; a key that needs a
/// restart keeps its running value and says so.
#[sqlx::test(migrations = false)]
async fn sighup_reloads_what_can_change_and_refuses_a_bad_file(pool: PgPool) {
    common::migrate(&pool).await;
    let mut config = common::config(&pool, "reload");
    config.metrics.listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    // Nothing scheduled for the test's length, logs at info: no job lines.
    config.sweep.schedule = "0 0 3 * * *".into();
    config.queues.reorder_schedule = "0 0 3 * * *".into();
    config.log.level = "info,sqlx=warn".into();
    let mut daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(30))
        .await;
    let reorders = || {
        runs(&daemon)
            .into_iter()
            .filter(|r| r.0 == "queue_reorder")
            .count()
    };
    assert_eq!(reorders(), 0);
    // Every second, and its skipped ticks logged (DEBUG).
    let mut next = config.clone();
    next.log.format = loyaltyd::config::LogFormat::Json;
    next.queues.reorder_schedule = "* * * * * *".into();
    next.log.level = "info,loyaltyd::jobs=debug,sqlx=warn".into();
    std::fs::write(&daemon.config_file, next.to_toml()).unwrap_or_else(|e| panic!("{e}"));
    daemon.signal("HUP");
    daemon
        .wait_for_log("SIGHUP: configuration reloaded", Duration::from_secs(10))
        .await;
    common::eventually(
        "reorder ticks on the new schedule",
        Duration::from_secs(10),
        || async { reorders() >= 2 },
    )
    .await;
    // A bad file: refused, the daemon goes on with what it runs.
    std::fs::write(
        &daemon.config_file,
        "[queues]\nreorder_schedule = \"every now and then\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemon.signal("HUP");
    daemon
        .wait_for_log("the new configuration is refused", Duration::from_secs(10))
        .await;
    let before = reorders();
    common::eventually(
        "reorders go on after the refused reload",
        Duration::from_secs(10),
        || async { reorders() >= before + 2 },
    )
    .await;
    // A key bound at start-up: kept, with a warning naming it.
    let mut moved = next.clone();
    moved.metrics.listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    std::fs::write(&daemon.config_file, moved.to_toml()).unwrap_or_else(|e| panic!("{e}"));
    daemon.signal("HUP");
    daemon
        .wait_for_log(
            "metrics.listen changed, but takes effect only at a restart",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        common::scrape(config.metrics.listen).await.is_some(),
        "still served where it was"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await.0, Some(0));
}

/// A log reader that goes away (a supervisor that died, `| head -n 1`) or
/// stops reading (a full pipe) costs the daemon log lines, never its life:
/// it keeps running, counts the lines it lost, and exits 0 on SIGTERM.
#[sqlx::test(migrations = false)]
async fn a_log_reader_that_goes_away_or_stops_reading_neither_kills_nor_hangs_the_daemon(
    pool: PgPool,
) {
    use std::io::BufRead;
    use std::process::Stdio;
    common::migrate(&pool).await;
    for closed in [true, false] {
        let mut config = common::config(&pool, "pipes");
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        config.metrics.listen = addr;
        // A line every few milliseconds (each refresh check logs one at
        // debug): the pipe fills, and the queue behind it.
        config.log.level = "debug".into();
        config.leaderboard.check_interval = Duration::from_millis(5);
        let file = common::write_config(&config);
        let mut child = common::Killed(
            common::loyaltyd_at(&file)
                .arg("run")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let mut first = String::new();
        let mut reader = std::io::BufReader::new(stderr);
        reader
            .read_line(&mut first)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(first.contains("starting"), "{first}");
        // The reader goes away, or just stops reading.
        let kept = if closed {
            drop(reader);
            drop(child.stdout.take());
            None
        } else {
            Some(reader)
        };
        let lost = "loyaltyd_background_failures_total{task=\"log_output\"}";
        common::eventually(
            "log lines lost and counted",
            Duration::from_secs(60),
            || async {
                common::series(&common::scrape(addr).await.unwrap_or_default(), lost).unwrap_or(0.0)
                    > 0.0
            },
        )
        .await;
        assert!(
            child.try_wait().ok().flatten().is_none(),
            "the daemon died with its log reader (closed: {closed})"
        );
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = std::time::Instant::now();
        let code = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status.code();
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no exit within 10 s of SIGTERM (closed: {closed})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(code, Some(0), "closed: {closed}");
        drop(kept);
    }
}
