//! Configuration: built-in defaults < `config.toml` < environment (SPEC §6).
//!
//! figment merges the layers into one typed tree; `deny_unknown_fields` turns a
//! misspelt key into an error instead of a silently ignored setting, and
//! [`Config::validate`] checks what serde cannot (cron expressions, ranges). Every
//! error names the key and the source that set it, and exits 78. Secrets (the
//! password in a database or Redis URL) never leave this module unredacted:
//! [`Config::redacted`] is what `check-config` prints and what is logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A duration that must be longer than zero.
fn positive(key: &'static str, d: Duration) -> std::result::Result<(), (&'static str, String)> {
    if d.is_zero() {
        Err((key, "must be longer than zero".into()))
    } else {
        Ok(())
    }
}

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "config.toml";

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL connection.
    pub database: DatabaseConfig,
    /// Redis connection and cache.
    pub redis: RedisConfig,
    /// Prometheus endpoint and Redis perf lists.
    pub metrics: MetricsConfig,
    /// Debounced leaderboard refresh.
    pub leaderboard: LeaderboardConfig,
    /// Nightly integrity sweep.
    pub sweep: SweepConfig,
    /// Scheduled queue reorder.
    pub queues: QueuesConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. Default `postgres:///loyaltyd?host=/var/run/postgresql`
    /// (the local socket, as the OS user); `DATABASE_URL` is honoured.
    pub url: SecretUrl,
    /// Pool size. Default 10. The refresh and the sweep each hold one connection while they run.
    pub max_connections: u32,
    /// How long to wait for a connection (new or from the pool). Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Server-side limit for request statements. Default `30s`. Jobs use their own timeouts.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Streaming replicas for reads that may lag (leaderboard pages and
    /// ranks; see src/replicas.rs). Default none: every read goes to `url`.
    pub replicas: Vec<SecretUrl>,
    /// A replica further behind than this is not read; the primary is.
    /// Default `5s`.
    #[serde(with = "humantime_serde")]
    pub replica_max_lag: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres:///loyaltyd?host=/var/run/postgresql".into(),
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            replicas: Vec::new(),
            replica_max_lag: Duration::from_secs(5),
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL. Default `redis://127.0.0.1:6379/`; `REDIS_URL` is honoured.
    pub url: SecretUrl,
    /// A Redis Cluster's nodes (`redis://host:port`, a few are enough: the
    /// rest are discovered). Default none; when set, `url` is not used and
    /// keys carry hash tags (`loyalty:{42}`; see src/redis_conn.rs).
    pub cluster_nodes: Vec<SecretUrl>,
    /// Prepended to every Redis key. Default empty, so the seed's key names hold.
    pub key_prefix: String,
    /// Lifetime of a cached loyalty score. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Limit for one Redis command or connection attempt; past it the cache
    /// counts as missing, never as failed. Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How often the daemon brings score changes that other writers
    /// committed to the cache (src/sync.rs). Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            cluster_nodes: Vec::new(),
            key_prefix: String::new(),
            cache_ttl: Duration::from_secs(3600),
            timeout: Duration::from_millis(250),
            sync_interval: Duration::from_millis(100),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint. Default `127.0.0.1:9464` (loopback only).
    pub listen: SocketAddr,
    /// Samples kept per Redis perf list. Default 1000; 0 turns the perf lists off.
    pub perf_list_len: u32,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            perf_list_len: 1000,
        }
    }
}

/// `[leaderboard]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderboardConfig {
    /// Refresh once this many changes are pending. Default 10.
    pub refresh_threshold: u64,
    /// Refresh any pending change once the view is this old. Default `5m`.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// How often the daemon checks whether to refresh. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Time limit of one refresh. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub refresh_timeout: Duration,
    /// Answer `leaderboard rank` and `show` from committed scores (a sorted
    /// set in Redis that every score write keeps), not the view as last
    /// refreshed. Default `true`.
    pub live: bool,
    /// How the view is refreshed: `swap` (build a new view beside it, then
    /// swap the two by renames; readers wait only for the rename) or
    /// `concurrently` (`REFRESH ... CONCURRENTLY`; readers never wait, but it
    /// rewrites every row whose rank moved). Default `swap` (measured: see
    /// docs/benchmarks.md).
    pub refresh_mode: RefreshMode,
}

/// How the leaderboard view is refreshed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RefreshMode {
    /// Build a shadow view, then swap it in by renames.
    Swap,
    /// `REFRESH MATERIALIZED VIEW CONCURRENTLY`.
    Concurrently,
}

impl Default for LeaderboardConfig {
    fn default() -> Self {
        LeaderboardConfig {
            refresh_threshold: 10,
            max_staleness: Duration::from_secs(300),
            check_interval: Duration::from_secs(30),
            refresh_timeout: Duration::from_secs(600),
            live: true,
            refresh_mode: RefreshMode::Swap,
        }
    }
}

/// `[sweep]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// When the integrity sweep runs: cron with seconds, UTC. Default `0 0 3 * * *` (03:00 UTC).
    pub schedule: String,
    /// Drifted users repaired per transaction, and users per cache-check
    /// batch (one MGET). Default 10000.
    pub batch_size: u32,
    /// Time limit of one sweep. Default `2h`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            schedule: "0 0 3 * * *".into(),
            batch_size: 10_000,
            timeout: Duration::from_secs(2 * 3600),
        }
    }
}

/// `[queues]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueuesConfig {
    /// When changed queue scopes are reordered: cron with seconds, UTC. Default `0 */5 * * * *`.
    pub reorder_schedule: String,
    /// Time limit of one reorder run. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub reorder_timeout: Duration,
    /// How long an item may wait before `LoyaltydQueueBacklog` fires: exported
    /// as `loyaltyd_queue_oldest_item_bound_seconds`, which the alert compares
    /// with each queue's oldest item. Default `4h`.
    #[serde(with = "humantime_serde")]
    pub oldest_item_bound: Duration,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        QueuesConfig {
            reorder_schedule: "0 */5 * * * *".into(),
            reorder_timeout: Duration::from_secs(600),
            oldest_item_bound: Duration::from_secs(4 * 3600),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `loyaltyd=debug,sqlx=warn`). Default
    /// `info,sqlx=warn,tokio_cron_scheduler=warn,redis=error` (loyaltyd's own INFO lines;
    /// dependencies only when something is wrong); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`, one event per line. Default `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info,sqlx=warn,tokio_cron_scheduler=warn,redis=error".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Loads the configuration: defaults, then the file (`path`, or
    /// `config.toml` if it exists), then the environment; then validates it.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let figment = Self::figment(path)?;
        let config: Config = figment.extract().map_err(|e| {
            let lines: Vec<String> = e.into_iter().map(|e| describe_error(&e)).collect();
            Error::Config(crate::error::one_line(&lines.join("; ")))
        })?;
        config.validate().map_err(|(key, problem)| {
            let source = figment
                .find_metadata(key)
                .map(|m| match &m.source {
                    Some(src) => format!(" (set in {src})"),
                    None if m.name.contains("`LOYALTYD_`") => format!(
                        " (set by environment variable {ENV_PREFIX}{})",
                        key.replace('.', "__").to_ascii_uppercase()
                    ),
                    None if m.name.contains("environment") => format!(
                        " (set by environment variable {})",
                        key.replace('.', "_").to_ascii_uppercase()
                    ),
                    None => format!(" (set by {})", m.name),
                })
                .unwrap_or_default();
            Error::Config(format!("key \"{key}\"{source}: {problem}"))
        })?;
        Ok(config)
    }

    /// The layered providers, before extraction.
    fn figment(path: Option<&Path>) -> Result<Figment> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
        };
        if let Some(file) = file {
            if !file.is_file() {
                return Err(Error::Config(format!(
                    "config file {} does not exist or is not a file (check --config)",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        Ok(figment
            // The conventional variables, below our own prefixed ones.
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL", "REDIS_URL"])
                    .map(|k| k.as_str().replacen('_', ".", 1).into()),
            )
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .split("__")
                    // clap's own variable for --config, not a key.
                    .ignore(&["config"]),
            ))
    }

    /// Checks what the types alone cannot; returns the offending key and why.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        self.validate_database()?;
        self.validate_redis()?;
        if self.leaderboard.refresh_threshold == 0 {
            return Err(("leaderboard.refresh_threshold", "must be at least 1".into()));
        }
        positive("leaderboard.max_staleness", self.leaderboard.max_staleness)?;
        positive(
            "leaderboard.check_interval",
            self.leaderboard.check_interval,
        )?;
        positive(
            "leaderboard.refresh_timeout",
            self.leaderboard.refresh_timeout,
        )?;
        parse_cron(&self.sweep.schedule).map_err(|e| ("sweep.schedule", e))?;
        if self.sweep.batch_size == 0 || self.sweep.batch_size > 1_000_000 {
            return Err(("sweep.batch_size", "must be 1 to 1000000".into()));
        }
        positive("sweep.timeout", self.sweep.timeout)?;
        parse_cron(&self.queues.reorder_schedule).map_err(|e| ("queues.reorder_schedule", e))?;
        positive("queues.reorder_timeout", self.queues.reorder_timeout)?;
        positive("queues.oldest_item_bound", self.queues.oldest_item_bound)?;
        tracing_subscriber::EnvFilter::builder()
            .parse(&self.log.level)
            .map_err(|e| ("log.level", format!("not a log filter: {e}")))?;
        Ok(())
    }

    /// The `database` section's checks.
    fn validate_database(&self) -> std::result::Result<(), (&'static str, String)> {
        let url = self.database.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err((
                "database.url",
                format!(
                    "{:?} is not a postgres:// or postgresql:// URL",
                    self.database.url.to_string()
                ),
            ));
        }
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| {
                (
                    "database.url",
                    format!(
                        "not a PostgreSQL URL: {}",
                        self.database.url.redact_in(&e.to_string())
                    ),
                )
            })?;
        if self.database.max_connections == 0 {
            return Err(("database.max_connections", "must be at least 1".into()));
        }
        positive("database.connect_timeout", self.database.connect_timeout)?;
        positive(
            "database.statement_timeout",
            self.database.statement_timeout,
        )?;
        for replica in &self.database.replicas {
            replica
                .expose()
                .parse::<sqlx::postgres::PgConnectOptions>()
                .map_err(|e| {
                    (
                        "database.replicas",
                        format!(
                            "not a PostgreSQL URL: {}",
                            replica.redact_in(&e.to_string())
                        ),
                    )
                })?;
        }
        positive("database.replica_max_lag", self.database.replica_max_lag)
    }

    /// The `redis` section's checks.
    fn validate_redis(&self) -> std::result::Result<(), (&'static str, String)> {
        redis::Client::open(self.redis.url.expose()).map_err(|e| {
            (
                "redis.url",
                format!(
                    "not a Redis URL: {}",
                    self.redis.url.redact_in(&e.to_string())
                ),
            )
        })?;
        for node in &self.redis.cluster_nodes {
            redis::Client::open(node.expose()).map_err(|e| {
                (
                    "redis.cluster_nodes",
                    format!("not a Redis URL: {}", node.redact_in(&e.to_string())),
                )
            })?;
        }
        if !self.redis.cluster_nodes.is_empty() && self.redis.key_prefix.contains(['{', '}']) {
            return Err((
                "redis.key_prefix",
                "must not contain { or } with a cluster (they would become the hash tag)".into(),
            ));
        }
        positive("redis.cache_ttl", self.redis.cache_ttl)?;
        positive("redis.timeout", self.redis.timeout)?;
        positive("redis.sync_interval", self.redis.sync_interval)
    }

    /// The configuration as a TOML document, every key with its value
    /// (durations in human form): what `check-config` prints.
    pub fn to_toml(&self) -> String {
        let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(self) else {
            return String::new();
        };
        let mut out = String::new();
        for (section, keys) in sections {
            out.push_str(&format!("\n[{section}]\n"));
            if let serde_json::Value::Object(keys) = keys {
                for (key, value) in keys {
                    // JSON strings, numbers and booleans are TOML values too.
                    out.push_str(&format!("{key} = {value}\n"));
                }
            }
        }
        out
    }
}

/// A connection URL, which may carry a password. Its `Debug`, `Display` and
/// `Serialize` all show it with the password replaced by `***`, so no log
/// line, `check-config` output or error message can leak it; only
/// [`SecretUrl::expose`] gives the real text, for the code that connects.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL as written, password included: for connecting, nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `message` with this URL's password taken out, wherever it quotes the URL.
    pub fn redact_in(&self, message: &str) -> String {
        redact_in(message, &self.0)
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> SecretUrl {
        SecretUrl(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> SecretUrl {
        SecretUrl(url.to_owned())
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&redact_url(&self.0), f)
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&redact_url(&self.0))
    }
}

/// One figment error as the operator wrote the value: the key as in
/// `config.toml` (`leaderboard.max_staleness`) and, for a value from the
/// environment, the variable that set it (`LOYALTYD_LEADERBOARD__MAX_STALENESS`).
fn describe_error(e: &figment::Error) -> String {
    let path: Vec<String> = e
        .path
        .iter()
        .map(|k| k.to_ascii_lowercase())
        .skip_while(|k| k == "default")
        .collect();
    let source = e.metadata.as_ref().map(|md| {
        if md.name.contains("`LOYALTYD_`") {
            format!(
                "set by environment variable {ENV_PREFIX}{}",
                path.join("__").to_ascii_uppercase()
            )
        } else if md.name.contains("environment") {
            format!(
                "set by environment variable {}",
                path.join("_").to_ascii_uppercase()
            )
        } else if let Some(src) = &md.source {
            format!("set in {src}")
        } else {
            format!("set by {}", md.name)
        }
    });
    let kind = e.kind.to_string();
    match (path.is_empty(), source) {
        (true, Some(source)) => format!("{kind} ({source})"),
        (true, None) => kind,
        (false, Some(source)) => format!("key \"{}\" ({source}): {kind}", path.join(".")),
        (false, None) => format!("key \"{}\": {kind}", path.join(".")),
    }
}

/// The prefix of loyaltyd's environment variables.
const ENV_PREFIX: &str = "LOYALTYD_";

/// Parses a cron expression the way tokio-cron-scheduler does (seconds field
/// required, UTC), with croner's own explanation when it is wrong.
pub fn parse_cron(expr: &str) -> std::result::Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .map_err(|e| {
            format!(
                "{expr:?} is not a cron expression with a seconds field, e.g. \"0 0 3 * * *\" for 03:00 UTC daily ({e})"
            )
        })
}

/// Replaces the password of a URL (`scheme://user:password@host`) with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    // The userinfo ends at the last '@' before the path starts.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return redact_query_password(url);
    };
    let userinfo = &rest[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    redact_query_password(&format!(
        "{}{}{}",
        &url[..scheme_end],
        redacted,
        &rest[at..]
    ))
}

/// Redacts a `password=` query parameter (libpq style URLs allow one).
fn redact_query_password(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = url[q + 1..]
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{}?{}", &url[..q], params.join("&"))
}

/// Removes a URL's password from a message that may quote the URL.
fn redact_in(message: &str, url: &str) -> String {
    message.replace(url, &redact_url(url))
}

/// Reads an environment file as systemd's `EnvironmentFile=` does: one
/// `KEY=VALUE` a line, `#` and `;` comments, blank lines, values optionally
/// in single or double quotes. A line without `=` or a key that is not a
/// variable name is a configuration error naming the line.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "environment file {}: {e} (check --env-file)",
            path.display()
        ))
    })?;
    let mut vars = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let bad = || {
            Error::Config(format!(
                "environment file {} line {}: not KEY=VALUE",
                path.display(),
                n + 1
            ))
        };
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        let key = key.trim();
        if key.is_empty()
            || key.starts_with(|c: char| c.is_ascii_digit())
            || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(bad());
        }
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        vars.push((key.to_owned(), value.to_owned()));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1/"),
            "redis://:***@127.0.0.1/"
        );
        assert_eq!(
            redact_url("postgres://db/x?password=pw&sslmode=require"),
            "postgres://db/x?password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn cron_expressions_need_the_seconds_field() {
        assert!(parse_cron("0 0 3 * * *").is_ok());
        assert!(parse_cron("*/5 * * * *").is_err());
        assert!(parse_cron("not cron").is_err());
    }
}
