//! The live leaderboard: ranks and pages from committed scores, exact against
//! the seed's ROW_NUMBER definition (score descending, sign-up ascending,
//! then id) through ties, the 10 % boundary, concurrent writers, plain SQL
//! writers, a lost Redis and a corrupted board; and the swap refresh of the
//! view that keeps its grants and readers.

use std::time::{Duration, Instant};

use loyaltyd::context::Context;
use loyaltyd::leaderboard::{self, Source};
use loyaltyd::loyalty;
use loyaltyd::types::{ContentType, Outcome};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::common::{self, Daemon, uid};

/// The seed's definition, computed by PostgreSQL from the committed scores:
/// (user, score, rank, can_create_topics) in rank order, the topic right by
/// its one rule (`topic_right`, sql/leaderboard.sql): the live library's
/// ranks and loyaltyd's pages are tested against it here.
async fn truth(pool: &PgPool) -> Vec<(i64, i64, i64, bool)> {
    sqlx::query_as(
        "SELECT id, loyalty_score, rank, topic_right(rank, n) FROM (
             SELECT id, loyalty_score,
                    ROW_NUMBER() OVER (ORDER BY loyalty_score DESC, created_at ASC, id ASC) AS rank,
                    count(*) OVER () AS n
             FROM users WHERE loyalty_score > 0) r
         ORDER BY rank",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The whole board as `leaderboard show` pages it, asserting it came from
/// the live board.
async fn live_board(ctx: &Context) -> Vec<(i64, i64, i64, bool)> {
    let mut all = Vec::new();
    loop {
        let page = leaderboard::page(ctx, 7, all.len() as i64)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(page.source, Source::Live);
        if page.entries.is_empty() {
            return all;
        }
        all.extend(
            page.entries
                .iter()
                .map(|e| (e.user_id, e.loyalty_score, e.rank, e.can_create_topics)),
        );
    }
}

/// Asserts that pages and every user's rank equal the truth.
pub async fn assert_exact(ctx: &Context, pool: &PgPool, what: &str) {
    let expected = truth(pool).await;
    assert_eq!(live_board(ctx).await, expected, "{what}: pages");
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM users ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for id in ids {
        let s = leaderboard::rank(ctx, uid(id))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.source, Source::Live, "{what}: user {id}");
        let want = expected.iter().find(|e| e.0 == id);
        assert_eq!(
            (s.rank, s.can_create_topics),
            (want.map(|e| e.2), want.is_some_and(|e| e.3)),
            "{what}: user {id}"
        );
        if let Some(w) = want {
            assert_eq!(s.loyalty_score, w.1, "{what}: user {id}");
        }
    }
}

async fn build(ctx: &Context) -> u64 {
    loyaltyd::leaderboard::live::build(ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A small deterministic generator (splitmix64): the same run every time.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

#[sqlx::test(migrations = false)]
async fn ties_and_the_ten_percent_boundary_are_exact_and_follow_each_write(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "live-ties");
    for positive in [9i64, 10, 11, 19, 20, 21] {
        sqlx::raw_sql("DELETE FROM moderation_events; DELETE FROM users")
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Sign-ups tied in threes (the id decides).
        common::tied_users(&pool, positive, 3).await;
        assert_eq!(build(&ctx).await, positive as u64);
        let what = format!("{positive} ranked");
        assert_exact(&ctx, &pool, &what).await;
        let creators = truth(&pool).await.iter().filter(|e| e.3).count() as i64;
        assert_eq!(creators, positive / 10, "{what}");
        // A write moves the board at once, with no refresh: an unranked
        // user enters (+5), and a ranked one drops out (three rejections
        // of a topic cost 15).
        loyalty::record_event(
            &ctx,
            &common::event(positive + 1, ContentType::Topic, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..3 {
            loyalty::record_event(
                &ctx,
                &common::event(1, ContentType::Topic, Outcome::Rejected),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_exact(&ctx, &pool, &format!("{what}, after writes")).await;
        // The view, refreshed, by the same rule.
        common::refresh(&ctx).await;
        let view: Vec<(i64, i64, i64, bool)> = sqlx::query_as(
            "SELECT user_id, loyalty_score, rank, can_create_topics FROM user_leaderboard ORDER BY rank",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(view, truth(&pool).await, "{what}: the view");
    }
}

#[sqlx::test(migrations = false)]
async fn a_random_differential_against_row_number_through_both_write_paths(pool: PgPool) {
    common::migrate(&pool).await;
    let ctx = common::ctx(&pool, "live-diff");
    // 300 users, sign-ups in 40 distinct minutes: many exact ties.
    sqlx::query(
        "INSERT INTO users (id, username, created_at)
         SELECT g, 'u' || g, TIMESTAMPTZ '2024-01-01' + ((g * 7919) % 40) * INTERVAL '1 minute'
         FROM generate_series(1, 300) g",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    build(&ctx).await;
    let mut rng = Rng(18);
    let mut n = 0usize;
    for round in 0..12 {
        // Through loyaltyd: a batch of random events, scores up and down.
        let batch: Vec<_> = (0..60)
            .map(|_| {
                n += 1;
                common::varied_event(1 + rng.below(300) as i64, n + rng.below(9) as usize)
            })
            .collect();
        loyalty::record_events(&ctx, &batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Through plain SQL, as a forum writes: the daemon's cache sync
        // carries these to the board.
        sqlx::query(
            "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             SELECT 1 + (g * $1) % 300, 'moderation_decision',
                    (ARRAY['topic','post','private_message'])[1 + g % 3], 'sql-' || g,
                    (ARRAY['approved','rejected','approved'])[1 + (g / 3) % 3]
             FROM generate_series(1, 25) g",
        )
        .bind(rng.below(1000) as i64 + 1)
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        common::sync(&ctx).await;
        assert_exact(&ctx, &pool, &format!("round {round}")).await;
    }
    let ranked = truth(&pool).await.len();
    assert!(
        ranked > 100 && ranked < 300,
        "{ranked} ranked: not a varied board"
    );
}

#[sqlx::test(migrations = false)]
async fn sixteen_concurrent_writers_leave_the_board_exact(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 40).await;
    let wide = common::wide_pool(pool.connect_options().as_ref().clone(), 20).await;
    let ctx = common::ctx(&wide, "live-conc");
    build(&ctx).await;
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let ctx = ctx.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(w);
            for i in 0..40 {
                // Overlapping users: writes to one user race each other,
                // and their Redis writes may land out of commit order.
                let user = 1 + rng.below(12) as i64;
                let e = common::varied_event(user, (w as usize) * 1000 + i);
                if i % 5 == 0 {
                    let other = common::varied_event(
                        1 + rng.below(40) as i64,
                        (w as usize) * 1000 + i + 500,
                    );
                    loyalty::record_events(&ctx, &[e, other]).await.map(|_| ())
                } else {
                    loyalty::record_event(&ctx, &e).await.map(|_| ())
                }
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }));
    }
    for w in writers {
        w.await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_exact(&ctx, &wide, "after 16 writers").await;
}

#[sqlx::test(migrations = false)]
async fn the_sweep_finds_a_corrupted_board_and_repairs_it(pool: PgPool) {
    common::migrate(&pool).await;
    // Scores g % 7, from as many approved posts.
    sqlx::raw_sql(
        "INSERT INTO users (id, username, created_at)
         SELECT g, 'u' || g, TIMESTAMPTZ '2024-01-01' + g * INTERVAL '1 minute'
         FROM generate_series(1, 30) g;
         INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         SELECT g, 'moderation_decision', 'post', 'c' || g || '-' || k, 'approved'
         FROM generate_series(1, 30) g, generate_series(1, g % 7) k",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let ctx = common::ctx(&pool, "live-sweep");
    build(&ctx).await;
    let (set, hash) = (
        loyaltyd::leaderboard::live::Board::new(&ctx.redis).key(),
        loyaltyd::leaderboard::live::Board::new(&ctx.redis).users_key(),
    );
    let member = |id: i64, name: &str| {
        let minutes = id * 60_000_000;
        let epoch_2024 = 1_704_067_200_000_000i64;
        loyaltyd::leaderboard::live::live_member(uid(id), epoch_2024 + minutes, name)
    };
    let mut redis = common::redis().await;
    // A wrong score, a user missing, a user who is not ranked (score 0),
    // one the database never had, a stale name (member and bucket entry)
    // and a second member with an old name beside the right one.
    let b = |s: &str| s.as_bytes().to_vec();
    let corrupt: [(&str, Vec<Vec<u8>>); 7] = [
        ("ZADD", vec![b(&set), b("-100"), member(3, "u3")]),
        ("ZREM", vec![b(&set), member(5, "u5")]),
        ("ZADD", vec![b(&set), b("-2"), member(14, "u14")]),
        ("ZADD", vec![b(&set), b("-9"), member(9999, "ghost")]),
        ("ZREM", vec![b(&set), member(6, "u6")]),
        ("ZADD", vec![b(&set), b("-6"), member(6, "old6")]),
        ("ZADD", vec![b(&set), b("-1"), member(8, "old8")]),
    ];
    for (cmd, args) in corrupt {
        let _: i64 = redis::cmd(cmd)
            .arg(&args)
            .query_async(&mut redis)
            .await
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }
    // Bucket entries (ids 9900-9999, field: the last two digits): version,
    // then member.
    for (bucket, field, entry) in [
        ("99", "99", [&b"1 "[..], &member(9999, "ghost")].concat()),
        ("0", "6", [&b"1 "[..], &member(6, "old6")].concat()),
    ] {
        let _: i64 = redis::cmd("HSET")
            .arg(format!("{hash}:{bucket}"))
            .arg(field)
            .arg(entry)
            .query_async(&mut redis)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let wrong = leaderboard::rank(&ctx, uid(3))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        wrong.rank,
        Some(1),
        "the corruption is visible before the sweep"
    );
    let report = common::sweep(&ctx, 8).await;
    assert_eq!(
        (report.drifted_users, report.board_repaired),
        (0, 6),
        "{report:?}"
    );
    assert_exact(&ctx, &pool, "after the sweep").await;
    let again = common::sweep(&ctx, 8).await;
    assert_eq!(again.board_repaired, 0, "a second sweep finds nothing");
}

#[sqlx::test(migrations = false)]
async fn a_board_lost_with_redis_is_rebuilt_by_the_daemon_while_readers_use_the_view(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 20).await;
    let mut config = common::config(&pool, "live-daemon");
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let ctx = common::ctx_with(&pool, config.clone(), false);
    for id in 1..=20 {
        loyalty::record_event(
            &ctx,
            &common::event(id, ContentType::Post, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // Redis without the read library (a restart loses functions unless it
    // persists them): the daemon loads it, for every other client.
    common::flush_redis_functions().await;
    let c = common::redis().await;
    let daemon = Daemon::start(&config);
    daemon
        .wait_for_log("built the live leaderboard", Duration::from_secs(30))
        .await;
    common::eventually(
        "the daemon loading the library",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            let config = config.clone();
            async move {
                let listed: Vec<redis::Value> = redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg(loyaltyd::leaderboard::live::library_name(
                        &config.redis.key_prefix,
                    ))
                    .query_async(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                !listed.is_empty()
            }
        },
    )
    .await;
    let source = |config: &loyaltyd::config::Config| {
        common::run_json(config, &["leaderboard", "rank", "--user", "7"])["source"].clone()
    };
    assert_eq!(source(&config), "live");
    // Redis restarts empty: the board is gone.
    let board = loyaltyd::leaderboard::live::Board::new(&ctx.redis);
    assert!(ctx.redis.delete(&[board.key(), board.users_key()]).await);
    assert_eq!(source(&config), "view", "readers fall back to the view");
    common::eventually(
        "the daemon builds the board again",
        Duration::from_secs(30),
        || {
            let text = daemon.log_text();
            async move { text.matches("built the live leaderboard").count() >= 2 }
        },
    )
    .await;
    assert_eq!(source(&config), "live");
    assert_exact(&ctx, &pool, "rebuilt").await;
}

#[sqlx::test(migrations = false)]
async fn the_swap_refresh_keeps_grants_indexes_and_never_fails_a_reader(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 500).await;
    let ctx = common::ctx(&pool, "swap");
    assert_eq!(
        ctx.config.leaderboard.refresh_mode,
        loyaltyd::config::RefreshMode::Swap
    );
    let role = format!("forum_swap_{}", std::process::id());
    for sql in [
        format!("DROP ROLE IF EXISTS {role}"),
        format!("CREATE ROLE {role}"),
        format!("SELECT grant_forum_access('{role}')"),
        // The seed's readers query the view itself: an operator's grant.
        format!("GRANT SELECT ON user_leaderboard TO {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let indexes = || async {
        let v: Vec<String> = sqlx::query_scalar(
            "SELECT indexname::TEXT FROM pg_indexes WHERE tablename = 'user_leaderboard' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        v
    };
    let before = indexes().await;
    // Readers as the forum's role, reading the view the whole time.
    let stop = CancellationToken::new();
    let reader = {
        let (pool, stop, role) = (pool.clone(), stop.clone(), role.clone());
        tokio::spawn(async move {
            let (mut reads, mut worst) = (0u32, Duration::ZERO);
            while !stop.is_cancelled() {
                let mut tx = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
                sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
                    .execute(&mut *tx)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let started = Instant::now();
                let _: Option<i64> =
                    sqlx::query_scalar("SELECT rank FROM user_leaderboard WHERE user_id = 7")
                        .fetch_optional(&mut *tx)
                        .await
                        .unwrap_or_else(|e| panic!("a reader failed during a swap: {e}"));
                worst = worst.max(started.elapsed());
                tx.rollback().await.unwrap_or_else(|e| panic!("{e}"));
                reads += 1;
            }
            (reads, worst)
        })
    };
    for round in 0..5i64 {
        loyalty::record_event(
            &ctx,
            &common::event(7 + round, ContentType::Topic, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let report = common::refresh(&ctx).await;
        assert!(report.refreshed);
    }
    stop.cancel();
    let (reads, worst) = reader.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(reads > 5, "the reader ran ({reads} reads)");
    eprintln!("swap: {reads} reads, worst wait {worst:?}");
    assert_eq!(indexes().await, before, "the same indexes");
    // The view has the refreshed ranks, in the seed's order.
    let view: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT user_id, rank, can_create_topics FROM user_leaderboard ORDER BY rank",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let expected: Vec<(i64, i64, bool)> = truth(&pool)
        .await
        .into_iter()
        .map(|e| (e.0, e.2, e.3))
        .collect();
    assert_eq!(view, expected);
    // A view built on it cannot go with a swap: the refresh falls back to
    // CONCURRENTLY and still refreshes.
    sqlx::query("CREATE VIEW top_ten AS SELECT * FROM user_leaderboard WHERE rank <= 10")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loyalty::record_event(
        &ctx,
        &common::event(40, ContentType::Topic, Outcome::Approved),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let report = common::refresh(&ctx).await;
    assert!(report.refreshed);
    let in_view: Option<i64> = sqlx::query_scalar("SELECT rank FROM top_ten WHERE user_id = 40")
        .fetch_optional(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(in_view.is_some(), "the dependent view sees the refresh");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP VIEW top_ten; REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}; \
         REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {role}; \
         REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}; \
         REVOKE ALL ON SCHEMA public FROM {role}; DROP ROLE {role}"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[sqlx::test(migrations = false)]
async fn a_python_client_reads_exact_live_standing_through_the_function_library(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 120).await;
    let ctx = common::ctx(&pool, "live-python");
    // The SQL API says its ranks are the view's, and where live ones are.
    for function in [
        "loyalty_standing(bigint)",
        "leaderboard_page(bigint, bigint)",
    ] {
        let comment: Option<String> =
            sqlx::query_scalar("SELECT obj_description($1::REGPROCEDURE, 'pg_proc')")
                .bind(function)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        let comment = comment.unwrap_or_default();
        assert!(
            comment.contains("view as of its last refresh")
                && comment.contains("FCALL_RO loyaltyd_"),
            "{function}: {comment}"
        );
    }
    let board = loyaltyd::leaderboard::live::Board::new(&ctx.redis);
    common::live_board_after_writers(&ctx, &pool, 120, 60).await;
    let db = crate::adopt::database(&pool).await;
    let url = ctx.config.redis.url.expose().to_owned();
    let out = common::python_live_standing(&db, "single", &url, ctx.redis.prefix(), "exact");
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["users"], 120, "{out}");
    assert!(report["ranked"].as_i64().is_some_and(|n| n > 10), "{out}");
    // loyaltyd's own reads answer from the same functions.
    assert_exact(&ctx, &pool, "after both kinds of writers").await;
    // While the board is built again, a clear "not ready", never a rank.
    assert!(board.mark_ready(false).await);
    common::python_live_standing(&db, "single", &url, ctx.redis.prefix(), "not-ready");
    // Redis lost the library (a restart, FUNCTION FLUSH): loyaltyd's own
    // read loads it again; the daemon's check does it for other clients.
    assert!(board.mark_ready(true).await);
    common::flush_redis_functions().await;
    assert_eq!(
        leaderboard::rank(&ctx, uid(1)).await.map(|s| s.source).ok(),
        Some(Source::Live)
    );
    common::python_live_standing(&db, "single", &url, ctx.redis.prefix(), "exact");
}

/// The whole board's (user, name) as the board itself holds them (not
/// `leaderboard show`, which would fill a missing name from PostgreSQL),
/// against the database's names of the ranked users.
async fn assert_names(ctx: &Context, pool: &PgPool, what: &str) {
    let live = loyaltyd::leaderboard::live::Board::new(&ctx.redis);
    let mut board = Vec::new();
    loop {
        let (_, page) = live
            .page(board.len() as i64, 50)
            .await
            .unwrap_or_else(|| panic!("{what}: the board did not answer"));
        if page.is_empty() {
            break;
        }
        board.extend(page.into_iter().map(|e| (e.user.get(), e.name)));
    }
    board.sort();
    let want: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, username FROM users WHERE loyalty_score > 0 ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(board, want, "{what}: names on the board");
}

#[sqlx::test(migrations = false)]
async fn renames_by_every_path_reach_the_board_and_leave_the_sweep_nothing_to_repair(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 60).await;
    let ctx = common::ctx(&pool, "live-renames");
    for id in 1..=60 {
        loyalty::record_event(
            &ctx,
            &common::event(id, ContentType::Post, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    build(&ctx).await;
    // The cache sync is past every write so far: from here on it sees a row
    // only if something advanced its transaction.
    common::sync(&ctx).await;
    common::sync(&ctx).await;
    sqlx::query("UPDATE users SET username = 'one' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("UPDATE users SET username = 'many ' || id WHERE id BETWEEN 2 AND 20")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A rolled-back rename changes nothing.
    let before: i64 = sqlx::query_scalar("SELECT score_version FROM users WHERE id = 21")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut tx = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("UPDATE users SET username = 'ghost' WHERE id = 21")
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tx.rollback().await.unwrap_or_else(|e| panic!("{e}"));
    let after: i64 = sqlx::query_scalar("SELECT score_version FROM users WHERE id = 21")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(before, after, "a rolled-back rename changes nothing");
    // An UPDATE that sets the same name is no rename: no new version.
    let version = || async {
        sqlx::query_scalar::<_, i64>("SELECT score_version FROM users WHERE id = 22")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let unchanged = version().await;
    sqlx::query("UPDATE users SET username = username WHERE id = 22")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(version().await, unchanged, "the same name is no rename");
    // Renames and score writes of the same users at once, from many writers.
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40i64 {
                sqlx::query("UPDATE users SET username = $2 WHERE id = $1")
                    .bind(30 + (w * 7 + i) % 20)
                    .bind(format!("w{w}-{i}"))
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }));
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40usize {
                let user = 30 + (w * 3 + i as i64) % 20;
                loyalty::record_event(&ctx, &common::varied_event(user, w as usize * 1000 + i))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{e}"));
    }
    // A rename in the forum's own transaction beside a plain-SQL event for
    // the same user (the score trigger, then the rename's), an upsert that
    // renames (INSERT ... ON CONFLICT DO UPDATE), and, where the seed's code
    // still writes scores (legacy mode: the direct write is a credit its
    // event will consume), one statement that changes the score and the
    // name together.
    sqlx::raw_sql(
        "BEGIN;
         INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES (23, 'moderation_decision', 'topic', 'tx-23', 'approved');
         UPDATE users SET username = 'tx 23' WHERE id = 23;
         COMMIT;
         INSERT INTO users (id, username, created_at) VALUES (24, 'upserted 24', now())
         ON CONFLICT (id) DO UPDATE SET username = EXCLUDED.username;
         UPDATE loyaltyd_settings SET legacy_score_writes = true;
         UPDATE users SET loyalty_score = loyalty_score + 7, username = 'both 25' WHERE id = 25;
         UPDATE loyaltyd_settings SET legacy_score_writes = false;",
    )
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // New users COPYed in with their names, then scored: they join the
    // board with them.
    let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    let mut copy = conn
        .copy_in_raw("COPY users (id, username, created_at) FROM STDIN")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    copy.send(
        b"61\tcopied 61\t2024-03-01 00:00:00+00\n62\tcopied 62\t2024-03-02 00:00:00+00\n"
            .as_slice(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    copy.finish().await.unwrap_or_else(|e| panic!("{e}"));
    drop(conn);
    for id in [61, 62] {
        loyalty::record_event(
            &ctx,
            &common::event(id, ContentType::Topic, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    common::sync(&ctx).await;
    assert_names(&ctx, &pool, "after renames of every kind").await;
    assert_exact(&ctx, &pool, "after renames of every kind").await;
    let report = common::sweep(&ctx, 16).await;
    assert_eq!(
        (
            report.drifted_users,
            report.cache_repaired,
            report.board_repaired
        ),
        (0, 0, 0),
        "{report:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn ids_of_every_byte_length_and_names_of_any_bytes_keep_the_order_and_read_back(
    pool: PgPool,
) {
    common::migrate(&pool).await;
    // A member is the sign-up time, the id's length in bytes, the id and
    // the name: ids across every length boundary (and past 2^53, beyond
    // Lua's exact numbers), all signed up at the same moment and tied on
    // score, so that the id alone decides; names with spaces, multi-byte
    // characters, and longer than Redis's compact encoding takes.
    let ids: [i64; 15] = [
        1,
        99,
        100,
        255,
        256,
        65_535,
        65_536,
        1 << 24,
        (1 << 32) - 1,
        (1 << 40) + 7,
        (1 << 48) - 1,
        1 << 48,
        (1 << 53) + 1,
        i64::MAX - 1,
        i64::MAX,
    ];
    for (n, id) in ids.iter().enumerate() {
        let name = match n % 3 {
            0 => format!("u{id}"),
            1 => format!("名前 with spaces {id}"),
            _ => format!("{}-{id}", "long".repeat(20)),
        };
        sqlx::query(
            "INSERT INTO users (id, username, loyalty_score, score_version, created_at)
             VALUES ($1, $2, $3, 1, TIMESTAMPTZ '2024-01-01')",
        )
        .bind(id)
        .bind(name)
        .bind(if n % 4 == 0 { 7i64 } else { 5 })
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let ctx = common::ctx(&pool, "live-ids");
    assert_eq!(build(&ctx).await, ids.len() as u64);
    assert_exact(&ctx, &pool, "built").await;
    assert_names(&ctx, &pool, "built").await;
    // Writes that do not carry the name (record_event) keep the board's.
    for id in [ids[1], ids[12], ids[14]] {
        loyalty::record_event(
            &ctx,
            &common::event(id, ContentType::Post, Outcome::Approved),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_exact(&ctx, &pool, "after writes").await;
    assert_names(&ctx, &pool, "after writes").await;
    let report = common::sweep(&ctx, 4).await;
    assert_eq!(report.board_repaired, 0, "{report:?}");
    // A write from a loyaltyd of the previous layout (16-byte members: the
    // time and the id) during an upgrade is refused whole, not misread.
    let board = loyaltyd::leaderboard::live::Board::new(&ctx.redis);
    let mut old_member = (1_704_067_200_000_000i64 + (1 << 62))
        .to_be_bytes()
        .to_vec();
    old_member.extend_from_slice(&ids[2].to_be_bytes());
    let refused: redis::RedisResult<i64> = redis::cmd("FCALL")
        .arg(format!(
            "{}_set",
            loyaltyd::leaderboard::live::library_name(&ctx.config.redis.key_prefix)
        ))
        .arg(2)
        .arg(board.key())
        .arg(board.users_key())
        .arg(&[
            ids[0].to_string().into_bytes(),
            board_key(ids[0]),
            b"3".to_vec(),
            b"99".to_vec(),
            b"=x".to_vec(),
        ])
        .arg(&[
            ids[2].to_string().into_bytes(),
            old_member,
            b"9".to_vec(),
            b"99".to_vec(),
            b"=y".to_vec(),
        ])
        .query_async(&mut common::redis().await)
        .await;
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("another board layout"), "{err}");
    assert_exact(&ctx, &pool, "after a refused write").await;
    assert_names(&ctx, &pool, "after a refused write").await;
    // A stray (a member with a name no longer the user's) is taken off;
    // the member the user's bucket entry names is not.
    let member = |name: &str| {
        loyaltyd::leaderboard::live::live_member(uid(ids[0]), 1_704_067_200_000_000, name)
    };
    let _: i64 = redis::cmd("ZADD")
        .arg(board.key())
        .arg(-1)
        .arg(member("an old name"))
        .query_async(&mut common::redis().await)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let strays = [
        (uid(ids[0]), member("u1")),
        (uid(ids[0]), member("an old name")),
    ];
    assert_eq!(board.remove_strays(&strays).await, Some(1));
    assert_exact(&ctx, &pool, "after the strays").await;
    assert_names(&ctx, &pool, "after the strays").await;
}

/// A user's key (the member without the name) as loyaltyd writes it.
fn board_key(id: i64) -> Vec<u8> {
    loyaltyd::leaderboard::live::live_key(uid(id), 1_704_067_200_000_000)
}

/// Two deployments on one Redis (production and staging: two key prefixes)
/// each load and call a library of their own; and during an upgrade, the
/// older loyaltyd of a deployment never replaces the newer one's library.
#[sqlx::test(migrations = false)]
async fn deployments_sharing_a_redis_keep_their_own_libraries_and_versions(pool: PgPool) {
    use loyaltyd::leaderboard::live::{Board, library_name};
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    let (a, b) = (common::ctx(&pool, "prod"), common::ctx(&pool, "staging"));
    let (board_a, board_b) = (Board::new(&a.redis), Board::new(&b.redis));
    let (name_a, name_b) = (
        library_name(&a.config.redis.key_prefix),
        library_name(&b.config.redis.key_prefix),
    );
    assert_ne!(name_a, name_b);
    assert_eq!(library_name(""), "loyaltyd");
    assert_eq!(library_name("staging:"), "loyaltyd_staging");
    for (board, ctx) in [(&board_a, &a), (&board_b, &b)] {
        assert!(board.ensure_library(true).await);
        build(ctx).await;
    }
    loyalty::record_event(&a, &common::event(1, ContentType::Topic, Outcome::Approved))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loyalty::record_event(&b, &common::event(2, ContentType::Post, Outcome::Approved))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Each answers from its own functions on its own keys, after the other
    // loaded its library (replacing nothing of the first's).
    let mut c = common::redis().await;
    for (name, board, ranked_user) in [(&name_a, &board_a, 1), (&name_b, &board_b, 2)] {
        let reply: Vec<redis::Value> = redis::cmd("FCALL_RO")
            .arg(format!("{name}_rank"))
            .arg(2)
            .arg(board.key())
            .arg(board.users_key())
            .arg(ranked_user)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            reply.first(),
            Some(&redis::Value::Int(1)),
            "{name}: {reply:?}"
        );
    }
    // A newer loyaltyd of deployment a loaded its library (version 99): a's
    // own start replaces it not; an older one it does replace.
    let code = |version: u32| {
        include_str!("../../src/leaderboard/live.lua")
            .replacen("#!lua name=loyaltyd", &format!("#!lua name={name_a}"), 1)
            .replace("'loyaltyd_", &format!("'{name_a}_"))
            .replace("library version 4", &format!("library version {version}"))
    };
    for (version, kept) in [(99, true), (1, false)] {
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(code(version))
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(board_a.ensure_library(true).await);
        let listed: redis::Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(&name_a)
            .arg("WITHCODE")
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let text = format!("{listed:?}");
        assert_eq!(
            text.contains(&format!("library version {version}")),
            kept,
            "version {version}: {text}"
        );
    }
}
