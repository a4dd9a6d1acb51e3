//! `demo seed`: a synthetic forum, for trying loyaltyd out and for benchmarks.
//!
//! Everything is set-based (`INSERT ... SELECT FROM generate_series`), in
//! chunks so progress can be shown: users with readable names and sign-up
//! times spread over three years; events skewed towards a few very active
//! users, with a realistic mix of content types and outcomes; and queue items
//! appended behind whatever the queues already hold. It adds to what is there,
//! never replaces. Events and queue items are plain INSERTs: the triggers of
//! the SQL contract score them, count them and key them, exactly as for any
//! other writer (so demo data written beside live writers stays exact).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use serde::Serialize;
use sqlx::PgConnection;

use crate::context::Context;
use crate::error::{DbContext, Error, Result};
use crate::leaderboard;

/// Events inserted per statement (one progress line each).
const EVENT_CHUNK: i64 = 250_000;
/// Largest amounts accepted, to keep a typo from filling the disk.
const MAX_USERS: i64 = 50_000_000;
const MAX_EVENTS: i64 = 1_000_000_000;
const MAX_QUEUE_ITEMS: i64 = 10_000_000;

/// What `demo seed` wrote.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeedReport {
    /// Users created.
    pub users: i64,
    /// Events recorded.
    pub events: i64,
    /// Items added to each queue.
    pub queue_items: i64,
    /// Wall time, in seconds.
    pub seconds: f64,
}

/// Writes `users` users, `events` events over them, and `queue_items` items
/// into each queue. Progress goes to stderr when `progress` is true.
pub async fn seed(
    ctx: &Context,
    users: i64,
    events: i64,
    queue_items: i64,
    progress: bool,
) -> Result<SeedReport> {
    check("--users", users, MAX_USERS)?;
    check("--events", events, MAX_EVENTS)?;
    check("--queue-items", queue_items, MAX_QUEUE_ITEMS)?;
    if events > 0 && users == 0 {
        return Err(Error::invalid(
            "--events",
            "events need users to belong to: give --users too",
        ));
    }
    let started = Instant::now();
    let say = |msg: String| {
        if progress {
            crate::log_output::say(&format!(
                "demo seed: {msg} ({:.1}s)",
                started.elapsed().as_secs_f64()
            ));
        }
    };
    // A connection of its own (closed afterwards): bulk loading does not need
    // to wait for the WAL flush of every chunk, and is not a request bound by
    // `database.statement_timeout` (ten million users are one statement of
    // a minute or more); an operator stops it with Ctrl-C.
    let mut conn = ctx.pool.acquire().await.db("connecting")?.detach();
    bulk_session(&mut conn).await?;
    if users > 0 {
        let first = seed_users(&mut conn, users).await?;
        say(format!("{users} users"));
        if events > 0 {
            seed_events(&ctx.pool, first, users, events, &say).await?;
            sqlx::query("VACUUM (ANALYZE) moderation_events")
                .execute(&mut conn)
                .await
                .db("vacuuming events")?;
        }
        sqlx::query("VACUUM (ANALYZE) users")
            .execute(&mut conn)
            .await
            .db("vacuuming users")?;
    }
    if queue_items > 0 {
        seed_queues(&mut conn, queue_items).await?;
        say(format!("{queue_items} items in each queue"));
    }
    drop(conn);
    if users > 0 {
        leaderboard::refresh(ctx, true, &tokio_util::sync::CancellationToken::new()).await?;
        say("leaderboard refreshed".into());
        // Bulk scores went past Redis: the daemon builds the live board anew
        // (a no-op when Redis is away; readers use the view meanwhile).
        crate::leaderboard::live::Board::new(&ctx.redis)
            .mark_ready(false)
            .await;
    }
    Ok(SeedReport {
        users,
        events,
        queue_items,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A bulk-load session: no wait for the WAL flush of each commit, no
/// request statement limit.
async fn bulk_session(conn: &mut PgConnection) -> Result<()> {
    sqlx::raw_sql("SET synchronous_commit = off; SET statement_timeout = 0")
        .execute(conn)
        .await
        .db("preparing the bulk load")?;
    Ok(())
}

fn check(what: &'static str, n: i64, max: i64) -> Result<()> {
    if (0..=max).contains(&n) {
        Ok(())
    } else {
        Err(Error::invalid(what, format!("{n} is outside 0 to {max}")))
    }
}

/// Creates users after the highest existing id; returns the first new id.
async fn seed_users(conn: &mut PgConnection, n: i64) -> Result<i64> {
    const SQL: &str = r#"
        WITH base AS (
            SELECT COALESCE(max(id), 0) AS id FROM users
        ), created AS (
            INSERT INTO users (id, username, created_at, updated_at)
            SELECT base.id + g,
                   (ARRAY['quiet','brisk','amber','lucid','mellow','rapid','stoic','witty',
                          'civic','dusty','eager','fuzzy','gentle','hardy','ivory','jolly'])[1 + (g * 7) % 16]
                   || '_' ||
                   (ARRAY['otter','heron','maple','comet','badger','lynx','falcon','cedar',
                          'walrus','ember','pixel','quartz','raven','tundra','vortex','wren'])[1 + (g / 16) % 16]
                   || '_' || (base.id + g),
                   -- Sign-ups spread over three years (distinct in practice).
                   now() - random() * interval '1095 days',
                   now()
            FROM base, generate_series(1, $1) AS g
            RETURNING id
        )
        SELECT min(id) FROM created
    "#;
    let first: Option<i64> = sqlx::query_scalar(SQL)
        .bind(n)
        .fetch_one(&mut *conn)
        .await
        .db("creating demo users")?;
    first.ok_or_else(|| Error::Runtime("no demo users were created".into()))
}

/// Records `n` events over users `first .. first + users`, then sets their
/// scores from the events. Index maintenance makes the insert CPU-bound, so
/// two connections insert chunks side by side.
async fn seed_events(
    pool: &sqlx::PgPool,
    first: i64,
    users: i64,
    n: i64,
    say: &impl Fn(String),
) -> Result<()> {
    // random()^2 skews activity: low ids are the forum's regulars. The mix:
    // 70 % posts, 10 % topics, 20 % private messages; 80 % approved,
    // 15 % rejected, 5 % calibrated.
    const SQL: &str = r#"
        INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome, created_at)
        SELECT $1 + floor($2 * r.who * r.who)::BIGINT,
               'moderation_decision',
               CASE WHEN r.kind < 0.70 THEN 'post' WHEN r.kind < 0.80 THEN 'topic' ELSE 'private_message' END,
               'demo-' || $5 || '-' || g,
               CASE WHEN r.verdict < 0.80 THEN 'approved' WHEN r.verdict < 0.95 THEN 'rejected' ELSE 'calibrated' END,
               now() - random() * interval '1095 days'
        FROM generate_series($3, $4) AS g,
             LATERAL (SELECT random() AS who, random() AS kind, random() AS verdict, g AS dep) AS r
    "#;
    let tag = run_tag();
    let next = AtomicI64::new(0);
    let done = AtomicI64::new(0);
    let worker = || async {
        let mut conn = pool.acquire().await.db("connecting")?.detach();
        bulk_session(&mut conn).await?;
        loop {
            let start = next.fetch_add(EVENT_CHUNK, Ordering::Relaxed);
            if start >= n {
                return Ok::<(), Error>(());
            }
            let upto = (start + EVENT_CHUNK).min(n);
            sqlx::query(SQL)
                .bind(first)
                .bind(users)
                .bind(start + 1)
                .bind(upto)
                .bind(&tag)
                .execute(&mut conn)
                .await
                .db("recording demo events")?;
            let total = done.fetch_add(upto - start, Ordering::Relaxed) + (upto - start);
            say(format!("{total}/{n} events"));
        }
    };
    tokio::try_join!(worker(), worker())?;
    Ok(())
}

/// Appends `n` items to each queue: the global topic queue; posts over n/20
/// topics; messages over n/5 conversations. Plain INSERTs: the queues' triggers
/// give every item its scope's tail key and count it, as for any writer.
async fn seed_queues(conn: &mut PgConnection, n: i64) -> Result<()> {
    // Priorities 0..100 in steps of 0.5 (many ties, as in life); entry times
    // 10 ms apart, oldest first.
    const TOPIC: &str =
        "INSERT INTO topic_creation_queue (topic_id, priority_score, entered_queue_at)
         SELECT 'demo-topic-' || $1 || '-' || g, round(random() * 200) / 2,
                now() - ($2 - g) * interval '10 ms'
         FROM generate_series(1, $2) AS g";
    const POST: &str =
        "INSERT INTO post_moderation_queue (post_id, topic_id, priority_score, entered_queue_at)
         SELECT 'demo-post-' || $1 || '-' || g, 'demo-topic-' || $1 || '-' || (1 + g % $3),
                round(random() * 200) / 2, now() - ($2 - g) * interval '10 ms'
         FROM generate_series(1, $2) AS g
         ORDER BY 1 + g % $3, g";
    const MESSAGE: &str = "INSERT INTO private_message_queue (message_id, conversation_id, priority_score, entered_queue_at)
         SELECT 'demo-message-' || $1 || '-' || g, 'demo-conversation-' || $1 || '-' || (1 + g % $3),
                round(random() * 200) / 2, now() - ($2 - g) * interval '10 ms'
         FROM generate_series(1, $2) AS g
         ORDER BY 1 + g % $3, g";
    let tag = run_tag();
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .db("starting the queue load")?;
    // Rows in scope order: each scope's lock is taken once, in order.
    for (sql, scopes) in [
        (TOPIC, 1),
        (POST, (n / 20).max(1)),
        (MESSAGE, (n / 5).max(1)),
    ] {
        let q = sqlx::query(sql).bind(&tag).bind(n);
        let q = if sql == TOPIC { q } else { q.bind(scopes) };
        q.execute(&mut *tx).await.db("adding demo queue items")?;
    }
    tx.commit().await.db("committing the queue load")?;
    Ok(())
}

/// A tag that keeps this run's content ids apart from earlier runs'.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}", nanos % (1u128 << 40))
}
