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
//!   stable ordering key that only grows. Keys are grouped in blocks of 512
//!   (`queue_block(key)`), and `queue_blocks` counts the items in each. An
//!   item's position is the sum of the counts of the blocks before its own plus
//!   its rank inside its block: at most n/512 small rows plus 512 index
//!   entries, one statement, one snapshot, so always exact and dense.
//!   An add touches the scope row, one block row and one item; a remove the
//!   same; nothing else moves. It is all one transaction in one database,
//!   so there is nothing to reconcile after a crash.
//!
//! Every change of a scope (add, remove, reorder) first locks its row in
//! `queue_scopes`, which hands out the keys: adds and removes of one scope are
//! serialized (so "position = length + 1" on add is exact), and since all of
//! them lock in the same order (scope, then items, then blocks), they cannot
//! deadlock. Readers take no locks.
//!
//! A reorder re-keys the scope by priority (desc), entry time (asc) and old
//! order, into a fresh key range that starts at the next block boundary, and
//! rebuilds the scope's block counts; [`reorder_all`] does that in one
//! statement for every scope that had an add since its last reorder.
//!
//! `position_in_queue` therefore no longer holds the dense position; the views
//! `*_positions` give SQL consumers dense positions (O(n) per scan).
//!
//! # SQL per queue
//! The three tables differ only in names (item column, scope column; the
//! topic queue has no scope column and uses the constant scope `''`), so each
//! statement is written once in [`queue_sql!`] and instantiated per table with
//! `concat!`: every query stays a `&'static str`, no SQL is built at run time.

use serde::Serialize;
use sqlx::PgPool;

use crate::context::Context;
use crate::error::{DbContext, Error, Result, from_sqlx, violated_constraint};
use crate::telemetry::{Operation, Timer};
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

/// The statements of one queue table.
struct QueueSql {
    add: &'static str,
    remove: &'static str,
    position: &'static str,
    list: &'static str,
    lock_scope: &'static str,
    lock_changed_scopes: &'static str,
    rekey: &'static str,
    /// Names of the constraints that mean "already queued".
    duplicate: &'static str,
}

/// Writes each statement once; see the module docs. Arguments: queue name,
/// table, item column, primary key constraint, the scope column for inserts
/// (with its bind, or empty), and the scope expression unqualified and
/// qualified by the aliases `i`, `j` and `q` (a column, or `''` for the topic queue).
macro_rules! queue_sql {
    ($queue:literal, $table:literal, $id:literal, $pkey:literal,
     insert: ($scope_col:literal, $scope_val:literal),
     scope: ($s:literal, $s_i:literal, $s_j:literal, $s_q:literal)) => {
        QueueSql {
            // The scope row hands out the key and counts the item (its lock
            // serializes the scope's changes); then the item; then its block.
            add: concat!(
                "WITH scope AS (
                    INSERT INTO queue_scopes AS s (queue, scope, last_key, item_count, needs_reorder)
                    VALUES ('", $queue, "', $2, 1, 1, true)
                    ON CONFLICT (queue, scope) DO UPDATE
                        SET last_key = s.last_key + 1, item_count = s.item_count + 1, needs_reorder = true
                    RETURNING last_key, item_count
                ), item AS (
                    INSERT INTO ", $table, " (", $id, $scope_col, ", position_in_queue, priority_score)
                    SELECT $1", $scope_val, ", last_key, $3 FROM scope
                    RETURNING entered_queue_at
                ), block AS (
                    INSERT INTO queue_blocks AS b (queue, scope, block, item_count)
                    SELECT '", $queue, "', $2, queue_block(last_key), 1 FROM scope
                    ON CONFLICT (queue, scope, block) DO UPDATE SET item_count = b.item_count + 1
                )
                SELECT scope.item_count AS position, item.entered_queue_at FROM scope, item"
            ),
            // `locked` takes the scope lock before the item's row lock (the
            // order add and reorder use): it feeds a one-time filter that runs
            // before the DELETE scans. The DELETE re-checks the item after the
            // wait, so a concurrent remove of the same item makes this one find
            // nothing; counts change only for a row actually deleted.
            remove: concat!(
                "WITH target AS (
                    SELECT ", $s, " AS scope FROM ", $table, " WHERE ", $id, " = $1
                ), locked AS (
                    SELECT s.scope FROM queue_scopes s JOIN target t ON s.queue = '", $queue, "' AND s.scope = t.scope
                    FOR UPDATE OF s
                ), removed AS (
                    DELETE FROM ", $table, " WHERE ", $id, " = $1 AND EXISTS (SELECT 1 FROM locked)
                    RETURNING ", $s, " AS scope, position_in_queue AS key
                ), counted AS (
                    UPDATE queue_scopes s SET item_count = s.item_count - 1
                    FROM removed r WHERE s.queue = '", $queue, "' AND s.scope = r.scope
                ), block AS (
                    -- An upsert, not an UPDATE: the statement's snapshot predates
                    -- the wait for the scope lock, and an UPDATE would not see a
                    -- block row created meanwhile (by an add or a reorder); the
                    -- conflict check sees the latest committed row.
                    INSERT INTO queue_blocks AS b (queue, scope, block, item_count)
                    SELECT '", $queue, "', r.scope, queue_block(r.key), 0 FROM removed r
                    ON CONFLICT (queue, scope, block) DO UPDATE SET item_count = b.item_count - 1
                )
                SELECT scope FROM removed"
            ),
            // The counts of the blocks before the item's block, plus the
            // item's rank inside its block (a bounded index range scan).
            position: concat!(
                "SELECT ", $s_i, " AS scope, i.priority_score, i.entered_queue_at,
                    (SELECT COALESCE(SUM(b.item_count), 0) FROM queue_blocks b
                      WHERE b.queue = '", $queue, "' AND b.scope = ", $s_i, "
                        AND b.block < queue_block(i.position_in_queue))::BIGINT
                  + (SELECT count(*) FROM ", $table, " j
                      WHERE ", $s_j, " = ", $s_i, "
                        AND j.position_in_queue >= queue_block_first_key(queue_block(i.position_in_queue))
                        AND j.position_in_queue <= i.position_in_queue) AS position
                FROM ", $table, " i WHERE i.", $id, " = $1"
            ),
            list: concat!(
                "SELECT ", $id, " AS content_id,
                        ROW_NUMBER() OVER (ORDER BY position_in_queue) AS position,
                        priority_score, entered_queue_at
                 FROM (SELECT * FROM ", $table, " WHERE ", $s, " = $1
                       ORDER BY position_in_queue LIMIT $2) head
                 ORDER BY position_in_queue"
            ),
            lock_scope: concat!(
                "SELECT scope FROM queue_scopes WHERE queue = '", $queue, "' AND scope = $1 FOR UPDATE"
            ),
            lock_changed_scopes: concat!(
                "SELECT scope FROM queue_scopes WHERE queue = '", $queue, "' AND needs_reorder
                 ORDER BY scope FOR UPDATE"
            ),
            // Runs after the scopes are locked, in a new snapshot that sees
            // every committed change of them. New keys start at the next block
            // boundary above every old key, so the new blocks never collide
            // with the old ones being deleted in the same statement.
            rekey: concat!(
                "WITH target AS (
                    SELECT scope, queue_block_first_key(queue_block(last_key) + 1) - 1 AS base
                    FROM queue_scopes WHERE queue = '", $queue, "' AND scope = ANY($1)
                ), ranked AS (
                    SELECT q.", $id, " AS id, t.base, t.scope,
                           ROW_NUMBER() OVER (PARTITION BY t.scope
                               ORDER BY q.priority_score DESC, q.entered_queue_at ASC, q.position_in_queue ASC) AS rn
                    FROM ", $table, " q JOIN target t ON t.scope = ", $s_q, "
                ), sized AS (
                    SELECT t.scope, t.base, count(r.id) AS n
                    FROM target t LEFT JOIN ranked r ON r.scope = t.scope GROUP BY t.scope, t.base
                ), scopes AS (
                    UPDATE queue_scopes s SET last_key = z.base + z.n, item_count = z.n, needs_reorder = false
                    FROM sized z WHERE s.queue = '", $queue, "' AND s.scope = z.scope
                ), moved AS (
                    UPDATE ", $table, " q SET position_in_queue = r.base + r.rn
                    FROM ranked r WHERE q.", $id, " = r.id
                    RETURNING ", $s_q, " AS scope, q.position_in_queue AS key
                ), cleared AS (
                    DELETE FROM queue_blocks b USING target t WHERE b.queue = '", $queue, "' AND b.scope = t.scope
                ), counted AS (
                    INSERT INTO queue_blocks (queue, scope, block, item_count)
                    SELECT '", $queue, "', scope, queue_block(key), count(*) FROM moved GROUP BY 1, 2, 3
                )
                SELECT (SELECT count(*) FROM target), (SELECT count(*) FROM moved)"
            ),
            duplicate: $pkey,
        }
    };
}

const TOPIC_SQL: QueueSql = queue_sql!(
    "topic", "topic_creation_queue", "topic_id", "topic_creation_queue_pkey",
    insert: ("", ""),
    scope: ("''", "''", "''", "''")
);
const POST_SQL: QueueSql = queue_sql!(
    "post", "post_moderation_queue", "post_id", "post_moderation_queue_pkey",
    insert: (", topic_id", ", $2"),
    scope: ("topic_id", "i.topic_id", "j.topic_id", "q.topic_id")
);
const MESSAGE_SQL: QueueSql = queue_sql!(
    "message", "private_message_queue", "message_id", "private_message_queue_pkey",
    insert: (", conversation_id", ", $2"),
    scope: ("conversation_id", "i.conversation_id", "j.conversation_id", "q.conversation_id")
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
    let timer = Timer::start(Operation::QueueAdd, Some(queue));
    let row: (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(sql(queue).add)
        .bind(item.as_str())
        .bind(scope.key())
        .bind(priority.get())
        .fetch_one(&ctx.pool)
        .await
        .map_err(|e| match violated_constraint(&e) {
            Some(c) if c == sql(queue).duplicate => Error::DuplicateItem {
                queue: queue.as_str(),
                item: item.to_string(),
            },
            _ => from_sqlx("adding to the queue", e),
        })?;
    timer.finish(&ctx.perf, None);
    Ok(Placed {
        queue,
        content_id: item.to_string(),
        scope: scope_name(queue, scope.key().to_owned()),
        position: row.0,
        priority_score: priority.get(),
        entered_queue_at: row.1,
    })
}

/// Removes an item; the items behind it move up by one.
pub async fn remove(ctx: &Context, queue: QueueKind, item: &Ident) -> Result<Removed> {
    let timer = Timer::start(Operation::QueueRemove, Some(queue));
    let scope: Option<String> = sqlx::query_scalar(sql(queue).remove)
        .bind(item.as_str())
        .fetch_optional(&ctx.pool)
        .await
        .db("removing from the queue")?;
    let scope = scope.ok_or_else(|| unknown(queue, item))?;
    timer.finish(&ctx.perf, None);
    Ok(Removed {
        queue,
        content_id: item.to_string(),
        scope: scope_name(queue, scope),
    })
}

/// An item's exact position in its scope.
pub async fn position(ctx: &Context, queue: QueueKind, item: &Ident) -> Result<Placed> {
    let timer = Timer::start(Operation::QueuePosition, Some(queue));
    let row: Option<(String, f64, chrono::DateTime<chrono::Utc>, i64)> =
        sqlx::query_as(sql(queue).position)
            .bind(item.as_str())
            .fetch_optional(&ctx.pool)
            .await
            .db("reading the queue position")?;
    let (scope, priority, entered, position) = row.ok_or_else(|| unknown(queue, item))?;
    timer.finish(&ctx.perf, None);
    Ok(Placed {
        queue,
        content_id: item.to_string(),
        scope: scope_name(queue, scope),
        position,
        priority_score: priority,
        entered_queue_at: entered,
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
    let timer = Timer::start(Operation::QueueList, Some(queue));
    let items: Vec<Item> = sqlx::query_as(sql(queue).list)
        .bind(scope.key())
        .bind(limit)
        .fetch_all(&ctx.pool)
        .await
        .db("listing the queue")?;
    let length = scope_length(&ctx.pool, queue, scope).await?;
    timer.finish(&ctx.perf, None);
    Ok(Listing {
        queue,
        length,
        items,
    })
}

/// How many items a scope holds (from its counter).
pub async fn scope_length(pool: &PgPool, queue: QueueKind, scope: &Scope) -> Result<i64> {
    let n: Option<i64> =
        sqlx::query_scalar("SELECT item_count FROM queue_scopes WHERE queue = $1 AND scope = $2")
            .bind(queue.as_str())
            .bind(scope.key())
            .fetch_optional(pool)
            .await
            .db("reading the queue length")?;
    Ok(n.unwrap_or(0))
}

/// Sorts one scope by priority (desc), then entry time (asc).
pub async fn reorder(ctx: &Context, queue: QueueKind, scope: &Scope) -> Result<Reordered> {
    check_scope(queue, scope)?;
    let timer = Timer::start(Operation::QueueReorder, Some(queue));
    let mut tx = ctx.pool.begin().await.db("starting the reorder")?;
    let locked: Vec<String> = sqlx::query_scalar(sql(queue).lock_scope)
        .bind(scope.key())
        .fetch_all(&mut *tx)
        .await
        .db("locking the queue scope")?;
    let done = rekey(&mut tx, queue, &locked).await?;
    tx.commit().await.db("committing the reorder")?;
    timer.finish(&ctx.perf, None);
    Ok(done)
}

/// Sorts every scope of a queue that had an add since its last reorder, in
/// one transaction; `timeout` bounds it on the server.
pub async fn reorder_all(
    ctx: &Context,
    queue: QueueKind,
    timeout: std::time::Duration,
) -> Result<Reordered> {
    let timer = Timer::start(Operation::QueueReorder, Some(queue));
    let mut tx = ctx.pool.begin().await.db("starting the reorder")?;
    crate::db::set_local_timeout(&mut tx, timeout).await?;
    let locked: Vec<String> = sqlx::query_scalar(sql(queue).lock_changed_scopes)
        .fetch_all(&mut *tx)
        .await
        .db("locking changed queue scopes")?;
    let done = rekey(&mut tx, queue, &locked).await?;
    tx.commit().await.db("committing the reorder")?;
    timer.finish(&ctx.perf, None);
    Ok(done)
}

async fn rekey(
    tx: &mut sqlx::PgConnection,
    queue: QueueKind,
    scopes: &[String],
) -> Result<Reordered> {
    if scopes.is_empty() {
        return Ok(Reordered {
            queue,
            scopes: 0,
            items: 0,
        });
    }
    let (scopes, items): (i64, i64) = sqlx::query_as(sql(queue).rekey)
        .bind(scopes)
        .fetch_one(tx)
        .await
        .db("reordering the queue")?;
    Ok(Reordered {
        queue,
        scopes,
        items,
    })
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
