//! Test helpers: contexts on the test database, unique Redis prefixes, the
//! real binary, and a TCP proxy that can cut a service off and bring it back.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use loyaltyd::config::Config;
use loyaltyd::context::Context;
use loyaltyd::loyalty::NewEvent;
use loyaltyd::types::{ContentType, Ident, Outcome, UserId};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// A user id known to be valid.
pub fn uid(id: i64) -> UserId {
    UserId::new(id).unwrap_or_else(|e| panic!("{e}"))
}

/// An identifier known to be valid.
pub fn ident(s: &str) -> Ident {
    Ident::parse("test", s).unwrap_or_else(|e| panic!("{e}"))
}

/// A moderation event of `user` on content `c-1`.
pub fn event(user: i64, content: ContentType, outcome: Outcome) -> NewEvent {
    NewEvent {
        user: uid(user),
        event_type: ident("moderation_decision"),
        content_type: content,
        content_id: ident("c-1"),
        outcome,
        event_id: None,
    }
}

/// The `n`th of a varied stream of events of `user`: every content type
/// and outcome in turn (scores go up and down).
pub fn varied_event(user: i64, n: usize) -> NewEvent {
    NewEvent {
        content_id: ident(&format!("c{n}")),
        ..event(user, ContentType::ALL[n % 3], Outcome::ALL[(n / 3) % 3])
    }
}

/// The CLI arguments of `event record` (event type `d`).
pub fn record_args<'a>(
    user: &'a str,
    content_type: &'a str,
    content_id: &'a str,
    outcome: &'a str,
) -> Vec<&'a str> {
    vec![
        "event",
        "record",
        "--user",
        user,
        "--event-type",
        "d",
        "--content-type",
        content_type,
        "--content-id",
        content_id,
        "--outcome",
        outcome,
    ]
}

/// The in-process Prometheus exporter (one for the whole test binary: the
/// recorder is global); where it listens.
pub async fn exporter() -> SocketAddr {
    static ADDR: tokio::sync::OnceCell<SocketAddr> = tokio::sync::OnceCell::const_new();
    *ADDR
        .get_or_init(|| async {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            // The exporter's tasks must outlive any one test's runtime: give them their own.
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async move {
                        loyaltyd::telemetry::install_exporter(addr)
                            .unwrap_or_else(|e| panic!("{e}"));
                        std::future::pending::<()>().await;
                    });
                }
            });
            for _ in 0..100 {
                if scrape(addr).await.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            addr
        })
        .await
}

/// One series' value in a scrape of the in-process exporter (0 when absent).
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = scrape(addr).await.unwrap_or_else(|| panic!("no scrape"));
    series(&text, name).unwrap_or(0.0)
}

/// The Redis URL of the test run.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// A key prefix no other test uses.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "test:{name}:{}:{}:{}:",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The database URL of a test pool (same server, the test's own database).
pub fn database_url(pool: &PgPool) -> String {
    let opts = pool.connect_options();
    let base = std::env::var("DATABASE_URL").unwrap_or_default();
    let db = opts.get_database().unwrap_or("postgres");
    // Replace the path (database name) of the base URL, keep its query.
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h.to_owned(), format!("?{q}")),
        None => (base.clone(), String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let path_start = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &head[..path_start])
}

/// A configuration for the test database with its own Redis prefix.
pub fn config(pool: &PgPool, name: &str) -> Config {
    let mut c = Config::default();
    c.database.url = database_url(pool).into();
    c.redis.url = redis_url().into();
    c.redis.key_prefix = unique_prefix(name);
    c
}

/// A context on the test pool, perf lists off.
pub fn ctx(pool: &PgPool, name: &str) -> Context {
    ctx_with(pool, config(pool, name), false)
}

/// A context on the test pool with a given configuration.
pub fn ctx_with(pool: &PgPool, config: Config, perf: bool) -> Context {
    Context::with_pool(config, pool.clone(), perf).unwrap_or_else(|e| panic!("context: {e}"))
}

/// A larger pool on the same test database, for many concurrent writers.
pub async fn wide_pool(opts: PgConnectOptions, size: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("pool: {e}"))
}

/// SPEC §4's table, the oracle the database's rule (`event_points`,
/// sql/scoring.sql) is tested against: multiplier (topic 5, otherwise 1)
/// times the outcome's sign.
pub fn seed_points(content: ContentType, outcome: Outcome) -> i64 {
    let multiplier = if content == ContentType::Topic { 5 } else { 1 };
    match outcome {
        Outcome::Approved => multiplier,
        Outcome::Rejected => -multiplier,
        Outcome::Calibrated => 0,
    }
}

/// Migrates a test's database as `loyaltyd migrate` does: the migrations,
/// then the current SQL definitions (sql/). Every test that wants a
/// loyaltyd database starts with it (`#[sqlx::test]` alone would run the
/// migrations only).
pub async fn migrate(pool: &PgPool) {
    loyaltyd::db::migrate(pool)
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
}

/// [`migrate`] for a test that builds its own pools from `opts`.
pub async fn migrate_with(opts: &PgConnectOptions) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await
        .unwrap_or_else(|e| panic!("pool: {e}"));
    migrate(&pool).await;
    pool.close().await;
}

/// Every object of the current schema, one line each, sorted: columns
/// (type, nullability, default), constraints, indexes, triggers, functions
/// (arguments, result, volatility, security, settings, whether PUBLIC may
/// run it, a digest of the body: the bodies are in sql/), views (their
/// definitions), sequences; what is named in `except` left out. The schema
/// snapshot (tests/schema.snapshot) is this text of a migrated database.
pub async fn schema_text(pool: &PgPool, except: &[&str]) -> BTreeSet<String> {
    let rows: Vec<String> = sqlx::query_scalar(
        r#"
        SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
               || COALESCE(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = current_schema()::REGNAMESPACE AND c.relkind IN ('r', 'v', 'm')
          AND a.attnum > 0 AND NOT a.attisdropped AND c.relname <> '_sqlx_migrations'
        UNION ALL
        SELECT 'constraint ' || conrelid::REGCLASS || '.' || conname || ' ' || pg_get_constraintdef(oid)
               || CASE WHEN convalidated THEN '' ELSE ' NOT VALID' END
        FROM pg_constraint WHERE connamespace = current_schema()::REGNAMESPACE AND conrelid <> 0
          AND conrelid::REGCLASS::TEXT <> '_sqlx_migrations'
        UNION ALL
        SELECT 'index ' || pg_get_indexdef(x.indexrelid) || CASE WHEN x.indisvalid THEN '' ELSE ' INVALID' END
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        WHERE i.relnamespace = current_schema()::REGNAMESPACE AND x.indrelid::REGCLASS::TEXT <> '_sqlx_migrations'
        UNION ALL
        SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE NOT t.tgisinternal AND c.relnamespace = current_schema()::REGNAMESPACE
        UNION ALL
        SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') returns '
               || pg_get_function_result(p.oid) || ' ' || l.lanname
               || CASE p.provolatile WHEN 'i' THEN ' immutable' WHEN 's' THEN ' stable' ELSE ' volatile' END
               || CASE WHEN p.prosecdef THEN ' security definer' ELSE '' END
               || COALESCE(' set ' || array_to_string(p.proconfig, ','), '')
               || CASE WHEN has_function_privilege('public', p.oid, 'EXECUTE') THEN ' public' ELSE '' END
               || ' body ' || md5(p.prosrc || COALESCE(pg_get_function_sqlbody(p.oid), ''))
        FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
        WHERE p.pronamespace = current_schema()::REGNAMESPACE
        UNION ALL
        SELECT CASE c.relkind WHEN 'm' THEN 'materialized view ' ELSE 'view ' END || c.relname || ' '
               || regexp_replace(btrim(pg_get_viewdef(c.oid)), '\s+', ' ', 'g')
        FROM pg_class c
        WHERE c.relnamespace = current_schema()::REGNAMESPACE AND c.relkind IN ('v', 'm')
        UNION ALL
        SELECT 'sequence ' || s.seqrelid::REGCLASS || ' ' || format_type(s.seqtypid, NULL) FROM pg_sequence s
        JOIN pg_class c ON c.oid = s.seqrelid WHERE c.relnamespace = current_schema()::REGNAMESPACE
        "#,
    )
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("schema: {e}"));
    rows.into_iter()
        // The forum creates its users: its own default on users.id stays.
        .map(|r| match r.split_once(" default nextval('users_id_seq") {
            Some((column, _)) if !except.is_empty() => column.to_owned(),
            _ => r,
        })
        .filter(|r| !except.iter().any(|x| r.contains(x)))
        .collect()
}

/// A raw Redis connection for inspecting keys.
pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap_or_else(|e| panic!("redis url: {e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("redis: {e}"))
}

/// GET a key as an integer.
pub async fn redis_get_i64(key: &str) -> Option<i64> {
    let mut r = redis().await;
    let v: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut r)
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"));
    v.map(|v| v.parse().unwrap_or_else(|e| panic!("{key}={v}: {e}")))
}

/// Inserts users `1..=n` (`user_<id>`, sign-ups one minute apart, score 0).
pub async fn users(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO users (id, username, created_at)
         SELECT g, 'user_' || g, TIMESTAMPTZ '2024-01-01' + g * INTERVAL '1 minute' FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("users: {e}"));
}

/// Users 1..=`positive` + 3 with many tied scores (1 + id % 4) and three
/// more at zero or below (unranked), written with their bookkeeping; their
/// sign-ups go back an hour for every `tied` ids (ties of sign-up time
/// where `tied` > 1: the id decides).
pub async fn tied_users(pool: &PgPool, positive: i64, tied: i64) {
    sqlx::query(
        "INSERT INTO users (id, username, loyalty_score, score_version, created_at)
         SELECT g, 'u' || g, CASE WHEN g <= $1 THEN 1 + g % 4 ELSE -(g % 2) END, 1,
                TIMESTAMPTZ '2024-01-01' - (g / $2) * INTERVAL '1 hour'
         FROM generate_series(1, $1 + 3) g",
    )
    .bind(positive)
    .bind(tied)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Every user's stored score next to the sum of their events.
pub async fn score_drift(pool: &PgPool) -> Vec<(i64, i64, i64)> {
    sqlx::query_as(
        "SELECT u.id, u.loyalty_score, COALESCE(SUM(e.score_delta), 0)::BIGINT
         FROM users u LEFT JOIN moderation_events e ON e.user_id = u.id
         GROUP BY u.id HAVING u.loyalty_score <> COALESCE(SUM(e.score_delta), 0) ORDER BY u.id",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("drift: {e}"))
}

/// A Redis URL where nothing listens.
pub fn dead_redis_url() -> String {
    // Bind then drop: the port is free and, for the test's duration, closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1);
    format!("redis://127.0.0.1:{port}/")
}

// ---------------------------------------------------------------- the binary

/// The `loyaltyd` binary with a config file and no inherited LOYALTYD_ variables.
pub fn loyaltyd(config: &Config) -> Command {
    loyaltyd_at(&write_config(config))
}

/// The binary with `--config file`, the test's own environment cleared of
/// loyaltyd's variables.
pub fn loyaltyd_at(file: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loyaltyd"));
    cmd.arg("--config").arg(file);
    for (k, _) in std::env::vars() {
        if k.starts_with("LOYALTYD_") || k == "DATABASE_URL" || k == "REDIS_URL" {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Runs the binary to completion.
pub fn run(config: &Config, args: &[&str]) -> Output {
    loyaltyd(config)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running loyaltyd: {e}"))
}

/// Runs the binary with `--json` and parses stdout; panics unless it exited 0.
pub fn run_json(config: &Config, args: &[&str]) -> serde_json::Value {
    let out = run(config, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "loyaltyd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: bad JSON {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Writes a configuration to a temporary TOML file.
pub fn write_config(config: &Config) -> PathBuf {
    let dir = std::env::temp_dir().join("loyaltyd-tests");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{}.toml", unique_prefix("cfg").replace(':', "_")));
    let text = config.to_toml();
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing config: {e}"));
    path
}

/// A running daemon whose stderr is collected in a file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    /// The configuration file it runs with (rewrite it, then SIGHUP).
    pub config_file: PathBuf,
}

impl Daemon {
    /// Starts `loyaltyd run` with JSON logs.
    pub fn start(config: &Config) -> Daemon {
        let mut config = config.clone();
        config.log.format = loyaltyd::config::LogFormat::Json;
        let log = std::env::temp_dir()
            .join("loyaltyd-tests")
            .join(format!("{}.log", unique_prefix("daemon").replace(':', "_")));
        let _ = std::fs::create_dir_all(log.parent().unwrap_or(&std::env::temp_dir()));
        let file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("log file: {e}"));
        let config_file = write_config(&config);
        let child = loyaltyd_at(&config_file)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning the daemon: {e}"));
        Daemon {
            child,
            log,
            config_file,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's JSON events.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.log_text().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} in the daemon log within {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the exit; returns the code and how long it took.
    pub async fn wait_exit(&mut self, within: Duration) -> (Option<i32>, Duration) {
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status.code(), start.elapsed());
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!(
                    "the daemon did not exit within {within:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}

/// Scrapes `/metrics` over HTTP.
pub async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// The value of one exact series line (`name{labels}`) in a scrape.
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// A Redis server of this test's own, that can be killed for real.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port(),
            child: None,
        };
        r.restart().await;
        r
    }

    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"));
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("private redis-server did not start");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn get(&self, key: &str) -> Option<i64> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let v: Option<String> = redis::cmd("GET").arg(key).query_async(&mut c).await.ok()?;
        v.and_then(|v| v.parse().ok())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- the proxy

/// Where a proxy forwards to.
#[derive(Clone, Debug)]
pub enum Upstream {
    Tcp(String),
    Unix(PathBuf),
}

impl Upstream {
    /// The PostgreSQL server of `DATABASE_URL` (socket or TCP).
    pub fn postgres() -> Upstream {
        let url = std::env::var("DATABASE_URL").unwrap_or_default();
        let opts: PgConnectOptions = url.parse().unwrap_or_else(|e| panic!("DATABASE_URL: {e}"));
        let host = opts.get_host().to_owned();
        let port = opts.get_port();
        if host.starts_with('/') {
            Upstream::Unix(PathBuf::from(host).join(format!(".s.PGSQL.{port}")))
        } else {
            Upstream::Tcp(format!("{host}:{port}"))
        }
    }

    /// The Redis server of `REDIS_URL`.
    pub fn redis() -> Upstream {
        let url = redis_url();
        let hostport = url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .rsplit('@')
            .next()
            .unwrap_or("127.0.0.1:6379")
            .to_owned();
        Upstream::Tcp(hostport)
    }
}

/// A TCP proxy on a fixed loopback port that can be cut (port closed, every
/// connection dropped) and restored, to play a service outage; or stalled
/// (connections stay open, replies are held back), to play a server that
/// stopped answering.
pub struct Proxy {
    pub port: u16,
    upstream: Upstream,
    state: Arc<Mutex<Option<JoinHandle<()>>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: Upstream) -> Proxy {
        let p = Proxy {
            port: free_port(),
            upstream,
            state: Arc::new(Mutex::new(None)),
            conns: Arc::new(Mutex::new(Vec::new())),
            stalled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        p.restore().await;
        p
    }

    /// Closes the port and drops every connection.
    pub async fn cut(&self) {
        if let Some(h) = self.state.lock().await.take() {
            h.abort();
        }
        for c in self.conns.lock().await.drain(..) {
            c.abort();
        }
    }

    /// Holds every reply back (the connections stay open) until [`Proxy::resume`].
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Lets replies through again.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// Opens the port again.
    pub async fn restore(&self) {
        let mut state = self.state.lock().await;
        if state.is_some() {
            return;
        }
        let mut listener = None;
        for _ in 0..100 {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let listener = listener.unwrap_or_else(|| panic!("cannot rebind proxy port {}", self.port));
        let upstream = self.upstream.clone();
        let conns = self.conns.clone();
        let stalled = self.stalled.clone();
        *state = Some(tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let stalled = stalled.clone();
                let task = tokio::spawn(async move {
                    match upstream {
                        Upstream::Tcp(addr) => {
                            if let Ok(out) = TcpStream::connect(addr).await {
                                relay(inbound, out, stalled).await;
                            }
                        }
                        Upstream::Unix(path) => {
                            if let Ok(out) = UnixStream::connect(path).await {
                                relay(inbound, out, stalled).await;
                            }
                        }
                    }
                });
                conns.lock().await.push(task);
            }
        }));
    }

    /// A PostgreSQL URL through this proxy to database `db`.
    pub fn postgres_url(&self, db: &str) -> String {
        let url = std::env::var("DATABASE_URL").unwrap_or_default();
        let opts: PgConnectOptions = url.parse().unwrap_or_else(|e| panic!("DATABASE_URL: {e}"));
        format!(
            "postgres://{}@127.0.0.1:{}/{db}",
            opts.get_username(),
            self.port
        )
    }

    /// A Redis URL through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// Copies both ways; replies (upstream to client) wait while `stalled`.
async fn relay<S>(inbound: TcpStream, out: S, stalled: Arc<std::sync::atomic::AtomicBool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = tokio::io::split(out);
    let up = async move {
        let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match out_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while stalled.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if in_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}

/// Polls `check` until it holds, or fails the test naming `what`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Users `1..=n` with positive scores and spread sign-ups: a leaderboard view
/// that takes a while to refresh concurrently.
pub async fn big_board(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO users (id, username, loyalty_score, score_version, created_at)
         SELECT g, 'u' || g, 1 + (g * 7919) % 5000, 1, TIMESTAMPTZ '2024-01-01' + g * INTERVAL '1 second'
         FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// True while the server refreshes the view in this test's database (a
/// REFRESH, or the swap refresh building its shadow view).
pub async fn refreshing(pool: &PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                        WHERE datname = current_database() AND state = 'active'
                          AND (query LIKE 'REFRESH MATERIALIZED VIEW%'
                               OR query LIKE 'CREATE MATERIALIZED VIEW user_leaderboard_next%'))",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(false)
}

// ---------------------------------------------------------------- invariants

/// Every stored queue invariant of one queue, from SQL alone: each item's
/// position (the read API's `queue_position`) equals its rank by key within
/// its scope (dense, 1-based); each scope's length equals its items; each
/// block count equals the keys in that block. Returns scope -> items in order.
pub async fn queue_invariants(
    pool: &PgPool,
    q: loyaltyd::types::QueueKind,
) -> std::collections::BTreeMap<String, Vec<String>> {
    use loyaltyd::types::QueueKind;
    let (table, item, scope) = match q {
        QueueKind::Topic => ("topic_creation_queue", "topic_id", "''"),
        QueueKind::Post => ("post_moderation_queue", "post_id", "topic_id"),
        QueueKind::Message => ("private_message_queue", "message_id", "conversation_id"),
    };
    let wrong: Vec<(String, String, i64, Option<i64>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH ranked AS (
             SELECT {scope}::TEXT AS scope, {item} AS item,
                    ROW_NUMBER() OVER (PARTITION BY {scope} ORDER BY position_in_queue) AS rank
             FROM {table})
         SELECT r.scope, r.item, r.rank, p.position
         FROM ranked r LEFT JOIN LATERAL queue_position('{q}', r.item) p ON true
         WHERE p.position IS DISTINCT FROM r.rank"
        )))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("positions: {e}"));
    assert_eq!(wrong, vec![], "positions of the {q} queue");
    let bad_lengths: Vec<(String, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT s.scope, queue_length('{q}', s.scope), (SELECT count(*) FROM {table} t WHERE {scope} = s.scope)
         FROM (SELECT scope FROM queue_scopes WHERE queue = '{q}'
               UNION SELECT scope FROM queue_changes WHERE queue = '{q}'
               UNION SELECT {scope}::TEXT FROM {table}) s
         WHERE queue_length('{q}', s.scope) <> (SELECT count(*) FROM {table} t WHERE {scope} = s.scope)"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("lengths: {e}"));
    assert_eq!(bad_lengths, vec![], "scope lengths of the {q} queue");
    let bad_blocks: Vec<(String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH actual AS (SELECT {scope}::TEXT AS scope, queue_block(position_in_queue) AS block, count(*) AS n
                         FROM {table} GROUP BY 1, 2),
              stored AS (SELECT scope, block, sum(n)::BIGINT AS n
                         FROM (SELECT scope, block, item_count::BIGINT AS n FROM queue_blocks WHERE queue = '{q}'
                               UNION ALL
                               SELECT scope, queue_block(key), CASE WHEN kind > 0 THEN n ELSE -n END
                               FROM queue_changes WHERE queue = '{q}') c
                         GROUP BY 1, 2 HAVING sum(n) <> 0)
         SELECT COALESCE(a.scope, s.scope), COALESCE(a.block, s.block), COALESCE(a.n, 0), COALESCE(s.n, 0)
         FROM actual a FULL JOIN stored s USING (scope, block)
         WHERE COALESCE(a.n, 0) <> COALESCE(s.n, 0)"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("blocks: {e}"));
    assert_eq!(bad_blocks, vec![], "block counts of the {q} queue");
    // Superblocks: the blocks' sums (both as folded; no stored zero).
    let bad_superblocks: Vec<(String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH summed AS (SELECT scope, block >> 5 AS superblock, sum(item_count)::BIGINT AS n
                         FROM queue_blocks WHERE queue = '{q}' GROUP BY 1, 2),
              stored AS (SELECT scope, superblock, item_count::BIGINT AS n FROM queue_superblocks WHERE queue = '{q}')
         SELECT COALESCE(a.scope, s.scope), COALESCE(a.superblock, s.superblock), COALESCE(a.n, -1), COALESCE(s.n, -1)
         FROM summed a FULL JOIN stored s USING (scope, superblock)
         WHERE a.n IS DISTINCT FROM s.n OR s.n = 0"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("superblocks: {e}"));
    assert_eq!(
        bad_superblocks,
        vec![],
        "superblock counts of the {q} queue"
    );
    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {scope}::TEXT, {item} FROM {table} ORDER BY 1, position_in_queue"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("items: {e}"));
    let mut scopes = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (s, i) in rows {
        scopes.entry(s).or_default().push(i);
    }
    scopes
}

/// Pending leaderboard changes counted in PostgreSQL, plus those refreshes
/// consumed: every event with a non-zero delta ever counted.
pub async fn changes_counted(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT COALESCE(SUM(changes), 0) FROM leaderboard_pending)::BIGINT
              + (SELECT consumed_changes FROM leaderboard_state)",
    )
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Events recorded with a non-zero score delta.
pub async fn nonzero_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM moderation_events WHERE score_delta <> 0")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One pass of the daemon's cache sync; a failed pass fails the test.
pub async fn sync(ctx: &Context) -> loyaltyd::sync::Synced {
    loyaltyd::sync::sync_once(ctx)
        .await
        .unwrap_or_else(|e| panic!("cache sync: {e}"))
}

/// A forced refresh of the view; a failed refresh fails the test.
pub async fn refresh(ctx: &Context) -> loyaltyd::leaderboard::RefreshReport {
    loyaltyd::leaderboard::refresh(ctx, true, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("refresh: {e}"))
}

/// What a slow reader read before any write: score 0 at version 0.
pub fn stale_score(user: i64) -> loyaltyd::score_row::ScoreRow {
    loyaltyd::score_row::ScoreRow {
        user: uid(user),
        score: 0,
        version: 0,
        created_us: 0,
        username: None,
    }
}

/// Runs the integrity sweep in batches of `batch`; a failed sweep fails the test.
pub async fn sweep(ctx: &Context, batch: u32) -> loyaltyd::sweep::SweepReport {
    loyaltyd::sweep::run(ctx, batch, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("sweep: {e}"))
}

/// Runs the integrity sweep and returns how many users it found drifted.
pub async fn sweep_drift(ctx: &Context) -> u64 {
    let report = sweep(ctx, 1000).await;
    assert!(report.completed, "{report:?}");
    report.drifted_users
}

/// A user's score in the database.
pub async fn score(pool: &PgPool, user: i64) -> i64 {
    sqlx::query_scalar("SELECT loyalty_score FROM users WHERE id = $1")
        .bind(user)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts the sweep finds nothing and every change was counted once.
pub async fn scores_exact(pool: &PgPool, what: &str) {
    let ctx = ctx(pool, "exact");
    assert_eq!(sweep_drift(&ctx).await, 0, "drift after {what}");
    assert_eq!(
        changes_counted(pool).await,
        nonzero_events(pool).await,
        "pending changes after {what}"
    );
}

// ---------------------------------------------------------------- other clients

/// A login role of this test's own, with the forum's privileges
/// (`grant_forum_access`) on the test database; dropped with [`ForumRole::drop_role`].
/// It logs in with a password over TCP, as a forum's application does, which
/// Debian's default `pg_hba.conf` (scram-sha-256 on 127.0.0.1) lets in as well
/// as a trusting one.
pub struct ForumRole {
    pub name: String,
    pub database: String,
    pub password: String,
}

impl ForumRole {
    /// Creates the role and grants it what the SQL contract says a forum needs.
    pub async fn create(pool: &PgPool, name: &str) -> ForumRole {
        let name = ForumRole::unique_name(name);
        let database: String = sqlx::query_scalar("SELECT current_database()::TEXT")
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for sql in [
            format!(
                "CREATE ROLE \"{name}\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{name}'"
            ),
            format!("SELECT grant_forum_access('{name}')"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(pool)
                .await
                .unwrap_or_else(|e| panic!("role {name}: {e}"));
        }
        ForumRole {
            password: name.clone(),
            name,
            database,
        }
    }

    /// A role name no other test uses.
    pub fn unique_name(name: &str) -> String {
        format!(
            "forum_{name}_{}",
            unique_prefix("r").replace(':', "_").replace("test_r_", "")
        )
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect::<String>()
        .to_lowercase()
    }

    /// A libpq connection string for this role.
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port=5432 dbname={} user={} password={}",
            self.database, self.name, self.password
        )
    }

    /// The same as a URL.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:5432/{}",
            self.name, self.password, self.database
        )
    }

    /// Runs a psql script as this role; returns (success, stdout, stderr).
    pub fn psql(&self, script: &str) -> (bool, String, String) {
        psql(&self.dsn(), script)
    }

    /// Drops the role (and what it owns) again.
    pub async fn drop_role(self, pool: &PgPool) {
        for sql in [
            format!("DROP OWNED BY \"{}\"", self.name),
            format!("DROP ROLE \"{}\"", self.name),
        ] {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(pool).await;
        }
    }
}

/// A forum's handlers through asyncpg, which prepares every statement
/// (tests/fixtures/asyncpg_app.py): `mode` "original" (plain SQL on the
/// original design's tables and a forum view) or "api" (loyaltyd's SQL API,
/// as a least-privileged role). Prints its JSON summary when `stop` exists.
pub fn asyncpg_app(
    dsn: &str,
    tasks: usize,
    seconds: u32,
    users: i64,
    stop: &str,
    mode: &str,
) -> Child {
    Command::new(PYTHON)
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/asyncpg_app.py"),
            dsn,
            &tasks.to_string(),
            &seconds.to_string(),
            &users.to_string(),
            stop,
            mode,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"))
}

/// docs/integrating.md's Python handlers run as one of a forum's processes
/// (tests/fixtures/forum_workload.py): `posts` posts submitted and decided as
/// `dsn`, over users `1..=users`; `mode` "pgbouncer" connects as the guide
/// says to through a pooler. [`finish`] gives its JSON summary.
pub fn forum_workload(dsn: &str, worker: usize, posts: usize, users: i64, mode: &str) -> Child {
    Command::new(PYTHON)
        .args([
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/forum_workload.py"
            ),
            dsn,
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/integrating.md"),
            &worker.to_string(),
            &posts.to_string(),
            &users.to_string(),
            mode,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"))
}

pub async fn finish(app: Child) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || app.wait_with_output())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "the application: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a SQL file of tests/fixtures/ with psql on `db` over the local
/// socket, with `vars` as psql variables, stopping at its first error.
pub fn psql_fixture(db: &str, file: &str, vars: &[(&str, String)]) {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    for (k, v) in vars {
        cmd.args(["-v", &format!("{k}={v}")]);
    }
    let out = cmd
        .args(["-h", "/var/run/postgresql", "-d", db, "-f"])
        .arg(format!(
            "{}/tests/fixtures/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .unwrap_or_else(|e| panic!("psql: {e}"));
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed when the test ends, however it ends.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Killed {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Debian's Python, which has `python3-psycopg` (the test set-up installs it).
/// Runs a psql script on a libpq connection string (unaligned, tuples only,
/// stopping at the first error); returns (success, stdout, stderr).
pub fn psql(dsn: &str, script: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("psql: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("psql stdin: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("psql: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub const PYTHON: &str = "/usr/bin/python3";

/// The text of the fenced block after `<!-- example: NAME -->` in README.md or
/// a guide of docs/ (the one file that has it): what the suite runs of the
/// documentation, verbatim.
pub fn doc_example(name: &str) -> String {
    let marker = format!("<!-- example: {name} -->");
    let found: Vec<(String, String)> = doc_files()
        .into_iter()
        .filter_map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            text.contains(&marker).then_some((path, text))
        })
        .collect();
    let [(path, text)] = &found[..] else {
        panic!("{marker} is in {} files of the docs, not one", found.len());
    };
    let after = text.split_once(&marker).map(|(_, a)| a).unwrap_or_default();
    let fence_start = after
        .find("```")
        .unwrap_or_else(|| panic!("{path}: no fence after {marker}"));
    let body = &after[fence_start..];
    let first_line_end = body.find('\n').unwrap_or(body.len());
    let rest = &body[first_line_end + 1..];
    let end = rest
        .find("\n```")
        .unwrap_or_else(|| panic!("{path}: unclosed fence after {marker}"));
    rest[..end + 1].to_owned()
}

/// README.md and every guide of docs/.
pub fn doc_files() -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/README.md")];
    let mut guides: Vec<String> = std::fs::read_dir(format!("{root}/docs"))
        .unwrap_or_else(|e| panic!("docs/: {e}"))
        .filter_map(|e| e.ok())
        .map(|e| e.path().to_string_lossy().into_owned())
        .filter(|p| p.ends_with(".md"))
        .collect();
    guides.sort();
    files.extend(guides);
    files
}

/// A new database beside the test's (named after it, so the test set-up's
/// clean-up drops it too), with every migration applied: what `migrate`
/// builds from empty.
pub async fn migrated_database(pool: &PgPool, suffix: &str) -> PgPool {
    // Identifiers stop at 63 bytes: a hash of the test's name, not the name.
    let name: String =
        sqlx::query_scalar("SELECT '_sqlx_test_' || left(md5(current_database() || $1), 24)")
            .bind(suffix)
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    // A failed run of the same test leaves it behind (its database too).
    for sql in [
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        format!("CREATE DATABASE \"{name}\""),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let opts = pool.connect_options().as_ref().clone().database(&name);
    let fresh = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loyaltyd::db::migrate(&fresh)
        .await
        .unwrap_or_else(|e| panic!("migrate {name}: {e}"));
    fresh
}

/// Writers of both kinds at once on users `1..=users`: four through
/// loyaltyd (`record_event`, which writes the cache and the live board) and
/// four plain-SQL INSERTs (which reach Redis through the cache sync), with
/// every outcome, so scores rise, fall and tie. Returns when all are done.
pub async fn write_both_kinds(ctx: &Context, pool: &PgPool, users: i64, each: usize) {
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let user = 1 + ((w * 7919 + i * 31) as i64 % users);
                loyaltyd::loyalty::record_event(&ctx, &varied_event(user, w * 100_000 + i))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }));
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let user = 1 + ((w * 104_729 + i * 17) as i64 % users);
                let outcome = ["approved", "rejected", "calibrated"][(i / 2) % 3];
                sqlx::query(
                    "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                     VALUES ($1, 'plain', $2, $3, $4)",
                )
                .bind(user)
                .bind(["post", "topic"][i % 2])
                .bind(format!("sql-{w}-{i}"))
                .bind(outcome)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The live board as the Python client then reads it: the library loaded
/// and the board built, writers of both kinds at once ([`write_both_kinds`]),
/// a rename of every tenth user by the forum's own SQL, and the cache sync
/// that brings the plain-SQL writes and renames to the board, as the
/// daemon's would.
pub async fn live_board_after_writers(ctx: &Context, pool: &PgPool, users: i64, each: usize) {
    let board = loyaltyd::leaderboard::live::Board::new(&ctx.redis);
    assert!(board.ensure_library(true).await, "the library loads");
    loyaltyd::leaderboard::live::build(ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    write_both_kinds(ctx, pool, users, each).await;
    sqlx::query("UPDATE users SET username = 'renamed ' || id WHERE id % 10 = 0")
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sync(ctx).await;
}

/// Drops every Redis function of the suite's Redis (`FUNCTION FLUSH`), as a
/// Redis restarted without persistence has none.
pub async fn flush_redis_functions() {
    let mut c = redis().await;
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Runs docs/integrating.md's "python-standing" example with
/// tests/fixtures/live_standing_check.py (redis-py and psycopg, Debian's):
/// `mode` "single" with a Redis URL or "cluster" with a node's host:port;
/// `expect` "exact" or "not-ready". Panics with its output when it fails.
pub fn python_live_standing(
    pool_db: &str,
    mode: &str,
    address: &str,
    prefix: &str,
    expect: &str,
) -> String {
    let script = format!(
        "{}\n{}",
        doc_example("python-standing"),
        include_str!("../fixtures/live_standing_check.py")
    );
    let out = std::process::Command::new(PYTHON)
        .args(["-c", &script])
        .args([
            &format!("host=/var/run/postgresql dbname={pool_db} user=root"),
            mode,
            address,
            prefix,
            &loyaltyd::leaderboard::live::library_name(prefix),
            expect,
        ])
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the Python client ({mode}, {expect}): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
