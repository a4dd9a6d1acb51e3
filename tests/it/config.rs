//! Configuration through the real binary: precedence, redaction, and each kind of error.

use std::process::Command;

use crate::common;

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
    cmd.current_dir(&dir)
        .args(["check-config", "--offline"])
        .arg("--json");
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
        cmd.args(["check-config", "--offline"])
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
        .args([
            "check-config",
            "--offline",
            "--config",
            "/nonexistent/loyaltyd.toml",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/loyaltyd.toml"));

    let path = std::env::temp_dir().join(crate::common::unique_prefix("bin").replace(':', "_"));
    std::fs::write(&path, b"[log]\nlevel = \"\xff\xfe\"\n").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(env!("CARGO_BIN_EXE_loyaltyd"))
        .args(["check-config", "--offline", "--config"])
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

/// `check-config --env-file` reads the unit's environment file, so it fails
/// where the service (which systemd gives that environment) would.
#[test]
fn check_config_reads_the_services_environment_file() {
    let dir = std::env::temp_dir().join(crate::common::unique_prefix("envfile").replace(':', "_"));
    let _ = std::fs::create_dir_all(&dir);
    let env_file = dir.join("loyaltyd.env");
    std::fs::write(
        &env_file,
        "# secrets\nLOYALTYD_DATABASE__URL='postgres://app:s3cret@db.example/forum'\n\nLOYALTYD_SWEEP__SCHEDULE=\"not a cron\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Without the file: the defaults pass.
    assert!(check_config(None, &[]).status.success());
    let with = |path: &std::path::Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loyaltyd"));
        for (k, _) in std::env::vars() {
            if k.starts_with("LOYALTYD_") || k == "DATABASE_URL" || k == "REDIS_URL" {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(&dir)
            .args(["check-config", "--offline", "--json", "--env-file"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let out = with(&env_file);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sweep.schedule") && err.contains("LOYALTYD_SWEEP__SCHEDULE"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    // Fixed: the file's URL is the one checked (redacted).
    std::fs::write(
        &env_file,
        "LOYALTYD_DATABASE__URL='postgres://app:s3cret@db.example/forum'\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = with(&env_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let url = v["database"]["url"].as_str().unwrap_or_default();
    assert!(
        url.contains("db.example") && !url.contains("s3cret"),
        "{url}"
    );
    // A line that is not KEY=VALUE, and a missing file: exit 78, one line.
    std::fs::write(&env_file, "LOYALTYD_LOG__LEVEL=debug\nexport oops\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = with(&env_file);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.lines().count() == 1, "{err}");
    let out = with(&dir.join("missing.env"));
    assert_eq!(out.status.code(), Some(78));
}

/// A URL without a user connects as the operating-system user, as libpq
/// does; a role or a database that does not exist is a configuration error
/// (78) that says so, not "unreachable" (69).
#[sqlx::test(migrations = false)]
async fn a_url_without_a_user_connects_as_the_os_user_and_missing_roles_and_databases_say_so(
    pool: sqlx::PgPool,
) {
    common::migrate(&pool).await;
    let db: String = sqlx::query_scalar("SELECT current_database()::TEXT")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let score = |url: String, env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loyaltyd"));
        for (k, _) in std::env::vars() {
            if k.starts_with("LOYALTYD_")
                || k.starts_with("PG")
                || k == "DATABASE_URL"
                || k == "REDIS_URL"
            {
                cmd.env_remove(k);
            }
        }
        let dir = std::env::temp_dir();
        cmd.current_dir(dir)
            .env("LOYALTYD_DATABASE__URL", url)
            .envs(env.iter().copied())
            .args(["--json", "score", "get", "--user", "1"])
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    crate::common::users(&pool, 1).await;
    // The suite runs as root, whose PostgreSQL role is root.
    let out = score(
        format!("postgres:///{db}?host=/var/run/postgresql"),
        &[("USER", "root")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // PGUSER and PGDATABASE are honoured as libpq honours them.
    let out = score(
        "postgres:///?host=/var/run/postgresql".into(),
        &[("PGUSER", "root"), ("PGDATABASE", db.as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = score(
        format!("postgres:///{db}?host=/var/run/postgresql"),
        &[("USER", "no_such_role_here")],
    );
    refused_78(
        &out,
        &["role \"no_such_role_here\" does not exist", "CREATE ROLE"],
    );
    let out = score(
        "postgres://root@localhost/no_such_database_here?host=/var/run/postgresql".into(),
        &[],
    );
    refused_78(&out, &["does not exist", "createdb"]);
}

/// A configuration error (exit 78) whose line says each of `says`.
fn refused_78(out: &std::process::Output, says: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(says.iter().all(|s| err.contains(s)), "{err}");
}

/// docs/scaling.md's two configurations are what they say: the replicas in
/// their order with their lag bound, and the cluster's seed nodes.
#[test]
fn the_scaling_guides_configurations_load_as_written() {
    let replicas = effective(Some(&common::doc_example("toml-replicas")), &[]);
    let listed: Vec<String> = replicas["database"]["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("{replicas}"))
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(listed.len(), 2, "{replicas}");
    assert!(
        listed[0].contains("replica-1") && listed[1].contains("replica-2"),
        "{listed:?}"
    );
    assert_eq!(replicas["database"]["replica_max_lag"], "5s");
    let cluster = effective(Some(&common::doc_example("toml-cluster")), &[]);
    let nodes = cluster["redis"]["cluster_nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("{cluster}"));
    assert_eq!(nodes.len(), 3, "{cluster}");
    assert!(nodes[2].as_str().unwrap_or_default().contains("10.0.0.3"));
}
