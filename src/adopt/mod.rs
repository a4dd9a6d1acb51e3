//! `loyaltyd adopt`: an online, in-place upgrade of a database that already
//! runs the original design (SPEC §13).
//!
//! The forum keeps serving while it runs. No step holds a lock that blocks
//! the forum's reads or writes of its tables for longer than one short DDL
//! statement, taken with `lock_timeout` and retried:
//! * columns are added without a table rewrite; a column whose type must
//!   change in a way PostgreSQL would rewrite the table for (INTEGER to
//!   BIGINT, TIMESTAMP to TIMESTAMPTZ, REAL to DOUBLE PRECISION) is
//!   *expanded and contracted*: a new column kept in step by a trigger,
//!   back-filled in short batches, indexed concurrently, then swapped in by
//!   one short transaction of renames;
//! * constraints are added `NOT VALID` (enforced for new rows at once) and
//!   validated afterwards (which blocks no writer); `NOT NULL` follows a
//!   validated `CHECK`, so it needs no scan under the lock;
//! * indexes are built `CONCURRENTLY`; one the original has under the same
//!   name but with another definition is built beside it and swapped;
//! * data repairs and moves go in batches of `--batch-size` rows.
//!
//! What `migrate` builds is read from the catalog, not from migration text:
//! the migrations are run in a schema of their own beside the forum's (the
//! reference, module `reference`), loyaltyd's own tables are moved from it, and
//! the forum's tables get its indexes; functions, triggers, views and
//! grants are the current definitions (sql/), applied as `migrate` applies
//! them. The migrations are then recorded in `_sqlx_migrations` with their
//! checksums, and from then on `migrate` is the path. Every step first
//! looks at what is there, so a killed adoption is finished by running it
//! again.
//!
//! Data the original design leaves behind is found and reported with counts
//! and examples; repaired where the rule is clear (recorded with the value
//! before in `adoption_repairs`), otherwise moved to `adoption_quarantine`
//! with the reason; never dropped.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;

use crate::context::Context;
use crate::error::Result;

mod columns;
mod inspect;
mod reference;
mod rules;
mod session;
mod sql_text;
mod steps;
mod target;

use inspect::inspect_redis;

/// The forum's tables the original design defines.
pub const FORUM_TABLES: [&str; 5] = [
    "users",
    "moderation_events",
    "topic_creation_queue",
    "post_moderation_queue",
    "private_message_queue",
];

/// How adoption runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Print the plan and the data problems; change nothing.
    pub dry_run: bool,
    /// Rows per batch of a back-fill or a repair.
    pub batch_size: i64,
    /// How long one DDL statement waits for its lock before it lets the
    /// forum's queries through and tries again.
    pub lock_timeout: Duration,
    /// Turn on `loyaltyd_settings.legacy_score_writes`: the forum's
    /// application still runs the original code (it writes scores itself).
    pub legacy_writers: bool,
    /// Change the forum's column types to migrate's too (INTEGER to BIGINT,
    /// VARCHAR to TEXT, ...). Off by default: a type change fails every
    /// prepared statement of the application that reads the column
    /// ("cached plan must not change result type"), so it belongs in the
    /// application's restart window, not in the online path.
    pub change_types: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dry_run: false,
            batch_size: 20_000,
            lock_timeout: Duration::from_millis(500),
            legacy_writers: true,
            change_types: false,
        }
    }
}

/// One planned step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    /// What it does.
    pub step: String,
    /// Rows it touches (an estimate from the statistics where it scans).
    pub rows: i64,
    /// The strongest lock it takes on a forum table, and for how long.
    pub lock: String,
}

/// One kind of data problem.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// What is wrong.
    pub problem: String,
    /// How many rows.
    pub count: i64,
    /// What adoption does about it.
    pub action: String,
    /// A few of them, as found.
    pub examples: Vec<String>,
    /// Where the adoption records each row it repairs or moves for this
    /// problem (`adoption_repairs: <kind>`, `adoption_quarantine: <reason>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_as: Option<String>,
}

/// What `adopt` found and did.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Report {
    /// True when nothing was changed.
    pub dry_run: bool,
    /// The plan, in order.
    pub steps: Vec<Step>,
    /// The data problems found.
    pub problems: Vec<Problem>,
    /// Redis keys the original design left, by kind, and what happens to them.
    pub redis: Vec<Problem>,
    /// The forum's columns whose type stays as the forum made it (a type
    /// loyaltyd reads in place of migrate's), and why.
    pub kept_types: Vec<KeptType>,
    /// Objects of the forum's own that depend on the columns adoption
    /// touches, and what becomes of each.
    pub dependents: Vec<Dependent>,
    /// Cached scores of repaired users rewritten with the repaired score.
    pub cache_rewritten: i64,
    /// Migrations recorded as applied.
    pub migrations_recorded: Vec<i64>,
    /// True when the database was loyaltyd's, up to date, already (an
    /// adopted or migrated one): nothing was done, and that is success.
    pub nothing_to_do: bool,
    /// Wall time, in seconds.
    pub seconds: f64,
}

/// A forum column kept at its own type.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeptType {
    /// `table.column`.
    pub column: String,
    /// Its type, as the forum made it.
    pub sql_type: String,
    /// The type `migrate` gives it.
    pub migrate_type: String,
    /// Why it stays.
    pub reason: String,
}

/// An object of the forum's own on a column adoption touches.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Dependent {
    /// `table.column` it depends on.
    pub column: String,
    /// The object, as PostgreSQL describes it (`view top_posters`, `policy
    /// own_rows on table users`, ...).
    pub object: String,
    /// What adoption does to it.
    pub action: String,
}

/// Runs the adoption (or, with `dry_run`, only its inspection).
pub async fn adopt(ctx: &Context, opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let mut a = Adoption {
        pool: &ctx.pool,
        opts,
        report: Report {
            dry_run: opts.dry_run,
            ..Report::default()
        },
    };
    if a.check_adoptable().await? {
        // Adopted (or migrated) already. With --change-types, what is left
        // is the column types an online adoption kept, in the application's
        // restart window; else, idempotent (SPEC §13): nothing to do.
        if opts.change_types {
            a.inspect_columns().await?;
            if a.retyped().await? {
                a.report.migrations_recorded.clear();
                a.plan_types();
                if !opts.dry_run {
                    a.change_types().await?;
                }
                a.report.seconds = started.elapsed().as_secs_f64();
                return Ok(a.report);
            }
        }
        a.report.nothing_to_do = true;
        a.report.seconds = started.elapsed().as_secs_f64();
        return Ok(a.report);
    }
    a.inspect_columns().await?;
    a.inspect_data().await?;
    a.report.redis = inspect_redis(&ctx.redis).await;
    a.plan().await?;
    if !opts.dry_run {
        a.run().await?;
        a.rewrite_cache(ctx).await?;
    }
    a.report.seconds = started.elapsed().as_secs_f64();
    Ok(a.report)
}

struct Adoption<'a> {
    pool: &'a PgPool,
    opts: &'a Options,
    report: Report,
}

impl Adoption<'_> {
    fn problem(&mut self, problem: String, count: i64, action: String, examples: Vec<String>) {
        self.report.problems.push(Problem {
            problem,
            count,
            action,
            examples,
            recorded_as: None,
        });
    }
}
