//! Streaming replicas for the reads that may lag.
//!
//! Which reads: leaderboard pages and ranks answered from the view (stale by
//! design: up to a refresh old, so a replica's second of lag changes
//! nothing) and the user names of a live page. Everything else stays on the
//! primary: writes and what they return (a queue position after an add),
//! score reads (they refill the cache and must not go back in time), queue
//! positions (a user who just added an item expects to see it), the sweep,
//! the refresh, the cache sync and the jobs' bookkeeping.
//!
//! Which replica: the first in `database.replicas` that answers and whose
//! lag is within `database.replica_max_lag`. Lag is checked at most once a
//! second per replica (`pg_last_xact_replay_timestamp()`; 0 when it has
//! replayed all the WAL it received, so an idle primary does not look like
//! lag). A replica that fails a read or a check is left alone for a few
//! seconds; the read is then served by the primary, never failed for it.
//! Each read is counted in `loyaltyd_lagging_reads_total` by target.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::config::DatabaseConfig;
use crate::db;
use crate::error::Result;
use crate::telemetry;

/// How often a replica's lag is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a replica that failed is not asked.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// The configured replicas; cheap to clone.
#[derive(Clone, Default)]
pub struct Replicas {
    inner: Arc<Vec<Replica>>,
    max_lag: Duration,
    check_timeout: Duration,
}

struct Replica {
    /// host:port, for the metric's label.
    name: String,
    pool: PgPool,
    state: Mutex<State>,
}

#[derive(Clone, Copy)]
enum State {
    /// Not checked yet.
    Unknown,
    /// Checked at that time, with that lag.
    Checked(Instant, Duration),
    /// Failed at that time.
    Down(Instant),
}

/// Why a lagging read went to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    NoReplica,
    Lag,
    Down,
}

impl Replicas {
    /// Pools for the configured replicas, without connecting.
    pub fn new(cfg: &DatabaseConfig) -> Result<Replicas> {
        let mut replicas = Vec::new();
        for url in &cfg.replicas {
            let one = DatabaseConfig {
                url: url.clone(),
                ..cfg.clone()
            };
            let pool = db::connect_lazy(&one)?;
            let opts = pool.connect_options();
            let name = format!("{}:{}", opts.get_host(), opts.get_port());
            replicas.push(Replica {
                name,
                pool,
                state: Mutex::new(State::Unknown),
            });
        }
        Ok(Replicas {
            inner: Arc::new(replicas),
            max_lag: cfg.replica_max_lag,
            check_timeout: cfg.connect_timeout,
        })
    }

    /// Runs `read` on a usable replica, else on `primary`; a replica that
    /// fails is marked down and the read is run again on the primary.
    pub async fn read<T, F, Fut>(&self, primary: &PgPool, read: F) -> Result<T>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let reason = match self.pick().await {
            Ok(replica) => match read(replica.pool.clone()).await {
                Ok(v) => {
                    telemetry::lagging_read("replica", "ok");
                    return Ok(v);
                }
                Err(e) => {
                    tracing::warn!(replica = %replica.name, error = %e.one_line(), "a read on a replica failed; reading the primary");
                    *replica.state.lock().await = State::Down(Instant::now());
                    "error"
                }
            },
            Err(Fallback::NoReplica) => "no_replica",
            Err(Fallback::Lag) => "lag",
            Err(Fallback::Down) => "down",
        };
        telemetry::lagging_read("primary", reason);
        read(primary.clone()).await
    }

    /// The first replica that is up and within the lag bound.
    async fn pick(&self) -> std::result::Result<&Replica, Fallback> {
        let mut why = Fallback::NoReplica;
        for replica in self.inner.iter() {
            match replica.lag(self.check_timeout, false).await {
                Some(lag) if lag <= self.max_lag => return Ok(replica),
                Some(_) => why = Fallback::Lag,
                None if why != Fallback::Lag => why = Fallback::Down,
                None => {}
            }
        }
        Err(why)
    }

    /// Checks every replica now (the daemon does, every few seconds, so
    /// the lag gauge stays current without reads).
    pub async fn check_all(&self) {
        for replica in self.inner.iter() {
            replica.lag(self.check_timeout, true).await;
        }
    }

    /// True when replicas are configured.
    pub fn any(&self) -> bool {
        !self.inner.is_empty()
    }
}

impl Replica {
    /// The replica's lag: as last checked if that was under a second ago
    /// (unless `now`), else checked now; `None` while it is down.
    async fn lag(&self, timeout: Duration, now: bool) -> Option<Duration> {
        let mut state = self.state.lock().await;
        let at = Instant::now();
        match *state {
            State::Checked(checked, lag) if !now && at.duration_since(checked) < CHECK_EVERY => {
                return Some(lag);
            }
            State::Down(since) if !now && at.duration_since(since) < DOWN_FOR => return None,
            _ => {}
        }
        *state = match tokio::time::timeout(timeout, lag_of(&self.pool)).await {
            Ok(Ok(lag)) => {
                telemetry::replica_lag(&self.name, lag);
                State::Checked(at, lag)
            }
            _ => State::Down(at),
        };
        match *state {
            State::Checked(_, lag) => Some(lag),
            _ => None,
        }
    }
}

/// A replica's replay lag: 0 when it has replayed everything it received,
/// else the age of the last transaction it replayed. A server that is not
/// in recovery (a promoted replica) has no lag.
async fn lag_of(pool: &PgPool) -> std::result::Result<Duration, sqlx::Error> {
    let secs: f64 = sqlx::query_scalar(
        "SELECT CASE
                    WHEN NOT pg_is_in_recovery() THEN 0
                    WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
                    ELSE COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0)
                END::FLOAT8",
    )
    .fetch_one(pool)
    .await?;
    Ok(Duration::from_secs_f64(secs.max(0.0)))
}
