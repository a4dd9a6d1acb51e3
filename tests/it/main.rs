//! Integration tests against real PostgreSQL and Redis: one binary, a module per concern.
//!
//! Every test gets its own freshly migrated database (`#[sqlx::test]`, from
//! `DATABASE_URL`) and its own Redis key prefix, so they run in parallel
//! without seeing each other. `scripts/test.sh` brings both services up.

mod common;

mod adopt;
mod bench;
mod cli;
mod cluster;
mod config;
mod contract;
mod daemon;
mod deadlocks;
mod docs;
mod engines;
mod faults;
mod hostile;
mod leaderboard;
mod live;
mod loyalty;
mod package;
mod pooler;
mod prometheus;
mod queues;
mod reliability;
mod replicas;
mod schema;
mod telemetry;
mod waits;
mod writers;
