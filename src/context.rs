//! The clients every service works through, built once from the configuration.

use std::sync::Arc;

use sqlx::PgPool;

use crate::cache::Cache;
use crate::config::Config;
use crate::db;
use crate::error::Result;
use crate::perf::PerfLists;
use crate::redis_runner::Redis;
use crate::replicas::Replicas;

/// PostgreSQL pool, Redis runner and cache, perf lists and configuration;
/// cheap to clone.
#[derive(Clone)]
pub struct Context {
    /// The PostgreSQL pool: the source of truth.
    pub pool: PgPool,
    /// The Redis runner (optional at run time): every Redis command goes
    /// through it.
    pub redis: Redis,
    /// The score cache in Redis.
    pub cache: Cache,
    /// Where operation timings go (off the request path).
    pub perf: PerfLists,
    /// Streaming replicas for reads that may lag (none configured: the pool).
    pub replicas: Replicas,
    /// The configuration it was built from.
    pub config: Arc<Config>,
}

impl Context {
    /// Connects to PostgreSQL now (exit 69 when it does not answer); Redis is
    /// connected on first use. Perf lists are written when `perf` is true.
    pub async fn connect(config: Config, perf: bool) -> Result<Context> {
        let pool = db::connect(&config.database).await?;
        Self::with_pool(config, pool, perf)
    }

    /// Builds the context around an existing pool (tests, benchmarks, the daemon).
    pub fn with_pool(config: Config, pool: PgPool, perf: bool) -> Result<Context> {
        let redis = Redis::new(&config.redis)?;
        let cache = Cache::new(redis.clone(), &config.redis);
        let perf = if perf {
            PerfLists::start(redis.clone(), config.metrics.perf_list_len)
        } else {
            PerfLists::disabled()
        };
        Ok(Context {
            pool,
            redis,
            cache,
            perf,
            replicas: Replicas::new(&config.database)?,
            config: Arc::new(config),
        })
    }
}
