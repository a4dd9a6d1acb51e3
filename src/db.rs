//! The PostgreSQL pool and the migrations.
//!
//! The pool is small and bounded in time everywhere: connecting and acquiring
//! give up after `database.connect_timeout` (so an outage is an error in
//! seconds, not a hang), and every session carries `statement_timeout`. Jobs
//! override that per transaction with `SET LOCAL` (see [`set_local_timeout`]).

use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use crate::config::DatabaseConfig;
use crate::error::{DbContext, Error, Result};

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Connection options derived from the configuration.
///
/// A loopback TCP address (`127.0.0.1`, `::1`, `localhost`) whose URL names
/// no `sslmode` (nor does `PGSSLMODE`) connects without TLS: encryption adds
/// nothing between two processes of one host, and sqlx 0.9.0 sets no
/// TCP_NODELAY, so each TLS handshake over TCP stalls twice on delayed ACKs
/// (about 40 ms each; upstream transact-rs/sqlx #4335, fixed after 0.9.0).
/// Any other host, or an explicit `sslmode`, is as libpq would do it.
pub fn connect_options(cfg: &DatabaseConfig) -> Result<PgConnectOptions> {
    let mut opts: PgConnectOptions = cfg.url.expose().parse().map_err(|e: sqlx::Error| {
        Error::Config(format!(
            "key \"database.url\": {}",
            cfg.url.redact_in(&e.to_string())
        ))
    })?;
    // No user in the URL (nor PGUSER): the operating-system user, as libpq
    // does (sqlx 0.9 would send "anonymous" where it cannot name it).
    if !url_names_user(cfg.url.expose())
        && std::env::var_os("PGUSER").is_none()
        && let Some(user) = os_user()
    {
        opts = opts.username(&user);
    }
    let explicit_tls =
        cfg.url.expose().contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    if !explicit_tls && is_loopback(opts.get_host()) {
        opts = opts.ssl_mode(sqlx::postgres::PgSslMode::Disable);
    }
    Ok(opts
        .application_name("loyaltyd")
        .options([("statement_timeout", millis(cfg.statement_timeout))])
        // sqlx would log every statement at debug and every "slow" one (1 s)
        // at warn; jobs are slow on purpose, and operations are timed in
        // loyaltyd_operation_duration_seconds instead.
        .disable_statement_logging())
}

/// Whether a postgres:// URL names its user (`user@` before the host, or
/// `user=` among its parameters).
fn url_names_user(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, q),
        None => (rest, ""),
    };
    let authority = authority.split('/').next().unwrap_or_default();
    authority.contains('@') || query.split('&').any(|kv| kv.starts_with("user="))
}

/// The operating-system user this process runs as: `$USER` (systemd sets it
/// for `User=` and `DynamicUser=`), else the passwd entry of the real uid.
fn os_user() -> Option<String> {
    if let Some(u) = std::env::var("USER").ok().filter(|u| !u.is_empty()) {
        return Some(u);
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_owned();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)? == uid).then(|| name.to_owned())
    })
}

/// True for a host that is this machine over TCP.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Opens the pool and checks that the server answers (exit 69 when it does not).
///
/// The check's connection stays in the pool for the command that follows:
/// it waits until sqlx has handed the connection back (its release ping runs
/// in the background), so the command's first operation neither opens a
/// second connection nor pays for one.
pub async fn connect(cfg: &DatabaseConfig) -> Result<PgPool> {
    let pool = connect_lazy(cfg)?;
    sqlx::query("SELECT 1").execute(&pool).await.map_err(
        |source| match crate::error::from_sqlx("connecting", source) {
            // A refused login is a configuration error; anything else that
            // stops the first statement means the server is not there.
            e @ Error::Config(_) => e,
            Error::Unavailable { source, .. } | Error::Database { source, .. } => {
                Error::Unavailable {
                    context: "connecting",
                    source,
                }
            }
            e => e,
        },
    )?;
    for _ in 0..100 {
        if pool.num_idle() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(pool)
}

/// Builds the pool without connecting: the daemon starts even when PostgreSQL
/// is down and connects once it is back.
pub fn connect_lazy(cfg: &DatabaseConfig) -> Result<PgPool> {
    Ok(pool_options(cfg).connect_lazy_with(connect_options(cfg)?))
}

/// How loyaltyd pools its connections (sizes, timeouts, liveness checks);
/// the benchmark uses it too, so it measures the pool the program runs with.
pub fn pool_options(cfg: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(cfg.connect_timeout)
        // Recycle idle connections, so a restarted server's stale sockets go.
        .idle_timeout(Some(Duration::from_secs(60)))
        // sqlx pings every connection before handing it out by default: one
        // more round trip on every operation (a leaderboard page cost twice
        // its query). Ping only connections idle for a while, as HikariCP
        // does: a connection that worked a moment ago is almost surely alive,
        // one that sat through an outage is not. (sqlx still pings each
        // connection when it is returned, off the caller's path, and drops it
        // if that fails.)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// A pooled connection idle at least this long is pinged before it is used.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Applies pending migrations, then the current SQL definitions where they
/// changed; running it again changes nothing.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        // Not reaching the server, or a login it refuses (a database or a
        // role that does not exist: a configuration to fix, exit 78), is
        // said as any other statement's failure would say it.
        sqlx::migrate::MigrateError::Execute(source)
            if crate::error::is_unavailable(&source)
                || crate::error::login_refused(&source).is_some() =>
        {
            crate::error::from_sqlx("applying the migrations", source)
        }
        other => Error::Migrate(other),
    })?;
    crate::definitions::apply(pool).await?;
    Ok(())
}

/// Sets the statement timeout of the current transaction.
pub async fn set_local_timeout(conn: &mut PgConnection, limit: Duration) -> Result<()> {
    // SET cannot take a bind parameter; set_config(..., true) is its local form that can.
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(millis(limit))
        .execute(conn)
        .await
        .db("setting the statement timeout")?;
    Ok(())
}

/// A duration as PostgreSQL's milliseconds setting (at least 1 ms; 0 would mean "none").
fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Runs a statement that `cancel` can interrupt: on cancellation the backend
/// (`pid`) is told to cancel it via `pg_cancel_backend` from another pooled
/// connection, and the statement's own error (57014) is returned. Dropping
/// the future instead would leave the server running the statement, holding
/// its locks, until it finished.
///
/// The cancel is repeated until the statement gives up: PostgreSQL ignores a
/// cancel that reaches the backend before it has started the statement (a
/// shutdown that lands just as a refresh begins), and the statement would
/// then run to its end after the daemon had gone.
pub async fn cancellable<T>(
    pool: &PgPool,
    pid: i32,
    cancel: &tokio_util::sync::CancellationToken,
    statement: impl Future<Output = std::result::Result<T, sqlx::Error>>,
) -> std::result::Result<T, sqlx::Error> {
    tokio::pin!(statement);
    tokio::select! {
        // The statement first: it is sent on its first poll.
        biased;
        result = &mut statement => return result,
        () = cancel.cancelled() => {}
    }
    for attempt in 1.. {
        let _ = sqlx::query("SELECT pg_cancel_backend($1)")
            .bind(pid)
            .execute(pool)
            .await;
        tokio::select! {
            result = &mut statement => return result,
            () = tokio::time::sleep(CANCEL_RETRY.pause(attempt)) => {}
        }
    }
    statement.await
}

/// How long a cancelled statement has to give up before it is cancelled
/// again (for as long as it runs).
const CANCEL_RETRY: crate::retry::Retry =
    crate::retry::Retry::steady(u32::MAX, Duration::from_millis(200));

/// Ends a transaction that is not to commit. A ROLLBACK that fails (the
/// connection broke) is one background failure, counted and logged: sqlx
/// closes such a connection instead of returning it to the pool.
pub async fn rollback(tx: sqlx::Transaction<'_, sqlx::Postgres>) {
    if let Err(e) = tx.rollback().await {
        crate::telemetry::background_failure(
            crate::telemetry::Task::Rollback,
            "could not roll back a transaction; its connection is closed",
            &e,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::url_names_user;

    #[test]
    fn a_url_names_its_user_before_the_host_or_as_a_parameter() {
        for (url, named) in [
            ("postgres://root@localhost/db", true),
            (
                "postgres://u:secret@db.example:5432/db?sslmode=require",
                true,
            ),
            ("postgres:///loyaltyd?host=/var/run/postgresql", false),
            ("postgres://127.0.0.1:5432/loyaltyd", false),
            (
                "postgres:///loyaltyd?host=/var/run/postgresql&user=forum",
                true,
            ),
            ("postgresql://localhost/db?application_name=x", false),
        ] {
            assert_eq!(url_names_user(url), named, "{url}");
        }
    }
}
