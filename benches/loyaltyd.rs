//! `cargo bench --bench loyaltyd -- [--small | --large] [--json] [--only GROUP]`
//!
//! loyaltyd against the seed's own algorithms and against the floor (the
//! cheapest thing PostgreSQL can do), side by side in one run, alternating
//! the sides so the machine's drift hits all of them. Needs `DATABASE_URL`
//! (any database on the server: a scratch database is created and dropped)
//! and `REDIS_URL`; `scripts/bench.sh` sets both up.

mod bench;
// The engines the tests start (a Redis Cluster, a streaming replica), for
// the "Past one host" cases; the test crate has its own `crate::engines`.
#[path = "../tests/it/engines.rs"]
mod engines;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench`:
        // the full run would take many minutes in a debug build. The test
        // suite runs the small mode itself (tests/it/bench.rs).
        eprintln!("bench: run it with `cargo bench` or scripts/bench.sh; nothing to do here");
        return std::process::ExitCode::SUCCESS;
    }
    let opts = bench::Opts::from_args(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench::run(&opts)) {
        Ok(report) => {
            println!(
                "{}",
                if opts.json {
                    report.json()
                } else {
                    report.markdown(&opts)
                }
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
