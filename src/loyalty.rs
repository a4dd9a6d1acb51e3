//! Loyalty scores: incremental updates and the coherent cache.
//!
//! A moderation event is recorded by ONE INSERT into `moderation_events`,
//! whose triggers (sql/scoring.sql) add the row's `score_delta` (the
//! rule lives in the schema) to the user's score, bump the score's version
//! and count a pending leaderboard change, in the same transaction. That is
//! the SQL contract every client relies on, and loyaltyd's own path goes
//! through it too (`record_moderation_event`, one round trip): either all of
//! it lands or none of it does, so scores cannot drift from their events the
//! way the seed's two separate statements could. An idempotency key makes a
//! retry a no-op that answers with the current score.
//!
//!
//! The integrity sweep, which checks every score against its events, is
//! [`crate::sweep`]; it repairs through [`repair`] here.

use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use crate::cache::Lookup;
use crate::context::Context;
use crate::error::{DbContext, Error, Refusal, Result, database_message};
use crate::perf::Timer;
use crate::publish;
use crate::score_row::ScoreRow;
use crate::telemetry::Operation;
use crate::types::{ContentType, Ident, Outcome, UserId};

/// A moderation event to record (`event record`'s arguments too).
#[derive(Debug, Clone, clap::Args)]
pub struct NewEvent {
    /// The user whose content was moderated
    #[arg(long, value_parser = |s: &str| s.parse::<UserId>())]
    pub user: UserId,
    /// The forum's name for the event, e.g. moderation_decision
    #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--event-type", s))]
    pub event_type: Ident,
    /// What was moderated
    #[arg(long, value_enum)]
    pub content_type: ContentType,
    /// Which piece of content
    #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--content-id", s))]
    pub content_id: Ident,
    /// The decision
    #[arg(long, value_enum)]
    pub outcome: Outcome,
    /// Idempotency key: a retried event with the same key counts once
    #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--event-id", s))]
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

/// Records one moderation event; returns the user's new score.
pub async fn record_event(ctx: &Context, event: &NewEvent) -> Result<Recorded> {
    let timer = Timer::start(&ctx.perf, Operation::RecordEvent, None);
    let (recorded, fresh) = insert_event(&ctx.pool, event).await?;
    publish::scores(ctx, &[fresh]).await;
    timer.ok(Some(event.user));
    Ok(recorded)
}

async fn insert_event(pool: &PgPool, e: &NewEvent) -> Result<(Recorded, ScoreRow)> {
    // The INSERT's trigger changes the score and counts the pending change
    // (sql/scoring.sql): the same path as any other client's INSERT. The function
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
    let fresh = ScoreRow {
        user: e.user,
        score,
        version,
        created_us,
        // (The function does not answer it: the board keeps the name it has.)
        username: None,
    };
    Ok((recorded, fresh))
}

/// The domain error a refused event write means.
fn event_error(user: UserId, event_id: Option<&Ident>, err: sqlx::Error) -> Error {
    match Refusal::of(&err) {
        Some(Refusal::UnknownUser) => Error::UnknownUser(user.get()),
        Some(Refusal::EventIdReused) => Error::EventIdConflict {
            event_id: event_id.map(Ident::to_string).unwrap_or_default(),
            detail: database_message(&err),
        },
        Some(Refusal::OutOfRange) => Error::ScoreOverflow(user.get()),
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
        Err(err) if Refusal::of(&err) == Some(Refusal::UnknownUser) => {
            return Err(first_unknown_user(&ctx.pool, &users, err).await);
        }
        Err(err) => return Err(crate::error::from_sqlx("recording a batch of events", err)),
    };
    let fresh: Vec<ScoreRow> = rows
        .iter()
        .filter_map(|&(id, score, version, _, created)| {
            ScoreRow::from_parts(id, score, version, created)
        })
        .collect();
    publish::scores(ctx, &fresh).await;
    timer.ok(None);
    Ok(BatchRecorded {
        events_recorded: rows.iter().map(|r| r.3 as u64).sum(),
        scores: fresh.iter().map(|s| (s.user, s.score)).collect(),
    })
}

/// Names the first user of a failed batch that does not exist (`failed`,
/// the batch's error, where none is missing any more).
async fn first_unknown_user(pool: &PgPool, users: &[i64], failed: sqlx::Error) -> Error {
    let missing: Result<Option<i64>> = sqlx::query_scalar(
        "SELECT u FROM UNNEST($1::BIGINT[]) u WHERE NOT EXISTS (SELECT 1 FROM users WHERE id = u) LIMIT 1",
    )
    .bind(users)
    .fetch_optional(pool)
    .await
    .db("finding the unknown user");
    match missing {
        Ok(Some(id)) => Error::UnknownUser(id),
        Ok(None) => crate::error::from_sqlx("recording a batch of events", failed),
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
async fn read_score<'c>(conn: impl sqlx::PgExecutor<'c>, user: UserId) -> Result<ScoreRow> {
    let row: Option<ScoreRow> = sqlx::query_as(concat!(
        "SELECT ",
        crate::score_row_columns!(),
        " FROM users WHERE id = $1"
    ))
    .bind(user.get())
    .fetch_optional(conn)
    .await
    .db("reading the score")?;
    row.ok_or(Error::UnknownUser(user.get()))
}

/// Recomputes one user's score from their events, repairing it (and the cache) if it drifted.
pub async fn recalc_user(ctx: &Context, user: UserId) -> Result<Recalculated> {
    let timer = Timer::start(&ctx.perf, Operation::RecalcUser, None);
    let mut tx = ctx.pool.begin().await.db("starting the recalculation")?;
    let repaired = repair(&mut tx, &[user.get()]).await?;
    let current = read_score(&mut *tx, user).await?;
    tx.commit().await.db("committing the recalculation")?;
    // Always refresh the cache: recalc is also how an operator fixes a bad cached value.
    publish::scores(ctx, std::slice::from_ref(&current)).await;
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
#[derive(sqlx::FromRow)]
pub(crate) struct Repaired {
    #[sqlx(flatten)]
    pub(crate) fresh: ScoreRow,
    pub(crate) previous: i64,
}

/// Recomputes the users' scores from their ledgers under their row locks and
/// writes back those that differ (`scores_repair`, sql/scoring.sql); answers
/// each repaired user's score row and the score before.
pub(crate) async fn repair(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[i64],
) -> Result<Vec<Repaired>> {
    let (fixed, previous): (Vec<i64>, Vec<i64>) = sqlx::query_as::<_, (i64, i64)>(
        "SELECT user_id, previous FROM scores_repair($1, $2 * INTERVAL '1 second')",
    )
    .bind(ids)
    .bind(LEGACY_CREDIT_GRACE.as_secs_f64())
    .fetch_all(&mut **tx)
    .await
    .db("repairing scores")?
    .into_iter()
    .unzip();
    if fixed.is_empty() {
        return Ok(Vec::new());
    }
    // A statement of its own: its snapshot sees the repair's writes.
    const SQL: &str = concat!(
        "SELECT ",
        crate::score_row_columns!(),
        ", r.previous FROM unnest($1::BIGINT[], $2::BIGINT[]) AS r(uid, previous)
         JOIN users ON id = r.uid ORDER BY r.uid"
    );
    sqlx::query_as(SQL)
        .bind(&fixed)
        .bind(&previous)
        .fetch_all(&mut **tx)
        .await
        .db("reading repaired scores")
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

/// How long a seed-era writer's credit (sql/scoring.sql, users_score_changed)
/// waits for its event before the sweep treats it as drift: the seed's
/// UPDATE and INSERT are milliseconds apart; five minutes is a crash.
pub const LEGACY_CREDIT_GRACE: std::time::Duration = std::time::Duration::from_secs(300);
