//! `loyaltyd adopt` on a database built from the original design's own
//! schema and messy data (tests/fixtures/original_design.sql), while the
//! original design's own service code keeps writing to it, with a SIGKILL
//! in the middle; afterwards the schema is what `migrate` builds and every
//! invariant holds.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loyaltyd::types::QueueKind;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common;

const USERS: i64 = 2_000;
const EVENTS: i64 = 40_000;

/// Loads the original design's fixture into the (empty) test database.
fn load_fixture(db: &str) {
    common::psql_fixture(
        db,
        "original_design.sql",
        &[("users", USERS.to_string()), ("events", EVENTS.to_string())],
    );
}

pub(crate) async fn database(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT current_database()::TEXT")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The forum's own objects, which adoption leaves alone.
const FORUM_OWN: &[&str] = &[
    "users.email",
    "users_email",
    "moderation_events.moderator_id",
    "forum_posts",
    "users_id_seq",
];

/// Running copies of the original application, killed if the test fails.
struct Apps(Vec<Child>);

impl Drop for Apps {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The original design's application, running (tests/fixtures/seed_app.py).
pub(crate) fn old_app(
    config: &loyaltyd::Config,
    db: &str,
    worker: usize,
    seconds: u32,
    users: i64,
    stop: &str,
) -> Child {
    Command::new(common::PYTHON)
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/seed_app.py"),
            &format!("host=/var/run/postgresql dbname={db} user=root"),
            config.redis.url.expose(),
            &config.redis.key_prefix,
            &worker.to_string(),
            &seconds.to_string(),
            &users.to_string(),
            stop,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"))
}

/// Waits until the forum's applications are writing: their events grow.
async fn writing(pool: &PgPool) {
    let events = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM moderation_events")
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let from = events().await;
    common::eventually(
        "the applications writing",
        Duration::from_secs(30),
        || async { events().await >= from + 20 },
    )
    .await;
}

/// `loyaltyd adopt`, off the runtime's thread.
async fn adopt(config: &loyaltyd::Config, args: &[&str]) -> std::process::Output {
    let config = config.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::run(&config, &[&["adopt"], &args[..]].concat())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[sqlx::test(migrations = false)]
async fn the_original_design_is_adopted_online_beside_its_own_code_and_resumes_after_a_sigkill(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = common::wide_pool(opts, 8).await;
    let db = database(&pool).await;
    load_fixture(&db);
    let mut config = common::config(&pool, "adopt");
    config.database.statement_timeout = Duration::from_secs(5);

    // The dry run: the plan and every planted problem, nothing changed.
    let before = common::schema_text(&pool, &[]).await;
    let out = adopt(&config, &["--dry-run", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        common::schema_text(&pool, &[]).await,
        before,
        "a dry run changes nothing"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let count = |needle: &str| -> i64 {
        report["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["problem"].as_str().is_some_and(|s| s.starts_with(needle)))
            .and_then(|p| p["count"].as_i64())
            .unwrap_or_else(|| panic!("no problem {needle:?} in {report}"))
    };
    assert_eq!(count("events whose content type is spelt"), 5);
    assert_eq!(count("events whose outcome is spelt"), 7);
    assert_eq!(count("events with a content type no rule"), 3);
    assert_eq!(count("events with an outcome no rule"), 4);
    assert_eq!(count("events without a valid event type or content id"), 2);
    assert_eq!(count("events of users that no longer exist"), 6);
    assert_eq!(count("scores that drifted"), 9);
    assert_eq!(count("topic queue items sharing a position"), 3);
    assert_eq!(count("post queue items sharing a position"), 1);
    assert_eq!(count("message queue items sharing a position"), 0);
    assert_eq!(count("topic queue positions missing"), 5);
    assert_eq!(count("post queue items with an invalid"), 1);
    assert_eq!(count("message queue items with an invalid"), 1);
    assert!(
        report["steps"].as_array().is_some_and(|s| s.len() > 5),
        "{report}"
    );
    assert_eq!(
        report["kept_types"].as_array().map(Vec::len),
        Some(26),
        "every column of another type is kept online: {report}"
    );
    // The queues' order as the original left it (position, entry, id).
    let old_order: Vec<(String, String)> = sqlx::query_as(
        "SELECT topic_id::TEXT, post_id::TEXT FROM post_moderation_queue WHERE topic_id IS NOT NULL
         ORDER BY topic_id, position_in_queue, entered_queue_at, post_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // The old application keeps writing throughout.
    let stop = std::env::temp_dir().join(format!("adopt-stop-{db}"));
    let _ = std::fs::remove_file(&stop);
    let stop_path = stop.to_string_lossy().into_owned();
    let mut apps = Apps(
        (0..2)
            .map(|w| old_app(&config, &db, w, 120, USERS, &stop_path))
            .collect(),
    );
    writing(&pool).await;

    // Killed in the middle (once the events are being shaped), then resumed.
    let mut first = common::loyaltyd(&config)
        .args(["adopt", "--batch-size", "2000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    common::eventually(
        "the adoption under way",
        Duration::from_secs(60),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM adoption_quarantine")
                .fetch_one(&pool)
                .await
                .unwrap_or(0)
                > 0
        },
    )
    .await;
    let _ = first.kill(); // SIGKILL
    let _ = first.wait();
    let started = Instant::now();
    let out = adopt(&config, &["--batch-size", "2000", "--json"]).await;
    assert!(
        out.status.success(),
        "resumed adoption: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("resumed adoption took {:?}", started.elapsed());
    let resumed: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    // Once more: nothing to do, exit 0 (SPEC §13: idempotent).
    let again = adopt(&config, &["--json"]).await;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&again.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report["nothing_to_do"], true, "{report}");
    std::fs::write(&stop, b"stop").unwrap_or_else(|e| panic!("{e}"));
    let mut worst: f64 = 0.0;
    let mut kept: Vec<String> = Vec::new();
    for app in std::mem::take(&mut apps.0) {
        let line = common::finish(app).await;
        assert_eq!(
            line["errors"],
            serde_json::json!({}),
            "the old code failed: {line}"
        );
        assert!(line["done"].as_i64().unwrap_or(0) > 10, "{line}");
        worst = worst.max(line["worst_ms"].as_f64().unwrap_or(0.0));
        kept.extend(
            line["queued"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned)),
        );
    }
    eprintln!("the original code's worst latency during the adoption: {worst} ms");
    let _ = std::fs::remove_file(&stop);

    // Online, no column changed its type (the forum's prepared statements
    // read them); in the restart window `--change-types` changes them, and
    // then the schema is what `migrate` builds, and `migrate` is the path.
    let kept_types: Vec<String> = resumed["kept_types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["column"].as_str().map(str::to_owned))
        .collect();
    assert!(
        kept_types.contains(&"users.loyalty_score".to_owned()) && kept_types.len() == 26,
        "{kept_types:?}"
    );
    let retyped = adopt(&config, &["--change-types", "--json"]).await;
    assert!(
        retyped.status.success(),
        "--change-types: {}",
        String::from_utf8_lossy(&retyped.stderr)
    );
    let again = adopt(&config, &["--change-types", "--json"]).await;
    let report: serde_json::Value =
        serde_json::from_slice(&again.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report["nothing_to_do"], true, "{report}");
    let fresh = common::migrated_database(&pool, "fresh").await;
    let (adopted, migrated) = (
        common::schema_text(&pool, FORUM_OWN).await,
        common::schema_text(&fresh, &[]).await,
    );
    let only_adopted: Vec<_> = adopted.difference(&migrated).collect();
    let only_migrated: Vec<_> = migrated.difference(&adopted).collect();
    assert!(
        only_adopted.is_empty() && only_migrated.is_empty(),
        "the adopted schema differs from migrate's: only adopted {only_adopted:#?}, only migrated {only_migrated:#?}"
    );
    let migrate = common::run(&config, &["migrate"]);
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    // Every invariant: no drift (the original's writes counted once), dense
    // positions in the old order, the view equal to its definition.
    let ctx = common::ctx_with(&pool, config.clone(), false);
    assert_eq!(common::sweep_drift(&ctx).await, 0);
    let credits: i64 = sqlx::query_scalar("SELECT count(*) FROM legacy_score_credits")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(credits, 0, "every direct score write met its event");
    for q in QueueKind::ALL {
        common::queue_invariants(&pool, q).await;
    }
    let now = common::queue_invariants(&pool, QueueKind::Post).await;
    for (topic, items) in &now {
        let before: Vec<&String> = old_order
            .iter()
            .filter(|(t, i)| t == topic && items.contains(i))
            .map(|(_, i)| i)
            .collect();
        let after: Vec<&String> = items.iter().filter(|i| before.contains(i)).collect();
        assert_eq!(before, after, "the original order of {topic}");
    }
    for item in &kept {
        assert!(
            now.values().any(|v| v.contains(item)),
            "the old code's item {item} is queued"
        );
    }
    let forced =
        loyaltyd::leaderboard::refresh(&ctx, true, &tokio_util::sync::CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(forced.refreshed);
    let off: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_leaderboard l FULL JOIN (
             SELECT id, ROW_NUMBER() OVER (ORDER BY loyalty_score DESC, created_at ASC) AS rank
             FROM users WHERE loyalty_score > 0) t ON t.id = l.user_id
         WHERE l.rank IS DISTINCT FROM t.rank",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(off, 0, "the view equals its definition");
    // Nothing dropped: every moved row is in the quarantine, with its reason.
    let quarantined: i64 = sqlx::query_scalar("SELECT count(*) FROM adoption_quarantine")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(quarantined, 3 + 4 + 2 + 6 + 1 + 1);
    let repaired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM adoption_repairs WHERE kind = 'users.loyalty_score'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(repaired >= 9, "{repaired}");
}

#[sqlx::test(migrations = false)]
async fn after_adoption_the_old_code_and_plain_sql_together_count_every_score_once(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = common::wide_pool(opts, 8).await;
    let db = database(&pool).await;
    load_fixture(&db);
    let config = common::config(&pool, "coexist");
    let out = adopt(&config, &["--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old code (UPDATE, then INSERT) and a new application (INSERT
    // only) at once, on the same users: 8 + 4 writers on 3 users, then on 200.
    let ctx = common::ctx_with(&pool, config.clone(), false);
    for users in [3, 200] {
        crate::writers::coexist(&pool, &ctx, &db, users, 8).await;
    }
    assert_eq!(
        common::sweep_drift(&ctx).await,
        0,
        "no score counted twice or not at all"
    );
    common::queue_invariants(&pool, QueueKind::Post).await;
    // The switch, once the application only inserts events.
    sqlx::query("UPDATE loyaltyd_settings SET legacy_score_writes = false")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[sqlx::test(migrations = false)]
async fn adopt_refuses_an_empty_database_and_one_loyaltyd_manages_already(pool: PgPool) {
    let config = common::config(&pool, "refuse");
    let out = adopt(&config, &[]).await;
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("table users is missing") && err.contains("loyaltyd migrate"),
        "{err}"
    );
    assert!(common::run(&config, &["migrate"]).status.success());
    // loyaltyd's own database, up to date: nothing to do, success (SPEC §13:
    // idempotent), for the dry run and the real one alike.
    for args in [&["--dry-run"][..], &[]] {
        let out = adopt(&config, args).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("nothing to do"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // One with a migration still to apply is `migrate`'s, not adopt's.
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let out = adopt(&config, &["--dry-run"]).await;
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("managed by loyaltyd already"));
}

/// The role the real forum's fixture grants its view to (roles are the
/// cluster's: one per test database).
fn reader_role(db: &str) -> String {
    format!("forum_reader_{}", &db[db.len().saturating_sub(16)..]).to_lowercase()
}

/// Loads tests/fixtures/real_forum.sql on top of the original design's.
fn load_real_forum(db: &str) {
    let role = reader_role(db);
    let _ = Command::new("psql")
        .args(["-X", "-q", "-h", "/var/run/postgresql", "-d", db, "-c"])
        .arg(format!("DROP ROLE IF EXISTS {role}"))
        .output();
    common::psql_fixture(db, "real_forum.sql", &[("role", role)]);
}

#[sqlx::test(migrations = false)]
async fn a_real_forum_keeps_its_objects_and_its_requests_succeed_through_an_adoption_killed_three_times(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = common::wide_pool(opts, 8).await;
    let db = database(&pool).await;
    load_fixture(&db);
    load_real_forum(&db);
    let config = common::config(&pool, "forum");

    // The plan: every object of the forum's on the columns, every NULL.
    let out = adopt(&config, &["--dry-run", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let dependents: Vec<String> = plan["dependents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["object"].as_str().map(str::to_owned))
        .collect();
    for object in [
        "view top_posters",
        "view recent_decisions",
        "materialized view user_activity",
        "function is_trusted",
        "trigger users_score_audit",
        "policy users_visible",
        "forum_posts_author_fkey",
        "forum_badges_user_id_fkey",
    ] {
        assert!(
            dependents.iter().any(|d| d.contains(object)),
            "{object} is not in the plan's dependents: {dependents:#?}"
        );
    }
    let planned: Vec<(String, String, i64)> = plan["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["problem"].as_str()?.to_owned(),
                p["recorded_as"].as_str()?.to_owned(),
                p["count"].as_i64()?,
            ))
        })
        .collect();
    let count = |needle: &str| {
        planned
            .iter()
            .find(|(p, _, _)| p.starts_with(needle))
            .map(|(_, _, n)| *n)
            .unwrap_or_else(|| panic!("no problem {needle:?} in {planned:#?}"))
    };
    // The NULLs the fixture plants (real_forum.sql), with the original's own problems.
    assert_eq!(count("users without a score"), 4);
    assert_eq!(count("users without a sign-up time"), 2);
    assert_eq!(count("users without an update time"), 3);
    assert_eq!(count("events of users that no longer exist"), 6 + 3);
    assert_eq!(count("events without a valid event type"), 2 + 2);
    assert_eq!(count("events without a time"), 4);
    assert_eq!(count("topic queue items without a position"), 2);
    assert_eq!(count("topic queue items without a priority"), 1);
    assert_eq!(count("topic queue items without an entry time"), 2);
    assert_eq!(count("post queue items without a position"), 3);
    assert_eq!(count("post queue items without a priority"), 2);
    assert_eq!(count("post queue items without an entry time"), 1);
    assert_eq!(count("message queue items without a position"), 1);
    assert_eq!(count("message queue items without a priority"), 2);
    assert_eq!(count("message queue items without an entry time"), 3);

    // The forum's application writes and reads throughout: the original
    // code through psycopg (every statement prepared) and plain-SQL
    // handlers through asyncpg (which prepares everything), 8 + 8.
    let stop = std::env::temp_dir().join(format!("forum-stop-{db}"));
    let _ = std::fs::remove_file(&stop);
    let stop_path = stop.to_string_lossy().into_owned();
    let mut apps = Apps(
        (0..8)
            .map(|w| old_app(&config, &db, w, 300, USERS, &stop_path))
            .collect(),
    );
    apps.0.push(common::asyncpg_app(
        &format!("postgresql://root@/{db}?host=/var/run/postgresql"),
        8,
        300,
        USERS,
        &stop_path,
        "original",
    ));
    writing(&pool).await;

    // SIGKILLed three times at different moments, then run to its end.
    for after in [400u64, 1300, 2600] {
        let mut run = common::loyaltyd(&config)
            .args(["adopt", "--batch-size", "2000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(after)).await;
        let _ = run.kill(); // SIGKILL
        let _ = run.wait();
    }
    let out = adopt(&config, &["--batch-size", "2000", "--json"]).await;
    assert!(
        out.status.success(),
        "resumed adoption: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    // The application goes on writing on the adopted database.
    writing(&pool).await;
    std::fs::write(&stop, b"stop").unwrap_or_else(|e| panic!("{e}"));
    let mut worst: f64 = 0.0;
    for app in std::mem::take(&mut apps.0) {
        let line = common::finish(app).await;
        assert_eq!(
            line["errors"],
            serde_json::json!({}),
            "a request of the forum's failed: {line}"
        );
        assert!(line["done"].as_i64().unwrap_or(0) > 10, "{line}");
        worst = worst.max(line["worst_ms"].as_f64().unwrap_or(0.0));
    }
    eprintln!("the forum's worst request during the adoption: {worst} ms");
    let _ = std::fs::remove_file(&stop);
    let again = adopt(&config, &["--json"]).await;
    assert!(again.status.success());
    let again: serde_json::Value =
        serde_json::from_slice(&again.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again["nothing_to_do"], true, "{again}");

    // The plan and the outcome agree, rule by rule.
    for (problem, recorded_as, n) in &planned {
        let parts: Vec<&str> = recorded_as.splitn(3, ": ").collect();
        let (sql, a, b) = match parts[..] {
            ["adoption_repairs", kind] => (
                "SELECT count(*) FROM adoption_repairs WHERE kind = $1 AND $2 = ''",
                kind,
                "",
            ),
            ["adoption_quarantine", table, reason] => (
                "SELECT count(*) FROM adoption_quarantine WHERE source_table = $1 AND reason = $2",
                table,
                reason,
            ),
            _ => panic!("{recorded_as}"),
        };
        let got: i64 = sqlx::query_scalar(sql)
            .bind(a)
            .bind(b)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, *n, "{problem}: planned {n}, done {got}");
    }

    // Every object of the forum's is there and works.
    let checks: Vec<(&str, &str)> = vec![
        ("SELECT count(*) >= 0 FROM top_posters", "the view"),
        (
            "SELECT count(*) > 0 FROM recent_decisions",
            "the events view",
        ),
        ("SELECT is_trusted(3) IS NOT NULL", "the function"),
        (
            "SELECT obj_description('top_posters'::REGCLASS, 'pg_class') = 'the forum''s sidebar'",
            "the view's comment",
        ),
        (
            "SELECT count(*) = 1 FROM pg_policy WHERE polname = 'users_visible'",
            "the policy",
        ),
        (
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'users'::REGCLASS",
            "row-level security on users",
        ),
        (
            "SELECT bool_and(convalidated) AND count(*) = 2 FROM pg_constraint
             WHERE conname IN ('forum_posts_author_fkey', 'forum_badges_user_id_fkey')",
            "the foreign keys",
        ),
        (
            "SELECT count(*) > 0 FROM score_audit",
            "the audit trigger fired",
        ),
    ];
    for (sql, what) in &checks {
        let ok: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(ok, "{what}");
    }
    sqlx::query("REFRESH MATERIALIZED VIEW user_activity")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("the materialized view: {e}"));

    // Scores equal their events, positions dense, the sweep finds nothing;
    // and the cache agrees with the database for every repaired user,
    // without a daemon.
    let ctx = common::ctx_with(&pool, config.clone(), false);
    let off: Vec<(i64, Option<i64>, i64, i64)> = sqlx::query_as(
        "SELECT u.id::BIGINT, u.loyalty_score::BIGINT,
                COALESCE((SELECT sum(score_delta) FROM moderation_events e WHERE e.user_id = u.id), 0)::BIGINT,
                COALESCE((SELECT sum(delta) FROM legacy_score_credits c WHERE c.user_id = u.id), 0)::BIGINT
         FROM users u WHERE u.loyalty_score IS DISTINCT FROM
               COALESCE((SELECT sum(score_delta) FROM moderation_events e WHERE e.user_id = u.id), 0)",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        off.is_empty(),
        "(user, score, events, credits) off: {off:?}"
    );
    assert_eq!(common::sweep_drift(&ctx).await, 0);
    for q in QueueKind::ALL {
        common::queue_invariants(&pool, q).await;
    }
    assert!(done["cache_rewritten"].as_i64().unwrap_or(0) >= 4, "{done}");
    let repaired: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id::BIGINT, loyalty_score::BIGINT FROM users WHERE id IN (
             SELECT substr(subject, 6)::BIGINT FROM adoption_repairs WHERE kind LIKE 'users.loyalty_score%')",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(repaired.len() >= 4 + 9, "{repaired:?}");
    for (id, score) in &repaired {
        let got = common::run_json(&config, &["score", "get", "--user", &id.to_string()]);
        assert_eq!(got["loyalty_score"], *score, "user {id}: {got}");
    }

    // The SQL API on the forum's own column types (migration 10's casts):
    // each function answers, and what the batch writes the sweep agrees with.
    let batch: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT user_id, events FROM record_moderation_events(ARRAY[7, 3, 7]::BIGINT[],
             ARRAY['m', 'm', 'm'], ARRAY['post', 'topic', 'post'], ARRAY['api-1', 'api-2', 'api-3'],
             ARRAY['approved', 'rejected', 'approved'], ARRAY[NULL, NULL, NULL]::TEXT[])",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("record_moderation_events: {e}"));
    assert_eq!(batch, vec![(3, 1), (7, 2)]);
    for sql in [
        "SELECT count(*) = 1 FROM record_moderation_event(5, 'm', 'post', 'api-4', 'approved')",
        "SELECT count(*) = 1 FROM loyalty_standing(3)",
        "SELECT count(*) = 2 FROM leaderboard_page(2)",
        "SELECT count(*) = 1 FROM queue_position('post', 'p-30')",
        "SELECT count(*) = 3 FROM queue_head('message', 'conv-1', 3)",
        "SELECT count(*) = 1 FROM queue_position('topic', 't-40')",
    ] {
        let ok: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert!(ok, "{sql}");
    }
    assert_eq!(common::sweep_drift(&ctx).await, 0);

    // The restart window: --change-types changes what nothing of the
    // forum's blocks, creates the forum's view again with its comment and
    // grant, and keeps the columns a function, policy or materialized view
    // of the forum's reads.
    let out = adopt(&config, &["--change-types", "--json"]).await;
    assert!(
        out.status.success(),
        "--change-types: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let retyped: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let kept: Vec<&str> = retyped["kept_types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["column"].as_str())
        .collect();
    for column in [
        "users.id",
        "users.loyalty_score",
        "moderation_events.user_id",
    ] {
        assert!(kept.contains(&column), "{column} kept: {retyped}");
    }
    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::TEXT || '.' || column_name::TEXT, data_type::TEXT FROM information_schema.columns
         WHERE table_name IN ('users', 'top_posters') AND column_name IN ('username', 'loyalty_score')
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        types,
        vec![
            ("top_posters.loyalty_score".to_owned(), "integer".to_owned()),
            ("top_posters.username".to_owned(), "text".to_owned()),
            ("users.loyalty_score".to_owned(), "integer".to_owned()),
            ("users.username".to_owned(), "text".to_owned()),
        ]
    );
    for (sql, what) in &checks {
        let ok: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{what}, after --change-types: {e}"));
        assert!(ok, "{what}, after --change-types");
    }
    let granted: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT has_table_privilege('{}', 'top_posters', 'SELECT')",
        reader_role(&db)
    )))
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(granted, "the view's grant kept");
    assert_eq!(common::sweep_drift(&ctx).await, 0);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role}",
        role = reader_role(&db)
    )))
    .execute(&pool)
    .await;
}

/// An entry the original code left in the cache that loyaltyd never wrote
/// (its own race left it stale) is not served after adoption, though the
/// user's score needed no repair: an entry without loyaltyd's version is
/// read as a miss and refilled from the database.
#[sqlx::test(migrations = false)]
async fn after_adoption_no_cached_score_the_original_code_wrote_is_served(pool: PgPool) {
    let db = database(&pool).await;
    load_fixture(&db);
    let config = common::config(&pool, "stale");
    let (user, score): (i64, i64) = sqlx::query_as(
        "SELECT id::BIGINT, loyalty_score::BIGINT FROM users u WHERE loyalty_score IS NOT NULL
           AND loyalty_score = (SELECT COALESCE(sum(CASE lower(btrim(outcome)) WHEN 'approved' THEN 1
                                                        WHEN 'rejected' THEN -1 ELSE 0 END
                                                   * CASE lower(btrim(content_type)) WHEN 'topic' THEN 5 ELSE 1 END), 0)
                                FROM moderation_events e WHERE e.user_id = u.id)
         ORDER BY id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let key = format!("{}loyalty:{user}", config.redis.key_prefix);
    let mut redis = common::redis().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(77_777)
        .query_async(&mut redis)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let out = adopt(&config, &["--no-legacy-writers"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = common::run_json(&config, &["score", "get", "--user", &user.to_string()]);
    assert_eq!(got["loyalty_score"], score, "{got}");
    let cached: Option<i64> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cached, Some(score), "refilled from the database");
}
