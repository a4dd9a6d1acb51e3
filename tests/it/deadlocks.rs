//! The bookkeeping never adds a wait, so never a deadlock (SPEC §14, issue 26):
//! the two repros that deadlocked before migration 11, statements of
//! transactions at REPEATABLE READ and SERIALIZABLE, loyaltyd's own CLI beside
//! a client's open transaction, and 16 clients writing queues and events in
//! random row order at once.
//!
//! Where a test wants "this statement does not wait", its connection runs with
//! a `lock_timeout`: a wait becomes an error (55P03) the test reports, instead
//! of a hang.

use std::time::Duration;

use loyaltyd::types::QueueKind;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::common;

/// A connection of the test's database on which any lock wait longer than
/// `lock_timeout` fails (55P03).
async fn connect(pool: &PgPool, lock_timeout: &str) -> PgConnection {
    let mut c = PgConnection::connect(&common::database_url(pool))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET lock_timeout = '{lock_timeout}'"
    )))
    .execute(&mut c)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    c
}

/// Runs `sql` on `c`; fails the test (naming the step) on any error.
async fn step(c: &mut PgConnection, what: &str, sql: &str) {
    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *c)
        .await
    {
        panic!("{what}: {sql}: {e}");
    }
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Repro (a) of issue 26, and its add and mixed forms: two transactions
/// write one item in scope X and one in scope Y, in opposite orders, one
/// statement each. Before migration 11 the second statement of each waited
/// for the other's block row (or scope row): 40P01. Now no statement waits.
#[sqlx::test(migrations = false)]
async fn writes_in_two_scopes_in_opposite_orders_never_wait(pool: PgPool) {
    common::migrate(&pool).await;
    exec(
        &pool,
        "INSERT INTO post_moderation_queue (post_id, topic_id)
         SELECT 'x' || g, 'X' FROM generate_series(1, 4) g
         UNION ALL SELECT 'y' || g, 'Y' FROM generate_series(1, 4) g",
    )
    .await;
    let rounds: [(&str, [&str; 4]); 3] = [
        (
            "deletes",
            [
                "DELETE FROM post_moderation_queue WHERE post_id = 'x1'",
                "DELETE FROM post_moderation_queue WHERE post_id = 'y2'",
                "DELETE FROM post_moderation_queue WHERE post_id = 'y1'",
                "DELETE FROM post_moderation_queue WHERE post_id = 'x2'",
            ],
        ),
        (
            "adds",
            [
                "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('ax1', 'X')",
                "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('ay2', 'Y')",
                "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('ay1', 'Y')",
                "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('ax2', 'X')",
            ],
        ),
        (
            "an add and a delete each",
            [
                "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('mx1', 'X')",
                "DELETE FROM post_moderation_queue WHERE post_id = 'y3'",
                "DELETE FROM post_moderation_queue WHERE post_id = 'x3'",
                "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('my2', 'Y')",
            ],
        ),
    ];
    for (what, [a1, b1, a2, b2]) in rounds {
        let mut a = connect(&pool, "2s").await;
        let mut b = connect(&pool, "2s").await;
        step(&mut a, what, "BEGIN").await;
        step(&mut b, what, "BEGIN").await;
        step(&mut a, what, a1).await;
        step(&mut b, what, b1).await;
        step(&mut a, what, a2).await;
        step(&mut b, what, b2).await;
        step(&mut a, what, "COMMIT").await;
        step(&mut b, what, "COMMIT").await;
    }
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["X"], ["x4", "ax1", "ax2", "mx1"]);
    assert_eq!(scopes["Y"], ["y4", "ay2", "ay1", "my2"]);
}

/// Repro (b) of issue 26: A scores user 5; B scores user 1 and, when the
/// two backends' pending-change rows were one shard (pid % 64), waited for
/// A's shard row; A then scored user 1 and closed the cycle (40P01). Pending
/// changes are each backend's own row now: B does not wait at all, and A
/// waits only for B's row of user 1 (the score it must change) until B
/// commits.
#[sqlx::test(migrations = false)]
async fn two_backends_scoring_users_wait_at_most_for_the_score_itself(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 5).await;
    let ev = |user: i64, n: &str| {
        format!(
            "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             VALUES ({user}, 'post_review', 'post', '{n}', 'approved')"
        )
    };
    let mut a = connect(&pool, "10s").await;
    let mut b = connect(&pool, "2s").await;
    step(&mut a, "A", "BEGIN").await;
    step(&mut b, "B", "BEGIN").await;
    step(&mut a, "A scores user 5", &ev(5, "a5")).await;
    step(&mut b, "B scores user 1 without waiting", &ev(1, "b1")).await;
    let a_waits = tokio::spawn(async move {
        step(&mut a, "A scores user 1 after B", &ev(1, "a1")).await;
        step(&mut a, "A", "COMMIT").await;
    });
    common::eventually("A waiting for user 1", Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE datname = current_database() AND wait_event_type = 'Lock')",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(false)
    })
    .await;
    step(&mut b, "B", "COMMIT").await;
    a_waits.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(common::score_drift(&pool).await, vec![]);
    assert_eq!(common::changes_counted(&pool).await, 3);
}

/// Two adds in one scope from REPEATABLE READ transactions whose snapshots
/// predate each other's commits: before, the second read MAX + 1 from its old
/// snapshot and failed with 23505 (a duplicate key, which clients do not
/// retry). Keys come from a sequence now: both land, in the order of their
/// INSERTs. At SERIALIZABLE the same, or a 40001 the client retries; never
/// 23505.
#[sqlx::test(migrations = false)]
async fn adds_at_repeatable_read_and_serializable_never_collide_on_a_key(pool: PgPool) {
    common::migrate(&pool).await;
    exec(
        &pool,
        "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('first', 't')",
    )
    .await;
    for (level, n) in [("REPEATABLE READ", 1), ("SERIALIZABLE", 2)] {
        let mut a = connect(&pool, "2s").await;
        let mut b = connect(&pool, "2s").await;
        for (c, who) in [(&mut a, "a"), (&mut b, "b")] {
            step(c, who, &format!("BEGIN ISOLATION LEVEL {level}")).await;
            // The snapshot, taken before either add.
            step(c, who, "SELECT count(*) FROM post_moderation_queue").await;
        }
        step(
            &mut a,
            level,
            &format!("INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('a{n}', 't')"),
        )
        .await;
        step(&mut a, level, "COMMIT").await;
        let b_add = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('b{n}', 't')"
        )))
        .execute(&mut b)
        .await;
        let b_done = match b_add {
            Ok(_) => sqlx::raw_sql("COMMIT").execute(&mut b).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = b_done {
            let code = e
                .as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned());
            assert_eq!(code.as_deref(), Some("40001"), "{level}: {e}");
            // The client's retry.
            exec(
                &pool,
                &format!(
                    "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('b{n}', 't')"
                ),
            )
            .await;
        }
    }
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["t"], ["first", "a1", "b1", "a2", "b2"]);
}

/// loyaltyd's own `queue add` and `queue remove` beside a client whose open
/// transaction has removed and added items of the same scope: before, the
/// CLI waited for the client's scope and block rows (and deadlocked when the
/// client then added); now it does not wait at all.
#[sqlx::test(migrations = false)]
async fn the_cli_never_waits_for_a_clients_open_transaction_on_its_scope(pool: PgPool) {
    common::migrate(&pool).await;
    let mut config = common::config(&pool, "q-nowait");
    // Any wait of the CLI's statements fails it (and the test).
    config.database.statement_timeout = Duration::from_secs(2);
    exec(
        &pool,
        "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('a', 't'), ('b', 't'), ('c', 't')",
    )
    .await;
    let mut client = connect(&pool, "5s").await;
    step(&mut client, "client", "BEGIN").await;
    step(
        &mut client,
        "client",
        "DELETE FROM post_moderation_queue WHERE post_id = 'a'",
    )
    .await;
    step(
        &mut client,
        "client",
        "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('tx', 't')",
    )
    .await;
    for args in [
        &[
            "queue",
            "add",
            "--queue",
            "post",
            "--content-id",
            "cli",
            "--topic",
            "t",
        ][..],
        &["queue", "remove", "--queue", "post", "--content-id", "c"][..],
    ] {
        let config = config.clone();
        let owned: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = owned.iter().map(String::as_str).collect();
            common::run(&config, &args)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{args:?} waited or failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    step(
        &mut client,
        "client",
        "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('tx2', 't')",
    )
    .await;
    step(&mut client, "client", "COMMIT").await;
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    // In the order of the INSERTs: the client's first add came before the CLI's.
    assert_eq!(scopes["t"], ["b", "tx", "cli", "tx2"]);
}

/// A write PostgreSQL rolls back and asks to be retried (40001/40P01) is
/// retried by loyaltyd's own add: a forum trigger fails each queue INSERT's
/// first try with 40001, as a serialization conflict would (a sequence
/// counts the tries: it is not rolled back with them).
#[sqlx::test(migrations = false)]
async fn a_cli_add_rolled_back_for_a_retry_is_retried_and_lands(pool: PgPool) {
    common::migrate(&pool).await;
    let config = common::config(&pool, "q-retry");
    exec(
        &pool,
        "CREATE SEQUENCE forum_tries;
         CREATE FUNCTION forum_conflict_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('forum_tries') % 2 = 1 THEN
                 RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER forum_conflict_once BEFORE INSERT ON post_moderation_queue
             FOR EACH ROW EXECUTE FUNCTION forum_conflict_once();",
    )
    .await;
    let out = tokio::task::spawn_blocking(move || {
        common::run(
            &config,
            &[
                "--json",
                "queue",
                "add",
                "--queue",
                "post",
                "--content-id",
                "p",
                "--topic",
                "t",
            ],
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "queue add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tries: i64 = sqlx::query_scalar("SELECT last_value FROM forum_tries")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tries, 2, "one rolled-back try, one that landed");
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["t"], ["p"]);
}

/// A small deterministic generator (no dependency for it).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// One random transaction of client `c`: multi-row INSERTs into the post and
/// message queues across eight scopes, multi-row DELETEs of the client's own
/// earlier items (`mine`) across scopes, a multi-row event INSERT for random
/// users; statements and rows in random order. Returns the SQL and the items
/// it adds.
fn random_transaction(
    c: u64,
    rng: &mut Rng,
    n: &mut u64,
    mine: &mut Vec<(&'static str, String)>,
) -> (String, Vec<(&'static str, String)>) {
    let mut stmts = Vec::new();
    let mut added = Vec::new();
    let mut scored = false;
    for _ in 0..1 + rng.below(3) {
        if scored || rng.below(3) < 2 {
            let (table, id, scope) = if rng.below(2) == 0 {
                ("post_moderation_queue", "post_id", "topic_id")
            } else {
                ("private_message_queue", "message_id", "conversation_id")
            };
            let rows: Vec<String> = (0..1 + rng.below(6))
                .map(|_| {
                    *n += 1;
                    let item = format!("c{c}-{n}");
                    added.push((table, item.clone()));
                    format!("('{item}', 's{}')", rng.below(8))
                })
                .collect();
            stmts.push(format!(
                "INSERT INTO {table} ({id}, {scope}) VALUES {}",
                rows.join(", ")
            ));
        } else {
            scored = true;
            let rows: Vec<String> = (0..1 + rng.below(5))
                .map(|_| {
                    *n += 1;
                    let outcome = if rng.below(3) == 0 {
                        "rejected"
                    } else {
                        "approved"
                    };
                    format!(
                        "({}, 'post_review', 'post', 'e{c}-{n}', '{outcome}')",
                        1 + rng.below(50)
                    )
                })
                .collect();
            stmts.push(format!(
                "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome) VALUES {}",
                rows.join(", ")
            ));
        }
        if mine.len() > 4 && rng.below(2) == 0 {
            for (table, id) in [
                ("post_moderation_queue", "post_id"),
                ("private_message_queue", "message_id"),
            ] {
                let gone: Vec<String> = (0..1 + rng.below(4))
                    .filter_map(|_| {
                        let at = rng.below(mine.len() as u64) as usize;
                        (mine.get(at)?.0 == table).then(|| mine.swap_remove(at).1)
                    })
                    .map(|i| format!("'{i}'"))
                    .collect();
                if !gone.is_empty() {
                    stmts.push(format!(
                        "DELETE FROM {table} WHERE {id} IN ({})",
                        gone.join(", ")
                    ));
                }
            }
        }
    }
    (format!("BEGIN; {}; COMMIT", stmts.join("; ")), added)
}

/// 16 clients for eight seconds, each transaction random (above), and two
/// CLI processes adding and removing in the same scopes: no 40P01, no failed
/// CLI call, and every invariant holds after. Each client deletes only items
/// it added (two transactions deleting each other's rows in opposite orders
/// deadlock on those rows, loyaltyd or not), and each transaction scores its
/// users in one statement: scores are row locks held to commit, the work a
/// score change must do, and the statement takes them in user order; events
/// for users A then B in one transaction and B then A in another, as
/// separate statements, wait for each other as two UPDATEs of those users
/// would (docs/integrating.md, "What waits for what").
#[sqlx::test(migrations = false)]
async fn sixteen_clients_in_random_row_order_and_two_clis_never_deadlock(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 4).await;
    common::users(&pool, 50).await;
    let config = common::config(&pool, "q-random");
    let run_for = Duration::from_secs(8);
    let mut clients = Vec::new();
    for c in 0..16u64 {
        let pool = pool.clone();
        clients.push(tokio::spawn(async move {
            let mut conn = connect(&pool, "30s").await;
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c + 1) * 0x2545_f491));
            let mut mine = Vec::new();
            let (mut deadlocks, mut done, mut n) = (Vec::new(), 0u64, 0u64);
            let start = std::time::Instant::now();
            while start.elapsed() < run_for {
                let (tx, added) = random_transaction(c, &mut rng, &mut n, &mut mine);
                match sqlx::raw_sql(sqlx::AssertSqlSafe(tx))
                    .execute(&mut conn)
                    .await
                {
                    Ok(_) => {
                        done += 1;
                        mine.extend(added);
                    }
                    Err(e) => {
                        let code = e
                            .as_database_error()
                            .and_then(|d| d.code())
                            .map(|c| c.into_owned());
                        assert_eq!(code.as_deref(), Some("40P01"), "client {c}: {e}");
                        deadlocks.push(format!("client {c}: {e}"));
                        drop(sqlx::raw_sql("ROLLBACK").execute(&mut conn).await);
                    }
                }
            }
            (deadlocks, done)
        }));
    }
    let clis: Vec<_> = (0..2)
        .map(|k| {
            let config = config.clone();
            tokio::task::spawn_blocking(move || {
                let start = std::time::Instant::now();
                let (mut calls, mut failed) = (0u32, Vec::new());
                let mut i = 0;
                while start.elapsed() < run_for {
                    i += 1;
                    let item = format!("cli{k}-{i}");
                    let scope = format!("s{}", i % 8);
                    for args in [
                        vec![
                            "queue",
                            "add",
                            "--queue",
                            "post",
                            "--content-id",
                            &item,
                            "--topic",
                            &scope,
                        ],
                        vec!["queue", "remove", "--queue", "post", "--content-id", &item],
                    ] {
                        calls += 1;
                        let out = common::run(&config, &args);
                        if !out.status.success() {
                            failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
                        }
                    }
                }
                (calls, failed)
            })
        })
        .collect();
    let (mut deadlocks, mut done) = (Vec::new(), 0);
    for c in clients {
        let (d, n) = c.await.unwrap_or_else(|e| panic!("{e}"));
        deadlocks.extend(d);
        done += n;
    }
    for cli in clis {
        let (calls, failed) = cli.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(calls > 0);
        assert_eq!(failed, Vec::<String>::new(), "failed CLI calls of {calls}");
    }
    assert!(done > 100, "only {done} transactions ran");
    assert_eq!(
        deadlocks,
        Vec::<String>::new(),
        "deadlocks in {done} transactions"
    );
    common::queue_invariants(&pool, QueueKind::Post).await;
    common::queue_invariants(&pool, QueueKind::Message).await;
    assert_eq!(common::score_drift(&pool).await, vec![]);
    assert_eq!(
        common::changes_counted(&pool).await,
        common::nonzero_events(&pool).await
    );
}
