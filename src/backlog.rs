//! The forum's traffic and moderation backlog as metrics, whoever writes.
//!
//! Forum writes are plain SQL (or CLI processes that exit), so the daemon's
//! own operation counters cannot see them. The daemon derives them instead,
//! every [`CHECK`], from what the schema already keeps, adding nothing to
//! any write path:
//! - per queue, the items waiting and the longest scope from the counters
//!   (`queue_scope_lengths()`: superblocks and unfolded changes), after
//!   folding the changes written since the last check (sql/queues.sql:
//!   the daemon is what keeps them few), and the oldest item's age from the
//!   queue table (an aggregate over it: a scan of the table, about 10 ms at
//!   100,000 items, every ten seconds);
//! - items added and removed from PostgreSQL's own table statistics
//!   (`pg_stat_user_tables`: kept by the server for every writer; they count
//!   rolled-back writes too and restart from 0 with the statistics);
//! - events committed, by content type and outcome, from the events table
//!   itself: the ids above a floor are read, and each is counted once when
//!   first seen. Ids are handed out at INSERT and committed in any order, so
//!   the floor trails the highest id seen by [`WINDOW`] ids: an event whose
//!   transaction commits after [`WINDOW`] later ids is not counted (a
//!   transaction open that long is an outage of its own).
//!
//! The values are forum-wide: every daemon exports the same ones (aggregate
//! them with `max`, not `sum`).

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::PgPool;

use crate::error::{DbContext, Result};
use crate::telemetry;
use crate::types::QueueKind;

/// How often the daemon reads the backlog and traffic.
pub const CHECK: Duration = Duration::from_secs(10);

/// How far below the highest id seen an event may still commit and be counted.
const WINDOW: i64 = 10_000;

/// Events read per check at most (the rest on the next).
const BATCH: i64 = 200_000;

/// Reads every queue's backlog and its add and remove counts, in one
/// statement, and exports them.
pub async fn observe_queues(pool: &PgPool) -> Result<()> {
    // The queues' changes into their counters first: one transaction per
    // queue (each scope only if no writer is folding it).
    for queue in QueueKind::ALL {
        sqlx::query("SELECT queue_fold($1)")
            .bind(queue.as_str())
            .execute(pool)
            .await
            .db("folding queue changes")?;
    }
    // Per scope the sum of its blocks, then per queue; beside it each
    // queue's oldest entry time and its table's insert and delete counts.
    const SQL: &str = r#"
        WITH scopes AS (
            SELECT queue, items AS n FROM queue_scope_lengths()
        ), per_queue AS (
            SELECT queue, sum(n)::BIGINT AS items, max(n)::BIGINT AS longest FROM scopes GROUP BY queue
        ), tables (queue, tbl, oldest) AS (
            SELECT 'topic', 'topic_creation_queue'::REGCLASS, (SELECT min(entered_queue_at)::TIMESTAMPTZ FROM topic_creation_queue)
            UNION ALL
            SELECT 'post', 'post_moderation_queue'::REGCLASS, (SELECT min(entered_queue_at)::TIMESTAMPTZ FROM post_moderation_queue)
            UNION ALL
            SELECT 'message', 'private_message_queue'::REGCLASS, (SELECT min(entered_queue_at)::TIMESTAMPTZ FROM private_message_queue)
        )
        SELECT t.queue, COALESCE(p.items, 0), COALESCE(p.longest, 0),
               COALESCE(EXTRACT(EPOCH FROM now() - t.oldest), 0)::FLOAT8,
               COALESCE(s.n_tup_ins, 0), COALESCE(s.n_tup_del, 0)
        FROM tables t
        LEFT JOIN per_queue p ON p.queue = t.queue
        LEFT JOIN pg_stat_user_tables s ON s.relid = t.tbl
    "#;
    let rows: Vec<(String, i64, i64, f64, i64, i64)> = sqlx::query_as(SQL)
        .fetch_all(pool)
        .await
        .db("reading the queues' backlog")?;
    for (name, items, longest, oldest, added, removed) in rows {
        let Some(queue) = QueueKind::ALL.into_iter().find(|q| q.as_str() == name) else {
            continue;
        };
        telemetry::queue_backlog(
            queue,
            items,
            longest,
            Duration::from_secs_f64(oldest.max(0.0)),
        );
        telemetry::queue_changes(queue, added.max(0) as u64, removed.max(0) as u64);
    }
    Ok(())
}

/// Counts committed events once each (see the module docs).
#[derive(Debug, Default)]
pub struct EventCount {
    /// Every id at or below it counted (or there before the daemon started).
    floor: Option<i64>,
    /// Ids above the floor already counted.
    seen: BTreeSet<i64>,
}

impl EventCount {
    /// Reads the events above the floor and counts those not seen yet.
    /// The first call only marks what is there as seen: the counters count
    /// from the daemon's start.
    pub async fn observe(&mut self, pool: &PgPool) -> Result<()> {
        let first = self.floor.is_none();
        let floor = match self.floor {
            Some(f) => f,
            None => {
                let max: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(max(id), 0)::BIGINT FROM moderation_events",
                )
                .fetch_one(pool)
                .await
                .db("reading the newest event")?;
                max - WINDOW
            }
        };
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id::BIGINT, content_type, outcome FROM moderation_events WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(floor)
        .bind(BATCH)
        .fetch_all(pool)
        .await
        .db("reading new events")?;
        let mut counts: std::collections::BTreeMap<(String, String), u64> = Default::default();
        let mut top = floor;
        for (id, content_type, outcome) in rows {
            top = top.max(id);
            if self.seen.insert(id) && !first {
                *counts.entry((content_type, outcome)).or_default() += 1;
            }
        }
        for ((content_type, outcome), n) in counts {
            telemetry::forum_events(&content_type, &outcome, n);
        }
        let floor = floor.max(top - WINDOW);
        self.seen = self.seen.split_off(&(floor + 1));
        self.floor = Some(floor);
        Ok(())
    }
}
