//! The cache sync: score changes committed by any writer reach Redis.
//!
//! loyaltyd's own writes set the cache before they return. A forum that
//! writes `moderation_events` with plain SQL changes scores through the
//! trigger, and nothing of loyaltyd runs in its process: the daemon brings
//! those changes to Redis. Every score change records its transaction in
//! `users.score_xid` (indexed). Each sync reads, in one statement, the rows
//! changed by transactions the previous sync had not seen end, and that
//! statement's own snapshot: its `xmax` (every transaction below it had
//! started) and `xip` (those still running). The next sync reads the rows
//! whose `score_xid` is at or above the old `xmax`, or in the old `xip`:
//! exactly the transactions that may have committed since, however long they
//! ran, without time margins. The position is kept in `cache_sync_state`, so
//! a restarted daemon (or another daemon) picks up where the last left off,
//! and it only moves once Redis took the scores: while Redis is away the
//! window grows and is written when Redis is back.
//!
//! Why not LISTEN/NOTIFY: a notifying transaction holds one database-wide lock
//! from its commit until it ends, which serialized the commits of every
//! writer (measured: 16 writers 2-3 x slower); the index costs the writes
//! nothing measurable (see sql/scoring.sql).
//!
//! One daemon syncs at a time (a transaction advisory lock); a sync's rows are
//! written with the same newer-version-wins script as any write, so a sync
//! that overlaps a writer, or another sync, cannot set an older score.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Row};

use crate::context::Context;
use crate::error::{DbContext, Result};
use crate::score_row::ScoreRow;
use crate::telemetry;

/// Scores written to Redis per pipeline.
const CHUNK: usize = 1000;

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Synced {
    /// Another daemon is syncing.
    Busy,
    /// Redis did not take the scores; the window is read again next time.
    RedisUnavailable,
    /// This many changed scores were written to the cache.
    Wrote(usize),
}

/// One sync: read what changed since the last one, write it to Redis, move
/// the position (see the module docs).
pub async fn sync_once(ctx: &Context) -> Result<Synced> {
    let mut tx = ctx.pool.begin().await.db("starting the cache sync")?;
    // The transaction ends here on every path, on its own connection: a
    // dropped one would keep the lock until the connection is next used.
    match sync_in(ctx, &mut tx).await {
        Ok(Synced::Wrote(n)) => {
            tx.commit().await.db("committing the cache sync")?;
            Ok(Synced::Wrote(n))
        }
        other => {
            crate::db::rollback(tx).await;
            other
        }
    }
}

/// The sync's transaction, up to its commit (which moves the position).
async fn sync_in(ctx: &Context, tx: &mut sqlx::PgConnection) -> Result<Synced> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(crate::locks::SYNC)
        .fetch_one(&mut *tx)
        .await
        .db("taking the cache sync lock")?;
    if !locked {
        return Ok(Synced::Busy);
    }
    // xid8 has no binary form in the driver: it travels as text.
    let (xmax, xip): (String, Vec<String>) =
        sqlx::query_as("SELECT horizon::TEXT, running::TEXT[] FROM cache_sync_state")
            .fetch_one(&mut *tx)
            .await
            .db("reading the cache sync position")?;
    // One statement: the changed rows and the snapshot they were read in
    // (computed once, repeated on every row; one row without a score when
    // nothing changed).
    const CHANGED: &str = concat!(
        "WITH snap AS (
             SELECT pg_snapshot_xmax(s)::TEXT AS next_xmax,
                    ARRAY(SELECT x::TEXT FROM pg_snapshot_xip(s) AS x) AS next_xip
             FROM pg_current_snapshot() AS s
         ), changed AS (
             SELECT ",
        crate::score_row_columns!(),
        " FROM users WHERE score_xid >= $1::xid8
             UNION
             SELECT ",
        crate::score_row_columns!(),
        " FROM users WHERE score_xid = ANY($2::xid8[])
         )
         SELECT snap.next_xmax, snap.next_xip, changed.*
         FROM snap LEFT JOIN changed ON true
         ORDER BY changed.user_id"
    );
    let rows: Vec<PgRow> = sqlx::query(CHANGED)
        .bind(&xmax)
        .bind(&xip)
        .fetch_all(&mut *tx)
        .await
        .db("reading changed scores")?;
    let snapshot = |row: &PgRow| -> std::result::Result<(String, Vec<String>), sqlx::Error> {
        Ok((row.try_get("next_xmax")?, row.try_get("next_xip")?))
    };
    let (next_xmax, next_xip) = match rows.first() {
        Some(row) => snapshot(row).db("reading changed scores")?,
        None => (xmax.clone(), xip.clone()),
    };
    let mut fresh = Vec::with_capacity(rows.len());
    for row in &rows {
        if row
            .try_get::<Option<i64>, _>("user_id")
            .db("reading changed scores")?
            .is_some()
        {
            fresh.push(ScoreRow::from_row(row).db("reading changed scores")?);
        }
    }
    for chunk in fresh.chunks(CHUNK) {
        if !crate::publish::scores(ctx, chunk).await {
            // The position stays: the same window is read again.
            return Ok(Synced::RedisUnavailable);
        }
    }
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    for s in &fresh {
        // A version is the commit-time clock in microseconds (or one more
        // than the last, for bursts): now minus it is how long the change
        // took to reach the cache.
        let delay = Duration::from_micros(now_us.saturating_sub(s.version).max(0) as u64);
        telemetry::cache_synced(delay);
    }
    sqlx::query(
        "UPDATE cache_sync_state SET horizon = $1::xid8, running = $2::xid8[], synced_at = now()",
    )
    .bind(&next_xmax)
    .bind(&next_xip)
    .execute(&mut *tx)
    .await
    .db("moving the cache sync position")?;
    Ok(Synced::Wrote(fresh.len()))
}

/// After a Redis Cluster failover: the replica promoted in place of a dead
/// master may have missed that master's last writes (replication is
/// asynchronous), so a cached score, or a place on the live board, may be
/// older than the database's. Writes every score whose version (its commit
/// time in microseconds) falls within `window` again, with the same
/// newer-version-wins script: nothing newer is overwritten. Returns how many
/// scores were written, or `None` when Redis did not take them.
pub async fn resync_recent(ctx: &Context, window: Duration) -> Result<Option<usize>> {
    let since_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
        - window.as_micros() as i64;
    // A sequential scan: it runs once per failover, not per write.
    let rows: Vec<ScoreRow> = sqlx::query_as(concat!(
        "SELECT ",
        crate::score_row_columns!(),
        " FROM users WHERE score_version >= $1"
    ))
    .bind(since_us)
    .fetch_all(&ctx.pool)
    .await
    .db("reading recent score changes")?;
    let fresh = rows;
    for chunk in fresh.chunks(CHUNK) {
        if !crate::publish::scores(ctx, chunk).await {
            return Ok(None);
        }
    }
    Ok(Some(fresh.len()))
}
