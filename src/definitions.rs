//! The current SQL definitions (`sql/`): every function, trigger, view and
//! grant loyaltyd keeps in the database, each defined once, one file per
//! concept. `migrations/` holds tables, columns, indexes and data moves;
//! these files are applied after them (by `migrate`, by the daemon at start
//! and by `adopt`) whenever their text changed, as Lemmy's
//! `replaceable_schema` and Flyway's repeatable migrations are.
//!
//! An apply is one transaction, under its own advisory lock: every file, in
//! the order of [`FILES`], with `CREATE OR REPLACE` (a function keeps its
//! OID, its grants and the forum's prepared statements that call it); then
//! every definition the previous apply recorded that this one did not
//! define is dropped (what this one defined is read from the catalog: the
//! rows this transaction wrote), and the new record and the digest are
//! stored (`loyaltyd_definitions`, migration 13). A trigger's `CREATE OR
//! REPLACE` takes a lock that waits for the forum's open writes of its
//! table, and the forum's next writes wait behind it: the apply asks for
//! locks with a short `lock_timeout` and, refused, lets the forum through
//! and tries again. No writer waits longer than that timeout plus the
//! apply's own few milliseconds.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::error::{Error, Refusal, Result, from_sqlx};
use crate::retry::Retry;

/// One file of `sql/`.
#[derive(Debug, Clone, Copy)]
pub struct Definition {
    /// Its path in the repository.
    pub file: &'static str,
    /// Its text.
    pub sql: &'static str,
}

macro_rules! definition {
    ($name:literal) => {
        Definition {
            file: concat!("sql/", $name),
            sql: include_str!(concat!("../sql/", $name)),
        }
    };
}

/// Every file of `sql/`, in the order they are applied: the argument
/// checks, then each concept, the grants last (they name what the others
/// define).
pub const FILES: &[Definition] = &[
    definition!("checks.sql"),
    definition!("scoring.sql"),
    definition!("recording.sql"),
    definition!("leaderboard.sql"),
    definition!("queues.sql"),
    definition!("privileges.sql"),
];

/// How long an apply's statement waits for a lock the forum holds before it
/// gives way, and how often it tries again.
const LOCK_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY: Retry = Retry::new(20, Duration::from_millis(50), Duration::from_secs(2));

/// The advisory lock of an apply ("LYDF"), so that two processes starting
/// at once apply one after the other (the second finds nothing to do).
const APPLY_LOCK: i64 = crate::locks::DEFINITIONS;

/// What the digest is of: every file's path and text.
fn text() -> String {
    FILES
        .iter()
        .map(|d| format!("-- {}\n{}\n", d.file, d.sql))
        .collect()
}

/// Applies the definitions when the database's differ from these; true when
/// it applied them. Runs after the migrations (their tables must exist).
pub async fn apply(pool: &PgPool) -> Result<bool> {
    let text = &text();
    RETRY
        .run(
            move || async move {
                let mut tx = pool.begin().await.map_err(Applying::Db)?;
                let applied = apply_in(&mut tx, text).await?;
                tx.commit().await.map_err(Applying::Db)?;
                Ok(applied)
            },
            Applying::busy,
        )
        .await
        .map_err(Applying::into_error)
}

/// Applies the definitions in the caller's transaction, on the schema its
/// search_path names first (`adopt`'s reference); one try, no retries.
pub async fn apply_on(conn: &mut PgConnection) -> Result<bool> {
    apply_in(conn, &text()).await.map_err(Applying::into_error)
}

/// One try of an apply, in the transaction of `tx`.
async fn apply_in(tx: &mut PgConnection, text: &str) -> Result<bool, Applying> {
    let current: bool = sqlx::query_scalar(
        "SELECT set_config('lock_timeout', $1, true) IS NOT NULL
                AND pg_advisory_xact_lock($2) IS NOT NULL
                AND set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true) IS NOT NULL
                AND EXISTS (SELECT 1 FROM loyaltyd_definitions_applied
                            WHERE digest = encode(sha256(convert_to($3, 'UTF8')), 'hex'))",
    )
    .bind(format!("{}ms", LOCK_TIMEOUT.as_millis()))
    .bind(APPLY_LOCK)
    .bind(text)
    .fetch_one(&mut *tx)
    .await
    .map_err(Applying::Db)?;
    if current {
        return Ok(false);
    }
    for d in FILES {
        sqlx::raw_sql(d.sql)
            .execute(&mut *tx)
            .await
            .map_err(|source| Applying::File {
                file: d.file,
                source,
            })?;
    }
    sqlx::raw_sql(RECONCILE)
        .execute(&mut *tx)
        .await
        .map_err(Applying::Db)?;
    sqlx::query(
        "INSERT INTO loyaltyd_definitions_applied AS a (digest)
         VALUES (encode(sha256(convert_to($1, 'UTF8')), 'hex'))
         ON CONFLICT (singleton) DO UPDATE SET digest = EXCLUDED.digest, applied_at = now()",
    )
    .bind(text)
    .execute(&mut *tx)
    .await
    .map_err(Applying::Db)?;
    Ok(true)
}

/// What this transaction defined (the catalog rows it wrote) against the
/// record of the previous apply: what is no longer defined is dropped,
/// triggers first (they use functions), then views, then functions; then
/// the record is this apply's. A definition something else still depends
/// on (a forum's own view over one of ours) is not dropped silently: the
/// DROP fails, and with it the apply.
const RECONCILE: &str = r#"
DO $$
DECLARE
    me CONSTANT XID := pg_current_xact_id()::XID;
    defined TEXT[];
    gone RECORD;
BEGIN
    SELECT array_agg(d.kind || ' ' || d.identity) INTO defined
    FROM (SELECT 'function' AS kind, p.oid::REGPROCEDURE::TEXT AS identity FROM pg_proc p
          WHERE p.pronamespace = current_schema()::REGNAMESPACE AND p.xmin = me
          UNION ALL
          SELECT 'trigger', quote_ident(t.tgname) || ' ON ' || t.tgrelid::REGCLASS::TEXT
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          WHERE c.relnamespace = current_schema()::REGNAMESPACE AND NOT t.tgisinternal AND t.xmin = me
          UNION ALL
          SELECT 'view', c.oid::REGCLASS::TEXT FROM pg_class c JOIN pg_rewrite r ON r.ev_class = c.oid
          WHERE c.relnamespace = current_schema()::REGNAMESPACE AND c.relkind = 'v' AND r.xmin = me) d;
    FOR gone IN
        SELECT d.kind, d.identity FROM loyaltyd_definitions d
        WHERE NOT (d.kind || ' ' || d.identity) = ANY(defined)
        ORDER BY CASE d.kind WHEN 'trigger' THEN 1 WHEN 'view' THEN 2 ELSE 3 END
    LOOP
        EXECUTE format('DROP %s IF EXISTS %s', upper(gone.kind), gone.identity);
    END LOOP;
    DELETE FROM loyaltyd_definitions;
    INSERT INTO loyaltyd_definitions (kind, identity)
    SELECT split_part(x, ' ', 1), substr(x, strpos(x, ' ') + 1) FROM unnest(defined) AS x;
END $$
"#;

/// Why one try of an apply failed.
enum Applying {
    /// A statement of a definition file.
    File {
        file: &'static str,
        source: sqlx::Error,
    },
    /// The apply's own bookkeeping.
    Db(sqlx::Error),
}

impl From<sqlx::Error> for Applying {
    fn from(e: sqlx::Error) -> Self {
        Applying::Db(e)
    }
}

impl Applying {
    fn source(&self) -> &sqlx::Error {
        match self {
            Applying::File { source, .. } | Applying::Db(source) => source,
        }
    }

    /// A lock the forum held (or a deadlock with one of its transactions):
    /// worth another try once the forum is through.
    fn busy(&self) -> bool {
        matches!(
            Refusal::of(self.source()),
            Some(Refusal::LockBusy | Refusal::Retry)
        )
    }

    fn into_error(self) -> Error {
        match self {
            Applying::File { file, source } if !crate::error::is_unavailable(&source) => {
                Error::Definitions { file, source }
            }
            Applying::File { source, .. } => from_sqlx("applying the SQL definitions", source),
            Applying::Db(source) => from_sqlx("applying the SQL definitions", source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FILES;

    #[test]
    fn every_file_of_sql_is_applied_once() {
        let mut on_disk: Vec<String> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
                .map(|dir| {
                    dir.filter_map(|e| e.ok())
                        .map(|e| format!("sql/{}", e.file_name().to_string_lossy()))
                        .filter(|f| f.ends_with(".sql"))
                        .collect()
                })
                .unwrap_or_default();
        on_disk.sort();
        let mut listed: Vec<String> = FILES.iter().map(|d| d.file.to_owned()).collect();
        listed.sort();
        assert_eq!(listed, on_disk);
    }
}
