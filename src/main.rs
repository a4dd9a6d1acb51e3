//! The `loyaltyd` binary: parse the command line, run it, map errors to exit codes.

// Panics stay out of the program: an input or an outage reaches nearly
// every line, so nothing outside tests may unwrap or expect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;
use loyaltyd::cli::{self, Cli};
use loyaltyd::error::{EXIT_RUNTIME, one_line};
use loyaltyd::log_output::say;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as clap formats them, exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, as every other error: clap's message and usage, folded.
            let text = e.render().to_string();
            let text = text.replace("For more information, try '--help'.", "(see --help)");
            say(&format!(
                "loyaltyd: {}",
                one_line(text.trim_start_matches("error: "))
            ));
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // check-config checks what the service will run: the unit's environment
    // file too. Applied here, before the runtime starts any thread.
    if let cli::Command::CheckConfig(args) = &cli.command
        && let Some(path) = args.env_file()
    {
        match loyaltyd::config::read_env_file(&path) {
            Ok(vars) => {
                for (k, v) in vars {
                    // SAFETY: single-threaded here: no other thread reads
                    // or writes the environment yet.
                    unsafe { std::env::set_var(k, v) };
                }
            }
            Err(e) => {
                say(&format!("loyaltyd: {}", e.one_line()));
                return ExitCode::from(e.exit_code());
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("loyaltyd: cannot start the async runtime: {e}"));
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => {
            loyaltyd::log_output::flush(std::time::Duration::from_secs(1));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("loyaltyd: {}", e.one_line()));
            ExitCode::from(e.exit_code())
        }
    }
}
