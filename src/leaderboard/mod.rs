//! The leaderboard: exact live ranks from Redis, and the seed's materialized
//! view for SQL consumers, refreshed only when it is worth it.
//!
//! Reads ([`page`], [`rank`]) answer from the **live board** when it is
//! built ([`live`]: a Redis sorted set of every user with a positive score,
//! in the seed's order, written with every score write and guarded by the
//! score's version; rank and page are O(log n)). Until it is built, or while
//! Redis is away, reads fall back to the view (`source` says which
//! answered). docs/design.md, "The live board", says why this layout;
//! git history has the study behind it.
//!
//! Rooms: [`live`] (the board in Redis and its build), [`refresh`] (the
//! view's debounced refresh); here the reads that choose between them.

pub mod live;
pub mod refresh;

use serde::Serialize;

use crate::context::Context;
use crate::error::{DbContext, Error, Result};
use crate::perf::Timer;
use crate::telemetry::Operation;
use crate::types::UserId;
use live::{Board, LiveRank};

pub use refresh::{RefreshReason, RefreshReport, Status, refresh, should_refresh, status};

/// Largest page `leaderboard show` returns.
pub const MAX_PAGE: i64 = 1000;

/// One row of the leaderboard.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct Entry {
    /// The user.
    pub user_id: i64,
    /// The user's name.
    pub username: String,
    /// The score as of the last refresh.
    pub loyalty_score: i64,
    /// 1-based rank: score descending, then earlier sign-up first.
    pub rank: i64,
    /// True for the top 10 % of ranked users.
    pub can_create_topics: bool,
}

/// A page of the leaderboard.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Page {
    /// The entries, by rank.
    pub entries: Vec<Entry>,
    /// Where they came from.
    pub source: Source,
}

/// One user's standing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Standing {
    /// The user.
    pub user_id: UserId,
    /// The rank, or `None` when the user is not on the board (score ≤ 0, or
    /// not there at the last refresh).
    pub rank: Option<i64>,
    /// The score the rank is based on (the current score when unranked).
    pub loyalty_score: i64,
    /// True for the top 10 % of ranked users.
    pub can_create_topics: bool,
    /// Where the answer came from.
    pub source: Source,
}

/// `rank`'s row: the live score, and the board's rank, score and topic right.
type RankRow = (i64, Option<i64>, Option<i64>, Option<bool>);

/// Where an answer came from.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The live board: committed scores.
    Live,
    /// The view as last refreshed (the live board is off, not built yet, or
    /// Redis is away).
    View,
}

/// Whether a rank is within the topic right: rank <= 10 % of the ranked
/// users (the seed's `rank <= COUNT(*) * 0.1`). The rule's home is SQL's
/// `topic_right()` (sql/leaderboard.sql); this, the live board's library and
/// the view are tested against it (tests/it/leaderboard.rs).
pub fn may_create_topics(rank: i64, ranked: i64) -> bool {
    rank as f64 <= ranked as f64 * 0.1
}

/// A page of the leaderboard: `limit` entries (1 to 1000) after `offset`
/// ranks, from the live board if it is there, else the view.
pub async fn page(ctx: &Context, limit: i64, offset: i64) -> Result<Page> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::invalid(
            "--limit",
            format!("{limit} is outside 1 to {MAX_PAGE}"),
        ));
    }
    if offset < 0 {
        return Err(Error::invalid("--offset", format!("{offset} is negative")));
    }
    let timer = Timer::start(&ctx.perf, Operation::LeaderboardPage, None);
    if ctx.config.leaderboard.live
        && let Some((ranked, board)) = Board::new(&ctx.redis).page(offset, limit).await
    {
        // Ranks, scores and names from the board, in the one call; a name
        // no write told the board yet from PostgreSQL, in one query.
        let ids: Vec<i64> = board
            .iter()
            .filter(|e| e.name.is_empty())
            .map(|e| e.user.get())
            .collect();
        let names: Vec<(i64, String)> = if ids.is_empty() {
            Vec::new()
        } else {
            ctx.replicas
                .read(&ctx.pool, |pool| {
                    let ids = &ids;
                    async move {
                        sqlx::query_as(
                            "SELECT id::BIGINT, username::TEXT FROM users WHERE id = ANY($1)",
                        )
                        .bind(ids)
                        .fetch_all(&pool)
                        .await
                        .db("reading user names")
                    }
                })
                .await?
        };
        let names: std::collections::HashMap<i64, String> = names.into_iter().collect();
        let entries = board
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let rank = offset + i as i64 + 1;
                let username = if e.name.is_empty() {
                    names.get(&e.user.get()).cloned().unwrap_or_default()
                } else {
                    e.name
                };
                Entry {
                    user_id: e.user.get(),
                    username,
                    loyalty_score: e.score,
                    rank,
                    can_create_topics: may_create_topics(rank, ranked),
                }
            })
            .collect();
        timer.ok(None);
        return Ok(Page {
            entries,
            source: Source::Live,
        });
    }
    // Ranks are dense 1..n, so "rank > offset" is OFFSET without reading the
    // skipped rows: an index range scan on idx_leaderboard_rank at any depth.
    let entries: Vec<Entry> = ctx
        .replicas
        .read(&ctx.pool, |pool| async move {
            sqlx::query_as(
                "SELECT user_id::BIGINT, username::TEXT, loyalty_score::BIGINT, rank, can_create_topics \
                 FROM user_leaderboard WHERE rank > $1 ORDER BY rank LIMIT $2",
            )
            .bind(offset)
            .bind(limit)
            .fetch_all(&pool)
            .await
            .db("reading the leaderboard")
        })
        .await?;
    timer.ok(None);
    Ok(Page {
        entries,
        source: Source::View,
    })
}

/// A user's rank, or a clear "not ranked": from the live board if it is
/// there (committed scores), else the view as last refreshed.
pub async fn rank(ctx: &Context, user: UserId) -> Result<Standing> {
    let timer = Timer::start(&ctx.perf, Operation::LeaderboardRank, None);
    if ctx.config.leaderboard.live
        && let Some(place) = Board::new(&ctx.redis).rank(user).await
    {
        let standing = match place {
            LiveRank::Ranked {
                rank,
                score,
                topic_right,
            } => Standing {
                user_id: user,
                rank: Some(rank),
                loyalty_score: score,
                can_create_topics: topic_right,
                source: Source::Live,
            },
            LiveRank::Unranked { .. } => {
                // Not on the board: an unknown user, or a score of 0 or less.
                let score: Option<i64> =
                    sqlx::query_scalar("SELECT loyalty_score::BIGINT FROM users WHERE id = $1")
                        .bind(user.get())
                        .fetch_optional(&ctx.pool)
                        .await
                        .db("reading the score")?;
                Standing {
                    user_id: user,
                    rank: None,
                    loyalty_score: score.ok_or(Error::UnknownUser(user.get()))?,
                    can_create_topics: false,
                    source: Source::Live,
                }
            }
        };
        timer.ok(Some(user));
        return Ok(standing);
    }
    // One round trip tells both "is the user known" and "are they on the board".
    let row: Option<RankRow> = ctx
        .replicas
        .read(&ctx.pool, |pool| async move {
            sqlx::query_as(
                "SELECT u.loyalty_score::BIGINT, l.rank, l.loyalty_score::BIGINT, l.can_create_topics \
                 FROM users u LEFT JOIN user_leaderboard l ON l.user_id = u.id WHERE u.id = $1",
            )
            .bind(user.get())
            .fetch_optional(&pool)
            .await
            .db("reading the rank")
        })
        .await?;
    let (current, rank, ranked_score, can) = row.ok_or(Error::UnknownUser(user.get()))?;
    timer.ok(Some(user));
    Ok(Standing {
        user_id: user,
        rank,
        loyalty_score: ranked_score.unwrap_or(current),
        can_create_topics: can.unwrap_or(false),
        source: Source::View,
    })
}
