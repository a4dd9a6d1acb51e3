//! `demo seed`: a synthetic forum, for trying loyaltyd out and for benchmarks.
//!
//! Everything is set-based (`INSERT ... SELECT FROM generate_series`), in
//! chunks so progress can be shown: users with readable names and sign-up
//! times spread over three years; events skewed towards a few very active
//! users, with a realistic mix of content types and outcomes; scores set from
//! the events (so a sweep finds no drift); and queue items appended behind
//! whatever the queues already hold. It adds to what is there, never replaces.

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
            eprintln!("demo seed: {msg} ({:.1}s)", started.elapsed().as_secs_f64());
        }
    };
    // A connection of its own (closed afterwards): bulk loading does not need
    // to wait for the WAL flush of every chunk.
    let mut conn = ctx.pool.acquire().await.db("connecting")?.detach();
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await
        .db("preparing the bulk load")?;
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
    }
    Ok(SeedReport {
        users,
        events,
        queue_items,
        seconds: started.elapsed().as_secs_f64(),
    })
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
    let before: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM moderation_events")
        .fetch_one(pool)
        .await
        .db("reading events")?;
    let tag = run_tag();
    let next = AtomicI64::new(0);
    let done = AtomicI64::new(0);
    let worker = || async {
        let mut conn = pool.acquire().await.db("connecting")?.detach();
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut conn)
            .await
            .db("preparing the bulk load")?;
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
    // Scores consistent with the events; the leaderboard sees one change per user.
    sqlx::query(
        r#"WITH sums AS (
               SELECT user_id, SUM(score_delta) AS delta FROM moderation_events WHERE id > $1 GROUP BY user_id
           ), scored AS (
               UPDATE users u SET loyalty_score = u.loyalty_score + s.delta,
                                  score_version = next_score_version(u.score_version), updated_at = now()
               FROM sums s WHERE u.id = s.user_id AND s.delta <> 0
               RETURNING u.id
           )
           UPDATE leaderboard_pending SET changes = changes + (SELECT count(*) FROM scored) WHERE shard = 0"#,
    )
    .bind(before)
    .execute(pool)
    .await
    .db("scoring demo users")?;
    say("scores set from the events".into());
    Ok(())
}

/// Appends `n` items to each queue: the global topic queue; posts over n/20
/// topics; messages over n/5 conversations. Keys, scope counters and block
/// counts are written by the same statement as the items.
async fn seed_queues(conn: &mut PgConnection, n: i64) -> Result<()> {
    // `new` yields (scope, key) of the inserted items; the rest is shared.
    macro_rules! append {
        ($queue:literal, $insert:literal) => {
            concat!(
                "WITH new AS (", $insert, "),
                scopes AS (
                    INSERT INTO queue_scopes AS s (queue, scope, last_key, item_count, needs_reorder)
                    SELECT '", $queue, "', scope, max(key), count(*), true FROM new GROUP BY scope
                    ON CONFLICT (queue, scope) DO UPDATE
                        SET last_key = GREATEST(s.last_key, EXCLUDED.last_key),
                            item_count = s.item_count + EXCLUDED.item_count,
                            needs_reorder = true
                ), blocks AS (
                    INSERT INTO queue_blocks AS b (queue, scope, block, item_count)
                    SELECT '", $queue, "', scope, queue_block(key), count(*) FROM new GROUP BY 1, 2, 3
                    ON CONFLICT (queue, scope, block) DO UPDATE SET item_count = b.item_count + EXCLUDED.item_count
                )
                SELECT count(*) FROM new"
            )
        };
    }
    // Priorities 0..100 in steps of 0.5 (many ties, as in life); entry times
    // 10 ms apart, oldest first.
    const TOPIC: &str = append!(
        "topic",
        "INSERT INTO topic_creation_queue (topic_id, position_in_queue, priority_score, entered_queue_at)
         SELECT 'demo-topic-' || $1 || '-' || g, $3 + g, round(random() * 200) / 2,
                now() - ($2 - g) * interval '10 ms'
         FROM generate_series(1, $2) AS g
         RETURNING ''::TEXT AS scope, position_in_queue AS key"
    );
    const POST: &str = append!(
        "post",
        "INSERT INTO post_moderation_queue (post_id, topic_id, position_in_queue, priority_score, entered_queue_at)
         SELECT 'demo-post-' || $1 || '-' || g, 'demo-topic-' || $1 || '-' || (1 + g % $3), 1 + g / $3,
                round(random() * 200) / 2, now() - ($2 - g) * interval '10 ms'
         FROM generate_series(1, $2) AS g
         RETURNING topic_id AS scope, position_in_queue AS key"
    );
    const MESSAGE: &str = append!(
        "message",
        "INSERT INTO private_message_queue (message_id, conversation_id, position_in_queue, priority_score, entered_queue_at)
         SELECT 'demo-message-' || $1 || '-' || g, 'demo-conversation-' || $1 || '-' || (1 + g % $3), 1 + g / $3,
                round(random() * 200) / 2, now() - ($2 - g) * interval '10 ms'
         FROM generate_series(1, $2) AS g
         RETURNING conversation_id AS scope, position_in_queue AS key"
    );
    let tag = run_tag();
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .db("starting the queue load")?;
    // The global topic scope may hold items: append behind them, under its lock.
    let base: i64 = sqlx::query_scalar(
        "INSERT INTO queue_scopes AS s (queue, scope, last_key, item_count) VALUES ('topic', '', 0, 0)
         ON CONFLICT (queue, scope) DO UPDATE SET last_key = s.last_key RETURNING last_key",
    )
    .fetch_one(&mut *tx)
    .await
    .db("locking the topic queue")?;
    for (sql, third) in [
        (TOPIC, base),
        (POST, (n / 20).max(1)),
        (MESSAGE, (n / 5).max(1)),
    ] {
        sqlx::query(sql)
            .bind(&tag)
            .bind(n)
            .bind(third)
            .execute(&mut *tx)
            .await
            .db("adding demo queue items")?;
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
