//! The reference: what `migrate` builds, built by the migrations themselves
//! in a schema of its own beside the forum's (`loyaltyd_reference`), so
//! that adoption reads loyaltyd's schema from the catalog instead of from
//! migration text. loyaltyd's own tables (empty, or with the rows the
//! migrations seed them with) are moved from it into the forum's schema;
//! the forum's tables get the reference's indexes and the leaderboard view
//! its definition; functions, triggers, views and grants come from the
//! current definitions (sql/), applied as `migrate` applies them. The
//! reference is built again by every run (a killed run's is dropped first)
//! and dropped at the end.

use super::{Adoption, FORUM_TABLES};
use crate::error::{DbContext, Result};

/// The schema the reference is built in.
const SCHEMA: &str = "loyaltyd_reference";

/// An index the reference has on a forum table or the leaderboard view.
pub(super) struct ReferenceIndex {
    pub(super) name: String,
    pub(super) table: String,
    pub(super) unique: bool,
    /// `CREATE [UNIQUE] INDEX name ON table ...`, the table unqualified.
    pub(super) def: String,
}

impl Adoption<'_> {
    /// Builds the reference: every migration, run in its own schema on a
    /// session whose search_path names it (the migrations name no schema).
    pub(super) async fn build_reference(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        self.ddl(
            &mut conn,
            &format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"),
        )
        .await?;
        self.ddl(&mut conn, &format!("CREATE SCHEMA {SCHEMA}"))
            .await?;
        self.ddl(&mut conn, &format!("SET search_path = {SCHEMA}"))
            .await?;
        let built = crate::db::MIGRATOR.run(&mut *conn).await;
        let defined = match built {
            Ok(()) => self.reference_definitions(&mut conn).await,
            Err(e) => Err(e.into()),
        };
        // The session goes back to the pool: its path must not stay.
        self.ddl(&mut conn, "RESET search_path").await?;
        defined
    }

    /// The current definitions, applied in the reference (on `conn`, whose
    /// search_path names it).
    async fn reference_definitions(&self, conn: &mut sqlx::PgConnection) -> Result<()> {
        let mut tx = sqlx::Connection::begin(&mut *conn)
            .await
            .db("building the reference")?;
        crate::definitions::apply_on(&mut tx).await?;
        tx.commit().await.db("building the reference")
    }

    /// The reference built in a transaction of its own, for reading what
    /// it defines (the scoring rule) where nothing may change: the caller
    /// rolls it back. The session's search_path is the forum's again.
    pub(super) async fn reference_in_transaction(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await.db("building the reference")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}; SET LOCAL search_path = {SCHEMA}"
        )))
        .execute(&mut *tx)
        .await
        .db("building the reference")?;
        crate::db::MIGRATOR.run(&mut *tx).await?;
        crate::definitions::apply_on(&mut tx).await?;
        sqlx::raw_sql("SET LOCAL search_path TO DEFAULT")
            .execute(&mut *tx)
            .await
            .db("building the reference")?;
        Ok(tx)
    }

    /// Moves loyaltyd's own tables and sequences that the forum's schema
    /// lacks from the reference into it, rows and all (the migrations'
    /// seeds). The record of applied definitions describes the reference's
    /// and is emptied.
    pub(super) async fn move_own_tables(&self) -> Result<()> {
        let missing: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::TEXT, CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END
             FROM pg_class c
             WHERE c.relnamespace = $1::REGNAMESPACE AND c.relkind IN ('r', 'S')
               AND c.relname <> ALL($2) AND c.relname <> '_sqlx_migrations'
               -- Sequences a table owns move with it.
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::REGCLASS
                               AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
               AND to_regclass(quote_ident(current_schema()) || '.' || quote_ident(c.relname)) IS NULL
             ORDER BY 1",
        )
        .bind(SCHEMA)
        .bind(FORUM_TABLES.map(str::to_owned).to_vec())
        .fetch_all(self.pool)
        .await
        .db("reading loyaltyd's own tables")?;
        let mut conn = self.conn().await?;
        for (name, kind) in missing {
            self.ddl(
                &mut conn,
                &format!(
                    "ALTER {kind} {SCHEMA}.{name} SET SCHEMA {}",
                    self.schema().await?
                ),
            )
            .await?;
            if name.starts_with("loyaltyd_definitions") {
                self.ddl(&mut conn, &format!("DELETE FROM {name}")).await?;
            }
        }
        Ok(())
    }

    /// The forum's schema, quoted for SQL.
    async fn schema(&self) -> Result<String> {
        sqlx::query_scalar("SELECT quote_ident(current_schema())")
            .fetch_one(self.pool)
            .await
            .db("reading the schema")
    }

    /// The reference's indexes on `tables` (but their primary keys), as
    /// statements on the forum's schema.
    pub(super) async fn reference_indexes(&self, tables: &[&str]) -> Result<Vec<ReferenceIndex>> {
        let rows: Vec<(String, String, bool, String)> = sqlx::query_as(
            "SELECT i.relname::TEXT, c.relname::TEXT, x.indisunique,
                    replace(pg_get_indexdef(x.indexrelid), ' ON ' || $1 || '.', ' ON ')
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class c ON c.oid = x.indrelid
             WHERE c.relnamespace = $1::REGNAMESPACE AND c.relname = ANY($2) AND NOT x.indisprimary
             ORDER BY c.relname, i.relname",
        )
        .bind(SCHEMA)
        .bind(tables.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>())
        .fetch_all(self.pool)
        .await
        .db("reading the reference's indexes")?;
        Ok(rows
            .into_iter()
            .map(|(name, table, unique, def)| ReferenceIndex {
                name,
                table,
                unique,
                def,
            })
            .collect())
    }

    /// The leaderboard view as the reference defines it: built beside the
    /// forum's (readers go on) and swapped in with its indexes and grants,
    /// unless the forum's has that definition already.
    pub(super) async fn leaderboard_view(&self) -> Result<()> {
        let (want, have): (String, Option<String>) = sqlx::query_as(
            "SELECT (SELECT pg_get_viewdef(v.oid) FROM pg_class v
                     WHERE v.relnamespace = $1::REGNAMESPACE AND v.relname = 'user_leaderboard'),
                    pg_get_viewdef(to_regclass('user_leaderboard'))",
        )
        .bind(SCHEMA)
        .fetch_one(self.pool)
        .await
        .db("reading the leaderboard view")?;
        // The reference's text names its tables by schema.
        let want = want.replace(&format!("{SCHEMA}."), "");
        if have.as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        let mut swap = vec![
            "DROP MATERIALIZED VIEW IF EXISTS user_leaderboard_next".to_owned(),
            format!("CREATE MATERIALIZED VIEW user_leaderboard_next AS {want}"),
        ];
        let mut renames = Vec::new();
        for index in self.reference_indexes(&["user_leaderboard"]).await? {
            let next = format!("{}_next", index.name);
            swap.push(
                index
                    .def
                    .replacen(
                        &format!("INDEX {} ", index.name),
                        &format!("INDEX {next} "),
                        1,
                    )
                    .replacen(" ON user_leaderboard ", " ON user_leaderboard_next ", 1),
            );
            renames.push(format!("ALTER INDEX {next} RENAME TO {}", index.name));
        }
        // The forum's grants on its view, kept.
        let grants: Vec<String> = sqlx::query_scalar(
            "SELECT format('GRANT %s ON user_leaderboard_next TO %s', a.privilege_type,
                           CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END)
             FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
             WHERE c.oid = to_regclass('user_leaderboard') AND a.grantee <> c.relowner",
        )
        .fetch_all(self.pool)
        .await
        .db("reading the view's grants")?;
        swap.extend(grants);
        swap.push("DROP MATERIALIZED VIEW IF EXISTS user_leaderboard".into());
        swap.push(
            "ALTER MATERIALIZED VIEW user_leaderboard_next RENAME TO user_leaderboard".into(),
        );
        swap.extend(renames);
        self.transaction(&swap).await
    }

    /// Drops the reference (the end of a run).
    pub(super) async fn drop_reference(&self) -> Result<()> {
        self.exec(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
            .await
    }
}
