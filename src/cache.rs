//! The loyalty score cache in Redis: versions, leases, refills.
//!
//! Redis is optional at run time: every command goes through the
//! [`Redis`] runner, so an error or a timeout is a cache miss, counted,
//! never a failed request. The cache knows its own keys only; the write
//! that keeps the cache and the live board together is composed in
//! [`crate::publish`].
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Pipeline;

use crate::config::RedisConfig;
use crate::redis_runner::{Lua, Redis, SCRIPT_BATCH};
use crate::score_row::ScoreRow;
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

/// A read: the cached value, or on a miss a lease for the refill. A value
/// without a version is one loyaltyd did not write (the original design's
/// code, before or beside it): never served, refilled from the database
/// like a miss. KEYS: value key, version key, lease key. ARGV: lease token,
/// lease milliseconds. Returns the value; or "" when the miss took the
/// lease; or nil when another reader holds it.
const GET_OR_LEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and redis.call('EXISTS', KEYS[2]) == 1 then
  return v
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
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

static SET_IF_NEWER_SCRIPT: LazyLock<Lua> = LazyLock::new(|| Lua::new(SET_IF_NEWER));
static GET_OR_LEASE_SCRIPT: LazyLock<Lua> = LazyLock::new(|| Lua::new(GET_OR_LEASE));
static REFILL_SCRIPT: LazyLock<Lua> = LazyLock::new(|| Lua::new(REFILL));
static REPLACE_IF_UNCHANGED_SCRIPT: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(REPLACE_IF_UNCHANGED));

/// The script a score write runs, for loading it where a write pipeline
/// is composed (see [`Redis::exec_pipeline`]).
pub fn write_script() -> &'static Lua {
    &SET_IF_NEWER_SCRIPT
}

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

/// The score cache: cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Redis,
    ttl_secs: u64,
    /// Makes lease tokens unique within the process.
    leases: AtomicU64,
}

impl Cache {
    /// The cache on `redis`, its entries living `redis.cache_ttl`.
    pub fn new(redis: Redis, cfg: &RedisConfig) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                redis,
                ttl_secs: cfg.cache_ttl.as_secs().max(1),
                leases: AtomicU64::new(0),
            }),
        }
    }

    /// `loyalty:{user_id}`: the cached score (the seed's name); in a
    /// cluster the id is a hash tag, `loyalty:{42}`, so that a user's keys
    /// share a slot (their scripts touch them together).
    pub fn score_key(&self, user: UserId) -> String {
        format!(
            "{}loyalty:{}",
            self.inner.redis.prefix(),
            self.user_tag(user)
        )
    }

    /// `loyalty:{user_id}:version`: the score's `users.score_version`.
    pub fn version_key(&self, user: UserId) -> String {
        format!(
            "{}loyalty:{}:version",
            self.inner.redis.prefix(),
            self.user_tag(user)
        )
    }

    /// `loyalty:{user_id}:lease`: a reader's right to refill (see "Refills: leases").
    pub fn lease_key(&self, user: UserId) -> String {
        format!(
            "{}loyalty:{}:lease",
            self.inner.redis.prefix(),
            self.user_tag(user)
        )
    }

    /// The user id as it appears in key names: `42`, or `{42}` in a cluster.
    fn user_tag(&self, user: UserId) -> String {
        if self.inner.redis.is_cluster() {
            format!("{{{user}}}")
        } else {
            user.to_string()
        }
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
            .arg(GET_OR_LEASE_SCRIPT.get_hash())
            .arg(3)
            .arg(self.score_key(user))
            .arg(self.version_key(user))
            .arg(self.lease_key(user))
            .arg(&token)
            .arg(LEASE.as_millis() as u64);
        match self
            .inner
            .redis
            .query_pipeline::<(Option<String>,)>("GET", &pipe, false, &[&GET_OR_LEASE_SCRIPT])
            .await
        {
            Some((Some(v),)) if v.is_empty() => Lookup::Leased(Lease { user, token }),
            Some((Some(v),)) => v.parse().map_or(Lookup::Miss, Lookup::Hit),
            _ => Lookup::Miss,
        }
    }

    /// Refills a missed entry under its lease; false when the lease was lost
    /// (a write, an expiry, a Redis that forgot it) or Redis is away.
    pub async fn refill(&self, lease: &Lease, score: &ScoreRow) -> bool {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(REFILL_SCRIPT.get_hash())
            .arg(3)
            .arg(self.score_key(lease.user))
            .arg(self.version_key(lease.user))
            .arg(self.lease_key(lease.user))
            .arg(score.score)
            .arg(score.version)
            .arg(self.inner.ttl_secs)
            .arg(&lease.token);
        matches!(
            self.inner
                .redis
                .query_pipeline::<(i64,)>("EVALSHA", &pipe, true, &[&REFILL_SCRIPT])
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
        self.inner.redis.query("MGET", cmd).await
    }

    /// Replaces entries that are still exactly as seen (see [`REPLACE_IF_UNCHANGED`]).
    pub async fn replace_if_unchanged(&self, fixes: &[(CachedEntry, ScoreRow)]) -> bool {
        if fixes.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        for (seen, s) in fixes {
            self.add_script_call(&mut pipe, &REPLACE_IF_UNCHANGED_SCRIPT, s.user)
                .arg(&seen.value)
                .arg(seen.version.as_deref().unwrap_or(""))
                .arg(s.score)
                .arg(s.version)
                .arg(self.inner.ttl_secs)
                .ignore();
        }
        self.inner
            .redis
            .exec_pipeline("EVALSHA", &pipe, false, &[&REPLACE_IF_UNCHANGED_SCRIPT])
            .await
    }

    /// Stores scores unless the cache holds newer versions; one round trip for
    /// all of them. Returns false when Redis could not be reached. (Only the
    /// cache: a score write that keeps the live board too goes through
    /// [`crate::publish`].)
    pub async fn set_scores(&self, scores: &[ScoreRow]) -> bool {
        if scores.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        self.add_set_if_newer(&mut pipe, scores);
        self.inner
            .redis
            .exec_pipeline("EVALSHA", &pipe, true, &[&SET_IF_NEWER_SCRIPT])
            .await
    }

    /// Queues [`SET_IF_NEWER`] calls for `scores` on a pipeline: one per
    /// [`SCRIPT_BATCH`] users on one Redis; one per user on a cluster (a
    /// script's keys must share a slot, and a user's three do).
    pub fn add_set_if_newer(&self, pipe: &mut Pipeline, scores: &[ScoreRow]) {
        let per_call = if self.inner.redis.is_cluster() {
            1
        } else {
            SCRIPT_BATCH
        };
        for chunk in scores.chunks(per_call) {
            let call = pipe
                .cmd("EVALSHA")
                .arg(SET_IF_NEWER_SCRIPT.get_hash())
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
        script: &Lua,
        user: UserId,
    ) -> &'p mut Pipeline {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(3)
            .arg(self.score_key(user))
            .arg(self.version_key(user))
            .arg(self.lease_key(user))
    }
}
