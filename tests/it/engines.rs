//! The distributed engines, started by the tests that need them: a Redis
//! Cluster of three masters and three replicas on loopback ports, and a
//! PostgreSQL streaming replica of the test server (`pg_basebackup -R`).
//! Each is torn down when its handle is dropped.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A free loopback port. (This file is shared with the benchmarks, so it
/// leans on nothing else of the test crate.)
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}

/// A port that is free, and whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        let Some(bus) = port.checked_add(10_000) else {
            // Ephemeral ports sit high: take one below and check it.
            let low = 20_000 + port % 20_000;
            if std::net::TcpListener::bind(("127.0.0.1", low)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", low + 10_000)).is_ok()
            {
                return low;
            }
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// The port of a `CLUSTER NODES` line (`<id> <ip>:<port>@<bus> ...`).
fn node_port(line: &str) -> Option<u16> {
    line.split_whitespace()
        .nth(1)?
        .split(['@', ':'])
        .nth(1)?
        .parse()
        .ok()
}

fn temp_dir(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loyaltyd-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// A Redis Cluster of three masters, each with one replica.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        // One cluster forming at a time: six servers meeting and electing on
        // a loaded two-core machine is what takes long.
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = ONE_AT_A_TIME.lock().await;
        let dir = temp_dir("cluster");
        let mut ports = Vec::new();
        while ports.len() < 6 {
            let p = free_cluster_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut cluster = RedisCluster {
            ports: ports.clone(),
            children: Vec::new(),
            dir: dir.clone(),
        };
        for &port in &ports {
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "1000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    // The failover test freezes a replica (DEBUG SLEEP).
                    "--enable-debug-command",
                    "yes",
                    // A replica's first sync starts at once, not after 5 s.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                ])
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("redis-server: {e}"));
            cluster.children.push(Some(child));
        }
        for &port in &ports {
            wait_for_port(port).await;
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_settled().await;
        cluster
    }

    /// Every node's URL (the configuration's `redis.cluster_nodes`).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// A node's view of the cluster, through redis-cli.
    fn cli(&self, port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn alive(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// The ports of the masters, as the live nodes see them.
    pub fn masters(&self) -> Vec<u16> {
        let Some(&port) = self.alive().first() else {
            return Vec::new();
        };
        let mut masters: Vec<u16> = self
            .cli(port, &["cluster", "nodes"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(node_port)
            .collect();
        masters.sort();
        masters
    }

    /// Waits until every live node reports the cluster ok with three masters
    /// and every replica in sync.
    pub async fn wait_settled(&self) {
        for _ in 0..600 {
            let ok = self.alive().iter().all(|&p| {
                self.cli(p, &["cluster", "info"])
                    .contains("cluster_state:ok")
            });
            if ok && self.masters().len() == 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the Redis Cluster did not settle");
    }

    /// The port of the replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let nodes = self.cli(self.alive()[0], &["cluster", "nodes"]);
        let port_of = node_port;
        let id = nodes
            .lines()
            .find(|l| port_of(l) == Some(port))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no node on {port}"))
            .to_owned();
        nodes
            .lines()
            .find(|l| l.split_whitespace().nth(3) == Some(id.as_str()))
            .and_then(port_of)
            .unwrap_or_else(|| panic!("no replica of {port}"))
    }

    /// Freezes the node on `port` for `secs` (DEBUG SLEEP), in the background.
    pub fn freeze(&self, port: u16, secs: f64) -> Child {
        Command::new("redis-cli")
            .args(["-p", &port.to_string(), "debug", "sleep", &secs.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"))
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.ports.iter().position(|&p| p == port)
            && let Some(mut c) = self.children[i].take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().filter_map(Option::take) {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_for_port(port: u16) {
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on port {port}");
}

/// PostgreSQL's binaries (Debian's layout).
fn pg_bin(name: &str) -> PathBuf {
    let root = PathBuf::from("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .last()
        .map(|v| v.join("bin").join(name))
        .unwrap_or_else(|| panic!("no PostgreSQL under {}", root.display()))
}

/// A command run as the `postgres` user (the server refuses to run as root).
fn as_postgres(program: PathBuf) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

/// A streaming replica of the test server, on a loopback port of its own.
pub struct PgReplica {
    pub port: u16,
    dir: PathBuf,
    running: bool,
}

impl PgReplica {
    /// Copies the server with `pg_basebackup -R` and starts the copy as a
    /// hot standby streaming from it.
    pub async fn start() -> PgReplica {
        let dir = temp_dir("replica");
        let data = dir.join("data");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| panic!("chown: {e}"));
        assert!(chown.success());
        let primary_socket = "/var/run/postgresql";
        // One base backup at a time (they all want a checkpoint), and again
        // if one is cut off.
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = ONE_AT_A_TIME.lock().await;
        let mut tries = 0;
        loop {
            let out = as_postgres(pg_bin("pg_basebackup"))
                .args(["-h", primary_socket, "-D"])
                .arg(&data)
                .args(["-R", "-X", "stream", "-c", "fast"])
                .output()
                .unwrap_or_else(|e| panic!("pg_basebackup: {e}"));
            if out.status.success() {
                break;
            }
            tries += 1;
            assert!(
                tries < 3,
                "pg_basebackup: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = std::fs::remove_dir_all(&data);
        }
        // Debian keeps the server's configuration outside the data directory:
        // the copy gets a minimal one of its own. (Feedback: the primary's
        // vacuum keeps what the replica's readers see, so replay never waits
        // 30 s for one of them, max_standby_streaming_delay, to end.)
        let port = free_port();
        // A hot standby needs these at least as high as on its primary.
        let out = Command::new("psql")
            .args(["-h", primary_socket, "-d", "postgres", "-Atc"])
            .arg(
                "SELECT string_agg(name || ' = ' || setting, E'\\n') FROM pg_settings WHERE name IN \
                 ('max_connections', 'max_worker_processes', 'max_wal_senders', \
                  'max_prepared_transactions', 'max_locks_per_transaction')",
            )
            .output()
            .unwrap_or_else(|e| panic!("psql: {e}"));
        let limits = String::from_utf8_lossy(&out.stdout).into_owned();
        std::fs::write(
            data.join("postgresql.conf"),
            format!(
                "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 hot_standby = on\nhot_standby_feedback = on\nshared_buffers = 128MB\n{limits}\n",
                dir.display()
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(data.join("pg_ident.conf"), "").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let mut replica = PgReplica {
            port,
            dir,
            running: false,
        };
        replica.resume();
        wait_for_port(port).await;
        replica
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The replica's URL, as root over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the replica at once (`pg_ctl stop -m immediate`).
    pub fn stop(&mut self) {
        let _ = as_postgres(pg_bin("pg_ctl"))
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.data())
            .output();
        self.running = false;
    }

    /// Starts it (again).
    pub fn resume(&mut self) {
        let out = as_postgres(pg_bin("pg_ctl"))
            .args(["start", "-w", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .output()
            .unwrap_or_else(|e| panic!("pg_ctl start: {e}"));
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
        self.running = true;
    }
}

impl Drop for PgReplica {
    fn drop(&mut self) {
        if self.running {
            self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
