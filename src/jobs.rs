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
use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::error::{DbContext, Error, Result};
use crate::leaderboard::{self, RefreshReason};
use crate::loyalty;
use crate::queues;
use crate::telemetry::{self, Job, JobOutcome};
use crate::types::QueueKind;

/// What a run did: worth a `success`, or nothing to do (`skipped`).
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The job did work; a summary for the log.
    Worked(String),
    /// Nothing needed doing; why.
    Nothing(&'static str),
}

/// Refreshes the leaderboard if the debounce policy says so.
pub async fn refresh_leaderboard(ctx: &Context, cancel: &CancellationToken) -> Result<Done> {
    let r = leaderboard::refresh(ctx, false, cancel).await?;
    Ok(match r.reason {
        RefreshReason::Due | RefreshReason::Forced => Done::Worked(format!(
            "refreshed the leaderboard: {} pending changes consumed in {:.0} ms",
            r.pending_changes, r.duration_ms
        )),
        RefreshReason::NotDue => Done::Nothing("refresh not due"),
        RefreshReason::Busy => Done::Nothing("another refresh is running"),
    })
}

/// The integrity sweep; fails when cancelled before the last batch.
pub async fn integrity_sweep(ctx: &Context, cancel: &CancellationToken) -> Result<Done> {
    let report = loyalty::recalc_all(ctx, ctx.config.sweep.batch_size, cancel).await?;
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
        "checked {} users: {} drifted, {} cache entries corrected",
        report.users_checked, report.drifted_users, report.cache_repaired
    )))
}

/// Reorders every queue scope that changed; queue by queue, stopping between
/// them when cancelled.
pub async fn reorder_queues(ctx: &Context, cancel: &CancellationToken) -> Result<Done> {
    let limit = ctx.config.queues.reorder_timeout;
    let (mut scopes, mut items) = (0, 0);
    for queue in QueueKind::ALL {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled {
                context: "the queue reorder",
            });
        }
        let r = queues::reorder_all(ctx, queue, limit).await?;
        scopes += r.scopes;
        items += r.items;
    }
    Ok(if scopes == 0 {
        Done::Nothing("no queue changed since its last reorder")
    } else {
        Done::Worked(format!("reordered {scopes} queue scopes, {items} items"))
    })
}

/// Advisory lock key of a job (distinct from the refresh's own lock).
fn lock_key(job: Job) -> i64 {
    match job {
        Job::LeaderboardRefresh => 0x4c59_4a42_0001,
        Job::IntegritySweep => 0x4c59_4a42_0002,
        Job::QueueReorder => 0x4c59_4a42_0003,
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
    schedule: Option<croner::Cron>,
    instance: String,
}

impl JobRunner {
    /// The runner of `job`, with its time limit and (cron jobs) schedule from the configuration.
    pub fn new(job: Job, ctx: Context, instance: String) -> Result<JobRunner> {
        let cfg = &ctx.config;
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
        let schedule = schedule
            .map(|s| crate::config::parse_cron(s).map_err(Error::Config))
            .transpose()?;
        Ok(JobRunner {
            inner: Arc::new(Inner {
                job,
                ctx,
                work,
                timeout,
                running: tokio::sync::Mutex::new(()),
                schedule,
                instance,
            }),
        })
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
            .schedule
            .as_ref()
            .map(|s| scheduled_instant(s, Utc::now()));
        let tick_name = tick.map(|t| t.to_rfc3339()).unwrap_or_default();
        let (outcome, detail) = match self.try_run(tick, shutdown).await {
            Ok(Done::Worked(summary)) => (JobOutcome::Success, summary),
            Ok(Done::Nothing(why)) => (JobOutcome::Skipped, why.to_owned()),
            Err(e) => (JobOutcome::Failed, e.one_line()),
        };
        let took = started.elapsed();
        telemetry::job_run(self.inner.job, outcome, took);
        let ms = took.as_secs_f64() * 1000.0;
        let tick = tick_name.as_str();
        match outcome {
            JobOutcome::Success => {
                tracing::info!(job, tick, outcome = "success", duration_ms = ms, "{detail}")
            }
            JobOutcome::Skipped => {
                tracing::info!(job, tick, outcome = "skipped", duration_ms = ms, "{detail}")
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
            return Ok(Done::Nothing("the previous run is still going"));
        };
        let pool = &inner.ctx.pool;
        let Some(lock) = ClusterLock::try_acquire(pool, lock_key(inner.job)).await? else {
            return Ok(Done::Nothing("another instance is running it"));
        };
        if let Some(tick) = tick
            && !claim_tick(pool, inner.job, tick, &inner.instance).await?
        {
            lock.release().await;
            return Ok(Done::Nothing("another instance ran this tick"));
        }
        let cancel = shutdown.child_token();
        let work = (inner.work)(&inner.ctx, &cancel);
        tokio::pin!(work);
        let result = tokio::select! {
            r = &mut work => r,
            () = tokio::time::sleep(inner.timeout) => {
                // Ask the run to stop at its next safe point and wait for it.
                cancel.cancel();
                let _ = work.await;
                Err(Error::Runtime(format!(
                    "{} ran past its time limit of {} and was cancelled",
                    inner.job.as_str(),
                    humantime::format_duration(inner.timeout)
                )))
            }
        };
        lock.release().await;
        result
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
struct ClusterLock {
    conn: PoolConnection<Postgres>,
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
        Ok(got.then_some(ClusterLock { conn, key }))
    }

    /// Unlocks on the same connection; if that fails, closes the connection,
    /// which releases the lock on the server just as well.
    async fn release(mut self) {
        let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .fetch_one(&mut *self.conn)
            .await;
        if !matches!(unlocked, Ok(true)) {
            drop(self.conn.detach());
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
