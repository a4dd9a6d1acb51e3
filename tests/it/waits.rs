//! Wait estimates beside every position (SPEC §14, migration 9): a scope's
//! pace, kept by the DELETE trigger for whoever removes, tracks a simulated
//! moderation pace; "unknown" without history; reorders keep estimates
//! consistent with the new positions; psql and Python read a position and
//! its wait in one call.

use std::process::Command;
use std::time::{Duration, Instant};

use loyaltyd::queues;
use loyaltyd::types::{QueueKind, Scope};
use sqlx::PgPool;

use crate::common::{self, ident};

/// The tolerance of an estimate against the wait that really followed.
const TOLERANCE: f64 = 0.35;

async fn add_items(pool: &PgPool, topic: &str, n: i64) {
    sqlx::query(
        "INSERT INTO post_moderation_queue (post_id, topic_id)
         SELECT $1 || '-' || g, $1 FROM generate_series(1, $2) g",
    )
    .bind(topic)
    .bind(n)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Removes the head of `topic` every `every`, `times` times: through the
/// CLI on odd turns, plain SQL on even ones. Returns when each item left.
async fn moderate(
    pool: &PgPool,
    config: &loyaltyd::Config,
    topic: &str,
    every: Duration,
    times: usize,
) -> Vec<(String, Instant)> {
    let mut left = Vec::new();
    let mut next = tokio::time::Instant::now();
    for turn in 0..times {
        tokio::time::sleep_until(next).await;
        next += every;
        let head: Option<String> =
            sqlx::query_scalar("SELECT content_id FROM queue_head('post', $1, 1)")
                .bind(topic)
                .fetch_optional(pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        let Some(head) = head else { break };
        if turn % 2 == 1 {
            let config = config.clone();
            let h = head.clone();
            let out = tokio::task::spawn_blocking(move || {
                common::run(
                    &config,
                    &["queue", "remove", "--queue", "post", "--content-id", &h],
                )
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            sqlx::query("DELETE FROM post_moderation_queue WHERE post_id = $1")
                .bind(&head)
                .execute(pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        left.push((head, Instant::now()));
    }
    left
}

#[sqlx::test(migrations = false)]
async fn estimates_track_a_simulated_moderation_pace_within_the_tolerance(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "waits");
    let config = ctx.config.as_ref().clone();
    add_items(&pool, "fast", 80).await;
    add_items(&pool, "slow", 30).await;
    // Nothing removed yet: no estimate anywhere, never a made-up number.
    let p = queues::position(&ctx, QueueKind::Post, &ident("fast-5"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((p.position, p.wait.clone()), (5, queues::Wait::default()));
    // Two topics moderated at their own pace at once: 4 and 1 per second.
    let fast = Duration::from_millis(250);
    let slow = Duration::from_secs(1);
    let (a, b) = tokio::join!(
        moderate(&pool, &config, "fast", fast, 24),
        moderate(&pool, &config, "slow", slow, 6)
    );
    assert_eq!((a.len(), b.len()), (24, 6));
    // Each scope's time per item is its own pace.
    for (topic, pace) in [("fast", fast), ("slow", slow)] {
        let item = format!("{topic}-{}", if topic == "fast" { 33 } else { 12 });
        let p = queues::position(&ctx, QueueKind::Post, &ident(&item))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.wait.wait_source.as_deref(), Some("scope"), "{p:?}");
        let per_item = p.wait.expected_wait_seconds.unwrap_or_default() / p.position as f64;
        let want = pace.as_secs_f64();
        assert!(
            (per_item - want).abs() <= TOLERANCE * want,
            "{topic}: {per_item:.3} s per item, the pace was {want} s: {p:?}"
        );
    }
    // The estimate against the wait that follows at the same pace.
    let p = queues::position(&ctx, QueueKind::Post, &ident("fast-33"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let estimate = p.wait.expected_wait_seconds.unwrap_or_default();
    let asked = Instant::now();
    let left = moderate(&pool, &config, "fast", fast, p.position as usize).await;
    let real = left
        .iter()
        .find(|(id, _)| id == "fast-33")
        .map(|(_, at)| at.duration_since(asked).as_secs_f64())
        .unwrap_or_else(|| panic!("fast-33 never left: {left:?}"));
    assert!(
        (estimate - real).abs() <= TOLERANCE * real,
        "estimated {estimate:.2} s, waited {real:.2} s"
    );
    // Positions stayed exact and dense throughout.
    let scopes = common::queue_invariants(&pool, QueueKind::Post).await;
    assert_eq!(scopes["fast"].len(), 80 - 24 - p.position as usize);
    assert_eq!(scopes["slow"].len(), 24);
}

#[sqlx::test(migrations = false)]
async fn unknown_without_history_the_queues_pace_for_a_new_scope_and_reorders_stay_consistent(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "waits-basis");
    add_items(&pool, "busy", 20).await;
    // Five decisions, one transaction each (a purge of five in one
    // statement would teach the pace one).
    for i in 1..=5 {
        sqlx::query("DELETE FROM post_moderation_queue WHERE post_id = $1")
            .bind(format!("busy-{i}"))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Time passes after the removals (the pace is removals over time).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A new topic: the queue's typical pace stands in for its own.
    add_items(&pool, "new", 3).await;
    let p = queues::position(&ctx, QueueKind::Post, &ident("new-2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // (Its "_idle" form where the removals stopped a while ago, as here.)
    assert!(
        p.wait
            .wait_source
            .as_deref()
            .is_some_and(|s| s.starts_with("queue")),
        "{p:?}"
    );
    assert!(
        p.wait.expected_wait_seconds.is_some_and(|w| w > 0.0),
        "{p:?}"
    );
    // A queue without any removal: unknown, for the CLI's JSON too.
    sqlx::query(
        "INSERT INTO private_message_queue (message_id, conversation_id) VALUES ('m1', 'c1')",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let position = [
        "queue",
        "position",
        "--queue",
        "message",
        "--content-id",
        "m1",
    ];
    let json = common::run_json(&ctx.config, &position);
    assert_eq!(json["position"], 1);
    for key in [
        "expected_wait_seconds",
        "wait_source",
        "wait_window_seconds",
        "wait_items_seen",
    ] {
        assert!(json[key].is_null(), "{key}: {json}");
    }
    let out = common::run(&ctx.config, &position);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("expected wait unknown"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A reorder by priority: every estimate is its new position times the
    // same time per item.
    sqlx::query("UPDATE post_moderation_queue SET priority_score = 10 WHERE post_id = 'busy-20'")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    queues::reorder(&ctx, QueueKind::Post, &Scope::Topic(ident("busy")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let listing = queues::list(&ctx, QueueKind::Post, &Scope::Topic(ident("busy")), 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listing.items[0].content_id, "busy-20");
    let per_item = listing.items[0]
        .wait
        .expected_wait_seconds
        .unwrap_or_default();
    assert!(per_item > 0.0, "{listing:?}");
    for i in &listing.items {
        let w = i.wait.expected_wait_seconds.unwrap_or_default();
        assert!(
            (w - per_item * i.position as f64).abs() < 1e-6 * w.max(1.0),
            "{i:?}"
        );
        assert!(
            i.wait
                .wait_source
                .as_deref()
                .is_some_and(|s| s.starts_with("scope")),
            "{i:?}"
        );
    }
    common::queue_invariants(&pool, QueueKind::Post).await;
}

#[sqlx::test(migrations = false)]
async fn psql_and_python_read_a_position_and_its_wait_in_one_call(pool: PgPool) {
    common::migrate(&pool).await;
    // The guide's topic t-7, p-995 to p-1002 waiting, four decided one by one.
    sqlx::query(
        "INSERT INTO post_moderation_queue (post_id, topic_id)
         SELECT 'p-' || g, 't-7' FROM generate_series(995, 1002) g",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 995..=998 {
        sqlx::query("DELETE FROM post_moderation_queue WHERE post_id = $1")
            .bind(format!("p-{i}"))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let role = common::ForumRole::create(&pool, "waits").await;
    let (ok, out, err) = role.psql(&common::doc_example("sql-wait"));
    assert!(ok, "{err}");
    let fields: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(fields.first(), Some(&"4"), "{out}");
    assert!(
        fields
            .get(1)
            .and_then(|w| w.parse::<f64>().ok())
            .is_some_and(|w| w >= 0.0),
        "{out}"
    );
    assert!(
        fields.get(2).is_some_and(|s| s.starts_with("scope")),
        "{out}"
    );
    // The guide's Python example, on psycopg's default connection.
    let script = format!(
        "import psycopg\n{}\nwith psycopg.connect({:?}) as conn:\n    print(repr(wait_message(conn, 'p-1002')))\n    print(repr(wait_message(conn, 'nope')))\n",
        common::doc_example("python-wait"),
        role.dsn()
    );
    let out = Command::new(common::PYTHON)
        .args(["-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("#4 in line") && lines[0].contains("usually reviewed within"),
        "{text}"
    );
    assert_eq!(lines[1], "None", "{text}");
    role.drop_role(&pool).await;
}

/// A purge (one statement removing many) teaches the pace one removal, not
/// many; a pause makes the estimate grow as the wait does, and says so.
#[sqlx::test(migrations = false)]
async fn a_purge_does_not_teach_the_pace_and_a_pause_slows_the_estimate(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "waits-purge");
    add_items(&pool, "t", 60).await;
    // Four moderators' decisions, a few milliseconds apart.
    for i in 1..=4 {
        sqlx::query("DELETE FROM post_moderation_queue WHERE post_id = $1")
            .bind(format!("t-{i}"))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = queues::position(&ctx, QueueKind::Post, &ident("t-60"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A spam purge: forty items in one statement.
    sqlx::query(
        "DELETE FROM post_moderation_queue WHERE post_id IN (SELECT 't-' || g FROM generate_series(5, 44) g)",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let after = queues::position(&ctx, QueueKind::Post, &ident("t-60"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after.position, 16);
    let seen = |p: &queues::Placed| p.wait.wait_items_seen.unwrap_or_default();
    assert!(
        seen(&after) < seen(&before) + 1.5,
        "the purge counted as many decisions: {before:?} {after:?}"
    );
    // Nobody removes anything now: the time per item grows with the pause
    // (the time since the last removal), and the source says so.
    let per_item =
        |p: &queues::Placed| p.wait.expected_wait_seconds.unwrap_or_default() / p.position as f64;
    let first = per_item(&after);
    common::eventually(
        "the estimate growing with the pause",
        Duration::from_secs(30),
        || async {
            let now = queues::position(&ctx, QueueKind::Post, &ident("t-60"))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            now.wait.wait_source.as_deref() == Some("scope_idle") && per_item(&now) > 2.0 * first
        },
    )
    .await;
    let text = common::run(
        &ctx.config,
        &[
            "queue",
            "position",
            "--queue",
            "post",
            "--content-id",
            "t-60",
        ],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("no removal for longer than that pace"),
        "{text}"
    );
}
