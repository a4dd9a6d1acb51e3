//! Inspection and the plan: what the database is (the original design or
//! not), how its columns and data differ from the target, which of the
//! forum's own objects depend on them, what Redis holds; the dry run's
//! whole report, and the plan the run follows.

use super::columns::{binary_coercible, compatible};
use super::rules;
use super::target::{CHECKS, WANTED, queues};
use super::{Adoption, Dependent, FORUM_TABLES, KeptType, Problem, Step};
use crate::error::{DbContext, Error, Result};
use crate::redis_runner::Redis;

/// The Redis keys the original design leaves, and what becomes of them.
pub(super) async fn inspect_redis(redis: &Redis) -> Vec<Problem> {
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

impl Adoption<'_> {
    /// Refuses what is not the original design; true when the database is
    /// loyaltyd's already with every migration applied (nothing to do).
    pub(super) async fn check_adoptable(&mut self) -> Result<bool> {
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
    pub(super) async fn inspect_columns(&mut self) -> Result<()> {
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
        // The original's leaderboard view is rebuilt (as the reference has it):
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
    pub(super) async fn dependents(&self, table: &str) -> Result<Vec<(String, String, bool)>> {
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
                // loyaltyd's triggers and views (sql/), and the constraints
                // its migrations name.
                || crate::definitions::FILES.iter().any(|d| {
                    [format!("TRIGGER {name} "), format!("VIEW {name} ")]
                        .iter()
                        .any(|p| d.sql.contains(p.as_str()))
                })
                || crate::db::MIGRATOR
                    .iter()
                    .any(|m| m.sql.as_str().contains(&format!("CONSTRAINT {name} ")))
        };
        Ok(rows
            .into_iter()
            .filter(|(_, _, name, _)| !ours(name))
            .map(|(column, object, _, recreatable)| (column, object, recreatable))
            .collect())
    }

    /// Counts (and samples) every data problem of the original design.
    pub(super) async fn inspect_data(&mut self) -> Result<()> {
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
        // Scores against the events that will count (valid, of existing
        // users), by the rule as the reference defines it: built in a
        // transaction that is rolled back (a dry run changes nothing).
        let mut tx = self.reference_in_transaction().await?;
        let (count, examples): (i64, Vec<String>) = sqlx::query_as(
            "WITH truth AS (
                 SELECT user_id, sum(loyaltyd_reference.event_points(lower(btrim(content_type)), lower(btrim(outcome)))) AS score
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
        .fetch_one(&mut *tx)
        .await
        .db("inspecting scores")?;
        crate::db::rollback(tx).await;
        self.problem(
            "scores that drifted from their events".into(),
            count,
            "recomputed from the events (the stored value is in adoption_repairs)".into(),
            examples,
        );
        for (queue, table, _, scope) in queues() {
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

    /// A table's rows, as the statistics estimate them.
    async fn rows(&self, table: &'static str) -> Result<i64> {
        sqlx::query_scalar::<_, f32>("SELECT reltuples FROM pg_class WHERE oid = $1::REGCLASS")
            .bind(table)
            .fetch_one(self.pool)
            .await
            .map(|r| r.max(0.0) as i64)
            .db("reading table sizes")
    }

    /// The lock of one short metadata change, as the plan states it.
    fn short_lock(&self) -> String {
        format!(
            "ACCESS EXCLUSIVE for one metadata change (waits at most {} ms, then lets the forum through and retries)",
            self.opts.lock_timeout.as_millis()
        )
    }

    /// The plan's steps for the forum tables' columns.
    async fn column_steps(&self) -> Result<Vec<Step>> {
        let short = self.short_lock();
        let mut steps = Vec::new();
        for table in FORUM_TABLES {
            let have = self.columns(table).await?;
            let n = self.rows(table).await?;
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
        Ok(steps)
    }

    /// The steps, their rows and locks, in the order [`Adoption::run`] takes them.
    pub(super) async fn plan(&mut self) -> Result<()> {
        let rows = |t| self.rows(t);
        let short = self.short_lock();
        let mut steps = vec![Step {
            step: "build the reference (what `migrate` builds) in schema loyaltyd_reference; move loyaltyd's own tables from it; turn on legacy_score_writes while the original code still runs".into(),
            rows: 0,
            lock: "none on forum tables".into(),
        }];
        steps.extend(self.column_steps().await?);
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
            step: "apply the current SQL definitions (sql/): the SQL contract's functions, triggers, views and grants; back-fill score_delta of the events written meanwhile".into(),
            rows: 0,
            lock: format!("{short}, per trigger"),
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
            step: "build the reference's indexes on the forum's tables CONCURRENTLY (and swap the original's same-named ones whose definition differs)".into(),
            rows: events,
            lock: "SHARE UPDATE EXCLUSIVE (readers and writers go on)".into(),
        });
        steps.push(Step {
            step: "rebuild the leaderboard view as the reference defines it beside the old one and swap it in".into(),
            rows: rows("users").await?,
            lock: format!("{short}, for the swap"),
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
            step: format!("record migrations 1 to {last} in _sqlx_migrations; drop the reference"),
            rows: 0,
            lock: "none on forum tables".into(),
        });
        self.report.steps = steps;
        Ok(())
    }
}
