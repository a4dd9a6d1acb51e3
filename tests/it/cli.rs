//! The command line: exit codes, one-line errors, JSON shapes, hostile input.

use sqlx::PgPool;

use crate::common;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a refusal: the exit code, one line on stderr, no panic, nothing on stdout.
fn assert_refused(out: &std::process::Output, code: i32, args: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?}: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line, got: {err}"
    );
    assert!(out.stdout.is_empty(), "{args:?}");
}

/// A command line written as one string (no argument holds a space).
fn words(line: &str) -> Vec<&str> {
    line.split(' ').collect()
}

#[sqlx::test(migrations = false)]
async fn commands_answer_in_the_schema_s_own_names(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 3).await;
    let cfg = common::config(&pool, "cli");
    let rec = common::run_json(&cfg, &common::record_args("2", "topic", "t", "approved"));
    assert_eq!(
        (rec["user_id"].as_i64(), rec["loyalty_score"].as_i64()),
        (Some(2), Some(5))
    );
    let score = common::run_json(&cfg, &["score", "get", "--user", "2"]);
    assert_eq!(score["loyalty_score"], 5);
    let recalc = common::run_json(&cfg, &["score", "recalc", "--user", "2"]);
    assert_eq!(recalc["loyalty_score"], 5);
    let all = common::run_json(&cfg, &["score", "recalc", "--all"]);
    assert_eq!(
        (all["users_checked"].as_i64(), all["drifted_users"].as_i64()),
        (Some(3), Some(0))
    );
    let refresh = common::run_json(&cfg, &["leaderboard", "refresh", "--force"]);
    assert_eq!(refresh["refreshed"], true);
    let show = common::run_json(&cfg, &["leaderboard", "show", "--limit", "5"]);
    let entry = &show["entries"][0];
    for key in [
        "user_id",
        "username",
        "loyalty_score",
        "rank",
        "can_create_topics",
    ] {
        assert!(entry.get(key).is_some(), "{key} in {entry}");
    }
    let rank = common::run_json(&cfg, &["leaderboard", "rank", "--user", "1"]);
    assert!(
        rank["rank"].is_null(),
        "unranked is null, not an error: {rank}"
    );
    assert_eq!(rank["can_create_topics"], false);
    let add = common::run_json(
        &cfg,
        &[
            "queue",
            "add",
            "--queue",
            "post",
            "--content-id",
            "p1",
            "--topic",
            "t9",
            "--priority",
            "-1.5",
        ],
    );
    assert_eq!(
        (
            add["queue"].as_str(),
            add["content_id"].as_str(),
            add["position"].as_i64()
        ),
        (Some("post"), Some("p1"), Some(1))
    );
    let pos = common::run_json(
        &cfg,
        &["queue", "position", "--queue", "post", "--content-id", "p1"],
    );
    assert_eq!(pos["position"], 1);
    let list = common::run_json(&cfg, &["queue", "list", "--queue", "post", "--topic", "t9"]);
    assert_eq!(list["items"][0]["content_id"], "p1");
    assert_eq!(list["items"][0]["priority_score"], -1.5);
    let reorder = common::run_json(&cfg, &["queue", "reorder", "--queue", "post", "--all"]);
    assert_eq!(reorder["scopes"], 1);
    let removed = common::run_json(
        &cfg,
        &["queue", "remove", "--queue", "post", "--content-id", "p1"],
    );
    assert_eq!(removed["content_id"], "p1");
    let stats = common::run_json(&cfg, &["stats"]);
    let lists = stats["lists"].as_array().cloned().unwrap_or_default();
    assert!(
        lists.iter().any(|l| l["key"]
            .as_str()
            .is_some_and(|k| k.ends_with("perf:loyalty_updates"))),
        "{stats}"
    );
    for key in ["count", "avg_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"] {
        assert!(lists[0].get(key).is_some(), "{key}");
    }
}

#[sqlx::test(migrations = false)]
async fn refusals_have_the_spec_exit_codes_and_write_nothing(pool: PgPool) {
    common::migrate(&pool).await;
    common::users(&pool, 1).await;
    let cfg = common::config(&pool, "refuse");
    common::run_json(
        &cfg,
        &["queue", "add", "--queue", "topic", "--content-id", "dup"],
    );
    let long = "x".repeat(10_000);
    let cases: Vec<(i32, Vec<&str>)> = vec![
        (65, common::record_args("99", "post", "c", "approved")),
        (2, common::record_args("1", "comment", "c", "approved")),
        (2, common::record_args("1", "post", "c", "deleted")),
        (2, common::record_args("0", "post", "c", "approved")),
        (2, common::record_args("-5", "post", "c", "approved")),
        (
            2,
            common::record_args("99999999999999999999", "post", "c", "approved"),
        ),
        (2, common::record_args("1", "post", "", "approved")),
        (2, common::record_args("1", "post", &long, "approved")),
        (65, words("score get --user 12345")),
        (2, words("score recalc")),
        (2, words("score recalc --user 1 --all")),
        (2, words("leaderboard show --limit 0")),
        (2, words("leaderboard show --limit 1001")),
        (2, words("leaderboard show --offset -1")),
        (2, words("leaderboard show --limit 18446744073709551616")),
        (65, words("leaderboard rank --user 77")),
        (65, words("queue add --queue topic --content-id dup")),
        (2, words("queue add --queue post --content-id p")),
        (
            2,
            words("queue add --queue message --content-id m --topic t"),
        ),
        (2, words("queue add --queue topic --content-id t --topic x")),
        (
            2,
            words("queue add --queue topic --content-id t --priority NaN"),
        ),
        (
            2,
            words("queue add --queue topic --content-id t --priority inf"),
        ),
        (
            2,
            words("queue add --queue topic --content-id t --priority 1e400"),
        ),
        (2, words("queue add --queue nope --content-id t")),
        (65, words("queue remove --queue topic --content-id ghost")),
        (65, words("queue position --queue post --content-id ghost")),
        (2, words("queue list --queue topic --limit 100001")),
        (2, words("queue list --queue topic --limit -3")),
        (2, words("queue reorder --queue post --topic t --all")),
        (2, words("demo seed --users -1")),
        (2, words("demo seed --events 10")),
        (2, words("no-such-command")),
    ];
    for (code, args) in &cases {
        let out = common::run(&cfg, args);
        assert_refused(&out, *code, args);
    }
    // Nothing was written by any of them.
    let (events, users, queued): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM moderation_events), (SELECT count(*) FROM users),
                (SELECT count(*) FROM topic_creation_queue)",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((events, users, queued), (0, 1, 1));
}

#[test]
fn an_unreachable_database_exits_69_in_one_line() {
    let mut cfg = loyaltyd::config::Config::default();
    cfg.database.url = format!("postgres://root@127.0.0.1:{}/x", common::free_port()).into();
    cfg.database.connect_timeout = std::time::Duration::from_secs(2);
    for args in [vec!["score", "get", "--user", "1"], vec!["migrate"]] {
        let out = common::run(&cfg, &args);
        assert_refused(&out, 69, &args);
        assert!(
            stderr(&out).contains("PostgreSQL unreachable"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn invalid_utf8_arguments_are_refused_with_exit_2() {
    use std::os::unix::ffi::OsStrExt;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loyaltyd"))
        .args(["queue", "position", "--queue", "topic", "--content-id"])
        .arg(std::ffi::OsStr::from_bytes(b"bad\xff\xfe"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
