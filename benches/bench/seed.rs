//! The seed's algorithms, statement for statement as
//! `seed/database-performance-optimization.md` writes them (each statement
//! its own implicit transaction, as its `db.execute` calls are), so that the
//! benchmark compares loyaltyd with what the design would really cost.

use sqlx::PgPool;

type R<T> = Result<T, String>;

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// `record_moderation_event`: UPDATE ... RETURNING; Redis SET; INSERT the event.
pub async fn record_event(
    pool: &PgPool,
    redis: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    user: i64,
    content_type: &str,
    outcome: &str,
) -> R<i64> {
    let delta: i64 = match (content_type, outcome) {
        (_, "calibrated") => 0,
        ("topic", "approved") => 5,
        ("topic", _) => -5,
        (_, "approved") => 1,
        _ => -1,
    };
    let score: i64 = sqlx::query_scalar(
        "UPDATE users SET loyalty_score = loyalty_score + $1, updated_at = NOW() WHERE id = $2 RETURNING loyalty_score",
    )
    .bind(delta)
    .bind(user)
    .fetch_one(pool)
    .await
    .map_err(e)?;
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}seed:loyalty:{user}"))
        .arg(score)
        .arg("EX")
        .arg(3600)
        .query_async(redis)
        .await
        .map_err(e)?;
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome) VALUES ($1, 'moderation_decision', $2, 'bench', $3)",
    )
    .bind(user)
    .bind(content_type)
    .bind(outcome)
    .execute(pool)
    .await
    .map_err(e)?;
    Ok(score)
}

/// "Before" the seed's optimisation: store the event, then recalculate the
/// score from all of the user's events (its `recalculate_loyalty_score`).
pub async fn record_event_full_recalc(
    pool: &PgPool,
    redis: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    user: i64,
    content_type: &str,
    outcome: &str,
) -> R<i64> {
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome) VALUES ($1, 'moderation_decision', $2, 'bench', $3)",
    )
    .bind(user)
    .bind(content_type)
    .bind(outcome)
    .execute(pool)
    .await
    .map_err(e)?;
    recalc_user(pool, redis, prefix, user).await
}

/// `recalculate_loyalty_score`: GROUP BY content type and outcome, sum in the
/// application, UPDATE, Redis SET.
pub async fn recalc_user(
    pool: &PgPool,
    redis: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    user: i64,
) -> R<i64> {
    let groups: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT content_type, outcome, COUNT(*) as count FROM moderation_events WHERE user_id = $1 GROUP BY content_type, outcome",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .map_err(e)?;
    let mut total = 0i64;
    for (content, outcome, count) in groups {
        let m = if content == "topic" { 5 } else { 1 };
        match outcome.as_str() {
            "approved" => total += m * count,
            "rejected" => total -= m * count,
            _ => {}
        }
    }
    sqlx::query("UPDATE users SET loyalty_score = $1 WHERE id = $2")
        .bind(total)
        .bind(user)
        .execute(pool)
        .await
        .map_err(e)?;
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}seed:loyalty:{user}"))
        .arg(total)
        .arg("EX")
        .arg(3600)
        .query_async(redis)
        .await
        .map_err(e)?;
    Ok(total)
}

/// The seed's topic queue, with its indexes and dense stored positions.
pub const CREATE_QUEUE: &str = "
    CREATE TABLE IF NOT EXISTS seed_topic_creation_queue (
        topic_id TEXT PRIMARY KEY,
        position_in_queue INTEGER NOT NULL,
        priority_score FLOAT8 DEFAULT 0,
        entered_queue_at TIMESTAMPTZ DEFAULT NOW()
    );
    CREATE INDEX IF NOT EXISTS seed_idx_topic_queue_position ON seed_topic_creation_queue (position_in_queue);
    CREATE INDEX IF NOT EXISTS seed_idx_topic_queue_priority ON seed_topic_creation_queue (priority_score DESC, entered_queue_at ASC);
";

/// `add_to_queue`: MAX + 1, then INSERT.
pub async fn queue_add(pool: &PgPool, id: &str, priority: f64) -> R<i64> {
    let next: i32 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(position_in_queue), 0) + 1 as next_position FROM seed_topic_creation_queue",
    )
    .fetch_one(pool)
    .await
    .map_err(e)?;
    sqlx::query(
        "INSERT INTO seed_topic_creation_queue (topic_id, position_in_queue, priority_score, entered_queue_at) VALUES ($1, $2, $3, NOW())",
    )
    .bind(id)
    .bind(next)
    .bind(priority)
    .execute(pool)
    .await
    .map_err(e)?;
    Ok(i64::from(next))
}

/// `remove_from_queue`: DELETE ... RETURNING, then shift every later item.
pub async fn queue_remove(pool: &PgPool, id: &str) -> R<()> {
    let removed: Option<i32> = sqlx::query_scalar(
        "DELETE FROM seed_topic_creation_queue WHERE topic_id = $1 RETURNING position_in_queue",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(e)?;
    if let Some(p) = removed {
        sqlx::query("UPDATE seed_topic_creation_queue SET position_in_queue = position_in_queue - 1 WHERE position_in_queue > $1")
            .bind(p)
            .execute(pool)
            .await
            .map_err(e)?;
    }
    Ok(())
}

/// A position read: the stored column.
pub async fn queue_position(pool: &PgPool, id: &str) -> R<i64> {
    let p: i32 = sqlx::query_scalar(
        "SELECT position_in_queue FROM seed_topic_creation_queue WHERE topic_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .map_err(e)?;
    Ok(i64::from(p))
}

/// `reorder_queue_by_priority` for the topic queue.
pub async fn queue_reorder(pool: &PgPool) -> R<()> {
    sqlx::query(
        "UPDATE seed_topic_creation_queue
         SET position_in_queue = new_positions.new_position
         FROM (
             SELECT topic_id,
                    ROW_NUMBER() OVER (ORDER BY priority_score DESC, entered_queue_at ASC) as new_position
             FROM seed_topic_creation_queue
         ) new_positions
         WHERE seed_topic_creation_queue.topic_id = new_positions.topic_id",
    )
    .execute(pool)
    .await
    .map_err(e)?;
    Ok(())
}

/// The seed's `track_*_performance`: LPUSH then LTRIM, two round trips, on the request path.
pub async fn track(
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    duration_ms: f64,
) -> R<()> {
    let entry = format!("{{\"duration_ms\": {duration_ms}, \"timestamp\": 0}}");
    let _: i64 = redis::cmd("LPUSH")
        .arg(key)
        .arg(entry)
        .query_async(redis)
        .await
        .map_err(e)?;
    let _: () = redis::cmd("LTRIM")
        .arg(key)
        .arg(0)
        .arg(999)
        .query_async(redis)
        .await
        .map_err(e)?;
    Ok(())
}

/// A leaderboard page without the view: rank everyone, then page.
pub async fn page_without_view(pool: &PgPool, limit: i64, offset: i64) -> R<usize> {
    let rows: Vec<(i64, String, i64, i64)> = sqlx::query_as(
        "SELECT user_id, username, loyalty_score, rank FROM (
             SELECT u.id AS user_id, u.username, u.loyalty_score,
                    ROW_NUMBER() OVER (ORDER BY u.loyalty_score DESC, u.created_at ASC) AS rank
             FROM users u WHERE u.loyalty_score > 0
         ) ranked ORDER BY rank LIMIT $1 OFFSET $2",
    )
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await
    .map_err(e)?;
    Ok(rows.len())
}

/// A user's rank without the view.
pub async fn rank_without_view(pool: &PgPool, user: i64) -> R<Option<i64>> {
    sqlx::query_scalar(
        "SELECT rank FROM (
             SELECT u.id, ROW_NUMBER() OVER (ORDER BY u.loyalty_score DESC, u.created_at ASC) AS rank
             FROM users u WHERE u.loyalty_score > 0
         ) ranked WHERE id = $1",
    )
    .bind(user)
    .fetch_optional(pool)
    .await
    .map_err(e)
}
