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
//! The migrations stay the one source of loyaltyd's objects: once the
//! forum's tables have the shape migration 1 and 3 give them, each
//! migration runs statement by statement, in one transaction, skipping what
//! already exists (the forum's tables and the indexes built concurrently
//! before), and is recorded in `_sqlx_migrations` with its checksum. From
//! then on `migrate` is the path. Every step first looks at what is there,
//! so a killed adoption is finished by running it again.
//!
//! Data the original design leaves behind is found and reported with counts
//! and examples; repaired where the rule is clear (recorded with the value
//! before in `adoption_repairs`), otherwise moved to `adoption_quarantine`
//! with the reason; never dropped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::context::Context;
use crate::error::{DbContext, Error, Refusal, Result, describe};
use crate::redis_conn::Redis;
use crate::score_row::ScoreRow;

mod rules;

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

/// What a swap drops, creates again, and validates after.
#[derive(Default)]
struct SwapDependents {
    drops: Vec<String>,
    creates: Vec<String>,
    validates: Vec<String>,
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

/// A column of a forum table as it is now.
#[derive(Debug, Clone)]
struct Column {
    /// `format_type` of the column.
    sql_type: String,
    not_null: bool,
    default: Option<String>,
    generated: bool,
}

/// A column of a forum table as loyaltyd wants it.
struct Want {
    table: &'static str,
    column: &'static str,
    sql_type: &'static str,
    not_null: bool,
    default: Option<&'static str>,
    /// How the new type is computed from the old (`{c}` is the column).
    convert: &'static str,
}

/// The forum tables' columns after migrations 1, 3, 5 and 6.
const WANTED: &[Want] = &[
    w("users", "id", "bigint", true, None),
    w("users", "username", "text", true, None),
    w("users", "loyalty_score", "bigint", true, Some("0")),
    w("users", "score_version", "bigint", true, Some("0")),
    w(
        "users",
        "created_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w(
        "users",
        "updated_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("users", "score_xid", "xid8", false, None),
    w(
        "moderation_events",
        "id",
        "bigint",
        true,
        Some("nextval('moderation_events_id_seq'::regclass)"),
    ),
    w("moderation_events", "user_id", "bigint", true, None),
    w("moderation_events", "event_type", "text", true, None),
    w("moderation_events", "content_type", "text", true, None),
    w("moderation_events", "content_id", "text", true, None),
    w("moderation_events", "outcome", "text", true, None),
    w("moderation_events", "score_delta", "integer", true, None),
    w("moderation_events", "event_id", "text", false, None),
    w(
        "moderation_events",
        "created_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("topic_creation_queue", "topic_id", "text", true, None),
    w(
        "topic_creation_queue",
        "position_in_queue",
        "bigint",
        true,
        None,
    ),
    w(
        "topic_creation_queue",
        "priority_score",
        "double precision",
        true,
        Some("0"),
    ),
    w(
        "topic_creation_queue",
        "entered_queue_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("post_moderation_queue", "post_id", "text", true, None),
    w("post_moderation_queue", "topic_id", "text", true, None),
    w(
        "post_moderation_queue",
        "position_in_queue",
        "bigint",
        true,
        None,
    ),
    w(
        "post_moderation_queue",
        "priority_score",
        "double precision",
        true,
        Some("0"),
    ),
    w(
        "post_moderation_queue",
        "entered_queue_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
    w("private_message_queue", "message_id", "text", true, None),
    w(
        "private_message_queue",
        "conversation_id",
        "text",
        true,
        None,
    ),
    w(
        "private_message_queue",
        "position_in_queue",
        "bigint",
        true,
        None,
    ),
    w(
        "private_message_queue",
        "priority_score",
        "double precision",
        true,
        Some("0"),
    ),
    w(
        "private_message_queue",
        "entered_queue_at",
        "timestamp with time zone",
        true,
        Some("now()"),
    ),
];

const fn w(
    table: &'static str,
    column: &'static str,
    sql_type: &'static str,
    not_null: bool,
    default: Option<&'static str>,
) -> Want {
    Want {
        table,
        column,
        sql_type,
        not_null,
        default,
        convert: "{c}",
    }
}

/// Named constraints of the forum tables (migrations 1 and 3), as
/// `pg_get_constraintdef` prints them once added.
const CHECKS: &[(&str, &str, &str)] = &[
    ("users", "users_id_positive", "CHECK (id > 0)"),
    (
        "moderation_events",
        "moderation_events_event_type_check",
        "CHECK (octet_length(event_type) BETWEEN 1 AND 255)",
    ),
    (
        "moderation_events",
        "moderation_events_content_type_check",
        "CHECK (content_type IN ('post', 'topic', 'private_message'))",
    ),
    (
        "moderation_events",
        "moderation_events_content_id_check",
        "CHECK (octet_length(content_id) BETWEEN 1 AND 255)",
    ),
    (
        "moderation_events",
        "moderation_events_outcome_check",
        "CHECK (outcome IN ('approved', 'rejected', 'calibrated'))",
    ),
    (
        "moderation_events",
        "moderation_events_event_id_check",
        "CHECK (octet_length(event_id) BETWEEN 1 AND 255)",
    ),
    (
        "moderation_events",
        "moderation_events_user_id_fkey",
        "FOREIGN KEY (user_id) REFERENCES users (id)",
    ),
    (
        "topic_creation_queue",
        "topic_creation_queue_topic_id_check",
        "CHECK (octet_length(topic_id) BETWEEN 1 AND 255)",
    ),
    (
        "topic_creation_queue",
        "topic_creation_queue_priority_finite",
        "CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity'))",
    ),
    (
        "post_moderation_queue",
        "post_moderation_queue_post_id_check",
        "CHECK (octet_length(post_id) BETWEEN 1 AND 255)",
    ),
    (
        "post_moderation_queue",
        "post_moderation_queue_topic_id_check",
        "CHECK (octet_length(topic_id) BETWEEN 1 AND 255)",
    ),
    (
        "post_moderation_queue",
        "post_moderation_queue_priority_finite",
        "CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity'))",
    ),
    (
        "private_message_queue",
        "private_message_queue_message_id_check",
        "CHECK (octet_length(message_id) BETWEEN 1 AND 255)",
    ),
    (
        "private_message_queue",
        "private_message_queue_conversation_id_check",
        "CHECK (octet_length(conversation_id) BETWEEN 1 AND 255)",
    ),
    (
        "private_message_queue",
        "private_message_queue_priority_finite",
        "CHECK (priority_score NOT IN ('NaN', 'Infinity', '-Infinity'))",
    ),
];

/// Each queue table's item column and scope expression.
const QUEUES: [(&str, &str, &str, &str); 3] = [
    ("topic", "topic_creation_queue", "topic_id", "''"),
    ("post", "post_moderation_queue", "post_id", "topic_id"),
    (
        "message",
        "private_message_queue",
        "message_id",
        "conversation_id",
    ),
];

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
    // ------------------------------------------------------------ inspection

    /// Refuses what is not the original design; true when the database is
    /// loyaltyd's already with every migration applied (nothing to do).
    async fn check_adoptable(&mut self) -> Result<bool> {
        let recorded: Vec<i64> = if self.table_exists("_sqlx_migrations").await? {
            sqlx::query_scalar(
                "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            )
            .fetch_all(self.pool)
            .await
            .db("reading applied migrations")?
        } else {
            Vec::new()
        };
        if !recorded.is_empty() {
            let embedded: Vec<i64> = crate::db::MIGRATOR.iter().map(|m| m.version).collect();
            if embedded.iter().all(|v| recorded.contains(v)) {
                self.report.migrations_recorded = recorded;
                return Ok(true);
            }
            return Err(Error::Adopt(format!(
                "this database is managed by loyaltyd already (migrations {recorded:?} are recorded): run `loyaltyd migrate` to apply the rest"
            )));
        }
        for table in FORUM_TABLES {
            if !self.table_exists(table).await? {
                return Err(Error::Adopt(format!(
                    "table {table} is missing: this is not a database of the original design (an empty database is set up by `loyaltyd migrate`)"
                )));
            }
        }
        for (table, column) in [
            ("users", "id"),
            ("users", "username"),
            ("users", "loyalty_score"),
            ("moderation_events", "user_id"),
            ("moderation_events", "content_type"),
            ("moderation_events", "outcome"),
            ("topic_creation_queue", "position_in_queue"),
            ("post_moderation_queue", "topic_id"),
            ("private_message_queue", "conversation_id"),
        ] {
            if !self.columns(table).await?.contains_key(column) {
                return Err(Error::Adopt(format!(
                    "column {table}.{column} is missing: this is not a database of the original design"
                )));
            }
        }
        let bad_ids: i64 =
            sqlx::query_scalar("SELECT count(*) FROM users WHERE id IS NULL OR id <= 0")
                .fetch_one(self.pool)
                .await
                .db("checking user ids")?;
        if bad_ids > 0 {
            return Err(Error::Adopt(format!(
                "{bad_ids} users have an id that is not a positive integer; loyaltyd cannot move rows out of the forum's users table: fix them first"
            )));
        }
        Ok(false)
    }

    /// The forum's columns whose type differs from migrate's, and the
    /// forum's own objects on the columns adoption touches.
    ///
    /// Online, no existing column changes its type: PostgreSQL fails every
    /// prepared statement that reads a column whose type changed ("cached
    /// plan must not change result type"), on every call, until the
    /// application prepares it again, and a binary-coercible change
    /// (VARCHAR to TEXT) does so too. loyaltyd reads the original's types in
    /// place of its own (casts in its SQL), so they stay; `--change-types`
    /// changes them in the application's restart window, and leaves any
    /// column a forum object depends on as it is (never drops the object).
    async fn inspect_columns(&mut self) -> Result<()> {
        for table in FORUM_TABLES {
            let have = self.columns(table).await?;
            let dependents = self.dependents(table).await?;
            for want in WANTED.iter().filter(|w| w.table == table) {
                let Some(c) = have.get(want.column) else {
                    continue;
                };
                let name = format!("{table}.{}", want.column);
                let on_it: Vec<&(String, String, bool)> = dependents
                    .iter()
                    .filter(|(col, _, _)| col == want.column)
                    .collect();
                let same =
                    c.sql_type == want.sql_type || (c.generated && want.column == "score_delta");
                // With --change-types a column changes when everything on it
                // can be dropped and created again in the swap; otherwise it
                // keeps its type (the forum's object is never lost).
                let blocking: Vec<&str> = on_it
                    .iter()
                    .filter(|(_, _, recreatable)| !recreatable)
                    .map(|(_, o, _)| o.as_str())
                    .collect();
                let changes = !same && self.opts.change_types && blocking.is_empty();
                for (_, object, _) in &on_it {
                    self.report.dependents.push(Dependent {
                        column: name.clone(),
                        object: object.clone(),
                        action: if changes {
                            format!("dropped and created again in the swap that changes {name} to {} (definition, owner, grants and comment kept)", want.sql_type)
                        } else {
                            "kept as it is (the column's type does not change)".to_owned()
                        },
                    });
                }
                if same || changes {
                    continue;
                }
                let blocked = blocking.join(", ");
                if !compatible(&c.sql_type, want.sql_type) {
                    return Err(Error::Adopt(format!(
                        "column {name} is {}, which loyaltyd cannot read as {}: {}",
                        c.sql_type,
                        want.sql_type,
                        if blocking.is_empty() {
                            "run `loyaltyd adopt --change-types` in the application's restart window".to_owned()
                        } else {
                            format!(
                                "change its type (the forum's {blocked} depend on it) and run `loyaltyd adopt` again"
                            )
                        }
                    )));
                }
                self.report.kept_types.push(KeptType {
                    column: name,
                    sql_type: c.sql_type.clone(),
                    migrate_type: want.sql_type.to_owned(),
                    reason: if !self.opts.change_types {
                        "the application's prepared statements read it (a type change fails them): `adopt --change-types` changes it, in a restart window".into()
                    } else {
                        format!("the forum's {blocked} depend on it, which a swap cannot create again: loyaltyd does not drop the forum's objects")
                    },
                });
            }
        }
        // The original's leaderboard view is rebuilt (migrations 2 and 7):
        // an object of the forum's on it would stop that rebuild halfway.
        let on_view: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT CASE WHEN d.classid = 'pg_rewrite'::REGCLASS THEN
                                 (SELECT CASE v.relkind WHEN 'm' THEN 'materialized view ' ELSE 'view ' END || v.oid::REGCLASS::TEXT
                                  FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class WHERE r.oid = d.objid)
                             ELSE pg_describe_object(d.classid, d.objid, d.objsubid) END
             FROM pg_depend d
             WHERE d.refclassid = 'pg_class'::REGCLASS AND d.refobjid = to_regclass('user_leaderboard')
               AND d.deptype = 'n' AND d.classid <> 'pg_class'::REGCLASS
               AND NOT (d.classid = 'pg_rewrite'::REGCLASS
                        AND (SELECT r.ev_class FROM pg_rewrite r WHERE r.oid = d.objid) = to_regclass('user_leaderboard'))",
        )
        .fetch_all(self.pool)
        .await
        .db("reading what depends on user_leaderboard")?;
        if !on_view.is_empty() {
            return Err(Error::Adopt(format!(
                "the forum's {} depend on the materialized view user_leaderboard, which adoption rebuilds (and the leaderboard refresh swaps): move them onto the function leaderboard_page() or the users table, then run `loyaltyd adopt` again (nothing was changed)",
                on_view.join(", ")
            )));
        }
        Ok(())
    }

    /// The forum's own objects that depend on columns of `table`: views,
    /// materialized views, foreign keys, checks, policies, triggers,
    /// generated columns, SQL-bodied functions — loyaltyd's own objects
    /// (a resumed adoption's) and the original's leaderboard view left out.
    async fn dependents(&self, table: &str) -> Result<Vec<(String, String, bool)>> {
        let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
            "SELECT DISTINCT a.attname::TEXT,
                    CASE WHEN d.classid = 'pg_rewrite'::REGCLASS THEN
                             (SELECT CASE v.relkind WHEN 'm' THEN 'materialized view ' ELSE 'view ' END || v.oid::REGCLASS::TEXT
                              FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class WHERE r.oid = d.objid)
                         ELSE pg_describe_object(d.classid, d.objid, d.objsubid) END,
                    CASE d.classid
                         WHEN 'pg_rewrite'::REGCLASS THEN (SELECT r.ev_class::REGCLASS::TEXT FROM pg_rewrite r WHERE r.oid = d.objid)
                         WHEN 'pg_trigger'::REGCLASS THEN (SELECT t.tgname::TEXT FROM pg_trigger t WHERE t.oid = d.objid)
                         WHEN 'pg_constraint'::REGCLASS THEN (SELECT c.conname::TEXT FROM pg_constraint c WHERE c.oid = d.objid)
                         WHEN 'pg_policy'::REGCLASS THEN (SELECT p.polname::TEXT FROM pg_policy p WHERE p.oid = d.objid)
                         WHEN 'pg_proc'::REGCLASS THEN (SELECT p.proname::TEXT FROM pg_proc p WHERE p.oid = d.objid)
                         ELSE '' END,
                    -- What a type change's swap can drop and create again
                    -- (expand_contract): a plain view no other view reads,
                    -- a trigger, a CHECK or a foreign key.
                    CASE d.classid
                         WHEN 'pg_rewrite'::REGCLASS THEN
                             (SELECT v.relkind = 'v' AND NOT EXISTS (
                                         SELECT 1 FROM pg_depend d2 JOIN pg_rewrite r2 ON r2.oid = d2.objid
                                         WHERE d2.classid = 'pg_rewrite'::REGCLASS AND d2.refobjid = v.oid
                                           AND r2.ev_class <> v.oid)
                              FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class WHERE r.oid = d.objid)
                         WHEN 'pg_trigger'::REGCLASS THEN true
                         WHEN 'pg_constraint'::REGCLASS THEN
                             (SELECT c.contype IN ('c', 'f') FROM pg_constraint c WHERE c.oid = d.objid)
                         ELSE false END
             FROM pg_depend d
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE d.refclassid = 'pg_class'::REGCLASS AND d.refobjid = to_regclass($1)
               AND d.refobjsubid > 0 AND d.deptype = 'n'
               AND NOT (d.classid = 'pg_rewrite'::REGCLASS
                        AND (SELECT r.ev_class FROM pg_rewrite r WHERE r.oid = d.objid) = to_regclass($1))
             ORDER BY 1, 2",
        )
        .bind(table)
        .fetch_all(self.pool)
        .await
        .db("reading what depends on the forum's columns")?;
        let ours = |name: &str| {
            name == "user_leaderboard"
                || name.ends_with("__new_not_null")
                || name.ends_with("_loyaltyd_widen")
                || CHECKS.iter().any(|(_, n, _)| *n == name)
                || crate::db::MIGRATOR.iter().any(|m| {
                    let sql = m.sql.as_str();
                    [
                        format!("CREATE TRIGGER {name} "),
                        format!("CREATE VIEW {name} "),
                        format!("CONSTRAINT {name} "),
                    ]
                    .iter()
                    .any(|p| sql.contains(p.as_str()))
                })
        };
        Ok(rows
            .into_iter()
            .filter(|(_, _, name, _)| !ours(name))
            .map(|(column, object, _, recreatable)| (column, object, recreatable))
            .collect())
    }

    /// Counts (and samples) every data problem of the original design.
    async fn inspect_data(&mut self) -> Result<()> {
        // Every rule of rules.rs, counted and sampled as the adoption will
        // apply it.
        let event_id = self
            .columns("moderation_events")
            .await?
            .contains_key("event_id");
        for rule in rules::rules(event_id) {
            let (table, when, example) = (rule.table, &rule.when, &rule.example);
            let sql = format!(
                "SELECT count(*), (SELECT COALESCE(array_agg(x), '{{}}') FROM (
                     SELECT {example} AS x FROM {table} WHERE {when} ORDER BY {key} LIMIT 5) s)
                 FROM {table} WHERE {when}",
                key = rule.key
            );
            let (count, examples): (i64, Vec<String>) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_one(self.pool)
                .await
                .db("inspecting the data")?;
            self.report.problems.push(Problem {
                problem: rule.problem.clone(),
                count,
                action: rule.action(),
                examples,
                recorded_as: Some(rule.recorded_as()),
            });
        }
        // Scores against the events that will count (valid, of existing users).
        let (count, examples): (i64, Vec<String>) = sqlx::query_as(
            "WITH truth AS (
                 SELECT user_id, sum((CASE lower(btrim(outcome)) WHEN 'approved' THEN 1 WHEN 'rejected' THEN -1 ELSE 0 END)
                                   * (CASE lower(btrim(content_type)) WHEN 'topic' THEN 5 ELSE 1 END)) AS score
                 FROM moderation_events
                 WHERE lower(btrim(content_type)) IN ('post', 'topic', 'private_message')
                   AND lower(btrim(outcome)) IN ('approved', 'rejected', 'calibrated')
                   AND octet_length(event_type) BETWEEN 1 AND 255 AND octet_length(content_id::TEXT) BETWEEN 1 AND 255
                 GROUP BY user_id
             ), drifted AS (
                 SELECT u.id, u.loyalty_score, COALESCE(t.score, 0) AS score
                 FROM users u LEFT JOIN truth t ON t.user_id = u.id
                 WHERE u.loyalty_score IS NOT NULL AND u.loyalty_score <> COALESCE(t.score, 0)
             )
             SELECT count(*), (SELECT COALESCE(array_agg(x), '{}') FROM (
                 SELECT format('user %s: stored %s, events say %s', id, loyalty_score, score) AS x FROM drifted ORDER BY id LIMIT 5) s)
             FROM drifted"
        )
        .fetch_one(self.pool)
        .await
        .db("inspecting scores")?;
        self.problem(
            "scores that drifted from their events".into(),
            count,
            "recomputed from the events (the stored value is in adoption_repairs)".into(),
            examples,
        );
        for (queue, table, _, scope) in QUEUES {
            let sql = format!(
                "WITH d AS (SELECT {scope}::TEXT AS scope, position_in_queue, count(*) AS n FROM {table}
                            GROUP BY 1, 2 HAVING count(*) > 1)
                 SELECT COALESCE(sum(n - 1), 0)::BIGINT, (SELECT COALESCE(array_agg(x), '{{}}') FROM (
                     SELECT format('scope %s: %s items at position %s', quote_literal(scope), n, position_in_queue) AS x
                     FROM d ORDER BY scope, position_in_queue LIMIT 5) s) FROM d"
            );
            let (count, examples): (i64, Vec<String>) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_one(self.pool)
                .await
                .db("inspecting queue positions")?;
            self.problem(
                format!("{queue} queue items sharing a position (the original's MAX + 1 race)"),
                count,
                "ordered by position, entry time, id: the order is kept, the keys made unique (old keys in adoption_repairs)".into(),
                examples,
            );
            let sql = format!(
                "SELECT COALESCE(sum(gaps), 0)::BIGINT FROM (
                     SELECT max(position_in_queue) - count(DISTINCT position_in_queue) AS gaps
                     FROM {table} GROUP BY {scope}::TEXT) g WHERE gaps > 0"
            );
            let gaps: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(self.pool)
                .await
                .db("inspecting queue positions")?;
            self.problem(
                format!("{queue} queue positions missing in the sequence (the original's shifting remove, interrupted)"),
                gaps,
                "nothing to do: positions are read as ranks, dense whatever the gaps".into(),
                Vec::new(),
            );
        }
        Ok(())
    }

    fn problem(&mut self, problem: String, count: i64, action: String, examples: Vec<String>) {
        self.report.problems.push(Problem {
            problem,
            count,
            action,
            examples,
            recorded_as: None,
        });
    }

    /// The steps, their rows and locks, in the order [`Adoption::run`] takes them.
    async fn plan(&mut self) -> Result<()> {
        let pool = self.pool;
        let rows = |t: &'static str| async move {
            sqlx::query_scalar::<_, f32>("SELECT reltuples FROM pg_class WHERE oid = $1::REGCLASS")
                .bind(t)
                .fetch_one(pool)
                .await
                .map(|r| r.max(0.0) as i64)
                .db("reading table sizes")
        };
        let short = format!(
            "ACCESS EXCLUSIVE for one metadata change (waits at most {} ms, then lets the forum through and retries)",
            self.opts.lock_timeout.as_millis()
        );
        let mut steps = Vec::new();
        for table in FORUM_TABLES {
            let have = self.columns(table).await?;
            let n = rows(table).await?;
            for want in WANTED.iter().filter(|w| w.table == table) {
                match have.get(want.column) {
                    None => steps.push(Step {
                        step: format!("add {table}.{} {} (no rewrite)", want.column, want.sql_type),
                        rows: 0,
                        lock: short.clone(),
                    }),
                    Some(c) if c.sql_type == want.sql_type || (c.sql_type == "integer" && want.column == "score_delta") => {}
                    Some(_) if self.kept(table, want.column) => {}
                    Some(c) if binary_coercible(&c.sql_type, want.sql_type) => steps.push(Step {
                        step: format!("{table}.{}: {} to {} (no rewrite)", want.column, c.sql_type, want.sql_type),
                        rows: 0,
                        lock: short.clone(),
                    }),
                    Some(c) => steps.push(Step {
                        step: format!(
                            "{table}.{}: {} to {} by expand and contract (new column kept in step by a trigger, back-filled in batches of {}, indexed concurrently, swapped by renames)",
                            want.column, c.sql_type, want.sql_type, self.opts.batch_size
                        ),
                        rows: n,
                        lock: format!("ROW EXCLUSIVE per batch (row locks only); {short} for the swap"),
                    }),
                }
            }
        }
        if !self.report.kept_types.is_empty() {
            steps.push(Step {
                step: format!(
                    "keep {} columns at the forum's own types, which loyaltyd reads in place of its own (see kept_types)",
                    self.report.kept_types.len()
                ),
                rows: 0,
                lock: "none".into(),
            });
        }
        let events = rows("moderation_events").await?;
        steps.push(Step {
            step: format!(
                "back-fill moderation_events.score_delta in batches of {}",
                self.opts.batch_size
            ),
            rows: events,
            lock: "row locks of one batch at a time".into(),
        });
        steps.push(Step {
            step: "normalize or quarantine events and queue items that break loyaltyd's rules (see the problems)".into(),
            rows: self.report.problems.iter().map(|p| p.count).sum(),
            lock: "row locks of the rows moved".into(),
        });
        steps.push(Step {
            step: "add named CHECK and FOREIGN KEY constraints NOT VALID, then VALIDATE; NOT NULL after a validated CHECK".into(),
            rows: events + rows("users").await?,
            lock: format!("SHARE UPDATE EXCLUSIVE while validating (readers and writers go on); {short} to add each"),
        });
        let last = crate::db::MIGRATOR
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or_default();
        steps.push(Step {
            step: "build the indexes of migrations 1, 3 and 5 CONCURRENTLY (and swap the original's same-named ones whose definition differs)".into(),
            rows: events,
            lock: "SHARE UPDATE EXCLUSIVE (readers and writers go on)".into(),
        });
        steps.push(Step {
            step: format!("run migrations 1 to {last} statement by statement, skipping what exists; install the SQL contract's triggers; turn on legacy_score_writes while the original code still runs; rebuild the leaderboard view beside the old one and swap it in"),
            rows: 0,
            lock: format!("{short}, per trigger"),
        });
        steps.push(Step {
            step: "count queue blocks from the items and make tied queue keys unique".into(),
            rows: rows("topic_creation_queue").await?
                + rows("post_moderation_queue").await?
                + rows("private_message_queue").await?,
            lock:
                "SHARE ROW EXCLUSIVE on one queue table while its items are counted (readers go on)"
                    .into(),
        });
        steps.push(Step {
            step: format!(
                "recompute drifted scores from their events, {} users a transaction",
                self.opts.batch_size
            ),
            rows: self
                .report
                .problems
                .iter()
                .find(|p| p.problem.starts_with("scores"))
                .map_or(0, |p| p.count),
            lock: "row locks of one batch of users".into(),
        });
        steps.push(Step {
            step: format!("record migrations 1 to {last} in _sqlx_migrations"),
            rows: 0,
            lock: "none on forum tables".into(),
        });
        self.report.steps = steps;
        Ok(())
    }

    /// The original's cached `loyalty:<id>` entries of every user whose
    /// score adoption repaired hold the score before: rewritten (versioned,
    /// and on the live board where there is one) with the score now, so
    /// `score get` agrees with the database without a daemon. Redis away
    /// is reported, not fatal: the daemon's sync or `score recalc --all`
    /// rewrites them later.
    async fn rewrite_cache(&mut self, ctx: &Context) -> Result<()> {
        let scores: Vec<ScoreRow> = sqlx::query_as(concat!(
            "SELECT ",
            crate::score_row_columns!(),
            " FROM users WHERE id IN (SELECT substr(subject, 6)::BIGINT FROM adoption_repairs
                                      WHERE kind LIKE 'users.loyalty_score%' AND subject LIKE 'user %')"
        ))
        .fetch_all(self.pool)
        .await
        .db("reading the repaired scores")?;
        let mut written = 0;
        let mut failed = false;
        for chunk in scores.chunks(1000) {
            if crate::publish::scores(ctx, chunk).await {
                written += chunk.len() as i64;
            } else {
                failed = true;
            }
        }
        self.report.cache_rewritten = written;
        if failed {
            self.problem(
                "cached scores of repaired users".into(),
                scores.len() as i64 - written,
                "Redis unavailable: not rewritten; start the daemon (its cache sync) or run `loyaltyd score recalc --all`".into(),
                Vec::new(),
            );
        }
        Ok(())
    }

    // ------------------------------------------------------------ types only

    /// True when a column of a forum table has another type than migrate's
    /// and will change (not kept).
    async fn retyped(&self) -> Result<bool> {
        for table in FORUM_TABLES {
            let have = self.columns(table).await?;
            for want in WANTED.iter().filter(|w| w.table == table) {
                if have.get(want.column).is_some_and(|c| {
                    c.sql_type != want.sql_type
                        && !(c.generated && want.column == "score_delta")
                        && !self.kept(table, want.column)
                }) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The plan of `adopt --change-types` on an adopted database.
    fn plan_types(&mut self) {
        self.report.steps = vec![
            Step {
                step: format!(
                    "change the forum columns' types to migrate's by expand and contract (new column kept in step by a trigger, back-filled in batches of {}, indexed concurrently, swapped by renames with the views, triggers and checks on them created again in the swap)",
                    self.opts.batch_size
                ),
                rows: 0,
                lock: format!(
                    "ACCESS EXCLUSIVE for each swap (waits at most {} ms, then retries); the application's prepared statements that read these columns fail until it prepares them again: run it in the application's restart window",
                    self.opts.lock_timeout.as_millis()
                ),
            },
            Step {
                step: "run the migrations' statements again, skipping what exists (loyaltyd's leaderboard view and anything the swaps replaced)".into(),
                rows: 0,
                lock: "ACCESS EXCLUSIVE for one metadata change at a time".into(),
            },
            Step {
                step: "add loyaltyd's named CHECK constraints on the new columns NOT VALID, then VALIDATE".into(),
                rows: 0,
                lock: "SHARE UPDATE EXCLUSIVE while validating".into(),
            },
        ];
    }

    /// `adopt --change-types` on an adopted database: the kept types.
    async fn change_types(&mut self) -> Result<()> {
        for table in FORUM_TABLES {
            self.shape_columns(table).await?;
        }
        self.run_migrations(false).await?;
        self.constraints().await?;
        self.report.migrations_recorded = crate::db::MIGRATOR.iter().map(|m| m.version).collect();
        Ok(())
    }

    // ------------------------------------------------------------ the run

    async fn run(&mut self) -> Result<()> {
        self.bookkeeping_first().await?;
        for table in FORUM_TABLES {
            self.shape_columns(table).await?;
        }
        self.backfill_score_delta().await?;
        self.clean().await?;
        self.constraints().await?;
        self.indexes().await?;
        self.run_migrations(true).await?;
        self.queue_bookkeeping().await?;
        self.repair_scores().await?;
        self.record_migrations().await?;
        Ok(())
    }

    /// What the data steps write into: the adoption's own tables and the
    /// score_delta trigger (migration 6's statements, run early).
    async fn bookkeeping_first(&self) -> Result<()> {
        let m6 = migration(6)?;
        let mut conn = self.conn().await?;
        for stmt in split_statements(m6) {
            let upper = normalize(&stmt);
            let wanted = upper.starts_with("CREATE TABLE ADOPTION_")
                || upper.starts_with("CREATE FUNCTION MODERATION_EVENTS_DELTA")
                || upper.starts_with("ALTER FUNCTION MODERATION_EVENTS_DELTA");
            if wanted && let Some(stmt) = self.still_needed(&stmt).await? {
                self.ddl(&mut conn, &stmt).await?;
            }
        }
        Ok(())
    }

    /// Brings one forum table's columns to their wanted types, defaults and
    /// presence (NOT NULL comes with the constraints, after the data is clean).
    async fn shape_columns(&self, table: &'static str) -> Result<()> {
        let mut conn = self.conn().await?;
        let have = self.columns(table).await?;
        let retype = WANTED.iter().filter(|w| w.table == table).any(|w| {
            have.get(w.column).is_some_and(|c| {
                c.sql_type != w.sql_type
                    && !(c.generated && w.column == "score_delta")
                    && !self.kept(table, w.column)
            })
        });
        if table == "users" && retype {
            // The original's leaderboard view reads these columns: it goes
            // while their types change and comes back right after.
            self.ddl(
                &mut conn,
                "DROP MATERIALIZED VIEW IF EXISTS user_leaderboard",
            )
            .await?;
        }
        let mut expand = Vec::new();
        let mut coerce = Vec::new();
        for want in WANTED.iter().filter(|w| w.table == table) {
            match have.get(want.column) {
                None => {
                    let default = want
                        .default
                        .filter(|d| !d.starts_with("nextval"))
                        .map(|d| format!(" DEFAULT {d}"))
                        .unwrap_or_default();
                    self.ddl(
                        &mut conn,
                        &format!(
                            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {}{default}",
                            want.column, want.sql_type
                        ),
                    )
                    .await?;
                }
                Some(c) if c.generated && want.column == "score_delta" => {
                    // Migration 6's own step, on a table whose score_delta
                    // is still generated: metadata only.
                    self.ddl(
                        &mut conn,
                        "ALTER TABLE moderation_events ALTER COLUMN score_delta DROP EXPRESSION",
                    )
                    .await?;
                }
                Some(c) if c.sql_type == want.sql_type => {}
                Some(_) if self.kept(table, want.column) => {}
                Some(c) if binary_coercible(&c.sql_type, want.sql_type) => coerce.push(want),
                Some(_) => expand.push(want),
            }
        }
        if !coerce.is_empty() {
            // No rewrite, but the views and triggers on the columns must go
            // and come back around the change: one transaction.
            let columns: Vec<String> = coerce.iter().map(|w| w.column.to_owned()).collect();
            let again = self.swap_dependents(table, &columns, "").await?;
            let alter: Vec<String> = coerce
                .iter()
                .map(|w| format!("ALTER COLUMN {} TYPE {}", w.column, w.sql_type))
                .collect();
            let mut stmts = again.drops.clone();
            stmts.push(format!("ALTER TABLE {table} {}", alter.join(", ")));
            stmts.extend(again.creates.iter().cloned());
            self.transaction(&stmts).await?;
            for v in &again.validates {
                self.ddl(&mut conn, v).await?;
            }
        }
        if !expand.is_empty() {
            self.expand_contract(table, &expand).await?;
        }
        // Defaults, now that the types are right.
        let have = self.columns(table).await?;
        for want in WANTED.iter().filter(|w| w.table == table) {
            let current = have.get(want.column).and_then(|c| c.default.clone());
            if let Some(d) = want.default
                && current.as_deref() != Some(d)
            {
                if d.starts_with("nextval") {
                    // The id sequence: bigint, owned by the column.
                    self.ddl(
                        &mut conn,
                        "CREATE SEQUENCE IF NOT EXISTS moderation_events_id_seq AS BIGINT",
                    )
                    .await?;
                    self.ddl(&mut conn, "ALTER SEQUENCE moderation_events_id_seq AS BIGINT OWNED BY moderation_events.id").await?;
                    self.ddl(&mut conn, "SELECT setval('moderation_events_id_seq', GREATEST((SELECT COALESCE(max(id), 0) FROM moderation_events), (SELECT last_value FROM moderation_events_id_seq)))").await?;
                }
                self.ddl(
                    &mut conn,
                    &format!(
                        "ALTER TABLE {table} ALTER COLUMN {} SET DEFAULT {d}",
                        want.column
                    ),
                )
                .await?;
            }
        }
        if table == "moderation_events" && !self.kept(table, "id") {
            self.ddl(
                &mut conn,
                "ALTER SEQUENCE IF EXISTS moderation_events_id_seq AS BIGINT",
            )
            .await?;
        }
        // A sequence the forum's own default on users.id draws from (kept:
        // the forum creates its users) grows with the column.
        if let Some(seq) = have
            .get("id")
            .filter(|_| table == "users" && !self.kept(table, "id"))
            .and_then(|c| c.default.as_deref())
            .and_then(sequence_of)
        {
            self.ddl(&mut conn, &format!("ALTER SEQUENCE {seq} AS BIGINT"))
                .await?;
        }
        if table == "users" && !self.relation_exists("user_leaderboard").await? {
            self.restore_leaderboard_view().await?;
        }
        Ok(())
    }

    /// Migration 2's view and its indexes, as migration 2 creates them
    /// (the build reads users without blocking its writers).
    async fn restore_leaderboard_view(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        for stmt in split_statements(migration(2)?) {
            let upper = normalize(&stmt);
            let on_view = index_target(&stmt).is_some_and(|(_, t)| t == "user_leaderboard");
            if upper.starts_with("CREATE MATERIALIZED VIEW USER_LEADERBOARD") || on_view {
                self.ddl(&mut conn, &stmt).await?;
            }
        }
        Ok(())
    }

    /// Changes the types of `wants` on a live table without rewriting it
    /// under a lock: new columns, a trigger that keeps them in step, a
    /// back-fill in batches, indexes built concurrently, one swap.
    async fn expand_contract(&self, table: &'static str, wants: &[&Want]) -> Result<()> {
        let mut conn = self.conn().await?;
        let sync_fn = format!("{table}_loyaltyd_widen");
        // 1. The new columns, and the trigger that fills them for every row
        //    written from now on.
        let mut sets = Vec::new();
        let mut watched = Vec::new();
        for want in wants {
            let new = format!("{}__new", want.column);
            self.ddl(
                &mut conn,
                &format!(
                    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {new} {}",
                    want.sql_type
                ),
            )
            .await?;
            let conv = convert(
                want,
                &format!("NEW.{}", want.column),
                &self.columns(table).await?,
            );
            sets.push(format!("NEW.{new} := {conv};"));
            watched.push(want.column.to_owned());
        }
        self.ddl(
            &mut conn,
            &format!(
                "CREATE OR REPLACE FUNCTION {sync_fn}() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN {} RETURN NEW; END $f$",
                sets.join(" ")
            ),
        )
        .await?;
        self.ddl(
            &mut conn,
            &format!(
                "CREATE OR REPLACE TRIGGER {sync_fn} BEFORE INSERT OR UPDATE OF {} ON {table} FOR EACH ROW EXECUTE FUNCTION {sync_fn}()",
                watched.join(", ")
            ),
        )
        .await?;
        // 2. The rows written before: in batches along the primary key.
        let have = self.columns(table).await?;
        let assignments: Vec<String> = wants
            .iter()
            .map(|w| format!("{}__new = {}", w.column, convert(w, w.column, &have)))
            .collect();
        let pending: Vec<String> = wants
            .iter()
            .map(|w| {
                format!(
                    "{}__new IS DISTINCT FROM {}",
                    w.column,
                    convert(w, w.column, &have)
                )
            })
            .collect();
        self.in_batches(
            table,
            &format!(
                "UPDATE {table} SET {} WHERE {{range}} AND ({})",
                assignments.join(", "),
                pending.join(" OR ")
            ),
        )
        .await?;
        // 3. NOT NULL by a validated check, and every index that uses an old
        //    column, built on the new one beside it.
        for want in wants {
            let new = format!("{}__new", want.column);
            // Only a NOT NULL the column has already: a NULL the original
            // allows is repaired or quarantined by the data rules first, and
            // the NOT NULL loyaltyd wants comes with the constraints after.
            if have.get(want.column).is_some_and(|c| c.not_null) {
                let check = format!("{table}_{new}_not_null");
                if !self.constraint_exists(table, &check).await? {
                    self.ddl(&mut conn, &format!("ALTER TABLE {table} ADD CONSTRAINT {check} CHECK ({new} IS NOT NULL) NOT VALID"))
                        .await?;
                }
                self.ddl(
                    &mut conn,
                    &format!("ALTER TABLE {table} VALIDATE CONSTRAINT {check}"),
                )
                .await?;
            }
        }
        let indexes: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT i.relname::TEXT, pg_get_indexdef(x.indexrelid), x.indisprimary
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
             WHERE x.indrelid = $1::REGCLASS AND i.relname NOT LIKE '%\\_\\_new'",
        )
        .bind(table)
        .fetch_all(self.pool)
        .await
        .db("reading indexes")?;
        let mut swaps = Vec::new();
        for (name, def, primary) in indexes {
            let touched = wants.iter().any(|w| mentions(&def, w.column));
            if !touched {
                continue;
            }
            let mut new_def = def.replacen(
                &format!("INDEX {name} ON"),
                &format!("INDEX {name}__new ON"),
                1,
            );
            for w in wants {
                new_def = replace_word(&new_def, w.column, &format!("{}__new", w.column));
            }
            let new_def = new_def.replacen("INDEX ", "INDEX CONCURRENTLY IF NOT EXISTS ", 1);
            self.concurrently(&format!("{name}__new"), &new_def).await?;
            swaps.push((name, primary));
        }
        // 4. The swap: one short transaction of metadata changes.
        let mut swap = Vec::new();
        // Foreign keys that reference a swapped column go, and come back NOT VALID.
        let fks: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.conname::TEXT, c.conrelid::REGCLASS::TEXT, pg_get_constraintdef(c.oid)
             FROM pg_constraint c WHERE c.contype = 'f' AND (c.confrelid = $1::REGCLASS OR c.conrelid = $1::REGCLASS)",
        )
        .bind(table)
        .fetch_all(self.pool)
        .await
        .db("reading foreign keys")?;
        for (name, on, _) in &fks {
            swap.push(format!("ALTER TABLE {on} DROP CONSTRAINT {name}"));
        }
        // The original's leaderboard view reads users' columns; it is rebuilt
        // by migration 2 (readers of the view wait for that statement).
        if table == "users" {
            swap.push("DROP MATERIALIZED VIEW IF EXISTS user_leaderboard".into());
        }
        for (name, primary) in &swaps {
            if *primary {
                swap.push(format!(
                    "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}"
                ));
            }
        }
        swap.push(format!("DROP TRIGGER IF EXISTS {sync_fn} ON {table}"));
        // Views, triggers and CHECKs on the old columns (the forum's and
        // loyaltyd's): dropped here and created again below, on the new ones.
        let again = self.swap_dependents(table, &watched, &sync_fn).await?;
        swap.extend(again.drops.iter().cloned());
        for want in wants {
            let default = self
                .columns(table)
                .await?
                .get(want.column)
                .and_then(|c| c.default.clone());
            let sequence = default.as_deref().and_then(sequence_of);
            if let Some(seq) = &sequence {
                // Dropping the column would drop the sequence it owns.
                swap.push(format!("ALTER SEQUENCE {seq} OWNED BY NONE"));
            }
            // No CASCADE: what depends on the column was dropped above to be
            // created again; anything else makes the swap fail whole.
            swap.push(format!("ALTER TABLE {table} DROP COLUMN {}", want.column));
            swap.push(format!(
                "ALTER TABLE {table} RENAME COLUMN {}__new TO {}",
                want.column, want.column
            ));
            if let Some(d) = default {
                swap.push(format!(
                    "ALTER TABLE {table} ALTER COLUMN {} SET DEFAULT {d}",
                    want.column
                ));
            }
            if let Some(seq) = &sequence {
                swap.push(format!(
                    "ALTER SEQUENCE {seq} AS BIGINT OWNED BY {table}.{}",
                    want.column
                ));
            }
            let check = format!("{table}_{}__new_not_null", want.column);
            if self.constraint_exists(table, &check).await? {
                swap.push(format!(
                    "ALTER TABLE {table} ALTER COLUMN {} SET NOT NULL",
                    want.column
                ));
                swap.push(format!("ALTER TABLE {table} DROP CONSTRAINT {check}"));
            }
        }
        for (name, primary) in &swaps {
            swap.push(format!("ALTER INDEX {name}__new RENAME TO {name}"));
            if *primary {
                swap.push(format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {name} PRIMARY KEY USING INDEX {name}"
                ));
            }
        }
        for (name, on, def) in &fks {
            swap.push(format!(
                "ALTER TABLE {on} ADD CONSTRAINT {name} {def} NOT VALID"
            ));
        }
        swap.extend(again.creates.iter().cloned());
        self.transaction(&swap).await?;
        for v in &again.validates {
            self.ddl(&mut conn, v).await?;
        }
        for (name, on, _) in &fks {
            self.ddl(
                &mut conn,
                &format!("ALTER TABLE {on} VALIDATE CONSTRAINT {name}"),
            )
            .await?;
        }
        self.ddl(&mut conn, &format!("DROP FUNCTION IF EXISTS {sync_fn}()"))
            .await?;
        Ok(())
    }

    /// What a type change's swap drops and creates again for `columns` of
    /// `table`: plain views (with their options, owner, grants and comment),
    /// triggers (with their comment) and CHECK constraints (re-added NOT
    /// VALID, validated after the swap; loyaltyd's own come back from
    /// [`CHECKS`] in [`Adoption::constraints`]). The statements are built by
    /// PostgreSQL itself (`pg_get_viewdef`, `pg_get_triggerdef`,
    /// `pg_get_constraintdef`, `format('%I')`), so names are quoted and the
    /// definitions are the catalog's. A view another view reads is not
    /// here: `inspect_columns` keeps such a column's type.
    async fn swap_dependents(
        &self,
        table: &str,
        columns: &[String],
        skip_trigger: &str,
    ) -> Result<SwapDependents> {
        let views: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT DISTINCT format('DROP VIEW %s', v.oid::REGCLASS),
                    ARRAY[format('CREATE VIEW %s%s AS %s', v.oid::REGCLASS,
                                 COALESCE(' WITH (' || array_to_string(v.reloptions, ', ') || ')', ''),
                                 rtrim(pg_get_viewdef(v.oid), ';')),
                          format('ALTER VIEW %s OWNER TO %I', v.oid::REGCLASS, pg_get_userbyid(v.relowner))]
                    || COALESCE((SELECT array_agg(format('COMMENT ON VIEW %s IS %L', v.oid::REGCLASS, x.c))
                                 FROM (SELECT obj_description(v.oid, 'pg_class') AS c) x WHERE x.c IS NOT NULL), '{}')
                    || COALESCE((SELECT array_agg(format('GRANT %s ON %s TO %s', a.privilege_type, v.oid::REGCLASS,
                                                         CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END))
                                 FROM aclexplode(v.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
                                 WHERE a.grantee <> v.relowner), '{}')
             FROM pg_depend d
             JOIN pg_rewrite rw ON rw.oid = d.objid
             JOIN pg_class v ON v.oid = rw.ev_class
             JOIN pg_attribute att ON att.attrelid = d.refobjid AND att.attnum = d.refobjsubid
             WHERE d.classid = 'pg_rewrite'::REGCLASS AND d.refobjid = $1::REGCLASS
               AND att.attname = ANY($2) AND v.relkind = 'v' AND v.oid <> $1::REGCLASS",
        )
        .bind(table)
        .bind(columns)
        .fetch_all(self.pool)
        .await
        .db("reading the views on the columns")?;
        let triggers: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT format('DROP TRIGGER %I ON %s', t.tgname, t.tgrelid::REGCLASS),
                    ARRAY[pg_get_triggerdef(t.oid)]
                    || COALESCE((SELECT array_agg(format('COMMENT ON TRIGGER %I ON %s IS %L', t.tgname, t.tgrelid::REGCLASS, x.c))
                                 FROM (SELECT obj_description(t.oid, 'pg_trigger') AS c) x WHERE x.c IS NOT NULL), '{}')
             FROM pg_trigger t
             WHERE t.tgrelid = $1::REGCLASS AND NOT t.tgisinternal AND t.tgname <> $3
               AND EXISTS (SELECT 1 FROM pg_depend d
                           JOIN pg_attribute att ON att.attrelid = d.refobjid AND att.attnum = d.refobjsubid
                           WHERE d.classid = 'pg_trigger'::REGCLASS AND d.objid = t.oid
                             AND d.refobjid = $1::REGCLASS AND att.attname = ANY($2))
             ORDER BY t.tgname",
        )
        .bind(table)
        .bind(columns)
        .bind(skip_trigger)
        .fetch_all(self.pool)
        .await
        .db("reading the triggers on the columns")?;
        let ours: Vec<&str> = CHECKS.iter().map(|(_, n, _)| *n).collect();
        let checks: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', c.conrelid::REGCLASS, c.conname),
                    CASE WHEN c.conname <> ALL($3) THEN
                        format('ALTER TABLE %s ADD CONSTRAINT %I %s NOT VALID', c.conrelid::REGCLASS, c.conname,
                               pg_get_constraintdef(c.oid)) END,
                    CASE WHEN c.conname <> ALL($3) THEN
                        format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.conrelid::REGCLASS, c.conname) END
             FROM pg_constraint c
             WHERE c.conrelid = $1::REGCLASS AND c.contype = 'c'
               AND c.conkey && (SELECT array_agg(attnum) FROM pg_attribute
                                WHERE attrelid = $1::REGCLASS AND attname = ANY($2))
             ORDER BY c.conname",
        )
        .bind(table)
        .bind(columns)
        .bind(&ours)
        .fetch_all(self.pool)
        .await
        .db("reading the checks on the columns")?;
        let mut out = SwapDependents::default();
        for (drop, creates) in views.into_iter().chain(triggers) {
            out.drops.push(drop);
            out.creates.extend(creates);
        }
        for (drop, create, validate) in checks {
            out.drops.push(drop);
            out.creates.extend(create);
            out.validates.extend(validate);
        }
        Ok(out)
    }

    /// score_delta for the rows written before the trigger: in batches.
    async fn backfill_score_delta(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        if !self
            .trigger_exists("moderation_events", "moderation_events_delta")
            .await?
        {
            let m6 = migration(6)?;
            for stmt in split_statements(m6) {
                if normalize(&stmt).starts_with("CREATE TRIGGER MODERATION_EVENTS_DELTA") {
                    self.ddl(&mut conn, &stmt).await?;
                }
            }
        }
        // The same rule as the trigger, on what the original stored
        // (normalized spelling; rows no rule scores get 0 and are moved away).
        self.in_batches(
            "moderation_events",
            "UPDATE moderation_events SET score_delta =
                 (CASE lower(btrim(outcome)) WHEN 'approved' THEN 1 WHEN 'rejected' THEN -1 ELSE 0 END)
               * (CASE lower(btrim(content_type)) WHEN 'topic' THEN 5 ELSE 1 END)
             WHERE {range} AND score_delta IS NULL",
        )
        .await
    }

    /// Applies every rule of rules.rs, in order: repairs recorded with the
    /// value before, quarantined rows moved with their reason.
    async fn clean(&self) -> Result<()> {
        let event_id = self
            .columns("moderation_events")
            .await?
            .contains_key("event_id");
        for rule in rules::rules(event_id) {
            let (table, key, when, subject) = (rule.table, rule.key, &rule.when, &rule.subject);
            let sql = match &rule.fix {
                rules::Fix::Set {
                    column,
                    value,
                    kind,
                } => format!(
                    "WITH fixed AS (
                         UPDATE {table} SET {column} = {value}
                         FROM (SELECT {key} AS k, {column} AS before, {subject} AS subject FROM {table}
                               WHERE {{range}} AND ({when})) o
                         WHERE {table}.{key} = o.k RETURNING o.subject, o.before, {table}.{column} AS after)
                     INSERT INTO adoption_repairs (kind, subject, before, after)
                     SELECT {kind}, subject, to_jsonb(before), to_jsonb(after) FROM fixed",
                    kind = quote(kind)
                ),
                rules::Fix::Quarantine { reason } => format!(
                    "WITH moved AS (DELETE FROM {table} WHERE {{range}} AND ({when}) RETURNING *)
                     INSERT INTO adoption_quarantine (source_table, reason, original)
                     SELECT '{table}', {reason}, to_jsonb(moved) FROM moved",
                    reason = quote(reason)
                ),
            };
            self.in_batches(table, &sql).await?;
        }
        Ok(())
    }

    /// Named constraints NOT VALID then VALIDATE; NOT NULL after a validated check.
    async fn constraints(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        for (table, name, def) in CHECKS {
            if !self.constraint_exists(table, name).await? {
                self.ddl(
                    &mut conn,
                    &format!("ALTER TABLE {table} ADD CONSTRAINT {name} {def} NOT VALID"),
                )
                .await?;
            }
            self.ddl(
                &mut conn,
                &format!("ALTER TABLE {table} VALIDATE CONSTRAINT {name}"),
            )
            .await?;
        }
        for table in FORUM_TABLES {
            let have = self.columns(table).await?;
            for want in WANTED.iter().filter(|w| w.table == table && w.not_null) {
                if have.get(want.column).is_some_and(|c| c.not_null) {
                    continue;
                }
                let check = format!("{table}_{}_not_null", want.column);
                if !self.constraint_exists(table, &check).await? {
                    self.ddl(&mut conn, &format!("ALTER TABLE {table} ADD CONSTRAINT {check} CHECK ({} IS NOT NULL) NOT VALID", want.column))
                        .await?;
                }
                self.ddl(
                    &mut conn,
                    &format!("ALTER TABLE {table} VALIDATE CONSTRAINT {check}"),
                )
                .await?;
                self.ddl(
                    &mut conn,
                    &format!(
                        "ALTER TABLE {table} ALTER COLUMN {} SET NOT NULL",
                        want.column
                    ),
                )
                .await?;
                self.ddl(
                    &mut conn,
                    &format!("ALTER TABLE {table} DROP CONSTRAINT {check}"),
                )
                .await?;
            }
        }
        // Primary keys the original may lack.
        for (table, column) in [
            ("users", "id"),
            ("moderation_events", "id"),
            ("topic_creation_queue", "topic_id"),
            ("post_moderation_queue", "post_id"),
            ("private_message_queue", "message_id"),
        ] {
            let has_pk: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::REGCLASS AND contype = 'p')",
            )
            .bind(table)
            .fetch_one(self.pool)
            .await
            .db("reading primary keys")?;
            if !has_pk {
                let index = format!("{table}_pkey");
                self.concurrently(&index, &format!("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({column})"))
                    .await?;
                self.ddl(
                    &mut conn,
                    &format!(
                        "ALTER TABLE {table} ADD CONSTRAINT {index} PRIMARY KEY USING INDEX {index}"
                    ),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Every index the migrations put on a forum table, built concurrently;
    /// one the original has under the same name with another definition is
    /// built beside it and swapped. Tied queue keys are made unique first.
    async fn indexes(&self) -> Result<()> {
        for m in crate::db::MIGRATOR.iter() {
            for stmt in split_statements(m.sql.as_str()) {
                let Some((name, table)) = index_target(&stmt) else {
                    continue;
                };
                if !FORUM_TABLES.contains(&table.as_str()) {
                    continue;
                }
                if name.starts_with("idx_")
                    && name.contains("queue")
                    && stmt.to_uppercase().contains("UNIQUE")
                {
                    // Unique keys come after the queue triggers (no new ties).
                    continue;
                }
                self.ensure_index(&name, &stmt).await?;
            }
        }
        Ok(())
    }

    /// Builds `name` as `stmt` defines it, concurrently, unless it exists so.
    async fn ensure_index(&self, name: &str, stmt: &str) -> Result<()> {
        let existing: Option<(String, bool)> = sqlx::query_as(
            "SELECT pg_get_indexdef(x.indexrelid), x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
             WHERE i.relname = $1 AND i.relnamespace = current_schema()::REGNAMESPACE",
        )
        .bind(name)
        .fetch_optional(self.pool)
        .await
        .db("reading an index")?;
        let concurrent = |n: &str| {
            stmt.trim()
                .replacen("INDEX ", "INDEX CONCURRENTLY IF NOT EXISTS ", 1)
                .replacen(&format!("EXISTS {name} "), &format!("EXISTS {n} "), 1)
        };
        match existing {
            Some((def, true)) if same_index(&def, stmt) => Ok(()),
            Some((_, false)) => {
                self.exec(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                    .await?;
                self.concurrently(name, &concurrent(name)).await
            }
            Some(_) => {
                let new = format!("{name}__new");
                self.concurrently(&new, &concurrent(&new)).await?;
                self.exec(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                    .await?;
                let mut conn = self.conn().await?;
                self.ddl(&mut conn, &format!("ALTER INDEX {new} RENAME TO {name}"))
                    .await
            }
            None => self.concurrently(name, &concurrent(name)).await,
        }
    }

    /// Runs every migration's statements that are not there yet, one
    /// transaction per migration (see the module docs).
    async fn run_migrations(&self, set_legacy: bool) -> Result<()> {
        let dropped = dropped_later();
        for m in crate::db::MIGRATOR.iter() {
            let mut todo = Vec::new();
            for stmt in split_statements(m.sql.as_str()) {
                match superseded(&stmt, m.version, &dropped) {
                    Superseded::Skip => continue,
                    Superseded::DropFirst(drop) => todo.push(drop),
                    Superseded::No => {}
                }
                if let Some(s) = self.still_needed(&stmt).await? {
                    todo.push(s);
                }
            }
            if m.version == 5 && set_legacy {
                // The legacy switch, in the transaction that installs the
                // triggers: the original's writes count once from the
                // first moment the triggers do.
                todo.push(format!(
                    "UPDATE loyaltyd_settings SET legacy_score_writes = {}",
                    self.opts.legacy_writers
                ));
            }
            self.transaction(&todo).await?;
        }
        Ok(())
    }

    /// The statement to run for `stmt`, or none when what it creates exists.
    async fn still_needed(&self, stmt: &str) -> Result<Option<String>> {
        let upper = normalize(stmt);
        let word = |i: usize| -> String {
            upper
                .split_whitespace()
                .nth(i)
                .unwrap_or_default()
                .trim_end_matches('(')
                .to_lowercase()
        };
        if upper.starts_with("CREATE TABLE ") {
            return Ok((!self.table_exists(&word(2)).await?).then(|| stmt.to_owned()));
        }
        if let Some((name, table)) = index_target(stmt) {
            if FORUM_TABLES.contains(&table.as_str()) || self.relation_exists(&name).await? {
                return Ok(None);
            }
            return Ok(Some(stmt.to_owned()));
        }
        if upper.starts_with("CREATE MATERIALIZED VIEW ") || upper.starts_with("CREATE VIEW ") {
            let name = if upper.starts_with("CREATE VIEW") {
                word(2)
            } else {
                word(3)
            };
            return Ok((!self.relation_exists(&name).await?).then(|| stmt.to_owned()));
        }
        if upper.starts_with("CREATE FUNCTION ") {
            return Ok(Some(stmt.trim().replacen(
                "CREATE FUNCTION",
                "CREATE OR REPLACE FUNCTION",
                1,
            )));
        }
        if upper.starts_with("CREATE TRIGGER ") {
            return Ok(Some(stmt.trim().replacen(
                "CREATE TRIGGER",
                "CREATE OR REPLACE TRIGGER",
                1,
            )));
        }
        if upper.starts_with("INSERT INTO ") {
            let table = word(2);
            if !self.table_exists(&table).await? {
                // Created by an earlier statement of the same migration.
                return Ok(Some(stmt.to_owned()));
            }
            let has_rows: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {table})"
            )))
            .fetch_one(self.pool)
            .await
            .db("reading a table")?;
            return Ok((!has_rows).then(|| stmt.to_owned()));
        }
        if upper.starts_with("ALTER TABLE ") && upper.contains(" ADD COLUMN ") {
            let table = word(2);
            let column = upper
                .split(" ADD COLUMN ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_default()
                .to_lowercase();
            return Ok(
                (!self.columns(&table).await?.contains_key(&column)).then(|| stmt.to_owned())
            );
        }
        if upper.starts_with("ALTER TABLE ") && upper.contains(" DROP COLUMN ") {
            let table = word(2);
            let have = self.columns(&table).await?;
            let any = upper
                .split(" DROP COLUMN ")
                .skip(1)
                .filter_map(|r| r.split([',', ' ', ';']).next())
                .any(|c| have.contains_key(&c.to_lowercase()));
            return Ok(any.then(|| stmt.to_owned()));
        }
        if upper
            .starts_with("ALTER TABLE MODERATION_EVENTS ALTER COLUMN SCORE_DELTA DROP EXPRESSION")
        {
            let generated = self
                .columns("moderation_events")
                .await?
                .get("score_delta")
                .is_some_and(|c| c.generated);
            return Ok(generated.then(|| stmt.to_owned()));
        }
        Ok(Some(stmt.to_owned()))
    }

    /// Queue blocks counted from the items (each queue table locked against
    /// writers while its items are counted), then tied keys made unique and
    /// the unique key indexes built.
    async fn queue_bookkeeping(&self) -> Result<()> {
        for (queue, table, item, scope) in QUEUES {
            // Ties (the original's race): dense keys in the old order.
            let retie = format!(
                "WITH tied AS (SELECT {scope}::TEXT AS scope FROM {table} GROUP BY 1, position_in_queue HAVING count(*) > 1),
                 ranked AS (SELECT q.{item} AS id, q.position_in_queue AS before,
                                   row_number() OVER (PARTITION BY {scope}::TEXT ORDER BY q.position_in_queue, q.entered_queue_at, q.{item}) AS after
                            FROM {table} q WHERE {scope}::TEXT IN (SELECT scope FROM tied)),
                 moved AS (UPDATE {table} q SET position_in_queue = r.after FROM ranked r
                           WHERE q.{item} = r.id AND q.position_in_queue <> r.after RETURNING q.{item}, r.before, r.after)
                 INSERT INTO adoption_repairs (kind, subject, before, after)
                 SELECT '{table}.position_in_queue', {item}, to_jsonb(before), to_jsonb(after) FROM moved"
            );
            let recount = [
                format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"),
                "SELECT set_config('loyaltyd.rekey', 'on', true)".to_owned(),
                retie,
                // The counters counted from the items, the triggers'
                // changes so far dropped (the count has them) and the key
                // sequence above the original's keys (migration 11).
                format!("SELECT queue_recount('{queue}')"),
            ];
            self.transaction(&recount).await?;
        }
        for m in crate::db::MIGRATOR.iter() {
            for stmt in split_statements(m.sql.as_str()) {
                if let Some((name, table)) = index_target(&stmt)
                    && table.ends_with("_queue")
                {
                    self.ensure_index(&name, &stmt).await?;
                }
            }
        }
        Ok(())
    }

    /// Every score recomputed from its events where it drifted, in batches
    /// of users locked in id order (the sweep's repair), each change
    /// recorded with the value before.
    async fn repair_scores(&self) -> Result<()> {
        let drifted: Vec<i64> = sqlx::query_scalar(
            "SELECT u.id::BIGINT FROM users u
             LEFT JOIN (SELECT user_id, SUM(score_delta) AS truth FROM moderation_events GROUP BY user_id) t ON t.user_id = u.id
             WHERE u.loyalty_score IS DISTINCT FROM COALESCE(t.truth, 0)
                -- A legacy credit pending (the original code's UPDATE done, its
                -- event on its way) can hide drift of the same size: such a
                -- user is looked at too (the repair counts the credit).
                OR EXISTS (SELECT 1 FROM legacy_score_credits c WHERE c.user_id = u.id)
             ORDER BY u.id",
        )
        .fetch_all(self.pool)
        .await
        .db("finding drifted scores")?;
        // A repair holds its users' row locks until it commits, and the
        // forum's writes of those users wait for them: batches are sized by
        // time, so one takes a fraction of the lock timeout (a writer never
        // waits longer than the timeout the README promises), from 100
        // users up to --batch-size.
        let budget = self.opts.lock_timeout / 5;
        let mut size = 100usize.min(self.opts.batch_size.max(1) as usize);
        let mut rest: &[i64] = &drifted;
        while !rest.is_empty() {
            let (batch, after) = rest.split_at(size.min(rest.len()));
            rest = after;
            let began = Instant::now();
            let mut tx = self.pool.begin().await.db("starting a repair")?;
            let repaired = crate::loyalty::repair_users(&mut tx, batch).await?;
            let (ids, befores, afters): (Vec<i64>, Vec<i64>, Vec<i64>) = repaired.iter().fold(
                (Vec::new(), Vec::new(), Vec::new()),
                |(mut i, mut b, mut a), r| {
                    i.push(r.0);
                    b.push(r.1);
                    a.push(r.2);
                    (i, b, a)
                },
            );
            sqlx::query(
                "INSERT INTO adoption_repairs (kind, subject, before, after)
                 SELECT 'users.loyalty_score', 'user ' || id, to_jsonb(b), to_jsonb(a)
                 FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS t(id, b, a)",
            )
            .bind(&ids)
            .bind(&befores)
            .bind(&afters)
            .execute(&mut *tx)
            .await
            .db("recording repaired scores")?;
            tx.commit().await.db("committing a repair")?;
            let took = began.elapsed();
            if took > budget {
                size = (size / 2).max(10);
            } else if took < budget / 4 {
                size = (size * 2).min(self.opts.batch_size.max(1) as usize);
            }
        }
        Ok(())
    }

    /// Records every migration as applied, with the checksums `migrate` checks.
    async fn record_migrations(&mut self) -> Result<()> {
        // The values bound, not spliced: one INSERT of every migration.
        let (mut versions, mut descriptions, mut checksums) = (Vec::new(), Vec::new(), Vec::new());
        for m in crate::db::MIGRATOR.iter() {
            versions.push(m.version);
            descriptions.push(m.description.to_string());
            checksums.push(m.checksum.to_vec());
        }
        let mut tx = self.pool.begin().await.db("recording the migrations")?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
                 version BIGINT PRIMARY KEY, description TEXT NOT NULL,
                 installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL,
                 checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .db("recording the migrations")?;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             SELECT m.version, m.description, true, m.checksum, 0
             FROM unnest($1::BIGINT[], $2::TEXT[], $3::BYTEA[]) AS m(version, description, checksum)
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(&versions)
        .bind(&descriptions)
        .bind(&checksums)
        .execute(&mut *tx)
        .await
        .db("recording the migrations")?;
        tx.commit().await.db("recording the migrations")?;
        self.report.migrations_recorded.extend(versions);
        Ok(())
    }

    // ------------------------------------------------------------ helpers

    /// True when `table.column` keeps the forum's type (see
    /// [`Adoption::inspect_columns`]).
    fn kept(&self, table: &str, column: &str) -> bool {
        let name = format!("{table}.{column}");
        self.report.kept_types.iter().any(|k| k.column == name)
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        let mut conn = self.pool.acquire().await.db("connecting")?;
        sqlx::query("SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', '0', false), set_config('TimeZone', 'UTC', false)")
            .bind(format!("{}ms", self.opts.lock_timeout.as_millis()))
            .execute(&mut *conn)
            .await
            .db("preparing the adoption's session")?;
        Ok(conn)
    }

    /// One DDL statement, retried while its lock is not granted within
    /// `lock_timeout` (the forum's queries go first).
    async fn ddl(&self, conn: &mut PgConnection, sql: &str) -> Result<()> {
        for attempt in 0u32.. {
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut *conn)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if Refusal::of(&e) == Some(Refusal::LockBusy) && attempt < 600 => {
                    tokio::time::sleep(Duration::from_millis(50 + 10 * u64::from(attempt.min(20))))
                        .await;
                }
                Err(e) => return Err(adopt_error(sql, &e)),
            }
        }
        Ok(())
    }

    /// A statement on a session of the adoption's settings.
    async fn exec(&self, sql: &str) -> Result<()> {
        let mut conn = self.conn().await?;
        self.ddl(&mut conn, sql).await
    }

    /// Statements in one transaction, retried whole when a lock is not granted in time.
    async fn transaction(&self, stmts: &[String]) -> Result<()> {
        if stmts.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for attempt in 0u32.. {
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .db("starting a step")?;
            let mut failed = None;
            for s in stmts {
                if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(s.clone()))
                    .execute(&mut *tx)
                    .await
                {
                    failed = Some((s.clone(), e));
                    break;
                }
            }
            match failed {
                None => return tx.commit().await.db("committing a step"),
                Some((_, e)) if Refusal::of(&e) == Some(Refusal::LockBusy) && attempt < 600 => {
                    crate::db::rollback(tx).await;
                    tokio::time::sleep(Duration::from_millis(50 + 10 * u64::from(attempt.min(20))))
                        .await;
                }
                Some((s, e)) => {
                    crate::db::rollback(tx).await;
                    return Err(adopt_error(&s, &e));
                }
            }
        }
        Ok(())
    }

    /// A statement with `{range}` run over the table in primary-key batches.
    async fn in_batches(&self, table: &str, sql: &str) -> Result<()> {
        let key = if table == "users" || table == "moderation_events" {
            "id"
        } else {
            "ctid"
        };
        let mut conn = self.conn().await?;
        if key == "ctid" {
            // Queue tables are small and keyed by text: one statement.
            return self.ddl(&mut conn, &sql.replace("{range}", "true")).await;
        }
        let (lo, hi): (Option<i64>, Option<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT min({key})::BIGINT, max({key})::BIGINT FROM {table}"
        )))
        .fetch_one(&mut *conn)
        .await
        .db("reading a table's key range")?;
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return Ok(());
        };
        let mut from = lo;
        while from <= hi {
            let to = from.saturating_add(self.opts.batch_size);
            let range = format!("{key} >= {from} AND {key} < {to}");
            self.ddl(&mut conn, &sql.replace("{range}", &range)).await?;
            from = to;
        }
        Ok(())
    }

    /// CREATE INDEX CONCURRENTLY; an invalid leftover of a killed build is dropped first.
    async fn concurrently(&self, name: &str, sql: &str) -> Result<()> {
        let invalid: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                            WHERE i.relname = $1 AND NOT x.indisvalid)",
        )
        .bind(name)
        .fetch_one(self.pool)
        .await
        .db("reading an index")?;
        if invalid {
            self.exec(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .await?;
        }
        self.exec(sql).await
    }

    async fn table_exists(&self, table: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL AND (SELECT relkind FROM pg_class WHERE oid = to_regclass($1)) IN ('r', 'p')")
            .bind(table)
            .fetch_one(self.pool)
            .await
            .map(|b: Option<bool>| b.unwrap_or(false))
            .db("reading the catalog")
    }

    async fn relation_exists(&self, name: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(name)
            .fetch_one(self.pool)
            .await
            .db("reading the catalog")
    }

    async fn constraint_exists(&self, table: &str, name: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::REGCLASS AND conname = $2)")
            .bind(table)
            .bind(name)
            .fetch_one(self.pool)
            .await
            .db("reading constraints")
    }

    async fn trigger_exists(&self, table: &str, name: &str) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::REGCLASS AND tgname = $2)",
        )
        .bind(table)
        .bind(name)
        .fetch_one(self.pool)
        .await
        .db("reading triggers")
    }

    async fn columns(&self, table: &str) -> Result<BTreeMap<String, Column>> {
        let rows: Vec<(String, String, bool, Option<String>, bool)> = sqlx::query_as(
            "SELECT a.attname::TEXT, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    pg_get_expr(d.adbin, d.adrelid), a.attgenerated <> ''
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(table)
        .fetch_all(self.pool)
        .await
        .db("reading columns")?;
        Ok(rows
            .into_iter()
            .map(|(name, sql_type, not_null, default, generated)| {
                let default = default.filter(|_| !generated);
                (
                    name,
                    Column {
                        sql_type,
                        not_null,
                        default,
                        generated,
                    },
                )
            })
            .collect())
    }
}

/// The Redis keys the original design leaves, and what becomes of them.
async fn inspect_redis(redis: &Redis) -> Vec<Problem> {
    let mut found = Vec::new();
    for (pattern, what, action) in [
        (
            "loyalty:*",
            "cached scores (loyalty:{id})",
            "kept: loyaltyd reads the same plain integer; versioned writes replace them, and every entry expires by its TTL",
        ),
        (
            "leaderboard:refresh_pending",
            "the original's pending-refresh counter",
            "kept: counted as pending changes; a refresh takes off what it consumed",
        ),
        (
            "perf:*",
            "perf lists",
            "kept: loyaltyd writes the same shape, and `stats` reads the original's entries too",
        ),
    ] {
        let (count, examples) = redis.count_keys(pattern).await;
        found.push(Problem {
            problem: what.into(),
            count,
            action: if count < 0 {
                "Redis unavailable: not inspected".into()
            } else {
                action.into()
            },
            examples,
            recorded_as: None,
        });
    }
    found
}

/// The triggers and functions a migration drops (`DROP TRIGGER IF EXISTS
/// name ...`, `DROP FUNCTION IF EXISTS name(...)`), with its version: an
/// earlier migration's statement creating one of them is not run again by
/// `adopt`. Resuming an adoption replays every migration, and recreating,
/// say, migration 5's scoring trigger beside migration 8's would count each
/// event twice until migration 8's transaction dropped it again.
fn dropped_later() -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for m in crate::db::MIGRATOR.iter() {
        for stmt in split_statements(m.sql.as_str()) {
            let upper = normalize(&stmt);
            for prefix in ["DROP TRIGGER IF EXISTS ", "DROP FUNCTION IF EXISTS "] {
                if let Some(rest) = upper.strip_prefix(prefix) {
                    let name = rest.split(['(', ' ', ';']).next().unwrap_or_default();
                    out.push((format!("{prefix}{name}"), m.version));
                }
            }
        }
    }
    out
}

/// What to do with `stmt` of migration `version` when a later migration
/// drops what it creates: a trigger is not created (the later migration's
/// replaces it); a function is dropped first and created as this migration
/// has it (statements of this migration may name it; the later migration
/// drops it again and makes its own, whose result type may differ).
enum Superseded {
    No,
    Skip,
    DropFirst(String),
}

fn superseded(stmt: &str, version: i64, dropped: &[(String, i64)]) -> Superseded {
    let upper = normalize(stmt);
    let later = |drop: String| dropped.iter().any(|(d, v)| *d == drop && *v > version);
    let name_after = |prefix: &str| {
        upper
            .strip_prefix(prefix)
            .and_then(|r| r.split(['(', ' ']).next())
            .map(str::to_owned)
    };
    if let Some(name) = name_after("CREATE TRIGGER ")
        && later(format!("DROP TRIGGER IF EXISTS {name}"))
    {
        return Superseded::Skip;
    }
    for prefix in ["CREATE FUNCTION ", "CREATE OR REPLACE FUNCTION "] {
        if let Some(name) = name_after(prefix)
            && later(format!("DROP FUNCTION IF EXISTS {name}"))
        {
            return Superseded::DropFirst(format!(
                "DROP FUNCTION IF EXISTS {}",
                name.to_lowercase()
            ));
        }
    }
    Superseded::No
}

/// The text of migration `version`.
fn migration(version: i64) -> Result<&'static str> {
    crate::db::MIGRATOR
        .iter()
        .find(|m| m.version == version)
        .map(|m| m.sql.as_str())
        .ok_or_else(|| Error::Runtime(format!("internal: migration {version} is not embedded")))
}

/// Splits SQL text into statements at top-level semicolons (not inside
/// quotes, dollar quotes or comments); comments are kept with their statement.
pub fn split_statements(sql: &str) -> Vec<String> {
    // Works on bytes: every delimiter is ASCII, so a cut at one of them is
    // a char boundary.
    let b = sql.as_bytes();
    let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
    let mut dollar: Option<Vec<u8>> = None;
    while i < b.len() {
        if let Some(tag) = &dollar {
            if b[i..].starts_with(tag) {
                i += tag.len();
                dollar = None;
            } else {
                i += 1;
            }
            continue;
        }
        match b[i] {
            b'-' if b[i..].starts_with(b"--") => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n);
            }
            b'/' if b[i..].starts_with(b"/*") => {
                i = b[i..]
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(b.len(), |n| i + n + 2);
            }
            b'\'' => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'\'' && b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                    } else if b[i] == b'\'' {
                        break;
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'$' => {
                let close = b[i + 1..]
                    .iter()
                    .position(|&c| c == b'$')
                    .map(|n| i + 1 + n);
                match close {
                    Some(e)
                        if b[i + 1..e]
                            .iter()
                            .all(|c| c.is_ascii_alphanumeric() || *c == b'_') =>
                    {
                        dollar = Some(b[i..=e].to_vec());
                        i = e + 1;
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                push_statement(&mut out, &sql[start..i]);
                start = i + 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    if start < sql.len() {
        push_statement(&mut out, &sql[start..]);
    }
    out
}

/// Keeps a statement byte for byte (function bodies and their comments must
/// come out as `migrate` makes them), unless it is only comments.
fn push_statement(out: &mut Vec<String>, text: &str) {
    if !normalize(text).is_empty() {
        out.push(text.trim().to_owned());
    }
}

/// A statement without its whole-line comments, upper-cased, its whitespace
/// folded (for matching).
fn normalize(stmt: &str) -> String {
    stmt.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
        .to_uppercase()
}

/// `(index, table)` of a CREATE INDEX statement.
fn index_target(stmt: &str) -> Option<(String, String)> {
    let upper = normalize(stmt);
    let rest = upper
        .strip_prefix("CREATE UNIQUE INDEX ")
        .or_else(|| upper.strip_prefix("CREATE INDEX "))?;
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_lowercase();
    if words.next()? != "ON" {
        return None;
    }
    let table = words.next()?.trim_end_matches('(').to_lowercase();
    Some((name, table))
}

/// Whether an existing index definition (pg_get_indexdef) is the one a
/// migration statement creates: compared without schema, method, quoting,
/// parentheses or spacing.
fn same_index(existing: &str, stmt: &str) -> bool {
    let squash = |s: &str| {
        s.replace("public.", "")
            .replace(" USING btree", "")
            .replace("CONCURRENTLY IF NOT EXISTS ", "")
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '(' | ')' | '"' | ';'))
            .collect::<String>()
            .to_lowercase()
    };
    squash(existing) == squash(stmt)
}

/// True when loyaltyd reads a column of the forum's type `have` in place of
/// migrate's `want` (its SQL casts where it matters): the original's
/// narrower integers, VARCHARs, timestamps without time zone and REALs.
fn compatible(have: &str, want: &str) -> bool {
    match want {
        "bigint" => matches!(have, "integer" | "smallint"),
        "integer" => have == "smallint",
        "text" => have.starts_with("character varying"),
        "timestamp with time zone" => {
            have.starts_with("timestamp") && have.ends_with("without time zone")
        }
        "double precision" => have == "real",
        _ => false,
    }
}

/// True when PostgreSQL changes `from` to `to` without touching the rows.
fn binary_coercible(from: &str, to: &str) -> bool {
    (from.starts_with("character varying") || from == "character varying" || from == "text")
        && to == "text"
}

/// The expression that converts a column to its wanted type.
fn convert(want: &Want, expr: &str, have: &BTreeMap<String, Column>) -> String {
    let from = have
        .get(want.column)
        .map(|c| c.sql_type.as_str())
        .unwrap_or_default();
    let base = want.convert.replace("{c}", expr);
    if want.sql_type == "timestamp with time zone" && from == "timestamp without time zone" {
        // The original's local timestamps, read as UTC.
        format!("({base} AT TIME ZONE 'UTC')")
    } else {
        format!("({base})::{}", want.sql_type)
    }
}

/// Whether an index definition uses `column` (as a whole word).
fn mentions(def: &str, column: &str) -> bool {
    replace_word(def, column, "\u{0}") != def
}

/// Replaces whole-word occurrences of `word` (identifier boundaries).
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(word) {
        let before = rest[..pos].chars().last();
        let after = rest[pos + word.len()..].chars().next();
        out.push_str(&rest[..pos]);
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[pos + word.len()..];
    }
    out.push_str(rest);
    out
}

/// The sequence a `nextval('…'::regclass)` default draws from.
fn sequence_of(default: &str) -> Option<String> {
    let rest = default.strip_prefix("nextval('")?;
    Some(rest[..rest.find('\'')?].to_owned())
}

/// A SQL string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A failed adoption statement, as one line naming it.
fn adopt_error(sql: &str, e: &sqlx::Error) -> Error {
    let head: String = sql
        .split_whitespace()
        .take(12)
        .collect::<Vec<_>>()
        .join(" ");
    if crate::error::is_unavailable(e) {
        return crate::error::from_sqlx(
            "adopting the database",
            sqlx::Error::Protocol(describe(e)),
        );
    }
    Error::Runtime(format!(
        "adoption step failed ({head} …): {}; run `loyaltyd adopt` again to resume",
        describe(e)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_at_top_level_semicolons_only() {
        let sql = "CREATE TABLE a (x TEXT DEFAULT ';');\n-- a comment; still a comment\nCREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\nDO $b$ BEGIN PERFORM 1; END $b$;";
        let s = split_statements(sql);
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(s[1].contains("SELECT 1; $$"));
        assert!(s[2].starts_with("DO $b$"));
    }

    #[test]
    fn index_definitions_compare_without_formatting() {
        assert!(same_index(
            "CREATE INDEX idx_users_loyalty_score_desc ON public.users USING btree (loyalty_score DESC) WHERE (loyalty_score > 0)",
            "CREATE INDEX idx_users_loyalty_score_desc ON users (loyalty_score DESC) WHERE loyalty_score > 0"
        ));
        assert!(!same_index(
            "CREATE INDEX idx_topic_queue_position ON public.topic_creation_queue USING btree (position_in_queue)",
            "CREATE UNIQUE INDEX idx_topic_queue_position ON topic_creation_queue (position_in_queue)"
        ));
        assert_eq!(
            index_target(
                "CREATE UNIQUE INDEX x ON post_moderation_queue (topic_id, position_in_queue)"
            ),
            Some(("x".into(), "post_moderation_queue".into()))
        );
    }

    #[test]
    fn whole_words_only_are_replaced() {
        assert_eq!(
            replace_word("(user_id, id) id_x", "id", "id__new"),
            "(user_id, id__new) id_x"
        );
    }
}
