//! The leaderboard: exact live ranks from Redis, and the seed's materialized
//! view for SQL consumers, refreshed only when it is worth it.
//!
//! Reads ([`page`], [`rank`]) answer from the **live board** when it is
//! built: a Redis sorted set of every user with a positive score, kept by
//! the same pipeline that writes a score to the cache (each write guarded by
//! the score's version, so a late write cannot put an older score back),
//! built by the daemon from PostgreSQL on start and after Redis lost it, and
//! checked by the nightly sweep. Its order is the seed's (score descending,
//! sign-up ascending, then id: the member is the sign-up time and the id in
//! fixed-width hex, so Redis's order among equal scores is the tie-break);
//! rank and page are O(log n). Until it is built, or while Redis is away,
//! reads fall back to the view (`source` says which answered). README
//! "The live leaderboard" has the study behind the choice.
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

use crate::cache::{LiveRank, VersionedScore};
use crate::config::RefreshMode;
use crate::context::Context;
use crate::db;
use crate::error::{DbContext, Error, Result};
use crate::perf::Timer;
use crate::telemetry::{self, Operation};
use crate::types::UserId;

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
    /// Where they came from.
    pub source: Source,
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
    /// Where the answer came from.
    pub source: Source,
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

/// `rank`'s row: the live score, and the board's rank, score and topic right.
type RankRow = (i64, Option<i64>, Option<i64>, Option<bool>);

/// Where an answer came from.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The live board: committed scores.
    Live,
    /// The view as last refreshed (the live board is off, not built yet, or
    /// Redis is away).
    View,
}

/// Whether a rank is within the topic right: rank <= 10 % of the ranked
/// users (the seed's `rank <= COUNT(*) * 0.1`).
fn may_create_topics(rank: i64, ranked: i64) -> bool {
    rank as f64 <= ranked as f64 * 0.1
}

/// A page of the leaderboard: `limit` entries (1 to 1000) after `offset`
/// ranks, from the live board if it is there, else the view.
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
    if ctx.config.leaderboard.live
        && let Some((ranked, board)) = ctx.cache.live_page(offset, limit).await
    {
        // Ranks and scores from the board; names from PostgreSQL, one query.
        let ids: Vec<i64> = board.iter().map(|(u, _)| u.get()).collect();
        let names: Vec<(i64, String)> = ctx
            .replicas
            .read(&ctx.pool, |pool| {
                let ids = &ids;
                async move {
                    sqlx::query_as(
                        "SELECT id::BIGINT, username::TEXT FROM users WHERE id = ANY($1)",
                    )
                    .bind(ids)
                    .fetch_all(&pool)
                    .await
                    .db("reading user names")
                }
            })
            .await?;
        let names: std::collections::HashMap<i64, String> = names.into_iter().collect();
        let entries = board
            .into_iter()
            .enumerate()
            .map(|(i, (user, score))| {
                let rank = offset + i as i64 + 1;
                Entry {
                    user_id: user.get(),
                    username: names.get(&user.get()).cloned().unwrap_or_default(),
                    loyalty_score: score,
                    rank,
                    can_create_topics: may_create_topics(rank, ranked),
                }
            })
            .collect();
        timer.ok(None);
        return Ok(Page {
            entries,
            source: Source::Live,
        });
    }
    // Ranks are dense 1..n, so "rank > offset" is OFFSET without reading the
    // skipped rows: an index range scan on idx_leaderboard_rank at any depth.
    let entries: Vec<Entry> = ctx
        .replicas
        .read(&ctx.pool, |pool| async move {
            sqlx::query_as(
                "SELECT user_id::BIGINT, username::TEXT, loyalty_score::BIGINT, rank, can_create_topics \
                 FROM user_leaderboard WHERE rank > $1 ORDER BY rank LIMIT $2",
            )
            .bind(offset)
            .bind(limit)
            .fetch_all(&pool)
            .await
            .db("reading the leaderboard")
        })
        .await?;
    timer.ok(None);
    Ok(Page {
        entries,
        source: Source::View,
    })
}

/// A user's rank, or a clear "not ranked": from the live board if it is
/// there (committed scores), else the view as last refreshed.
pub async fn rank(ctx: &Context, user: UserId) -> Result<Standing> {
    let timer = Timer::start(&ctx.perf, Operation::LeaderboardRank, None);
    if ctx.config.leaderboard.live
        && let Some(place) = ctx.cache.live_rank(user).await
    {
        let standing = match place {
            LiveRank::Ranked {
                rank,
                score,
                ranked,
            } => Standing {
                user_id: user,
                rank: Some(rank),
                loyalty_score: score,
                can_create_topics: may_create_topics(rank, ranked),
                source: Source::Live,
            },
            LiveRank::Unranked { .. } => {
                // Not on the board: an unknown user, or a score of 0 or less.
                let score: Option<i64> =
                    sqlx::query_scalar("SELECT loyalty_score::BIGINT FROM users WHERE id = $1")
                        .bind(user.get())
                        .fetch_optional(&ctx.pool)
                        .await
                        .db("reading the score")?;
                Standing {
                    user_id: user,
                    rank: None,
                    loyalty_score: score.ok_or(Error::UnknownUser(user.get()))?,
                    can_create_topics: false,
                    source: Source::Live,
                }
            }
        };
        timer.ok(Some(user));
        return Ok(standing);
    }
    // One round trip tells both "is the user known" and "are they on the board".
    let row: Option<RankRow> = ctx
        .replicas
        .read(&ctx.pool, |pool| async move {
            sqlx::query_as(
                "SELECT u.loyalty_score::BIGINT, l.rank, l.loyalty_score::BIGINT, l.can_create_topics \
                 FROM users u LEFT JOIN user_leaderboard l ON l.user_id = u.id WHERE u.id = $1",
            )
            .bind(user.get())
            .fetch_optional(&pool)
            .await
            .db("reading the rank")
        })
        .await?;
    let (current, rank, ranked_score, can) = row.ok_or(Error::UnknownUser(user.get()))?;
    timer.ok(Some(user));
    Ok(Standing {
        user_id: user,
        rank,
        loyalty_score: ranked_score.unwrap_or(current),
        can_create_topics: can.unwrap_or(false),
        source: Source::View,
    })
}

/// A build's Redis write, tried again after a miss (one slow moment must
/// not throw away a build of millions; every write is version-guarded, so a
/// repeat is harmless): up to five tries, a second apart (the cache's own
/// back-off after a failure). A macro, not a function over an async closure:
/// the daemon spawns the build, and such closures' futures are not `Send`.
macro_rules! retried {
    ($write:expr) => {{
        let mut done = false;
        for attempt in 1..=5 {
            if $write {
                done = true;
                break;
            }
            if attempt < 5 {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        done
    }};
}

/// Builds the live board from PostgreSQL: clears it, writes every user with
/// a positive score in batches (each write guarded by its version, so a
/// score written meanwhile is never overwritten by the older one read here),
/// then marks it built. Until then readers use the view. Returns the users
/// written.
#[tracing::instrument(name = "live_board_build", skip_all)]
pub async fn build_live_board(ctx: &Context) -> Result<u64> {
    use futures_util::TryStreamExt;
    let unavailable = || Error::Runtime("Redis unavailable: the live board is not built".into());
    let keys = [ctx.cache.live_key(), ctx.cache.live_users_key()];
    if !retried!(ctx.cache.delete(&keys).await) {
        return Err(unavailable());
    }
    let mut tx = ctx
        .pool
        .begin()
        .await
        .db("starting the live board's build")?;
    db::set_local_timeout(&mut tx, ctx.config.sweep.timeout).await?;
    let mut written = 0u64;
    {
        let mut chunks = sqlx::query_as::<_, (i64, i64, i64, i64)>(concat!(
            "SELECT ",
            crate::score_columns!(),
            " FROM users WHERE loyalty_score > 0"
        ))
        .fetch(&mut *tx)
        .try_chunks(BOARD_BATCH);
        while let Some(chunk) = chunks
            .try_next()
            .await
            .map_err(|e| e.1)
            .db("reading scores for the live board")?
        {
            let batch: Vec<VersionedScore> = chunk
                .into_iter()
                .filter_map(VersionedScore::from_row)
                .collect();
            if !retried!(ctx.cache.live_set(&batch).await) {
                return Err(unavailable());
            }
            written += batch.len() as u64;
        }
    }
    let _ = tx.rollback().await;
    if !retried!(ctx.cache.live_mark_ready(true).await) {
        return Err(unavailable());
    }
    Ok(written)
}

/// Users written to the live board per pipeline.
const BOARD_BATCH: usize = 5_000;

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
            let _ = tx.rollback().await;
            timer.nothing_to_do();
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
            .bind(crate::locks::REFRESH)
            .fetch_one(&mut *tx)
            .await
            .db("taking the refresh lock")?;
    let (observed, age) = observe_pending(&mut *tx).await?;
    // A seed-era application counts its changes in Redis: they are pending too.
    let seed_pending = ctx.cache.seed_pending().await;
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
    for attempt in 1..=SWAP_ATTEMPTS {
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
                    && attempt < SWAP_ATTEMPTS =>
            {
                sqlx::query("ROLLBACK TO SAVEPOINT swap")
                    .execute(&mut *tx)
                    .await
                    .db("swapping the view")?;
                tokio::time::sleep(SWAP_LOCK_WAIT).await;
            }
            Some(e) => return Err(crate::error::from_sqlx("swapping the view", e)),
        }
    }
    Ok(())
}

/// How long the swap's renames wait for readers of the old view at a time.
const SWAP_LOCK_WAIT: Duration = Duration::from_millis(50);
/// How often the swap tries before the refresh fails (and is retried on the
/// next check): 10 s of readers holding the view without a gap.
const SWAP_ATTEMPTS: u32 = 200;

/// The pending count (the sum of the backends' rows, migration 8) and the
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
