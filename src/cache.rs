//! Redis: the loyalty score cache, and the connection every Redis user shares.
//!
//! Redis is optional at run time. Every command is bounded by `redis.timeout`,
//! and any error or timeout is a cache miss: logged (at most once a minute),
//! counted in `loyaltyd_redis_errors_total`, never a failed request. The
//! connection manager reconnects by itself when Redis comes back.
//!
//! # Coherence
//! `loyalty:{user_id}` holds the score as a plain integer (the seed's format,
//! so other readers keep working); `loyalty:{user_id}:version` beside it holds
//! `users.score_version` of that score. Writers set both through one Lua
//! script that refuses to replace a newer version with an older one. Versions
//! are bumped under the row lock, so they follow commit order: two writers of
//! one user cannot land an older score over a newer one.
//!
//! # Refills: leases
//! A reader that misses takes a lease (`loyalty:{user_id}:lease`, a random
//! token, in the same script as the miss) before it reads PostgreSQL, and its
//! refill lands only while it still holds that lease; every writer's script
//! deletes the lease. So a refill from a snapshot older than a write is
//! refused even when the version key is gone (Redis restarted empty, an
//! eviction, a DEL of the prefix): the lease went with it, or the write
//! removed it. This is the lease of Facebook's memcache (NSDI 2013). A reader
//! that gets no lease (another reader holds it) reads PostgreSQL and does not
//! refill.
//!
//! # Partitions
//! A write whose cache update fails (Redis unreachable from this process,
//! but alive and still holding the old score) leaves a stale entry. The
//! change is committed in PostgreSQL with its transaction id
//! (`users.score_xid`), and the daemon's cache sync (`src/sync.rs`) writes
//! every committed change it has not yet seen to Redis, until Redis takes
//! it: the stale entry lives at most one sync interval past the moment Redis
//! is reachable from the daemon again, even when the writer exited at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Pipeline, RedisResult, Script};

use crate::config::RedisConfig;
use crate::error::Result;
use crate::redis_conn::{Handle, RedisConn};
use crate::telemetry;
use crate::types::UserId;

/// Sets score and version unless the cache already holds a newer version,
/// and ends any reader's lease (its refill would be older than this write),
/// for each user of the call. KEYS: value key, version key, lease key of
/// each user. ARGV: ttl seconds, then score and version of each user.
/// An equal version overwrites: the database is the authority at that version,
/// which lets the integrity sweep repair a corrupted value. (Many users in one
/// call where their keys may share one: a batch pays one script call, not
/// one per user.)
const SET_IF_NEWER: &str = r#"
local set, a = 0, 2
for i = 1, #KEYS, 3 do
  redis.call('DEL', KEYS[i + 2])
  local current = tonumber(redis.call('GET', KEYS[i + 1]))
  if not (current and current > tonumber(ARGV[a + 1])) then
    redis.call('SET', KEYS[i], ARGV[a], 'EX', ARGV[1])
    redis.call('SET', KEYS[i + 1], ARGV[a + 1], 'EX', ARGV[1])
    set = set + 1
  end
  a = a + 2
end
return set
"#;

/// A read: the cached value, or on a miss a lease for the refill.
/// KEYS: value key, lease key. ARGV: lease token, lease milliseconds.
/// Returns the value; or "" when the miss took the lease; or nil when
/// another reader holds it.
const GET_OR_LEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then
  return v
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return ''
end
return false
"#;

/// A refill: lands only under the reader's own lease, and never over a newer
/// version. KEYS: value key, version key, lease key. ARGV: score, version,
/// ttl seconds, lease token.
const REFILL: &str = r#"
if redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return 0
end
redis.call('DEL', KEYS[3])
local current = tonumber(redis.call('GET', KEYS[2]))
if current and current > tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"#;

/// Replaces a cached score only if it is still exactly what was seen (value
/// and version, the version possibly absent): the sweep's repair of an entry
/// whose version no write of the current database produced (a restore from a
/// backup winds versions back). KEYS: value key, version key, lease key.
/// ARGV: seen value, seen version ("" for none), score, version, ttl seconds.
const REPLACE_IF_UNCHANGED: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] and (redis.call('GET', KEYS[2]) or '') == ARGV[2] then
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
  return 1
end
return 0
"#;

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

/// Users per call of the batch scripts: one call's run time stays short
/// (Redis runs nothing else meanwhile).
const SCRIPT_BATCH: usize = 500;

/// One user's place: {0-based rank or -1, score, ranked users}, or {-2}
/// while the board is not built. KEYS: the set, the hash. ARGV: user id.
const LIVE_RANK: &str = r#"
if redis.call('HGET', KEYS[2], '_ready') ~= '1' then
  return {-2}
end
local card = redis.call('ZCARD', KEYS[1])
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur then
  return {-1, '0', card}
end
local member = string.sub(cur, string.find(cur, ' ') + 1)
local r = redis.call('ZRANK', KEYS[1], member)
if not r then
  return {-1, '0', card}
end
return {r, redis.call('ZSCORE', KEYS[1], member), card}
"#;

/// A page: {ranked users, member, score, member, score, ...}, or {-2} while
/// the board is not built. KEYS: the set, the hash. ARGV: offset, limit.
const LIVE_PAGE: &str = r#"
if redis.call('HGET', KEYS[2], '_ready') ~= '1' then
  return {-2}
end
local out = redis.call('ZRANGE', KEYS[1], ARGV[1], tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1, 'WITHSCORES')
table.insert(out, 1, redis.call('ZCARD', KEYS[1]))
return out
"#;

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

/// Every script, for loading them after Redis forgot them.
const SCRIPTS: [&str; 8] = [
    SET_IF_NEWER,
    GET_OR_LEASE,
    REFILL,
    REPLACE_IF_UNCHANGED,
    LIVE_SET,
    LIVE_RANK,
    LIVE_PAGE,
    LIVE_CHECK,
];

/// How long Redis counts as away after it failed to answer (see [`Cache::run`]).
const BACK_OFF: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch.
fn millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The seed's Redis counter of pending leaderboard changes.
pub const SEED_PENDING: &str = "leaderboard:refresh_pending";

/// How long a reader's lease lasts: longer than a database read, short
/// enough that a reader that died holding one delays nobody's refill long.
const LEASE: Duration = Duration::from_secs(2);

/// What a cache read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The cached score.
    Hit(i64),
    /// A miss, and this reader holds the lease to refill it.
    Leased(Lease),
    /// A miss without a lease (another reader holds it, or Redis is away).
    Miss,
}

/// The right to refill one user's entry (see "Refills: leases").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    user: UserId,
    token: String,
}

/// A cached entry as stored: the raw value and version strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEntry {
    /// `loyalty:{user_id}`.
    pub value: String,
    /// `loyalty:{user_id}:version`, if present.
    pub version: Option<String>,
}

/// A cached score write: the score and the version it was read or written
/// at, and the user's sign-up time (the live board's tie-break).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionedScore {
    /// The user.
    pub user: UserId,
    /// `users.loyalty_score`.
    pub score: i64,
    /// `users.score_version` of that score.
    pub version: i64,
    /// `users.created_at`, in microseconds since the Unix epoch.
    pub created_us: i64,
}

/// The select list of a [`VersionedScore`] row of `users`, for
/// [`VersionedScore::from_row`] (in `concat!`). The casts let an adopted
/// forum's columns of its own types (INTEGER ids and scores) read as BIGINT.
#[macro_export]
macro_rules! score_columns {
    () => {
        "id::BIGINT, loyalty_score::BIGINT, score_version, (EXTRACT(EPOCH FROM created_at) * 1000000)::BIGINT"
    };
}

impl VersionedScore {
    /// From a row `(id, loyalty_score, score_version, created_us)`, the
    /// shape every score read selects ([`score_columns!`]); `None` for an id
    /// that is not a user id.
    pub fn from_row((id, score, version, created_us): (i64, i64, i64, i64)) -> Option<Self> {
        Some(VersionedScore {
            user: UserId::new(id).ok()?,
            score,
            version,
            created_us,
        })
    }
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

/// The shared Redis handle: cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConn,
    prefix: String,
    ttl_secs: u64,
    timeout: Duration,
    set_if_newer: Script,
    get_or_lease: Script,
    refill: Script,
    replace_if_unchanged: Script,
    live_set: Script,
    live_rank: Script,
    live_page: Script,
    live_check: Script,
    /// Whether writes keep the live board (`leaderboard.live`).
    live: bool,
    last_error_log: AtomicU64,
    /// Makes lease tokens unique within the process.
    leases: AtomicU64,
    /// Until when (ms since the epoch) Redis counts as away after a failure.
    down_until: AtomicU64,
}

impl Cache {
    /// Prepares the connection without connecting, so start-up never waits
    /// for Redis. `live`: score writes keep the live board too.
    pub fn new(cfg: &RedisConfig, live: bool) -> Result<Cache> {
        let conn = RedisConn::new(cfg)?;
        Ok(Cache {
            inner: Arc::new(Inner {
                conn,
                prefix: cfg.key_prefix.clone(),
                ttl_secs: cfg.cache_ttl.as_secs().max(1),
                timeout: cfg.timeout,
                set_if_newer: Script::new(SET_IF_NEWER),
                get_or_lease: Script::new(GET_OR_LEASE),
                refill: Script::new(REFILL),
                replace_if_unchanged: Script::new(REPLACE_IF_UNCHANGED),
                live_set: Script::new(LIVE_SET),
                live_rank: Script::new(LIVE_RANK),
                live_page: Script::new(LIVE_PAGE),
                live_check: Script::new(LIVE_CHECK),
                live,
                last_error_log: AtomicU64::new(0),
                leases: AtomicU64::new(0),
                down_until: AtomicU64::new(0),
            }),
        })
    }

    /// A key with the configured prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    /// The configured key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// `loyalty:{user_id}`: the cached score (the seed's name); in a
    /// cluster the id is a hash tag, `loyalty:{42}`, so that a user's keys
    /// share a slot (their scripts touch them together).
    pub fn score_key(&self, user: UserId) -> String {
        format!("{}loyalty:{}", self.inner.prefix, self.user_tag(user))
    }

    /// `loyalty:{user_id}:version`: the score's `users.score_version`.
    pub fn version_key(&self, user: UserId) -> String {
        format!(
            "{}loyalty:{}:version",
            self.inner.prefix,
            self.user_tag(user)
        )
    }

    /// `loyalty:{user_id}:lease`: a reader's right to refill (see "Refills: leases").
    pub fn lease_key(&self, user: UserId) -> String {
        format!("{}loyalty:{}:lease", self.inner.prefix, self.user_tag(user))
    }

    /// The user id as it appears in key names: `42`, or `{42}` in a cluster.
    fn user_tag(&self, user: UserId) -> String {
        if self.inner.conn.is_cluster() {
            format!("{{{user}}}")
        } else {
            user.to_string()
        }
    }

    /// True when Redis is a cluster (keys carry hash tags).
    pub fn is_cluster(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    /// The cached score; on a miss, a lease to refill it if no other reader
    /// holds one. A value that is not a number is a miss without a lease.
    pub async fn lookup(&self, user: UserId) -> Lookup {
        let token = format!(
            "{}:{}:{}",
            std::process::id(),
            self.inner.leases.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.inner.get_or_lease.get_hash())
            .arg(2)
            .arg(self.score_key(user))
            .arg(self.lease_key(user))
            .arg(&token)
            .arg(LEASE.as_millis() as u64);
        match self
            .query_pipeline::<(Option<String>,)>("GET", &mut pipe, false)
            .await
        {
            Some((Some(v),)) if v.is_empty() => Lookup::Leased(Lease { user, token }),
            Some((Some(v),)) => v.parse().map_or(Lookup::Miss, Lookup::Hit),
            _ => Lookup::Miss,
        }
    }

    /// Refills a missed entry under its lease; false when the lease was lost
    /// (a write, an expiry, a Redis that forgot it) or Redis is away.
    pub async fn refill(&self, lease: &Lease, score: &VersionedScore) -> bool {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.inner.refill.get_hash())
            .arg(3)
            .arg(self.score_key(lease.user))
            .arg(self.version_key(lease.user))
            .arg(self.lease_key(lease.user))
            .arg(score.score)
            .arg(score.version)
            .arg(self.inner.ttl_secs)
            .arg(&lease.token);
        matches!(
            self.query_pipeline::<(i64,)>("EVALSHA", &mut pipe, true)
                .await,
            Some((1,))
        )
    }

    /// The cached scores of many users (one MGET), `None` where missing.
    pub async fn get_scores(&self, users: &[UserId]) -> Option<Vec<Option<i64>>> {
        let values = self.get_values(users).await?;
        Some(
            values
                .into_iter()
                .map(|v| v.and_then(|v| v.parse().ok()))
                .collect(),
        )
    }

    /// The cached score values of many users as stored (one MGET, no
    /// versions), `None` where no score is cached: what the sweep compares
    /// with the database (a value that is not a number differs too).
    pub async fn get_values(&self, users: &[UserId]) -> Option<Vec<Option<String>>> {
        self.mget(users.iter().map(|&u| self.score_key(u)).collect())
            .await
    }

    /// The cached entries of many users with their versions (one MGET), `None`
    /// where no score is cached.
    pub async fn get_entries(&self, users: &[UserId]) -> Option<Vec<Option<CachedEntry>>> {
        let keys = users
            .iter()
            .flat_map(|&u| [self.score_key(u), self.version_key(u)])
            .collect();
        let mut values = self.mget(keys).await?.into_iter();
        let mut entries = Vec::with_capacity(users.len());
        while let (Some(value), Some(version)) = (values.next(), values.next()) {
            entries.push(value.map(|value| CachedEntry { value, version }));
        }
        Some(entries)
    }

    /// One MGET; `None` when Redis could not be reached.
    async fn mget(&self, keys: Vec<String>) -> Option<Vec<Option<String>>> {
        if keys.is_empty() {
            return Some(Vec::new());
        }
        let cmd = redis::cmd("MGET").arg(keys).to_owned();
        self.query("MGET", cmd).await
    }

    /// Replaces entries that are still exactly as seen (see [`REPLACE_IF_UNCHANGED`]).
    pub async fn replace_if_unchanged(&self, fixes: &[(CachedEntry, VersionedScore)]) -> bool {
        if fixes.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        for (seen, s) in fixes {
            self.add_script_call(&mut pipe, &self.inner.replace_if_unchanged, s.user)
                .arg(&seen.value)
                .arg(seen.version.as_deref().unwrap_or(""))
                .arg(s.score)
                .arg(s.version)
                .arg(self.inner.ttl_secs)
                .ignore();
        }
        self.exec_pipeline("EVALSHA", &pipe, false).await
    }

    /// Stores scores unless the cache holds newer versions; one round trip for
    /// all of them. Returns false when Redis could not be reached.
    pub async fn set_scores(&self, scores: &[VersionedScore]) -> bool {
        if scores.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        self.add_set_if_newer(&mut pipe, scores);
        if self.inner.live {
            self.add_live_set(&mut pipe, scores);
        }
        self.exec_pipeline("EVALSHA", &pipe, true).await
    }

    /// `leaderboard:live`: the live board's sorted set.
    pub fn live_key(&self) -> String {
        if self.is_cluster() {
            self.key("{leaderboard:live}")
        } else {
            self.key("leaderboard:live")
        }
    }

    /// `leaderboard:live:users`: each user's version and member, and `_ready`.
    pub fn live_users_key(&self) -> String {
        if self.is_cluster() {
            self.key("{leaderboard:live}:users")
        } else {
            self.key("leaderboard:live:users")
        }
    }

    /// Queues [`LIVE_SET`] calls for `scores` on a pipeline: one per
    /// [`SCRIPT_BATCH`] users (the board's two keys share a slot).
    fn add_live_set(&self, pipe: &mut Pipeline, scores: &[VersionedScore]) {
        for chunk in scores.chunks(SCRIPT_BATCH) {
            let call = pipe
                .cmd("EVALSHA")
                .arg(self.inner.live_set.get_hash())
                .arg(2)
                .arg(self.live_key())
                .arg(self.live_users_key());
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
    pub async fn live_set(&self, scores: &[VersionedScore]) -> bool {
        if scores.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        self.add_live_set(&mut pipe, scores);
        self.exec_pipeline("EVALSHA", &pipe, true).await
    }

    /// Whether the live board is built (`None`: Redis is away).
    pub async fn live_ready(&self) -> Option<bool> {
        let cmd = redis::cmd("HGET")
            .arg(self.live_users_key())
            .arg("_ready")
            .to_owned();
        let v: Option<String> = self.query("HGET", cmd).await?;
        Some(v.as_deref() == Some("1"))
    }

    /// Marks the live board built (or, with `false`, to be built again).
    pub async fn live_mark_ready(&self, ready: bool) -> bool {
        let cmd = if ready {
            redis::cmd("HSET")
                .arg(self.live_users_key())
                .arg("_ready")
                .arg("1")
                .to_owned()
        } else {
            redis::cmd("HDEL")
                .arg(self.live_users_key())
                .arg("_ready")
                .to_owned()
        };
        self.query::<i64>("HSET", cmd).await.is_some()
    }

    /// The users among `scores` whose place on the live board differs from
    /// theirs (`None`: Redis is away).
    pub async fn live_differing(&self, scores: &[VersionedScore]) -> Option<Vec<UserId>> {
        if scores.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        let call = pipe
            .cmd("EVALSHA")
            .arg(self.inner.live_check.get_hash())
            .arg(2)
            .arg(self.live_key())
            .arg(self.live_users_key());
        for s in scores {
            call.arg(s.user.get())
                .arg(live_member(s.user, s.created_us))
                .arg(s.score);
        }
        let (ids,): (Vec<i64>,) = self.query_pipeline("EVALSHA", &mut pipe, false).await?;
        Some(
            ids.into_iter()
                .filter_map(|id| UserId::new(id).ok())
                .collect(),
        )
    }

    /// Takes a lock in Redis for `ttl` (one daemon builds the live board at a
    /// time); false when another holds it or Redis is away.
    pub async fn try_lock(&self, name: &str, ttl: Duration) -> bool {
        let cmd = redis::cmd("SET")
            .arg(self.key(name))
            .arg(std::process::id())
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .to_owned();
        matches!(
            self.query::<Option<String>>("SET", cmd).await,
            Some(Some(_))
        )
    }

    /// Up to about `count` members of the live board from `cursor` on (a
    /// ZSCAN step): the next cursor (0 at the end) and (user, member) pairs.
    pub async fn live_scan(&self, cursor: u64, count: u32) -> Option<(u64, Vec<(UserId, String)>)> {
        let cmd = redis::cmd("ZSCAN")
            .arg(self.live_key())
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .to_owned();
        let (next, items): (u64, Vec<String>) = self.query("ZSCAN", cmd).await?;
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
    pub async fn live_remove(&self, users: &[(UserId, String)]) -> bool {
        if users.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let members: Vec<&str> = users.iter().map(|(_, m)| m.as_str()).collect();
        let ids: Vec<i64> = users.iter().map(|(u, _)| u.get()).collect();
        pipe.zrem(self.live_key(), members).ignore();
        pipe.hdel(self.live_users_key(), ids).ignore();
        self.exec_pipeline("ZREM", &pipe, false).await
    }

    /// A cluster's masters, sorted (`None`: not a cluster, or it did not
    /// answer); the daemon watches them for failovers.
    pub async fn masters(&self) -> Option<Vec<(String, u16)>> {
        // Not held back by the back-off (it is how a failover is noticed),
        // and each node asked has its own time limit.
        let mut masters = match self.inner.conn.masters().await {
            Ok(m) => m?,
            Err(e) => {
                self.record_error("CLUSTER SLOTS", &e.to_string());
                return None;
            }
        };
        masters.sort();
        Some(masters)
    }

    /// Starts over with a new cluster connection (see [`RedisConn::reset`]).
    pub async fn reconnect(&self) {
        self.inner.conn.reset().await;
    }

    /// A cluster's `cluster-node-timeout` (how long a dead master goes
    /// unnoticed); `None` when it cannot be read (managed services hide
    /// CONFIG).
    pub async fn cluster_node_timeout(&self) -> Option<Duration> {
        let cmd = redis::cmd("CONFIG")
            .arg("GET")
            .arg("cluster-node-timeout")
            .to_owned();
        let reply: Vec<String> = self.query("CONFIG", cmd).await?;
        let ms: u64 = reply.get(1)?.parse().ok()?;
        Some(Duration::from_millis(ms))
    }

    /// How many users the live board ranks (`None`: Redis is away).
    pub async fn live_count(&self) -> Option<i64> {
        let cmd = redis::cmd("ZCARD").arg(self.live_key()).to_owned();
        self.query("ZCARD", cmd).await
    }

    /// A user's place on the live board; `None` when the board is not built
    /// or Redis is away (the caller reads the view instead).
    pub async fn live_rank(&self, user: UserId) -> Option<LiveRank> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.inner.live_rank.get_hash())
            .arg(2)
            .arg(self.live_key())
            .arg(self.live_users_key())
            .arg(user.get());
        let (reply,): (Vec<redis::Value>,) =
            self.query_pipeline("EVALSHA", &mut pipe, false).await?;
        let int = |v: Option<&redis::Value>| -> Option<i64> {
            match v? {
                redis::Value::Int(i) => Some(*i),
                redis::Value::BulkString(b) => std::str::from_utf8(b)
                    .ok()?
                    .parse::<f64>()
                    .ok()
                    .map(|f| f as i64),
                _ => None,
            }
        };
        let rank = int(reply.first())?;
        if rank == -2 {
            return None;
        }
        let ranked = int(reply.get(2))?;
        if rank < 0 {
            return Some(LiveRank::Unranked { ranked });
        }
        Some(LiveRank::Ranked {
            rank: rank + 1,
            score: -int(reply.get(1))?,
            ranked,
        })
    }

    /// A page of the live board: how many users it ranks, and (user, score)
    /// from rank `offset + 1` on; `None` when the board is not built or Redis
    /// is away.
    pub async fn live_page(&self, offset: i64, limit: i64) -> Option<(i64, Vec<(UserId, i64)>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.inner.live_page.get_hash())
            .arg(2)
            .arg(self.live_key())
            .arg(self.live_users_key())
            .arg(offset)
            .arg(limit);
        let (reply,): (Vec<redis::Value>,) =
            self.query_pipeline("EVALSHA", &mut pipe, false).await?;
        let mut items = reply.into_iter();
        let ranked = match items.next()? {
            redis::Value::Int(-2) => return None,
            redis::Value::Int(n) => n,
            _ => return None,
        };
        let mut page = Vec::new();
        while let (Some(member), Some(score)) = (items.next(), items.next()) {
            let (redis::Value::BulkString(m), redis::Value::BulkString(s)) = (member, score) else {
                return None;
            };
            let user = live_member_user(std::str::from_utf8(&m).ok()?)?;
            let score = std::str::from_utf8(&s).ok()?.parse::<f64>().ok()?;
            page.push((user, -score as i64));
        }
        Some((ranked, page))
    }

    /// Queues [`SET_IF_NEWER`] calls for `scores` on a pipeline: one per
    /// [`SCRIPT_BATCH`] users on one Redis; one per user on a cluster (a
    /// script's keys must share a slot, and a user's three do).
    fn add_set_if_newer(&self, pipe: &mut Pipeline, scores: &[VersionedScore]) {
        let per_call = if self.is_cluster() { 1 } else { SCRIPT_BATCH };
        for chunk in scores.chunks(per_call) {
            let call = pipe
                .cmd("EVALSHA")
                .arg(self.inner.set_if_newer.get_hash())
                .arg(3 * chunk.len());
            for s in chunk {
                call.arg(self.score_key(s.user))
                    .arg(self.version_key(s.user))
                    .arg(self.lease_key(s.user));
            }
            call.arg(self.inner.ttl_secs);
            for s in chunk {
                call.arg(s.score).arg(s.version);
            }
            call.ignore();
        }
    }

    /// Starts an EVALSHA of one of our scripts on a user's value, version and
    /// lease keys; the caller adds the script's ARGV.
    fn add_script_call<'p>(
        &self,
        pipe: &'p mut Pipeline,
        script: &Script,
        user: UserId,
    ) -> &'p mut Pipeline {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(3)
            .arg(self.score_key(user))
            .arg(self.version_key(user))
            .arg(self.lease_key(user))
    }

    /// Runs a pipeline whose replies are ignored, under the timeout; loads
    /// the scripts and retries once if Redis does not know them yet (after a
    /// restart or `SCRIPT FLUSH`). In a cluster its commands go out one by
    /// one (see [`Handle::exec`]). `write` skips the back-off (see
    /// [`Cache::attempt`]). False when Redis could not be reached.
    async fn exec_pipeline(&self, what: &'static str, pipe: &Pipeline, write: bool) -> bool {
        let conn = &self.inner.conn;
        let attempt = async {
            let mut c = conn.handle().await?;
            match c.exec(pipe).await {
                Err(e) if is_no_script(&e) => {
                    load_scripts(&mut c).await?;
                    c.exec(pipe).await
                }
                other => other,
            }
        };
        if write {
            self.attempt(what, attempt).await.is_some()
        } else {
            self.run(what, attempt).await.is_some()
        }
    }

    /// Runs a one-command pipeline (a script call) and returns its reply;
    /// see [`Cache::exec_pipeline`].
    async fn query_pipeline<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        pipe: &mut Pipeline,
        write: bool,
    ) -> Option<T> {
        let conn = &self.inner.conn;
        let attempt = async {
            let mut c = conn.handle().await?;
            match pipe.query_async::<T>(&mut c).await {
                Err(e) if is_no_script(&e) => {
                    load_scripts(&mut c).await?;
                    pipe.query_async::<T>(&mut c).await
                }
                other => other,
            }
        };
        if write {
            self.attempt(what, attempt).await
        } else {
            self.run(what, attempt).await
        }
    }

    /// Runs one command under the timeout (see [`Cache::run`]).
    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        cmd: redis::Cmd,
    ) -> Option<T> {
        let conn = &self.inner.conn;
        self.run(what, async move {
            cmd.query_async(&mut conn.handle().await?).await
        })
        .await
    }

    /// The seed's own pending-refresh counter (`leaderboard:refresh_pending`),
    /// which an application still running the seed's code increments; 0 when
    /// absent, not a number, or Redis is away.
    pub async fn seed_pending(&self) -> i64 {
        let cmd = redis::cmd("GET").arg(self.key(SEED_PENDING)).to_owned();
        self.query::<Option<String>>("GET", cmd)
            .await
            .flatten()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
            .max(0)
    }

    /// Takes `n` consumed changes off the seed's counter (DECRBY, not DEL:
    /// increments that landed meanwhile stay).
    pub async fn consume_seed_pending(&self, n: i64) {
        if n <= 0 {
            return;
        }
        let cmd = redis::cmd("DECRBY")
            .arg(self.key(SEED_PENDING))
            .arg(n)
            .to_owned();
        let _ = self.query::<i64>("DECRBY", cmd).await;
    }

    /// Every key matching `pattern` under the prefix (a SCAN of every
    /// master in a cluster; with the prefix); `None` when Redis is away.
    pub async fn keys(&self, pattern: &str) -> Option<Vec<String>> {
        let pattern = format!("{}{pattern}", escape_glob(&self.inner.prefix));
        let conn = &self.inner.conn;
        let nodes = match self.run("CLUSTER SLOTS", conn.masters()).await? {
            Some(masters) => masters.into_iter().map(Some).collect(),
            None => vec![None],
        };
        let mut keys = Vec::new();
        for node in nodes {
            let mut cursor = 0u64;
            loop {
                let scan = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .to_owned();
                let step = async {
                    let mut c = conn.handle().await?;
                    let reply = match &node {
                        Some((host, port)) => c.on_node(scan, host, *port).await?,
                        None => scan.query_async(&mut c).await?,
                    };
                    Ok::<_, redis::RedisError>(redis::from_redis_value::<(u64, Vec<String>)>(
                        reply,
                    )?)
                };
                let (next, batch) = self.run("SCAN", step).await?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Some(keys)
    }

    /// How many keys match `pattern` under the prefix, with up to five of
    /// them; -1 when Redis is away.
    pub async fn count_keys(&self, pattern: &str) -> (i64, Vec<String>) {
        match self.keys(pattern).await {
            Some(keys) => (keys.len() as i64, keys.into_iter().take(5).collect()),
            None => (-1, Vec::new()),
        }
    }

    /// A whole list (LRANGE 0 -1); `None` when Redis is away.
    pub async fn list(&self, key: &str) -> Option<Vec<String>> {
        let cmd = redis::cmd("LRANGE").arg(key).arg(0).arg(-1).to_owned();
        self.query("LRANGE", cmd).await
    }

    /// Pushes values onto lists (their names without the prefix), each
    /// trimmed to `len`, as one atomic pipeline; false when Redis is away.
    pub async fn push_lists(&self, lists: &[(String, Vec<String>)], len: u32) -> bool {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (list, values) in lists {
            let key = self.key(list);
            pipe.lpush(&key, values).ignore();
            pipe.ltrim(&key, 0, len as isize - 1).ignore();
        }
        self.exec_pipeline("LPUSH perf", &pipe, false).await
    }

    /// Deletes keys (tests and repairs); false when Redis could not be reached.
    pub async fn delete(&self, keys: &[String]) -> bool {
        if keys.is_empty() {
            return true;
        }
        // UNLINK: the keys are gone at once and their memory is freed in
        // the background (a DEL of a million-member board blocks Redis for
        // longer than `redis.timeout`).
        let cmd = redis::cmd("UNLINK").arg(keys).to_owned();
        self.query::<i64>("UNLINK", cmd).await.is_some()
    }

    /// Runs one Redis future under the timeout; an error or timeout is logged,
    /// counted and returned as `None`.
    async fn run<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        // A Redis that just failed to answer is not asked again for a
        // moment: a process (a one-shot CLI call above all) pays for an
        // outage once, not once per command.
        if millis_now() < self.inner.down_until.load(Ordering::Relaxed) {
            return None;
        }
        self.attempt(what, fut).await
    }

    /// [`Cache::run`] without the back-off: for score writes, which are
    /// always tried (a write that skipped a Redis that is back would leave
    /// a stale entry for the cache sync to fix).
    async fn attempt<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        let failure = match tokio::time::timeout(self.inner.timeout, fut).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e))
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() =>
            {
                e.to_string()
            }
            Ok(Err(e)) => {
                // Redis answered (a script error, a wrong type, a cluster
                // in the middle of a failover): it is up.
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved)
                {
                    self.inner.conn.reset_soon().await;
                }
                self.record_error(what, &e.to_string());
                return None;
            }
            Err(_) => "timed out".to_owned(),
        };
        // A cluster client can stay stuck on a dead node after a failover:
        // start over with a fresh slot map (at most once a second).
        self.inner.conn.reset_soon().await;
        self.inner.down_until.store(
            millis_now() + BACK_OFF.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.record_error(what, &failure);
        None
    }

    /// Counts a Redis failure; logs it unless one was logged in the last minute.
    fn record_error(&self, what: &'static str, reason: &str) {
        telemetry::redis_error();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.inner.last_error_log.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .inner
                .last_error_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                command = what,
                error = %crate::error::one_line(reason),
                "Redis unavailable; serving from PostgreSQL (further errors this minute are counted, not logged)"
            );
        }
    }
}

/// Escapes Redis glob metacharacters, so a key prefix matches literally.
pub fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether Redis answered that it does not know a script.
fn is_no_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Loads every script (on every node of a cluster).
async fn load_scripts(c: &mut Handle) -> RedisResult<()> {
    for script in SCRIPTS {
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script)
            .query_async(c)
            .await?;
    }
    Ok(())
}
