//! Configuration through the real binary: precedence, redaction, and each kind of error.

use std::process::Command;

fn check_config(file: Option<&str>, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loyaltyd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LOYALTYD_") || k == "DATABASE_URL" || k == "REDIS_URL" {
            cmd.env_remove(k);
        }
    }
    // An empty working directory: no config.toml is picked up by accident.
    let dir = std::env::temp_dir().join(crate::common::unique_prefix("cwd").replace(':', "_"));
    let _ = std::fs::create_dir_all(&dir);
    cmd.current_dir(&dir).arg("check-config").arg("--json");
    if let Some(text) = file {
        let path = dir.join("custom.toml");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        cmd.arg("--config").arg(path);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap_or_else(|e| panic!("{e}"))
}

fn effective(file: Option<&str>, env: &[(&str, &str)]) -> serde_json::Value {
    let out = check_config(file, env);
    assert!(
        out.status.success(),
        "check-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"))
}

fn refused(file: Option<&str>, env: &[(&str, &str)]) -> String {
    let out = check_config(file, env);
    assert_eq!(
        out.status.code(),
        Some(78),
        "expected exit 78; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn defaults_are_overridden_by_the_file_and_the_file_by_the_environment() {
    let defaults = effective(None, &[]);
    assert_eq!(defaults["leaderboard"]["refresh_threshold"], 10);
    assert_eq!(defaults["redis"]["cache_ttl"], "1h");
    assert_eq!(defaults["metrics"]["listen"], "127.0.0.1:9464");
    assert_eq!(defaults["redis"]["key_prefix"], "");

    let file = "[leaderboard]\nrefresh_threshold = 25\nmax_staleness = \"90s\"\n[redis]\nkey_prefix = \"f:\"\n";
    let from_file = effective(Some(file), &[]);
    assert_eq!(from_file["leaderboard"]["refresh_threshold"], 25);
    assert_eq!(from_file["leaderboard"]["max_staleness"], "1m 30s");
    assert_eq!(from_file["redis"]["key_prefix"], "f:");

    let from_env = effective(
        Some(file),
        &[
            ("LOYALTYD_LEADERBOARD__REFRESH_THRESHOLD", "40"),
            ("LOYALTYD_SWEEP__BATCH_SIZE", "77"),
        ],
    );
    assert_eq!(from_env["leaderboard"]["refresh_threshold"], 40);
    assert_eq!(
        from_env["leaderboard"]["max_staleness"], "1m 30s",
        "the file still applies"
    );
    assert_eq!(from_env["sweep"]["batch_size"], 77);
}

#[test]
fn database_url_and_redis_url_are_honoured_below_the_prefixed_variables() {
    let plain = effective(
        None,
        &[
            ("DATABASE_URL", "postgres://a@db1/x"),
            ("REDIS_URL", "redis://cache1:6380/"),
        ],
    );
    assert_eq!(plain["database"]["url"], "postgres://a@db1/x");
    assert_eq!(plain["redis"]["url"], "redis://cache1:6380/");
    let both = effective(
        None,
        &[
            ("DATABASE_URL", "postgres://a@db1/x"),
            ("LOYALTYD_DATABASE__URL", "postgres://b@db2/y"),
        ],
    );
    assert_eq!(both["database"]["url"], "postgres://b@db2/y");
}

#[test]
fn passwords_never_appear_in_check_config_output() {
    for json in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loyaltyd"));
        cmd.arg("check-config")
            .env(
                "LOYALTYD_DATABASE__URL",
                "postgres://app:hunter2secret@db/x",
            )
            .env("LOYALTYD_REDIS__URL", "redis://:redispw99@cache/");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("{e}"));
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{all}");
        assert!(
            !all.contains("hunter2secret") && !all.contains("redispw99"),
            "{all}"
        );
        assert!(all.contains("app:***@db"), "{all}");
    }
}

#[test]
fn each_kind_of_configuration_error_exits_78_naming_the_key() {
    let unknown = refused(Some("[database]\nmax_conections = 5\n"), &[]);
    assert!(unknown.contains("max_conections"), "{unknown}");
    let duration = refused(
        Some("[leaderboard]\nmax_staleness = \"five minutes\"\n"),
        &[],
    );
    assert!(
        duration.to_lowercase().contains("max_staleness"),
        "{duration}"
    );
    let cron = refused(Some("[sweep]\nschedule = \"*/5 * * * *\"\n"), &[]);
    assert!(
        cron.contains("sweep.schedule") && cron.contains("seconds"),
        "{cron}"
    );
    let reorder = refused(
        None,
        &[("LOYALTYD_QUEUES__REORDER_SCHEDULE", "every tuesday")],
    );
    assert!(
        reorder.contains("queues.reorder_schedule") && reorder.contains("LOYALTYD_"),
        "{reorder}"
    );
    let range = refused(None, &[("LOYALTYD_DATABASE__MAX_CONNECTIONS", "0")]);
    assert!(range.contains("database.max_connections"), "{range}");
    let wrong_type = refused(None, &[("LOYALTYD_SWEEP__BATCH_SIZE", "lots")]);
    assert!(
        wrong_type.to_lowercase().contains("batch_size"),
        "{wrong_type}"
    );
    let listen = refused(Some("[metrics]\nlisten = \"not an address\"\n"), &[]);
    assert!(listen.contains("listen"), "{listen}");
    let syntax = refused(Some("[database\nurl = 1\n"), &[]);
    assert!(syntax.contains("custom.toml"), "{syntax}");
    let format = refused(Some("[log]\nformat = \"xml\"\n"), &[]);
    assert!(format.contains("format"), "{format}");
    let url = refused(None, &[("LOYALTYD_DATABASE__URL", "mysql://nope")]);
    assert!(url.contains("database.url"), "{url}");
}

#[test]
fn a_missing_or_unreadable_config_file_exits_78() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loyaltyd"));
    let out = cmd
        .args(["check-config", "--config", "/nonexistent/loyaltyd.toml"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/loyaltyd.toml"));

    let path = std::env::temp_dir().join(crate::common::unique_prefix("bin").replace(':', "_"));
    std::fs::write(&path, b"[log]\nlevel = \"\xff\xfe\"\n").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(env!("CARGO_BIN_EXE_loyaltyd"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}
