//! The benchmark cases. Every case runs its sides in turn, operation by
//! operation (or round by round), starting with a different side each time,
//! so that a slow moment of the machine hits every side alike.

use std::time::{Duration, Instant};

use loyaltyd::loyalty::{self, NewEvent};
use loyaltyd::queues;
use loyaltyd::types::{ContentType, Ident, Outcome, Priority, QueueKind, Scope, UserId};
use tokio_util::sync::CancellationToken;

use super::{Bench, Report, Side, seed, timed};

type R<T> = Result<T, String>;

/// A small deterministic random generator (xorshift), so runs are comparable.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn ident(s: &str) -> R<Ident> {
    Ident::parse("bench", s).map_err(|e| e.to_string())
}

pub(super) fn uid(id: i64) -> R<UserId> {
    UserId::new(id).map_err(|e| e.to_string())
}

const KINDS: [(ContentType, &str); 3] = [
    (ContentType::Post, "post"),
    (ContentType::Topic, "topic"),
    (ContentType::PrivateMessage, "private_message"),
];
const OUTCOMES: [(Outcome, &str); 3] = [
    (Outcome::Approved, "approved"),
    (Outcome::Rejected, "rejected"),
    (Outcome::Calibrated, "calibrated"),
];

pub(super) fn event(user: i64, n: usize) -> R<NewEvent> {
    Ok(NewEvent {
        user: uid(user)?,
        event_type: ident("moderation_decision")?,
        content_type: KINDS[n % 3].0,
        content_id: ident("bench")?,
        outcome: OUTCOMES[(n / 3) % 3].0,
        event_id: None,
    })
}

/// Every case, in an order that lets later ones reshape the data.
pub async fn all(b: &Bench, report: &mut Report) -> R<()> {
    let s = &b.sizes;
    eprintln!("bench: seeding {} users and {} events", s.users, s.events);
    loyaltyd::demo::seed(&b.quiet, s.users, s.events, 0, false)
        .await
        .map_err(|e| e.to_string())?;
    let heavy = heavy_user(b).await?;
    if b.wants("event recording") {
        events(b, report, heavy).await?;
        batches(b, report).await?;
        concurrent(b, report).await?;
    }
    if b.wants("telemetry") {
        telemetry_overhead(b, report).await?;
    }
    if b.wants("past one host") {
        super::scale::scale(b, report).await?;
    }
    let (users, events) = s.sweep[0];
    if b.wants("integrity sweep") {
        sweep(b, report, users, events).await?;
    }
    if b.wants("leaderboard") {
        for &n in &s.board {
            super::board::board(b, report, n).await?;
        }
    }
    if b.wants("queues") {
        for &n in &s.queue_sizes {
            queues_at(b, report, n).await?;
        }
    }
    if b.wants("adoption") {
        for &(users, events) in &s.adoption {
            super::adoption::adoption(b, report, users, events).await?;
        }
    }
    // The larger sweeps (--large) reseed from scratch: they come last.
    let larger = if b.wants("integrity sweep") {
        &s.sweep[1..]
    } else {
        &[]
    };
    for &(users, events) in larger {
        eprintln!("bench: reseeding {users} users and {events} events");
        sqlx::query("TRUNCATE moderation_events, users CASCADE")
            .execute(&b.pool)
            .await
            .map_err(|e| e.to_string())?;
        loyaltyd::demo::seed(&b.quiet, users, events, 0, false)
            .await
            .map_err(|e| e.to_string())?;
        sweep(b, report, users, events).await?;
    }
    Ok(())
}

/// A user with `heavy_events` events (the seed's recalculation scales with them).
async fn heavy_user(b: &Bench) -> R<i64> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO users (id, username) SELECT max(id) + 1, 'heavy' FROM users RETURNING id",
    )
    .fetch_one(&b.pool)
    .await
    .map_err(|e| e.to_string())?;
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         SELECT $1, 'moderation_decision', (ARRAY['post','topic','private_message'])[1 + g % 3], 'h' || g,
                (ARRAY['approved','approved','rejected','calibrated'])[1 + g % 4]
         FROM generate_series(1, $2) g",
    )
    .bind(id)
    .bind(b.sizes.heavy_events)
    .execute(&b.pool)
    .await
    .map_err(|e| e.to_string())?;
    sqlx::query("UPDATE users SET loyalty_score = (SELECT SUM(score_delta) FROM moderation_events WHERE user_id = $1), score_version = score_version + 1 WHERE id = $1")
        .bind(id)
        .execute(&b.pool)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query("VACUUM ANALYZE moderation_events")
        .execute(&b.pool)
        .await
        .map_err(|e| e.to_string())?;
    Ok(id)
}

/// Recording one event: loyaltyd, the seed's statements, the seed's "before", the floor.
async fn events(b: &Bench, report: &mut Report, heavy: i64) -> R<()> {
    let s = &b.sizes;
    let prefix = b.config.redis.key_prefix.clone();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); 9];
    let mut redis = b.redis.clone();
    for i in 0..s.iterations {
        let user = 1 + rng.below(s.users as u64) as i64;
        let (kind, outcome) = (KINDS[i % 3].1, OUTCOMES[(i / 3) % 3].1);
        for k in 0..9 {
            let side = (i + k) % 9;
            let took = match side {
                0 => {
                    timed(loyalty::record_event(&b.ctx, &event(user, i)?))
                        .await?
                        .1
                }
                1 => {
                    timed(seed::record_event(
                        &b.pool, &mut redis, &prefix, user, kind, outcome,
                    ))
                    .await?
                    .1
                }
                2 => {
                    timed(seed::record_event_full_recalc(
                        &b.pool, &mut redis, &prefix, user, kind, outcome,
                    ))
                    .await?
                    .1
                }
                3 => {
                    timed(seed::record_event_full_recalc(
                        &b.pool, &mut redis, &prefix, heavy, kind, outcome,
                    ))
                    .await?
                    .1
                }
                4 => {
                    timed(
                        sqlx::query("UPDATE users SET updated_at = now() WHERE id = $1")
                            .bind(user)
                            .execute(&b.pool),
                    )
                    .await?
                    .1
                }
                5 => timed(bare_insert(&b.pool, user)).await?.1,
                6 => timed(sqlx::query("SELECT 1").execute(&b.pool)).await?.1,
                8 => timed(hand_written(&b.pool, user)).await?.1,
                _ => timed(plain_insert(&b.pool, user, i)).await?.1,
            };
            samples[side].push(took);
        }
    }
    let heavy_label = format!(
        "seed: full recalculation per event, user with {} events",
        s.heavy_events
    );
    report.case(
        "Event recording (1 client)",
        "record one event",
        vec![
            Side::new("loyaltyd", &samples[0]).note("record_moderation_event + cache write"),
            Side::new("plain SQL: INSERT (the trigger scores it)", &samples[7]),
            Side::new("seed: UPDATE, SET, INSERT", &samples[1]),
            Side::new(
                "seed: full recalculation per event, typical user",
                &samples[2],
            ),
            Side::new(&heavy_label, &samples[3]),
            Side::new("hand-written: one CTE, no trigger", &samples[8])
                .note("INSERT + score UPDATE + pending count"),
            Side::new("floor: single-row UPDATE", &samples[4]),
            Side::new("floor: the audit row's INSERT alone", &samples[5]),
            Side::new("floor: SELECT 1", &samples[6]),
        ],
    );
    Ok(())
}

/// A forum's own write: one plain INSERT of an event, no loyaltyd code (the
/// trigger scores it; the daemon's cache sync brings it to Redis).
async fn plain_insert(pool: &sqlx::PgPool, user: i64, i: usize) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES ($1, 'moderation_decision', $2, 'bench', $3)",
    )
    .bind(user)
    .bind(KINDS[i % 3].1)
    .bind(OUTCOMES[(i / 3) % 3].1)
    .execute(pool)
    .await
    .map(|_| ())
}

/// What any design pays for the audit row: one insert into the events table
/// and its indexes (a calibration: no score change, so no trigger work).
async fn bare_insert(pool: &sqlx::PgPool, user: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
         VALUES ($1, 'moderation_decision', 'post', 'bench', 'calibrated')",
    )
    .bind(user)
    .execute(pool)
    .await
    .map(|_| ())
}

/// The same work as a scored event, written by hand as one statement with
/// no trigger doing it: the audit row (a calibration, which the scoring
/// trigger skips), the user's score row rewritten with a new version (a
/// delta of 0 keeps the bench's scores equal to their events) and one
/// pending change on the backend's row. What a forum could write itself.
async fn hand_written(pool: &sqlx::PgPool, user: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH e AS (
             INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
             VALUES ($1, 'moderation_decision', 'post', 'bench', 'calibrated') RETURNING user_id
         ), s AS (
             UPDATE users u SET loyalty_score = u.loyalty_score + 0, score_version = next_score_version(u.score_version),
                                score_xid = pg_current_xact_id(), updated_at = now()
             FROM e WHERE u.id = e.user_id
         )
         INSERT INTO leaderboard_pending AS p (shard, changes) VALUES (pg_backend_pid(), 1)
         ON CONFLICT (shard) DO UPDATE SET changes = p.changes + 1",
    )
    .bind(user)
    .execute(pool)
    .await
    .map(|_| ())
}

/// Bulk ingestion: batches of 500 events.
async fn batches(b: &Bench, report: &mut Report) -> R<()> {
    let s = &b.sizes;
    let prefix = b.config.redis.key_prefix.clone();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut redis = b.redis.clone();
    let (mut ours, mut theirs, mut plain, mut copied) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..s.batches {
        let batch: Vec<NewEvent> = (0..500)
            .map(|i| event(1 + rng.below(s.users as u64) as i64, i))
            .collect::<R<_>>()?;
        for side in (0..4).map(|k| (round + k) % 4) {
            if side == 3 {
                copied.push(timed(copy_batch(&b.pool, &batch)).await?.1);
            } else if side == 0 {
                ours.push(timed(loyalty::record_events(&b.ctx, &batch)).await?.1);
            } else if side == 2 {
                let users: Vec<i64> = batch.iter().map(|e| e.user.get()).collect();
                let kinds: Vec<&str> = (0..500).map(|i| KINDS[i % 3].1).collect();
                let outcomes: Vec<&str> = (0..500).map(|i| OUTCOMES[(i / 3) % 3].1).collect();
                let insert = sqlx::query(
                    "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                     SELECT u, 'moderation_decision', k, 'bench', o FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[]) AS t(u, k, o)",
                )
                .bind(&users)
                .bind(&kinds)
                .bind(&outcomes)
                .execute(&b.pool);
                plain.push(timed(insert).await?.1);
            } else {
                let start = Instant::now();
                for (i, e) in batch.iter().enumerate() {
                    let (kind, outcome) = (KINDS[i % 3].1, OUTCOMES[(i / 3) % 3].1);
                    seed::record_event(&b.pool, &mut redis, &prefix, e.user.get(), kind, outcome)
                        .await?;
                }
                theirs.push(start.elapsed());
            }
        }
    }
    let rate = |v: &[Duration]| 500.0 / (super::Stats::of(v).p50 / 1000.0);
    report.case(
        "Event recording (bulk)",
        "a batch of 500 events",
        vec![
            Side::new("loyaltyd", &ours)
                .rate(rate(&ours))
                .note("record_moderation_events: one INSERT"),
            Side::new("plain SQL: one 500-row INSERT", &plain).rate(rate(&plain)),
            Side::new("plain SQL: COPY of 500 rows", &copied).rate(rate(&copied)),
            Side::new("seed: 500 × (UPDATE, SET, INSERT)", &theirs).rate(rate(&theirs)),
        ],
    );
    Ok(())
}

/// A forum's bulk load: the batch as one `COPY ... FROM STDIN` (the
/// statement trigger scores it).
async fn copy_batch(pool: &sqlx::PgPool, batch: &[NewEvent]) -> Result<(), sqlx::Error> {
    let mut data = String::with_capacity(batch.len() * 48);
    for e in batch {
        data.push_str(&format!(
            "{}\tmoderation_decision\t{}\tbench\t{}\n",
            e.user.get(),
            e.content_type.as_str(),
            e.outcome.as_str()
        ));
    }
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY moderation_events (user_id, event_type, content_type, content_id, outcome) FROM STDIN",
        )
        .await?;
    copy.send(data.into_bytes()).await?;
    copy.finish().await.map(|_| ())
}

/// 16 concurrent clients, round by round per side.
async fn concurrent(b: &Bench, report: &mut Report) -> R<()> {
    let s = b.sizes.clone();
    let mut all: Vec<(Vec<Duration>, Duration)> = vec![(Vec::new(), Duration::ZERO); 6];
    for round in 0..s.rounds {
        for k in 0..6 {
            let side = (round + k) % 6;
            let start = Instant::now();
            let mut tasks = Vec::new();
            for client in 0..16u64 {
                let (ctx, pool, mut redis, prefix) = (
                    b.ctx.clone(),
                    b.pool.clone(),
                    b.redis.clone(),
                    b.config.redis.key_prefix.clone(),
                );
                let (ops, users) = (s.concurrent_ops, s.users as u64);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0xabcd_ef01 + client * 7919 + round as u64);
                    let mut lat = Vec::with_capacity(ops);
                    for i in 0..ops {
                        let user = 1 + rng.below(users) as i64;
                        let took = match side {
                            0 => {
                                timed(loyalty::record_event(&ctx, &event(user, i)?))
                                    .await?
                                    .1
                            }
                            1 => {
                                let (kind, outcome) = (KINDS[i % 3].1, OUTCOMES[(i / 3) % 3].1);
                                timed(seed::record_event(
                                    &pool, &mut redis, &prefix, user, kind, outcome,
                                ))
                                .await?
                                .1
                            }
                            3 => timed(plain_insert(&pool, user, i)).await?.1,
                            4 => timed(bare_insert(&pool, user)).await?.1,
                            5 => timed(hand_written(&pool, user)).await?.1,
                            _ => {
                                timed(
                                    sqlx::query(
                                        "UPDATE users SET updated_at = now() WHERE id = $1",
                                    )
                                    .bind(user)
                                    .execute(&pool),
                                )
                                .await?
                                .1
                            }
                        };
                        lat.push(took);
                    }
                    Ok::<_, String>(lat)
                }));
            }
            for t in tasks {
                all[side].0.extend(t.await.map_err(|e| e.to_string())??);
            }
            all[side].1 += start.elapsed();
        }
    }
    let rate = |(lat, wall): &(Vec<Duration>, Duration)| lat.len() as f64 / wall.as_secs_f64();
    report.case(
        "Event recording (16 concurrent clients)",
        "record one event",
        vec![
            Side::new("loyaltyd", &all[0].0).rate(rate(&all[0])),
            Side::new("plain SQL: INSERT", &all[3].0).rate(rate(&all[3])),
            Side::new("seed: UPDATE, SET, INSERT", &all[1].0).rate(rate(&all[1])),
            Side::new("hand-written: one CTE, no trigger", &all[5].0)
                .rate(rate(&all[5]))
                .note("INSERT + score UPDATE + pending count"),
            Side::new("floor: single-row UPDATE", &all[2].0).rate(rate(&all[2])),
            Side::new("floor: the audit row's INSERT alone", &all[4].0).rate(rate(&all[4])),
        ],
    );
    Ok(())
}

/// record_event with telemetry on and off, and with the seed's synchronous perf lists.
async fn telemetry_overhead(b: &Bench, report: &mut Report) -> R<()> {
    let s = &b.sizes;
    let mut rng = Rng(0x5555_aaaa_1234_4321);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    let mut redis = b.redis.clone();
    let key = format!("{}seed:perf:loyalty_updates", b.config.redis.key_prefix);
    for i in 0..s.iterations {
        let user = 1 + rng.below(s.users as u64) as i64;
        for k in 0..3 {
            let side = (i + k) % 3;
            let took = match side {
                0 => {
                    b.switch.store(true, std::sync::atomic::Ordering::Relaxed);
                    timed(loyalty::record_event(&b.ctx, &event(user, i)?))
                        .await?
                        .1
                }
                1 => {
                    b.switch.store(false, std::sync::atomic::Ordering::Relaxed);
                    timed(loyalty::record_event(&b.quiet, &event(user, i)?))
                        .await?
                        .1
                }
                _ => {
                    b.switch.store(false, std::sync::atomic::Ordering::Relaxed);
                    let start = Instant::now();
                    loyalty::record_event(&b.quiet, &event(user, i)?)
                        .await
                        .map_err(|e| e.to_string())?;
                    seed::track(&mut redis, &key, start.elapsed().as_secs_f64() * 1000.0).await?;
                    start.elapsed()
                }
            };
            samples[side].push(took);
        }
    }
    b.switch.store(true, std::sync::atomic::Ordering::Relaxed);
    report.case(
        "Telemetry overhead",
        "record one event",
        vec![
            Side::new("loyaltyd", &samples[0]).note("histogram + perf list off the path"),
            Side::new("loyaltyd, telemetry off", &samples[1]),
            Side::new(
                "loyaltyd + the seed's synchronous LPUSH, LTRIM",
                &samples[2],
            ),
        ],
    );
    Ok(())
}

/// The integrity sweep: sweep::run, the seed's per-user loop (sampled), one plain aggregate.
async fn sweep(b: &Bench, report: &mut Report, users: i64, events: i64) -> R<()> {
    let s = &b.sizes;
    let never = CancellationToken::new();
    let aggregate = || {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT user_id, SUM(score_delta)::BIGINT FROM moderation_events GROUP BY user_id",
        )
        .fetch_all(&b.pool)
    };
    aggregate().await.map_err(|e| e.to_string())?; // warm the cache for both
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    for round in 0..s.rounds {
        for k in 0..2 {
            if (round + k) % 2 == 0 {
                let (r, took) = timed(loyaltyd::sweep::run(
                    &b.ctx,
                    b.config.sweep.batch_size,
                    &never,
                ))
                .await?;
                if r.users_checked < users as u64 {
                    return Err(format!(
                        "the sweep checked {} of {users} users",
                        r.users_checked
                    ));
                }
                ours.push(took);
            } else {
                plain.push(timed(aggregate()).await?.1);
            }
        }
    }
    // The seed's loop: one recalculation per user. Sampled and extrapolated.
    let mut rng = Rng(0x7777_1111_2222_3333);
    let mut redis = b.redis.clone();
    let sample = s.seed_loop_sample.min(users);
    let start = Instant::now();
    for _ in 0..sample {
        let user = 1 + rng.below(users as u64) as i64;
        seed::recalc_user(&b.pool, &mut redis, &b.config.redis.key_prefix, user).await?;
    }
    let per_user = start.elapsed() / sample as u32;
    let extrapolated = per_user * users as u32;
    report.case(
        &format!("Integrity sweep ({users} users, {events} events)"),
        "every score against its events",
        vec![
            Side::new("loyaltyd", &ours)
                .rate(users as f64 / super::Stats::of(&ours).p50 * 1000.0)
                .note("the sweep, batches of 10,000"),
            Side::new("seed: one recalculation per user", &[extrapolated])
                .rate(1.0 / per_user.as_secs_f64())
                .note(format!("sampled {sample} users, extrapolated to {users}")),
            Side::new("floor: one plain aggregate over the events", &plain),
        ],
    );
    Ok(())
}

/// Queue operations at `n` items: loyaltyd's topic queue against the seed's.
async fn queues_at(b: &Bench, report: &mut Report, n: i64) -> R<()> {
    let s = &b.sizes;
    let e = |err: sqlx::Error| err.to_string();
    sqlx::raw_sql(seed::CREATE_QUEUE)
        .execute(&b.pool)
        .await
        .map_err(e)?;
    sqlx::query("TRUNCATE topic_creation_queue, seed_topic_creation_queue")
        .execute(&b.pool)
        .await
        .map_err(e)?;
    // The same n items in both, priorities with ties, oldest first. A plain
    // INSERT: the queue's triggers key and count the items (and the TRUNCATE
    // above cleared the topic queue's bookkeeping).
    sqlx::query(
        "INSERT INTO topic_creation_queue (topic_id, priority_score, entered_queue_at)
         SELECT 'q-' || g, (g * 37) % 200 / 2.0, now() - ($1 - g) * INTERVAL '1 ms' FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&b.pool)
    .await
    .map_err(e)?;
    sqlx::query(
        "INSERT INTO seed_topic_creation_queue (topic_id, position_in_queue, priority_score, entered_queue_at)
         SELECT 'q-' || g, g, (g * 37) % 200 / 2.0, now() - ($1 - g) * INTERVAL '1 ms' FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&b.pool)
    .await
    .map_err(e)?;
    // The bulk INSERT's changes into the counters (the daemon's backlog
    // check would do it within 10 s; the bench runs no daemon), then the
    // tables in the shape a queue in steady use has: the n change rows the
    // fold deleted vacuumed away, as autovacuum would.
    sqlx::query("SELECT queue_fold('topic')")
        .execute(&b.pool)
        .await
        .map_err(e)?;
    sqlx::query("VACUUM FULL queue_blocks, queue_superblocks, queue_scopes")
        .execute(&b.pool)
        .await
        .map_err(e)?;
    sqlx::query(
        "VACUUM ANALYZE topic_creation_queue, seed_topic_creation_queue, queue_blocks, queue_superblocks,
                        queue_scopes, queue_changes",
    )
        .execute(&b.pool)
        .await
        .map_err(e)?;
    let mut items: Vec<String> = (1..=n).map(|g| format!("q-{g}")).collect();
    let mut rng = Rng(0x0f0f_f0f0_1234_5678 + n as u64);
    let mut t: Vec<Vec<Duration>> = vec![Vec::new(); 8];
    for i in 0..(s.queue_iterations)(n) {
        // Remove a random item (the seed shifts everyone behind it), add a new one at the tail.
        let at = rng.below(items.len() as u64) as usize;
        let gone = items.swap_remove(at);
        let new = format!("n-{i}");
        let look = items[rng.below(items.len() as u64) as usize].clone();
        let ours_first = i % 2 == 0;
        // Every other pair of iterations, a forum's plain SQL instead of
        // loyaltyd's calls (the same triggers do the bookkeeping).
        let plain = (i / 2) % 2 == 1;
        for side in [ours_first, !ours_first] {
            if side && plain {
                let remove = sqlx::query("DELETE FROM topic_creation_queue WHERE topic_id = $1")
                    .bind(&gone)
                    .execute(&b.pool);
                t[6].push(timed(remove).await?.1);
                let add = sqlx::query(
                    "INSERT INTO topic_creation_queue (topic_id, priority_score) VALUES ($1, $2)",
                )
                .bind(&new)
                .bind((i % 50) as f64)
                .execute(&b.pool);
                t[7].push(timed(add).await?.1);
            } else if side {
                t[0].push(
                    timed(queues::remove(&b.quiet, QueueKind::Topic, &ident(&gone)?))
                        .await?
                        .1,
                );
                let p = Priority::new((i % 50) as f64).map_err(|e| e.to_string())?;
                t[1].push(
                    timed(queues::add(
                        &b.quiet,
                        QueueKind::Topic,
                        &ident(&new)?,
                        &Scope::Global,
                        p,
                    ))
                    .await?
                    .1,
                );
                t[2].push(
                    timed(queues::position(&b.quiet, QueueKind::Topic, &ident(&look)?))
                        .await?
                        .1,
                );
            } else {
                t[3].push(timed(seed::queue_remove(&b.pool, &gone)).await?.1);
                t[4].push(
                    timed(seed::queue_add(&b.pool, &new, (i % 50) as f64))
                        .await?
                        .1,
                );
                t[5].push(timed(seed::queue_position(&b.pool, &look)).await?.1);
            }
        }
        items.push(new);
    }
    let (mut reorder, mut seed_reorder) = (Vec::new(), Vec::new());
    for round in 0..s.rounds {
        for k in 0..2 {
            if (round + k) % 2 == 0 {
                reorder.push(
                    timed(queues::reorder(&b.quiet, QueueKind::Topic, &Scope::Global))
                        .await?
                        .1,
                );
            } else {
                seed_reorder.push(timed(seed::queue_reorder(&b.pool)).await?.1);
            }
        }
    }
    let group = format!("Queues at {n} items");
    report.case(
        &group,
        "remove (from a random place)",
        vec![
            Side::new("loyaltyd", &t[0]),
            Side::new("plain SQL: DELETE", &t[6]),
            Side::new("seed", &t[3]),
        ],
    );
    report.case(
        &group,
        "add (at the tail)",
        vec![
            Side::new("loyaltyd", &t[1]).note("queue_add: the INSERT and the position"),
            Side::new("plain SQL: INSERT", &t[7]),
            Side::new("seed", &t[4]),
        ],
    );
    report.case(
        &group,
        "position",
        vec![
            Side::new("loyaltyd", &t[2]).note("counted blocks"),
            Side::new("seed", &t[5]).note("stored column"),
        ],
    );
    report.case(
        &group,
        "reorder the whole queue",
        vec![
            Side::new("loyaltyd", &reorder),
            Side::new("seed", &seed_reorder),
        ],
    );
    Ok(())
}
