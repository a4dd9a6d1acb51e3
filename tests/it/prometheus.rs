//! The operators' tools against a real Prometheus (Debian's package, which
//! the test set-up installs): `promtool check metrics` on the daemon's own
//! endpoint, `promtool check rules` and `promtool test rules` on the alert
//! rules, and a live Prometheus scraping a running daemon, queried for every
//! documented series and every Grafana panel.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::PgPool;

use crate::common::{self, Daemon};

const DIR: &str = env!("CARGO_MANIFEST_DIR");

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (Debian's prometheus package): {e}"));
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_alert_rules_pass_promtool_check_and_every_alert_has_unit_tests() {
    let rules = format!("{DIR}/dashboards/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", &rules], None);
    assert!(ok, "{out}");
    let tests = format!("{DIR}/tests/prometheus/alerts_test.yml");
    let (ok, out) = promtool(&["test", "rules", &tests], None);
    assert!(ok, "{out}");
    // Every alert is tested, firing and (where it has one) silent.
    let text = std::fs::read_to_string(&rules).unwrap_or_else(|e| panic!("{e}"));
    let tested = std::fs::read_to_string(&tests).unwrap_or_else(|e| panic!("{e}"));
    for alert in text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tested.contains(&format!("alertname: {alert}"))
                && tested.contains(&format!("- name: {alert}")),
            "no promtool test for {alert}"
        );
        // ... and silent on both healthy daemons.
        for healthy in [
            "a fresh healthy daemon",
            "an idle healthy daemon over a day",
        ] {
            let group = tested
                .split("- name: ")
                .find(|g| g.starts_with(healthy))
                .unwrap_or_else(|| panic!("no promtool group {healthy:?}"));
            assert!(
                group.contains(&format!("alertname: {alert}\n")),
                "{alert} is not checked silent on {healthy}"
            );
        }
    }
}

/// A Prometheus of the test's own, scraping `target` every second with the
/// scrape configuration docs/operating.md gives (`honor_labels: true`: the job
/// metrics' own `job` label must not be renamed `exported_job`).
struct Prometheus {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir()
            .join("loyaltyd-tests")
            .join(common::unique_prefix("prom").replace(':', "_"));
        std::fs::create_dir_all(dir.join("data")).unwrap_or_else(|e| panic!("{e}"));
        let config = dir.join("prometheus.yml");
        // The guide's configuration, as an operator would copy it, pointed
        // at this test's daemon and this checkout's rules, scraping fast.
        let readme = common::doc_example("prometheus-config");
        assert!(
            readme.contains("honor_labels: true")
                && readme.contains("/usr/share/loyaltyd/alerts.yml")
                && readme.contains("'127.0.0.1:9464'"),
            "the guide's Prometheus configuration changed shape: {readme}"
        );
        let yaml = readme
            .replace(
                "/usr/share/loyaltyd/alerts.yml",
                &format!("{DIR}/dashboards/alerts.yml"),
            )
            .replace("'127.0.0.1:9464'", &format!("'{target}'"));
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{yaml}\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let port = common::free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus (Debian's package): {e}"));
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        common::eventually("Prometheus ready", Duration::from_secs(30), || async {
            http_get(p.port, "/-/ready")
                .await
                .is_some_and(|b| b.contains("Ready"))
        })
        .await;
        p
    }

    /// The result vector of an instant query.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let body = http_get(self.port, &path).await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(v["status"], "success", "{expr}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.ok()?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n")?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        Some(dechunk(rest))
    } else {
        Some(rest.to_owned())
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` of the dashboard, with its template variables as Grafana
/// fills them (all instances; a rate window of a minute).
fn panel_queries(path: &Path) -> Vec<(String, String)> {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let filled = expr
                    .replace("$instance", ".*")
                    .replace("$__rate_interval", "1m");
                out.push((
                    panel["title"].as_str().unwrap_or_default().to_owned(),
                    filled,
                ));
            }
        }
    }
    out
}

#[sqlx::test(migrations = false)]
async fn a_real_prometheus_scrapes_the_daemon_and_every_documented_series_and_panel_has_data(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    common::users(&pool, 20).await;
    let mut config = common::config(&pool, "prom");
    config.metrics.listen = ([127, 0, 0, 1], common::free_port()).into();
    config.leaderboard.check_interval = Duration::from_millis(300);
    config.leaderboard.refresh_threshold = 1;
    config.sweep.schedule = "*/2 * * * * *".into();
    config.queues.reorder_schedule = "* * * * * *".into();
    config.redis.sync_interval = Duration::from_millis(100);
    // The primary as its own read replica (never lagging): the replica
    // series have data.
    config.database.replicas = vec![common::database_url(&pool).into()];
    let daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(30))
        .await;

    // promtool reads the daemon's own endpoint: HELP text, names, units.
    let scrape = common::scrape(config.metrics.listen)
        .await
        .unwrap_or_default();
    let (ok, out) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(ok, "promtool check metrics: {out}");

    let prometheus = Prometheus::start(config.metrics.listen).await;
    // A workload the daemon's jobs and sync see: plain-SQL events (cache
    // sync, refreshes), queue items (reorders).
    for i in 0..30 {
        sqlx::query(
            "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             VALUES ($1, 'm', 'post', $2, 'approved')",
        )
        .bind(1 + i % 20)
        .bind(format!("c{i}"))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        sqlx::query("INSERT INTO post_moderation_queue (post_id, topic_id, priority_score) VALUES ($1, 't', $2)")
            .bind(format!("p{i}"))
            .bind(f64::from(i % 4))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Spread over Prometheus's scrapes (time, not a condition).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every series the program documents, through Prometheus.
    for name in loyaltyd::telemetry::METRICS {
        use loyaltyd::telemetry::{CACHE_SYNC_DELAY, JOB_DURATION, OPERATION_DURATION};
        let series = if [OPERATION_DURATION, JOB_DURATION, CACHE_SYNC_DELAY].contains(name) {
            format!("{name}_count") // a histogram
        } else {
            (*name).to_owned()
        };
        common::eventually(
            &format!("{series} in Prometheus"),
            Duration::from_secs(20),
            || {
                let (p, s) = (&prometheus, series.clone());
                async move { !p.query(&s).await.is_empty() }
            },
        )
        .await;
    }
    // The jobs really ran and the sync really synced, as Prometheus sees it.
    common::eventually(
        "refreshes, reorders and synced scores",
        Duration::from_secs(20),
        || async {
            let refreshed = prometheus
                .query(
                    r#"loyaltyd_job_runs_total{job="leaderboard_refresh",outcome="success"} > 0"#,
                )
                .await;
            let reordered = prometheus
                .query(r#"loyaltyd_job_runs_total{job="queue_reorder",outcome="success"} > 0"#)
                .await;
            let synced = prometheus
                .query("loyaltyd_cache_sync_delay_seconds_count > 0")
                .await;
            !refreshed.is_empty() && !reordered.is_empty() && !synced.is_empty()
        },
    )
    .await;
    // Every Grafana panel's query returns at least one series.
    let panels = panel_queries(Path::new(&format!("{DIR}/dashboards/loyaltyd.json")));
    assert!(panels.len() >= 14, "{panels:?}");
    for (title, expr) in panels {
        common::eventually(
            &format!("panel {title:?}: {expr}"),
            Duration::from_secs(30),
            || {
                let (p, e) = (&prometheus, expr.clone());
                async move { !p.query(&e).await.is_empty() }
            },
        )
        .await;
    }
    drop(prometheus);
    drop(daemon);
}

/// A real Prometheus with the shipped rules, scraping an idle, healthy daemon
/// (refresh checks with nothing due, a reorder with nothing to do, no sweep
/// yet): no alert is pending or firing.
#[sqlx::test(migrations = false)]
async fn an_idle_healthy_daemon_has_no_alert_pending_in_a_real_prometheus(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 5).await;
    let mut config = common::config(&pool, "prom-idle");
    config.metrics.listen = ([127, 0, 0, 1], common::free_port()).into();
    config.leaderboard.check_interval = Duration::from_millis(200);
    config.queues.reorder_schedule = "* * * * * *".into();
    let daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(30))
        .await;
    let prometheus = Prometheus::start(config.metrics.listen).await;
    // Enough samples for every rate window the rules use, and the checks
    // with nothing due that once counted as errors.
    common::eventually(
        "twenty refresh checks with nothing due, seen by Prometheus",
        Duration::from_secs(60),
        || async {
            !prometheus
                .query(
                    r#"loyaltyd_job_runs_total{job="leaderboard_refresh",outcome="skipped"} > 20"#,
                )
                .await
                .is_empty()
                && !prometheus
                    .query(r#"count_over_time(up{job="loyaltyd"}[1m]) > 10"#)
                    .await
                    .is_empty()
        },
    )
    .await;
    let rules = http_get(prometheus.port, "/api/v1/rules")
        .await
        .unwrap_or_default();
    assert!(
        rules.contains("LoyaltydOperationErrors"),
        "the shipped rules are loaded: {rules}"
    );
    // Every rule evaluated again since the data was there (every second).
    let data_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    common::eventually(
        "every rule evaluated since",
        Duration::from_secs(30),
        || async {
            let body = http_get(prometheus.port, "/api/v1/rules")
                .await
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let rules: Vec<&serde_json::Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            !rules.is_empty()
                && rules.iter().all(|r| {
                    r["lastEvaluation"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .is_some_and(|t| t > data_at)
                })
        },
    )
    .await;
    let body = http_get(prometheus.port, "/api/v1/alerts")
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(v["status"], "success", "{body}");
    assert_eq!(
        v["data"]["alerts"].as_array().map(Vec::len),
        Some(0),
        "alerts on an idle healthy daemon: {body}"
    );
    let errors = prometheus
        .query(r#"sum(loyaltyd_operation_errors_total{operation="leaderboard_refresh"}) > 0"#)
        .await;
    assert!(
        errors.is_empty(),
        "skipped checks counted as errors: {errors:?}"
    );
    drop(prometheus);
    drop(daemon);
}

/// The forum's backlog and traffic metrics move when plain SQL writes,
/// through psql, with no loyaltyd call at all.
#[sqlx::test(migrations = false)]
async fn backlog_and_traffic_metrics_follow_plain_sql_written_through_psql(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    // A marker: once the daemon exports it, its first look is done (events
    // from before it are not counted).
    sqlx::query(
        "INSERT INTO private_message_queue (message_id, conversation_id) VALUES ('m', 'c')",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut config = common::config(&pool, "backlog");
    config.metrics.listen = ([127, 0, 0, 1], common::free_port()).into();
    let daemon = Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", Duration::from_secs(30))
        .await;
    let db: String = sqlx::query_scalar("SELECT current_database()::TEXT")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    common::eventually(
        "the daemon's first look",
        Duration::from_secs(30),
        || async {
            let text = common::scrape(config.metrics.listen)
                .await
                .unwrap_or_default();
            common::series(&text, r#"loyaltyd_queue_items{queue="message"}"#) == Some(1.0)
        },
    )
    .await;
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "/var/run/postgresql", "-d", &db, "-c"])
        .arg(
            "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             SELECT 1 + g % 3, 'm', 'post', 'c' || g, CASE WHEN g % 4 = 0 THEN 'rejected' ELSE 'approved' END
             FROM generate_series(1, 40) g;
             INSERT INTO post_moderation_queue (post_id, topic_id, entered_queue_at)
             SELECT 'p' || g, 't' || (g % 2), now() - interval '1 hour' FROM generate_series(1, 9) g;
             INSERT INTO topic_creation_queue (topic_id) VALUES ('t-new');
             DELETE FROM post_moderation_queue WHERE post_id = 'p1';",
        )
        .output()
        .unwrap_or_else(|e| panic!("psql: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |text: &str, series: &str| common::series(text, series).unwrap_or(-1.0);
    common::eventually(
        "the backlog and traffic metrics",
        Duration::from_secs(30),
        || async {
            let text = common::scrape(config.metrics.listen)
                .await
                .unwrap_or_default();
            value(
                &text,
                r#"loyaltyd_forum_events_total{content_type="post",outcome="approved"}"#,
            ) == 30.0
                && value(
                    &text,
                    r#"loyaltyd_forum_events_total{content_type="post",outcome="rejected"}"#,
                ) == 10.0
                && value(&text, r#"loyaltyd_queue_items{queue="post"}"#) == 8.0
                && value(&text, r#"loyaltyd_queue_longest_scope_items{queue="post"}"#) == 4.0
                && value(&text, r#"loyaltyd_queue_items{queue="topic"}"#) == 1.0
                && value(
                    &text,
                    r#"loyaltyd_queue_oldest_item_age_seconds{queue="post"}"#,
                ) >= 3600.0
                && value(
                    &text,
                    r#"loyaltyd_queue_changes_total{queue="post",change="added"}"#,
                ) >= 9.0
                && value(
                    &text,
                    r#"loyaltyd_queue_changes_total{queue="post",change="removed"}"#,
                ) >= 1.0
                && value(&text, "loyaltyd_queue_oldest_item_bound_seconds") == 14400.0
        },
    )
    .await;
    drop(daemon);
}
