//! loyaltyd keeps a moderated forum's loyalty data fast and correct at scale:
//! incremental loyalty scores with a coherent Redis cache, a debounced
//! materialized-view leaderboard, three moderation queues with exact positions
//! at any length, a nightly integrity sweep, and the telemetry to prove it.
//!
//! # Layout
//! Each layer uses only the ones above it.
//! * [`config`], [`error`], [`types`], [`retry`]: configuration, the one
//!   error type and its exit codes, the input types parsed at the edge, and
//!   the one retry policy.
//! * [`db`], [`definitions`], [`replicas`], [`redis_conn`], [`redis_runner`],
//!   [`score_row`], [`cache`], [`telemetry`], [`perf`], [`context`]: the
//!   PostgreSQL pool and migrations, the current SQL definitions (sql/: every
//!   function, trigger, view and grant, applied after the migrations), the
//!   read replicas, the Redis connection (one node or a cluster) and the
//!   runner every command goes through, the committed score row, the score
//!   cache, the metrics and logging, the operation timer and the Redis perf
//!   lists, and the bundle of them that services take.
//! * [`loyalty`], [`leaderboard`], [`queues`]: the services; each owns its
//!   SQL, its Redis keys and its invariants ([`leaderboard::live`] the live
//!   board's). [`publish`] composes the score write that keeps the cache and
//!   the live board. [`sweep`] checks and repairs what the services keep.
//!   [`demo`] serves `demo seed`.
//! * [`jobs`]: the scheduled work and the runner that guards each tick;
//!   [`background`]: the daemon's loops, in one shape;
//!   [`sync`]: the daemon's cache sync for writers that bypass loyaltyd;
//!   [`backlog`]: the forum's traffic and backlog as metrics, whoever writes.
//! * [`adopt`]: the online upgrade of a database of the original design.
//! * [`daemon`], [`cli`]: the entry points.

// Panics stay out of the program: an input or an outage reaches nearly
// every line, so nothing outside tests may unwrap or expect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod adopt;
pub mod background;
pub mod backlog;
pub mod cache;
pub mod cli;
pub mod config;
pub mod context;
pub mod daemon;
pub mod db;
pub mod definitions;
pub mod demo;
pub mod error;
pub mod jobs;
pub mod leaderboard;
pub mod locks;
pub mod log_output;
pub mod loyalty;
pub mod perf;
pub mod publish;
pub mod queues;
pub mod redis_conn;
pub mod redis_runner;
pub mod replicas;
pub mod retry;
pub mod score_row;
pub mod sweep;
pub mod sync;
pub mod telemetry;
pub mod types;

pub use config::Config;
pub use context::Context;
pub use db::MIGRATOR;
pub use error::{Error, Result};
