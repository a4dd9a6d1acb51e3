//! The command line (SPEC §5): one subcommand, one service call, text or `--json`.
//!
//! Arguments are parsed into the types of [`crate::types`] by clap, so a bad
//! value is a clap error (exit 2) before anything connects. Output goes to
//! stdout as text, or as one JSON document with `--json`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::Config;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::types::{Ident, Priority, QueueKind, Scope, UserId};
use crate::{adopt, daemon, db, demo, leaderboard, loyalty, perf, queues, sweep, telemetry};

/// loyaltyd: incremental loyalty scores, a debounced leaderboard and exact
/// moderation-queue positions on PostgreSQL and Redis.
#[derive(Debug, Parser)]
#[command(name = "loyaltyd", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file [default: config.toml if present]
    #[arg(long, global = true, value_name = "PATH", env = "LOYALTYD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: scheduled jobs and the metrics endpoint
    Run,
    /// Apply pending database migrations
    Migrate,
    /// Upgrade a database of the original design in place, online
    Adopt(AdoptArgs),
    /// Validate the configuration and print it, secrets redacted
    CheckConfig(CheckConfigArgs),
    /// Moderation events
    #[command(subcommand)]
    Event(EventCommand),
    /// Loyalty scores
    #[command(subcommand)]
    Score(ScoreCommand),
    /// The leaderboard
    #[command(subcommand)]
    Leaderboard(LeaderboardCommand),
    /// Moderation queues
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Latency statistics from the Redis perf lists
    Stats,
    /// Synthetic forum data
    #[command(subcommand)]
    Demo(DemoCommand),
}

/// `adopt`
#[derive(Debug, Args)]
pub struct AdoptArgs {
    /// Print the plan and the data problems; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Rows per batch of a back-fill or repair
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(i64).range(100..=1_000_000))]
    batch_size: i64,
    /// Longest wait for a lock on a forum table before letting the forum through and retrying
    #[arg(long, default_value = "500ms", value_parser = |s: &str| humantime::parse_duration(s).map_err(|e| e.to_string()))]
    lock_timeout: std::time::Duration,
    /// The forum's application no longer runs the original code (it only inserts events)
    #[arg(long)]
    no_legacy_writers: bool,
    /// Also change the forum's column types to migrate's (INTEGER to BIGINT, VARCHAR to TEXT, ...):
    /// this fails the application's prepared statements that read them, so run it in a restart window
    #[arg(long)]
    change_types: bool,
}

/// `event ...`
#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Record a moderation event and update the user's score
    Record(loyalty::NewEvent),
}

/// `score ...`
#[derive(Debug, Subcommand)]
pub enum ScoreCommand {
    /// A user's current score
    Get {
        /// The user
        #[arg(long, value_parser = parse_user)]
        user: UserId,
    },
    /// Recompute scores from events and repair drift
    Recalc(RecalcArgs),
}

/// `score recalc (--user ID | --all)`
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RecalcArgs {
    /// One user
    #[arg(long, value_parser = parse_user)]
    user: Option<UserId>,
    /// Every user: the integrity sweep, now
    #[arg(long)]
    all: bool,
}

/// `leaderboard ...`
#[derive(Debug, Subcommand)]
pub enum LeaderboardCommand {
    /// A page of the leaderboard
    Show {
        /// Entries, 1 to 1000
        #[arg(long, default_value_t = 100, allow_negative_numbers = true)]
        limit: i64,
        /// Ranks to skip
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        offset: i64,
    },
    /// A user's rank
    Rank {
        /// The user
        #[arg(long, value_parser = parse_user)]
        user: UserId,
    },
    /// Refresh the view if due (pending changes or staleness), or always with --force
    Refresh {
        /// Refresh even if not due
        #[arg(long)]
        force: bool,
    },
}

/// The queue and scope arguments shared by the queue commands.
#[derive(Debug, Args)]
pub struct ScopeArgs {
    /// The topic (post queue)
    #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--topic", s))]
    topic: Option<Ident>,
    /// The conversation (message queue)
    #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--conversation", s))]
    conversation: Option<Ident>,
}

/// `queue ...`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Append an item at the tail of its queue
    Add {
        /// Which queue
        #[arg(long, value_enum)]
        queue: QueueKind,
        /// The item
        #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--content-id", s))]
        content_id: Ident,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Priority (higher first after a reorder); any finite number
        #[arg(long, default_value = "0", allow_negative_numbers = true, value_parser = |s: &str| s.parse::<Priority>())]
        priority: Priority,
    },
    /// Remove an item; the items behind it move up
    Remove {
        /// Which queue
        #[arg(long, value_enum)]
        queue: QueueKind,
        /// The item
        #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--content-id", s))]
        content_id: Ident,
    },
    /// An item's exact position
    Position {
        /// Which queue
        #[arg(long, value_enum)]
        queue: QueueKind,
        /// The item
        #[arg(long, allow_hyphen_values = true, value_parser = |s: &str| Ident::parse("--content-id", s))]
        content_id: Ident,
    },
    /// The first items of a queue
    List {
        /// Which queue
        #[arg(long, value_enum)]
        queue: QueueKind,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Items, 1 to 100000
        #[arg(long, default_value_t = 100, allow_negative_numbers = true)]
        limit: i64,
    },
    /// Sort by priority (desc), then entry time
    Reorder {
        /// Which queue
        #[arg(long, value_enum)]
        queue: QueueKind,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Every scope of the queue that changed since its last reorder
        #[arg(long, conflicts_with_all = ["topic", "conversation"])]
        all: bool,
    },
}

/// `check-config ...`
#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The environment file the service reads (systemd's EnvironmentFile=:
    /// KEY=VALUE lines); its variables are applied over this shell's
    /// [default: /etc/loyaltyd/loyaltyd.env if it exists]
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    /// Check the configuration only; without it, check-config also logs in
    /// to PostgreSQL as the service would, and fails where it would fail
    #[arg(long)]
    pub offline: bool,
}

/// The environment file of the Debian package's unit.
pub const DEFAULT_ENV_FILE: &str = "/etc/loyaltyd/loyaltyd.env";

impl CheckConfigArgs {
    /// The file to read: the one given, or the package's when it exists.
    pub fn env_file(&self) -> Option<PathBuf> {
        self.env_file.clone().or_else(|| {
            let p = PathBuf::from(DEFAULT_ENV_FILE);
            p.is_file().then_some(p)
        })
    }
}

/// `demo ...`
#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Write a synthetic forum: users, events (scores consistent with them), queue items
    Seed {
        /// Users to create
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        users: i64,
        /// Events to record over the new users
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        events: i64,
        /// Items to add to each queue
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        queue_items: i64,
    },
}

fn parse_user(s: &str) -> Result<UserId> {
    s.parse()
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    telemetry::init_logging(&config.log);
    let json = cli.json;
    match cli.command {
        Command::Run => {
            let path = cli.config.clone();
            daemon::run(config, Box::new(move || Config::load(path.as_deref()))).await
        }
        Command::CheckConfig(args) => {
            if !args.offline {
                // The service's first step: a login it refuses, a database
                // that does not exist, is a configuration error (78), and an
                // unreachable server 69, here as there.
                db::connect(&config.database).await?;
            }
            emit(json, &CheckedConfig(config.clone()))
        }
        Command::Migrate => {
            let pool = db::connect(&config.database).await?;
            db::migrate(&pool).await?;
            emit(json, &Migrated { migrated: true })
        }
        Command::Adopt(args) => {
            // No perf lists: adoption is not an operation of the forum's.
            let ctx = Context::connect(config, false).await?;
            let opts = adopt::Options {
                dry_run: args.dry_run,
                batch_size: args.batch_size,
                lock_timeout: args.lock_timeout,
                legacy_writers: !args.no_legacy_writers,
                change_types: args.change_types,
            };
            emit(json, &adopt::adopt(&ctx, &opts).await?)
        }
        Command::Stats => {
            let redis = crate::redis_runner::Redis::new(&config.redis)?;
            emit(
                json,
                &perf::collect(&redis, &perf::PerfLists::disabled()).await?,
            )
        }
        command => {
            let ctx = Context::connect(config, true).await?;
            let result = data_command(&ctx, json, command).await;
            ctx.perf.flush(std::time::Duration::from_secs(1)).await;
            result
        }
    }
}

/// The commands that work on the data.
async fn data_command(ctx: &Context, json: bool, command: Command) -> Result<()> {
    match command {
        Command::Event(EventCommand::Record(event)) => {
            emit(json, &loyalty::record_event(ctx, &event).await?)
        }
        Command::Score(ScoreCommand::Get { user }) => {
            emit(json, &loyalty::get_score(ctx, user).await?)
        }
        Command::Score(ScoreCommand::Recalc(RecalcArgs {
            user: Some(user), ..
        })) => emit(json, &loyalty::recalc_user(ctx, user).await?),
        Command::Score(ScoreCommand::Recalc(_)) => {
            let never = tokio_util::sync::CancellationToken::new();
            emit(
                json,
                &sweep::run(ctx, ctx.config.sweep.batch_size, &never).await?,
            )
        }
        Command::Leaderboard(LeaderboardCommand::Show { limit, offset }) => {
            emit(json, &leaderboard::page(ctx, limit, offset).await?)
        }
        Command::Leaderboard(LeaderboardCommand::Rank { user }) => {
            emit(json, &leaderboard::rank(ctx, user).await?)
        }
        Command::Leaderboard(LeaderboardCommand::Refresh { force }) => {
            let never = tokio_util::sync::CancellationToken::new();
            emit(json, &leaderboard::refresh(ctx, force, &never).await?)
        }
        Command::Queue(QueueCommand::Add {
            queue,
            content_id,
            scope,
            priority,
        }) => {
            let scope = Scope::for_queue(queue, scope.topic, scope.conversation)?;
            emit(
                json,
                &queues::add(ctx, queue, &content_id, &scope, priority).await?,
            )
        }
        Command::Queue(QueueCommand::Remove { queue, content_id }) => {
            emit(json, &queues::remove(ctx, queue, &content_id).await?)
        }
        Command::Queue(QueueCommand::Position { queue, content_id }) => {
            emit(json, &queues::position(ctx, queue, &content_id).await?)
        }
        Command::Queue(QueueCommand::List {
            queue,
            scope,
            limit,
        }) => {
            let scope = Scope::for_queue(queue, scope.topic, scope.conversation)?;
            emit(json, &queues::list(ctx, queue, &scope, limit).await?)
        }
        Command::Queue(QueueCommand::Reorder { queue, scope, all }) => {
            if all {
                emit(json, &queues::reorder_all(ctx, queue).await?)
            } else {
                let scope = Scope::for_queue(queue, scope.topic, scope.conversation)?;
                emit(json, &queues::reorder(ctx, queue, &scope).await?)
            }
        }
        Command::Demo(DemoCommand::Seed {
            users,
            events,
            queue_items,
        }) => emit(
            json,
            &demo::seed(ctx, users, events, queue_items, true).await?,
        ),
        Command::Run
        | Command::Migrate
        | Command::Adopt(_)
        | Command::CheckConfig(_)
        | Command::Stats => Err(Error::Runtime("internal: command dispatched twice".into())),
    }
}

/// Something a command prints: JSON with `--json`, else [`Render::text`].
trait Render: Serialize {
    fn text(&self) -> String;
}

/// Prints a result on stdout. A closed stdout (`| head`) is not an error.
fn emit<T: Render>(json: bool, value: &T) -> Result<()> {
    let out = if json {
        serde_json::to_string(value)?
    } else {
        value.text()
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{out}");
    Ok(())
}

#[derive(Serialize)]
struct Migrated {
    migrated: bool,
}

impl Render for Migrated {
    fn text(&self) -> String {
        "migrations applied; the database is up to date".into()
    }
}

#[derive(Serialize)]
#[serde(transparent)]
struct CheckedConfig(Config);

impl Render for CheckedConfig {
    fn text(&self) -> String {
        let body = self.0.to_toml();
        format!("# configuration is valid; effective values (secrets redacted):\n{body}")
    }
}

impl Render for loyalty::Recorded {
    fn text(&self) -> String {
        if self.duplicate {
            format!(
                "user {}: event already recorded; score {}",
                self.user_id, self.loyalty_score
            )
        } else {
            format!(
                "user {}: score {} ({:+})",
                self.user_id, self.loyalty_score, self.score_delta
            )
        }
    }
}

impl Render for loyalty::Score {
    fn text(&self) -> String {
        format!("user {}: score {}", self.user_id, self.loyalty_score)
    }
}

impl Render for loyalty::Recalculated {
    fn text(&self) -> String {
        if self.drifted {
            format!(
                "user {}: score repaired from {} to {}",
                self.user_id, self.previous_score, self.loyalty_score
            )
        } else {
            format!(
                "user {}: score {} matches the events",
                self.user_id, self.loyalty_score
            )
        }
    }
}

impl Render for sweep::SweepReport {
    fn text(&self) -> String {
        self.summary()
    }
}

impl Render for leaderboard::Page {
    fn text(&self) -> String {
        let mut out = format!(
            "{:>8}  {:>12}  {:>10}  {:<6}  username",
            "rank", "user", "score", "topics"
        );
        for e in &self.entries {
            out.push_str(&format!(
                "\n{:>8}  {:>12}  {:>10}  {:<6}  {}",
                e.rank,
                e.user_id,
                e.loyalty_score,
                if e.can_create_topics { "yes" } else { "no" },
                e.username
            ));
        }
        out
    }
}

impl Render for leaderboard::Standing {
    fn text(&self) -> String {
        match self.rank {
            Some(rank) => format!(
                "user {}: rank {rank}, score {}, {}",
                self.user_id,
                self.loyalty_score,
                if self.can_create_topics {
                    "may create topics"
                } else {
                    "may not create topics"
                }
            ),
            None => match self.source {
                leaderboard::Source::Live => format!(
                    "user {}: not ranked (score {}; only users with a positive score are ranked)",
                    self.user_id, self.loyalty_score
                ),
                leaderboard::Source::View => format!(
                    "user {}: not ranked (score {}; only users with a positive score at the last refresh are ranked)",
                    self.user_id, self.loyalty_score
                ),
            },
        }
    }
}

impl Render for leaderboard::RefreshReport {
    fn text(&self) -> String {
        match self.reason {
            leaderboard::RefreshReason::Busy => "not refreshed: another refresh is running".into(),
            leaderboard::RefreshReason::NotDue => format!(
                "not refreshed: not due ({} pending changes, view {:.0}s old; use --force to refresh anyway)",
                self.pending_changes, self.age_seconds
            ),
            _ => format!(
                "refreshed in {:.0} ms ({} pending changes consumed)",
                self.duration_ms, self.pending_changes
            ),
        }
    }
}

impl Render for queues::Placed {
    fn text(&self) -> String {
        match &self.scope {
            Some(scope) => format!(
                "{} queue {scope:?}: {} at position {}, {}",
                self.queue,
                self.content_id,
                self.position,
                self.wait.describe()
            ),
            None => format!(
                "{} queue: {} at position {}, {}",
                self.queue,
                self.content_id,
                self.position,
                self.wait.describe()
            ),
        }
    }
}

impl Render for queues::Removed {
    fn text(&self) -> String {
        format!("{} queue: removed {}", self.queue, self.content_id)
    }
}

impl Render for queues::Listing {
    fn text(&self) -> String {
        let mut out = format!("{} queue: {} items", self.queue, self.length);
        if let Some(first) = self.items.first() {
            out.push_str(&format!("; head: {}", first.wait.describe()));
            out.push_str(&format!(
                "\n{:>8}  {:>10}  {:<23}  {:>9}  content id",
                "position", "priority", "entered", "wait"
            ));
        }
        for i in &self.items {
            out.push_str(&format!(
                "\n{:>8}  {:>10}  {}  {:>9}  {}",
                i.position,
                i.priority_score,
                i.entered_queue_at.format("%Y-%m-%d %H:%M:%S%.3f"),
                i.wait
                    .expected_wait_seconds
                    .map_or_else(|| "unknown".to_owned(), |w| format!("{w:.0}s")),
                i.content_id
            ));
        }
        out
    }
}

impl Render for queues::Reordered {
    fn text(&self) -> String {
        format!(
            "{} queue: reordered {} scopes, {} items",
            self.queue, self.scopes, self.items
        )
    }
}

impl Render for perf::Stats {
    fn text(&self) -> String {
        if self.lists.is_empty() {
            return "no perf lists yet".into();
        }
        let mut out = format!(
            "{:<40} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "list", "count", "avg ms", "p50 ms", "p95 ms", "p99 ms", "max ms"
        );
        for l in &self.lists {
            out.push_str(&format!(
                "\n{:<40} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                l.key, l.count, l.avg_ms, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
            ));
        }
        out
    }
}

impl Render for adopt::Report {
    fn text(&self) -> String {
        if self.nothing_to_do {
            return format!(
                "nothing to do: this database is loyaltyd's already, migrations {:?} applied (`loyaltyd migrate` is the path from here)",
                self.migrations_recorded
            );
        }
        let mut out = String::from(if self.dry_run {
            "adoption plan (dry run: nothing was changed)\n"
        } else {
            "adoption\n"
        });
        out.push_str("\nsteps:\n");
        for (i, s) in self.steps.iter().enumerate() {
            out.push_str(&format!(
                "  {:>2}. {} [{} rows; lock: {}]\n",
                i + 1,
                s.step,
                s.rows,
                s.lock
            ));
        }
        if !self.kept_types.is_empty() {
            out.push_str("\ncolumns that keep the forum's type:\n");
            for k in &self.kept_types {
                out.push_str(&format!(
                    "  {} {} (migrate's: {}): {}\n",
                    k.column, k.sql_type, k.migrate_type, k.reason
                ));
            }
        }
        if !self.dependents.is_empty() {
            out.push_str("\nthe forum's own objects on these columns:\n");
            for d in &self.dependents {
                out.push_str(&format!("  {} on {}: {}\n", d.object, d.column, d.action));
            }
        }
        out.push_str("\ndata problems:\n");
        for p in self.problems.iter().chain(&self.redis) {
            out.push_str(&format!("  {:>9}  {}: {}\n", p.count, p.problem, p.action));
            for e in &p.examples {
                out.push_str(&format!("             e.g. {e}\n"));
            }
        }
        if self.dry_run {
            out.push_str("\nrun without --dry-run to carry it out");
        } else {
            out.push_str(&format!(
                "\ndone in {:.1}s; migrations {:?} recorded: `loyaltyd migrate` is the path from here",
                self.seconds, self.migrations_recorded
            ));
        }
        out
    }
}

impl Render for demo::SeedReport {
    fn text(&self) -> String {
        format!(
            "seeded {} users, {} events and {} items per queue in {:.1}s",
            self.users, self.events, self.queue_items, self.seconds
        )
    }
}
