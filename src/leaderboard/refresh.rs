//! The view's refresh: the seed's materialized view `user_leaderboard`,
//! refreshed only when it is worth it.
//!
//! [`refresh`] runs in one transaction on one connection:
//! 1. `pg_try_advisory_xact_lock`: if another process or host is refreshing,
//!    return at once ("skipped"). The lock belongs to the transaction, so it is
//!    released by COMMIT, ROLLBACK or a dropped connection alike, and it cannot
//!    leak through the pool the way a session lock taken on one pooled
//!    connection and released on another does (the seed's bug).
//! 2. Read the pending changes per shard and the view's age, and apply the
//!    debounce policy ([`should_refresh`]) unless forced.
//! 3. Refresh, under the refresh time limit: by default (`refresh_mode =
//!    "swap"`) build a shadow view from the view's own definition while
//!    readers go on reading the old one, then rename it into place (readers
//!    wait only for the renames); or `REFRESH MATERIALIZED VIEW CONCURRENTLY`,
//!    which rewrites every row whose rank moved (most of them, after a few
//!    changes) and costs several times as much.
//! 4. Subtract from each shard what step 2 saw, not reset it: changes that
//!    committed during the refresh stay pending (the seed's DELETE lost them),
//!    and record the refresh time durably, so a restarted daemon knows the age.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use crate::config::RefreshMode;
use crate::context::Context;
use crate::db;
use crate::error::{DbContext, Error, Result};
use crate::perf::Timer;
use crate::redis_runner::Redis;
use crate::telemetry::{self, Operation};

/// The debounce policy: refresh when enough changes are pending, or when any
/// change is pending and the view is older than the staleness limit.
pub fn should_refresh(
    pending: i64,
    age: Duration,
    threshold: u64,
    max_staleness: Duration,
) -> bool {
    pending > 0 && (pending as u64 >= threshold || age >= max_staleness)
}

/// Why a refresh did or did not run.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RefreshReason {
    /// Enough pending changes, or pending changes and a stale view.
    Due,
    /// `--force`.
    Forced,
    /// The debounce policy said no.
    NotDue,
    /// Another refresh holds the lock.
    Busy,
}

/// What a refresh call did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RefreshReport {
    /// True when the view was refreshed.
    pub refreshed: bool,
    /// Why.
    pub reason: RefreshReason,
    /// Pending changes seen before (consumed when refreshed).
    pub pending_changes: i64,
    /// Age of the view before, in seconds.
    pub age_seconds: f64,
    /// Time the refresh took, in milliseconds (0 when skipped).
    pub duration_ms: f64,
}

/// The debounce state.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Status {
    /// Pending changes (the sum of the backends' rows).
    pub pending_changes: i64,
    /// Seconds since the last refresh.
    pub age_seconds: f64,
}

/// Pending changes (PostgreSQL's and the seed's Redis counter) and view
/// age, and publishes them as gauges.
pub async fn status(ctx: &Context) -> Result<Status> {
    let (pending, age): (i64, f64) = sqlx::query_as(
        "SELECT (SELECT COALESCE(SUM(changes), 0)::BIGINT FROM leaderboard_pending), \
                EXTRACT(EPOCH FROM clock_timestamp() - refreshed_at)::FLOAT8 \
         FROM leaderboard_state",
    )
    .fetch_one(&ctx.pool)
    .await
    .db("reading the leaderboard state")?;
    let pending = pending + seed_pending(&ctx.redis).await;
    telemetry::leaderboard_state(pending, Duration::from_secs_f64(age.max(0.0)));
    Ok(Status {
        pending_changes: pending,
        age_seconds: age,
    })
}

/// Refreshes the view if the debounce policy (or `force`) says so; see the module docs.
/// `cancel` stops a running refresh at once (the transaction rolls back).
#[tracing::instrument(name = "leaderboard_refresh", skip_all, fields(force = force, mode = ?ctx.config.leaderboard.refresh_mode))]
pub async fn refresh(
    ctx: &Context,
    force: bool,
    cancel: &CancellationToken,
) -> Result<RefreshReport> {
    let timer = Timer::start(&ctx.perf, Operation::LeaderboardRefresh, None);
    let started = std::time::Instant::now();
    let mut tx = ctx.pool.begin().await.db("starting the refresh")?;
    // Every way out of the transaction ends it here, on its connection: a
    // dropped transaction rolls back (and lets go of the lock) only when its
    // pooled connection is next used.
    let (report, seed_pending) = match refresh_in(ctx, &mut tx, force, cancel).await {
        Ok(Step::Refreshed(report, seed_pending)) => {
            tx.commit().await.db("committing the refresh")?;
            (report, seed_pending)
        }
        Ok(Step::Skipped(report)) => {
            crate::db::rollback(tx).await;
            timer.nothing_to_do();
            return Ok(report);
        }
        Err(e) => {
            crate::db::rollback(tx).await;
            return Err(e);
        }
    };
    consume_seed_pending(&ctx.redis, seed_pending).await;
    timer.ok(None);
    // After the commit: only the changes that arrived during the refresh are left.
    if let Err(e) = status(ctx).await {
        telemetry::background_failure(
            telemetry::Task::LeaderboardState,
            "could not read the leaderboard's state after a refresh",
            &e,
        );
    }
    Ok(RefreshReport {
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        ..report
    })
}

/// How a refresh transaction ends.
enum Step {
    /// Commit; then take the seed's counted changes (the second field) off its counter.
    Refreshed(RefreshReport, i64),
    /// Roll back: nothing to do, or someone else is doing it.
    Skipped(RefreshReport),
}

/// The refresh's transaction, up to its commit.
async fn refresh_in(
    ctx: &Context,
    tx: &mut PgConnection,
    force: bool,
    cancel: &CancellationToken,
) -> Result<Step> {
    let cfg = &ctx.config.leaderboard;
    let (pid, locked): (i32, bool) =
        sqlx::query_as("SELECT pg_backend_pid(), pg_try_advisory_xact_lock($1)")
            .bind(crate::locks::REFRESH)
            .fetch_one(&mut *tx)
            .await
            .db("taking the refresh lock")?;
    let (observed, age) = observe_pending(&mut *tx).await?;
    // A seed-era application counts its changes in Redis: they are pending too.
    let seed_pending = seed_pending(&ctx.redis).await;
    let pending: i64 = observed + seed_pending;
    let report = |refreshed, reason| RefreshReport {
        refreshed,
        reason,
        pending_changes: pending,
        age_seconds: age,
        duration_ms: 0.0,
    };
    if !locked {
        return Ok(Step::Skipped(report(false, RefreshReason::Busy)));
    }
    let age_d = Duration::from_secs_f64(age.max(0.0));
    let reason = if force {
        RefreshReason::Forced
    } else if should_refresh(pending, age_d, cfg.refresh_threshold, cfg.max_staleness) {
        RefreshReason::Due
    } else {
        telemetry::leaderboard_state(pending, age_d);
        return Ok(Step::Skipped(report(false, RefreshReason::NotDue)));
    };
    db::set_local_timeout(&mut *tx, cfg.refresh_timeout).await?;
    if cfg.refresh_mode == RefreshMode::Swap && !has_dependents(&mut *tx).await? {
        swap_in_new_view(ctx, &mut *tx, pid, cancel).await?;
    } else {
        let run = sqlx::query("REFRESH MATERIALIZED VIEW CONCURRENTLY user_leaderboard")
            .execute(&mut *tx);
        db::cancellable(&ctx.pool, pid, cancel, run)
            .await
            .db("refreshing the leaderboard view")?;
    }
    // Consume exactly what was seen before the refresh began (PostgreSQL's
    // count here, on this backend's own row, which no writer waits for;
    // the seed's counter after the commit).
    sqlx::query(
        "WITH s AS (UPDATE leaderboard_state SET refreshed_at = now(), \
                               consumed_changes = consumed_changes + $1 RETURNING 1) \
         SELECT leaderboard_consume_changes($1) FROM s",
    )
    .bind(observed)
    .execute(&mut *tx)
    .await
    .db("consuming pending changes")?;
    Ok(Step::Refreshed(report(true, reason), seed_pending))
}

/// Whether anything else is built on the leaderboard view: another view, or
/// a function with a SQL-standard body (they would have to go with it, so
/// the refresh is CONCURRENTLY instead of a swap). Only normal dependencies
/// count; the view's own rule, type and indexes are internal or automatic.
async fn has_dependents(conn: &mut PgConnection) -> Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_depend d
                        WHERE d.refclassid = 'pg_class'::REGCLASS
                          AND d.refobjid = 'user_leaderboard'::REGCLASS
                          AND d.deptype = 'n'
                          AND NOT (d.classid = 'pg_rewrite'::REGCLASS
                                   AND d.objid IN (SELECT oid FROM pg_rewrite
                                                   WHERE ev_class = 'user_leaderboard'::REGCLASS)))",
    )
    .fetch_one(conn)
    .await
    .db("reading the view's dependents")
}

/// The swap refresh: builds `user_leaderboard_next` from the view's own
/// definition (`pg_get_viewdef`: the definition lives in the migration
/// only) with copies of its indexes, while readers go on reading the old
/// view; then renames the new one into place and drops the old one, with
/// the old one's grants. The renames need the old view's ACCESS EXCLUSIVE
/// lock: they wait at most SWAP_LOCK_WAIT for readers to finish, then let
/// them through and try again (a savepoint keeps the built view), so a
/// reader waits at most about that long plus the renames.
async fn swap_in_new_view(
    ctx: &Context,
    tx: &mut PgConnection,
    pid: i32,
    cancel: &CancellationToken,
) -> Result<()> {
    let definition: String =
        sqlx::query_scalar("SELECT pg_get_viewdef('user_leaderboard'::REGCLASS)")
            .fetch_one(&mut *tx)
            .await
            .db("reading the view's definition")?;
    // Each index's name and its copy's, quoted by PostgreSQL as
    // pg_get_indexdef quotes them (a forum's index may need quotes), and its
    // definition.
    let indexes: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT quote_ident(i.relname), quote_ident(i.relname || '_next'), pg_get_indexdef(x.indexrelid)
         FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
         WHERE x.indrelid = 'user_leaderboard'::REGCLASS",
    )
    .fetch_all(&mut *tx)
    .await
    .db("reading the view's indexes")?;
    let grants: Vec<String> = sqlx::query_scalar(
        "SELECT format('GRANT %s ON user_leaderboard TO %s', a.privilege_type,
                       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END)
         FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
         WHERE c.oid = 'user_leaderboard'::REGCLASS AND a.grantee <> c.relowner",
    )
    .fetch_all(&mut *tx)
    .await
    .db("reading the view's grants")?;
    let mut build = vec!["DROP MATERIALIZED VIEW IF EXISTS user_leaderboard_next".to_owned()];
    build.push(format!(
        "CREATE MATERIALIZED VIEW user_leaderboard_next AS {}",
        definition.trim_end_matches(';')
    ));
    for (name, next, def) in &indexes {
        build.push(
            def.replacen(&format!("INDEX {name} ON"), &format!("INDEX {next} ON"), 1)
                .replacen("user_leaderboard USING", "user_leaderboard_next USING", 1),
        );
    }
    for sql in &build {
        let run = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(&mut *tx);
        db::cancellable(&ctx.pool, pid, cancel, run)
            .await
            .db("building the new leaderboard view")?;
    }
    let mut swap = vec![
        format!(
            "SET LOCAL lock_timeout = '{}ms'",
            SWAP_LOCK_WAIT.as_millis()
        ),
        "ALTER MATERIALIZED VIEW user_leaderboard RENAME TO user_leaderboard_old".to_owned(),
        "ALTER MATERIALIZED VIEW user_leaderboard_next RENAME TO user_leaderboard".to_owned(),
        "DROP MATERIALIZED VIEW user_leaderboard_old".to_owned(),
    ];
    for (name, next, _) in &indexes {
        swap.push(format!("ALTER INDEX {next} RENAME TO {name}"));
    }
    swap.extend(grants);
    swap.push("SET LOCAL lock_timeout = 0".to_owned());
    for attempt in 1..=SWAP_RETRY.attempts {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled {
                context: "the leaderboard refresh",
            });
        }
        sqlx::query("SAVEPOINT swap")
            .execute(&mut *tx)
            .await
            .db("swapping the view")?;
        let mut failed = None;
        for sql in &swap {
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut *tx)
                .await
            {
                failed = Some(e);
                break;
            }
        }
        match failed {
            None => return Ok(()),
            Some(e)
                if crate::error::Refusal::of(&e) == Some(crate::error::Refusal::LockBusy)
                    && SWAP_RETRY.again(attempt) =>
            {
                sqlx::query("ROLLBACK TO SAVEPOINT swap")
                    .execute(&mut *tx)
                    .await
                    .db("swapping the view")?;
                tokio::time::sleep(SWAP_RETRY.pause(attempt)).await;
            }
            Some(e) => return Err(crate::error::from_sqlx("swapping the view", e)),
        }
    }
    Ok(())
}

/// How long the swap's renames wait for readers of the old view at a time.
const SWAP_LOCK_WAIT: Duration = Duration::from_millis(50);
/// How often the swap tries before the refresh fails (and is retried on the
/// next check), and how far apart: 10 s of readers holding the view
/// without a gap.
const SWAP_RETRY: crate::retry::Retry = crate::retry::Retry::steady(200, SWAP_LOCK_WAIT);

/// The pending count (the sum of the backends' rows, sql/leaderboard.sql) and the
/// view's age in seconds.
async fn observe_pending(conn: &mut PgConnection) -> Result<(i64, f64)> {
    sqlx::query_as(
        "SELECT (SELECT COALESCE(SUM(changes), 0)::BIGINT FROM leaderboard_pending), \
                EXTRACT(EPOCH FROM clock_timestamp() - refreshed_at)::FLOAT8 \
         FROM leaderboard_state",
    )
    .fetch_one(conn)
    .await
    .db("reading pending leaderboard changes")
}

/// The seed's Redis counter of pending leaderboard changes.
pub const SEED_PENDING: &str = "leaderboard:refresh_pending";

/// The seed's own pending-refresh counter (`leaderboard:refresh_pending`),
/// which an application still running the seed's code increments; 0 when
/// absent, not a number, or Redis is away.
pub async fn seed_pending(redis: &Redis) -> i64 {
    let cmd = redis::cmd("GET").arg(redis.key(SEED_PENDING)).to_owned();
    redis
        .query::<Option<String>>("GET", cmd)
        .await
        .flatten()
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        .max(0)
}

/// Takes `n` consumed changes off the seed's counter (DECRBY, not DEL:
/// increments that landed meanwhile stay).
pub async fn consume_seed_pending(redis: &Redis, n: i64) {
    if n <= 0 {
        return;
    }
    let cmd = redis::cmd("DECRBY")
        .arg(redis.key(SEED_PENDING))
        .arg(n)
        .to_owned();
    // A failure is counted by the runner; the changes stay counted and
    // cost one extra refresh, never a lost one.
    redis.query::<i64>("DECRBY", cmd).await;
}

#[cfg(test)]
mod tests {
    use super::should_refresh;
    use std::time::Duration;

    #[test]
    fn the_debounce_policy_over_its_whole_table() {
        let s = Duration::from_secs;
        // (pending, age, threshold, max staleness) -> refresh?
        let table = [
            (0, s(0), 10, s(300), false),      // nothing pending, fresh
            (0, s(10_000), 10, s(300), false), // nothing pending, however stale
            (1, s(0), 10, s(300), false),      // below threshold, fresh
            (9, s(299), 10, s(300), false),    // just below both
            (10, s(0), 10, s(300), true),      // threshold reached
            (11, s(0), 10, s(300), true),      // beyond threshold
            (1, s(300), 10, s(300), true),     // stale exactly at the limit
            (1, s(301), 10, s(300), true),     // stale
            (9, s(301), 10, s(300), true),     // below threshold but stale
            (1, s(0), 1, s(300), true),        // threshold 1: every change
            (-3, s(1000), 1, s(1), false),     // a negative count (never written) is nothing
        ];
        for (pending, age, threshold, staleness, expected) in table {
            assert_eq!(
                should_refresh(pending, age, threshold, staleness),
                expected,
                "pending {pending}, age {age:?}, threshold {threshold}, staleness {staleness:?}"
            );
        }
    }
}
