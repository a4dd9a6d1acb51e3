//! The daemon's background loops, in one shape: a [`Periodic`] is a loop's
//! state and one tick of its work; [`run`] is the policy every loop shares:
//! a tick every [`Periodic::every`] (a late tick delays the next, never
//! bunches them), until told to stop. A tick in progress when the stop
//! comes is dropped at its next await (its transaction rolls back; the next
//! start does the work again). The scheduled jobs (sweep, reorder) and the
//! refresh check's runs go through [`crate::jobs::JobRunner`] instead: they
//! are cluster-wide, time-limited and counted per run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backlog::EventCount;
use crate::context::Context;
use crate::jobs::JobRunner;
use crate::leaderboard::live::Board;
use crate::telemetry;

/// A background loop: its state, how often it ticks, and one tick.
pub trait Periodic: Send + 'static {
    /// How often a tick is due.
    fn every(&self) -> Duration;
    /// One tick of work. A failure is the tick's to count and log: the
    /// loop goes on.
    fn tick(&mut self) -> impl Future<Output = ()> + Send;
}

/// Runs `job` until `stop`.
pub async fn run(mut job: impl Periodic, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(job.every());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = job.tick() => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The debounced leaderboard refresh check. Each tick runs as a task of its
/// own (tracked across reloads), so a long refresh makes later ticks report
/// "skipped" instead of silently not happening.
pub struct RefreshCheck {
    pub runner: JobRunner,
    pub every: Duration,
    /// The daemon's shutdown: a running refresh stops at its next safe point.
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl Periodic for RefreshCheck {
    fn every(&self) -> Duration {
        self.every
    }

    async fn tick(&mut self) {
        let (runner, token) = (self.runner.clone(), self.shutdown.clone());
        self.tracker.spawn(async move { runner.tick(&token).await });
    }
}

/// The cache sync (see [`crate::sync`]), every `redis.sync_interval`. A
/// failure is counted and logged at most once a minute; the next tick reads
/// the same window again.
pub struct CacheSync {
    pub ctx: Context,
    pub last_logged: Option<Instant>,
}

impl Periodic for CacheSync {
    fn every(&self) -> Duration {
        self.ctx.config.redis.sync_interval
    }

    async fn tick(&mut self) {
        let failure = match crate::sync::sync_once(&self.ctx).await {
            Ok(crate::sync::Synced::RedisUnavailable) => {
                Some("Redis unavailable; the changes stay queued in PostgreSQL".to_owned())
            }
            Ok(_) => None,
            Err(e) => Some(e.one_line()),
        };
        if let Some(why) = failure {
            telemetry::cache_sync_failed();
            if self
                .last_logged
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                self.last_logged = Some(Instant::now());
                tracing::warn!(error = %why, "cache sync did not complete; retrying every sync interval");
            }
        }
    }
}

/// The forum's backlog and traffic (see [`crate::backlog`]), every
/// [`crate::backlog::CHECK`]; a failure is a counted background failure and
/// the next check reads again. The event count outlives a reload (no event
/// is counted twice or missed); a check cut short leaves it where it was.
pub struct ForumWatch {
    pub ctx: Context,
    pub events: Arc<Mutex<EventCount>>,
}

impl Periodic for ForumWatch {
    fn every(&self) -> Duration {
        crate::backlog::CHECK
    }

    async fn tick(&mut self) {
        let ctx = &self.ctx;
        // Events first: a backlog gauge that moved shows the events were
        // looked at too.
        let counted = self.events.lock().await.observe(&ctx.pool).await;
        let queues = crate::backlog::observe_queues(&ctx.pool).await;
        if ctx.config.leaderboard.live
            && let Some(n) = Board::new(&ctx.redis).count().await
        {
            telemetry::live_board_users(n);
        }
        if let Err(e) = queues.and(counted) {
            telemetry::background_failure(
                telemetry::Task::ForumWatch,
                "could not read the forum's backlog and traffic; retrying",
                &e,
            );
        }
    }
}

/// Watches a Redis Cluster's masters every second; when they change (a
/// failover), writes the scores changed since shortly before the old master
/// could have died again (see [`crate::sync::resync_recent`]), until Redis
/// takes them.
pub struct FailoverWatch {
    pub ctx: Context,
    /// The masters last seen, and when they were last seen unchanged.
    pub known: Option<(Vec<(String, u16)>, Instant)>,
    /// A resync still owed: of the scores changed since this instant.
    pub owed: Option<Instant>,
}

impl Periodic for FailoverWatch {
    fn every(&self) -> Duration {
        Duration::from_secs(1)
    }

    async fn tick(&mut self) {
        let ctx = &self.ctx;
        if let Some(masters) = ctx.redis.masters().await {
            if let Some((old, seen)) = &self.known
                && *old != masters
            {
                // Writes the dead master took before anyone noticed: up to
                // its node timeout before the failover began.
                let node_timeout = ctx
                    .redis
                    .cluster_node_timeout()
                    .await
                    .unwrap_or(Duration::from_secs(30));
                let window = seen.elapsed() + node_timeout * 2 + Duration::from_secs(10);
                let since = Instant::now()
                    .checked_sub(window)
                    .unwrap_or_else(Instant::now);
                self.owed = Some(self.owed.map_or(since, |s| s.min(since)));
                // The client may still be stuck on the dead node.
                ctx.redis.reconnect().await;
                tracing::warn!(?old, new = ?masters, "Redis Cluster masters changed; rewriting recent scores");
            }
            self.known = Some((masters, Instant::now()));
        }
        if let Some(since) = self.owed {
            let window = since.elapsed();
            match crate::sync::resync_recent(ctx, window).await {
                Ok(Some(n)) => {
                    tracing::info!(
                        scores = n,
                        window_seconds = window.as_secs(),
                        "rewrote recent scores after a failover"
                    );
                    self.owed = None;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e.one_line(), "could not rewrite recent scores; retrying")
                }
            }
        }
    }
}

/// Checks the read replicas' lag every five seconds: the gauge stays current
/// (for alerts) whether or not reads come.
pub struct ReplicaWatch {
    pub ctx: Context,
}

impl Periodic for ReplicaWatch {
    fn every(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn tick(&mut self) {
        self.ctx.replicas.check_all().await;
    }
}

/// Builds the live board whenever Redis does not have it (first start, a
/// Redis that restarted empty, a sweep that found it wrong): checked every
/// five seconds, built by one daemon at a time (a lock in Redis). Loads the
/// read library for every client language on the first tick (replacing an
/// older version's), and again wherever Redis lost it.
pub struct BoardUpkeep {
    pub ctx: Context,
    pub library_loaded: bool,
}

/// The Redis lock that lets one daemon at a time build the live board.
const BOARD_BUILD_KEY: &str = "leaderboard:live:building";
/// How long one daemon may hold the build (longer than a build at 10 M users).
const BOARD_BUILD_LOCK: Duration = Duration::from_secs(600);

impl Periodic for BoardUpkeep {
    fn every(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn tick(&mut self) {
        let ctx = &self.ctx;
        let board = Board::new(&ctx.redis);
        self.library_loaded =
            board.ensure_library(!self.library_loaded).await || self.library_loaded;
        if board.ready().await != Some(false)
            || !ctx.redis.try_lock(BOARD_BUILD_KEY, BOARD_BUILD_LOCK).await
        {
            return;
        }
        let started = Instant::now();
        let built = crate::leaderboard::live::build(ctx).await;
        // (A failed UNLINK is counted by the runner; the lock expires.)
        ctx.redis.delete(&[ctx.redis.key(BOARD_BUILD_KEY)]).await;
        match built {
            Ok(users) => tracing::info!(
                users,
                seconds = started.elapsed().as_secs_f64(),
                "built the live leaderboard"
            ),
            Err(e) => telemetry::background_failure(
                telemetry::Task::BoardBuild,
                "could not build the live leaderboard; retrying",
                &e,
            ),
        }
    }
}

/// Pings the systemd watchdog; that this loop runs at all shows the runtime
/// is alive.
pub struct Watchdog {
    pub every: Duration,
}

impl Periodic for Watchdog {
    fn every(&self) -> Duration {
        self.every
    }

    async fn tick(&mut self) {
        notify(NotifyState::Watchdog);
    }
}

/// Tells systemd `state`; a failure is a counted background failure.
pub fn notify(state: NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        telemetry::background_failure(telemetry::Task::Systemd, "could not notify systemd", &e);
    }
}
