//! The leaderboard at 1 M users (10 M with `--large`): the live board against
//! the view and against ranking on the fly; what keeping the live board adds
//! to `record_event`; and each refresh mode's time, WAL and the worst wait of
//! a reader running beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loyaltyd::config::RefreshMode;
use loyaltyd::context::Context;
use loyaltyd::{leaderboard, loyalty};
use tokio_util::sync::CancellationToken;

use super::cases::{Rng, event, uid};
use super::{Bench, Report, Side, seed, timed};

type R<T> = Result<T, String>;

/// Every leaderboard case with `target` ranked users.
pub async fn board(b: &Bench, report: &mut Report, target: i64) -> R<()> {
    let ranked = top_up(b, target).await?;
    let max_id: i64 = sqlx::query_scalar("SELECT max(id) FROM users")
        .fetch_one(&b.pool)
        .await
        .map_err(|e| e.to_string())?;
    let context = |live: bool, mode: RefreshMode| {
        let mut config = b.config.clone();
        config.leaderboard.live = live;
        config.leaderboard.refresh_mode = mode;
        Context::with_pool(config, b.pool.clone(), false).map_err(|e| e.to_string())
    };
    let live = context(true, RefreshMode::Swap)?;
    let view = context(false, RefreshMode::Swap)?;
    let concurrently = context(false, RefreshMode::Concurrently)?;
    let group = format!("Leaderboard ({ranked} ranked users)");

    let memory_before = redis_memory(b).await;
    let (written, build) = timed(loyaltyd::leaderboard::live::build(&live)).await?;
    let memory = redis_memory(b).await.saturating_sub(memory_before);
    let bytes = board_bytes(b, &live).await?;
    report.case(
        &group,
        "build the live board from PostgreSQL (daemon start, Redis lost)",
        vec![Side::new("loyaltyd", &[build]).note(format!(
            "{written} users; Redis memory +{} MB; MEMORY USAGE of the board's keys {:.0} bytes per ranked user, names included",
            memory / 1_000_000,
            bytes as f64 / written.max(1) as f64
        ))],
    );
    leaderboard::refresh(&view, true, &CancellationToken::new())
        .await
        .map_err(|e| e.to_string())?;

    reads(b, report, &group, (&live, &view), ranked, max_id).await?;
    writes(b, report, &group, (&live, &view), max_id).await?;
    refreshes(b, report, &group, (&live, &concurrently), max_id).await?;
    Ok(())
}

/// Ranked users (score > 0) added up to `target`, scores set directly (the
/// sweep case is over), sign-ups spread over 100k minutes: many ties.
async fn top_up(b: &Bench, target: i64) -> R<i64> {
    eprintln!("bench: topping up to {target} ranked users");
    sqlx::query(
        "INSERT INTO users (id, username, loyalty_score, score_version, created_at)
         SELECT m.id + g, 'filler_' || (m.id + g), 1 + (g * 7919) % 20000, 1,
                now() - (g % 100000) * INTERVAL '1 minute'
         FROM (SELECT COALESCE(max(id), 0) AS id FROM users) m,
              generate_series(1, GREATEST(0, $1 - (SELECT count(*) FROM users WHERE loyalty_score > 0))) g",
    )
    .bind(target)
    .execute(&b.pool)
    .await
    .map_err(|e| e.to_string())?;
    sqlx::query("VACUUM ANALYZE users")
        .execute(&b.pool)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query_scalar("SELECT count(*) FROM users WHERE loyalty_score > 0")
        .fetch_one(&b.pool)
        .await
        .map_err(|e| e.to_string())
}

/// Redis's own `MEMORY USAGE` (every element counted) summed over the live
/// board's keys: the sorted set, the base hash and every bucket.
async fn board_bytes(b: &Bench, live: &Context) -> R<u64> {
    let board = loyaltyd::leaderboard::live::Board::new(&live.redis);
    let mut r = b.redis.clone();
    // MEMORY USAGE counting every member of a set of 10 M takes seconds:
    // past redis-rs's default response timeout (500 ms).
    r.set_response_timeout(Duration::from_secs(300));
    let mut keys = vec![board.key(), board.users_key()];
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}:*", board.users_key()))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut r)
            .await
            .map_err(|e| e.to_string())?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut total = 0u64;
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(&mut r).await.map_err(|e| e.to_string())?;
        total += sizes.into_iter().flatten().sum::<u64>();
    }
    Ok(total)
}

/// Redis's `used_memory`, in bytes.
async fn redis_memory(b: &Bench) -> u64 {
    let mut r = b.redis.clone();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut r)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Ranks and pages: live board, view, on the fly (sampled: seconds a call).
async fn reads(
    b: &Bench,
    report: &mut Report,
    group: &str,
    (live, view): (&Context, &Context),
    ranked: i64,
    max_id: i64,
) -> R<()> {
    let s = &b.sizes;
    let mut rng = Rng(0x2468_ace0_1357_9bdf);
    let mut t: [Vec<Duration>; 6] = Default::default();
    let on_the_fly = if ranked > 2_000_000 { 3 } else { 10 };
    let every = (s.iterations / on_the_fly).max(1);
    for i in 0..s.iterations {
        let offset = rng.below((ranked - 100).max(1) as u64) as i64;
        let user = uid(1 + rng.below(max_id as u64) as i64)?;
        // Alternate which side goes first.
        let (first, second) = if i % 2 == 0 {
            (live, view)
        } else {
            (view, live)
        };
        let a = timed(leaderboard::rank(first, user)).await?;
        let c = timed(leaderboard::rank(second, user)).await?;
        let (live_rank, view_rank) = if i % 2 == 0 { (a, c) } else { (c, a) };
        if live_rank.0.source != leaderboard::Source::Live {
            return Err("the live board did not answer".into());
        }
        t[0].push(live_rank.1);
        t[1].push(view_rank.1);
        t[3].push(timed(leaderboard::page(live, 100, offset)).await?.1);
        t[4].push(timed(leaderboard::page(view, 100, offset)).await?.1);
        if i % every == 0 {
            t[2].push(timed(seed::rank_without_view(&b.pool, user.get())).await?.1);
            t[5].push(
                timed(seed::page_without_view(&b.pool, 100, offset))
                    .await?
                    .1,
            );
        }
    }
    report.case(
        group,
        "one user's rank",
        vec![
            Side::new("loyaltyd", &t[0]).note("live board: exact, committed scores"),
            Side::new("the view (leaderboard.live = false)", &t[1]).note("as of the last refresh"),
            Side::new("plain: rank on the fly, no view", &t[2]),
        ],
    );
    report.case(
        group,
        "a page of 100 at a random offset",
        vec![
            Side::new("loyaltyd", &t[3]).note("live board, names included: one Redis call"),
            Side::new("the view (leaderboard.live = false)", &t[4]),
            Side::new("plain: rank on the fly, no view", &t[5]),
        ],
    );
    Ok(())
}

/// `record_event` with the live board kept and without, alternating.
async fn writes(
    b: &Bench,
    report: &mut Report,
    group: &str,
    (live, view): (&Context, &Context),
    max_id: i64,
) -> R<()> {
    let mut rng = Rng(0x0bad_cafe_dead_beef);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..b.sizes.iterations {
        let e = event(1 + rng.below(max_id as u64) as i64, i)?;
        if i % 2 == 0 {
            with.push(timed(loyalty::record_event(live, &e)).await?.1);
        } else {
            without.push(timed(loyalty::record_event(view, &e)).await?.1);
        }
    }
    report.case(
        group,
        "record_event (what keeping the live board costs a write)",
        vec![
            Side::new("loyaltyd", &with).note("score cache + live board, one pipeline"),
            Side::new("loyaltyd with leaderboard.live = false", &without),
        ],
    );
    contention(b, report, group, (live, view), max_id).await
}

/// 16 writers at once, with the live board kept and without, in alternating
/// rounds: every write lands in the one sorted set, so this is where keeping
/// it would contend, if anywhere.
async fn contention(
    b: &Bench,
    report: &mut Report,
    group: &str,
    (live, view): (&Context, &Context),
    max_id: i64,
) -> R<()> {
    let s = &b.sizes;
    let mut all: [(Vec<Duration>, Duration); 2] = Default::default();
    for round in 0..s.rounds.max(2) {
        for k in 0..2 {
            let side = (round + k) % 2;
            let ctx = if side == 0 { live } else { view };
            let started = Instant::now();
            let mut tasks = Vec::new();
            for client in 0..16u64 {
                let (ctx, ops) = (ctx.clone(), s.concurrent_ops);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0x7777_0000 + client * 104_729 + round as u64);
                    let mut lat = Vec::with_capacity(ops);
                    for i in 0..ops {
                        let e = event(1 + rng.below(max_id as u64) as i64, i)?;
                        lat.push(timed(loyalty::record_event(&ctx, &e)).await?.1);
                    }
                    Ok::<_, String>(lat)
                }));
            }
            for t in tasks {
                all[side].0.extend(t.await.map_err(|e| e.to_string())??);
            }
            all[side].1 += started.elapsed();
        }
    }
    let rate = |(lat, wall): &(Vec<Duration>, Duration)| lat.len() as f64 / wall.as_secs_f64();
    report.case(
        group,
        "record_event, 16 writers at once",
        vec![
            Side::new("loyaltyd", &all[0].0)
                .rate(rate(&all[0]))
                .note("live board kept"),
            Side::new("loyaltyd with leaderboard.live = false", &all[1].0).rate(rate(&all[1])),
        ],
    );
    Ok(())
}

/// Each refresh mode after ten changes: time, WAL written, and the worst
/// wait of a reader querying the view throughout.
async fn refreshes(
    b: &Bench,
    report: &mut Report,
    group: &str,
    (swap, concurrently): (&Context, &Context),
    max_id: i64,
) -> R<()> {
    let rounds = if max_id > 2_000_000 {
        1
    } else {
        b.sizes.rounds.max(2)
    };
    let mut rng = Rng(0x1111_2222_3333_4444);
    let mut took: [Vec<Duration>; 3] = Default::default();
    let mut waits: [Vec<Duration>; 3] = Default::default();
    let mut wal: [Vec<f64>; 3] = Default::default();
    let never = CancellationToken::new();
    for round in 0..rounds {
        for k in 0..3 {
            let side = (round + k) % 3;
            for _ in 0..10 {
                let user = 1 + rng.below(max_id as u64) as i64;
                loyalty::record_event(swap, &event(user, round)?).await.ok();
            }
            let before = wal_lsn(b).await?;
            let stop = Arc::new(AtomicBool::new(false));
            let reader = tokio::spawn(reader(b.pool.clone(), stop.clone(), max_id));
            let t = match side {
                0 => timed(leaderboard::refresh(swap, true, &never)).await?.1,
                1 => {
                    timed(leaderboard::refresh(concurrently, true, &never))
                        .await?
                        .1
                }
                _ => {
                    timed(
                        sqlx::query("REFRESH MATERIALIZED VIEW user_leaderboard").execute(&b.pool),
                    )
                    .await?
                    .1
                }
            };
            stop.store(true, Ordering::Relaxed);
            let worst = reader.await.map_err(|e| e.to_string())??;
            let bytes = wal_bytes_since(b, &before).await?;
            took[side].push(t);
            waits[side].push(worst);
            wal[side].push(bytes);
        }
    }
    let mb = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0) / 1e6
    };
    report.case(
        group,
        "refresh the view after 10 changes",
        vec![
            Side::new("loyaltyd", &took[0]).note(format!(
                "swap (default): shadow view, renamed in; WAL {:.0} MB",
                mb(&wal[0])
            )),
            Side::new("loyaltyd, refresh_mode = concurrently", &took[1]).note(format!(
                "the seed's CONCURRENTLY; WAL {:.0} MB",
                mb(&wal[1])
            )),
            Side::new("plain REFRESH (blocks readers)", &took[2])
                .note(format!("WAL {:.0} MB", mb(&wal[2]))),
        ],
    );
    report.case(
        group,
        "a reader's worst wait during one refresh",
        vec![
            Side::new("loyaltyd", &waits[0]).note("swap"),
            Side::new("loyaltyd, refresh_mode = concurrently", &waits[1]),
            Side::new("plain REFRESH (blocks readers)", &waits[2]),
        ],
    );
    Ok(())
}

/// Reads one rank from the view in a loop until `stop`; the longest read.
async fn reader(pool: sqlx::PgPool, stop: Arc<AtomicBool>, max_id: i64) -> R<Duration> {
    let mut rng = Rng(0x5555_6666_7777_8888);
    let mut worst = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let _: Option<i64> =
            sqlx::query_scalar("SELECT rank FROM user_leaderboard WHERE user_id = $1")
                .bind(1 + rng.below(max_id as u64) as i64)
                .fetch_optional(&pool)
                .await
                .map_err(|e| format!("a reader during a refresh: {e}"))?;
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(worst)
}

async fn wal_lsn(b: &Bench) -> R<String> {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::TEXT")
        .fetch_one(&b.pool)
        .await
        .map_err(|e| e.to_string())
}

async fn wal_bytes_since(b: &Bench, before: &str) -> R<f64> {
    sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::FLOAT8")
        .bind(before)
        .fetch_one(&b.pool)
        .await
        .map_err(|e| e.to_string())
}
