//! Telemetry: the Prometheus metrics (names, HELP texts, buckets, the
//! exporter) and logging. The Redis perf lists, and the timer every
//! operation records through, are in [`crate::perf`].
//!
//! Every metric is described where it is named ([`DESCRIPTIONS`]): the
//! exporter serves its HELP text, and `promtool check metrics` passes.
//! Without an installed recorder (the one-shot CLI commands) the `metrics`
//! macros are no-ops, so library calls cost nothing extra there.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::{LogConfig, LogFormat};
use crate::error::{Error, Result};
use crate::types::QueueKind;

/// Histogram of every service operation, labels `operation`, `outcome` (and `queue`).
pub const OPERATION_DURATION: &str = "loyaltyd_operation_duration_seconds";
/// Counter of failed service operations, label `operation`.
pub const OPERATION_ERRORS: &str = "loyaltyd_operation_errors_total";
/// Counter of scheduled job runs, labels `job`, `outcome`.
pub const JOB_RUNS: &str = "loyaltyd_job_runs_total";
/// Histogram of job run durations, label `job`.
pub const JOB_DURATION: &str = "loyaltyd_job_duration_seconds";
/// Gauge: when each job last ran to its end (with or without work), label `job`.
pub const JOB_LAST_SUCCESS: &str = "loyaltyd_job_last_success_timestamp_seconds";
/// Gauge: leaderboard changes not yet refreshed into the view.
pub const LEADERBOARD_PENDING: &str = "loyaltyd_leaderboard_pending_changes";
/// Gauge: seconds since the view was last refreshed.
pub const LEADERBOARD_AGE: &str = "loyaltyd_leaderboard_age_seconds";
/// Gauge: users whose score the last sweep found drifted.
pub const DRIFTED_USERS: &str = "loyaltyd_integrity_drifted_users";
/// Counter: failed or timed-out Redis commands.
pub const REDIS_ERRORS: &str = "loyaltyd_redis_errors_total";
/// Counter: perf samples dropped (channel full or Redis unavailable).
pub const PERF_DROPPED: &str = "loyaltyd_perf_samples_dropped_total";
/// Histogram: from a score's commit to its cache entry, for changes the
/// daemon's cache sync brought to Redis.
pub const CACHE_SYNC_DELAY: &str = "loyaltyd_cache_sync_delay_seconds";
/// Counter: cache syncs that did not complete (Redis or PostgreSQL away).
pub const CACHE_SYNC_FAILURES: &str = "loyaltyd_cache_sync_failures_total";
/// Counter: failures of the daemon's background work that no request
/// sees (label `task`, one of [`Task`]); each is logged too.
pub const BACKGROUND_FAILURES: &str = "loyaltyd_background_failures_total";
/// Counter: reads that may lag, by `target` (`replica` or `primary`) and
/// `reason` (`ok` on a replica; for the primary `no_replica`, `lag`,
/// `down`, `error`).
pub const LAGGING_READS: &str = "loyaltyd_lagging_reads_total";
/// Gauge: each replica's replay lag as last checked, label `replica`.
pub const REPLICA_LAG: &str = "loyaltyd_replica_lag_seconds";
/// Gauge: items waiting, label `queue` (the forum's backlog, whoever wrote it).
pub const QUEUE_ITEMS: &str = "loyaltyd_queue_items";
/// Gauge: items in the longest scope of each queue, label `queue`.
pub const QUEUE_LONGEST_SCOPE: &str = "loyaltyd_queue_longest_scope_items";
/// Gauge: age of the oldest waiting item, label `queue` (0 when empty).
pub const QUEUE_OLDEST_AGE: &str = "loyaltyd_queue_oldest_item_age_seconds";
/// Gauge: `queues.oldest_item_bound`, what the backlog alert compares with.
pub const QUEUE_OLDEST_BOUND: &str = "loyaltyd_queue_oldest_item_bound_seconds";
/// Counter: items added to and removed from each queue by any writer,
/// labels `queue`, `change` (`added`, `removed`).
pub const QUEUE_CHANGES: &str = "loyaltyd_queue_changes_total";
/// Counter: moderation events recorded by any writer, labels
/// `content_type`, `outcome`.
pub const FORUM_EVENTS: &str = "loyaltyd_forum_events_total";
/// Gauge: users ranked on the live board in Redis.
pub const LIVE_BOARD_USERS: &str = "loyaltyd_live_board_users";
/// Gauge: always 1, label `version`.
pub const BUILD_INFO: &str = "loyaltyd_build_info";

/// Every metric the program exports (histograms also as `_bucket`, `_count`, `_sum`).
pub const METRICS: &[&str] = &[
    OPERATION_DURATION,
    OPERATION_ERRORS,
    JOB_RUNS,
    JOB_DURATION,
    JOB_LAST_SUCCESS,
    LEADERBOARD_PENDING,
    LEADERBOARD_AGE,
    DRIFTED_USERS,
    REDIS_ERRORS,
    PERF_DROPPED,
    CACHE_SYNC_DELAY,
    CACHE_SYNC_FAILURES,
    BACKGROUND_FAILURES,
    LAGGING_READS,
    REPLICA_LAG,
    QUEUE_ITEMS,
    QUEUE_LONGEST_SCOPE,
    QUEUE_OLDEST_AGE,
    QUEUE_OLDEST_BOUND,
    QUEUE_CHANGES,
    FORUM_EVENTS,
    LIVE_BOARD_USERS,
    BUILD_INFO,
];

/// The HELP text of every metric, and its unit.
pub const DESCRIPTIONS: &[(&str, Unit, &str)] = &[
    (
        QUEUE_ITEMS,
        Unit::Count,
        "Items waiting in each moderation queue, whoever added them (the forum-wide backlog: the same on every daemon).",
    ),
    (
        QUEUE_LONGEST_SCOPE,
        Unit::Count,
        "Items in the longest scope (topic, conversation) of each queue.",
    ),
    (
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "How long the oldest item of each queue has waited (0 when the queue is empty).",
    ),
    (
        QUEUE_OLDEST_BOUND,
        Unit::Seconds,
        "queues.oldest_item_bound: how long an item may wait before LoyaltydQueueBacklog fires.",
    ),
    (
        QUEUE_CHANGES,
        Unit::Count,
        "Items added to and removed from each queue by any writer (PostgreSQL's table statistics; rolled-back writes count too), by queue and change.",
    ),
    (
        FORUM_EVENTS,
        Unit::Count,
        "Moderation events committed by any writer since the daemon started, by content type and outcome.",
    ),
    (
        LIVE_BOARD_USERS,
        Unit::Count,
        "Users ranked on the live leaderboard in Redis.",
    ),
    (
        OPERATION_DURATION,
        Unit::Seconds,
        "Time of one service operation (record_event, get_score, queue_add, ...) by operation, outcome (ok or error) and queue.",
    ),
    (
        OPERATION_ERRORS,
        Unit::Count,
        "Service operations that failed (refused input, an unknown user or item, a database or Redis failure that failed the operation), by operation.",
    ),
    (
        JOB_RUNS,
        Unit::Count,
        "Scheduled job ticks by job and outcome: success (it did work), skipped (nothing to do, the previous run still going, or another instance on it), failed.",
    ),
    (
        JOB_DURATION,
        Unit::Seconds,
        "Time of one job run that did work or failed, by job.",
    ),
    (
        JOB_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time when each job last ran to its end anywhere in the cluster (with or without work); its age shows a stalled job.",
    ),
    (
        LEADERBOARD_PENDING,
        Unit::Count,
        "Leaderboard changes not yet refreshed into the user_leaderboard view (PostgreSQL's counts plus the seed's Redis counter).",
    ),
    (
        LEADERBOARD_AGE,
        Unit::Seconds,
        "Seconds since the user_leaderboard view was last refreshed.",
    ),
    (
        DRIFTED_USERS,
        Unit::Count,
        "Users whose stored loyalty score the last integrity sweep found different from their events (and repaired).",
    ),
    (
        REDIS_ERRORS,
        Unit::Count,
        "Redis commands that failed or timed out (the cache counted as missing).",
    ),
    (
        PERF_DROPPED,
        Unit::Count,
        "Perf-list samples dropped because the writer's queue was full or Redis was unavailable.",
    ),
    (
        CACHE_SYNC_DELAY,
        Unit::Seconds,
        "Time from a score change's commit to its cache entry, for changes the daemon's cache sync brought to Redis (writers that bypass loyaltyd).",
    ),
    (
        CACHE_SYNC_FAILURES,
        Unit::Count,
        "Cache syncs that did not complete (Redis or PostgreSQL unavailable); the same changes are tried again.",
    ),
    (
        BACKGROUND_FAILURES,
        Unit::Count,
        "Failures of background work no request sees, by task (forum_watch, board_build, job_tick, job_history, leaderboard_state, rollback, systemd, shutdown); each is logged too (at most once a minute per task).",
    ),
    (
        LAGGING_READS,
        Unit::Count,
        "Reads that may lag (leaderboard pages and ranks) by target: replica, or primary with the reason (no_replica configured, lag over database.replica_max_lag, replica down, error on the replica).",
    ),
    (
        REPLICA_LAG,
        Unit::Seconds,
        "Each read replica's replay lag when last checked (0 when it has replayed all it received).",
    ),
    (
        BUILD_INFO,
        Unit::Count,
        "Always 1; the version label is the running loyaltyd's.",
    ),
];

/// Registers every metric's HELP text and unit with the installed recorder.
pub fn describe_metrics() {
    for &(name, unit, help) in DESCRIPTIONS {
        if name.ends_with("_total") {
            describe_counter!(name, unit, help);
        } else if name == OPERATION_DURATION || name == JOB_DURATION || name == CACHE_SYNC_DELAY {
            describe_histogram!(name, unit, help);
        } else {
            describe_gauge!(name, unit, help);
        }
    }
}

/// Buckets for operations: 50 µs to 10 s, so sub-millisecond work resolves.
const OPERATION_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Buckets for job runs: 10 ms to 2 h (the sweep's default time limit).
const JOB_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

/// A timed service operation (the `operation` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `loyalty::record_event`
    RecordEvent,
    /// `loyalty::record_events` (one batch)
    RecordEvents,
    /// `loyalty::get_score`
    GetScore,
    /// `loyalty::recalc_user`
    RecalcUser,
    /// `leaderboard::page`
    LeaderboardPage,
    /// `leaderboard::rank`
    LeaderboardRank,
    /// `leaderboard::refresh`
    LeaderboardRefresh,
    /// `queues::add`
    QueueAdd,
    /// `queues::remove`
    QueueRemove,
    /// `queues::reorder` and `reorder_all`
    QueueReorder,
    /// `queues::position`
    QueuePosition,
    /// `queues::list`
    QueueList,
    /// `sweep::run`
    IntegritySweep,
    /// `perf::collect` (reads Redis: fails while Redis is away)
    Stats,
}

impl Operation {
    /// Every operation, for exporting their series from start-up.
    pub const ALL: [Operation; 14] = [
        Operation::RecordEvent,
        Operation::RecordEvents,
        Operation::GetScore,
        Operation::RecalcUser,
        Operation::LeaderboardPage,
        Operation::LeaderboardRank,
        Operation::LeaderboardRefresh,
        Operation::QueueAdd,
        Operation::QueueRemove,
        Operation::QueueReorder,
        Operation::QueuePosition,
        Operation::QueueList,
        Operation::IntegritySweep,
        Operation::Stats,
    ];

    /// The `operation` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::RecordEvent => "record_event",
            Operation::RecordEvents => "record_events",
            Operation::GetScore => "get_score",
            Operation::RecalcUser => "recalc_user",
            Operation::LeaderboardPage => "leaderboard_page",
            Operation::LeaderboardRank => "leaderboard_rank",
            Operation::LeaderboardRefresh => "leaderboard_refresh",
            Operation::QueueAdd => "queue_add",
            Operation::QueueRemove => "queue_remove",
            Operation::QueueReorder => "queue_reorder",
            Operation::QueuePosition => "queue_position",
            Operation::QueueList => "queue_list",
            Operation::IntegritySweep => "integrity_sweep",
            Operation::Stats => "stats",
        }
    }

    /// True for the queue operations, which carry a `queue` label.
    pub fn is_queue(self) -> bool {
        matches!(
            self,
            Operation::QueueAdd
                | Operation::QueueRemove
                | Operation::QueueReorder
                | Operation::QueuePosition
                | Operation::QueueList
        )
    }

    /// The seed's perf list operation name, for the operations it tracks.
    pub fn perf_name(self) -> Option<&'static str> {
        match self {
            Operation::QueueAdd => Some("add"),
            Operation::QueueRemove => Some("remove"),
            Operation::QueueReorder => Some("reorder"),
            Operation::QueuePosition => Some("position"),
            _ => None,
        }
    }
}

/// A scheduled job (the `job` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    /// The debounced leaderboard refresh.
    LeaderboardRefresh,
    /// The integrity sweep.
    IntegritySweep,
    /// The queue reorder.
    QueueReorder,
}

impl Job {
    /// Every job.
    pub const ALL: [Job; 3] = [
        Job::LeaderboardRefresh,
        Job::IntegritySweep,
        Job::QueueReorder,
    ];

    /// The `job` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Job::LeaderboardRefresh => "leaderboard_refresh",
            Job::IntegritySweep => "integrity_sweep",
            Job::QueueReorder => "queue_reorder",
        }
    }
}

/// How a job tick ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// The run did its work.
    Success,
    /// Nothing to do, previous run still going, or another instance on it.
    Skipped,
    /// The run failed or ran past its time limit.
    Failed,
}

impl JobOutcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Success => "success",
            JobOutcome::Skipped => "skipped",
            JobOutcome::Failed => "failed",
        }
    }
}

/// The Prometheus builder with loyaltyd's buckets: every `_seconds`
/// histogram renders as a real histogram, not a summary.
pub fn prometheus_builder() -> Result<PrometheusBuilder> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(OPERATION_DURATION.into()), OPERATION_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(JOB_DURATION.into()), JOB_BUCKETS))
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(CACHE_SYNC_DELAY.into()), OPERATION_BUCKETS)
        })
        .map_err(|e| Error::Metrics {
            context: "building the metrics exporter",
            source: Box::new(e),
        })
}

/// Installs the Prometheus recorder and serves `/metrics` on `listen`, then
/// exports every series known at start-up.
pub fn install_exporter(listen: SocketAddr) -> Result<PrometheusHandle> {
    // Built by hand rather than install(): to keep the handle, run upkeep
    // ourselves and report a busy port as one configuration error.
    let (recorder, exporter) = prometheus_builder()?
        .with_http_listener(listen)
        .build()
        .map_err(|e| {
            Error::Config(format!(
                "key \"metrics.listen\": cannot serve metrics on {listen}: {e}"
            ))
        })?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| Error::Metrics {
        context: "installing the metrics recorder",
        source: Box::new(e),
    })?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "metrics endpoint stopped");
        }
    });
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    export_startup_series();
    Ok(handle)
}

/// Registers every series that can be known at start-up, at zero, so
/// dashboards and alerts see a value instead of a gap.
pub fn export_startup_series() {
    describe_metrics();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for op in Operation::ALL {
        counter!(OPERATION_ERRORS, "operation" => op.as_str()).increment(0);
        for outcome in ["ok", "error"] {
            if op.is_queue() {
                for q in QueueKind::ALL {
                    let _ = histogram!(OPERATION_DURATION, "operation" => op.as_str(), "outcome" => outcome, "queue" => q.as_str());
                }
            } else {
                let _ = histogram!(OPERATION_DURATION, "operation" => op.as_str(), "outcome" => outcome);
            }
        }
    }
    for job in Job::ALL {
        for outcome in [JobOutcome::Success, JobOutcome::Skipped, JobOutcome::Failed] {
            counter!(JOB_RUNS, "job" => job.as_str(), "outcome" => outcome.as_str()).increment(0);
        }
        let _ = histogram!(JOB_DURATION, "job" => job.as_str());
    }
    gauge!(LEADERBOARD_PENDING).set(0.0);
    gauge!(LEADERBOARD_AGE).set(0.0);
    gauge!(DRIFTED_USERS).set(0.0);
    counter!(REDIS_ERRORS).increment(0);
    counter!(PERF_DROPPED).increment(0);
    let _ = histogram!(CACHE_SYNC_DELAY);
    counter!(CACHE_SYNC_FAILURES).increment(0);
    for task in Task::ALL {
        counter!(BACKGROUND_FAILURES, "task" => task.as_str()).increment(0);
    }
    for q in QueueKind::ALL {
        gauge!(QUEUE_ITEMS, "queue" => q.as_str()).set(0.0);
        gauge!(QUEUE_LONGEST_SCOPE, "queue" => q.as_str()).set(0.0);
        gauge!(QUEUE_OLDEST_AGE, "queue" => q.as_str()).set(0.0);
        for change in ["added", "removed"] {
            counter!(QUEUE_CHANGES, "queue" => q.as_str(), "change" => change).increment(0);
        }
    }
    for content_type in ["post", "topic", "private_message"] {
        for outcome in ["approved", "rejected", "calibrated"] {
            counter!(FORUM_EVENTS, "content_type" => content_type, "outcome" => outcome)
                .increment(0);
        }
    }
    gauge!(LIVE_BOARD_USERS).set(0.0);
    counter!(LAGGING_READS, "target" => "replica", "reason" => "ok").increment(0);
    for reason in ["no_replica", "lag", "down", "error"] {
        counter!(LAGGING_READS, "target" => "primary", "reason" => reason).increment(0);
    }
}

/// The forum's backlog of one queue: items, its longest scope, its oldest
/// item's age.
pub fn queue_backlog(queue: QueueKind, items: i64, longest: i64, oldest: Duration) {
    gauge!(QUEUE_ITEMS, "queue" => queue.as_str()).set(items as f64);
    gauge!(QUEUE_LONGEST_SCOPE, "queue" => queue.as_str()).set(longest as f64);
    gauge!(QUEUE_OLDEST_AGE, "queue" => queue.as_str()).set(oldest.as_secs_f64());
}

/// The backlog alert's bound.
pub fn queue_oldest_bound(bound: Duration) {
    gauge!(QUEUE_OLDEST_BOUND).set(bound.as_secs_f64());
}

/// Items added and removed in all, by any writer (absolute: PostgreSQL's
/// own counters).
pub fn queue_changes(queue: QueueKind, added: u64, removed: u64) {
    counter!(QUEUE_CHANGES, "queue" => queue.as_str(), "change" => "added").absolute(added);
    counter!(QUEUE_CHANGES, "queue" => queue.as_str(), "change" => "removed").absolute(removed);
}

/// `n` more committed events of a content type and outcome.
pub fn forum_events(content_type: &str, outcome: &str, n: u64) {
    counter!(FORUM_EVENTS, "content_type" => content_type.to_owned(), "outcome" => outcome.to_owned())
        .increment(n);
}

/// The live board's size.
pub fn live_board_users(n: i64) {
    gauge!(LIVE_BOARD_USERS).set(n as f64);
}

/// Background work whose failures no request sees: each failure is one
/// event, a log line (at most one a minute per task, the rest counted) and
/// a count in [`BACKGROUND_FAILURES`] — vector's rule, so none vanishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// The forum's backlog and traffic check.
    ForumWatch,
    /// A build of the live board.
    BoardBuild,
    /// A scheduled job's tick that ended without a result (it panicked).
    JobTick,
    /// Recording or reading the jobs' last successes.
    JobHistory,
    /// Reading the leaderboard's state for the gauges.
    LeaderboardState,
    /// Ending a transaction that failed (its connection is closed instead).
    Rollback,
    /// A message to systemd (ready, watchdog, stopping).
    Systemd,
    /// The scheduler's or a loop's shutdown.
    Shutdown,
    /// A log line that could not be written (stderr's reader gone or not
    /// reading): counted, not logged.
    LogOutput,
}

impl Task {
    /// Every task, for exporting their counters at zero.
    pub const ALL: [Task; 9] = [
        Task::ForumWatch,
        Task::BoardBuild,
        Task::JobTick,
        Task::JobHistory,
        Task::LeaderboardState,
        Task::Rollback,
        Task::Systemd,
        Task::Shutdown,
        Task::LogOutput,
    ];

    /// The `task` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::ForumWatch => "forum_watch",
            Task::BoardBuild => "board_build",
            Task::JobTick => "job_tick",
            Task::JobHistory => "job_history",
            Task::LeaderboardState => "leaderboard_state",
            Task::Rollback => "rollback",
            Task::Systemd => "systemd",
            Task::Shutdown => "shutdown",
            Task::LogOutput => "log_output",
        }
    }
}

/// When each task's failure was last logged.
static LAST_LOGGED: std::sync::Mutex<Vec<(Task, std::time::Instant)>> =
    std::sync::Mutex::new(Vec::new());

/// One failure of background work: counted, and logged unless this task
/// logged one in the last minute.
pub fn background_failure(task: Task, what: &str, error: &dyn std::fmt::Display) {
    counter!(BACKGROUND_FAILURES, "task" => task.as_str()).increment(1);
    let now = std::time::Instant::now();
    let log = match LAST_LOGGED.lock() {
        Ok(mut seen) => match seen.iter_mut().find(|(t, _)| *t == task) {
            Some((_, at)) if now.duration_since(*at) < Duration::from_secs(60) => false,
            Some((_, at)) => {
                *at = now;
                true
            }
            None => {
                seen.push((task, now));
                true
            }
        },
        Err(_) => true,
    };
    if log {
        tracing::warn!(
            task = task.as_str(),
            error = %crate::error::one_line(&error.to_string()),
            "{what} (further failures of this task this minute are counted, not logged)"
        );
    }
}

/// Counts a cache sync that did not complete.
pub fn cache_sync_failed() {
    counter!(CACHE_SYNC_FAILURES).increment(1);
}

/// Records one operation: its time under its outcome, and a failure in the
/// error counter.
pub fn operation(op: Operation, queue: Option<QueueKind>, took: Duration, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    let secs = took.as_secs_f64();
    match queue {
        Some(q) => histogram!(OPERATION_DURATION, "operation" => op.as_str(), "outcome" => outcome, "queue" => q.as_str()).record(secs),
        None => histogram!(OPERATION_DURATION, "operation" => op.as_str(), "outcome" => outcome).record(secs),
    }
    if !ok {
        counter!(OPERATION_ERRORS, "operation" => op.as_str()).increment(1);
    }
}

/// Records how long one score change took to reach the cache through the sync.
pub fn cache_synced(delay: Duration) {
    histogram!(CACHE_SYNC_DELAY).record(delay.as_secs_f64());
}

/// Counts one read that may lag, served by a replica or (with why) the primary.
pub fn lagging_read(target: &'static str, reason: &'static str) {
    counter!(LAGGING_READS, "target" => target, "reason" => reason).increment(1);
}

/// Publishes a replica's replay lag.
pub fn replica_lag(replica: &str, lag: Duration) {
    gauge!(REPLICA_LAG, "replica" => replica.to_owned()).set(lag.as_secs_f64());
}

/// Counts one failed Redis command.
pub fn redis_error() {
    counter!(REDIS_ERRORS).increment(1);
}

/// Records how a job tick ended and how long it took.
pub fn job_run(job: Job, outcome: JobOutcome, took: Duration) {
    counter!(JOB_RUNS, "job" => job.as_str(), "outcome" => outcome.as_str()).increment(1);
    if outcome != JobOutcome::Skipped {
        histogram!(JOB_DURATION, "job" => job.as_str()).record(took.as_secs_f64());
    }
}

/// Records when a job last ran to its end.
pub fn job_succeeded(job: Job, at: SystemTime) {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(JOB_LAST_SUCCESS, "job" => job.as_str()).set(secs);
}

/// Publishes the leaderboard's pending changes and view age.
pub fn leaderboard_state(pending: i64, age: Duration) {
    gauge!(LEADERBOARD_PENDING).set(pending as f64);
    gauge!(LEADERBOARD_AGE).set(age.as_secs_f64());
}

/// Publishes how many users the last sweep found drifted.
pub fn drifted_users(n: u64) {
    gauge!(DRIFTED_USERS).set(n as f64);
}

/// Logging when `log.level` cannot be parsed (validation refuses that; a
/// fallback all the same): loyaltyd's own INFO, dependencies' warnings.
const DEFAULT_LOG_LEVEL: &str = "info,sqlx=warn,tokio_cron_scheduler=warn,redis=error";

/// Sets up logging to stderr: `RUST_LOG` if set, else `log.level`; text or
/// JSON, one event per line; colour only on a terminal (journald gets none).
/// The level can be changed later ([`set_log_level`], on SIGHUP).
pub fn init_logging(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_LEVEL));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::log_output::LogOutput)
        .with_ansi(std::io::stderr().is_terminal());
    // (The reload handle's type names the formatter: one per branch.)
    let reload: Option<FilterReload> = match cfg.format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().ok().map(|()| {
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())) as FilterReload
            })
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().ok().map(|()| {
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())) as FilterReload
            })
        }
    };
    if let Some(reload) = reload {
        let _ = LOG_RELOAD.set(reload);
    }
}

/// Replaces the running log filter (unless `RUST_LOG` overrides it).
type FilterReload = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;
static LOG_RELOAD: std::sync::OnceLock<FilterReload> = std::sync::OnceLock::new();

/// Sets the log level to `level` (validated with the configuration), as on
/// start-up; `RUST_LOG`, when set, still wins.
pub fn set_log_level(level: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    let (Some(reload), Ok(filter)) = (
        LOG_RELOAD.get(),
        tracing_subscriber::EnvFilter::try_new(level),
    ) else {
        return;
    };
    if let Err(e) = reload(filter) {
        tracing::warn!(error = %e, "could not change the log level");
    }
}
