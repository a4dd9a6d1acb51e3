//! The integrity sweep: every stored score against the sum of its events,
//! every cached score and every place on the live board against the
//! database; what differs is repaired.
//!
//! The integrity sweep ([`run`]) has three steps, and a fourth with the live
//! board on:
//! 1. **find drift** with one read-only statement: every stored score against
//!    the sum of its events, in one snapshot. Because an event and its score
//!    change commit together, a mismatch inside one snapshot is real drift,
//!    never a race with a writer. It is shaped like one plain aggregate over
//!    the events (PostgreSQL runs it with parallel workers), which is what
//!    keeps the sweep near the cost of that aggregate: walking users in id
//!    batches instead summed events through the index one batch at a time and
//!    cost three times as much;
//! 2. **repair** the drifted users in batches of `sweep.batch_size`, each one
//!    short transaction that locks its users in id order and recomputes them
//!    under the lock (a batch is applied whole or not at all; a cancelled
//!    sweep stops between batches);
//! 3. **check the cache**: every user's cached score (one MGET per batch of
//!    users) against the database, read beside step 1 on its own connection
//!    and corrected after step 2, in one pipeline per batch.
//! 4. **check the live board** (the leaderboard's sorted set in Redis)
//!    against every user's score, and take off users the database no longer
//!    ranks.
//!
//! Each step and each repair batch runs in its own span (`sweep`,
//! `repair_batch{batch}`), so `log.format = json` shows a sweep as one tree.

use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::Context;
use crate::db;
use crate::error::{DbContext, Error, Result};
use crate::leaderboard::live::{Board, live_member};
use crate::loyalty::repair;
use crate::perf::Timer;
use crate::score_row::ScoreRow;
use crate::telemetry::Operation;
use crate::types::UserId;

/// How many drifted user ids a sweep report lists at most.
pub const DRIFTED_IDS_CAP: usize = 1000;

/// What an integrity sweep found and did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SweepReport {
    /// Users compared with their events.
    pub users_checked: u64,
    /// Users whose stored score differed from their events (now repaired).
    pub drifted_users: u64,
    /// Their ids, the first [`DRIFTED_IDS_CAP`].
    pub drifted_user_ids: Vec<UserId>,
    /// Cache entries that differed from the database and were corrected.
    pub cache_repaired: u64,
    /// Batches (transactions) run.
    pub batches: u64,
    /// False when the sweep stopped early (cancelled, or its time limit cut
    /// a read short); the batches done are complete.
    pub completed: bool,
    /// False when Redis could not be read for every user (the cache check
    /// was skipped for the rest; the database part is unaffected).
    pub cache_checked: bool,
    /// Users whose place on the live board differed from the database (now
    /// corrected).
    pub board_repaired: u64,
    /// Legacy credits still waiting for their event after the repairs
    /// (sql/scoring.sql: a score written by an application of the original
    /// design, whose event INSERT is on its way). Not drift: each such score
    /// is its events plus these credits, exactly; a credit older than
    /// [`crate::loyalty::LEGACY_CREDIT_GRACE`] was repaired as drift.
    pub pending_credits: u64,
}

/// The integrity sweep: every user's score against their events, repairing
/// drift in PostgreSQL and Redis (see the module docs). Stops between repair
/// batches when `cancel` fires (each batch is complete or untouched).
#[tracing::instrument(name = "sweep", skip_all, fields(batch_size = batch_size))]
pub async fn run(
    ctx: &Context,
    batch_size: u32,
    cancel: &CancellationToken,
) -> Result<SweepReport> {
    let timer = Timer::start(&ctx.perf, Operation::IntegritySweep, None);
    let mut report = SweepReport::default();
    // Both reads at once; the cache is only corrected after the repairs (a
    // drifted user's cache holds the right score until then; the repair sets
    // it again).
    let (drift, differing) = tokio::join!(
        find_drift(ctx, cancel).instrument(tracing::info_span!("find_drift")),
        cached_scores_differing(ctx, batch_size, cancel)
            .instrument(tracing::info_span!("cache_check"))
    );
    let (users_checked, drifted) = drift?;
    tracing::info!(
        users = users_checked,
        drifted = drifted.len(),
        cache_differing = differing.as_ref().map_or(0, |d| d.0.len()),
        "sweep read done"
    );
    let (differing, cache_checked, cut_short) = match differing {
        Ok((found, checked)) => (found, checked, false),
        // Cut short by the time limit or a cancel: the report says so.
        Err(e) => {
            tracing::warn!(error = %e.one_line(), "the sweep's cache check stopped early");
            (Vec::new(), false, true)
        }
    };
    report.cache_checked = cache_checked;
    report.users_checked = users_checked;
    for batch in drifted.chunks(batch_size.max(1) as usize) {
        if cancel.is_cancelled() {
            timer.ok(None);
            return Ok(report);
        }
        report.batches += 1;
        let span = tracing::info_span!("repair_batch", batch = report.batches, users = batch.len());
        repair_drifted(ctx, batch, &mut report)
            .instrument(span)
            .await?;
    }
    let differing: Vec<UserId> = differing
        .into_iter()
        .filter(|u| drifted.binary_search(&u.get()).is_err())
        .collect();
    for (n, batch) in differing.chunks(batch_size.max(1) as usize).enumerate() {
        let span = tracing::info_span!("cache_batch", batch = n + 1, users = batch.len());
        report.cache_repaired += repair_cache_entries(ctx, batch).instrument(span).await;
    }
    if ctx.config.leaderboard.live && cache_checked && !cancel.is_cancelled() {
        let span = tracing::info_span!("live_board_check");
        match verify_live_board(ctx, batch_size, cancel)
            .instrument(span)
            .await
        {
            Ok(repaired) => report.board_repaired = repaired,
            Err(e) => {
                tracing::warn!(error = %e.one_line(), "the sweep's live board check stopped early");
            }
        }
    }
    report.pending_credits = pending_credits(ctx).await?;
    // A cache check that Redis could not answer is reported
    // (cache_checked), not a failed sweep; one that the time limit or a
    // cancel cut short is an incomplete sweep.
    report.completed = !cancel.is_cancelled() && !cut_short;
    timer.ok(None);
    Ok(report)
}

/// Legacy credits not yet consumed by their events.
async fn pending_credits(ctx: &Context) -> Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM legacy_score_credits")
        .fetch_one(&ctx.pool)
        .await
        .db("counting legacy credits")?;
    Ok(n.max(0) as u64)
}

impl SweepReport {
    /// The report in one line (the first drifted ids named): what
    /// `score recalc --all` prints and the sweep job logs.
    pub fn summary(&self) -> String {
        let ids: Vec<String> = self
            .drifted_user_ids
            .iter()
            .take(20)
            .map(|u| u.to_string())
            .collect();
        let listed = match ids.len() {
            0 => String::new(),
            n if (n as u64) < self.drifted_users => format!(" (users {}, …)", ids.join(", ")),
            _ => format!(" (users {})", ids.join(", ")),
        };
        format!(
            "checked {} users: {} drifted and were repaired{listed}; {} cached scores and {} live leaderboard places corrected; {} legacy credits pending (not drift){}",
            self.users_checked,
            self.drifted_users,
            self.cache_repaired,
            self.board_repaired,
            self.pending_credits,
            if self.completed {
                ""
            } else {
                "; stopped early"
            }
        )
    }
}

/// How many users there are, and the ids of those whose stored score is not
/// the sum of their events, from one snapshot. Runs under the sweep's time
/// limit, and `cancel` stops it on the server.
async fn find_drift(ctx: &Context, cancel: &CancellationToken) -> Result<(u64, Vec<i64>)> {
    // One statement, one snapshot, one pass over each table. The events side
    // is one GROUP BY over the whole table (a parallel scan of
    // idx_moderation_events_user_time, which carries score_delta), and it
    // comes out in user order; so does users by its primary key. A merge join
    // of the two costs next to nothing, where the hash join PostgreSQL picks
    // by itself builds (and, past work_mem, spills) a table of every user's
    // sum: 1.2 x the bare aggregate instead of 1.0 x at 200,000 users.
    const SQL: &str = r#"
        SELECT count(*),
               COALESCE(array_agg(u.id::BIGINT ORDER BY u.id)
                            FILTER (WHERE u.loyalty_score <> COALESCE(t.truth, 0)), '{}')
        FROM users u
        LEFT JOIN (SELECT user_id, SUM(score_delta) AS truth
                   FROM moderation_events GROUP BY user_id) t ON t.user_id = u.id
    "#;
    let mut tx = ctx.pool.begin().await.db("starting the sweep")?;
    // The backend (for cancelling), and the merge join above: hash joins off
    // for this transaction only, in the same round trip.
    let pid: i32 =
        sqlx::query_scalar("SELECT pg_backend_pid(), set_config('enable_hashjoin', 'off', true)")
            .fetch_one(&mut *tx)
            .await
            .db("starting the sweep")?;
    db::set_local_timeout(&mut tx, ctx.config.sweep.timeout).await?;
    let run = sqlx::query_as::<_, (i64, Vec<i64>)>(SQL).fetch_one(&mut *tx);
    let (users, drifted) = db::cancellable(&ctx.pool, pid, cancel, run)
        .await
        .db("finding drifted scores")?;
    tx.commit().await.db("ending the sweep's read")?;
    Ok((users.max(0) as u64, drifted))
}

/// Repairs one batch of drifted users (one transaction) and their cache entries.
async fn repair_drifted(ctx: &Context, ids: &[i64], report: &mut SweepReport) -> Result<()> {
    let mut tx = ctx.pool.begin().await.db("starting a repair")?;
    let repaired = repair(&mut tx, ids).await?;
    tx.commit().await.db("committing a repair")?;
    report.drifted_users += repaired.len() as u64;
    for r in &repaired {
        if report.drifted_user_ids.len() < DRIFTED_IDS_CAP {
            report.drifted_user_ids.push(r.fresh.user);
        }
        tracing::warn!(user_id = %r.fresh.user, stored = r.previous, recomputed = r.fresh.score, "repaired a drifted loyalty score");
    }
    let fresh: Vec<ScoreRow> = repaired.iter().map(|r| r.fresh.clone()).collect();
    crate::publish::scores(ctx, &fresh).await;
    Ok(())
}

/// The users whose cached score differs from the database, `batch` users at
/// a time (read only; [`repair_cache_entries`] corrects them), and whether
/// Redis answered for every user.
///
/// The users stream from one sequential scan, under the sweep's time limit
/// and its cancel (not the request `statement_timeout`: at some millions of
/// users the scan outlasts it); each batch's cached scores come in one MGET.
/// The cost follows the number of users, never the size of the Redis
/// keyspace (which a SCAN would walk, whoever else's keys it holds). An
/// error or a cancel ends it as an error: the sweep is then incomplete.
async fn cached_scores_differing(
    ctx: &Context,
    batch: u32,
    cancel: &CancellationToken,
) -> Result<(Vec<UserId>, bool)> {
    use futures_util::TryStreamExt;
    let mut tx = ctx.pool.begin().await.db("starting the cache check")?;
    db::set_local_timeout(&mut tx, ctx.config.sweep.timeout).await?;
    let mut differing = Vec::new();
    let mut checked = true;
    {
        let mut chunks =
            sqlx::query_as::<_, (i64, i64)>("SELECT id::BIGINT, loyalty_score::BIGINT FROM users")
                .fetch(&mut *tx)
                .try_chunks(batch.max(1) as usize);
        while let Some(chunk) = next_users(&mut chunks, cancel, "the sweep's cache check").await? {
            let chunk: Vec<(UserId, i64)> = chunk
                .into_iter()
                .filter_map(|(id, score)| Some((UserId::new(id).ok()?, score)))
                .collect();
            let users: Vec<UserId> = chunk.iter().map(|c| c.0).collect();
            // Values only: the versions matter just for the few that
            // differ, and repair_cache_entries reads those again anyway.
            let Some(cached) = ctx.cache.get_values(&users).await else {
                checked = false;
                break;
            };
            differing.extend(
                chunk
                    .iter()
                    .zip(cached)
                    .filter_map(|(&(user, score), value)| {
                        value.filter(|v| v.parse() != Ok(score)).map(|_| user)
                    }),
            );
        }
    }
    crate::db::rollback(tx).await;
    Ok((differing, checked))
}

/// The next batch of a check's stream of users; an error once the sweep is
/// cancelled (a check stops between batches).
async fn next_users<T, S>(
    chunks: &mut S,
    cancel: &CancellationToken,
    check: &'static str,
) -> Result<Option<Vec<T>>>
where
    S: futures_util::Stream<
            Item = std::result::Result<
                Vec<T>,
                futures_util::stream::TryChunksError<T, sqlx::Error>,
            >,
        > + Unpin,
{
    use futures_util::TryStreamExt;
    let chunk = chunks.try_next().await.map_err(|e| e.1).db(check)?;
    if chunk.is_some() && cancel.is_cancelled() {
        return Err(Error::Cancelled { context: check });
    }
    Ok(chunk)
}

/// Checks the live board (the leaderboard in Redis) against every user's
/// score, `batch` users at a time, and corrects the places that differ
/// (each write guarded by its version). When the board then holds more
/// users than the database ranks (users deleted behind its back), a second
/// pass walks the board and takes off the users the database does not rank.
/// Returns the users corrected.
async fn verify_live_board(ctx: &Context, batch: u32, cancel: &CancellationToken) -> Result<u64> {
    use futures_util::TryStreamExt;
    let board = Board::new(&ctx.redis);
    if board.ready().await != Some(true) {
        return Ok(0); // being built, or Redis away: nothing to check
    }
    let mut tx = ctx.pool.begin().await.db("starting the live board check")?;
    db::set_local_timeout(&mut tx, ctx.config.sweep.timeout).await?;
    let (mut repaired, mut ranked) = (0u64, 0i64);
    {
        let mut chunks = sqlx::query_as::<_, ScoreRow>(concat!(
            "SELECT ",
            crate::score_row_columns!(),
            " FROM users"
        ))
        .fetch(&mut *tx)
        .try_chunks(batch.max(1) as usize);
        while let Some(chunk) = next_users(&mut chunks, cancel, "the live board check").await? {
            ranked += chunk.iter().filter(|s| s.score > 0).count() as i64;
            let Some(differing) = board.differing(&chunk).await else {
                return Ok(repaired);
            };
            let ids: Vec<UserId> = chunk
                .iter()
                .filter(|s| differing.contains(&s.user))
                .map(|s| s.user)
                .collect();
            if !ids.is_empty() {
                // Read again: a writer may have moved them since the stream's snapshot.
                let fresh = read_scores(&ctx.pool, &ids).await?;
                board.set(&fresh).await;
                repaired += ids.len() as u64;
            }
        }
    }
    crate::db::rollback(tx).await;
    if board.count().await.is_some_and(|n| n > ranked) {
        repaired += remove_unranked_from_board(ctx, batch, cancel).await?;
    }
    Ok(repaired)
}

/// The board's second pass: every user on it whose score the database does
/// not have as positive is corrected (read again, written with its version)
/// or, when the user is gone, taken off.
async fn remove_unranked_from_board(
    ctx: &Context,
    batch: u32,
    cancel: &CancellationToken,
) -> Result<u64> {
    let board = Board::new(&ctx.redis);
    let (mut cursor, mut repaired) = (0u64, 0u64);
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled {
                context: "the live board check",
            });
        }
        let Some((next, members)) = board.scan(cursor, batch).await else {
            return Ok(repaired);
        };
        let ids: Vec<UserId> = members.iter().map(|(u, _)| *u).collect();
        let fresh = read_scores(&ctx.pool, &ids).await?;
        let wrong: Vec<ScoreRow> = fresh.iter().filter(|s| s.score <= 0).cloned().collect();
        let rows: std::collections::HashMap<UserId, &ScoreRow> =
            fresh.iter().map(|s| (s.user, s)).collect();
        // A ranked user's member other than the one their row says: a stray
        // (its name since changed) unless the board's own entry still names
        // it (a rename the cache sync has yet to bring), which the library
        // checks as it removes.
        let strays: Vec<(UserId, Vec<u8>)> = members
            .iter()
            .filter(|(u, m)| {
                rows.get(u).is_some_and(|s| {
                    s.score > 0
                        && live_member(s.user, s.created_us, s.username.as_deref().unwrap_or(""))
                            != *m
                })
            })
            .cloned()
            .collect();
        let gone: Vec<(UserId, Vec<u8>)> = members
            .into_iter()
            .filter(|(u, _)| !rows.contains_key(u))
            .collect();
        board.set(&wrong).await;
        board.remove(&gone).await;
        let unstrayed = board.remove_strays(&strays).await.unwrap_or(0);
        repaired += (wrong.len() + gone.len()) as u64 + unstrayed;
        if next == 0 {
            return Ok(repaired);
        }
        cursor = next;
    }
}

/// Several users' scores and versions (unknown ids are left out).
async fn read_scores(pool: &PgPool, users: &[UserId]) -> Result<Vec<ScoreRow>> {
    let ids: Vec<i64> = users.iter().map(|u| u.get()).collect();
    let rows: Vec<ScoreRow> = sqlx::query_as(concat!(
        "SELECT ",
        crate::score_row_columns!(),
        " FROM users WHERE id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(pool)
    .await
    .db("reading scores")?;
    Ok(rows)
}

/// Corrects the cached scores of `users` that differ from the database.
///
/// The database is read after the cache, so it is at least as new. An entry
/// older than the database is replaced through the usual set-if-newer (which
/// leaves alone anything a writer stored meanwhile). An entry claiming a
/// version the database has not reached was not produced by any write of this
/// database (it was restored from a backup): it is replaced only if it is
/// still exactly what was seen.
async fn repair_cache_entries(ctx: &Context, users: &[UserId]) -> u64 {
    let Some(entries) = ctx.cache.get_entries(users).await else {
        return 0;
    };
    let Ok(rows) = read_scores(&ctx.pool, users).await else {
        return 0;
    };
    let mut current: std::collections::HashMap<UserId, ScoreRow> =
        rows.into_iter().map(|s| (s.user, s)).collect();
    let (mut newer, mut replace) = (Vec::new(), Vec::new());
    for (user, entry) in users.iter().zip(entries) {
        let (Some(entry), Some(fresh)) = (entry, current.remove(user)) else {
            continue;
        };
        if entry.value.parse() == Ok(fresh.score) {
            continue;
        }
        match entry.version.as_deref().and_then(|v| v.parse::<i64>().ok()) {
            Some(cached) if cached > fresh.version => replace.push((entry, fresh)),
            _ => newer.push(fresh),
        }
    }
    let corrected = (newer.len() + replace.len()) as u64;
    crate::publish::scores(ctx, &newer).await;
    ctx.cache.replace_if_unchanged(&replace).await;
    corrected
}
