//! The moderation queues: semantics, exact positions under concurrency, and a
//! property test against a plain in-memory model.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use loyaltyd::context::Context;
use loyaltyd::error::Error;
use loyaltyd::queues;
use loyaltyd::types::{Ident, Priority, QueueKind, Scope};
use proptest::prelude::*;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common;

fn id(s: &str) -> Ident {
    Ident::parse("test", s).unwrap_or_else(|e| panic!("{e}"))
}

fn prio(p: f64) -> Priority {
    Priority::new(p).unwrap_or_else(|e| panic!("{e}"))
}

fn topic(t: &str) -> Scope {
    Scope::Topic(id(t))
}

async fn add(ctx: &Context, q: QueueKind, item: &str, scope: &Scope, p: f64) -> i64 {
    queues::add(ctx, q, &id(item), scope, prio(p))
        .await
        .unwrap_or_else(|e| panic!("add {item}: {e}"))
        .position
}

async fn position(ctx: &Context, q: QueueKind, item: &str) -> i64 {
    queues::position(ctx, q, &id(item))
        .await
        .unwrap_or_else(|e| panic!("position {item}: {e}"))
        .position
}

async fn listed(ctx: &Context, q: QueueKind, scope: &Scope) -> Vec<String> {
    queues::list(ctx, q, scope, 100_000)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .items
        .into_iter()
        .map(|i| i.content_id)
        .collect()
}

/// Checks every stored invariant of every scope of a queue: counters equal the
/// items, block counts equal the keys in each block, and `position` of every
/// item equals its rank by key (dense, 1-based). Returns scope -> items in order.
pub async fn check_invariants(
    ctx: &Context,
    q: QueueKind,
) -> std::collections::BTreeMap<String, Vec<String>> {
    // What SQL shows (positions through the read API, lengths, blocks) ...
    let scopes = common::queue_invariants(&ctx.pool, q).await;
    // ... and the library's own position of every item agrees.
    for (s, items) in &scopes {
        for (rank, i) in items.iter().enumerate() {
            assert_eq!(
                position(ctx, q, i).await,
                rank as i64 + 1,
                "{q} item {i} in scope {s:?}"
            );
        }
    }
    scopes
}

#[sqlx::test(migrations = false)]
async fn adds_append_at_the_tail_and_removes_close_the_gap(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "tail");
    for (n, item) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        assert_eq!(
            add(&ctx, QueueKind::Topic, item, &Scope::Global, 0.0).await,
            n as i64 + 1
        );
    }
    queues::remove(&ctx, QueueKind::Topic, &id("b"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(position(&ctx, QueueKind::Topic, "c").await, 2);
    assert_eq!(position(&ctx, QueueKind::Topic, "e").await, 4);
    assert_eq!(position(&ctx, QueueKind::Topic, "a").await, 1);
    assert_eq!(
        add(&ctx, QueueKind::Topic, "f", &Scope::Global, 0.0).await,
        5
    );
    assert_eq!(
        listed(&ctx, QueueKind::Topic, &Scope::Global).await,
        ["a", "c", "d", "e", "f"]
    );
    let listing = queues::list(&ctx, QueueKind::Topic, &Scope::Global, 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((listing.length, listing.items.len()), (5, 2));
    assert_eq!(
        listing.items.iter().map(|i| i.position).collect::<Vec<_>>(),
        [1, 2]
    );
    check_invariants(&ctx, QueueKind::Topic).await;
}

#[sqlx::test(migrations = false)]
async fn reorder_sorts_by_priority_then_entry_time(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "reorder");
    let scope = topic("t1");
    for (item, p) in [
        ("p1", 1.0),
        ("p2", 5.0),
        ("p3", 1.0),
        ("p4", -2.0),
        ("p5", 5.0),
        ("p6", 3.5),
    ] {
        add(&ctx, QueueKind::Post, item, &scope, p).await;
    }
    let r = queues::reorder(&ctx, QueueKind::Post, &scope)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.scopes, r.items), (1, 6));
    assert_eq!(
        listed(&ctx, QueueKind::Post, &scope).await,
        ["p2", "p5", "p6", "p1", "p3", "p4"]
    );
    // Adds after a reorder go to the tail again, whatever their priority.
    assert_eq!(add(&ctx, QueueKind::Post, "p7", &scope, 100.0).await, 7);
    queues::remove(&ctx, QueueKind::Post, &id("p5"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(position(&ctx, QueueKind::Post, "p7").await, 6);
    let r = queues::reorder_all(&ctx, QueueKind::Post)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.scopes, r.items), (1, 6));
    assert_eq!(
        listed(&ctx, QueueKind::Post, &scope).await,
        ["p7", "p2", "p6", "p1", "p3", "p4"]
    );
    // Nothing changed since: nothing to reorder.
    let r = queues::reorder_all(&ctx, QueueKind::Post)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.scopes, r.items), (0, 0));
    check_invariants(&ctx, QueueKind::Post).await;
}

#[sqlx::test(migrations = false)]
async fn scopes_are_independent_of_each_other(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "scopes");
    let (t1, t2) = (topic("t1"), topic("t2"));
    let c1 = Scope::Conversation(id("t1")); // same name, other queue
    assert_eq!(add(&ctx, QueueKind::Post, "a", &t1, 0.0).await, 1);
    assert_eq!(add(&ctx, QueueKind::Post, "b", &t2, 0.0).await, 1);
    assert_eq!(add(&ctx, QueueKind::Post, "c", &t1, 0.0).await, 2);
    assert_eq!(add(&ctx, QueueKind::Message, "a", &c1, 0.0).await, 1);
    assert_eq!(
        add(&ctx, QueueKind::Topic, "a", &Scope::Global, 0.0).await,
        1
    );
    queues::remove(&ctx, QueueKind::Post, &id("a"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(position(&ctx, QueueKind::Post, "c").await, 1);
    assert_eq!(position(&ctx, QueueKind::Post, "b").await, 1);
    assert_eq!(position(&ctx, QueueKind::Message, "a").await, 1);
    assert_eq!(position(&ctx, QueueKind::Topic, "a").await, 1);
    for q in QueueKind::ALL {
        check_invariants(&ctx, q).await;
    }
}

#[sqlx::test(migrations = false)]
async fn duplicates_and_unknown_items_are_refused_and_change_nothing(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "refuse");
    add(&ctx, QueueKind::Post, "x", &topic("t1"), 0.0).await;
    for scope in [topic("t1"), topic("t2")] {
        let err = queues::add(&ctx, QueueKind::Post, &id("x"), &scope, prio(1.0)).await;
        assert!(matches!(err, Err(Error::DuplicateItem { .. })), "{err:?}");
        assert_eq!(err.map(|_| ()).unwrap_err().exit_code(), 65);
    }
    assert!(matches!(
        queues::remove(&ctx, QueueKind::Post, &id("nope")).await,
        Err(Error::UnknownItem { .. })
    ));
    assert!(matches!(
        queues::position(&ctx, QueueKind::Topic, &id("x")).await,
        Err(Error::UnknownItem { .. })
    ));
    assert_eq!(
        add(&ctx, QueueKind::Post, "y", &topic("t1"), 0.0).await,
        2,
        "the failed adds took no key"
    );
    let scopes = check_invariants(&ctx, QueueKind::Post).await;
    assert_eq!(scopes.get("t1").map(Vec::len), Some(2));
    assert_eq!(scopes.get("t2"), None);
}

#[sqlx::test(migrations = false)]
async fn odd_identifiers_are_stored_and_returned_byte_for_byte(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "odd");
    let odd = [
        "'; DROP TABLE users; --",
        "\r\nFLUSHALL\r\n",
        "{hash}tag",
        "ünïcödé ✓ 🚀",
        "%_\\",
        " leading and trailing ",
    ];
    for (n, item) in odd.iter().enumerate() {
        let scope = Scope::Conversation(id(odd[(n + 1) % odd.len()]));
        let placed = queues::add(&ctx, QueueKind::Message, &id(item), &scope, prio(0.0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(placed.content_id, *item);
        let found = queues::position(&ctx, QueueKind::Message, &id(item))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.scope.as_deref(), Some(odd[(n + 1) % odd.len()]));
    }
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tables, 0, "the users table is still there");
}

#[sqlx::test(migrations = false)]
async fn sixteen_concurrent_adders_and_removers_leave_exact_unique_positions(
    _o: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::migrate_with(&opts).await;
    let pool = common::wide_pool(opts, 24).await;
    let ctx = Arc::new(common::ctx(&pool, "race"));
    let mut tasks = Vec::new();
    // 16 adders: 1,000 items into the global queue; each add's answer is its position.
    for t in 0..16usize {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for i in 0..(1000 / 16 + usize::from(t < 1000 % 16)) {
                let item = format!("i-{t}-{i}");
                positions.push(
                    add(
                        &ctx,
                        QueueKind::Topic,
                        &item,
                        &Scope::Global,
                        (i % 7) as f64,
                    )
                    .await,
                );
            }
            positions
        }));
    }
    // 4 removers take every item whose number ends in 3, as soon as it is there.
    let removers: Vec<_> = (0..4usize)
        .map(|r| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut removed = Vec::new();
                for t in (r..16).step_by(4) {
                    for i in (3..63).step_by(10) {
                        let item = format!("i-{t}-{i}");
                        // Until it has been added (the adders are slower
                        // than the removers); a deadline, not a count.
                        let deadline = std::time::Instant::now() + Duration::from_secs(30);
                        while std::time::Instant::now() < deadline {
                            match queues::remove(&ctx, QueueKind::Topic, &id(&item)).await {
                                Ok(_) => {
                                    removed.push(item.clone());
                                    break;
                                }
                                Err(Error::UnknownItem { .. }) => {
                                    tokio::time::sleep(Duration::from_millis(1)).await
                                }
                                Err(e) => panic!("remove {item}: {e}"),
                            }
                        }
                    }
                }
                removed
            })
        })
        .collect();
    // A reorder in the middle of it all.
    let reorderer = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // A moment into the writes: where the reorder lands.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            queues::reorder(&ctx, QueueKind::Topic, &Scope::Global)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        })
    };
    let mut add_answers = Vec::new();
    for t in tasks {
        add_answers.extend(t.await.unwrap_or_else(|e| panic!("{e}")));
    }
    let mut removed = Vec::new();
    for r in removers {
        removed.extend(r.await.unwrap_or_else(|e| panic!("{e}")));
    }
    reorderer.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        removed.len(),
        16 * 6,
        "every item meant for removal was removed once"
    );
    assert!(add_answers.iter().all(|&p| p >= 1));
    let scopes = check_invariants(&ctx, QueueKind::Topic).await;
    let items = scopes.get("").cloned().unwrap_or_default();
    assert_eq!(
        items.len(),
        1000 - removed.len(),
        "every item is accounted for"
    );
    let mut unique = items.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), items.len());
    for r in &removed {
        assert!(!items.contains(r));
    }
    let listing = queues::list(&ctx, QueueKind::Topic, &Scope::Global, 100_000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let positions: Vec<i64> = listing.items.iter().map(|i| i.position).collect();
    assert_eq!(positions, (1..=items.len() as i64).collect::<Vec<_>>());
    assert_eq!(listing.length, items.len() as i64);
}

#[sqlx::test(migrations = false)]
async fn positions_stay_exact_across_many_blocks(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "blocks");
    loyaltyd::demo::seed(&ctx, 0, 0, 3000, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let items = listed(&ctx, QueueKind::Topic, &Scope::Global).await;
    assert_eq!(items.len(), 3000);
    // Remove a stretch spanning block boundaries, then check positions around it.
    for item in &items[500..1100] {
        queues::remove(&ctx, QueueKind::Topic, &id(item))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(position(&ctx, QueueKind::Topic, &items[499]).await, 500);
    assert_eq!(position(&ctx, QueueKind::Topic, &items[1100]).await, 501);
    assert_eq!(position(&ctx, QueueKind::Topic, &items[2999]).await, 2400);
    check_invariants(&ctx, QueueKind::Topic).await;
    queues::reorder(&ctx, QueueKind::Topic, &Scope::Global)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let scopes = check_invariants(&ctx, QueueKind::Topic).await;
    let ordered = &scopes[""];
    let prios: Vec<(String, f64)> =
        sqlx::query_as("SELECT topic_id, priority_score FROM topic_creation_queue")
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let prio: HashMap<String, f64> = prios.into_iter().collect();
    assert!(
        ordered.windows(2).all(|w| prio[&w[0]] >= prio[&w[1]]),
        "sorted by priority"
    );
    for q in [QueueKind::Post, QueueKind::Message] {
        let scopes = check_invariants(&ctx, q).await;
        assert_eq!(scopes.values().map(Vec::len).sum::<usize>(), 3000);
    }
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    Add { item: u8, scope: u8, priority: i8 },
    Remove { item: u8 },
    Reorder { scope: u8 },
    ReorderAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..24, 0u8..3, -3i8..4).prop_map(|(item, scope, priority)| Op::Add { item, scope, priority }),
        3 => (0u8..24).prop_map(|item| Op::Remove { item }),
        1 => (0u8..3).prop_map(|scope| Op::Reorder { scope }),
        1 => Just(Op::ReorderAll),
    ]
}

/// The model: each scope is a Vec in queue order; (item, priority, entry sequence).
#[derive(Default)]
struct Model {
    scopes: HashMap<u8, Vec<(u8, i8, u64)>>,
    seq: u64,
}

impl Model {
    fn sort(v: &mut [(u8, i8, u64)]) {
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    }
}

async fn run_ops(ctx: &Context, run: u32, ops: Vec<Op>) -> std::result::Result<(), TestCaseError> {
    let item_id = |i: u8| format!("r{run}-i{i}");
    let scope_of = |s: u8| topic(&format!("r{run}-s{s}"));
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Add {
                item,
                scope,
                priority,
            } => {
                let queued = model.scopes.values().any(|v| v.iter().any(|e| e.0 == item));
                let got = queues::add(
                    ctx,
                    QueueKind::Post,
                    &id(&item_id(item)),
                    &scope_of(scope),
                    prio(priority.into()),
                )
                .await;
                if queued {
                    prop_assert!(matches!(got, Err(Error::DuplicateItem { .. })), "{got:?}");
                } else {
                    model.seq += 1;
                    let v = model.scopes.entry(scope).or_default();
                    v.push((item, priority, model.seq));
                    prop_assert_eq!(got.map(|p| p.position).ok(), Some(v.len() as i64));
                }
            }
            Op::Remove { item } => {
                let got = queues::remove(ctx, QueueKind::Post, &id(&item_id(item))).await;
                let mut found = false;
                for v in model.scopes.values_mut() {
                    if let Some(i) = v.iter().position(|e| e.0 == item) {
                        v.remove(i);
                        found = true;
                    }
                }
                prop_assert_eq!(got.is_ok(), found, "{:?}", got);
            }
            Op::Reorder { scope } => {
                queues::reorder(ctx, QueueKind::Post, &scope_of(scope))
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if let Some(v) = model.scopes.get_mut(&scope) {
                    Model::sort(v);
                }
            }
            Op::ReorderAll => {
                queues::reorder_all(ctx, QueueKind::Post)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Scopes without an add since their last reorder are already sorted.
                for v in model.scopes.values_mut() {
                    Model::sort(v);
                }
            }
        }
        for (scope, v) in &model.scopes {
            for (n, e) in v.iter().enumerate() {
                let p = queues::position(ctx, QueueKind::Post, &id(&item_id(e.0)))
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(p.position, n as i64 + 1, "scope {} item {}", scope, e.0);
            }
        }
    }
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn random_adds_removes_and_reorders_match_an_in_memory_model(pool: PgPool) {
    common::migrate(&pool).await;
    let config = common::config(&pool, "prop");
    let url = config.database.url.expose().to_owned();
    // proptest drives synchronous cases; each case runs on its own runtime and
    // pool, in its own scopes (run number), on this test's database.
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 24,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let runs = std::sync::atomic::AtomicU32::new(0);
        runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (config, url) = (config.clone(), url.clone());
            rt.block_on(async move {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&url)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let ctx = common::ctx_with(&pool, config, false);
                let r = run_ops(&ctx, run, ops).await;
                pool.close().await;
                r
            })
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = result {
        panic!("{e}");
    }
    check_invariants(&common::ctx(&pool, "prop-final"), QueueKind::Post).await;
}

/// A forum that replicates every table logically (`CREATE PUBLICATION ...
/// FOR ALL TABLES`) still writes its queues, and the fold's DELETEs of
/// `queue_changes` (a table without a key) go through: PostgreSQL refuses
/// a DELETE on a published table without a replica identity.
#[sqlx::test(migrations = false)]
async fn a_forum_that_publishes_every_table_writes_and_folds_its_queues(pool: PgPool) {
    common::migrate(&pool).await;
    for sql in [
        "CREATE PUBLICATION forum_all FOR ALL TABLES",
        "INSERT INTO post_moderation_queue (post_id, topic_id) VALUES ('a', 't'), ('b', 't'), ('c', 't')",
        "DELETE FROM post_moderation_queue WHERE post_id = 'a'",
        "SELECT queue_fold('post')",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["t"], ["b", "c"]);
}

/// The queues' tables and columns are named once in SQL (`queue_tables()`,
/// sql/queues.sql); the Rust that writes its own SQL reads them from
/// `QueueKind::table`, which agrees.
#[sqlx::test(migrations = false)]
async fn the_rust_queue_mapping_is_the_sql_one(pool: PgPool) {
    common::migrate(&pool).await;
    let sql: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT queue, table_name::TEXT, item_column::TEXT, scope_column::TEXT FROM queue_tables() ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut rust: Vec<(String, String, String, Option<String>)> = QueueKind::ALL
        .iter()
        .map(|q| {
            let (table, item, scope) = q.table();
            (
                q.as_str().into(),
                table.into(),
                item.into(),
                scope.map(Into::into),
            )
        })
        .collect();
    rust.sort();
    assert_eq!(rust, sql);
}
