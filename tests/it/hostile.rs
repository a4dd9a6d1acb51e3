//! Hostile input through the real binary: every refusal is one line with the
//! right exit code and writes nothing; every valid odd identifier comes back
//! byte for byte; secrets never show.

use proptest::prelude::*;
use sqlx::PgPool;

use crate::common;

/// Runs the binary; checks the contract every run must keep, returns (code, stdout).
fn run_checked(config: &loyaltyd::config::Config, args: &[&str]) -> (i32, String) {
    let out = common::run(config, args);
    let code = out.status.code().unwrap_or(-1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        [0, 2, 65, 78].contains(&code),
        "unexpected exit {code} for {args:?}: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{args:?}: {err}"
    );
    if code != 0 {
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one line for {args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Strings made to hurt: SQL and Redis metacharacters, control characters,
/// Unicode, lengths around the limit.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("'; DROP TABLE users; --".to_owned()),
        Just("\r\nFLUSHALL\r\n".to_owned()),
        Just("{hash}".to_owned()),
        Just("*".to_owned()),
        Just("$1".to_owned()),
        Just("\\x00".to_owned()),
        Just(String::new()),
        Just("é".repeat(127)),
        Just("é".repeat(128)),
        Just("a".repeat(255)),
        Just("a".repeat(256)),
        Just("x".repeat(10_000)),
        "[\\PC\\pC]{1,40}".prop_filter("no NUL in argv", |s| !s.contains('\0')),
    ]
}

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: 40,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[sqlx::test(migrations = false)]
async fn identifiers_are_stored_byte_for_byte_or_refused_with_exit_2(pool: PgPool) {
    common::migrate(&pool).await;
    let config = common::config(&pool, "ids");
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = proptest::test_runner::TestRunner::new(cases());
        let n = std::sync::atomic::AtomicUsize::new(0);
        runner.run(&(nasty(), nasty()), |(item, conversation)| {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Unique per case, so a valid id is never a duplicate of an earlier one.
            let item = if item.is_empty() {
                item
            } else {
                format!("{k}:{item}")
            };
            let valid = |s: &str| !s.is_empty() && s.len() <= 255;
            let (code, out) = run_checked(
                &config,
                &[
                    "queue",
                    "add",
                    "--queue",
                    "message",
                    "--content-id",
                    &item,
                    "--conversation",
                    &conversation,
                    "--json",
                ],
            );
            if valid(&item) && valid(&conversation) {
                prop_assert_eq!(code, 0);
                let (code, out) = run_checked(
                    &config,
                    &[
                        "queue",
                        "position",
                        "--queue",
                        "message",
                        "--content-id",
                        &item,
                        "--json",
                    ],
                );
                prop_assert_eq!(code, 0);
                let v: serde_json::Value =
                    serde_json::from_str(&out).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(v["content_id"].as_str(), Some(item.as_str()));
                prop_assert_eq!(v["scope"].as_str(), Some(conversation.as_str()));
            } else {
                prop_assert_eq!(code, 2, "{}", out);
            }
            Ok(())
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = result {
        panic!("{e}");
    }
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    assert_eq!(users, 0, "the users table survived");
}

#[sqlx::test(migrations = false)]
async fn numbers_of_every_shape_are_accepted_or_refused_cleanly(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    let config = common::config(&pool, "numbers");
    let numbers = [
        "",
        " ",
        "0",
        "-0",
        "1",
        "-1",
        "3",
        "42",
        "1.5",
        "1e3",
        "1e400",
        "-1e400",
        "NaN",
        "inf",
        "0x10",
        "٣",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "99999999999999999999999",
        "1 2",
        "'; DROP TABLE users; --",
    ];
    for n in numbers {
        let commands: [Vec<&str>; 6] = [
            vec!["score", "get", "--user", n],
            vec!["leaderboard", "show", "--limit", n],
            vec!["leaderboard", "show", "--offset", n],
            vec!["queue", "list", "--queue", "topic", "--limit", n],
            vec![
                "queue",
                "add",
                "--queue",
                "topic",
                "--content-id",
                "p",
                "--priority",
                n,
            ],
            vec!["demo", "seed", "--users", n, "--events", "0"],
        ];
        for args in commands {
            let (code, _) = run_checked(&config, &args);
            // Only a real user id or an in-range number may succeed.
            if code == 0 {
                assert!(!n.trim().is_empty(), "{args:?}");
            }
        }
        // Remove what a successful add queued, so the next add is not a duplicate.
        let _ = common::run(
            &config,
            &["queue", "remove", "--queue", "topic", "--content-id", "p"],
        );
    }
    let (users, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM moderation_events)",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(users >= 3 && events == 0);
}

#[test]
fn hostile_configuration_values_exit_78_in_one_line() {
    let keys = [
        "database.url",
        "database.max_connections",
        "database.connect_timeout",
        "database.statement_timeout",
        "redis.url",
        "redis.key_prefix",
        "redis.cache_ttl",
        "redis.timeout",
        "metrics.listen",
        "metrics.perf_list_len",
        "leaderboard.refresh_threshold",
        "leaderboard.max_staleness",
        "leaderboard.check_interval",
        "leaderboard.refresh_timeout",
        "sweep.schedule",
        "sweep.batch_size",
        "sweep.timeout",
        "queues.reorder_schedule",
        "queues.reorder_timeout",
        "log.level",
        "log.format",
    ];
    let values = [
        "-1",
        "0",
        "99999999999999999999",
        "\"\"",
        "\"-5s\"",
        "\"\\u0000\"",
        "true",
        "[1, 2]",
        "{ a = 1 }",
        "\"'; DROP TABLE users; --\"",
        "\"\\r\\nFLUSHALL\\r\\n\"",
        "1.5",
    ];
    let dir = std::env::temp_dir().join(common::unique_prefix("hostile").replace(':', "_"));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("c.toml");
    for key in keys {
        let (section, name) = key.split_once('.').unwrap_or(("", key));
        for value in values
            .iter()
            .map(|v| v.to_string())
            .chain([format!("\"{}\"", "x".repeat(10_000))])
        {
            std::fs::write(&path, format!("[{section}]\n{name} = {value}\n"))
                .unwrap_or_else(|e| panic!("{e}"));
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_loyaltyd"))
                .args(["check-config", "--offline", "--config"])
                .arg(&path)
                .output()
                .unwrap_or_else(|e| panic!("{e}"));
            let err = String::from_utf8_lossy(&out.stderr);
            let code = out.status.code();
            assert!(
                code == Some(0) || code == Some(78),
                "{key} = {value}: exit {code:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{key} = {value}: {err}");
            if code == Some(78) {
                assert_eq!(err.trim_end().lines().count(), 1, "{key} = {value}: {err}");
                assert!(
                    err.contains(name),
                    "{key} = {value}: the error names the key: {err}"
                );
            }
        }
    }
    // Not UTF-8 at all.
    std::fs::write(&path, b"[redis]\nkey_prefix = \"\xc3\x28\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loyaltyd"))
        .args(["check-config", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(78));
}

#[sqlx::test(migrations = false)]
async fn a_hostile_key_prefix_stays_a_prefix(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let mut config = common::config(&pool, "prefix");
    config.redis.key_prefix = format!("{}\r\nFLUSHALL\r\n{{hash}}*", config.redis.key_prefix);
    let sentinel = common::unique_prefix("sentinel");
    let mut r = common::redis().await;
    let _: () = redis::cmd("SET")
        .arg(&sentinel)
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, _) = run_checked(&config, &common::record_args("1", "post", "c", "approved"));
    assert_eq!(code, 0);
    let (code, out) = run_checked(&config, &["stats", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("loyalty_updates"), "{out}");
    assert_eq!(
        common::redis_get_i64(&sentinel).await,
        Some(1),
        "nothing was flushed"
    );
    assert_eq!(
        common::redis_get_i64(&format!("{}loyalty:1", config.redis.key_prefix)).await,
        Some(1)
    );
}

#[sqlx::test(migrations = false)]
async fn passwords_never_reach_the_daemon_log_or_error_messages(pool: PgPool) {
    common::migrate(&pool).await;
    // Trust authentication ignores the password, so the daemon runs with it.
    let mut config = common::config(&pool, "secret");
    let secret = "s3cr3t-pa55word";
    config.database.url = config
        .database
        .url
        .expose()
        .replacen("://root@", &format!("://root:{secret}@"), 1)
        .into();
    config.redis.url = format!("redis://:{secret}@127.0.0.1:6379/").into();
    config.redis.cluster_nodes = vec![format!("redis://user:{secret}@127.0.0.1:7000/").into()];
    config.database.replicas = vec![format!("postgres://root:{secret}@127.0.0.1:1/x").into()];
    assert!(config.database.url.expose().contains(secret));
    // Every printing path of the configuration: Debug, Display, Serialize, check-config's TOML.
    for printed in [
        format!("{config:?}"),
        format!("{config:#?}"),
        format!("{}", config.database.url),
        serde_json::to_string(&config).unwrap_or_else(|e| panic!("{e}")),
        config.to_toml(),
    ] {
        assert!(!printed.contains(secret), "a password leaked: {printed}");
        assert!(printed.contains(":***@"), "{printed}");
    }
    // The daemon's own run: back to URLs it can use (trust authentication
    // ignores the database password; Redis has none to check).
    config.redis.url = common::redis_url().into();
    config.redis.cluster_nodes.clear();
    config.database.replicas.clear();
    config.metrics.listen = ([127, 0, 0, 1], common::free_port()).into();
    config.log.level = "debug".into();
    let mut daemon = common::Daemon::start(&config);
    daemon
        .wait_for_log("loyaltyd ready", std::time::Duration::from_secs(20))
        .await;
    daemon.signal("TERM");
    daemon.wait_exit(std::time::Duration::from_secs(10)).await;
    let log = daemon.log_text();
    assert!(
        log.contains("root:***@"),
        "the redacted URL is logged: {log}"
    );
    assert!(!log.contains(secret), "the password leaked into the log");
    // An unreachable server with a password in the URL: the error line shows no password.
    config.database.url = format!(
        "postgres://root:{secret}@127.0.0.1:{}/x",
        common::free_port()
    )
    .into();
    config.database.connect_timeout = std::time::Duration::from_secs(1);
    let out = common::run(&config, &["score", "get", "--user", "1"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(secret));
    let out = common::run(&config, &["check-config"]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "it connects, as the service would"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(secret));
    let out = common::run(&config, &["check-config", "--offline"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));
}

#[test]
fn metrics_listen_on_loopback_by_default() {
    let config = loyaltyd::config::Config::default();
    assert!(config.metrics.listen.ip().is_loopback());
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .unwrap_or_default();
    assert!(shipped.contains("listen = \"127.0.0.1:9464\""));
}
