//! A connection pooler between the forum and its database, as many forums
//! run one: Debian's PgBouncer in transaction mode, each transaction on
//! whichever server connection is free. The guide's Python handler goes
//! through it with the connection the guide gives for poolers, from eight
//! processes at once, as the forum's role with its password.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use loyaltyd::types::QueueKind;
use sqlx::PgPool;

use crate::common::{self, ForumRole};

/// A PgBouncer of this test's own, on a free port, stopped when dropped.
struct Bouncer {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Bouncer {
    /// Pools `role`'s connections to its database, `server_connections` at most.
    async fn start(role: &ForumRole, server_connections: u32) -> Bouncer {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(common::unique_prefix("pgbouncer").replace(':', "_"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let port = common::free_port();
        let userlist = dir.join("userlist.txt");
        std::fs::write(
            &userlist,
            format!("\"{}\" \"{}\"\n", role.name, role.password),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 {db} = host=127.0.0.1 port=5432 dbname={db}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = scram-sha-256\n\
                 auth_file = {userlist}\n\
                 admin_users = {user}\n\
                 pool_mode = transaction\n\
                 default_pool_size = {server_connections}\n\
                 max_client_conn = 100\n",
                db = role.database,
                user = role.name,
                userlist = userlist.display(),
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for path in [&dir, &userlist, &ini] {
            let mode = if path == &dir { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let log = File::create(dir.join("pgbouncer.log")).unwrap_or_else(|e| panic!("{e}"));
        // PgBouncer does not run as root: -u switches to the postgres user.
        let child = Command::new("pgbouncer")
            .args(["-u", "postgres"])
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("pgbouncer (scripts/services.sh --test installs it): {e}"));
        let bouncer = Bouncer { child, port, dir };
        let dsn = bouncer.dsn(role);
        common::eventually("PgBouncer answering", Duration::from_secs(20), || {
            let dsn = dsn.clone();
            async move { common::psql(&dsn, "SELECT 1").0 }
        })
        .await;
        bouncer
    }

    fn dsn(&self, role: &ForumRole) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={} user={} password={}",
            self.port, role.database, role.name, role.password
        )
    }

    /// The rows of the admin console's `SHOW what` (fields split at `|`).
    fn show(&self, role: &ForumRole, what: &str) -> Vec<Vec<String>> {
        let admin = format!(
            "host=127.0.0.1 port={} dbname=pgbouncer user={} password={}",
            self.port, role.name, role.password
        );
        let (ok, out, err) = common::psql(&admin, &format!("SHOW {what};"));
        assert!(ok, "SHOW {what}: {err}");
        out.lines()
            .map(|l| l.split('|').map(str::to_owned).collect())
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[sqlx::test(migrations = false)]
async fn the_guides_handler_through_pgbouncer_in_transaction_mode_fails_no_call(pool: PgPool) {
    const USERS: i64 = 40;
    const WORKERS: usize = 8;
    const POSTS: usize = 25;
    common::migrate(&pool).await;
    common::users(&pool, USERS).await;
    let role = ForumRole::create(&pool, "pooled").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(
        common::doc_example("sql-forum-table").replace("forum_app", &role.name),
    ))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Fewer server connections than clients: transactions of one client land
    // on different server connections, which is what breaks prepared
    // statements through a pooler.
    let bouncer = Bouncer::start(&role, 3).await;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| common::forum_workload(&bouncer.dsn(&role), w, POSTS, USERS, "pgbouncer"))
        .collect();
    let (mut calls, mut failed) = (0, Vec::new());
    for worker in workers {
        let line = common::finish(worker).await;
        calls += line["calls"].as_i64().unwrap_or_default();
        if line["failed"] != serde_json::json!({}) {
            failed.push(line["failed"].clone());
        }
    }
    assert_eq!(calls, (WORKERS * POSTS * 3) as i64);
    assert!(
        failed.is_empty(),
        "failed calls: {failed:?}\n{}",
        bouncer.log()
    );

    // It went through the pooler, in transaction mode, over at most three
    // server connections.
    let config = bouncer.show(&role, "CONFIG");
    assert!(
        config
            .iter()
            .any(|row| row.len() > 1 && row[0] == "pool_mode" && row[1] == "transaction"),
        "{config:?}"
    );
    let stats = bouncer.show(&role, "STATS");
    assert!(
        stats.iter().any(|row| row.first() == Some(&role.database)),
        "no traffic for the database: {stats:?}"
    );
    let servers = bouncer.show(&role, "SERVERS");
    assert!(
        !servers.is_empty() && servers.len() <= 3,
        "server connections: {servers:?}"
    );

    // Every decision once, every invariant kept.
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM moderation_events WHERE event_id LIKE 'decision:pb%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events, (WORKERS * POSTS) as i64);
    common::scores_exact(&pool, "the handler through PgBouncer").await;
    common::queue_invariants(&pool, QueueKind::Post).await;
    drop(bouncer);
    role.drop_role(&pool).await;
}
