//! The live board: the leaderboard answered from committed scores, in Redis.
//!
//! A sorted set of every user with a positive score, scored by minus the
//! score, each member a [`live_member`] (sign-up time and id in fixed-width
//! hex, so Redis's order among equal scores is the seed's tie-break); beside
//! it a hash of each user's version and member, and its `_ready` field once
//! the board is built. Every score write lands on it in the same Redis round
//! trip as the cache's ([`crate::publish`]), guarded by the score's version,
//! so a late write cannot put an older score back. The daemon builds it from
//! PostgreSQL on start and after Redis lost it ([`build`]); the nightly sweep
//! checks it. Rank and page are O(log n).

use std::sync::LazyLock;

use redis::Pipeline;

use crate::context::Context;
use crate::db;
use crate::error::{DbContext, Error, Result};
use crate::redis_conn::{Lua, Redis, SCRIPT_BATCH};
use crate::score_row::ScoreRow;
use crate::types::UserId;

/// The live board (the leaderboard answered from committed scores): a sorted
/// set of the users with a positive score, scored by minus their score, each
/// a [`live_member`]; beside it a hash of each user's version and member, and
/// its `_ready` field once the daemon built the board. Sets each user of the
/// call unless the hash holds a newer version (an equal one overwrites: the
/// database is the authority at that version). KEYS: the set, the hash.
/// ARGV: user id, member, score, version of each user.
const LIVE_SET: &str = r#"
local n = 0
for i = 1, #ARGV, 4 do
  local user, member, score, version = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local cur = redis.call('HGET', KEYS[2], user)
  local newer = false
  if cur then
    local sep = string.find(cur, ' ')
    if tonumber(string.sub(cur, 1, sep - 1)) > tonumber(version) then
      newer = true
    else
      local old = string.sub(cur, sep + 1)
      if old ~= member then
        redis.call('ZREM', KEYS[1], old)
      end
    end
  end
  if not newer then
    redis.call('HSET', KEYS[2], user, version .. ' ' .. member)
    if score > 0 then
      redis.call('ZADD', KEYS[1], -score, member)
    else
      redis.call('ZREM', KEYS[1], member)
    end
    n = n + 1
  end
end
return n
"#;

/// The read contract of live standing for every client language: a Redis
/// function library (`loyaltyd_rank`, `loyaltyd_page`), documented in its
/// source. loyaltyd's own reads call it too: one definition of a rank.
const LIBRARY: &str = include_str!("live.lua");

/// The ids of users whose place on the live board differs from the
/// database's: KEYS: the set, the hash. ARGV: (user id, member, score) for
/// each user checked.
const LIVE_CHECK: &str = r#"
local bad = {}
for i = 1, #ARGV, 3 do
  local z = redis.call('ZSCORE', KEYS[1], ARGV[i + 1])
  local score = tonumber(ARGV[i + 2])
  if score > 0 then
    if (not z) or tonumber(z) ~= -score then
      table.insert(bad, ARGV[i])
    end
  elseif z then
    table.insert(bad, ARGV[i])
  end
end
return bad
"#;

static LIVE_SET_SCRIPT: LazyLock<Lua> = LazyLock::new(|| Lua::new(LIVE_SET));
static LIBRARY_LUA: LazyLock<Lua> = LazyLock::new(|| Lua::library("loyaltyd", LIBRARY));
static LIVE_CHECK_SCRIPT: LazyLock<Lua> = LazyLock::new(|| Lua::new(LIVE_CHECK));

/// The script a score write runs on the board, for loading it where a
/// write pipeline is composed (see [`Redis::exec_pipeline`]).
pub fn write_script() -> &'static Lua {
    &LIVE_SET_SCRIPT
}

/// A user's place on the live board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveRank {
    /// Ranked: the 1-based rank, the score, and how many users are ranked.
    Ranked {
        /// 1-based rank.
        rank: i64,
        /// The score the rank is for.
        score: i64,
        /// Users with a positive score.
        ranked: i64,
    },
    /// Not on the board (a score of zero or less, or not written since the
    /// board was built); how many users are ranked.
    Unranked {
        /// Users with a positive score.
        ranked: i64,
    },
}

/// The member of a user in the live board's sorted set: sign-up time, then
/// id, as fixed-width hex, so that Redis's order among equal scores (the
/// member's bytes) is the seed's tie-break (earlier sign-up first, then id).
pub fn live_member(user: UserId, created_us: i64) -> String {
    let time = (i128::from(created_us) + (1i128 << 62)).clamp(0, i128::from(u64::MAX)) as u64;
    format!("{time:016x}{:016x}", user.get() as u64)
}

/// The user id in a live board member.
pub fn live_member_user(member: &str) -> Option<UserId> {
    let id = i64::from_str_radix(member.get(16..32)?, 16).ok()?;
    UserId::new(id).ok()
}

/// The live board's keys and commands, on the shared Redis runner.
#[derive(Clone)]
pub struct Board {
    redis: Redis,
}

impl Board {
    /// The board on `redis`.
    pub fn new(redis: &Redis) -> Board {
        Board {
            redis: redis.clone(),
        }
    }

    /// `leaderboard:live`: the live board's sorted set.
    pub fn key(&self) -> String {
        if self.redis.is_cluster() {
            self.redis.key("{leaderboard:live}")
        } else {
            self.redis.key("leaderboard:live")
        }
    }

    /// `leaderboard:live:users`: each user's version and member, and `_ready`.
    pub fn users_key(&self) -> String {
        if self.redis.is_cluster() {
            self.redis.key("{leaderboard:live}:users")
        } else {
            self.redis.key("leaderboard:live:users")
        }
    }

    /// Queues [`LIVE_SET`] calls for `scores` on a pipeline: one per
    /// [`SCRIPT_BATCH`] users (the board's two keys share a slot).
    pub fn add_set(&self, pipe: &mut Pipeline, scores: &[ScoreRow]) {
        for chunk in scores.chunks(SCRIPT_BATCH) {
            let call = pipe
                .cmd("EVALSHA")
                .arg(LIVE_SET_SCRIPT.get_hash())
                .arg(2)
                .arg(self.key())
                .arg(self.users_key());
            for s in chunk {
                call.arg(s.user.get())
                    .arg(live_member(s.user, s.created_us))
                    .arg(s.score)
                    .arg(s.version);
            }
            call.ignore();
        }
    }

    /// Writes users onto the live board (whatever `leaderboard.live` says:
    /// the daemon's build and the sweep's repair); false when Redis is away.
    pub async fn set(&self, scores: &[ScoreRow]) -> bool {
        if scores.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        self.add_set(&mut pipe, scores);
        self.redis
            .exec_pipeline("EVALSHA", &pipe, true, &[&LIVE_SET_SCRIPT])
            .await
    }

    /// Whether the live board is built (`None`: Redis is away).
    pub async fn ready(&self) -> Option<bool> {
        let cmd = redis::cmd("HGET")
            .arg(self.users_key())
            .arg("_ready")
            .to_owned();
        let v: Option<String> = self.redis.query("HGET", cmd).await?;
        Some(v.as_deref() == Some("1"))
    }

    /// Marks the live board built (or, with `false`, to be built again).
    pub async fn mark_ready(&self, ready: bool) -> bool {
        let cmd = if ready {
            redis::cmd("HSET")
                .arg(self.users_key())
                .arg("_ready")
                .arg("1")
                .to_owned()
        } else {
            redis::cmd("HDEL")
                .arg(self.users_key())
                .arg("_ready")
                .to_owned()
        };
        self.redis.query::<i64>("HSET", cmd).await.is_some()
    }

    /// The users among `scores` whose place on the live board differs from
    /// theirs (`None`: Redis is away).
    pub async fn differing(&self, scores: &[ScoreRow]) -> Option<Vec<UserId>> {
        if scores.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        let call = pipe
            .cmd("EVALSHA")
            .arg(LIVE_CHECK_SCRIPT.get_hash())
            .arg(2)
            .arg(self.key())
            .arg(self.users_key());
        for s in scores {
            call.arg(s.user.get())
                .arg(live_member(s.user, s.created_us))
                .arg(s.score);
        }
        let (ids,): (Vec<i64>,) = self
            .redis
            .query_pipeline("EVALSHA", &pipe, false, &[&LIVE_CHECK_SCRIPT])
            .await?;
        Some(
            ids.into_iter()
                .filter_map(|id| UserId::new(id).ok())
                .collect(),
        )
    }

    /// Up to about `count` members of the live board from `cursor` on (a
    /// ZSCAN step): the next cursor (0 at the end) and (user, member) pairs.
    pub async fn scan(&self, cursor: u64, count: u32) -> Option<(u64, Vec<(UserId, String)>)> {
        let cmd = redis::cmd("ZSCAN")
            .arg(self.key())
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .to_owned();
        let (next, items): (u64, Vec<String>) = self.redis.query("ZSCAN", cmd).await?;
        // Members and scores alternate.
        let users = items
            .into_iter()
            .step_by(2)
            .filter_map(|m| Some((live_member_user(&m)?, m)))
            .collect();
        Some((next, users))
    }

    /// Takes users the database no longer has off the live board (no write
    /// can bring them back: a write needs the user's row); false when Redis
    /// is away.
    pub async fn remove(&self, users: &[(UserId, String)]) -> bool {
        if users.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let members: Vec<&str> = users.iter().map(|(_, m)| m.as_str()).collect();
        let ids: Vec<i64> = users.iter().map(|(u, _)| u.get()).collect();
        pipe.zrem(self.key(), members).ignore();
        pipe.hdel(self.users_key(), ids).ignore();
        self.redis.exec_pipeline("ZREM", &pipe, false, &[]).await
    }

    /// How many users the live board ranks (`None`: Redis is away).
    pub async fn count(&self) -> Option<i64> {
        let cmd = redis::cmd("ZCARD").arg(self.key()).to_owned();
        self.redis.query("ZCARD", cmd).await
    }

    /// Loads the read library where Redis lacks it (`replace`: whatever
    /// Redis has, as after an upgrade); false when Redis is away. The daemon
    /// calls it on start and every few seconds, so that other clients find
    /// it after a Redis restart or a failover.
    pub async fn ensure_library(&self, replace: bool) -> bool {
        self.redis.ensure_library(&LIBRARY_LUA, replace).await
    }

    /// Calls one of the library's functions (`FCALL_RO`) on the board.
    async fn fcall(&self, function: &str, args: &[i64]) -> Option<Vec<redis::Value>> {
        let mut pipe = redis::pipe();
        pipe.cmd("FCALL_RO")
            .arg(function)
            .arg(2)
            .arg(self.key())
            .arg(self.users_key())
            .arg(args);
        let (reply,): (Vec<redis::Value>,) = self
            .redis
            .query_pipeline("FCALL_RO", &pipe, false, &[&LIBRARY_LUA])
            .await?;
        Some(reply)
    }

    /// A user's place on the live board; `None` when the board is not built
    /// or Redis is away (the caller reads the view instead).
    pub async fn rank(&self, user: UserId) -> Option<LiveRank> {
        let reply = self.fcall("loyaltyd_rank", &[user.get()]).await?;
        let int = |i: usize| match reply.get(i) {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        };
        match int(0)? {
            -2 => None,
            0 => Some(LiveRank::Unranked { ranked: int(1)? }),
            rank => Some(LiveRank::Ranked {
                rank,
                score: int(1)?,
                ranked: int(2)?,
            }),
        }
    }

    /// A page of the live board: how many users it ranks, and (user, score)
    /// from rank `offset + 1` on; `None` when the board is not built or Redis
    /// is away.
    pub async fn page(&self, offset: i64, limit: i64) -> Option<(i64, Vec<(UserId, i64)>)> {
        let reply = self.fcall("loyaltyd_page", &[offset, limit]).await?;
        let mut items = reply.into_iter();
        let ranked = match items.next()? {
            redis::Value::Int(-2) => return None,
            redis::Value::Int(n) => n,
            _ => return None,
        };
        let mut page = Vec::new();
        while let (Some(_rank), Some(id), Some(score)) = (items.next(), items.next(), items.next())
        {
            let (redis::Value::BulkString(id), redis::Value::Int(score)) = (id, score) else {
                return None;
            };
            let user = std::str::from_utf8(&id).ok()?.parse::<UserId>().ok()?;
            page.push((user, score));
        }
        Some((ranked, page))
    }
}

/// A build's Redis write, tried again after a miss (one slow moment must
/// not throw away a build of millions; every write is version-guarded, so a
/// repeat is harmless): up to five tries, a second apart (the cache's own
/// back-off after a failure). A macro, not a function over an async closure:
/// the daemon spawns the build, and such closures' futures are not `Send`.
macro_rules! retried {
    ($write:expr) => {{
        let mut done = false;
        for attempt in 1..=5 {
            if $write {
                done = true;
                break;
            }
            if attempt < 5 {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        done
    }};
}

/// Builds the live board from PostgreSQL: clears it, writes every user with
/// a positive score in batches (each write guarded by its version, so a
/// score written meanwhile is never overwritten by the older one read here),
/// then marks it built. Until then readers use the view. Returns the users
/// written.
#[tracing::instrument(name = "live_board_build", skip_all)]
pub async fn build(ctx: &Context) -> Result<u64> {
    use futures_util::TryStreamExt;
    let unavailable = || Error::Runtime("Redis unavailable: the live board is not built".into());
    let board = Board::new(&ctx.redis);
    let keys = [board.key(), board.users_key()];
    if !retried!(ctx.redis.delete(&keys).await) {
        return Err(unavailable());
    }
    let mut tx = ctx
        .pool
        .begin()
        .await
        .db("starting the live board's build")?;
    db::set_local_timeout(&mut tx, ctx.config.sweep.timeout).await?;
    let mut written = 0u64;
    {
        let mut chunks = sqlx::query_as::<_, ScoreRow>(concat!(
            "SELECT ",
            crate::score_row_columns!(),
            " FROM users WHERE loyalty_score > 0"
        ))
        .fetch(&mut *tx)
        .try_chunks(BOARD_BATCH);
        while let Some(chunk) = chunks
            .try_next()
            .await
            .map_err(|e| e.1)
            .db("reading scores for the live board")?
        {
            let batch = chunk;
            if !retried!(board.set(&batch).await) {
                return Err(unavailable());
            }
            written += batch.len() as u64;
        }
    }
    crate::db::rollback(tx).await;
    if !retried!(board.mark_ready(true).await) {
        return Err(unavailable());
    }
    Ok(written)
}

/// Users written to the live board per pipeline.
const BOARD_BATCH: usize = 5_000;
