//! The run: the schema steps in their order (loyaltyd's own tables from the
//! reference, columns, the current SQL definitions, data cleaning by the
//! rules, constraints NOT VALID then validated, indexes built concurrently,
//! the leaderboard view, queue counters, scores repaired, the migrations
//! recorded), each first looking at what is there so a killed run resumes.

use std::time::Instant;

use super::rules;
use super::sql_text::{quote, same_index};
use super::target::{CHECKS, WANTED, queues};
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
        self.own_tables().await?;
        for table in FORUM_TABLES {
            self.shape_columns(table).await?;
        }
        self.backfill_score_delta().await?;
        self.clean().await?;
        // The SQL contract's triggers after the cleaning (whose repairs are
        // not the forum's writes), then the events written meanwhile.
        self.definitions().await?;
        self.backfill_score_delta().await?;
        self.constraints().await?;
        self.indexes().await?;
        self.leaderboard_view().await?;
        self.queue_bookkeeping().await?;
        self.repair_scores().await?;
        self.record_migrations().await?;
        self.drop_reference().await
    }

    /// loyaltyd's own tables (bookkeeping, the adoption's records), from the
    /// reference; and the legacy switch, before any trigger of the SQL
    /// contract exists: the original's writes count once from the first
    /// moment the triggers do.
    pub(super) async fn own_tables(&self) -> Result<()> {
        self.build_reference().await?;
        self.move_own_tables().await?;
        self.exec(&format!(
            "UPDATE loyaltyd_settings SET legacy_score_writes = {}",
            self.opts.legacy_writers
        ))
        .await
    }

    /// The current SQL definitions (sql/), as `migrate` applies them: the
    /// SQL contract's triggers and functions. Items the original code adds
    /// from now on are keyed behind the original's (the key sequence above
    /// their keys first).
    pub(super) async fn definitions(&self) -> Result<()> {
        self.exec(
            "SELECT setval('queue_item_keys', GREATEST(nextval('queue_item_keys'),
                            (SELECT COALESCE(max(k), 0) + 1 FROM (
                                 SELECT max(position_in_queue)::BIGINT FROM topic_creation_queue
                                 UNION ALL SELECT max(position_in_queue) FROM post_moderation_queue
                                 UNION ALL SELECT max(position_in_queue) FROM private_message_queue) m(k))), false)",
        )
        .await?;
        crate::definitions::apply(self.pool).await?;
        Ok(())
    }

    /// score_delta for the rows written before the trigger: in batches, by
    /// the rule (`event_points`, the reference's: the forum's schema may not
    /// have it yet) on what the original stored (normalized spelling; rows
    /// no rule scores are moved away).
    pub(super) async fn backfill_score_delta(&self) -> Result<()> {
        self.in_batches(
            "moderation_events",
            "UPDATE moderation_events
             SET score_delta = loyaltyd_reference.event_points(lower(btrim(content_type)), lower(btrim(outcome)))
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
                    also,
                } => format!(
                    "WITH fixed AS (
                         UPDATE {table} SET {column} = {value}{also}
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
            // The rules' repairs are loyaltyd's own writes: a queue key one
            // sets stands (the SQL contract's triggers let a reorder's
            // `loyaltyd.rekey` keys through, and keep a client's).
            let sql = format!("SELECT set_config('loyaltyd.rekey', 'on', true); {sql}");
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

    /// Every index the reference has on a forum table, built concurrently;
    /// one the original has under the same name with another definition is
    /// built beside it and swapped. Tied queue keys are made unique first
    /// (the unique key indexes come with the queue counters).
    pub(super) async fn indexes(&self) -> Result<()> {
        for index in self.reference_indexes(&FORUM_TABLES).await? {
            if !(index.unique && index.table.ends_with("_queue") && index.name.starts_with("idx_"))
            {
                self.ensure_index(&index.name, &index.def).await?;
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

    /// Queue blocks counted from the items (each queue table locked against
    /// writers while its items are counted), then tied keys made unique and
    /// the unique key indexes built.
    pub(super) async fn queue_bookkeeping(&self) -> Result<()> {
        for (queue, table, item, scope) in queues() {
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
                // sequence above the original's keys (sql/queues.sql).
                format!("SELECT queue_recount('{queue}')"),
            ];
            self.transaction(&recount).await?;
        }
        let queues: Vec<&str> = queues().iter().map(|(_, table, _, _)| *table).collect();
        for index in self.reference_indexes(&queues).await? {
            self.ensure_index(&index.name, &index.def).await?;
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
        // waits longer than the timeout docs/adopting.md promises), from 100
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
