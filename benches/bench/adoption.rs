//! `loyaltyd adopt` at size: a database of the original design
//! (tests/fixtures/original_design.sql), adopted while a forum writer keeps
//! writing the original's way (the score UPDATE, then the event INSERT, then
//! a read), through prepared statements. Reported: the adoption's time, and
//! the writer's latency and failed requests before and during it (its worst
//! is the longest the forum waited on a lock).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{Bench, Report, Side};

type R<T> = Result<T, String>;

/// Adopts a fresh database of `users` users and `events` events.
pub async fn adoption(b: &Bench, report: &mut Report, users: i64, events: i64) -> R<()> {
    let e = |err: sqlx::Error| err.to_string();
    let name = format!("{}_adopt", b.db_name);
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&b.admin)
            .await
            .map_err(e)?;
    }
    eprintln!("bench: building the original design with {users} users and {events} events");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/original_design.sql"
    );
    let opts = b.admin.connect_options().as_ref().clone().database(&name);
    let host = opts.get_host().to_owned();
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            &format!("users={users}"),
            "-v",
        ])
        .arg(format!("events={events}"))
        .args([
            "-h",
            &host,
            "-p",
            &opts.get_port().to_string(),
            "-U",
            opts.get_username(),
            "-d",
            &name,
            "-f",
            fixture,
        ])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(format!("fixture: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .map_err(e)?;
    // The writer's latency with nothing else going on, then during the adoption.
    let (before, failed_before) = forum_writer(&pool, users, Duration::from_secs(10), None).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            forum_writer(&pool, users, Duration::from_secs(86_400), Some(stop)).await
        })
    };
    let started = Instant::now();
    let ctx = loyaltyd::Context::with_pool((*b.quiet.config).clone(), pool.clone(), false)
        .map_err(|e| e.to_string())?;
    let adopted = loyaltyd::adopt::adopt(&ctx, &loyaltyd::adopt::Options::default())
        .await
        .map_err(|e| e.to_string());
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (during, failed) = writer.await.map_err(|e| e.to_string())??;
    adopted?;
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&b.admin)
    .await
    .map_err(e)?;
    let worst = |v: &[Duration]| v.iter().max().copied().unwrap_or_default().as_secs_f64() * 1000.0;
    let group = format!("Adoption ({users} users, {events} events)");
    report.case(
        &group,
        "adopt the original design's database",
        vec![Side::new("loyaltyd adopt", &[took])],
    );
    report.case(
        &group,
        "a forum write (UPDATE score, INSERT event, read)",
        vec![
            Side::new("during the adoption", &during).note(format!(
                "worst {:.0} ms, {failed} failed requests",
                worst(&during)
            )),
            Side::new("before it (nothing else running)", &before).note(format!(
                "worst {:.0} ms, {failed_before} failed requests",
                worst(&before)
            )),
        ],
    );
    Ok(())
}

/// The original design's write, in a loop: its two statements, then a read
/// of the score; each iteration's latency.
async fn forum_writer(
    pool: &PgPool,
    users: i64,
    limit: Duration,
    stop: Option<Arc<AtomicBool>>,
) -> R<(Vec<Duration>, u64)> {
    let mut lat = Vec::new();
    let mut failed = 0u64;
    let started = Instant::now();
    let mut i: i64 = 0;
    while started.elapsed() < limit && !stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
        i += 1;
        let user = 1 + (i * 7919) % users;
        let t = Instant::now();
        // Statements as the original sends them, each a prepared statement
        // of the connection (sqlx caches them, as psycopg and asyncpg do): a
        // column whose type changed under one would fail it. A failure is
        // counted as the forum's failed request, never retried.
        let ok = async {
            sqlx::query("UPDATE users SET loyalty_score = loyalty_score + 1, updated_at = NOW() WHERE id = $1")
                .bind(user as i32)
                .execute(pool)
                .await?;
            sqlx::query(
                "INSERT INTO moderation_events (user_id, event_type, content_type, content_id, outcome)
                 VALUES ($1, 'moderation_decision', 'post', $2, 'approved')",
            )
            .bind(user as i32)
            .bind(format!("bench-{i}"))
            .execute(pool)
            .await?;
            sqlx::query("SELECT loyalty_score FROM users WHERE id = $1")
                .bind(user as i32)
                .fetch_one(pool)
                .await
                .map(|_| ())
        }
        .await;
        if let Err(err) = ok {
            failed += 1;
            if failed == 1 {
                eprintln!("bench: the forum's first failed request: {err}");
            }
        }
        lat.push(t.elapsed());
    }
    Ok((lat, failed))
}
