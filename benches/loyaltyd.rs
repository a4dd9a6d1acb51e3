//! `cargo bench --bench loyaltyd -- [--small | --large] [--json]`
//!
//! loyaltyd against the seed's own algorithms and against the floor (the
//! cheapest thing PostgreSQL can do), side by side in one run, alternating
//! the sides so the machine's drift hits all of them. Needs `DATABASE_URL`
//! (any database on the server: a scratch database is created and dropped)
//! and `REDIS_URL`; `scripts/bench.sh` sets both up.

mod bench;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
