//! The benchmark harness: sizes, a scratch database, alternating sides,
//! percentiles, and the report. The cases are in `cases.rs`; the seed's
//! algorithms, reimplemented statement for statement, in `seed.rs`.

#![allow(dead_code)]

mod adoption;
mod board;
mod cases;
mod daemon;
mod scale;
mod seed;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loyaltyd::config::Config;
use loyaltyd::context::Context;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// What to run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Small sizes: finishes in under two minutes (the test suite runs it).
    pub small: bool,
    /// Adds the 1,000,000-user / 20,000,000-event sweep.
    pub large: bool,
    /// JSON instead of Markdown.
    pub json: bool,
    /// Measure the idle daemon for this many seconds instead of the cases.
    pub idle: Option<u64>,
    /// Run the sustained load for this many seconds instead of the cases.
    pub soak: Option<u64>,
    /// Run only the cases whose group name contains this, or one of these
    /// comma-separated parts (`--only sweep`, `--only "event recording,queues"`);
    /// for iterating on one part. The data is seeded either way.
    pub only: Option<String>,
    /// Install the switchable metrics recorder (off inside the test binary,
    /// whose own tests install the exporter).
    pub recorder: bool,
}

impl Opts {
    /// Reads `--small`, `--large`, `--json`; ignores the rest (cargo passes `--bench`).
    pub fn from_args(args: &[String]) -> Opts {
        Opts {
            small: args.iter().any(|a| a == "--small"),
            large: args.iter().any(|a| a == "--large"),
            json: args.iter().any(|a| a == "--json"),
            recorder: true,
            idle: value_after(args, "--idle").and_then(|v| v.parse().ok()),
            soak: value_after(args, "--soak").and_then(|v| v.parse().ok()),
            only: value_after(args, "--only").map(|v| v.to_lowercase()),
        }
    }

    /// The sizes this run uses.
    pub fn sizes(&self) -> Sizes {
        if self.small {
            Sizes {
                users: 2_000,
                events: 40_000,
                heavy_events: 2_000,
                iterations: 60,
                concurrent_ops: 20,
                batches: 3,
                queue_sizes: vec![500, 2_000],
                queue_iterations: |_| 20,
                board: vec![5_000],
                sweep: vec![(2_000, 40_000)],
                adoption: vec![(2_000, 40_000)],
                seed_loop_sample: 100,
                rounds: 1,
            }
        } else {
            let mut sweep = vec![(200_000, 4_000_000)];
            let mut adoption = vec![(200_000, 4_000_000)];
            let mut board = vec![1_000_000];
            if self.large {
                board.push(10_000_000);
                sweep.push((1_000_000, 20_000_000));
                adoption.push((1_000_000, 20_000_000));
            }
            Sizes {
                users: 200_000,
                events: 4_000_000,
                heavy_events: 20_000,
                iterations: 2_000,
                concurrent_ops: 200,
                batches: 20,
                queue_sizes: vec![1_000, 10_000, 100_000],
                queue_iterations: |n| {
                    if n >= 100_000 {
                        60
                    } else if n >= 10_000 {
                        200
                    } else {
                        300
                    }
                },
                board,
                sweep,
                adoption,
                seed_loop_sample: 2_000,
                rounds: 3,
            }
        }
    }
}

/// The argument after `flag`, if both are there.
fn value_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub users: i64,
    pub events: i64,
    pub heavy_events: i64,
    pub iterations: usize,
    pub concurrent_ops: usize,
    pub batches: usize,
    pub queue_sizes: Vec<i64>,
    /// Remove + add + position rounds per queue size (the seed's remove is O(n)).
    pub queue_iterations: fn(i64) -> usize,
    /// Ranked users of the leaderboard cases.
    pub board: Vec<i64>,
    pub sweep: Vec<(i64, i64)>,
    /// Sizes of the adopted databases (users, events).
    pub adoption: Vec<(i64, i64)>,
    pub seed_loop_sample: i64,
    pub rounds: usize,
}

/// One measured side of one case.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The group (event recording, queues at 10k, ...).
    pub group: String,
    /// The case within it.
    pub case: String,
    /// Whose algorithm: `loyaltyd`, `seed`, `floor`, `plain`.
    pub side: String,
    /// Samples.
    pub n: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Operations (or events) per second, where it applies.
    pub per_second: Option<f64>,
    /// This side's p50 divided by loyaltyd's p50 in the same case (loyaltyd = 1).
    pub ratio_to_loyaltyd: Option<f64>,
    /// How it was obtained, when not plainly measured (sampled, extrapolated).
    pub note: String,
}

/// Everything measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// The daemon over time (`--idle`, `--soak`).
    pub windows: Vec<daemon::Window>,
    pub seconds: f64,
}

impl Report {
    /// Adds the rows of one case, computing each side's ratio to loyaltyd's.
    pub fn case(&mut self, group: &str, case: &str, sides: Vec<Side>) {
        let ours = sides
            .iter()
            .find(|s| s.side == "loyaltyd")
            .map(|s| s.stats.p50);
        for s in sides {
            let ratio = ours.filter(|o| *o > 0.0).map(|o| s.stats.p50 / o);
            eprintln!(
                "bench: {group} / {case} / {}: p50 {:.3} ms{}",
                s.side,
                s.stats.p50,
                ratio
                    .map(|r| format!(" ({r:.2}x loyaltyd)"))
                    .unwrap_or_default()
            );
            self.rows.push(Row {
                group: group.into(),
                case: case.into(),
                side: s.side,
                n: s.stats.n,
                p50_ms: s.stats.p50,
                p95_ms: s.stats.p95,
                p99_ms: s.stats.p99,
                per_second: s.per_second,
                ratio_to_loyaltyd: ratio,
                note: s.note,
            });
        }
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn markdown(&self, opts: &Opts) -> String {
        let mut out = format!(
            "Benchmark ({} mode), {:.0} s. Times in ms; ratio = this side's p50 / loyaltyd's p50 (lower is faster).\n\n",
            if opts.idle.is_some() {
                "idle daemon"
            } else if opts.soak.is_some() {
                "sustained load"
            } else if opts.small {
                "small"
            } else if opts.large {
                "large"
            } else {
                "full"
            },
            self.seconds
        );
        if !self.windows.is_empty() {
            out.push_str("| at s | ops/s | p50 ms | p99 ms | daemon RSS MB | daemon CPU % |\n|---:|---:|---:|---:|---:|---:|\n");
            for w in &self.windows {
                out.push_str(&format!(
                    "| {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} |\n",
                    w.at_s, w.ops_per_s, w.p50_ms, w.p99_ms, w.rss_mb, w.cpu_pct
                ));
            }
        }
        let mut group = String::new();
        for r in &self.rows {
            if r.group != group {
                group = r.group.clone();
                out.push_str(&format!(
                    "\n**{group}**\n\n| case | side | n | p50 | p95 | p99 | per second | ratio |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
                ));
            }
            out.push_str(&format!(
                "| {} | {}{} | {} | {} | {} | {} | {} | {} |\n",
                r.case,
                r.side,
                if r.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.note)
                },
                r.n,
                fmt_ms(r.p50_ms),
                fmt_ms(r.p95_ms),
                fmt_ms(r.p99_ms),
                r.per_second
                    .map(|p| format!("{p:.0}"))
                    .unwrap_or_else(|| "–".into()),
                r.ratio_to_loyaltyd
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "–".into()),
            ));
        }
        out
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 1.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

/// One side's measurements.
pub struct Side {
    pub side: String,
    pub stats: Stats,
    pub per_second: Option<f64>,
    pub note: String,
}

impl Side {
    pub fn new(side: &str, samples: &[Duration]) -> Side {
        Side {
            side: side.into(),
            stats: Stats::of(samples),
            per_second: None,
            note: String::new(),
        }
    }

    pub fn rate(mut self, per_second: f64) -> Side {
        self.per_second = Some(per_second);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Side {
        self.note = note.into();
        self
    }
}

/// Nearest-rank percentiles of a set of samples, in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        if n == 0 {
            return Stats::default();
        }
        let pct = |p: f64| ms[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Stats {
            n,
            p50: pct(50.0),
            p95: pct(95.0),
            p99: pct(99.0),
        }
    }
}

/// Times one future.
pub async fn timed<T, E: std::fmt::Display>(
    fut: impl Future<Output = Result<T, E>>,
) -> Result<(T, Duration), String> {
    let start = Instant::now();
    let v = fut.await.map_err(|e| e.to_string())?;
    Ok((v, start.elapsed()))
}

/// A metrics recorder that can be switched off: the telemetry-overhead case
/// alternates between recording and not within one process.
pub struct Toggle {
    pub inner: metrics_exporter_prometheus::PrometheusRecorder,
    pub on: Arc<AtomicBool>,
}

impl Recorder for Toggle {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

/// Installs the toggleable recorder once per process; returns its switch.
pub fn telemetry_switch(install: bool) -> Arc<AtomicBool> {
    static SWITCH: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    SWITCH
        .get_or_init(|| {
            let on = Arc::new(AtomicBool::new(true));
            if !install {
                return on;
            }
            if let Ok(builder) = loyaltyd::telemetry::prometheus_builder() {
                let toggle = Toggle {
                    inner: builder.build_recorder(),
                    on: on.clone(),
                };
                let _ = metrics::set_global_recorder(toggle);
            }
            on
        })
        .clone()
}

/// The scratch database and the contexts on it.
pub struct Bench {
    pub admin: PgPool,
    pub db_name: String,
    pub pool: PgPool,
    pub config: Config,
    /// Telemetry on (recorder + perf lists): how the daemon and CLI run.
    pub ctx: Context,
    /// Perf lists off.
    pub quiet: Context,
    pub redis: redis::aio::MultiplexedConnection,
    pub sizes: Sizes,
    pub switch: Arc<AtomicBool>,
    /// See [`Opts::only`].
    pub only: Option<String>,
}

impl Bench {
    /// Whether the case group `name` is to run.
    pub fn wants(&self, name: &str) -> bool {
        // Several groups: `--only "event recording,queues"`.
        self.only.as_deref().is_none_or(|o| {
            o.split(',')
                .any(|part| name.to_lowercase().contains(part.trim()))
        })
    }

    async fn create(opts: &Opts) -> Result<Bench, String> {
        let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            "postgres://root@localhost/postgres?host=/var/run/postgresql".into()
        });
        let admin_opts: PgConnectOptions = url.parse().map_err(|e| format!("DATABASE_URL: {e}"))?;
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(admin_opts.clone())
            .await
            .map_err(|e| format!("connecting to {}: {e}", loyaltyd::config::redact_url(&url)))?;
        let db_name = format!("loyaltyd_bench_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name}"
        )))
        .execute(&admin)
        .await
        .map_err(|e| e.to_string())?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await
            .map_err(|e| e.to_string())?;
        // loyaltyd's own pool settings (its liveness checks cost round trips),
        // without its statement timeout: seeding and big refreshes take long.
        let pool = loyaltyd::db::pool_options(&Config::default().database)
            .max_connections(24)
            .connect_with(admin_opts.clone().database(&db_name))
            .await
            .map_err(|e| e.to_string())?;
        loyaltyd::db::migrate(&pool)
            .await
            .map_err(|e| e.to_string())?;
        // The seed's algorithms run beside loyaltyd's on this database and
        // write scores themselves: legacy mode, as a forum switching over
        // runs them (a direct score write is refused otherwise, migration 8).
        sqlx::query("UPDATE loyaltyd_settings SET legacy_score_writes = true")
            .execute(&pool)
            .await
            .map_err(|e| e.to_string())?;
        let mut config = Config::default();
        config.redis.url = std::env::var("REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
            .into();
        config.redis.key_prefix = format!("bench:{}:", std::process::id());
        config.sweep.batch_size = 10_000;
        let switch = telemetry_switch(opts.recorder);
        let ctx =
            Context::with_pool(config.clone(), pool.clone(), true).map_err(|e| e.to_string())?;
        let quiet =
            Context::with_pool(config.clone(), pool.clone(), false).map_err(|e| e.to_string())?;
        let redis = redis::Client::open(config.redis.url.expose())
            .map_err(|e| e.to_string())?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        Ok(Bench {
            admin,
            db_name,
            pool,
            config,
            ctx,
            quiet,
            redis,
            sizes: opts.sizes(),
            switch,
            only: opts.only.clone(),
        })
    }

    async fn drop_scratch(self) {
        self.pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db_name
        )))
        .execute(&self.admin)
        .await;
        let mut r = self.redis.clone();
        let pattern = format!("{}*", self.config.redis.key_prefix);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut r)
            .await
            .unwrap_or_default();
        for chunk in keys.chunks(1000) {
            let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut r).await;
        }
    }
}

/// Runs every case; the scratch database is dropped at the end, also on failure.
pub async fn run(opts: &Opts) -> Result<Report, String> {
    let started = Instant::now();
    let bench = Bench::create(opts).await?;
    let mut report = Report::default();
    let result = if let Some(secs) = opts.idle {
        daemon::idle(&bench, secs).await.map(|w| report.windows = w)
    } else if let Some(secs) = opts.soak {
        daemon::soak(&bench, secs).await.map(|w| report.windows = w)
    } else {
        cases::all(&bench, &mut report).await
    };
    bench.drop_scratch().await;
    result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
