//! The live board: the leaderboard answered from committed scores, in Redis.
//!
//! A Redis function library (`live.lua`, loaded as `loyaltyd`, or
//! `loyaltyd_<prefix>` for a deployment with a key prefix: see
//! [`library_name`]) holds the whole board: its layout (a sorted set whose
//! members are each user's sign-up time, id and name, so a page is one
//! `ZRANGE`; each user's version and member in small bucket hashes),
//! loyaltyd's writes and checks, and the reads every client calls
//! (`loyaltyd_rank`, `loyaltyd_page`), so there is one definition of a rank
//! for loyaltyd and for a forum in any language.
//! Every score write lands on the board in the same Redis round trip as the
//! cache's ([`crate::publish`]), guarded by the score's version, so a late
//! write cannot put an older score back. The daemon builds it from
//! PostgreSQL on start and after Redis lost it ([`build`]); the nightly
//! sweep checks it, names included. Rank and page are O(log n).

use std::collections::HashMap;
use std::sync::Mutex;

use redis::Pipeline;

use crate::context::Context;
use crate::db;
use crate::error::{DbContext, Error, Result};
use crate::redis_runner::{Lua, Redis, SCRIPT_BATCH};
use crate::score_row::ScoreRow;
use crate::types::UserId;

/// The library's source (its header documents the layout and the contract).
const LIBRARY: &str = include_str!("live.lua");

/// The library's name for a deployment of key prefix `prefix`: `loyaltyd`
/// for none, else `loyaltyd_` and the prefix (its characters outside
/// `[A-Za-z0-9_]` as `_`, the separators at its ends left off). Its
/// functions are named after it: `<name>_rank`, `<name>_page`, …; two
/// deployments on one Redis (production and staging) each load and call
/// their own.
pub fn library_name(prefix: &str) -> String {
    let tag: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match tag.trim_matches('_') {
        "" => "loyaltyd".to_owned(),
        tag => format!("loyaltyd_{tag}"),
    }
}

/// The library of a deployment, named by [`library_name`]: live.lua with
/// its names given (one per prefix this process uses, kept for its life).
pub fn library(redis: &Redis) -> &'static Lua {
    static LIBRARIES: Mutex<Option<HashMap<String, &'static Lua>>> = Mutex::new(None);
    let name = library_name(redis.prefix());
    let mut libraries = LIBRARIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    libraries
        .get_or_insert_with(HashMap::new)
        .get(&name)
        .copied()
        .unwrap_or_else(|| {
            let source = LIBRARY
                .replacen("#!lua name=loyaltyd", &format!("#!lua name={name}"), 1)
                .replace("'loyaltyd_", &format!("'{name}_"));
            let lua: &'static Lua = Box::leak(Box::new(Lua::library(
                Box::leak(name.clone().into_boxed_str()),
                Box::leak(source.into_boxed_str()),
            )));
            libraries.get_or_insert_with(HashMap::new).insert(name, lua);
            lua
        })
}

/// A user's place on the live board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveRank {
    /// Ranked: the 1-based rank, the score, and the topic right the
    /// library gives it.
    Ranked {
        /// 1-based rank.
        rank: i64,
        /// The score the rank is for.
        score: i64,
        /// Within the topic right (the library's answer).
        topic_right: bool,
    },
    /// Not on the board (a score of zero or less, or not written since the
    /// board was built); how many users are ranked.
    Unranked {
        /// Users with a positive score.
        ranked: i64,
    },
}

/// One entry of a page of the live board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEntry {
    /// The user.
    pub user: UserId,
    /// The score.
    pub score: i64,
    /// The user name as the board has it (empty when no write told it yet).
    pub name: String,
}

/// A user's key on the live board: the sign-up time (microseconds + 2^62,
/// so any time sorts as unsigned, 8 bytes big-endian), the id's length in
/// bytes and the id (big-endian, without leading zero bytes), so that
/// Redis's order among equal scores (the member's bytes) is the seed's
/// tie-break (earlier sign-up first, then id). The member is the key and
/// then the user name (see `live.lua`).
pub fn live_key(user: UserId, created_us: i64) -> Vec<u8> {
    let time = (i128::from(created_us) + (1i128 << 62)).clamp(0, i128::from(u64::MAX)) as u64;
    let id = (user.get() as u64).to_be_bytes();
    let skip = id.iter().take_while(|&&b| b == 0).count().min(7);
    let mut key = Vec::with_capacity(17);
    key.extend_from_slice(&time.to_be_bytes());
    key.push((8 - skip) as u8);
    key.extend_from_slice(&id[skip..]);
    key
}

/// A user's member in the live board's sorted set: the key, then the name.
pub fn live_member(user: UserId, created_us: i64, name: &str) -> Vec<u8> {
    let mut member = live_key(user, created_us);
    member.extend_from_slice(name.as_bytes());
    member
}

/// The user id in a live board member.
pub fn live_member_user(member: &[u8]) -> Option<UserId> {
    let len = usize::from(*member.get(8)?);
    let bytes = member.get(9..9 + len).filter(|_| (1..=8).contains(&len))?;
    let id = bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
    UserId::new(i64::try_from(id).ok()?).ok()
}

/// The live board's keys and commands, on the shared Redis runner.
#[derive(Clone)]
pub struct Board {
    redis: Redis,
    /// The deployment's library ([`library`]).
    library: &'static Lua,
}

impl Board {
    /// The board on `redis`.
    pub fn new(redis: &Redis) -> Board {
        Board {
            redis: redis.clone(),
            library: library(redis),
        }
    }

    /// The library's function `function` (`rank`, `set`, …) of this
    /// deployment.
    fn function(&self, function: &str) -> String {
        format!("{}_{function}", library_name(self.redis.prefix()))
    }

    /// `leaderboard:live`: the live board's sorted set.
    pub fn key(&self) -> String {
        if self.redis.is_cluster() {
            self.redis.key("{leaderboard:live}")
        } else {
            self.redis.key("leaderboard:live")
        }
    }

    /// `leaderboard:live:users`: the base of the board's hashes (`_ready`;
    /// each bucket is `<base>:<id without its last two digits>`).
    pub fn users_key(&self) -> String {
        format!("{}:users", self.key())
    }

    /// A call of one of the library's functions on the board's keys
    /// (`FCALL_RO` for the read-only ones); the caller adds the arguments.
    fn add_fcall<'p>(
        &self,
        pipe: &'p mut Pipeline,
        function: &str,
        reads: bool,
    ) -> &'p mut Pipeline {
        pipe.cmd(if reads { "FCALL_RO" } else { "FCALL" })
            .arg(self.function(function))
            .arg(2)
            .arg(self.key())
            .arg(self.users_key())
    }

    /// Queues `loyaltyd_set` calls for `scores` on a pipeline: one per
    /// [`SCRIPT_BATCH`] users (the board's keys share a slot). A name the
    /// row does not carry is kept as the board has it.
    pub fn add_set(&self, pipe: &mut Pipeline, scores: &[ScoreRow]) {
        for chunk in scores.chunks(SCRIPT_BATCH) {
            let call = self.add_fcall(pipe, "set", false);
            for s in chunk {
                let name = match &s.username {
                    Some(name) => format!("={name}"),
                    None => "?".to_owned(),
                };
                call.arg(s.user.get())
                    .arg(live_key(s.user, s.created_us))
                    .arg(s.score)
                    .arg(s.version)
                    .arg(name);
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
            .exec_pipeline("FCALL", &pipe, true, &[self.library])
            .await
    }

    /// Whether the live board is built in this layout (`None`: Redis is away).
    pub async fn ready(&self) -> Option<bool> {
        let cmd = redis::cmd("HGET")
            .arg(self.users_key())
            .arg("_ready")
            .to_owned();
        let v: Option<String> = self.redis.query("HGET", cmd).await?;
        Some(v.as_deref() == Some(READY))
    }

    /// Marks the live board built (or, with `false`, to be built again).
    pub async fn mark_ready(&self, ready: bool) -> bool {
        let mut pipe = redis::pipe();
        self.add_fcall(&mut pipe, "mark", false)
            .arg(i32::from(ready))
            .ignore();
        self.redis
            .exec_pipeline("FCALL", &pipe, false, &[self.library])
            .await
    }

    /// The users among `scores` whose place on the live board differs from
    /// theirs, or whose name there differs (`None`: Redis is away). A row
    /// without a name (not read from `users`) is checked as nameless.
    pub async fn differing(&self, scores: &[ScoreRow]) -> Option<Vec<UserId>> {
        if scores.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        let call = self.add_fcall(&mut pipe, "check", true);
        for s in scores {
            call.arg(s.user.get())
                .arg(live_member(
                    s.user,
                    s.created_us,
                    s.username.as_deref().unwrap_or_default(),
                ))
                .arg(s.score);
        }
        let (ids,): (Vec<i64>,) = self
            .redis
            .query_pipeline("FCALL_RO", &pipe, false, &[self.library])
            .await?;
        Some(
            ids.into_iter()
                .filter_map(|id| UserId::new(id).ok())
                .collect(),
        )
    }

    /// Up to about `count` members of the live board from `cursor` on (a
    /// ZSCAN step): the next cursor (0 at the end) and (user, member) pairs.
    pub async fn scan(&self, cursor: u64, count: u32) -> Option<(u64, Vec<(UserId, Vec<u8>)>)> {
        let cmd = redis::cmd("ZSCAN")
            .arg(self.key())
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .to_owned();
        let (next, items): (u64, Vec<Vec<u8>>) = self.redis.query("ZSCAN", cmd).await?;
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
    pub async fn remove(&self, users: &[(UserId, Vec<u8>)]) -> bool {
        self.call_on_members("remove", users).await.is_some()
    }

    /// Takes strays off the sorted set: members of users whose bucket
    /// entry names another member (a name since changed), the entry kept;
    /// a member the entry names stays. How many were taken off (`None`:
    /// Redis is away).
    pub async fn remove_strays(&self, members: &[(UserId, Vec<u8>)]) -> Option<u64> {
        self.call_on_members("unstray", members).await
    }

    /// Calls a write function of the library on (user, member) pairs; its
    /// count.
    async fn call_on_members(&self, function: &str, members: &[(UserId, Vec<u8>)]) -> Option<u64> {
        if members.is_empty() {
            return Some(0);
        }
        let mut pipe = redis::pipe();
        let call = self.add_fcall(&mut pipe, function, false);
        for (user, member) in members {
            call.arg(user.get()).arg(&member[..]);
        }
        let (n,): (u64,) = self
            .redis
            .query_pipeline("FCALL", &pipe, false, &[self.library])
            .await?;
        Some(n)
    }

    /// How many users the live board ranks (`None`: Redis is away).
    pub async fn count(&self) -> Option<i64> {
        let cmd = redis::cmd("ZCARD").arg(self.key()).to_owned();
        self.redis.query("ZCARD", cmd).await
    }

    /// Deletes the whole board: the set, the base hash and every bucket
    /// (a board of an older layout too); false when Redis is away.
    pub async fn clear(&self) -> bool {
        let base = self.users_key();
        let pattern = format!("{}:*", &base[self.redis.prefix().len()..]);
        let Some(mut keys) = self.redis.keys(&pattern).await else {
            return false;
        };
        keys.push(self.key());
        keys.push(base);
        let mut cleared = true;
        for chunk in keys.chunks(1000) {
            cleared &= self.redis.delete(chunk).await;
        }
        cleared
    }

    /// Loads the library where Redis lacks it (`replace`: whatever Redis
    /// has, as after an upgrade); false when Redis is away. The daemon calls
    /// it on start and every few seconds, so that other clients find it
    /// after a Redis restart or a failover.
    pub async fn ensure_library(&self, replace: bool) -> bool {
        self.redis.ensure_library(self.library, replace).await
    }

    /// Calls one of the library's read functions on the board.
    async fn read(&self, function: &str, args: &[i64]) -> Option<Vec<redis::Value>> {
        let mut pipe = redis::pipe();
        self.add_fcall(&mut pipe, function, true).arg(args);
        let (reply,): (Vec<redis::Value>,) = self
            .redis
            .query_pipeline("FCALL_RO", &pipe, false, &[self.library])
            .await?;
        Some(reply)
    }

    /// A user's place on the live board; `None` when the board is not built
    /// or Redis is away (the caller reads the view instead).
    pub async fn rank(&self, user: UserId) -> Option<LiveRank> {
        let reply = self.read("rank", &[user.get()]).await?;
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
                topic_right: int(3)? == 1,
            }),
        }
    }

    /// A page of the live board: how many users it ranks, and its entries
    /// from rank `offset + 1` on; `None` when the board is not built or
    /// Redis is away.
    pub async fn page(&self, offset: i64, limit: i64) -> Option<(i64, Vec<LiveEntry>)> {
        let reply = self.read("page", &[offset, limit]).await?;
        let mut items = reply.into_iter();
        let ranked = match items.next()? {
            redis::Value::Int(-2) => return None,
            redis::Value::Int(n) => n,
            _ => return None,
        };
        let mut page = Vec::new();
        while let (Some(_rank), Some(id), Some(score), Some(name)) =
            (items.next(), items.next(), items.next(), items.next())
        {
            let (
                redis::Value::BulkString(id),
                redis::Value::Int(score),
                redis::Value::BulkString(name),
            ) = (id, score, name)
            else {
                return None;
            };
            page.push(LiveEntry {
                user: std::str::from_utf8(&id).ok()?.parse::<UserId>().ok()?,
                score,
                name: String::from_utf8_lossy(&name).into_owned(),
            });
        }
        Some((ranked, page))
    }
}

/// The `_ready` value of a board in this layout (the library's `READY`).
const READY: &str = "3";

/// How a build's Redis write is tried again after a miss (one slow moment
/// must not throw away a build of millions; every write is version-guarded,
/// so a repeat is harmless): up to five tries, a second apart (the cache's
/// own back-off after a failure).
const BUILD_WRITE_RETRY: crate::retry::Retry =
    crate::retry::Retry::steady(5, std::time::Duration::from_secs(1));

/// A build's Redis write under [`BUILD_WRITE_RETRY`]. A macro, not
/// `Retry::run` over an async closure: the daemon spawns the build, and such
/// closures' futures are not `Send`.
macro_rules! retried {
    ($write:expr) => {{
        let mut done = false;
        for attempt in 1..=BUILD_WRITE_RETRY.attempts {
            if $write {
                done = true;
                break;
            }
            if BUILD_WRITE_RETRY.again(attempt) {
                tokio::time::sleep(BUILD_WRITE_RETRY.pause(attempt)).await;
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
    let unavailable = || Error::RedisUnavailable {
        needed: "the live board is not built",
    };
    let board = Board::new(&ctx.redis);
    if !retried!(board.clear().await) {
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
        let mut next = chunks.try_next().await;
        // Each batch is written while the next is read: PostgreSQL and
        // Redis work at once.
        while let Some(chunk) = next
            .map_err(|e| e.1)
            .db("reading scores for the live board")?
        {
            let (wrote, read) = tokio::join!(
                async { retried!(board.set(&chunk).await) },
                chunks.try_next()
            );
            if !wrote {
                return Err(unavailable());
            }
            written += chunk.len() as u64;
            next = read;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// PostgreSQL's timestamps from 4713 BC on, in microseconds since 1970.
    const PG_TIMES: std::ops::RangeInclusive<i64> = -210_866_803_200_000_000..=i64::MAX;

    proptest! {
        /// The bytes of members order as the seed's tie-break (sign-up
        /// time, then id), whatever the names, and give back the id.
        #[test]
        fn members_order_as_time_then_id(
            t1 in PG_TIMES, t2 in PG_TIMES, same_time in any::<bool>(),
            id1 in 1..=i64::MAX, id2 in 1..=i64::MAX, small in 0u32..64,
            n1 in ".{0,20}", n2 in ".{0,20}",
        ) {
            let t2 = if same_time { t1 } else { t2 };
            let id2 = if small < 32 { id2 >> small } else { id2 }.max(1);
            let user = |id| UserId::new(id).map_err(|e| TestCaseError::fail(e.to_string()));
            let (u1, u2) = (user(id1)?, user(id2)?);
            let (m1, m2) = (live_member(u1, t1, &n1), live_member(u2, t2, &n2));
            prop_assert_eq!(live_member_user(&m1), Some(u1));
            prop_assert_eq!(live_member_user(&m2), Some(u2));
            if (t1, id1) != (t2, id2) {
                prop_assert_eq!(m1.cmp(&m2), (t1, id1).cmp(&(t2, id2)));
            }
        }
    }
}
