//! `loyaltyd run`: the scheduler, the metrics endpoint, systemd integration.
//!
//! Start-up: serve `/metrics` (so a scrape sees the daemon even while it waits),
//! wait for PostgreSQL and apply migrations, schedule the jobs, then tell
//! systemd READY=1 and start the watchdog pings. Redis is not waited for: the
//! cache and perf lists work without it and reconnect by themselves.
//!
//! The integrity sweep and the queue reorder are tokio-cron-scheduler cron
//! jobs. The leaderboard check runs on a plain interval (`check_interval` is a
//! duration, not a cron expression, and tokio-cron-scheduler's repeated jobs
//! can stop firing under load). Every tick goes through a [`JobRunner`].
//!
//! SIGHUP reloads the configuration: the next generation of scheduler and
//! loops is built from it, then the running one stops taking ticks (see
//! [`reloaded`] for what needs a restart instead). A refused file keeps the
//! running configuration, with an error line saying why.
//!
//! Shutdown (SIGTERM, SIGINT): STOPPING=1, stop the scheduler, cancel the shared
//! token (a running job stops at its next safe point; a running statement is
//! cancelled on the server; locks go with their transactions), wait for the
//! tracked tasks, flush the perf lists, exit 0.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::background::{
    self, BoardUpkeep, CacheSync, FailoverWatch, ForumWatch, RefreshCheck, ReplicaWatch, Watchdog,
    notify,
};
use crate::config::Config;
use crate::context::Context;
use crate::db;
use crate::error::{Error, Result};
use crate::jobs::JobRunner;
use crate::telemetry::{self, Job};

/// How long shutdown waits for running jobs before giving up on them
/// (within systemd's default 90 s stop timeout, and the 10 s we promise).
const STOP_GRACE: Duration = Duration::from_secs(8);
/// How long a generation's scheduler and loops get to stop (their work is
/// dropped at its next await; this bounds a scheduler that does not answer).
const LOOPS_GRACE: Duration = Duration::from_secs(2);

/// Re-reads the configuration (the file and the environment the process
/// started with) on SIGHUP.
pub type Reload = Box<dyn Fn() -> Result<Config> + Send + Sync>;

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads the configuration
/// (see [`reloaded`] for what a reload can change).
pub async fn run(config: Config, reload: Reload) -> Result<()> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let mut hangup = signal(SignalKind::hangup()).map_err(|source| Error::Io {
        context: "installing the SIGHUP handler",
        source,
    })?;
    telemetry::install_exporter(config.metrics.listen)?;
    tracing::info!(config = ?config, "loyaltyd {} starting", env!("CARGO_PKG_VERSION"));

    let pool = db::connect_lazy(&config.database)?;
    if !wait_for_database(&pool, &shutdown).await? {
        return Ok(());
    }
    let mut ctx = Context::with_pool(config, pool.clone(), true)?;
    // Every job's last success, from the cluster's record, or this start.
    let started = std::time::SystemTime::now();
    let known = crate::jobs::last_successes(&ctx.pool).await;
    for job in Job::ALL {
        let at = known
            .iter()
            .find(|(j, _)| *j == job)
            .map_or(started, |k| k.1);
        telemetry::job_succeeded(job, at);
    }
    let instance = instance_name();
    // Job ticks: they run to their end (or their cancel) across reloads.
    let tracker = TaskTracker::new();
    // The event count outlives a reload: no event is counted twice or missed.
    let events = std::sync::Arc::new(tokio::sync::Mutex::new(
        crate::backlog::EventCount::default(),
    ));
    let mut current = Generation::start(&ctx, &instance, &shutdown, &tracker, &events).await?;

    notify(NotifyState::Ready);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tracker.spawn(background::run(
            Watchdog { every: every / 2 },
            shutdown.clone(),
        ));
    }
    tracing::info!(instance, metrics = %ctx.config.metrics.listen, "loyaltyd ready");

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = hangup.recv() => {}
        }
        notify(NotifyState::Reloading);
        match reload_config(&ctx, &reload, &pool) {
            Err(e) => tracing::error!(
                error = %e.one_line(),
                "SIGHUP: the new configuration is refused; the running one stays"
            ),
            Ok(next) => {
                // Built before the running generation stops: a schedule
                // the scheduler refuses leaves the running one in place.
                match Generation::start(&next, &instance, &shutdown, &tracker, &events).await {
                    Err(e) => tracing::error!(
                        error = %e.one_line(),
                        "SIGHUP: the new configuration is refused; the running one stays"
                    ),
                    Ok(generation) => {
                        current.stop().await;
                        current = generation;
                        telemetry::set_log_level(&next.config.log.level);
                        ctx = next;
                        tracing::info!(config = ?ctx.config, "SIGHUP: configuration reloaded");
                    }
                }
            }
        }
        notify(NotifyState::Ready);
    }

    notify(NotifyState::Stopping);
    tracing::info!("stopping: finishing or cancelling running jobs");
    current.stop().await;
    tracker.close();
    if tokio::time::timeout(STOP_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "jobs still running after {STOP_GRACE:?}; exiting anyway (their transactions roll back)"
        );
    }
    ctx.perf.flush(Duration::from_secs(1)).await;
    tracing::info!("stopped");
    Ok(())
}

/// The configuration SIGHUP loaded, as a new context around the same pool;
/// keys that need a restart keep their running values (each logged).
fn reload_config(ctx: &Context, reload: &Reload, pool: &sqlx::PgPool) -> Result<Context> {
    let (next, kept) = reloaded(&ctx.config, reload()?);
    for key in kept {
        tracing::warn!(
            key,
            "SIGHUP: {key} changed, but takes effect only at a restart (systemctl restart loyaltyd); keeping the running value"
        );
    }
    Context::with_pool(next, pool.clone(), true)
}

/// What a reload changes: everything but what is bound at start-up (the
/// metrics listener, the log format, the PostgreSQL pool's connection
/// settings), which keeps its running value; returns the keys kept.
/// Reloaded: log level, job schedules and time limits, refresh thresholds,
/// the live board switch, the sweep's batch size, replicas and their lag
/// bound, and the Redis settings (a new Redis client is built).
pub fn reloaded(running: &Config, mut next: Config) -> (Config, Vec<&'static str>) {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $key:literal) => {
            if running.$($field).+ != next.$($field).+ {
                next.$($field).+ = running.$($field).+.clone();
                kept.push($key);
            }
        };
    }
    keep!(metrics.listen, "metrics.listen");
    keep!(log.format, "log.format");
    keep!(database.url, "database.url");
    keep!(database.max_connections, "database.max_connections");
    keep!(database.connect_timeout, "database.connect_timeout");
    keep!(database.statement_timeout, "database.statement_timeout");
    (next, kept)
}

/// The scheduler and the loops of one configuration. A reload starts the
/// next generation, then stops this one: no new ticks, its loops end; a job
/// tick already running finishes (the cluster-wide job lock keeps the next
/// generation's tick of the same job from running beside it).
struct Generation {
    scheduler: JobScheduler,
    stop: CancellationToken,
    loops: TaskTracker,
}

impl Generation {
    async fn start(
        ctx: &Context,
        instance: &str,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
        events: &std::sync::Arc<tokio::sync::Mutex<crate::backlog::EventCount>>,
    ) -> Result<Generation> {
        let stop = shutdown.child_token();
        let loops = TaskTracker::new();
        let scheduler = JobScheduler::new()
            .await
            .map_err(|source| Error::Scheduler {
                context: "starting the scheduler".into(),
                source,
            })?;
        for job in [Job::IntegritySweep, Job::QueueReorder] {
            let runner = JobRunner::new(job, ctx.clone(), instance.to_owned())?;
            scheduler
                .add(cron_job(runner, shutdown, tracker)?)
                .await
                .map_err(|source| Error::Scheduler {
                    context: format!("scheduling {}", job.as_str()),
                    source,
                })?;
        }
        let refresh = JobRunner::new(Job::LeaderboardRefresh, ctx.clone(), instance.to_owned())?;
        scheduler.start().await.map_err(|source| Error::Scheduler {
            context: "starting the scheduler".into(),
            source,
        })?;
        loops.spawn(background::run(
            RefreshCheck {
                runner: refresh,
                every: ctx.config.leaderboard.check_interval,
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
            },
            stop.clone(),
        ));
        loops.spawn(background::run(
            CacheSync {
                ctx: ctx.clone(),
                last_logged: None,
            },
            stop.clone(),
        ));
        telemetry::queue_oldest_bound(ctx.config.queues.oldest_item_bound);
        loops.spawn(background::run(
            ForumWatch {
                ctx: ctx.clone(),
                events: events.clone(),
            },
            stop.clone(),
        ));
        if ctx.config.leaderboard.live {
            loops.spawn(background::run(
                BoardUpkeep {
                    ctx: ctx.clone(),
                    library_loaded: false,
                },
                stop.clone(),
            ));
        }
        if ctx.redis.is_cluster() {
            loops.spawn(background::run(
                FailoverWatch {
                    ctx: ctx.clone(),
                    known: None,
                    owed: None,
                },
                stop.clone(),
            ));
        }
        if ctx.replicas.any() {
            loops.spawn(background::run(
                ReplicaWatch { ctx: ctx.clone() },
                stop.clone(),
            ));
        }
        loops.close();
        Ok(Generation {
            scheduler,
            stop,
            loops,
        })
    }

    /// No new ticks; the loops end (a live board build in progress with them).
    async fn stop(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(LOOPS_GRACE, async {
            if let Err(e) = self.scheduler.shutdown().await {
                telemetry::background_failure(
                    telemetry::Task::Shutdown,
                    "the scheduler did not shut down cleanly",
                    &e,
                );
            }
            self.loops.wait().await;
        })
        .await
        .is_err()
        {
            tracing::warn!(
                "the scheduler or a loop did not stop within {LOOPS_GRACE:?}; going on without it"
            );
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
fn spawn_signal_handler(shutdown: CancellationToken) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Io {
        context: "installing the SIGTERM handler",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| Error::Io {
        context: "installing the SIGINT handler",
        source,
    })?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Waits until PostgreSQL answers and the migrations are applied; false when
/// asked to stop first. Other errors (a failed migration) end the daemon.
async fn wait_for_database(pool: &sqlx::PgPool, shutdown: &CancellationToken) -> Result<bool> {
    for attempt in 1.. {
        let delay = DATABASE_WAIT.pause(attempt);
        match db::migrate(pool).await {
            Ok(()) => return Ok(true),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e.one_line(), retry_in = ?delay, "waiting for PostgreSQL");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(false),
        }
    }
    Ok(false)
}

/// How the daemon waits for PostgreSQL at start: as long as it takes,
/// checking again after 250 ms, then less and less often, every 5 s at most.
const DATABASE_WAIT: crate::retry::Retry =
    crate::retry::Retry::new(u32::MAX, Duration::from_millis(250), Duration::from_secs(5));

/// A cron job of the scheduler for `runner`'s schedule: each tick a task
/// of the tracker's (it outlives a reload), unless the daemon is stopping.
fn cron_job(
    runner: JobRunner,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<CronJob> {
    let job = runner.job();
    let schedule = runner.schedule().unwrap_or_default().to_owned();
    let (token, tasks) = (shutdown.clone(), tracker.clone());
    let cron = CronJob::new_async(schedule.as_str(), move |_, _| {
        let (runner, token, tasks) = (runner.clone(), token.clone(), tasks.clone());
        Box::pin(async move {
            if !token.is_cancelled()
                && let Err(e) = tasks.spawn(async move { runner.tick(&token).await }).await
            {
                telemetry::background_failure(
                    telemetry::Task::JobTick,
                    "a job's tick ended without a result",
                    &e,
                );
            }
        })
    })
    .map_err(|e| {
        Error::Config(format!(
            "cannot schedule {}: {e} ({schedule:?})",
            job.as_str()
        ))
    })?;
    Ok(cron)
}

/// `host:pid`, recorded with each claimed tick.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{host}:{}", std::process::id())
}
