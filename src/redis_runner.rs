//! The runner every Redis command goes through: bounded by
//! `redis.timeout`, an error or timeout is a miss for the caller, logged (at
//! most once a minute) and counted, never a failed request; a Redis that
//! just failed is not asked again for a moment; scripts and function
//! libraries Redis forgot are loaded again. The connection is
//! [`crate::redis_conn`]'s.

use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, Pipeline, RedisResult, Value};
use tokio::time::Instant;

use crate::config::RedisConfig;
use crate::error::Result;
use crate::redis_conn::{Handle, RedisConn};
use crate::telemetry;

/// Lua of ours: a script (called with `EVALSHA` by its SHA1) or a function
/// library (called with `FCALL` by its functions' names), with its source,
/// to load it again after Redis forgot it.
pub struct Lua {
    source: &'static str,
    hash: String,
    /// A library's name; `None` for a script.
    library: Option<&'static str>,
    /// A library's version (its `library version N` line), if it says one.
    version: Option<u32>,
}

impl Lua {
    /// The script of `source`.
    pub fn new(source: &'static str) -> Lua {
        Lua {
            source,
            hash: redis::Script::new(source).get_hash().to_owned(),
            library: None,
            version: None,
        }
    }

    /// The function library `name` of `source` (which starts `#!lua name=…`).
    pub fn library(name: &'static str, source: &'static str) -> Lua {
        Lua {
            source,
            hash: String::new(),
            library: Some(name),
            version: library_version(source),
        }
    }

    /// Its SHA1, for `EVALSHA`.
    pub fn get_hash(&self) -> &str {
        &self.hash
    }
}

/// The version a library's source states (`library version N`).
fn library_version(source: &str) -> Option<u32> {
    source
        .split("library version ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Users per call of the batch scripts (the cache's and the live board's):
/// one call's run time stays short (Redis runs nothing else meanwhile).
pub const SCRIPT_BATCH: usize = 500;

/// How long Redis counts as away after it failed to answer (see [`Redis::run`]).
const BACK_OFF: Duration = Duration::from_secs(1);

/// How often a Redis failure is logged (each one is counted).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The runner every Redis user goes through: the connection, the key
/// prefix, and the rules for each command — bounded by `redis.timeout`, an
/// error or timeout is logged (at most once a minute), counted in
/// `loyaltyd_redis_errors_total` and answered as `None`, never a failed
/// request; a Redis that just failed is not asked again for [`BACK_OFF`];
/// scripts Redis forgot (a restart, `SCRIPT FLUSH`) are loaded again. It
/// knows no key but the prefix: the cache and the live board own theirs.
/// Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Runner>,
}

struct Runner {
    conn: RedisConn,
    prefix: String,
    timeout: Duration,
    /// When a failure was last logged.
    last_log: std::sync::Mutex<Option<Instant>>,
    /// Until when Redis counts as away after a failure.
    down_until: std::sync::Mutex<Option<Instant>>,
}

impl Redis {
    /// Prepares the connection without connecting, so start-up never waits
    /// for Redis.
    pub fn new(cfg: &RedisConfig) -> Result<Redis> {
        Ok(Redis {
            inner: Arc::new(Runner {
                conn: RedisConn::new(cfg)?,
                prefix: cfg.key_prefix.clone(),
                timeout: cfg.timeout,
                last_log: std::sync::Mutex::new(None),
                down_until: std::sync::Mutex::new(None),
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

    /// True when Redis is a cluster (keys one script touches carry hash tags).
    pub fn is_cluster(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    /// Runs a pipeline whose replies are ignored, under the timeout; loads
    /// `scripts` and retries once if Redis does not know them (after a
    /// restart or `SCRIPT FLUSH`). In a cluster its commands go out one by
    /// one (see [`Handle::exec`]). `write` skips the back-off (see
    /// [`Redis::attempt`]). False when Redis could not be reached.
    pub async fn exec_pipeline(
        &self,
        what: &'static str,
        pipe: &Pipeline,
        write: bool,
        scripts: &[&Lua],
    ) -> bool {
        let conn = &self.inner.conn;
        let attempt = async {
            let mut c = conn.handle().await?;
            match c.exec(pipe).await {
                Err(e) if is_no_script(&e) => {
                    load_scripts(&mut c, scripts).await?;
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
    /// see [`Redis::exec_pipeline`].
    pub async fn query_pipeline<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        pipe: &Pipeline,
        write: bool,
        scripts: &[&Lua],
    ) -> Option<T> {
        let conn = &self.inner.conn;
        let attempt = async {
            let mut c = conn.handle().await?;
            match pipe.query_async::<T>(&mut c).await {
                Err(e) if is_no_script(&e) => {
                    load_scripts(&mut c, scripts).await?;
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

    /// Runs one command under the timeout (see [`Redis::run`]).
    pub async fn query<T: redis::FromRedisValue>(&self, what: &'static str, cmd: Cmd) -> Option<T> {
        let conn = &self.inner.conn;
        self.run(what, async move {
            cmd.query_async(&mut conn.handle().await?).await
        })
        .await
    }

    /// Takes a lock in Redis for `ttl` (`name` without the prefix); false
    /// when another holds it or Redis is away.
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

    /// Loads a function library unless every node that holds keys has it
    /// already (`replace`: load it over an older or equal version, e.g. at a
    /// start); a node holding a higher version keeps it (another loyaltyd,
    /// newer, shares the deployment). False when Redis is away. For clients
    /// of other languages, which call the library but cannot load it.
    pub async fn ensure_library(&self, library: &Lua, replace: bool) -> bool {
        let Some(name) = library.library else {
            return false;
        };
        let conn = &self.inner.conn;
        let nodes = match self.run("CLUSTER SLOTS", conn.masters()).await {
            Some(Some(masters)) => masters.into_iter().map(Some).collect(),
            Some(None) => vec![None],
            None => return false,
        };
        let mut missing = false;
        for node in nodes {
            let list = redis::cmd("FUNCTION")
                .arg("LIST")
                .arg("LIBRARYNAME")
                .arg(name)
                .arg("WITHCODE")
                .to_owned();
            let listed = self
                .run("FUNCTION LIST", async {
                    let mut c = conn.handle().await?;
                    match &node {
                        Some((host, port)) => c.on_node(list, host, *port).await,
                        None => list.query_async::<Value>(&mut c).await,
                    }
                })
                .await;
            match listed {
                Some(listed) => match loaded_version(&listed, name) {
                    // A newer loyaltyd's library: never replaced by ours.
                    Some(Some(v)) if library.version.is_some_and(|ours| v > ours) => return true,
                    Some(_) => {}
                    None => missing = true,
                },
                None => return false,
            }
        }
        if !missing && !replace {
            return true;
        }
        self.run("FUNCTION LOAD", async {
            load_scripts(&mut conn.handle().await?, &[library]).await
        })
        .await
        .is_some()
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
        self.exec_pipeline("LPUSH perf", &pipe, false, &[]).await
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
    pub async fn run<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        // A Redis that just failed to answer is not asked again for a
        // moment: a process (a one-shot CLI call above all) pays for an
        // outage once, not once per command.
        if self.is_away() {
            return None;
        }
        self.attempt(what, fut).await
    }

    /// True while Redis counts as away: within [`BACK_OFF`] of a failure to
    /// answer (on tokio's clock).
    fn is_away(&self) -> bool {
        self.inner
            .down_until
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|until| Instant::now() < until)
    }

    /// [`Redis::run`] without the back-off: for score writes, which are
    /// always tried (a write that skipped a Redis that is back would leave
    /// a stale entry for the cache sync to fix).
    pub async fn attempt<T>(
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
        if let Ok(mut until) = self.inner.down_until.lock() {
            *until = Some(Instant::now() + BACK_OFF);
        }
        self.record_error(what, &failure);
        None
    }

    /// Counts a Redis failure; logs it unless one was logged in the last minute.
    fn record_error(&self, what: &'static str, reason: &str) {
        telemetry::redis_error();
        let now = Instant::now();
        let log = match self.inner.last_log.lock() {
            Ok(mut last) if last.is_none_or(|at| now >= at + LOG_EVERY) => {
                *last = Some(now);
                true
            }
            _ => false,
        };
        if log {
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

/// The version of library `name` in a `FUNCTION LIST LIBRARYNAME ...
/// WITHCODE` reply: `None` when the reply holds no such library,
/// `Some(None)` for one that states no version. (LIBRARYNAME matches by
/// pattern: `loyaltyd` lists `loyaltyd_staging` too.)
fn loaded_version(listed: &Value, name: &str) -> Option<Option<u32>> {
    let Value::Array(libraries) = listed else {
        return None;
    };
    libraries.iter().find_map(|library| {
        let fields: Vec<&Value> = match library {
            Value::Array(items) => items.iter().collect(),
            Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => return None,
        };
        let field = |key: &[u8]| {
            fields.chunks(2).find_map(|kv| match kv {
                [Value::BulkString(k), Value::BulkString(v)] if k.as_slice() == key => {
                    Some(String::from_utf8_lossy(v).into_owned())
                }
                [Value::SimpleString(k), Value::BulkString(v)] if k.as_bytes() == key => {
                    Some(String::from_utf8_lossy(v).into_owned())
                }
                _ => None,
            })
        };
        (field(b"library_name").as_deref() == Some(name))
            .then(|| field(b"library_code").and_then(|code| library_version(&code)))
    })
}

/// Whether Redis answered that it does not know a script or a function.
fn is_no_script(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        || e.to_string().contains("Function not found")
}

/// Loads scripts and libraries (on every master of a cluster: the cluster
/// client sends `SCRIPT LOAD` and `FUNCTION LOAD` to all of them).
async fn load_scripts(c: &mut Handle, scripts: &[&Lua]) -> RedisResult<()> {
    for script in scripts {
        let cmd = match script.library {
            None => redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script.source)
                .to_owned(),
            Some(_) => redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(script.source)
                .to_owned(),
        };
        let _: Value = cmd.query_async(c).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tokio's paused clock: the back-off is measured on it, so the test
    // moves time instead of waiting for it.
    #[tokio::test(start_paused = true)]
    async fn a_failure_keeps_redis_away_for_the_back_off_and_no_longer() {
        let cfg = RedisConfig {
            // Nothing listens on port 1: every connect is refused.
            url: "redis://127.0.0.1:1/".to_owned().into(),
            ..Default::default()
        };
        let redis = Redis::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
        assert!(!redis.is_away());
        let get = || redis::cmd("GET").arg("k").to_owned();
        assert_eq!(redis.query::<Option<String>>("GET", get()).await, None);
        assert!(redis.is_away(), "a failure starts the back-off");
        tokio::time::advance(BACK_OFF - Duration::from_millis(10)).await;
        assert!(redis.is_away(), "still within the back-off");
        // Within it, a read does not even try (it answers at once).
        let before = Instant::now();
        assert_eq!(redis.query::<Option<String>>("GET", get()).await, None);
        assert_eq!(Instant::now(), before);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!redis.is_away(), "after the back-off Redis is asked again");
    }
}
