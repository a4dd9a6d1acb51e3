//! Scheduled jobs: what each does, and the runner that makes every tick safe.
//!
//! The work is three plain async functions ([`refresh_leaderboard`],
//! [`integrity_sweep`], [`reorder_queues`]) that tests can call directly. A
//! [`JobRunner`] wraps one of them and decides, per tick:
//! 1. **no overlap in this process**: a `try_lock` on the job's mutex; a tick
//!    that finds the previous run still going is skipped (tokio-cron-scheduler
//!    spawns every tick and would otherwise stack them);
//! 2. **no overlap across hosts**: a session advisory lock held on one pooled
//!    connection for the run (released on that same connection, or by
//!    PostgreSQL when a killed daemon's connection drops, so another instance
//!    takes over on its next tick);
//! 3. **once per tick cluster-wide** (cron jobs): the tick's scheduled instant
//!    is claimed in `job_ticks`; a daemon that fires for an instant someone
//!    already claimed skips it, even if that run has already finished;
//! 4. **a time limit**: past it the run is asked to stop at its next safe
//!    point (between batches; a running statement is cancelled on the server)
//!    and counted as failed. The same cancellation serves shutdown.
//!
//! Every tick ends as `success`, `skipped` or `failed` in
//! `loyaltyd_job_runs_total` and in one log line.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Timelike, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::Context;
use crate::error::{DbContext, Error, Result};
use crate::leaderboard::{self, RefreshReason};
use crate::queues;
use crate::sweep;
use crate::telemetry::{self, Job, JobOutcome, Task};
use crate::types::QueueKind;

/// What a run did: worth a `success`, or nothing to do (`skipped`).
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The job did work; a summary for the log.
    Worked(String),
    /// The job ran and nothing needed doing; why.
    Idle(&'static str),
    /// The job did not run here: another instance or the previous run has it.
    NotRun(&'static str),
}

/// Refreshes the leaderboard if the debounce policy says so.
pub async fn refresh_leaderboard(ctx: &Context, cancel: &CancellationToken) -> Result<Done> {
    let r = leaderboard::refresh(ctx, false, cancel).await?;
    Ok(match r.reason {
        RefreshReason::Due | RefreshReason::Forced => Done::Worked(format!(
            "refreshed the leaderboard: {} pending changes consumed in {:.0} ms",
            r.pending_changes, r.duration_ms
        )),
        RefreshReason::NotDue => Done::Idle("refresh not due"),
        RefreshReason::Busy => Done::NotRun("another refresh is running"),
    })
}

/// The integrity sweep; fails when cancelled before the last batch.
pub async fn integrity_sweep(ctx: &Context, cancel: &CancellationToken) -> Result<Done> {
    let report = sweep::run(ctx, ctx.config.sweep.batch_size, cancel).await?;
    if !report.completed {
        return Err(Error::Cancelled {
            context: "the integrity sweep",
        });
    }
    telemetry::drifted_users(report.drifted_users);
    if report.drifted_users > 0 {
        tracing::warn!(
            drifted_users = report.drifted_users,
            users_checked = report.users_checked,
            "integrity sweep repaired drifted scores"
        );
    }
    Ok(Done::Worked(format!(
        "{}{}",
        report.summary(),
        if report.cache_checked {
            ""
        } else {
            " (Redis unavailable: the cache was not checked)"
        }
    )))
}

/// Reorders every queue scope that changed; queue by queue, stopping between
/// them when cancelled.
pub async fn reorder_queues(ctx: &Context, cancel: &CancellationToken) -> Result<Done> {
    let (mut scopes, mut items) = (0, 0);
    for queue in QueueKind::ALL {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled {
                context: "the queue reorder",
            });
        }
        let r = queues::reorder_all(ctx, queue).await?;
        scopes += r.scopes;
        items += r.items;
    }
    Ok(if scopes == 0 {
        Done::Idle("no queue changed since its last reorder")
    } else {
        Done::Worked(format!("reordered {scopes} queue scopes, {items} items"))
    })
}

/// Advisory lock key of a job (named in [`crate::locks`]).
pub fn lock_key(job: Job) -> i64 {
    match job {
        Job::LeaderboardRefresh => crate::locks::JOB_REFRESH,
        Job::IntegritySweep => crate::locks::JOB_SWEEP,
        Job::QueueReorder => crate::locks::JOB_REORDER,
    }
}

type Work = for<'a> fn(
    &'a Context,
    &'a CancellationToken,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Done>> + Send + 'a>>;

/// Runs one job's ticks; cheap to clone.
#[derive(Clone)]
pub struct JobRunner {
    inner: Arc<Inner>,
}

struct Inner {
    job: Job,
    ctx: Context,
    work: Work,
    timeout: Duration,
    running: tokio::sync::Mutex<()>,
    /// Set for cron jobs: ticks are claimed cluster-wide by scheduled instant.
    cron: Option<croner::Cron>,
    /// The cron expression `cron` was parsed from.
    schedule: Option<String>,
    instance: String,
}

/// One job's definition: its work, and its time limit and schedule, each
/// read from the job's own configuration section.
pub struct JobSpec {
    work: Work,
    /// Past it, a run is cancelled at its next safe point and counted `failed`.
    pub timeout: Duration,
    /// The cron expression (sweep and reorder); `None` for the refresh check,
    /// which runs every `leaderboard.check_interval`.
    pub schedule: Option<String>,
}

impl JobSpec {
    /// What `job` is under `cfg`.
    pub fn of(job: Job, cfg: &crate::config::Config) -> JobSpec {
        let (work, timeout, schedule): (Work, Duration, Option<&str>) = match job {
            Job::LeaderboardRefresh => (
                |c, t| Box::pin(refresh_leaderboard(c, t)),
                cfg.leaderboard.refresh_timeout,
                None,
            ),
            Job::IntegritySweep => (
                |c, t| Box::pin(integrity_sweep(c, t)),
                cfg.sweep.timeout,
                Some(&cfg.sweep.schedule),
            ),
            Job::QueueReorder => (
                |c, t| Box::pin(reorder_queues(c, t)),
                cfg.queues.reorder_timeout,
                Some(&cfg.queues.reorder_schedule),
            ),
        };
        JobSpec {
            work,
            timeout,
            schedule: schedule.map(str::to_owned),
        }
    }
}

impl JobRunner {
    /// The runner of `job`, as [`JobSpec::of`] defines it under the context's configuration.
    pub fn new(job: Job, ctx: Context, instance: String) -> Result<JobRunner> {
        let spec = JobSpec::of(job, &ctx.config);
        let cron = spec
            .schedule
            .as_deref()
            .map(|s| crate::config::parse_cron(s).map_err(Error::Config))
            .transpose()?;
        Ok(JobRunner {
            inner: Arc::new(Inner {
                job,
                ctx,
                work: spec.work,
                timeout: spec.timeout,
                running: tokio::sync::Mutex::new(()),
                cron,
                schedule: spec.schedule,
                instance,
            }),
        })
    }

    /// The job's cron expression, `None` for the interval-driven refresh check.
    pub fn schedule(&self) -> Option<&str> {
        self.inner.schedule.as_deref()
    }

    /// The job this runner runs.
    pub fn job(&self) -> Job {
        self.inner.job
    }

    /// One tick: guard, claim, run under the time limit, count, log.
    pub async fn tick(&self, shutdown: &CancellationToken) -> JobOutcome {
        let job = self.inner.job.as_str();
        let started = Instant::now();
        // Cron ticks are named by their scheduled instant (UTC, RFC 3339).
        let tick = self
            .inner
            .cron
            .as_ref()
            .map(|s| scheduled_instant(s, Utc::now()));
        let tick_name = tick.map(|t| t.to_rfc3339()).unwrap_or_default();
        // Everything the run logs (a sweep's batches, a refresh's steps)
        // nests under this span: with `log.format = json`, one tree a tick.
        let span = tracing::info_span!(
            "job",
            job,
            tick = tick_name.as_str(),
            instance = self.inner.instance.as_str()
        );
        let (outcome, detail, ran) = match self.try_run(tick, shutdown).instrument(span).await {
            Ok(Done::Worked(summary)) => (JobOutcome::Success, summary, true),
            Ok(Done::Idle(why)) => (JobOutcome::Skipped, why.to_owned(), true),
            Ok(Done::NotRun(why)) => (JobOutcome::Skipped, why.to_owned(), false),
            Err(e) => (JobOutcome::Failed, e.one_line(), false),
        };
        let took = started.elapsed();
        telemetry::job_run(self.inner.job, outcome, took);
        if ran {
            // The job is alive: it ran to its end here, with or without work.
            telemetry::job_succeeded(self.inner.job, SystemTime::now());
            record_success(&self.inner.ctx.pool, self.inner.job).await;
        }
        let ms = took.as_secs_f64() * 1000.0;
        let tick = tick_name.as_str();
        match outcome {
            JobOutcome::Success => {
                tracing::info!(job, tick, outcome = "success", duration_ms = ms, "{detail}")
            }
            // Counted in loyaltyd_job_runs_total; a line only when asked for.
            JobOutcome::Skipped => {
                tracing::debug!(job, tick, outcome = "skipped", duration_ms = ms, "{detail}")
            }
            JobOutcome::Failed => tracing::error!(
                job,
                tick,
                outcome = "failed",
                duration_ms = ms,
                "{detail}; retrying on the next tick"
            ),
        }
        outcome
    }

    async fn try_run(
        &self,
        tick: Option<DateTime<Utc>>,
        shutdown: &CancellationToken,
    ) -> Result<Done> {
        let inner = &self.inner;
        let Ok(_running) = inner.running.try_lock() else {
            return Ok(Done::NotRun("the previous run is still going"));
        };
        let pool = &inner.ctx.pool;
        let Some(lock) = ClusterLock::try_acquire(pool, lock_key(inner.job)).await? else {
            return match idle_holder(pool, lock_key(inner.job), inner.timeout).await {
                // No run lasts past its time limit: a lock held that long by
                // a connection doing nothing was leaked. A failure, so the
                // alerts see it; not a skip.
                Some((pid, idle)) => Err(Error::LeakedLock {
                    job: inner.job.as_str(),
                    pid,
                    idle_seconds: idle,
                }),
                None => Ok(Done::NotRun("another instance is running it")),
            };
        };
        // From here the lock is released on every path: explicitly below, or
        // by closing its connection when `lock` is dropped (a `?`, a panic,
        // a cancelled future).
        let result = self.run_locked(pool, tick, shutdown).await;
        lock.release().await;
        result
    }

    /// The tick's work under the cluster lock: claim the tick, run under the
    /// time limit.
    async fn run_locked(
        &self,
        pool: &PgPool,
        tick: Option<DateTime<Utc>>,
        shutdown: &CancellationToken,
    ) -> Result<Done> {
        let inner = &self.inner;
        if let Some(tick) = tick
            && !claim_tick(pool, inner.job, tick, &inner.instance).await?
        {
            return Ok(Done::NotRun("another instance ran this tick"));
        }
        let cancel = shutdown.child_token();
        let work = (inner.work)(&inner.ctx, &cancel);
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            () = tokio::time::sleep(inner.timeout) => {
                // Ask the run to stop at its next safe point and wait for it.
                cancel.cancel();
                let _ = work.await;
                Err(Error::TimedOut {
                    job: inner.job.as_str(),
                    limit: humantime::format_duration(inner.timeout).to_string(),
                })
            }
        }
    }
}

/// The latest scheduled instant at or before `now`: the identity of a tick,
/// the same on every host whose clock is within a tick of the others.
pub fn scheduled_instant(schedule: &croner::Cron, now: DateTime<Utc>) -> DateTime<Utc> {
    // Schedules have a resolution of one second; croner keeps the fraction of
    // the instant it starts from, so drop it first or every host names the
    // same tick differently.
    let now = now.with_nanosecond(0).unwrap_or(now);
    schedule
        .find_previous_occurrence(&now, true)
        .unwrap_or(now)
        .with_timezone(&Utc)
}

/// Records that a job ran to its end (cluster-wide, so a restarted daemon and
/// the alerts know when it last did); a failure to record is counted and
/// logged (the job did run).
async fn record_success(pool: &PgPool, job: Job) {
    let recorded = sqlx::query(
        "INSERT INTO job_ticks AS t (job, last_tick, claimed_by, succeeded_at)
         VALUES ($1, '-infinity', '', now())
         ON CONFLICT (job) DO UPDATE SET succeeded_at = now()",
    )
    .bind(job.as_str())
    .execute(pool)
    .await;
    if let Err(e) = recorded {
        telemetry::background_failure(Task::JobHistory, "could not record a job's success", &e);
    }
}

/// When each job last ran to its end anywhere in the cluster (from
/// `job_ticks`), for the gauges at start-up.
pub async fn last_successes(pool: &PgPool) -> Vec<(Job, SystemTime)> {
    let rows: Vec<(String, DateTime<Utc>)> = match sqlx::query_as(
        "SELECT job, succeeded_at FROM job_ticks WHERE succeeded_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            telemetry::background_failure(
                Task::JobHistory,
                "could not read the jobs' last successes (their gauges start empty)",
                &e,
            );
            Vec::new()
        }
    };
    rows.into_iter()
        .filter_map(|(name, at)| {
            let job = Job::ALL.into_iter().find(|j| j.as_str() == name)?;
            Some((job, SystemTime::from(at)))
        })
        .collect()
}

/// Claims a tick for this instance; false when another instance claimed it.
async fn claim_tick(pool: &PgPool, job: Job, tick: DateTime<Utc>, instance: &str) -> Result<bool> {
    let claimed = sqlx::query(
        "INSERT INTO job_ticks AS t (job, last_tick, claimed_by) VALUES ($1, $2, $3)
         ON CONFLICT (job) DO UPDATE SET last_tick = EXCLUDED.last_tick,
             claimed_by = EXCLUDED.claimed_by, claimed_at = now()
         WHERE t.last_tick < EXCLUDED.last_tick",
    )
    .bind(job.as_str())
    .bind(tick)
    .bind(instance)
    .execute(pool)
    .await
    .db("claiming the job tick")?
    .rows_affected();
    Ok(claimed == 1)
}

/// A session advisory lock and the one connection that holds it.
///
/// Released on that same connection ([`ClusterLock::release`]); dropped
/// without that (an early return, a panic, a cancelled future), it closes
/// the connection instead of handing it back to the pool, and PostgreSQL
/// releases the lock with the session. A pooled connection still holding
/// the lock would keep it for as long as the pool keeps the connection.
struct ClusterLock {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
}

impl ClusterLock {
    async fn try_acquire(pool: &PgPool, key: i64) -> Result<Option<ClusterLock>> {
        let mut conn = pool.acquire().await.db("connecting for the job lock")?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .db("taking the job lock")?;
        Ok(got.then_some(ClusterLock {
            conn: Some(conn),
            key,
        }))
    }

    /// Unlocks on the same connection; if that fails, closes the connection,
    /// which releases the lock on the server just as well.
    async fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .fetch_one(&mut *conn)
            .await;
        if !matches!(unlocked, Ok(true)) {
            drop(conn.detach());
        }
    }
}

impl Drop for ClusterLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Detached from the pool, the connection closes when dropped.
            drop(conn.detach());
        }
    }
}

/// The backend holding a job's lock, if it has been idle longer than
/// `limit`, and for how many seconds.
async fn idle_holder(pool: &PgPool, key: i64, limit: Duration) -> Option<(i32, f64)> {
    // A bigint advisory key is stored as two halves: classid (high 32 bits)
    // and objid (low 32 bits), objsubid 1.
    let holder = sqlx::query_as(
        "SELECT a.pid, EXTRACT(EPOCH FROM clock_timestamp() - a.state_change)::FLOAT8
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.classid::BIGINT = ($1 >> 32) AND l.objid::BIGINT = ($1 & 4294967295)
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND a.state = 'idle' AND clock_timestamp() - a.state_change > $2 * INTERVAL '1 second'",
    )
    .bind(key)
    .bind(limit.as_secs_f64())
    .fetch_optional(pool)
    .await;
    match holder {
        Ok(holder) => holder,
        Err(e) => {
            telemetry::background_failure(
                Task::JobHistory,
                "could not look for an idle holder of a job's lock",
                &e,
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn hosts_firing_a_moment_apart_name_the_same_tick() {
        let every_second =
            crate::config::parse_cron("* * * * * *").unwrap_or_else(|e| panic!("{e}"));
        let a = scheduled_instant(&every_second, at("2026-11-25T01:50:22.230547976Z"));
        let b = scheduled_instant(&every_second, at("2026-11-25T01:50:22.934736893Z"));
        assert_eq!(a, b);
        assert_eq!(a, at("2026-11-25T01:50:22Z"));
        let nightly = crate::config::parse_cron("0 0 3 * * *").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            scheduled_instant(&nightly, at("2026-11-25T03:00:00.480Z")),
            at("2026-11-25T03:00:00Z")
        );
        assert_eq!(
            scheduled_instant(&nightly, at("2026-11-25T02:59:59.999Z")),
            at("2026-11-24T03:00:00Z")
        );
    }
}
