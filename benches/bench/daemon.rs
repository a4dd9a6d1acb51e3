//! The daemon as a process: its resources when idle (`--idle SECS`), and
//! throughput, latency and memory over a sustained load (`--soak SECS`).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loyaltyd::loyalty::{self, NewEvent};
use loyaltyd::queues;
use loyaltyd::types::{ContentType, Ident, Outcome, Priority, QueueKind, Scope, UserId};
use serde::Serialize;
use tokio::sync::Mutex;

use super::{Bench, Stats};

type R<T> = Result<T, String>;

/// One window of a daemon measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Seconds since the start.
    pub at_s: f64,
    /// Operations the load completed in the window (0 when idle).
    pub ops_per_s: f64,
    /// Operation latency p50 and p99 in the window, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The daemon's resident memory at the end of the window, MB.
    pub rss_mb: f64,
    /// The daemon's CPU use over the window, percent of one core.
    pub cpu_pct: f64,
}

/// A running `loyaltyd run` on the scratch database.
struct DaemonProc(Child);

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
    }
}

async fn start_daemon(b: &Bench, fast: bool) -> R<DaemonProc> {
    let mut config = b.config.clone();
    let opts = b.pool.connect_options();
    let base = std::env::var("DATABASE_URL").unwrap_or_default();
    let (head, query) = base
        .split_once('?')
        .map_or((base.as_str(), ""), |(h, q)| (h, q));
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let path = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    config.database.url = format!(
        "{}/{}{}{}",
        &head[..path],
        opts.get_database().unwrap_or("postgres"),
        if query.is_empty() { "" } else { "?" },
        query
    )
    .into();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    config.metrics.listen = ([127, 0, 0, 1], port).into();
    if fast {
        config.leaderboard.check_interval = Duration::from_secs(1);
        config.sweep.schedule = "0 * * * * *".into();
        config.queues.reorder_schedule = "*/10 * * * * *".into();
    }
    let text = config.to_toml();
    let path = std::env::temp_dir().join(format!("loyaltyd-bench-{}.toml", std::process::id()));
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    let child = Command::new(env!("CARGO_BIN_EXE_loyaltyd"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"))?;
    let daemon = DaemonProc(child);
    // Ready when /metrics answers (it is served before the database wait) and jobs run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(daemon)
}

/// (resident MB, CPU seconds so far) of a process, from /proc.
fn usage(pid: u32) -> R<(f64, f64)> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or("no VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the ')'.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    Ok((rss_kb / 1024.0, cpu))
}

/// Samples the daemon every `every` for `total`, while `ops` collects latencies.
async fn watch(
    pid: u32,
    total: Duration,
    every: Duration,
    ops: Option<Arc<Mutex<Vec<Duration>>>>,
) -> R<Vec<Window>> {
    let start = Instant::now();
    let mut windows = Vec::new();
    let (_, mut cpu_before) = usage(pid)?;
    while start.elapsed() < total {
        let window_start = Instant::now();
        tokio::time::sleep(every).await;
        let (rss, cpu) = usage(pid)?;
        let wall = window_start.elapsed().as_secs_f64();
        let lat = match &ops {
            Some(ops) => std::mem::take(&mut *ops.lock().await),
            None => Vec::new(),
        };
        let stats = Stats::of(&lat);
        windows.push(Window {
            at_s: start.elapsed().as_secs_f64(),
            ops_per_s: lat.len() as f64 / wall,
            p50_ms: stats.p50,
            p99_ms: stats.p99,
            rss_mb: rss,
            cpu_pct: (cpu - cpu_before) / wall * 100.0,
        });
        if let Some(w) = windows.last() {
            eprintln!(
                "bench: {:>5.0}s  {:>7.0} ops/s  p99 {:>7.2} ms  RSS {:>5.1} MB  CPU {:>5.1} %",
                w.at_s, w.ops_per_s, w.p99_ms, w.rss_mb, w.cpu_pct
            );
        }
        cpu_before = cpu;
    }
    Ok(windows)
}

/// The idle daemon: nothing to do but its checks.
pub async fn idle(b: &Bench, seconds: u64) -> R<Vec<Window>> {
    let daemon = start_daemon(b, false).await?;
    watch(
        daemon.0.id(),
        Duration::from_secs(seconds),
        Duration::from_secs(10.min(seconds)),
        None,
    )
    .await
}

/// Users the sustained load writes for.
pub const SOAK_USERS: i64 = 10_000;

/// The daemon under 16 writers for `seconds`, its jobs on fast schedules.
pub async fn soak(b: &Bench, seconds: u64) -> R<Vec<Window>> {
    loyaltyd::demo::seed(&b.quiet, SOAK_USERS, 100_000, 0, false)
        .await
        .map_err(|e| e.to_string())?;
    let daemon = start_daemon(b, true).await?;
    let lat = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let (ctx, lat, stop, users) = (b.ctx.clone(), lat.clone(), stop.clone(), SOAK_USERS);
        writers.push(tokio::spawn(async move {
            let mut queued: Vec<String> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let start = Instant::now();
                let result = if i % 10 < 7 {
                    let e = NewEvent {
                        user: UserId::new(((w * 1_000_003 + i * 7919) % users as u64) as i64 + 1)
                            .map_err(|e| e.to_string())?,
                        event_type: Ident::parse("e", "moderation_decision")
                            .map_err(|e| e.to_string())?,
                        content_type: ContentType::ALL[(i % 3) as usize],
                        content_id: Ident::parse("c", "soak").map_err(|e| e.to_string())?,
                        outcome: Outcome::ALL[((i / 3) % 3) as usize],
                        event_id: None,
                    };
                    loyalty::record_event(&ctx, &e).await.map(|_| ())
                } else if i % 10 < 9 || queued.len() < 50 {
                    let item = format!("soak-{w}-{i}");
                    let scope = Scope::Topic(
                        Ident::parse("t", &format!("soak-{}", i % 20))
                            .map_err(|e| e.to_string())?,
                    );
                    let id = Ident::parse("i", &item).map_err(|e| e.to_string())?;
                    let r = queues::add(
                        &ctx,
                        QueueKind::Post,
                        &id,
                        &scope,
                        Priority::new((i % 7) as f64).unwrap_or_default(),
                    )
                    .await
                    .map(|_| ());
                    queued.push(item);
                    r
                } else {
                    let item = queued.remove(0);
                    queues::remove(
                        &ctx,
                        QueueKind::Post,
                        &Ident::parse("i", &item).map_err(|e| e.to_string())?,
                    )
                    .await
                    .map(|_| ())
                };
                result.map_err(|e| e.to_string())?;
                lat.lock().await.push(start.elapsed());
            }
            Ok::<_, String>(())
        }));
    }
    let windows = watch(
        daemon.0.id(),
        Duration::from_secs(seconds),
        Duration::from_secs(10.min(seconds)),
        Some(lat),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    windows
}
