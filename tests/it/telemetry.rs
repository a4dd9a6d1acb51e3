//! Telemetry: histograms in a real scrape, perf lists off the hot path, stats.

use std::time::Duration;

use loyaltyd::loyalty;
use loyaltyd::queues;
use loyaltyd::types::{ContentType, Ident, Outcome, Priority, QueueKind, Scope};
use sqlx::PgPool;

use crate::common;

/// The process-wide exporter, installed once for this test binary.
#[sqlx::test(migrations = false)]
async fn operations_show_up_as_labelled_histograms_in_a_scrape(pool: PgPool) {
    common::migrate(&pool).await;
    let addr = common::exporter().await;
    common::users(&pool, 1).await;
    let ctx = common::ctx(&pool, "histo");
    let add_count = r#"loyaltyd_operation_duration_seconds_count{operation="queue_add",outcome="ok",queue="post"}"#;
    let rec_count =
        r#"loyaltyd_operation_duration_seconds_count{operation="record_event",outcome="ok"}"#;
    let (adds, recs) = (
        common::metric(addr, add_count).await,
        common::metric(addr, rec_count).await,
    );
    for i in 0..3 {
        let item = Ident::parse("t", &format!("h{i}")).unwrap_or_else(|e| panic!("{e}"));
        let scope = Scope::Topic(Ident::parse("t", "x").unwrap_or_else(|e| panic!("{e}")));
        queues::add(&ctx, QueueKind::Post, &item, &scope, Priority::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        loyalty::record_event(
            &ctx,
            &common::event(1, ContentType::Post, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let text = common::scrape(addr).await.unwrap_or_default();
    assert!(
        common::metric(addr, add_count).await >= adds + 3.0,
        "{text}"
    );
    assert!(common::metric(addr, rec_count).await >= recs + 3.0);
    assert!(
        text.contains(r#"loyaltyd_operation_duration_seconds_bucket{operation="queue_add",outcome="ok",queue="post",le="0.00005"}"#),
        "sub-millisecond buckets: {text}"
    );
    assert!(text.contains(r#"le="10"}"#));
}

#[sqlx::test(migrations = false)]
async fn perf_lists_keep_the_newest_samples_first_trimmed_to_length(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let mut config = common::config(&pool, "perf");
    config.metrics.perf_list_len = 5;
    let ctx = common::ctx_with(&pool, config, true);
    for _ in 0..12 {
        loyalty::record_event(
            &ctx,
            &common::event(1, ContentType::Post, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let scope = Scope::Conversation(Ident::parse("t", "c").unwrap_or_else(|e| panic!("{e}")));
    let item = Ident::parse("t", "m1").unwrap_or_else(|e| panic!("{e}"));
    queues::add(&ctx, QueueKind::Message, &item, &scope, Priority::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ctx.perf.flush(Duration::from_secs(5)).await;
    let mut r = common::redis().await;
    let key = ctx.redis.key("perf:loyalty_updates");
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(entries.len(), 5, "trimmed to perf_list_len");
    let parsed: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{e}: {err}")))
        .collect();
    for p in &parsed {
        assert!(p["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{p}");
        assert!(p["timestamp"].as_f64().is_some_and(|t| t > 1.7e9), "{p}");
        assert_eq!(p["user_id"], 1);
    }
    let stamps: Vec<f64> = parsed
        .iter()
        .filter_map(|p| p["timestamp"].as_f64())
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {stamps:?}"
    );
    let queue_key = ctx.redis.key("perf:queue:add:message");
    let n: i64 = redis::cmd("LLEN")
        .arg(&queue_key)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 1);
}

#[sqlx::test(migrations = false)]
async fn with_redis_down_operations_succeed_and_samples_are_counted_as_dropped(pool: PgPool) {
    common::migrate(&pool).await;
    let addr = common::exporter().await;
    common::users(&pool, 1).await;
    let mut config = common::config(&pool, "dropped");
    config.redis.url = common::dead_redis_url().into();
    let ctx = common::ctx_with(&pool, config, true);
    let dropped = common::metric(addr, "loyaltyd_perf_samples_dropped_total").await;
    let errors = common::metric(addr, "loyaltyd_redis_errors_total").await;
    for _ in 0..4 {
        loyalty::record_event(
            &ctx,
            &common::event(1, ContentType::Post, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    ctx.perf.flush(Duration::from_secs(5)).await;
    assert!(common::metric(addr, "loyaltyd_perf_samples_dropped_total").await >= dropped + 4.0);
    assert!(common::metric(addr, "loyaltyd_redis_errors_total").await >= errors + 4.0);
}

#[sqlx::test(migrations = false)]
async fn stats_summarizes_each_perf_list(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "stats");
    let mut r = common::redis().await;
    let key = ctx.redis.key("perf:queue:add:topic");
    for ms in 1..=20 {
        let entry = serde_json::json!({"duration_ms": f64::from(ms), "timestamp": 1.8e9});
        let _: i64 = redis::cmd("LPUSH")
            .arg(&key)
            .arg(entry.to_string())
            .query_async(&mut r)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for malformed in [
        "not json",
        r#"{"duration_ms": "fast"}"#,
        r#"{"timestamp": 1}"#,
    ] {
        let _: i64 = redis::cmd("LPUSH")
            .arg(&key)
            .arg(malformed)
            .query_async(&mut r)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // What the seed's own code writes: user_id as a string.
    let seed_key = ctx.redis.key("perf:loyalty_updates");
    for ms in [2.0, 4.0] {
        let entry = serde_json::json!({"user_id": "42", "duration_ms": ms, "timestamp": 1.8e9});
        let _: i64 = redis::cmd("LPUSH")
            .arg(&seed_key)
            .arg(entry.to_string())
            .query_async(&mut r)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let stats = loyaltyd::perf::collect(&ctx.redis, &ctx.perf)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.lists.len(), 2, "only this test's prefix: {stats:?}");
    let s = &stats.lists[1];
    assert_eq!((s.key.as_str(), s.count, s.skipped), (key.as_str(), 20, 3));
    assert_eq!(
        (s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms),
        (10.0, 19.0, 20.0, 20.0)
    );
    assert!((s.avg_ms - 10.5).abs() < 1e-9);
    let seed = &stats.lists[0];
    assert_eq!(
        (seed.key.as_str(), seed.count, seed.skipped),
        (seed_key.as_str(), 2, 0)
    );
    assert!((seed.avg_ms - 3.0).abs() < 1e-9);
}

#[sqlx::test(migrations = false)]
async fn failed_operations_are_timed_and_counted_as_errors(pool: PgPool) {
    common::migrate(&pool).await;
    let addr = common::exporter().await;
    let ctx = common::ctx(&pool, "errors");
    let errors = r#"loyaltyd_operation_errors_total{operation="record_event"}"#;
    let failed =
        r#"loyaltyd_operation_duration_seconds_count{operation="record_event",outcome="error"}"#;
    let (e0, f0) = (
        common::metric(addr, errors).await,
        common::metric(addr, failed).await,
    );
    // A refused event: user 77 does not exist.
    assert!(
        loyalty::record_event(
            &ctx,
            &common::event(77, ContentType::Post, Outcome::Approved)
        )
        .await
        .is_err()
    );
    assert!(common::metric(addr, errors).await >= e0 + 1.0);
    assert!(common::metric(addr, failed).await >= f0 + 1.0);
    // A Redis outage: `stats` cannot read the perf lists.
    let mut config = common::config(&pool, "errors-redis");
    config.redis.url = common::dead_redis_url().into();
    let away = common::ctx_with(&pool, config, false);
    let stats_errors = r#"loyaltyd_operation_errors_total{operation="stats"}"#;
    let s0 = common::metric(addr, stats_errors).await;
    assert!(
        loyaltyd::perf::collect(&away.redis, &away.perf)
            .await
            .is_err()
    );
    assert!(common::metric(addr, stats_errors).await >= s0 + 1.0);
}

/// The `loyaltyd_*` metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("loyaltyd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn exported(name: &str) -> bool {
    let base = ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|b| loyaltyd::telemetry::METRICS.contains(b));
    base.is_some() || loyaltyd::telemetry::METRICS.contains(&name)
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_and_alert_rules_only_use_metrics_the_program_exports() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards");
    let text =
        std::fs::read_to_string(format!("{dir}/loyaltyd.json")).unwrap_or_else(|e| panic!("{e}"));
    let dash: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable"
    );
    let mut exprs = Vec::new();
    collect_exprs(&dash["panels"], &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut charted = std::collections::BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                exported(&name),
                "dashboard uses {name}, which loyaltyd does not export: {e}"
            );
            charted.insert(name);
        }
    }
    for needed in [
        "loyaltyd_operation_duration_seconds_bucket",
        "loyaltyd_job_runs_total",
        "loyaltyd_leaderboard_pending_changes",
        "loyaltyd_leaderboard_age_seconds",
        "loyaltyd_integrity_drifted_users",
        "loyaltyd_redis_errors_total",
    ] {
        assert!(charted.contains(needed), "the dashboard charts {needed}");
    }

    let rules_path = format!("{dir}/alerts.yml");
    let rules = std::fs::read_to_string(&rules_path).unwrap_or_else(|e| panic!("{e}"));
    let rule_exprs: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert!(rule_exprs.len() >= 4);
    for e in &rule_exprs {
        for name in metric_names(e) {
            assert!(
                exported(&name),
                "alert uses {name}, which loyaltyd does not export: {e}"
            );
        }
    }
    for alert in [
        "LoyaltydDown",
        "LoyaltydJobFailing",
        "LoyaltydLeaderboardStale",
        "LoyaltydDriftFound",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
    // promtool checks the rules for real: tests/it/prometheus.rs.
}
