//! The benchmark, in its small mode, so it never rots: every case reports
//! every side. Timings are not checked here (they are meaningless in a debug
//! build on a shared machine); `cargo bench` is where they are measured.

#[path = "../../benches/bench/mod.rs"]
mod harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_in_small_mode_and_reports_every_row() {
    let opts = harness::Opts {
        small: true,
        large: false,
        json: false,
        recorder: false,
        idle: None,
        soak: None,
        only: None,
    };
    let report = harness::run(&opts)
        .await
        .unwrap_or_else(|e| panic!("benchmark: {e}"));
    let expected = [
        ("Event recording (1 client)", "record one event", 9),
        ("Event recording (bulk)", "a batch of 500 events", 4),
        (
            "Event recording (16 concurrent clients)",
            "record one event",
            6,
        ),
        ("Telemetry overhead", "record one event", 3),
        ("Integrity sweep", "every score against its events", 3),
        ("Leaderboard (", "a page of 100 at a random offset", 3),
        ("Leaderboard (", "one user's rank", 3),
        (
            "Leaderboard (",
            "record_event (what keeping the live board costs a write)",
            2,
        ),
        ("Leaderboard (", "record_event, 16 writers at once", 2),
        ("Leaderboard (", "refresh the view after 10 changes", 3),
        (
            "Leaderboard (",
            "a reader's worst wait during one refresh",
            3,
        ),
        (
            "Past one host",
            "record_event (one Redis vs a 3-master cluster)",
            2,
        ),
        (
            "Past one host",
            "score get, cache hit (one Redis vs a 3-master cluster)",
            2,
        ),
        (
            "Past one host",
            "one user's rank from the view (primary vs a streaming replica)",
            2,
        ),
        ("Queues at 500 items", "remove (from a random place)", 3),
        ("Queues at 500 items", "add (at the tail)", 3),
        ("Queues at 2000 items", "reorder the whole queue", 2),
    ];
    for (group, case, sides) in expected {
        let rows: Vec<_> = report
            .rows
            .iter()
            .filter(|r| r.group.starts_with(group) && r.case == case)
            .collect();
        assert_eq!(rows.len(), sides, "{group} / {case}: {rows:?}");
        for r in rows {
            assert!(r.n > 0 && r.p50_ms.is_finite() && r.p50_ms > 0.0, "{r:?}");
            assert!(r.p50_ms <= r.p95_ms && r.p95_ms <= r.p99_ms, "{r:?}");
        }
    }
    assert!(
        report
            .rows
            .iter()
            .filter(|r| r.side == "loyaltyd")
            .all(|r| r.ratio_to_loyaltyd == Some(1.0))
    );
    let table = report.markdown(&opts);
    assert!(table.contains("| case | side |") && table.contains("**Queues at 2000 items**"));
}
