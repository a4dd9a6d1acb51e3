//! The adoption's session with PostgreSQL: short DDL under `lock_timeout`
//! with retries, batches of `--batch-size` rows, concurrent index builds,
//! and the catalog lookups every step starts with.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::PgConnection;

use super::Adoption;
use super::target::Column;
use crate::error::{DbContext, Error, Refusal, Result};
use crate::retry::Retry;

/// A failed adoption statement, naming it by its first words; the
/// driver's error kept (its SQLSTATE with it).
pub(super) fn adopt_error(sql: &str, e: sqlx::Error) -> Error {
    if crate::error::is_unavailable(&e) {
        return crate::error::from_sqlx("adopting the database", e);
    }
    Error::AdoptStep {
        statement: sql
            .split_whitespace()
            .take(12)
            .collect::<Vec<_>>()
            .join(" "),
        source: e,
    }
}

/// A statement refused its lock within `lock_timeout` is tried again, the
/// forum's queries going first meanwhile: for a minute or more.
const LOCK_RETRY: Retry = Retry::new(600, Duration::from_millis(50), Duration::from_millis(250));

/// A connection of the adoption's own, with its session settings (a short
/// `lock_timeout` above all), closed when dropped: taken out of the pool, so
/// the settings never reach whoever shares the pool (the forum's writer in
/// the benchmark got the 500 ms lock timeout and failed requests).
pub(super) struct Session(PgConnection);

impl std::ops::Deref for Session {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

impl Adoption<'_> {
    pub(super) async fn conn(&self) -> Result<Session> {
        let mut conn = self.pool.acquire().await.db("connecting")?.detach();
        sqlx::query("SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', '0', false), set_config('TimeZone', 'UTC', false)")
            .bind(format!("{}ms", self.opts.lock_timeout.as_millis()))
            .execute(&mut conn)
            .await
            .db("preparing the adoption's session")?;
        Ok(Session(conn))
    }

    /// One DDL statement, retried while its lock is not granted within
    /// `lock_timeout` (the forum's queries go first).
    pub(super) async fn ddl(&self, conn: &mut PgConnection, sql: &str) -> Result<()> {
        for attempt in 1..=LOCK_RETRY.attempts {
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut *conn)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e)
                    if Refusal::of(&e) == Some(Refusal::LockBusy) && LOCK_RETRY.again(attempt) =>
                {
                    tokio::time::sleep(LOCK_RETRY.pause(attempt)).await;
                }
                Err(e) => return Err(adopt_error(sql, e)),
            }
        }
        Ok(())
    }

    /// A statement on a session of the adoption's settings.
    pub(super) async fn exec(&self, sql: &str) -> Result<()> {
        let mut conn = self.conn().await?;
        self.ddl(&mut conn, sql).await
    }

    /// Statements in one transaction, retried whole when a lock is not granted in time.
    pub(super) async fn transaction(&self, stmts: &[String]) -> Result<()> {
        if stmts.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for attempt in 1..=LOCK_RETRY.attempts {
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
                Some((_, e))
                    if Refusal::of(&e) == Some(Refusal::LockBusy) && LOCK_RETRY.again(attempt) =>
                {
                    crate::db::rollback(tx).await;
                    tokio::time::sleep(LOCK_RETRY.pause(attempt)).await;
                }
                Some((s, e)) => {
                    crate::db::rollback(tx).await;
                    return Err(adopt_error(&s, e));
                }
            }
        }
        Ok(())
    }

    /// A statement with `{range}` run over the table in primary-key batches.
    pub(super) async fn in_batches(&self, table: &str, sql: &str) -> Result<()> {
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
    pub(super) async fn concurrently(&self, name: &str, sql: &str) -> Result<()> {
        // An invalid index of that name (a build killed midway), quoted for SQL.
        let invalid: Option<String> = sqlx::query_scalar(
            "SELECT quote_ident(i.relname) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
             WHERE i.relname = $1 AND NOT x.indisvalid",
        )
        .bind(name)
        .fetch_optional(self.pool)
        .await
        .db("reading an index")?;
        if let Some(quoted) = invalid {
            self.exec(&format!("DROP INDEX CONCURRENTLY IF EXISTS {quoted}"))
                .await?;
        }
        self.exec(sql).await
    }

    pub(super) async fn table_exists(&self, table: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL AND (SELECT relkind FROM pg_class WHERE oid = to_regclass($1)) IN ('r', 'p')")
            .bind(table)
            .fetch_one(self.pool)
            .await
            .map(|b: Option<bool>| b.unwrap_or(false))
            .db("reading the catalog")
    }

    pub(super) async fn relation_exists(&self, name: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(name)
            .fetch_one(self.pool)
            .await
            .db("reading the catalog")
    }

    pub(super) async fn constraint_exists(&self, table: &str, name: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::REGCLASS AND conname = $2)")
            .bind(table)
            .bind(name)
            .fetch_one(self.pool)
            .await
            .db("reading constraints")
    }

    pub(super) async fn columns(&self, table: &str) -> Result<BTreeMap<String, Column>> {
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
