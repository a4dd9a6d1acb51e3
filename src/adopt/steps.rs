//! The run: the schema steps in their order (bookkeeping, columns, data
//! cleaning by the rules, constraints NOT VALID then validated, indexes
//! built concurrently, the migrations replayed and recorded, scores
//! repaired), each first looking at what is there so a killed run resumes.

use std::time::Instant;

use super::rules;
use super::sql_text::{
    Superseded, dropped_later, index_target, migration, normalize, quote, same_index,
    split_statements, superseded,
};
use super::target::{CHECKS, QUEUES, WANTED};
use super::{Adoption, FORUM_TABLES};
use crate::context::Context;
use crate::error::{DbContext, Result};
use crate::score_row::ScoreRow;

impl Adoption<'_> {
    /// The original's cached `loyalty:<id>` entries of every user whose
    /// score adoption repaired hold the score before: rewritten (versioned,
    /// and on the live board where there is one) with the score now, so
    /// `score get` agrees with the database without a daemon. Redis away
    /// is reported, not fatal: the daemon's sync or `score recalc --all`
    /// rewrites them later.
    pub(super) async fn rewrite_cache(&mut self, ctx: &Context) -> Result<()> {
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

    pub(super) async fn run(&mut self) -> Result<()> {
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
    pub(super) async fn bookkeeping_first(&self) -> Result<()> {
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

    /// score_delta for the rows written before the trigger: in batches.
    pub(super) async fn backfill_score_delta(&self) -> Result<()> {
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
    pub(super) async fn clean(&self) -> Result<()> {
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
    pub(super) async fn constraints(&self) -> Result<()> {
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
    pub(super) async fn indexes(&self) -> Result<()> {
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
    pub(super) async fn ensure_index(&self, name: &str, stmt: &str) -> Result<()> {
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
    pub(super) async fn run_migrations(&self, set_legacy: bool) -> Result<()> {
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
    pub(super) async fn still_needed(&self, stmt: &str) -> Result<Option<String>> {
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
    pub(super) async fn queue_bookkeeping(&self) -> Result<()> {
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
    pub(super) async fn repair_scores(&self) -> Result<()> {
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
    pub(super) async fn record_migrations(&mut self) -> Result<()> {
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
}
