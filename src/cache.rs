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
//! `users.score_version` of that score. Both are written by one Lua script that
//! refuses to replace a newer version with an older one. Writers hold the row
//! lock when they bump the version, so versions follow commit order, and a slow
//! writer or a reader refilling the cache from an old snapshot can never land an
//! older score over a newer one: once a write has returned, the cache holds its
//! score or a newer one, or nothing.
//!
//! # Partitions
//! A write whose cache update fails (Redis unreachable, but alive and still
//! holding the old score) leaves a stale entry behind. The cache remembers
//! those users and deletes their cached scores before it next reads or writes
//! through Redis, so this process never serves them; other processes see the
//! stale value at most until the TTL or the next integrity sweep, which
//! compares every cached score with the database. A Redis that restarts
//! empty (no persistence, the recommended setup) holds nothing stale.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, RedisResult, Script};

use crate::config::RedisConfig;
use crate::error::{Error, Result};
use crate::telemetry;
use crate::types::UserId;

/// Sets score and version unless the cache already holds a newer version.
/// KEYS: value key, version key. ARGV: score, version, ttl seconds.
/// An equal version overwrites: the database is the authority at that version,
/// which lets the integrity sweep repair a corrupted value.
const SET_IF_NEWER: &str = r#"
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
/// backup winds versions back). KEYS: value key, version key. ARGV: seen
/// value, seen version ("" for none), score, version, ttl seconds.
const REPLACE_IF_UNCHANGED: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] and (redis.call('GET', KEYS[2]) or '') == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
  return 1
end
return 0
"#;

/// A cached entry as stored: the raw value and version strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEntry {
    /// `loyalty:{user_id}`.
    pub value: String,
    /// `loyalty:{user_id}:version`, if present.
    pub version: Option<String>,
}

/// A cached score write: the score and the version it was read or written at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionedScore {
    /// The user.
    pub user: UserId,
    /// `users.loyalty_score`.
    pub score: i64,
    /// `users.score_version` of that score.
    pub version: i64,
}

/// The shared Redis handle: cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

/// Users remembered as stale at most; beyond it the sweep has to catch up.
const MAX_STALE: usize = 100_000;

struct Inner {
    /// Users whose cached score may be stale (a failed write); see "Partitions".
    stale: std::sync::Mutex<std::collections::HashSet<UserId>>,
    has_stale: std::sync::atomic::AtomicBool,
    conn: ConnectionManager,
    prefix: String,
    ttl_secs: u64,
    timeout: Duration,
    set_if_newer: Script,
    replace_if_unchanged: Script,
    last_error_log: AtomicU64,
}

impl Cache {
    /// Prepares the connection without connecting, so start-up never waits for Redis.
    pub fn new(cfg: &RedisConfig) -> Result<Cache> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| Error::Config(format!("key \"redis.url\": {e}")))?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_cfg)
            .map_err(|e| Error::Config(format!("key \"redis.url\": {e}")))?;
        Ok(Cache {
            inner: Arc::new(Inner {
                stale: std::sync::Mutex::new(std::collections::HashSet::new()),
                has_stale: std::sync::atomic::AtomicBool::new(false),
                conn,
                prefix: cfg.key_prefix.clone(),
                ttl_secs: cfg.cache_ttl.as_secs().max(1),
                timeout: cfg.timeout,
                set_if_newer: Script::new(SET_IF_NEWER),
                replace_if_unchanged: Script::new(REPLACE_IF_UNCHANGED),
                last_error_log: AtomicU64::new(0),
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

    /// `loyalty:{user_id}`: the cached score.
    pub fn score_key(&self, user: UserId) -> String {
        format!("{}loyalty:{user}", self.inner.prefix)
    }

    /// `loyalty:{user_id}:version`: the score's `users.score_version`.
    pub fn version_key(&self, user: UserId) -> String {
        format!("{}loyalty:{user}:version", self.inner.prefix)
    }

    /// The cached score, or `None` on a miss, a bad value or an unavailable Redis.
    pub async fn get_score(&self, user: UserId) -> Option<i64> {
        self.forget_stale().await?;
        let mut conn = self.inner.conn.clone();
        let cmd = redis::cmd("GET").arg(self.score_key(user)).to_owned();
        let value: Option<String> = self.run("GET", cmd.query_async(&mut conn)).await?;
        value.and_then(|v| v.parse().ok())
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
        self.forget_stale().await?;
        let mut conn = self.inner.conn.clone();
        let cmd = redis::cmd("MGET").arg(keys).to_owned();
        self.run("MGET", cmd.query_async(&mut conn)).await
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
        self.run_pipeline("EVALSHA", &mut pipe).await
    }

    /// Stores scores unless the cache holds newer versions; one round trip for
    /// all of them. Returns false when Redis could not be reached.
    pub async fn set_scores(&self, scores: &[VersionedScore]) -> bool {
        if scores.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        for s in scores {
            self.add_set_if_newer(&mut pipe, s);
        }
        let written =
            self.forget_stale().await.is_some() && self.run_pipeline("EVALSHA", &mut pipe).await;
        if !written {
            self.remember_stale(scores.iter().map(|s| s.user));
        }
        written
    }

    /// Remembers users whose cached score may now be stale.
    fn remember_stale(&self, users: impl Iterator<Item = UserId>) {
        let Ok(mut stale) = self.inner.stale.lock() else {
            return;
        };
        for user in users {
            if stale.len() >= MAX_STALE {
                tracing::warn!(
                    "more than {MAX_STALE} cached scores may be stale after Redis failures; the integrity sweep will correct the rest"
                );
                break;
            }
            stale.insert(user);
        }
        self.inner
            .has_stale
            .store(!stale.is_empty(), Ordering::Release);
    }

    /// Deletes the cached scores remembered as stale (one round trip); `None`
    /// when Redis is still unreachable, so the caller must not trust it yet.
    async fn forget_stale(&self) -> Option<()> {
        if !self.inner.has_stale.load(Ordering::Acquire) {
            return Some(());
        }
        let users: Vec<UserId> = match self.inner.stale.lock() {
            Ok(mut stale) => {
                self.inner.has_stale.store(false, Ordering::Release);
                stale.drain().collect()
            }
            Err(_) => return None,
        };
        // Only the values: the version keys stay, so an old refill stays refused.
        let keys: Vec<String> = users.iter().map(|&u| self.score_key(u)).collect();
        let mut conn = self.inner.conn.clone();
        let del = redis::cmd("DEL").arg(&keys).to_owned();
        if self
            .run::<i64>("DEL", del.query_async(&mut conn))
            .await
            .is_some()
        {
            Some(())
        } else {
            self.remember_stale(users.into_iter());
            None
        }
    }

    /// Queues one [`SET_IF_NEWER`] call (by its SHA) on a pipeline.
    pub fn add_set_if_newer(&self, pipe: &mut Pipeline, s: &VersionedScore) {
        self.add_script_call(pipe, &self.inner.set_if_newer, s.user)
            .arg(s.score)
            .arg(s.version)
            .arg(self.inner.ttl_secs)
            .ignore();
    }

    /// Starts an EVALSHA of one of our scripts on a user's two keys; the
    /// caller adds the script's ARGV.
    fn add_script_call<'p>(
        &self,
        pipe: &'p mut Pipeline,
        script: &Script,
        user: UserId,
    ) -> &'p mut Pipeline {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(2)
            .arg(self.score_key(user))
            .arg(self.version_key(user))
    }

    /// Runs a pipeline under the timeout; loads the script and retries once if
    /// Redis does not know it yet (after a restart or `SCRIPT FLUSH`).
    pub async fn run_pipeline(&self, what: &'static str, pipe: &mut Pipeline) -> bool {
        let mut conn = self.inner.conn.clone();
        let attempt = async {
            match pipe.query_async::<()>(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    for script in [SET_IF_NEWER, REPLACE_IF_UNCHANGED] {
                        let _: String = redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(script)
                            .query_async(&mut conn)
                            .await?;
                    }
                    pipe.query_async::<()>(&mut conn).await
                }
                other => other,
            }
        };
        self.run(what, attempt).await.is_some()
    }

    /// Deletes keys (tests and repairs); false when Redis could not be reached.
    pub async fn delete(&self, keys: &[String]) -> bool {
        if keys.is_empty() {
            return true;
        }
        let mut conn = self.inner.conn.clone();
        let cmd = redis::cmd("DEL").arg(keys).to_owned();
        self.run::<i64>("DEL", cmd.query_async(&mut conn))
            .await
            .is_some()
    }

    /// A clone of the connection, for modules that speak Redis themselves.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Runs one Redis future under the timeout; an error or timeout is logged,
    /// counted and returned as `None`.
    pub async fn run<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.inner.timeout, fut).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.record_error(what, &e.to_string());
                None
            }
            Err(_) => {
                self.record_error(what, "timed out");
                None
            }
        }
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
