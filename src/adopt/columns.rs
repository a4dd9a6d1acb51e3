//! Column shapes: columns added without a rewrite, types kept where a
//! change would fail the forum's prepared statements, and the opt-in type
//! change (`--change-types`) by expand and contract, its dependents swapped
//! in the same short transaction.

use std::collections::BTreeMap;

use super::target::{CHECKS, Column, WANTED, Want};
use super::{Adoption, FORUM_TABLES, Step};
use crate::error::{DbContext, Result};

/// What a swap drops, creates again, and validates after.
#[derive(Default)]
pub(super) struct SwapDependents {
    pub(super) drops: Vec<String>,
    pub(super) creates: Vec<String>,
    pub(super) validates: Vec<String>,
}

/// True when loyaltyd reads a column of the forum's type `have` in place of
/// migrate's `want` (its SQL casts where it matters): the original's
/// narrower integers, VARCHARs, timestamps without time zone and REALs.
pub(super) fn compatible(have: &str, want: &str) -> bool {
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
pub(super) fn binary_coercible(from: &str, to: &str) -> bool {
    (from.starts_with("character varying") || from == "character varying" || from == "text")
        && to == "text"
}

/// The expression that converts a column to its wanted type.
pub(super) fn convert(want: &Want, expr: &str, have: &BTreeMap<String, Column>) -> String {
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
pub(super) fn mentions(def: &str, column: &str) -> bool {
    replace_word(def, column, "\u{0}") != def
}

/// Replaces whole-word occurrences of `word` (identifier boundaries).
pub(super) fn replace_word(text: &str, word: &str, with: &str) -> String {
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

/// The sequence a `nextval('…'::regclass)` default draws from, as the
/// default's text names it: a regclass printed by PostgreSQL, so quoted
/// where it needs quotes, ready to splice into SQL.
pub(super) fn sequence_of(default: &str) -> Option<String> {
    let rest = default.strip_prefix("nextval('")?;
    Some(rest[..rest.find('\'')?].to_owned())
}

impl Adoption<'_> {
    /// True when a column of a forum table has another type than migrate's
    /// and will change (not kept).
    pub(super) async fn retyped(&self) -> Result<bool> {
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
    pub(super) fn plan_types(&mut self) {
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
                step: "apply the current SQL definitions (sql/) again, and build the leaderboard view again where a swap dropped it".into(),
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
    pub(super) async fn change_types(&mut self) -> Result<()> {
        self.build_reference().await?;
        for table in FORUM_TABLES {
            self.shape_columns(table).await?;
        }
        // The swaps replaced columns the definitions' triggers and views
        // stood on: applied again, whatever the digest says.
        self.exec("DELETE FROM loyaltyd_definitions_applied")
            .await?;
        crate::definitions::apply(self.pool).await?;
        self.leaderboard_view().await?;
        self.constraints().await?;
        self.drop_reference().await?;
        self.report.migrations_recorded = crate::db::MIGRATOR.iter().map(|m| m.version).collect();
        Ok(())
    }

    /// Brings one forum table's columns to their wanted types, defaults and
    /// presence (NOT NULL comes with the constraints, after the data is clean).
    pub(super) async fn shape_columns(&self, table: &'static str) -> Result<()> {
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
                    // score_delta is a plain column the SQL contract keeps
                    // (sql/scoring.sql); a generated one becomes one:
                    // metadata only.
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
            self.coerce(table, &coerce).await?;
        }
        if !expand.is_empty() {
            self.expand_contract(table, &expand).await?;
        }
        self.defaults(table).await?;
        if table == "users" && !self.relation_exists("user_leaderboard").await? {
            self.leaderboard_view().await?;
        }
        Ok(())
    }

    /// Types changed without a rewrite (binary coercible), the views and
    /// triggers on the columns dropped and created again around the change:
    /// one transaction.
    async fn coerce(&self, table: &'static str, coerce: &[&Want]) -> Result<()> {
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
        let mut conn = self.conn().await?;
        for v in &again.validates {
            self.ddl(&mut conn, v).await?;
        }
        Ok(())
    }

    /// The columns' defaults, once their types are right, and the id
    /// sequences grown with their columns.
    async fn defaults(&self, table: &'static str) -> Result<()> {
        let mut conn = self.conn().await?;
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
        Ok(())
    }

    /// Changes the types of `wants` on a live table without rewriting it
    /// under a lock: new columns, a trigger that keeps them in step, a
    /// back-fill in batches, indexes built concurrently, one swap.
    pub(super) async fn expand_contract(&self, table: &'static str, wants: &[&Want]) -> Result<()> {
        let sync_fn = format!("{table}_loyaltyd_widen");
        let watched = self.expand(table, wants, &sync_fn).await?;
        self.backfill_new(table, wants).await?;
        let swaps = self.index_new(table, wants).await?;
        self.contract(table, wants, &watched, &swaps, &sync_fn)
            .await
    }

    /// The new columns, and the trigger (`sync_fn`) that fills them for
    /// every row written from now on; answers the old columns it watches.
    async fn expand(
        &self,
        table: &'static str,
        wants: &[&Want],
        sync_fn: &str,
    ) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
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
        Ok(watched)
    }

    /// The rows written before the trigger: in batches along the primary key.
    async fn backfill_new(&self, table: &'static str, wants: &[&Want]) -> Result<()> {
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
        .await
    }

    /// NOT NULL of the new columns by a validated check, and every index that
    /// uses an old column, built on the new one beside it: answers (index,
    /// its copy, whether it is the primary key), quoted for SQL.
    async fn index_new(
        &self,
        table: &'static str,
        wants: &[&Want],
    ) -> Result<Vec<(String, String, bool)>> {
        let mut conn = self.conn().await?;
        let have = self.columns(table).await?;
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
        // Each index's name as stored (to find it) and quoted as
        // pg_get_indexdef quotes it (to name it in SQL), its copy's likewise.
        type Index = (String, String, String, String, String, bool);
        let indexes: Vec<Index> = sqlx::query_as(
            "SELECT i.relname::TEXT, quote_ident(i.relname), i.relname || '__new', quote_ident(i.relname || '__new'),
                    pg_get_indexdef(x.indexrelid), x.indisprimary
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
             WHERE x.indrelid = $1::REGCLASS AND i.relname NOT LIKE '%\\_\\_new'",
        )
        .bind(table)
        .fetch_all(self.pool)
        .await
        .db("reading indexes")?;
        let mut swaps = Vec::new();
        for (_, name, new_raw, new_name, def, primary) in indexes {
            let touched = wants.iter().any(|w| mentions(&def, w.column));
            if !touched {
                continue;
            }
            let mut new_def = def.replacen(
                &format!("INDEX {name} ON"),
                &format!("INDEX {new_name} ON"),
                1,
            );
            for w in wants {
                new_def = replace_word(&new_def, w.column, &format!("{}__new", w.column));
            }
            let new_def = new_def.replacen("INDEX ", "INDEX CONCURRENTLY IF NOT EXISTS ", 1);
            self.concurrently(&new_raw, &new_def).await?;
            swaps.push((name, new_name, primary));
        }
        Ok(swaps)
    }

    /// The swap: one short transaction of metadata changes (foreign keys,
    /// the leaderboard view and what depends on the old columns dropped and
    /// created again on the new ones), then the validations and the trigger
    /// function gone.
    async fn contract(
        &self,
        table: &'static str,
        wants: &[&Want],
        watched: &[String],
        swaps: &[(String, String, bool)],
        sync_fn: &str,
    ) -> Result<()> {
        let mut conn = self.conn().await?;
        let mut swap = Vec::new();
        // Foreign keys that reference a swapped column go, and come back NOT VALID.
        let fks: Vec<(String, String, String)> = sqlx::query_as(
            // (Names quoted for SQL: REGCLASS's text is quoted already.)
            "SELECT quote_ident(c.conname), c.conrelid::REGCLASS::TEXT, pg_get_constraintdef(c.oid)
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
        // as the reference defines it (readers of the view wait for that).
        if table == "users" {
            swap.push("DROP MATERIALIZED VIEW IF EXISTS user_leaderboard".into());
        }
        for (name, _, primary) in swaps {
            if *primary {
                swap.push(format!(
                    "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}"
                ));
            }
        }
        swap.push(format!("DROP TRIGGER IF EXISTS {sync_fn} ON {table}"));
        // Views, triggers and CHECKs on the old columns (the forum's and
        // loyaltyd's): dropped here and created again below, on the new ones.
        let again = self.swap_dependents(table, watched, sync_fn).await?;
        swap.extend(again.drops.iter().cloned());
        for want in wants {
            swap.extend(self.column_swap(table, want).await?);
        }
        for (name, new_name, primary) in swaps {
            swap.push(format!("ALTER INDEX {new_name} RENAME TO {name}"));
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

    /// The swap's statements for one column: the old one dropped, the new
    /// one renamed in its place with its default, sequence and NOT NULL.
    async fn column_swap(&self, table: &'static str, want: &Want) -> Result<Vec<String>> {
        let mut swap = Vec::new();
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
        Ok(swap)
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
    pub(super) async fn swap_dependents(
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

    /// True when `table.column` keeps the forum's type (see
    /// [`Adoption::inspect_columns`]).
    pub(super) fn kept(&self, table: &str, column: &str) -> bool {
        let name = format!("{table}.{column}");
        self.report.kept_types.iter().any(|k| k.column == name)
    }
}
