//! The leaderboard: the seed's materialized view, refreshed only when it is worth it.
//!
//! Reads ([`page`], [`rank`]) are index lookups on the view and never wait for
//! a refresh (`REFRESH ... CONCURRENTLY` leaves the old rows readable).
//!
//! [`refresh`] runs in one transaction on one connection:
//! 1. `pg_try_advisory_xact_lock`: if another process or host is refreshing,
//!    return at once ("skipped"). The lock belongs to the transaction, so it is
//!    released by COMMIT, ROLLBACK or a dropped connection alike, and it cannot
//!    leak through the pool the way a session lock taken on one pooled
//!    connection and released on another does (the seed's bug).
//! 2. Read the pending changes per shard and the view's age, and apply the
//!    debounce policy ([`should_refresh`]) unless forced.
//! 3. `REFRESH MATERIALIZED VIEW CONCURRENTLY`, under the refresh time limit.
//! 4. Subtract from each shard what step 2 saw, not reset it: changes that
//!    committed during the refresh stay pending (the seed's DELETE lost them),
//!    and record the refresh time durably, so a restarted daemon knows the age.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::db;
use crate::error::{DbContext, Error, Result};
use crate::perf::Timer;
use crate::telemetry::{self, Operation};
use crate::types::UserId;

/// Advisory lock key held by the refresh (any process, any host).
pub const REFRESH_LOCK: i64 = 0x4c59_4c42_0001; // "LYLB" 1
/// Largest page `leaderboard show` returns.
pub const MAX_PAGE: i64 = 1000;

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

/// One row of the leaderboard.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct Entry {
    /// The user.
    pub user_id: i64,
    /// The user's name.
    pub username: String,
    /// The score as of the last refresh.
    pub loyalty_score: i64,
    /// 1-based rank: score descending, then earlier sign-up first.
    pub rank: i64,
    /// True for the top 10 % of ranked users.
    pub can_create_topics: bool,
}

/// A page of the leaderboard.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Page {
    /// The entries, by rank.
    pub entries: Vec<Entry>,
}

/// One user's standing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Standing {
    /// The user.
    pub user_id: UserId,
    /// The rank, or `None` when the user is not on the board (score ≤ 0, or
    /// not there at the last refresh).
    pub rank: Option<i64>,
    /// The score the rank is based on (the current score when unranked).
    pub loyalty_score: i64,
    /// True for the top 10 % of ranked users.
    pub can_create_topics: bool,
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
    /// Pending changes (sum of the shards).
    pub pending_changes: i64,
    /// Seconds since the last refresh.
    pub age_seconds: f64,
}

/// `rank`'s row: the live score, and the board's rank, score and topic right.
type RankRow = (i64, Option<i64>, Option<i64>, Option<bool>);

/// A page of the leaderboard: `limit` entries (1 to 1000) after `offset` ranks.
pub async fn page(ctx: &Context, limit: i64, offset: i64) -> Result<Page> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::invalid(
            "--limit",
            format!("{limit} is outside 1 to {MAX_PAGE}"),
        ));
    }
    if offset < 0 {
        return Err(Error::invalid("--offset", format!("{offset} is negative")));
    }
    let timer = Timer::start(&ctx.perf, Operation::LeaderboardPage, None);
    // Ranks are dense 1..n, so "rank > offset" is OFFSET without reading the
    // skipped rows: an index range scan on idx_leaderboard_rank at any depth.
    let entries: Vec<Entry> = sqlx::query_as(
        "SELECT user_id, username, loyalty_score, rank, can_create_topics \
         FROM user_leaderboard WHERE rank > $1 ORDER BY rank LIMIT $2",
    )
    .bind(offset)
    .bind(limit)
    .fetch_all(&ctx.pool)
    .await
    .db("reading the leaderboard")?;
    timer.ok(None);
    Ok(Page { entries })
}

/// A user's rank on the board, or a clear "not ranked".
pub async fn rank(ctx: &Context, user: UserId) -> Result<Standing> {
    let timer = Timer::start(&ctx.perf, Operation::LeaderboardRank, None);
    // One round trip tells both "is the user known" and "are they on the board".
    let row: Option<RankRow> = sqlx::query_as(
        "SELECT u.loyalty_score, l.rank, l.loyalty_score, l.can_create_topics \
         FROM users u LEFT JOIN user_leaderboard l ON l.user_id = u.id WHERE u.id = $1",
    )
    .bind(user.get())
    .fetch_optional(&ctx.pool)
    .await
    .db("reading the rank")?;
    let (current, rank, ranked_score, can) = row.ok_or(Error::UnknownUser(user.get()))?;
    timer.ok(Some(user));
    Ok(Standing {
        user_id: user,
        rank,
        loyalty_score: ranked_score.unwrap_or(current),
        can_create_topics: can.unwrap_or(false),
    })
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
    let pending = pending + ctx.cache.seed_pending().await;
    telemetry::leaderboard_state(pending, Duration::from_secs_f64(age.max(0.0)));
    Ok(Status {
        pending_changes: pending,
        age_seconds: age,
    })
}

/// Refreshes the view if the debounce policy (or `force`) says so; see the module docs.
/// `cancel` stops a running refresh at once (the transaction rolls back).
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
            let _ = tx.rollback().await;
            return Ok(report);
        }
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    ctx.cache.consume_seed_pending(seed_pending).await;
    timer.ok(None);
    // After the commit: only the changes that arrived during the refresh are left.
    let _ = status(ctx).await;
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
            .bind(REFRESH_LOCK)
            .fetch_one(&mut *tx)
            .await
            .db("taking the refresh lock")?;
    let (shards, counts, age) = observe_pending(&mut *tx).await?;
    // A seed-era application counts its changes in Redis: they are pending too.
    let seed_pending = ctx.cache.seed_pending().await;
    let pending: i64 = counts.iter().sum::<i64>() + seed_pending;
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
    let run =
        sqlx::query("REFRESH MATERIALIZED VIEW CONCURRENTLY user_leaderboard").execute(&mut *tx);
    db::cancellable(&ctx.pool, pid, cancel, run)
        .await
        .db("refreshing the leaderboard view")?;
    // Consume exactly what was seen before the refresh began (PostgreSQL's
    // shards here; the seed's counter after the commit).
    sqlx::query(
        "WITH consumed AS ( \
             UPDATE leaderboard_pending p SET changes = p.changes - o.changes \
             FROM UNNEST($1::SMALLINT[], $2::BIGINT[]) AS o(shard, changes) \
             WHERE p.shard = o.shard \
         ) \
         UPDATE leaderboard_state SET refreshed_at = now(), consumed_changes = consumed_changes + $3",
    )
    .bind(&shards)
    .bind(&counts)
    .bind(pending - seed_pending)
    .execute(&mut *tx)
    .await
    .db("consuming pending changes")?;
    Ok(Step::Refreshed(report(true, reason), seed_pending))
}

/// The pending count of each non-empty shard, and the view's age in seconds.
async fn observe_pending(conn: &mut PgConnection) -> Result<(Vec<i16>, Vec<i64>, f64)> {
    let (shards, counts, age): (Option<Vec<i16>>, Option<Vec<i64>>, f64) = sqlx::query_as(
        "SELECT array_agg(shard ORDER BY shard), array_agg(changes ORDER BY shard), \
                (SELECT EXTRACT(EPOCH FROM clock_timestamp() - refreshed_at)::FLOAT8 FROM leaderboard_state) \
         FROM leaderboard_pending WHERE changes <> 0",
    )
    .fetch_one(conn)
    .await
    .db("reading pending leaderboard changes")?;
    Ok((shards.unwrap_or_default(), counts.unwrap_or_default(), age))
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
