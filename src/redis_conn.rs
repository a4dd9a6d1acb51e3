//! Redis: the connection — one node (the seed's set-up, `redis.url`) or a
//! Redis Cluster (`redis.cluster_nodes`), behind one handle. Every command
//! goes through the runner of [`crate::redis_runner`] (timeouts, back-off,
//! counted failures, scripts loaded again after Redis forgot them).
//!
//! Redis is optional at run time: any error or timeout is a miss for the
//! caller, logged (at most once a minute) and counted in
//! `loyaltyd_redis_errors_total`, never a failed request. The connection
//! reconnects by itself when Redis comes back.
//!
//! Both connect lazily, so start-up never waits for Redis. A single node is
//! redis's `ConnectionManager` (it reconnects by itself); a cluster is
//! redis's async `ClusterConnection`, created on first use and again after
//! a failed attempt (it then follows slot moves and failovers by itself).
//!
//! What a cluster changes for the callers (the cache, the live board):
//! - keys one script touches must share a hash slot: their owners name them
//!   with a `{…}` hash tag in cluster mode ([`RedisConn::is_cluster`]);
//! - a pipeline must stay within one slot: [`Handle::exec`] sends a
//!   pipeline's commands one by one, concurrently, in cluster mode (the
//!   cluster client multiplexes them per node, which pipelines them anyway),
//!   and `MULTI` spans one slot only, so a multi-key pipeline is not atomic
//!   there;
//! - `SCAN` covers one node: [`RedisConn::masters`] lists the nodes to scan.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::Mutex;

use crate::config::RedisConfig;
use crate::error::{Error, Result};

/// The shared connection: cheap to clone.
#[derive(Clone)]
pub struct RedisConn {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use (and again after a failed try).
///
/// The connect runs in a task of its own, never inside a caller's command
/// timeout: making a cluster connection (reach a seed, read the slot map,
/// connect to every master) can take longer than `redis.timeout` on a
/// loaded machine, and a connect cancelled by each caller's timeout and
/// started again by the next would never finish (seen after a failover
/// under 16 writers). Callers wait for it within their own timeout; the
/// connect goes on without them and the next caller finds it made.
struct LazyCluster {
    client: ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
    /// True while a connect task runs.
    connecting: std::sync::atomic::AtomicBool,
    /// Woken when a connect task ends, made or failed.
    connected: tokio::sync::Notify,
    /// Why the last connect failed.
    last_error: std::sync::Mutex<Option<String>>,
    /// Nodes to ask for the slot map: every node of the last map, then the
    /// configured ones.
    nodes: std::sync::Mutex<Vec<(String, u16)>>,
    seeds: Vec<(String, u16)>,
    timeout: Duration,
    /// When the connection was last dropped (ms since the epoch).
    last_reset: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One connection, ready to send on.
pub enum Handle {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// The connection the configuration names, without connecting.
    pub fn new(cfg: &RedisConfig) -> Result<RedisConn> {
        if cfg.cluster_nodes.is_empty() {
            let client = redis::Client::open(cfg.url.expose()).map_err(|e| {
                Error::Config(format!(
                    "key \"redis.url\": {}",
                    cfg.url.redact_in(&e.to_string())
                ))
            })?;
            let manager_cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout))
                .set_response_timeout(Some(cfg.timeout))
                // No retries inside a command: an unreachable Redis is a
                // miss at once, and the manager reconnects on a later command.
                .set_number_of_retries(0)
                .set_max_delay(Duration::from_millis(500));
            let conn = ConnectionManager::new_lazy_with_config(client, manager_cfg)
                .map_err(|e| Error::Config(format!("key \"redis.url\": {e}")))?;
            return Ok(RedisConn {
                kind: Kind::Single(conn),
            });
        }
        let mut seeds = Vec::new();
        for node in &cfg.cluster_nodes {
            let info =
                redis::IntoConnectionInfo::into_connection_info(node.expose()).map_err(|e| {
                    Error::Config(format!(
                        "key \"redis.cluster_nodes\": {}",
                        node.redact_in(&e.to_string())
                    ))
                })?;
            match info.addr() {
                redis::ConnectionAddr::Tcp(host, port) => seeds.push((host.clone(), *port)),
                redis::ConnectionAddr::TcpTls { host, port, .. } => {
                    seeds.push((host.clone(), *port))
                }
                _ => {}
            }
        }
        let client = ClusterClient::builder(cfg.cluster_nodes.iter().map(|n| n.expose()))
            .connection_timeout(cfg.timeout)
            .response_timeout(cfg.timeout)
            // A moved slot or a failover is followed (a redirect is a
            // retry); a dead node is not waited for beyond `redis.timeout`.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .map_err(|e| Error::Config(format!("key \"redis.cluster_nodes\": {e}")))?;
        Ok(RedisConn {
            kind: Kind::Cluster(Arc::new(LazyCluster {
                client,
                conn: Mutex::new(None),
                connecting: std::sync::atomic::AtomicBool::new(false),
                connected: tokio::sync::Notify::new(),
                last_error: std::sync::Mutex::new(None),
                nodes: std::sync::Mutex::new(Vec::new()),
                seeds,
                timeout: cfg.timeout,
                last_reset: AtomicU64::new(0),
            })),
        })
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// A connection to send on (connecting to the cluster if not yet).
    pub async fn handle(&self) -> RedisResult<Handle> {
        match &self.kind {
            Kind::Single(c) => Ok(Handle::Single(c.clone())),
            Kind::Cluster(lazy) => {
                if let Some(c) = lazy.conn.lock().await.as_ref() {
                    return Ok(Handle::Cluster(c.clone()));
                }
                // Registered before the task can finish: no wake-up is missed.
                let done = lazy.connected.notified();
                if !lazy.connecting.swap(true, Ordering::AcqRel) {
                    let lazy = Arc::clone(lazy);
                    tokio::spawn(async move {
                        let made = lazy.client.get_async_connection().await;
                        match made {
                            Ok(c) => *lazy.conn.lock().await = Some(c),
                            Err(e) => {
                                if let Ok(mut last) = lazy.last_error.lock() {
                                    *last = Some(e.to_string());
                                }
                            }
                        }
                        lazy.connecting.store(false, Ordering::Release);
                        lazy.connected.notify_waiters();
                    });
                }
                done.await;
                if let Some(c) = lazy.conn.lock().await.as_ref() {
                    return Ok(Handle::Cluster(c.clone()));
                }
                let why = lazy
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .unwrap_or_else(|| "no connection".into());
                Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    format!("connecting to the Redis Cluster: {why}"),
                )))
            }
        }
    }

    /// Drops a cluster connection, so the next command makes a new one
    /// with a fresh slot map (after a failover the old one can stay stuck
    /// on the dead node); nothing for a single node.
    pub async fn reset(&self) {
        if let Kind::Cluster(lazy) = &self.kind {
            *lazy.conn.lock().await = None;
            lazy.last_reset.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// [`RedisConn::reset`], unless the connection was reset in the last second.
    pub async fn reset_soon(&self) {
        if let Kind::Cluster(lazy) = &self.kind
            && now_ms() >= lazy.last_reset.load(Ordering::Relaxed) + 1000
        {
            self.reset().await;
        }
    }

    /// The nodes that hold keys: the masters of a cluster (from `CLUSTER
    /// SLOTS`), or `None` for a single node. Asks the nodes of the last map
    /// and the configured ones in turn, each within `redis.timeout`, until
    /// one answers: during a failover some of them are dead.
    pub async fn masters(&self) -> RedisResult<Option<Vec<(String, u16)>>> {
        let Kind::Cluster(lazy) = &self.kind else {
            return Ok(None);
        };
        let mut candidates = lazy.nodes.lock().map(|n| n.clone()).unwrap_or_default();
        candidates.extend(lazy.seeds.iter().cloned());
        let mut last_error = None;
        for (host, port) in candidates {
            // A connection of its own: the cluster client's may be busy
            // repairing itself while the slot map is what is in question.
            let ask = async {
                let client = redis::Client::open((host.as_str(), port))?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn)
                    .await
            };
            let reply = match tokio::time::timeout(lazy.timeout, ask).await {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
            };
            match reply {
                Ok(slots) => {
                    let (masters, all) = parse_slots(slots);
                    if let Ok(mut nodes) = lazy.nodes.lock() {
                        *nodes = all;
                    }
                    return Ok(Some(masters));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no cluster node configured").into()
        }))
    }
}

/// A node's host and port.
type Node = (String, u16);

/// A `CLUSTER SLOTS` reply's masters, and every node it names.
fn parse_slots(slots: Value) -> (Vec<Node>, Vec<Node>) {
    let node = |v: &Value| -> Option<(String, u16)> {
        let Value::Array(parts) = v else { return None };
        let host = match parts.first()? {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let Value::Int(port) = parts.get(1)? else {
            return None;
        };
        Some((host, u16::try_from(*port).ok()?))
    };
    let (mut masters, mut all) = (Vec::new(), Vec::new());
    if let Value::Array(ranges) = slots {
        for range in ranges {
            // [start, end, master, replica, ...], each node [host, port, id, ...]
            let Value::Array(parts) = range else { continue };
            for (i, n) in parts.iter().enumerate().skip(2) {
                let Some(n) = node(n) else { continue };
                if i == 2 && !masters.contains(&n) {
                    masters.push(n.clone());
                }
                if !all.contains(&n) {
                    all.push(n);
                }
            }
        }
    }
    (masters, all)
}

impl Handle {
    /// Runs a pipeline whose replies are all ignored. In a cluster its
    /// commands go out one by one, concurrently (a pipeline must stay in
    /// one slot there, and `MULTI` too); the first error is returned.
    pub async fn exec(&mut self, pipe: &Pipeline) -> RedisResult<()> {
        match self {
            Handle::Single(c) => pipe.query_async::<()>(c).await,
            Handle::Cluster(c) => {
                let sends = pipe.cmd_iter().map(|cmd| {
                    let mut c = c.clone();
                    // A server's error comes back as a value here: make it an error.
                    async move { c.req_packed_command(cmd).await?.extract_error().map(|_| ()) }
                });
                futures_util::future::try_join_all(sends).await.map(|_| ())
            }
        }
    }

    /// Sends `cmd` to the node at `host:port` (a cluster's `SCAN` is per node).
    pub async fn on_node(&mut self, cmd: Cmd, host: &str, port: u16) -> RedisResult<Value> {
        match self {
            Handle::Single(c) => cmd.query_async(c).await,
            Handle::Cluster(c) => {
                let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                });
                c.route_command(cmd, to).await?.extract_error()
            }
        }
    }
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Single(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Single(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}
