//! Loyalty scores: incremental updates, the coherent cache, and the integrity sweep.
//!
//! A moderation event is recorded by ONE INSERT into `moderation_events`,
//! whose statement trigger (migration 5) adds the row's `score_delta` (the
//! rule lives in the schema) to the user's score, bumps the score's version
//! and counts a pending leaderboard change, in the same transaction. That is
//! the SQL contract every client relies on, and loyaltyd's own path goes
//! through it too (`record_moderation_event`, one round trip): either all of
//! it lands or none of it does, so scores cannot drift from their events the
//! way the seed's two separate statements could. An idempotency key makes a
//! retry a no-op that answers with the current score.
//!
//! The integrity sweep ([`recalc_all`]) has three steps:
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

use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::cache::{Lookup, VersionedScore};
use crate::context::Context;
use crate::db;
use crate::error::{
    DbContext, Error, Result, SQLSTATE_EVENT_ID_REUSED, database_message, sqlstate,
    violated_constraint,
};
use crate::perf::Timer;
use crate::telemetry::Operation;
use crate::types::{ContentType, Ident, Outcome, UserId};

/// How many drifted user ids a sweep report lists at most.
pub const DRIFTED_IDS_CAP: usize = 1000;

/// A moderation event to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Whose content was moderated.
    pub user: UserId,
    /// The forum's own name for the event (e.g. `moderation_decision`).
    pub event_type: Ident,
    /// What was moderated.
    pub content_type: ContentType,
    /// Which piece of content.
    pub content_id: Ident,
    /// The decision.
    pub outcome: Outcome,
    /// Idempotency key: a retry with the same key counts once.
    pub event_id: Option<Ident>,
}

/// The result of recording an event.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recorded {
    /// The user.
    pub user_id: UserId,
    /// The score after the event.
    pub loyalty_score: i64,
    /// What the event changed the score by (0 for a replayed event id).
    pub score_delta: i64,
    /// True when the event id was already recorded and nothing changed.
    pub duplicate: bool,
}

/// A user's current score.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Score {
    /// The user.
    pub user_id: UserId,
    /// The score.
    pub loyalty_score: i64,
    /// True when it came from the Redis cache.
    pub cached: bool,
}

/// The result of recomputing one user's score.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recalculated {
    /// The user.
    pub user_id: UserId,
    /// The score recomputed from the user's events.
    pub loyalty_score: i64,
    /// The stored score before (differs only when it had drifted).
    pub previous_score: i64,
    /// True when the stored score was wrong and has been repaired.
    pub drifted: bool,
}

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
}

/// Records one moderation event; returns the user's new score.
pub async fn record_event(ctx: &Context, event: &NewEvent) -> Result<Recorded> {
    let timer = Timer::start(&ctx.perf, Operation::RecordEvent, None);
    let (recorded, fresh) = insert_event(&ctx.pool, event).await?;
    ctx.cache.set_scores(&[fresh]).await;
    timer.ok(Some(event.user));
    Ok(recorded)
}

async fn insert_event(pool: &PgPool, e: &NewEvent) -> Result<(Recorded, VersionedScore)> {
    // The INSERT's trigger changes the score and counts the pending change
    // (migration 5): the same path as any other client's INSERT. The function
    // answers with the score after it, in the same round trip.
    let (score, version, delta, duplicate, created_us): (i64, i64, i32, bool, i64) =
        sqlx::query_as("SELECT * FROM record_moderation_event($1, $2, $3, $4, $5, $6)")
            .bind(e.user.get())
            .bind(e.event_type.as_str())
            .bind(e.content_type.as_str())
            .bind(e.content_id.as_str())
            .bind(e.outcome.as_str())
            .bind(e.event_id.as_ref().map(Ident::as_str))
            .fetch_one(pool)
            .await
            .map_err(|err| event_error(e.user, e.event_id.as_ref(), err))?;
    let recorded = Recorded {
        user_id: e.user,
        loyalty_score: score,
        score_delta: i64::from(delta),
        duplicate,
    };
    // A replay answers with the current score and version too: the retry
    // of a write whose cache update was lost puts it right.
    let fresh = VersionedScore {
        user: e.user,
        score,
        version,
        created_us,
    };
    Ok((recorded, fresh))
}

/// The domain error a refused event write means.
fn event_error(user: UserId, event_id: Option<&Ident>, err: sqlx::Error) -> Error {
    if violated_constraint(&err) == Some("moderation_events_user_id_fkey") {
        return Error::UnknownUser(user.get());
    }
    match sqlstate(&err).as_deref() {
        Some(SQLSTATE_EVENT_ID_REUSED) => Error::EventIdConflict {
            event_id: event_id.map(Ident::to_string).unwrap_or_default(),
            detail: database_message(&err),
        },
        Some("22003") => Error::ScoreOverflow(user.get()),
        _ => crate::error::from_sqlx("recording the event", err),
    }
}

/// The outcome of a batch: each touched user's score after it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchRecorded {
    /// Events written (replayed event ids are not).
    pub events_recorded: u64,
    /// The new score of every user the batch changed, by id.
    pub scores: Vec<(UserId, i64)>,
}

/// Records many events in one transaction (bulk ingestion). All or nothing:
/// an unknown user fails the whole batch and writes nothing.
pub async fn record_events(ctx: &Context, events: &[NewEvent]) -> Result<BatchRecorded> {
    if events.is_empty() {
        return Ok(BatchRecorded {
            events_recorded: 0,
            scores: Vec::new(),
        });
    }
    let timer = Timer::start(&ctx.perf, Operation::RecordEvents, None);
    let mut users = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut contents = Vec::with_capacity(events.len());
    let mut content_ids = Vec::with_capacity(events.len());
    let mut outcomes = Vec::with_capacity(events.len());
    let mut keys = Vec::with_capacity(events.len());
    for e in events {
        users.push(e.user.get());
        types.push(e.event_type.as_str());
        contents.push(e.content_type.as_str());
        content_ids.push(e.content_id.as_str());
        outcomes.push(e.outcome.as_str());
        keys.push(e.event_id.as_ref().map(Ident::as_str));
    }
    // One INSERT of every event (UNNEST turns the columns into rows); its
    // trigger updates each user once, locking them in id order, so
    // concurrent batches cannot deadlock on each other.
    let result = sqlx::query_as::<_, (i64, i64, i64, i64, i64)>(
        "SELECT * FROM record_moderation_events($1, $2, $3, $4, $5, $6)",
    )
    .bind(&users)
    .bind(&types)
    .bind(&contents)
    .bind(&content_ids)
    .bind(&outcomes)
    .bind(&keys)
    .fetch_all(&ctx.pool)
    .await;
    let rows = match result {
        Ok(rows) => rows,
        Err(err) if violated_constraint(&err) == Some("moderation_events_user_id_fkey") => {
            return Err(first_unknown_user(&ctx.pool, &users).await);
        }
        Err(err) if sqlstate(&err).as_deref() == Some("22003") => {
            return Err(Error::Runtime(
                "a score of the batch would leave the 64-bit range; nothing was recorded".into(),
            ));
        }
        Err(err) => return Err(crate::error::from_sqlx("recording a batch of events", err)),
    };
    let fresh: Vec<VersionedScore> = rows
        .iter()
        .filter_map(|&(id, score, version, _, created_us)| {
            UserId::new(id).ok().map(|user| VersionedScore {
                user,
                score,
                version,
                created_us,
            })
        })
        .collect();
    ctx.cache.set_scores(&fresh).await;
    timer.ok(None);
    Ok(BatchRecorded {
        events_recorded: rows.iter().map(|r| r.3 as u64).sum(),
        scores: fresh.iter().map(|s| (s.user, s.score)).collect(),
    })
}

/// Names the first user of a failed batch that does not exist.
async fn first_unknown_user(pool: &PgPool, users: &[i64]) -> Error {
    let missing: Result<Option<i64>> = sqlx::query_scalar(
        "SELECT u FROM UNNEST($1::BIGINT[]) u WHERE NOT EXISTS (SELECT 1 FROM users WHERE id = u) LIMIT 1",
    )
    .bind(users)
    .fetch_optional(pool)
    .await
    .db("finding the unknown user");
    match missing {
        Ok(Some(id)) => Error::UnknownUser(id),
        Ok(None) => {
            Error::Runtime("a user of the batch was deleted while it was recorded; retry".into())
        }
        Err(e) => e,
    }
}

/// A user's score: from the cache, else from PostgreSQL (and then cached,
/// if this reader holds the miss's lease: see `cache`'s "Refills: leases").
pub async fn get_score(ctx: &Context, user: UserId) -> Result<Score> {
    let timer = Timer::start(&ctx.perf, Operation::GetScore, None);
    let lease = match ctx.cache.lookup(user).await {
        Lookup::Hit(score) => {
            timer.ok(Some(user));
            return Ok(Score {
                user_id: user,
                loyalty_score: score,
                cached: true,
            });
        }
        Lookup::Leased(lease) => Some(lease),
        Lookup::Miss => None,
    };
    let current = read_score(&ctx.pool, user).await?;
    if let Some(lease) = lease {
        ctx.cache.refill(&lease, &current).await;
    }
    timer.ok(Some(user));
    Ok(Score {
        user_id: user,
        loyalty_score: current.score,
        cached: false,
    })
}

/// A user's score and its version; unknown users are an error.
async fn read_score<'c>(conn: impl sqlx::PgExecutor<'c>, user: UserId) -> Result<VersionedScore> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT loyalty_score, score_version, (EXTRACT(EPOCH FROM created_at) * 1000000)::BIGINT
         FROM users WHERE id = $1",
    )
    .bind(user.get())
    .fetch_optional(conn)
    .await
    .db("reading the score")?;
    let (score, version, created_us) = row.ok_or(Error::UnknownUser(user.get()))?;
    Ok(VersionedScore {
        user,
        score,
        version,
        created_us,
    })
}

/// Recomputes one user's score from their events, repairing it (and the cache) if it drifted.
pub async fn recalc_user(ctx: &Context, user: UserId) -> Result<Recalculated> {
    let timer = Timer::start(&ctx.perf, Operation::RecalcUser, None);
    let mut tx = ctx.pool.begin().await.db("starting the recalculation")?;
    let repaired = repair(&mut tx, &[user.get()]).await?;
    let current = read_score(&mut *tx, user).await?;
    tx.commit().await.db("committing the recalculation")?;
    // Always refresh the cache: recalc is also how an operator fixes a bad cached value.
    ctx.cache.set_scores(&[current]).await;
    timer.ok(Some(user));
    let previous = repaired.first().map_or(current.score, |r| r.previous);
    Ok(Recalculated {
        user_id: user,
        loyalty_score: current.score,
        previous_score: previous,
        drifted: !repaired.is_empty(),
    })
}

/// A repaired score.
struct Repaired {
    fresh: VersionedScore,
    previous: i64,
}

/// Locks the users, recomputes their scores from their events under the lock
/// and writes back those that differ. The lock comes first, in its own
/// statement, so the recomputation's snapshot includes every event committed
/// for them and no writer can add one until the transaction ends.
async fn repair(tx: &mut Transaction<'_, Postgres>, ids: &[i64]) -> Result<Vec<Repaired>> {
    // The lock, and the mark that lets loyaltyd's own score writes past
    // users_score_written (migration 5), in one round trip.
    sqlx::query(
        "SELECT set_config('loyaltyd.scoring', 'on', true),
                (SELECT count(*) FROM (SELECT id FROM users WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE) l)",
    )
    .bind(ids)
    .execute(&mut **tx)
    .await
    .db("locking users to repair")?;
    // A seed-era writer's fresh credit (its event is on its way) counts; one
    // older than LEGACY_CREDIT_GRACE never got its event: it is dropped.
    const SQL: &str = r#"
        WITH truth AS (
            SELECT u.id, u.loyalty_score AS previous,
                   COALESCE((SELECT SUM(e.score_delta) FROM moderation_events e WHERE e.user_id = u.id), 0)
                 + COALESCE((SELECT SUM(c.delta) FROM legacy_score_credits c
                             WHERE c.user_id = u.id AND c.written_at > now() - $2 * INTERVAL '1 second'), 0) AS score
            FROM users u
            WHERE u.id = ANY($1)
        ), expired AS (
            DELETE FROM legacy_score_credits c
            WHERE c.user_id = ANY($1) AND c.written_at <= now() - $2 * INTERVAL '1 second'
        ), fixed AS (
            UPDATE users u
            SET loyalty_score = t.score, score_version = next_score_version(u.score_version),
                score_xid = pg_current_xact_id(), updated_at = now()
            FROM truth t
            WHERE u.id = t.id AND u.loyalty_score <> t.score
            RETURNING u.id, u.loyalty_score, u.score_version, t.previous,
                      (EXTRACT(EPOCH FROM u.created_at) * 1000000)::BIGINT AS created_us
        ), counted AS (
            -- A repaired score moves the leaderboard like any other change.
            UPDATE leaderboard_pending SET changes = changes + (SELECT count(*) FROM fixed)
            WHERE shard = leaderboard_shard() AND EXISTS (SELECT 1 FROM fixed)
        )
        SELECT id, loyalty_score, score_version, previous, created_us FROM fixed ORDER BY id
    "#;
    let rows: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(SQL)
        .bind(ids)
        .bind(LEGACY_CREDIT_GRACE.as_secs_f64())
        .fetch_all(&mut **tx)
        .await
        .db("repairing scores")?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, score, version, previous, created_us)| {
            Some(Repaired {
                fresh: VersionedScore {
                    user: UserId::new(id).ok()?,
                    score,
                    version,
                    created_us,
                },
                previous,
            })
        })
        .collect())
}

/// Repairs the scores of `ids` in the caller's transaction (the sweep's
/// repair, for `adopt`): `(user, before, after)` of every score it changed.
pub async fn repair_users(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[i64],
) -> Result<Vec<(i64, i64, i64)>> {
    Ok(repair(tx, ids)
        .await?
        .into_iter()
        .map(|r| (r.fresh.user.get(), r.previous, r.fresh.score))
        .collect())
}

/// How long a seed-era writer's credit (migration 5, "the seed's writers")
/// waits for its event before the sweep treats it as drift: the seed's
/// UPDATE and INSERT are milliseconds apart; five minutes is a crash.
pub const LEGACY_CREDIT_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// The integrity sweep: every user's score against their events, repairing
/// drift in PostgreSQL and Redis (see the module docs). Stops between repair
/// batches when `cancel` fires (each batch is complete or untouched).
pub async fn recalc_all(
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
        find_drift(ctx, cancel),
        cached_scores_differing(ctx, batch_size, cancel)
    );
    let (users_checked, drifted) = drift?;
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
        repair_drifted(ctx, batch, &mut report).await?;
    }
    let differing: Vec<UserId> = differing
        .into_iter()
        .filter(|u| drifted.binary_search(&u.get()).is_err())
        .collect();
    for batch in differing.chunks(batch_size.max(1) as usize) {
        report.cache_repaired += repair_cache_entries(ctx, batch).await;
    }
    if ctx.config.leaderboard.live && cache_checked && !cancel.is_cancelled() {
        match verify_live_board(ctx, batch_size, cancel).await {
            Ok(repaired) => report.board_repaired = repaired,
            Err(e) => {
                tracing::warn!(error = %e.one_line(), "the sweep's live board check stopped early");
            }
        }
    }
    // A cache check that Redis could not answer is reported
    // (cache_checked), not a failed sweep; one that the time limit or a
    // cancel cut short is an incomplete sweep.
    report.completed = !cancel.is_cancelled() && !cut_short;
    timer.ok(None);
    Ok(report)
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
               COALESCE(array_agg(u.id ORDER BY u.id)
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
    let fresh: Vec<VersionedScore> = repaired.iter().map(|r| r.fresh).collect();
    ctx.cache.set_scores(&fresh).await;
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
        let mut rows =
            sqlx::query_as::<_, (i64, i64)>("SELECT id, loyalty_score FROM users").fetch(&mut *tx);
        let mut chunk: Vec<(UserId, i64)> = Vec::with_capacity(batch as usize);
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled {
                    context: "the sweep's cache check",
                });
            }
            let row = rows
                .try_next()
                .await
                .db("reading scores for the cache check")?;
            if let Some((id, score)) = row
                && let Ok(user) = UserId::new(id)
            {
                chunk.push((user, score));
            }
            if chunk.len() >= batch as usize || (row.is_none() && !chunk.is_empty()) {
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
                chunk.clear();
            }
            if row.is_none() {
                break;
            }
        }
    }
    let _ = tx.rollback().await;
    Ok((differing, checked))
}

/// Checks the live board (the leaderboard in Redis) against every user's
/// score, `batch` users at a time, and corrects the places that differ
/// (each write guarded by its version). When the board then holds more
/// users than the database ranks (users deleted behind its back), a second
/// pass walks the board and takes off the users the database does not rank.
/// Returns the users corrected.
async fn verify_live_board(ctx: &Context, batch: u32, cancel: &CancellationToken) -> Result<u64> {
    use futures_util::TryStreamExt;
    if ctx.cache.live_ready().await != Some(true) {
        return Ok(0); // being built, or Redis away: nothing to check
    }
    let mut tx = ctx.pool.begin().await.db("starting the live board check")?;
    db::set_local_timeout(&mut tx, ctx.config.sweep.timeout).await?;
    let (mut repaired, mut ranked) = (0u64, 0i64);
    {
        let mut rows = sqlx::query_as::<_, (i64, i64, i64, i64)>(
            "SELECT id, loyalty_score, score_version, (EXTRACT(EPOCH FROM created_at) * 1000000)::BIGINT FROM users",
        )
        .fetch(&mut *tx);
        let mut chunk: Vec<VersionedScore> = Vec::with_capacity(batch as usize);
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled {
                    context: "the live board check",
                });
            }
            let row = rows
                .try_next()
                .await
                .db("reading scores for the live board check")?;
            if let Some((id, score, version, created_us)) = row
                && let Ok(user) = UserId::new(id)
            {
                ranked += i64::from(score > 0);
                chunk.push(VersionedScore {
                    user,
                    score,
                    version,
                    created_us,
                });
            }
            if chunk.len() >= batch as usize || (row.is_none() && !chunk.is_empty()) {
                let Some(differing) = ctx.cache.live_differing(&chunk).await else {
                    return Ok(repaired);
                };
                let fixes: Vec<VersionedScore> = chunk
                    .iter()
                    .filter(|s| differing.contains(&s.user))
                    .copied()
                    .collect();
                if !fixes.is_empty() {
                    // Read again: a writer may have moved them since the stream's snapshot.
                    let ids: Vec<UserId> = fixes.iter().map(|s| s.user).collect();
                    let fresh = read_scores(&ctx.pool, &ids).await?;
                    ctx.cache.live_set(&fresh).await;
                    repaired += fixes.len() as u64;
                }
                chunk.clear();
            }
            if row.is_none() {
                break;
            }
        }
    }
    let _ = tx.rollback().await;
    if ctx.cache.live_count().await.is_some_and(|n| n > ranked) {
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
    let (mut cursor, mut repaired) = (0u64, 0u64);
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled {
                context: "the live board check",
            });
        }
        let Some((next, members)) = ctx.cache.live_scan(cursor, batch).await else {
            return Ok(repaired);
        };
        let ids: Vec<UserId> = members.iter().map(|(u, _)| *u).collect();
        let fresh = read_scores(&ctx.pool, &ids).await?;
        let wrong: Vec<VersionedScore> = fresh.iter().filter(|s| s.score <= 0).copied().collect();
        let gone: Vec<(UserId, String)> = members
            .into_iter()
            .filter(|(u, _)| !fresh.iter().any(|s| s.user == *u))
            .collect();
        ctx.cache.live_set(&wrong).await;
        ctx.cache.live_remove(&gone).await;
        repaired += (wrong.len() + gone.len()) as u64;
        if next == 0 {
            return Ok(repaired);
        }
        cursor = next;
    }
}

/// Several users' scores and versions (unknown ids are left out).
async fn read_scores(pool: &PgPool, users: &[UserId]) -> Result<Vec<VersionedScore>> {
    let ids: Vec<i64> = users.iter().map(|u| u.get()).collect();
    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, loyalty_score, score_version, (EXTRACT(EPOCH FROM created_at) * 1000000)::BIGINT
         FROM users WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .db("reading scores")?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, score, version, created_us)| {
            Some(VersionedScore {
                user: UserId::new(id).ok()?,
                score,
                version,
                created_us,
            })
        })
        .collect())
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
    let ids: Vec<i64> = users.iter().map(|u| u.get()).collect();
    let Ok(rows) = sqlx::query_as::<_, (i64, i64, i64, i64)>(
        "SELECT id, loyalty_score, score_version, (EXTRACT(EPOCH FROM created_at) * 1000000)::BIGINT
         FROM users WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&ctx.pool)
    .await
    else {
        return 0;
    };
    let current: std::collections::HashMap<i64, (i64, i64, i64)> = rows
        .into_iter()
        .map(|(id, score, version, created_us)| (id, (score, version, created_us)))
        .collect();
    let (mut newer, mut replace) = (Vec::new(), Vec::new());
    for (&user, entry) in users.iter().zip(entries) {
        let Some(entry) = entry else { continue };
        let Some(&(score, version, created_us)) = current.get(&user.get()) else {
            continue;
        };
        if entry.value.parse() == Ok(score) {
            continue;
        }
        let fresh = VersionedScore {
            user,
            score,
            version,
            created_us,
        };
        match entry.version.as_deref().and_then(|v| v.parse::<i64>().ok()) {
            Some(cached) if cached > version => replace.push((entry, fresh)),
            _ => newer.push(fresh),
        }
    }
    let corrected = (newer.len() + replace.len()) as u64;
    ctx.cache.set_scores(&newer).await;
    ctx.cache.replace_if_unchanged(&replace).await;
    corrected
}
