//! The three moderation queues: exact, dense, 1-based positions at a cost that
//! does not grow with the queue.
//!
//! # Design
//! The seed stores each item's dense position and keeps it dense by rewriting
//! every later row on removal (O(n) writes: 640 ms per remove + add at 100,000
//! items) and appends at `MAX(position) + 1`, which two concurrent adds can
//! both read. Three ways out were weighed:
//!
//! * a Redis sorted set per scope (ZRANK is O(log n)): fast, but a second
//!   source of truth that must be kept in step with PostgreSQL across crashes
//!   and rebuilt when Redis loses it, and a position read between the two
//!   writes is wrong;
//! * positions as plain ranks, `COUNT(*)` of the keys before an item: exact
//!   and simple, but O(position) per read (milliseconds at 100,000);
//! * **counted blocks in PostgreSQL** (chosen): `position_in_queue` becomes a
//!   stable ordering key. Keys are grouped in blocks of 128
//!   (`queue_block(key)`) and superblocks of 32 blocks, and
//!   `queue_blocks`/`queue_superblocks` count the items in each. An item's
//!   position is the counts of the superblocks before its own, of the blocks
//!   of its superblock before its block, and its rank inside its block: a
//!   few dozen small rows and at most 128 index entries at 100,000 items,
//!   one snapshot, so always exact and dense.
//!
//! # Who keeps the bookkeeping
//! The triggers, for every writer (sql/queues.sql): a plain `INSERT`
//! into a queue table gets its key from one sequence (so it lands behind
//! every item added before it, without a lock), and every INSERT, DELETE or
//! key/scope UPDATE appends a row to `queue_changes` in the writer's
//! transaction. A *fold* moves committed changes into the counters
//! (`queue_blocks`, `queue_superblocks`, each scope's pace in
//! `queue_scopes`) under a per-scope advisory lock taken only if free at
//! once. So writers never wait for each other's bookkeeping, in any row
//! order: the only locks they hold are those of their own rows. Positions
//! and lengths add the unfolded changes to the counters, exact whenever the
//! fold runs; the daemon folds on its backlog check and one write in 32
//! folds its own scope. This module's add and remove are such an INSERT and
//! DELETE (the add through `queue_add`, which answers with the position in
//! the same round trip); position and list are the read API's
//! `queue_position` and `queue_head`.
//!
//! A reorder re-keys a scope by priority (desc), entry time (asc) and old
//! order, into a fresh key range below every old key (adds that run
//! meanwhile stay behind). It takes the scopes' fold locks and then the
//! items' row locks without waiting (`NOWAIT`), so it never waits while it
//! holds anything a writer could want: a busy scope is tried again shortly,
//! and [`reorder_all`] leaves it for its next run.
//!
//! `position_in_queue` therefore holds no dense position; the read API and
//! the views `*_positions` give SQL consumers dense positions.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::context::Context;
use crate::error::{DbContext, Error, Refusal, Result, from_sqlx};
use crate::perf::Timer;
use crate::retry::Retry;
use crate::telemetry::Operation;
use crate::types::{Ident, Priority, QueueKind, Scope};

/// Largest `queue list --limit`.
pub const MAX_LIST: i64 = 100_000;

/// An item's place in its queue.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Placed {
    /// The queue.
    pub queue: QueueKind,
    /// The item.
    pub content_id: String,
    /// The item's scope: topic or conversation id (absent for the topic queue).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Dense, 1-based position within the scope.
    pub position: i64,
    /// The item's priority.
    pub priority_score: f64,
    /// When it entered the queue.
    pub entered_queue_at: chrono::DateTime<chrono::Utc>,
    /// How long it is expected to wait, and on what.
    #[serde(flatten)]
    pub wait: Wait,
}

/// An item's expected wait (sql/queues.sql): its position times its scope's
/// time per removed item, over the last hour or so (an exponentially decayed
/// count of removals, whoever removed). All `None` ("unknown") when neither
/// the scope nor its queue has seen enough removals: never a made-up number.
#[derive(Debug, Clone, Default, Serialize, PartialEq, sqlx::FromRow)]
pub struct Wait {
    /// Expected seconds until the item is taken off the queue.
    pub expected_wait_seconds: Option<f64>,
    /// `scope` (the item's own topic or conversation), or `queue` (the
    /// typical pace of the queue's active scopes, for a new or quiet scope);
    /// with `_idle` when no removal came for longer than that pace (the time
    /// since the last one is then the time per item: the estimate grows
    /// with the pause).
    pub wait_source: Option<String>,
    /// The (decayed) length of time the pace was measured over, in seconds.
    pub wait_window_seconds: Option<f64>,
    /// The (decayed) number of removals it rests on.
    pub wait_items_seen: Option<f64>,
}

impl Wait {
    /// "expected wait 40 min (its scope's pace: 57 removals over 1 h)", with
    /// "no removal for 25 min: slower than that pace" where moderators
    /// stopped, or why there is no estimate.
    pub fn describe(&self) -> String {
        match (
            self.expected_wait_seconds,
            self.wait_source.as_deref(),
            self.wait_window_seconds,
            self.wait_items_seen,
        ) {
            (Some(wait), Some(source), Some(window), Some(seen)) => {
                let (basis, idle) = match source.strip_suffix("_idle") {
                    Some(basis) => (basis, true),
                    None => (source, false),
                };
                format!(
                    "expected wait {} ({} pace: {:.0} removals over {}{})",
                    human_duration(wait),
                    if basis == "scope" {
                        "its scope's"
                    } else {
                        "the queue's typical"
                    },
                    seen,
                    human_duration(window),
                    if idle {
                        "; no removal for longer than that pace: slower"
                    } else {
                        ""
                    }
                )
            }
            _ => "expected wait unknown (too few removals seen yet)".to_owned(),
        }
    }
}

/// A duration for people: "40 s", "12 min", "3.5 h".
fn human_duration(secs: f64) -> String {
    if secs < 90.0 {
        format!("{secs:.0} s")
    } else if secs < 5400.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

/// An item removed from a queue.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Removed {
    /// The queue.
    pub queue: QueueKind,
    /// The item.
    pub content_id: String,
    /// The item's scope: topic or conversation id (absent for the topic queue).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// One row of `queue list`.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct Item {
    /// The item.
    pub content_id: String,
    /// Dense, 1-based position within the scope.
    pub position: i64,
    /// The item's priority.
    pub priority_score: f64,
    /// When it entered the queue.
    pub entered_queue_at: chrono::DateTime<chrono::Utc>,
    /// How long it is expected to wait, and on what.
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub wait: Wait,
}

/// The head of a queue scope.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Listing {
    /// The queue.
    pub queue: QueueKind,
    /// Items in the scope in all.
    pub length: i64,
    /// The first items, by position.
    pub items: Vec<Item>,
}

/// What a reorder did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reordered {
    /// The queue.
    pub queue: QueueKind,
    /// Scopes reordered.
    pub scopes: i64,
    /// Items re-keyed.
    pub items: i64,
}

/// The statements that differ per queue table (the rest is the SQL API's).
struct QueueSql {
    remove: &'static str,
    lock_items: &'static str,
    rekey: &'static str,
}

/// Writes each statement once; see the module docs. Arguments: queue name,
/// table, item column, primary key constraint, and the scope expression
/// unqualified and qualified by the aliases `q` and `m` (a column, or `''`
/// for the topic queue).
macro_rules! queue_sql {
    ($queue:literal, $table:literal, $id:literal,
     scope: ($s:literal, $s_q:literal, $s_m:literal)) => {
        QueueSql {
            remove: concat!(
                "DELETE FROM ", $table, " WHERE ", $id, " = $1 RETURNING ", $s, "::TEXT"
            ),
            lock_items: concat!(
                "SELECT 1 FROM ", $table, " WHERE ", $s, " = ANY($1) FOR UPDATE NOWAIT"
            ),
            // Runs after the scopes' fold locks and their items are taken,
            // in a new snapshot that sees every committed change of them.
            // New keys go right below the scope's lowest key: the unique
            // (scope, key) index never sees two rows on one key, and an add
            // that runs meanwhile (its key from the sequence, above every
            // key) stays behind them. The trigger
            // records the moves for the fold.
            rekey: concat!(
                "WITH target AS (
                    SELECT s.scope,
                           min(m.position_in_queue) - count(*) - 1 AS base
                    FROM unnest($1::TEXT[]) AS s(scope) JOIN ", $table, " m ON ", $s_m, " = s.scope
                    GROUP BY s.scope
                ), ranked AS (
                    SELECT q.", $id, " AS id, t.base,
                           ROW_NUMBER() OVER (PARTITION BY t.scope
                               ORDER BY q.priority_score DESC, q.entered_queue_at ASC, q.position_in_queue ASC) AS rn
                    FROM ", $table, " q JOIN target t ON t.scope = ", $s_q, "
                ), moved AS (
                    UPDATE ", $table, " q SET position_in_queue = r.base + r.rn
                    FROM ranked r WHERE q.", $id, " = r.id
                    RETURNING 1
                ), flagged AS (
                    UPDATE queue_scopes s SET needs_reorder = false
                    WHERE s.queue = '", $queue, "' AND s.scope = ANY($1)
                )
                SELECT (SELECT count(*) FROM target), (SELECT count(*) FROM moved)"
            ),
        }
    };
}

const TOPIC_SQL: QueueSql = queue_sql!(
    "topic", "topic_creation_queue", "topic_id",
    scope: ("''", "''", "''")
);
const POST_SQL: QueueSql = queue_sql!(
    "post", "post_moderation_queue", "post_id",
    scope: ("topic_id", "q.topic_id", "m.topic_id")
);
const MESSAGE_SQL: QueueSql = queue_sql!(
    "message", "private_message_queue", "message_id",
    scope: ("conversation_id", "q.conversation_id", "m.conversation_id")
);

fn sql(queue: QueueKind) -> &'static QueueSql {
    match queue {
        QueueKind::Topic => &TOPIC_SQL,
        QueueKind::Post => &POST_SQL,
        QueueKind::Message => &MESSAGE_SQL,
    }
}

/// The scope id to report: none for the global queue.
fn scope_name(queue: QueueKind, scope: String) -> Option<String> {
    (queue != QueueKind::Topic).then_some(scope)
}

/// Appends an item at the tail of its scope; returns its position (= new length).
pub async fn add(
    ctx: &Context,
    queue: QueueKind,
    item: &Ident,
    scope: &Scope,
    priority: Priority,
) -> Result<Placed> {
    check_scope(queue, scope)?;
    let timer = Timer::start(&ctx.perf, Operation::QueueAdd, Some(queue));
    // The add, then (a later call in the same statement, after the add's
    // triggers) its scope's pace: one round trip.
    let row: AddedRow = retried(|| sqlx::query_as(
        "SELECT a.position, a.entered_queue_at, a.position * p.per_item_seconds AS expected_wait_seconds,
                p.source AS wait_source, p.window_seconds AS wait_window_seconds, p.items_seen AS wait_items_seen
         FROM queue_add($1, $2, $3, $4) a
         CROSS JOIN LATERAL queue_pace($1, CASE WHEN $1 = 'topic' THEN '' ELSE $3 END) p",
    )
            .bind(queue.as_str())
            .bind(item.as_str())
            .bind(scope.key())
            .bind(priority.get())
            .fetch_one(&ctx.pool))
            .await
            .map_err(|e| match Refusal::of(&e) {
                Some(Refusal::DuplicateItem) => Error::DuplicateItem {
                    queue: queue.as_str(),
                    item: item.to_string(),
                },
                _ => from_sqlx("adding to the queue", e),
            })?;
    timer.ok(None);
    Ok(Placed {
        queue,
        content_id: item.to_string(),
        scope: scope_name(queue, scope.key().to_owned()),
        position: row.position,
        priority_score: priority.get(),
        entered_queue_at: row.entered_queue_at,
        wait: row.wait,
    })
}

/// How often an add or a remove is tried when PostgreSQL rolls it back and
/// asks for a retry (a deadlock with a client's own transaction, a
/// serialization failure), and how far apart.
const WRITE_RETRY: Retry = Retry::new(5, Duration::from_millis(40), Duration::from_millis(320));

/// Runs one single-statement write, again after a `40P01` or `40001` (its
/// transaction rolled back whole, so running it again is safe); any other
/// outcome is returned as it is.
async fn retried<T, F, Fut>(write: F) -> std::result::Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
{
    WRITE_RETRY
        .run(write, |e| Refusal::of(e) == Some(Refusal::Retry))
        .await
}

/// What `queue_add` and the scope's pace answer.
#[derive(sqlx::FromRow)]
struct AddedRow {
    position: i64,
    entered_queue_at: chrono::DateTime<chrono::Utc>,
    #[sqlx(flatten)]
    wait: Wait,
}

/// What `queue_position` answers.
#[derive(sqlx::FromRow)]
struct PositionRow {
    scope: String,
    position: i64,
    priority_score: f64,
    entered_queue_at: chrono::DateTime<chrono::Utc>,
    #[sqlx(flatten)]
    wait: Wait,
}

/// Removes an item; the items behind it move up by one.
pub async fn remove(ctx: &Context, queue: QueueKind, item: &Ident) -> Result<Removed> {
    let timer = Timer::start(&ctx.perf, Operation::QueueRemove, Some(queue));
    let scope: Option<String> = retried(|| {
        sqlx::query_scalar(sql(queue).remove)
            .bind(item.as_str())
            .fetch_optional(&ctx.pool)
    })
    .await
    .db("removing from the queue")?;
    let scope = scope.ok_or_else(|| unknown(queue, item))?;
    timer.ok(None);
    Ok(Removed {
        queue,
        content_id: item.to_string(),
        scope: scope_name(queue, scope),
    })
}

/// An item's exact position in its scope.
pub async fn position(ctx: &Context, queue: QueueKind, item: &Ident) -> Result<Placed> {
    let timer = Timer::start(&ctx.perf, Operation::QueuePosition, Some(queue));
    let row: Option<PositionRow> = sqlx::query_as("SELECT * FROM queue_position($1, $2)")
        .bind(queue.as_str())
        .bind(item.as_str())
        .fetch_optional(&ctx.pool)
        .await
        .db("reading the queue position")?;
    let row = row.ok_or_else(|| unknown(queue, item))?;
    timer.ok(None);
    Ok(Placed {
        queue,
        content_id: item.to_string(),
        scope: scope_name(queue, row.scope),
        position: row.position,
        priority_score: row.priority_score,
        entered_queue_at: row.entered_queue_at,
        wait: row.wait,
    })
}

/// The first `limit` items of a scope (1 to 100,000), by position.
pub async fn list(ctx: &Context, queue: QueueKind, scope: &Scope, limit: i64) -> Result<Listing> {
    check_scope(queue, scope)?;
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(Error::invalid(
            "--limit",
            format!("{limit} is outside 1 to {MAX_LIST}"),
        ));
    }
    let timer = Timer::start(&ctx.perf, Operation::QueueList, Some(queue));
    let items: Vec<Item> = sqlx::query_as("SELECT * FROM queue_head($1, $2, $3)")
        .bind(queue.as_str())
        .bind(scope.key())
        .bind(limit)
        .fetch_all(&ctx.pool)
        .await
        .db("listing the queue")?;
    let length = scope_length(&ctx.pool, queue, scope).await?;
    timer.ok(None);
    Ok(Listing {
        queue,
        length,
        items,
    })
}

/// How many items a scope holds (from its counter).
pub async fn scope_length(pool: &PgPool, queue: QueueKind, scope: &Scope) -> Result<i64> {
    sqlx::query_scalar("SELECT queue_length($1, $2)")
        .bind(queue.as_str())
        .bind(scope.key())
        .fetch_one(pool)
        .await
        .db("reading the queue length")
}

/// Sorts one scope by priority (desc), then entry time (asc).
pub async fn reorder(ctx: &Context, queue: QueueKind, scope: &Scope) -> Result<Reordered> {
    check_scope(queue, scope)?;
    let timer = Timer::start(&ctx.perf, Operation::QueueReorder, Some(queue));
    let done = rekey_locked(ctx, queue, ScopeSet::One(scope.key()), None).await?;
    timer.ok(None);
    Ok(done)
}

/// Sorts every scope of a queue that had an add since its last reorder, in
/// one transaction, bounded on the server by `queues.reorder_timeout` (as
/// the sweep is by `sweep.timeout`). Scopes that writers hold at the moment
/// are left for the next run.
pub async fn reorder_all(ctx: &Context, queue: QueueKind) -> Result<Reordered> {
    let timer = Timer::start(&ctx.perf, Operation::QueueReorder, Some(queue));
    let limit = ctx.config.queues.reorder_timeout;
    let done = rekey_locked(ctx, queue, ScopeSet::Changed, Some(limit)).await?;
    timer.ok(None);
    Ok(done)
}

/// Which scopes a reorder takes.
enum ScopeSet<'a> {
    /// One scope, waiting for its lock.
    One(&'a str),
    /// Every scope with an add since its last reorder that no writer holds.
    Changed,
}

/// How often a reorder tries again when a writer holds one of its items.
const REKEY_RETRY: Retry = Retry::new(20, Duration::from_millis(25), Duration::from_millis(400));

/// Locks the scopes, then their items without waiting, then re-keys them;
/// tries again shortly while a writer holds an item (see the module docs).
async fn rekey_locked(
    ctx: &Context,
    queue: QueueKind,
    scopes: ScopeSet<'_>,
    timeout: Option<std::time::Duration>,
) -> Result<Reordered> {
    let q = sql(queue);
    for attempt in 1..=REKEY_RETRY.attempts {
        let mut tx = ctx.pool.begin().await.db("starting the reorder")?;
        if let Some(limit) = timeout {
            crate::db::set_local_timeout(&mut tx, limit).await?;
        }
        // Marks the key changes as a reorder's (queue_key_written, sql/queues.sql,
        // lets them through even in legacy mode).
        sqlx::query("SELECT set_config('loyaltyd.rekey', 'on', true)")
            .execute(&mut *tx)
            .await
            .db("starting the reorder")?;
        let locked = lock_scopes(&mut tx, queue, &scopes).await?;
        if locked.is_empty() {
            if let ScopeSet::One(_) = scopes {
                if !REKEY_RETRY.again(attempt) {
                    break;
                }
                crate::db::rollback(tx).await;
                tokio::time::sleep(REKEY_RETRY.pause(attempt)).await;
                continue;
            }
            return Ok(Reordered {
                queue,
                scopes: 0,
                items: 0,
            });
        }
        match sqlx::query(q.lock_items)
            .bind(&locked)
            .execute(&mut *tx)
            .await
        {
            Ok(_) => {}
            // 55P03: a writer holds an item. Let go of everything and retry.
            Err(e) if Refusal::of(&e) == Some(Refusal::LockBusy) && REKEY_RETRY.again(attempt) => {
                crate::db::rollback(tx).await;
                tokio::time::sleep(REKEY_RETRY.pause(attempt)).await;
                continue;
            }
            Err(e) => return Err(from_sqlx("locking the queue's items", e)),
        }
        if let ScopeSet::One(_) = scopes {
            // This scope's changes folded first (its flag current).
            sqlx::query("SELECT queue_fold($1, $2)")
                .bind(queue.as_str())
                .bind(&locked[0])
                .execute(&mut *tx)
                .await
                .db("folding queue changes")?;
        }
        let (scopes, items) = rekey(&mut tx, queue, &locked).await?;
        tx.commit().await.db("committing the reorder")?;
        return Ok(Reordered {
            queue,
            scopes,
            items,
        });
    }
    Err(Error::Busy {
        what: format!("the {queue} queue's scope or its items"),
    })
}

/// The scopes' fold locks, without waiting (a writer folding a scope holds
/// its lock to its commit): a scope someone holds is tried again (one
/// scope) or left for the next run (every changed scope). Changes not
/// folded yet are folded first, so the flags are current.
async fn lock_scopes(
    tx: &mut sqlx::PgConnection,
    queue: QueueKind,
    scopes: &ScopeSet<'_>,
) -> Result<Vec<String>> {
    match scopes {
        ScopeSet::One(scope) => {
            sqlx::query_scalar("SELECT $2::TEXT WHERE queue_fold_lock($1, $2)")
                .bind(queue.as_str())
                .bind(*scope)
                .fetch_all(&mut *tx)
                .await
        }
        ScopeSet::Changed => {
            // Two statements: the second's snapshot sees the flags the fold
            // set.
            sqlx::query("SELECT queue_fold($1)")
                .bind(queue.as_str())
                .execute(&mut *tx)
                .await
                .db("folding queue changes")?;
            sqlx::query_scalar(
                "SELECT s.scope FROM queue_scopes s
                 WHERE s.queue = $1 AND s.needs_reorder AND queue_fold_lock($1, s.scope)",
            )
            .bind(queue.as_str())
            .fetch_all(&mut *tx)
            .await
        }
    }
    .db("locking queue scopes")
}

/// The locked scopes' items keyed again in priority order, and the moves
/// folded into the counters (the old key range's blocks drain and are
/// dropped; each scope's pace is the scope's, untouched): answers (scopes,
/// items) reordered.
async fn rekey(
    tx: &mut sqlx::PgConnection,
    queue: QueueKind,
    locked: &[String],
) -> Result<(i64, i64)> {
    let moved: (i64, i64) = sqlx::query_as(sql(queue).rekey)
        .bind(locked)
        .fetch_one(&mut *tx)
        .await
        .db("reordering the queue")?;
    sqlx::query("SELECT queue_fold($1, s) FROM unnest($2::TEXT[]) AS s")
        .bind(queue.as_str())
        .bind(locked)
        .execute(&mut *tx)
        .await
        .db("folding the reorder's moves")?;
    Ok(moved)
}

fn check_scope(queue: QueueKind, scope: &Scope) -> Result<()> {
    let ok = matches!(
        (queue, scope),
        (QueueKind::Topic, Scope::Global)
            | (QueueKind::Post, Scope::Topic(_))
            | (QueueKind::Message, Scope::Conversation(_))
    );
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "scope",
            format!("{scope:?} is not a scope of the {queue} queue"),
        ))
    }
}

fn unknown(queue: QueueKind, item: &Ident) -> Error {
    Error::UnknownItem {
        queue: queue.as_str(),
        item: item.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::sql;
    use crate::types::QueueKind;

    #[test]
    fn each_queue_s_statements_name_its_table_item_and_scope_columns() {
        for queue in QueueKind::ALL {
            let (table, item, scope) = queue.table();
            let q = sql(queue);
            assert!(
                q.remove
                    .contains(&format!("FROM {table} WHERE {item} = $1"))
            );
            assert!(
                q.lock_items
                    .contains(&format!("FROM {table} WHERE {}", scope.unwrap_or("''")))
            );
            assert!(q.rekey.contains(&format!("'{}'", queue.as_str())));
        }
    }
}
